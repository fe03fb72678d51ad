"""Model adapters, one module per family, and the loader.

`load_adapter(path)` reads a local checkpoint's config.json and picks the family; `None` loads the shipped
toy base. Every adapter has the interface of `adapter.Adapter`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from fastjudge.engine.options import DecodeOptions
from fastjudge.models.adapter import Adapter
from fastjudge.models.training import TRAIN_MODES, apply_liger_kernels
from fastjudge.models.chat import ChatAdapter
from fastjudge.models.features import DEFAULT_CACHE_BYTES, FeatureCache, ImageFeatures, image_hash
from fastjudge.models.mllama import MllamaAdapter, MllamaFamily, patch_mllama
from fastjudge.models.qwen2_vl import QwenVLAdapter, mrope_positions
from fastjudge.models.toy import TOY_MARKER, ToyAdapter, base_model_dir

__all__ = ["FAMILIES", "TRAIN_MODES", "Adapter", "ChatAdapter", "FeatureCache", "ImageFeatures", "MllamaAdapter",
           "MllamaFamily", "QwenVLAdapter", "ToyAdapter", "apply_liger_kernels", "check_device", "default_dtype", "image_hash",
           "load_adapter", "mrope_positions", "patch_mllama", "register_family"]


# The registry: config.json model_type -> (adapter, transformers model class). A new family is one module and one
# `register_family` line (docs/architecture.md).
FAMILIES = {
    "mllama": (MllamaAdapter, "MllamaForConditionalGeneration"),
    "qwen2_vl": (QwenVLAdapter, "Qwen2VLForConditionalGeneration"),
    "qwen2_5_vl": (QwenVLAdapter, "Qwen2_5_VLForConditionalGeneration"),
}


def register_family(model_type: str, adapter_class: type[Adapter], model_class: str) -> None:
    """Make checkpoints whose config.json says `model_type` load as `adapter_class` around transformers'
    `model_class` (the name of its class in the `transformers` package)."""
    if not (isinstance(adapter_class, type) and issubclass(adapter_class, Adapter)):
        raise ValueError(f"adapter_class: expected a subclass of Adapter, got {adapter_class!r}")
    FAMILIES[model_type] = (adapter_class, model_class)


def check_device(device: str) -> None:
    """A ValueError naming `device` when this machine cannot run a model there: not a torch device, or a GPU
    that torch cannot use here."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device: {device!r} is not a torch device (cpu, cuda, cuda:1, ...)") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device: {device!r} is not available: this torch ({torch.__version__}) sees no CUDA "
                             "GPU; use --device cpu")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ValueError(f"device: {device!r} is not available: {torch.cuda.device_count()} GPU(s) here")
    elif parsed.type not in ("cpu", "meta"):
        raise ValueError(f"device: {device!r}: fastjudge runs on cpu or cuda")


def default_dtype(device: str, toy_model: bool) -> torch.dtype:
    """float32 for the toy and on the CPU; bfloat16 for a real model on a GPU."""
    return torch.float32 if toy_model or not str(device).startswith("cuda") else torch.bfloat16


def load_adapter(model_path: str | None, *, device: str = "cpu", dtype: torch.dtype | str | None = None,
                 feature_cache: FeatureCache | None = None, decode_options: DecodeOptions | None = None) -> Adapter:
    """The toy base model when `model_path` is None, else a local checkpoint: a toy one (marked by
    fastjudge_toy.json), Llama-3.2-Vision (model_type "mllama"), Qwen2-VL or Qwen2.5-VL.

    feature_cache: the image-feature cache the adapter uses (a run hands the same one to every adapter it
    loads; default: a cache of the adapter's own, 16 GiB). decode_options: how it decodes (default:
    `DecodeOptions.from_environment()`)."""
    check_device(device)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    adapter = _load(model_path, device, dtype)
    adapter.feature_cache = feature_cache if feature_cache is not None else FeatureCache(DEFAULT_CACHE_BYTES)
    if decode_options is not None:
        adapter.decode_options = decode_options
    return adapter


def _load(model_path: str | None, device: str, dtype: torch.dtype | None) -> Adapter:
    if model_path is None:
        return ToyAdapter.load(base_model_dir(), dtype=dtype or torch.float32, device=device)
    path = Path(model_path)
    if not path.is_dir() or not (path / "config.json").is_file():
        raise ValueError(f"model: expected a local checkpoint directory with config.json, got {model_path!r}")
    if (path / TOY_MARKER).is_file():
        return ToyAdapter.load(path, dtype=dtype or torch.float32, device=device)
    model_type = json.loads((path / "config.json").read_text()).get("model_type")
    if model_type not in FAMILIES:
        raise ValueError(f"model: {path / 'config.json'}: model_type {model_type!r} is not supported "
                         f"(supported: {', '.join(FAMILIES)})")
    adapter_class, model_class = FAMILIES[model_type]
    return adapter_class.load(path, model_class, dtype=dtype or default_dtype(device, toy_model=False), device=device)
