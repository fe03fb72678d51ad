"""Model adapters: the one small interface that synth, filter, train and eval use.

An adapter owns a model, its tokenizer and image preprocessing:
- `generate(images, prompts, n=..., ...) -> list[list[str]]`: n completions per (image, prompt);
- `sft_loss(images, prompts, targets)` / `sft_backward(...)`: cross-entropy on the assistant tokens only
  (the target and its end-of-turn token);
- `begin_training(train)` / `end_training()`: what fine-tuning updates ("text": vision tower frozen, the
  default; "all"; "lora": LoRA adapters on the language model through peft, merged back at the end);
- `save(path)`: a checkpoint that plain transformers loads (`AutoModelForImageTextToText`, `AutoTokenizer`,
  `AutoImageProcessor`).

Families: `ToyAdapter` (our shapes-world Mllama, word-level tokenizer), `MllamaAdapter` (Llama-3.2-Vision),
`QwenVLAdapter` (Qwen2-VL and Qwen2.5-VL). Prompts go through the checkpoint's own chat template.

Vision features: with the vision tower frozen, each image is encoded once and reused (`FeatureCache`, keyed by
the image's pixels and a fingerprint of the vision weights), by synth, filter, train and eval alike, and by the
n samples of one prompt. What is cached is what the language model consumes: Mllama's projected
cross-attention states, Qwen's merged patch embeddings.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import shutil
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from fastjudge import decoding, toy
from fastjudge.answer_spans import EarlyStop, SpanTables
from fastjudge.decoding import decode_groups
from fastjudge.kernels.linear_cross_entropy import fused_linear_cross_entropy

Progress = Callable[[int], None]
TOY_MARKER = "fastjudge_toy.json"
TRAIN_MODES = ("text", "all", "lora")
# LoRA goes on the language model's projections only (vision modules have projections of the same names)
LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
VISION_BATCH = 16  # images per vision-tower forward on a cache miss


def _chunks(count: int, size: int):
    for start in range(0, count, size):
        yield start, min(count, start + size)


# -------------------------------------------------------------------------------------------------------
# Vision feature cache


@dataclass
class ImageFeatures:
    """One image as the language model consumes it. Mllama: (tiles * patches, hidden) cross-attention states;
    Qwen: (image tokens, hidden) merged patch embeddings. `info`: Mllama (valid tiles,), Qwen grid (t, h, w)."""
    features: torch.Tensor
    info: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return self.features.numel() * self.features.element_size()


class FeatureCache:
    """Least-recently-used map (image hash, vision fingerprint) -> ImageFeatures (kept on the CPU), bounded in
    bytes; `stats` counts hits, misses (= images encoded) and evictions."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple[str, str], ImageFeatures] = OrderedDict()
        self._bytes = 0
        self.stats = {"hits": 0, "misses": 0, "evictions": 0}

    def get(self, key: tuple[str, str]) -> ImageFeatures | None:
        entry = self._entries.get(key)
        if entry is None:
            self.stats["misses"] += 1
            return None
        self._entries.move_to_end(key)
        self.stats["hits"] += 1
        return entry

    def put(self, key: tuple[str, str], entry: ImageFeatures) -> None:
        if entry.nbytes > self.max_bytes:
            return
        if key in self._entries:
            self._bytes -= self._entries.pop(key).nbytes
        self._entries[key] = entry
        self._bytes += entry.nbytes
        self._evict()

    def resize(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._evict()

    def _evict(self) -> None:
        while self._bytes > self.max_bytes and self._entries:
            _, old = self._entries.popitem(last=False)
            self._bytes -= old.nbytes
            self.stats["evictions"] += 1

    def __len__(self) -> int:
        return len(self._entries)


# One cache per process: the base model and the judge share a frozen vision tower, hence its entries.
FEATURE_CACHE = FeatureCache(max_bytes=16 << 30)
_IMAGE_HASHES: dict[int, str] = {}  # id(image) -> hash, dropped when the image is collected


def image_hash(image: Image.Image) -> str:
    """sha256 of an image's mode, size and pixels (not its file name), memoized per image object. Modes whose
    bytes are not colours (palette "P": indices) are hashed as RGB."""
    digest = _IMAGE_HASHES.get(id(image))
    if digest is None:
        pixels = image if image.mode in ("RGB", "RGBA", "L") else image.convert("RGB")
        h = hashlib.sha256(f"{pixels.mode}:{pixels.size}:".encode())
        h.update(pixels.tobytes())
        digest = _IMAGE_HASHES[id(image)] = h.hexdigest()
        weakref.finalize(image, _IMAGE_HASHES.pop, id(image), None)
    return digest


# -------------------------------------------------------------------------------------------------------
# The shared driver


class Adapter:
    """Shared driver code. A family provides `_preprocess`, `_encode_images`, `_prompt_ids`, `_target_ids`,
    `_model_inputs`, `decode` and `save`, and names its vision modules in `vision_modules`."""

    model: torch.nn.Module
    judge_style: str = "natural"
    vision_modules: tuple[str, ...] = ()  # name fragments of the parameters that "text" training freezes
    eos_ids: set[int]
    pad_id: int
    feature_cache: FeatureCache | None = FEATURE_CACHE
    _vision_fingerprint: str | None = None
    _peft = None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ---- images

    def _is_vision(self, name: str) -> bool:
        return any(fragment in name for fragment in self.vision_modules)

    def vision_fingerprint(self) -> str:
        """sha256 over the image preprocessing and the vision tower's parameter names and bytes; computed once
        per set of weights."""
        if self._vision_fingerprint is None:
            h = hashlib.sha256(type(self.model).__name__.encode())
            h.update(self._preprocessing().encode())
            for name, p in self.model.named_parameters():
                if self._is_vision(name):
                    h.update(name.encode())
                    h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
            self._vision_fingerprint = h.hexdigest()
        return self._vision_fingerprint

    def _vision_trains(self) -> bool:
        """Whether image features need gradients now (then they are computed live, not cached)."""
        return torch.is_grad_enabled() and any(p.requires_grad for name, p in self.model.named_parameters()
                                               if self._is_vision(name))

    def image_features(self, images: list[Image.Image]) -> list[ImageFeatures]:
        """Features of each image: from the cache when the vision tower is frozen (misses encoded in batches of
        VISION_BATCH), computed with gradients when it trains."""
        if self._vision_trains() or self.feature_cache is None or self.feature_cache.max_bytes <= 0:
            return self._encode_images(images)
        fingerprint = self.vision_fingerprint()
        keys = [(image_hash(im), fingerprint) for im in images]
        found: dict[tuple[str, str], ImageFeatures] = {}
        missing: dict[tuple[str, str], Image.Image] = {}
        for key, image in zip(keys, images):
            if key in found or key in missing:
                continue
            entry = self.feature_cache.get(key)
            if entry is None:
                missing[key] = image
            else:
                found[key] = entry
        todo = list(missing.items())
        training = self.model.training
        self.model.eval()  # cached features must not depend on the mode (dropout) they were computed in
        for start, stop in _chunks(len(todo), VISION_BATCH):
            with torch.no_grad():
                encoded = self._encode_images([image for _, image in todo[start:stop]])
            for (key, _), entry in zip(todo[start:stop], encoded):
                # a copy: a view would keep the whole batch's features alive
                entry = ImageFeatures(entry.features.to("cpu", copy=True), entry.info)
                found[key] = entry
                self.feature_cache.put(key, entry)
        self.model.train(training)
        return [found[key] for key in keys]

    # ---- generation

    @torch.no_grad()
    def generate(self, images: list[Image.Image], prompts: list[str], *, n: int = 1, max_new_tokens: int = 64,
                 temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0, seed: int = 0,
                 stop: list[str] | None = None, batch_rows: int = 256, batch_tokens: int | None = None,
                 progress: Progress | None = None, slots: int | None = None, early_stop: float = 0.0,
                 min_votes: int = 1, prefixes: list[str] | None = None) -> list[list[str]]:
        """n completions for each (image, prompt); temperature 0 is greedy (then n must be 1).

        With `prefixes`, the answer of prompt i starts with prefixes[i] (given, not generated) and each
        completion returned is that prefix followed by what the model wrote after it (`join_prefix`).

        With `early_stop` > 0 (closed-ended prompts; needs `refills`), each prompt decodes `slots` samples at
        a time, a slot starting the next sample when one ends, and stops once its majority is settled on the
        device (`answer_spans.DeviceVote` with `min_votes` and confidence `early_stop`): a prompt then gets
        between 1 and n completions. The host vote (`voting.majority_vote`) stays the final word.

        Each prompt and its image are encoded and prefilled once and shared by its n samples (`decode`).
        A completion ends at an end-of-turn token or just before the first of the `stop` strings it writes.
        Prompts are batched so that decoding holds at most `batch_rows` rows (prompts x n) and, with
        `batch_tokens`, at most that many token positions (rows x (longest prompt + max_new_tokens)), a batch
        holding at least one prompt. Each batch is seeded from (seed, batch index), so a run is reproducible
        for fixed batch_rows and batch_tokens.
        """
        if len(images) != len(prompts):
            raise ValueError(f"images and prompts: expected the same length, got {len(images)} and {len(prompts)}")
        if prefixes is not None and len(prefixes) != len(prompts):
            raise ValueError(f"prefixes: expected one per prompt ({len(prompts)}), got {len(prefixes)}")
        if n < 1:
            raise ValueError(f"n: expected >= 1, got {n}")
        if temperature < 0:
            raise ValueError(f"temperature: expected >= 0, got {temperature}")
        if temperature == 0 and n > 1:
            raise ValueError("n: greedy decoding (temperature 0) gives one completion per prompt; use n=1")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p: expected in (0, 1], got {top_p}")
        if top_k < 0:
            raise ValueError(f"top_k: expected >= 0 (0 = off), got {top_k}")
        if not 0 <= min_p < 1:
            raise ValueError(f"min_p: expected in [0, 1), got {min_p}")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens: expected >= 1, got {max_new_tokens}")
        if batch_tokens is not None and batch_tokens < 1:
            raise ValueError(f"batch_tokens: expected >= 1 or None, got {batch_tokens}")
        if slots is not None and not 1 <= slots <= n:
            raise ValueError(f"slots: expected in [1, n={n}] or None, got {slots}")
        if not 0 <= early_stop <= 1:
            raise ValueError(f"early_stop: expected a confidence in [0, 1] (0 = off), got {early_stop}")
        if (early_stop > 0 or slots is not None) and not self.refills:
            raise ValueError(f"early_stop, slots: {type(self).__name__} decodes without the shared Mllama decoder")
        if not 1 <= min_votes <= n:
            raise ValueError(f"min_votes: expected in [1, n={n}], got {min_votes}")
        stopping = None
        if early_stop > 0:
            stopping = EarlyStop(self.span_tables(), confidence=early_stop, min_votes=min_votes)
        for i, (image, prompt) in enumerate(zip(images, prompts)):
            if not isinstance(prompt, str) or not prompt.strip():
                raise ValueError(f"prompts[{i}]: expected a non-empty string, got {prompt!r}")
            if not isinstance(image, Image.Image):
                raise ValueError(f"images[{i}]: expected a PIL image, got {type(image).__name__}")
        stops = [s for s in (stop or []) if s]
        # a stop string of L characters spans at most L tokens that each write a character; byte pieces and
        # special tokens write none, hence the margin (a late detection only costs steps: `_cut` finds it)
        # plus the steps between two looks from the host (the decoder checks stops every sync_every <= 8 steps)
        window = 4 * max(map(len, stops), default=0) + 16

        def stopped(tokens: list[int]) -> bool:
            tail = self.decode_raw(tokens[-window:])
            return any(s in tail for s in stops)

        self.model.eval()
        self.use_gpu_kernels()
        out: list[list[str]] = []
        per_batch = max(1, batch_rows // (slots or n))
        batch_index = 0
        for start, end in _chunks(len(prompts), per_batch):
            features = self.image_features(images[start:end])
            rows = [self._prompt_ids(p, f) for p, f in zip(prompts[start:end], features)]
            if prefixes is not None:
                rows = [row + self._prefix_ids(x) for row, x in zip(rows, prefixes[start:end])]
            for first, last in _token_budget(rows, slots or n, max_new_tokens, batch_tokens):
                inputs = self._model_inputs(rows[first:last], features[first:last], left=True)
                generator = torch.Generator(device=self.device).manual_seed(seed * 1_000_003 + batch_index)
                batch_index += 1
                groups = decode_groups(self.model, inputs, max_new_tokens=max_new_tokens, eos_ids=self.eos_ids,
                                       n=n, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                                       generator=generator, stop=stopped if stops else None, slots=slots,
                                       early_stop=stopping)
                texts = [[_cut(self.decode(row), stops) for row in group] for group in groups]
                if prefixes is not None:
                    texts = [[self.join_prefix(x, t) for t in group]
                             for x, group in zip(prefixes[start + first:start + last], texts)]
                out.extend(texts)
                if progress:
                    progress(last - first)
        return out

    def _prefix_ids(self, prefix: str) -> list[int]:
        """Token ids of the start of an answer (the target's ids without its end-of-turn token)."""
        return self._target_ids(prefix)[:-1]

    def join_prefix(self, prefix: str, completion: str) -> str:
        """A given answer start and the model's continuation of it, as one text."""
        return prefix + completion

    def use_gpu_kernels(self) -> None:
        """On CUDA, Mllama's cross-attention layers run `fastjudge.kernels.cross_attention` (`patch_mllama`,
        masked rows as transformers), for training and prefill; once per model. FASTJUDGE_GPU_KERNELS=0 in the
        environment turns this (and the decoder's use of the kernel) off."""
        if self.device.type != "cuda" or getattr(self.model.config, "model_type", None) != "mllama":
            return
        if os.environ.get("FASTJUDGE_GPU_KERNELS") == "0":
            return
        inner = getattr(self.model, "model", self.model)
        if getattr(inner, "_fastjudge_cross_attention", None) is None:
            from fastjudge.kernels.mllama_cross_attention import patch_mllama
            patch_mllama(self.model, masked_rows="hf")

    @property
    def refills(self) -> bool:
        """Whether generation can refill slots and stop early on the device vote (the shared Mllama decoder)."""
        return getattr(self.model.config, "model_type", None) == "mllama" and decoding.SHARED_MLLAMA

    def span_tables(self) -> SpanTables:
        """The answer-span tables of this tokenizer and model (`answer_spans`), built once."""
        if getattr(self, "_span_tables", None) is None:
            vocab = self.model.get_output_embeddings().out_features
            self._span_tables = SpanTables.build(self.token_pieces(), vocab, device=self.device)
        return self._span_tables

    def token_pieces(self) -> list[str]:
        """The text of each token id as it reads after another token."""
        raise NotImplementedError

    # ---- training

    def _training_inputs(self, images, prompts, targets) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Inputs with right padding, and labels (B, T): -100 except on the target and its end-of-turn."""
        features = self.image_features(images)
        rows, label_rows = [], []
        for prompt, target, feature in zip(prompts, targets, features):
            head, tail = self._prompt_ids(prompt, feature), self._target_ids(target)
            rows.append(head + tail)
            label_rows.append([-100] * len(head) + tail)
        return self._model_inputs(rows, features, left=False), _pad(label_rows, -100, left=False).to(self.device)

    def sft_loss(self, images: list[Image.Image], prompts: list[str], targets: list[str],
                 reduction: str = "mean") -> torch.Tensor:
        """Cross-entropy over target tokens (the assistant turn, its end-of-turn token included): their mean,
        or with reduction="sum" their sum."""
        return self._loss(*self._training_inputs(images, prompts, targets), reduction=reduction)

    def _loss(self, inputs: dict[str, torch.Tensor], labels: torch.Tensor, reduction: str) -> torch.Tensor:
        """Cross-entropy of the labelled tokens, each predicted from the position before it. The output layer
        runs on those positions only: (B, T, V) logits over a 128k-152k vocabulary would not fit."""
        hidden = self.model.model(**inputs).last_hidden_state  # (B, T, H)
        targets = labels[:, 1:]
        keep = targets != -100  # (B, T - 1)
        head = self.model.get_output_embeddings()
        # the fused loss: Triton on CUDA, the chunked torch reference on the CPU; rows are already kept ones
        return fused_linear_cross_entropy(hidden[:, :-1][keep], head.weight, targets[keep], bias=head.bias,
                                          reduction=reduction, drop_ignored=False)

    def sft_backward(self, images: list[Image.Image], prompts: list[str], targets: list[str],
                     micro_batches: int = 3) -> float:
        """Backward of the batch's mean target-token loss, run as `micro_batches` forward passes over
        examples sorted by length; returns the loss. Each pass pads only to its own longest example (in the
        toy mixture one batch holds 30- and 170-token examples: a single padded pass wastes most of its work).
        """
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]) + len(targets[i]))
        size = -(-len(order) // max(1, micro_batches))
        prepared = [self._training_inputs([images[i] for i in group], [prompts[i] for i in group],
                                          [targets[i] for i in group])
                    for group in (order[k:k + size] for k in range(0, len(order), size))]
        total_tokens = sum(int((labels[:, 1:] != -100).sum()) for _, labels in prepared)
        total = 0.0
        for inputs, labels in prepared:
            loss_sum = self._loss(inputs, labels, reduction="sum")
            (loss_sum / total_tokens).backward()
            total += loss_sum.item()
        return total / total_tokens

    def begin_training(self, train: str = "text", *, lora_rank: int = 16,
                       lora_alpha: float = 32.0) -> list[torch.nn.Parameter]:
        """Choose what fine-tuning updates and return those parameters: "text" freezes the vision tower (the
        default), "all" trains everything, "lora" adds LoRA adapters to the language model's projections
        (peft) and freezes the rest; `end_training` merges them back."""
        if train not in TRAIN_MODES:
            raise ValueError(f"train: expected one of {TRAIN_MODES}, got {train!r}")
        if self.device.type == "cuda":
            apply_liger_kernels(self.model)
            self.use_gpu_kernels()
        if train == "lora":
            try:
                from peft import LoraConfig, get_peft_model
            except ImportError:
                raise ValueError("train: 'lora' needs peft (pip install peft)") from None
            config = LoraConfig(r=lora_rank, lora_alpha=lora_alpha, lora_dropout=0.0, target_modules=LORA_TARGETS)
            # peft injects the adapters into self.model's own modules: self.model stays the model to call
            self._peft = get_peft_model(self.model, config)
            return [p for p in self.model.parameters() if p.requires_grad]
        params = []
        for name, p in self.model.named_parameters():
            frozen = train == "text" and self._is_vision(name)
            p.requires_grad_(not frozen)
            if not frozen:
                params.append(p)
        if train == "all":
            self._vision_fingerprint = None  # the vision weights will change
        return params

    def end_training(self) -> None:
        """Merge LoRA adapters into the weights (a plain checkpoint again); forget a stale vision fingerprint."""
        if self._peft is not None:
            self.model = self._peft.merge_and_unload()
            self._peft = None
        self._vision_fingerprint = None
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.model.eval()

    # ---- family hooks

    def _preprocessing(self) -> str:
        """What turns an image into pixels (part of the cache key)."""
        raise NotImplementedError

    def _encode_images(self, images: list[Image.Image]) -> list[ImageFeatures]:
        raise NotImplementedError

    def _prompt_ids(self, prompt: str, image: ImageFeatures) -> list[int]:
        raise NotImplementedError

    def _target_ids(self, target: str) -> list[int]:
        raise NotImplementedError

    def _model_inputs(self, rows: list[list[int]], features: list[ImageFeatures], left: bool) -> dict:
        raise NotImplementedError

    def decode(self, tokens: list[int]) -> str:
        raise NotImplementedError

    def decode_raw(self, tokens: list[int]) -> str:
        """The text of tokens, white space kept (stop strings may be white space)."""
        return self.decode(tokens)

    def save(self, path: Path) -> None:
        raise NotImplementedError


LIGER_PATCHES = {"mllama": "apply_liger_kernel_to_mllama", "qwen2_vl": "apply_liger_kernel_to_qwen2_vl",
                 "qwen2_5_vl": "apply_liger_kernel_to_qwen2_5_vl"}


def apply_liger_kernels(model) -> bool:
    """liger-kernel's RMSNorm, SwiGLU and RoPE on this model's text model, in place, once; its
    fused loss off (fastjudge's own is used, and Liger's breaks on `MllamaForConditionalGeneration` in
    transformers 5.x). Returns whether the model is patched; without liger-kernel installed, warns and leaves
    the model as it is. Liger also swaps the family's RMSNorm and MLP classes and its rotary function
    module-wide (later models of the family in this process get them too; on CUDA they serve inference as
    well)."""
    done = getattr(model, "_fastjudge_liger", None)
    if done is not None:
        return done
    model._fastjudge_liger = False  # tried: a failure warns once
    name = LIGER_PATCHES.get(getattr(model.config, "model_type", None))
    if name is None:
        return False
    try:
        import liger_kernel.transformers as liger
    except ImportError:
        import warnings
        warnings.warn("liger-kernel is not installed: training runs without its RMSNorm/SwiGLU/RoPE kernels")
        return False
    patch = getattr(liger, name)
    options = dict(rope=True, rms_norm=True, swiglu=True, fused_linear_cross_entropy=False, cross_entropy=False)
    if "layer_norm" in inspect.signature(patch).parameters:
        options["layer_norm"] = False  # the vision tower's LayerNorm: not asked for, and not tested here
    try:
        patch(model=model, **options)
    except ImportError as error:  # liger 0.8.5's Qwen2-VL patch imports a class transformers 5.x lacks
        import warnings
        warnings.warn(f"liger-kernel's {name} failed ({error}): training runs without its kernels")
        return False
    model._fastjudge_liger = True
    return True


def _token_budget(rows: list[list[int]], n: int, max_new_tokens: int, budget: int | None):
    """(first, last) spans of consecutive prompts whose decoding holds at most `budget` token positions:
    prompts x n x (longest prompt + max_new_tokens), at least one prompt per span."""
    if budget is None:
        yield 0, len(rows)
        return
    first, longest = 0, 0
    for i, row in enumerate(rows):
        longest_with = max(longest, len(row))
        if i > first and (i - first + 1) * n * (longest_with + max_new_tokens) > budget:
            yield first, i
            first, longest_with = i, len(row)
        longest = longest_with
    yield first, len(rows)


def _cut(text: str, stops: list[str]) -> str:
    """`text` up to the first occurrence of any stop string."""
    cut = min((text.find(s) for s in stops if s in text), default=len(text))
    return text[:cut]


def _pad(rows: list[list[int]], value: int, left: bool) -> torch.Tensor:
    """(B, T) int64: each row padded with `value` to the longest row, on the left or on the right."""
    length = max(map(len, rows))
    out = torch.full((len(rows), length), value, dtype=torch.long)
    for i, row in enumerate(rows):
        start = length - len(row) if left else 0
        out[i, start:start + len(row)] = torch.tensor(row, dtype=torch.long)
    return out


# -------------------------------------------------------------------------------------------------------
# Mllama (Llama-3.2-Vision and the toy)


class MllamaFamily(Adapter):
    """Mllama: the text attends to the image through cross-attention layers. A prompt holds one <|image|>
    token; tokens from it on see the image's valid tiles (as MllamaProcessor's cross-attention mask)."""

    vision_modules = ("vision_model", "multi_modal_projector")
    image_token_id: int

    def _pixel_inputs(self, images: list[Image.Image]) -> dict[str, torch.Tensor]:
        """pixel_values (N, 1, tiles, 3, S, S), aspect_ratio_ids (N, 1), aspect_ratio_mask (N, 1, tiles)."""
        raise NotImplementedError

    def _encode_images(self, images):
        pixels = self._pixel_inputs(images)
        inner = self.model.model
        states = inner.vision_model(
            pixel_values=pixels["pixel_values"].to(self.device, self.model.dtype),
            aspect_ratio_ids=pixels["aspect_ratio_ids"].to(self.device),
            aspect_ratio_mask=pixels["aspect_ratio_mask"].to(self.device)).last_hidden_state  # (N, 1, tiles, P, Dv)
        states = inner.multi_modal_projector(states)  # (N, 1, tiles, P, H)
        valid_tiles = pixels["aspect_ratio_mask"].sum(dim=(1, 2)).tolist()
        return [ImageFeatures(states[i].flatten(0, 2), (int(valid_tiles[i]),)) for i in range(len(images))]

    def _model_inputs(self, rows, features, left):
        ids = _pad(rows, self.pad_id, left)  # (B, T)
        mask = _pad([[1] * len(row) for row in rows], 0, left)
        tiles = features[0].features.shape[0] // self._patches_per_tile
        # (B, T, 1 image, tiles): 1 from the image token on, for the image's valid tiles
        after_image = (ids == self.image_token_id).long().cumsum(dim=1) > 0
        cross = torch.zeros(len(rows), ids.shape[1], 1, tiles, dtype=torch.long)
        for i, f in enumerate(features):
            cross[i, :, 0, :f.info[0]] = after_image[i, :, None]
        states = torch.stack([f.features for f in features])  # (B, tiles * P, H)
        return dict(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                    cross_attention_states=states.to(self.device, self.model.dtype),
                    cross_attention_mask=cross.to(self.device))

    @property
    def _patches_per_tile(self) -> int:
        return self.model.model.vision_model.num_patches


class ToyAdapter(MllamaFamily):
    """The toy Mllama: sequence = <|image|> <|user|> prompt <|assistant|> target <|eos|>, one 48x48 tile."""

    judge_style = "toy"

    def __init__(self, model, tokenizer):
        self.model = model
        self.tokenizer = tokenizer
        self.pad_id = tokenizer.pad_token_id
        self.eos_ids = {tokenizer.eos_token_id}
        ids = tokenizer.convert_tokens_to_ids
        self.image_token_id = ids(toy.IMAGE_TOKEN)
        self._head = [self.image_token_id, ids("<|user|>")]
        self._assistant = ids("<|assistant|>")
        self._image_size = model.config.vision_config.image_size

    @classmethod
    def load(cls, path: Path | str, dtype: torch.dtype = torch.float32, device: str = "cpu") -> "ToyAdapter":
        from transformers import MllamaForConditionalGeneration
        model = MllamaForConditionalGeneration.from_pretrained(path, dtype=dtype).to(device)
        return cls(model.requires_grad_(False), toy.build_tokenizer())  # `begin_training` chooses what trains

    def save(self, path: Path) -> None:
        path = Path(path)
        self.model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)
        # marks a toy checkpoint: `load_adapter` then drives it with the word-level tokenizer
        (path / TOY_MARKER).write_text('{"preset": "toy"}\n')

    def _words(self, text: str) -> list[int]:
        return self.tokenizer.convert_tokens_to_ids(toy.normalize_text(text).split())

    def encode_prompt(self, prompt: str) -> list[int]:
        return self._head + self._words(prompt) + [self._assistant]

    def _prompt_ids(self, prompt, image):
        return self.encode_prompt(prompt)

    def _target_ids(self, target):
        return self._words(target) + [self.tokenizer.eos_token_id]

    def decode(self, tokens: list[int]) -> str:
        return " ".join(self.tokenizer.convert_ids_to_tokens(tokens))

    def join_prefix(self, prefix: str, completion: str) -> str:
        return " ".join(part for part in (toy.normalize_text(prefix), completion) if part)

    def token_pieces(self) -> list[str]:
        return [" " + token for token in self.tokenizer.convert_ids_to_tokens(list(range(len(self.tokenizer))))]

    def _preprocessing(self):
        return f"toy image_tensor {self._image_size}"

    def _pixel_inputs(self, images):
        pixels = torch.stack([image_tensor(im, self._image_size) for im in images])  # (N, 3, S, S)
        n = len(images)
        return dict(pixel_values=pixels[:, None, None], aspect_ratio_ids=torch.ones(n, 1, dtype=torch.long),
                    aspect_ratio_mask=torch.ones(n, 1, 1, dtype=torch.long))


def image_tensor(image: Image.Image, size: int) -> torch.Tensor:
    """(3, size, size) float, scaled to about [-1, 1]."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    if image.size != (size, size):
        image = image.resize((size, size), Image.BILINEAR)
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1)


# -------------------------------------------------------------------------------------------------------
# Real checkpoints: tokenizer with a chat template, image processor


class ChatAdapter(Adapter):
    """A local checkpoint driven through its tokenizer's chat template and its image processor."""

    def __init__(self, model, tokenizer, image_processor, source: Path | None = None,
                 chat_template: str | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.source = source
        self.chat_template = chat_template or tokenizer.chat_template
        if self.chat_template is None:
            raise ValueError(f"model: the tokenizer of {source or 'the model'} has no chat template")
        # batches need a pad token; its value never reaches the loss (masked) or the output
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.end_of_turn = self._end_of_turn_id()
        eos = model.generation_config.eos_token_id
        eos = eos if isinstance(eos, list) else [eos] if eos is not None else []
        self.eos_ids = set(eos) | {self.end_of_turn}

    @classmethod
    def load(cls, path: Path | str, model_class: str, dtype: torch.dtype = torch.bfloat16,
             device: str = "cpu") -> "ChatAdapter":
        """Model (transformers class `model_class`), tokenizer and image processor from a local folder."""
        import transformers
        from transformers import AutoTokenizer
        path = Path(path)
        model = getattr(transformers, model_class).from_pretrained(path, dtype=dtype).to(device)
        model.requires_grad_(False)  # `begin_training` chooses what trains
        tokenizer = AutoTokenizer.from_pretrained(path)
        # older checkpoints keep the chat template beside the processor
        return cls(model, tokenizer, _load_image_processor(path), source=path,
                   chat_template=tokenizer.chat_template or _read_chat_template(path))

    def save(self, path: Path) -> None:
        path = Path(path)
        self.model.save_pretrained(path)
        if self.tokenizer.chat_template is None:  # the saved tokenizer carries the template we used
            self.tokenizer.chat_template = self.chat_template
        self.tokenizer.save_pretrained(path)
        self.image_processor.save_pretrained(path)
        # what else made the source a processor checkpoint (processor/video configs), so AutoProcessor loads it
        if self.source is not None:
            for name in ("processor_config.json", "video_preprocessor_config.json", "chat_template.json"):
                if (self.source / name).is_file() and not (path / name).exists():
                    shutil.copy(self.source / name, path / name)

    def _preprocessing(self):
        return self.image_processor.to_json_string()

    def _chat(self, prompt: str) -> str:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False,
                                                  chat_template=self.chat_template)

    def _end_of_turn_id(self) -> int:
        """The token the chat template closes an assistant turn with (Llama 3: <|eot_id|>, Qwen: <|im_end|>):
        the first special token after an assistant message; the tokenizer's EOS if there is none."""
        marker = "FASTJUDGE_END_PROBE"
        messages = [{"role": "user", "content": [{"type": "text", "text": "q"}]},
                    {"role": "assistant", "content": [{"type": "text", "text": marker}]}]
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, chat_template=self.chat_template)
        after = self.tokenizer.encode(text[text.rindex(marker) + len(marker):], add_special_tokens=False)
        special = set(self.tokenizer.all_special_ids) | set(self.tokenizer.added_tokens_decoder)
        return next((t for t in after if t in special), self.tokenizer.eos_token_id)

    def _target_ids(self, target):
        return self.tokenizer.encode(target, add_special_tokens=False) + [self.end_of_turn]

    def decode(self, tokens: list[int]) -> str:
        return self.decode_raw(tokens).strip()

    def decode_raw(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def token_pieces(self) -> list[str]:
        return self.tokenizer.batch_decode([[i] for i in range(len(self.tokenizer))], skip_special_tokens=True,
                                           clean_up_tokenization_spaces=False)


def _load_image_processor(path: Path):
    """AutoImageProcessor, or, where it needs torchvision and there is none (transformers 5.17), the family's
    PIL processor (`<image_processor_type>Pil`)."""
    import transformers
    try:
        return transformers.AutoImageProcessor.from_pretrained(path)
    except ImportError as exc:
        if (path / "preprocessor_config.json").is_file():
            config = json.loads((path / "preprocessor_config.json").read_text())
        else:  # saved by a processor: the image processor's settings sit inside processor_config.json
            config = json.loads((path / "processor_config.json").read_text()).get("image_processor", {})
        name = config.get("image_processor_type", "").removesuffix("Fast") + "Pil"
        if not hasattr(transformers, name):
            raise ValueError(f"model: {path}: its image processor needs torchvision ({exc}); install torchvision")
        kwargs = {k: v for k, v in config.items() if k not in ("image_processor_type", "processor_class")}
        return getattr(transformers, name)(**kwargs)


def _read_chat_template(path: Path) -> str | None:
    if (path / "chat_template.jinja").is_file():
        return (path / "chat_template.jinja").read_text()
    if (path / "chat_template.json").is_file():
        return json.loads((path / "chat_template.json").read_text()).get("chat_template")
    return None


class MllamaAdapter(ChatAdapter, MllamaFamily):
    """A local Llama-3.2-Vision checkpoint (MllamaForConditionalGeneration)."""

    def __init__(self, model, tokenizer, image_processor, source=None, chat_template=None):
        super().__init__(model, tokenizer, image_processor, source, chat_template)
        self.image_token_id = model.config.image_token_index

    def _pixel_inputs(self, images):
        batch = self.image_processor(images=[[im] for im in images], return_tensors="pt")
        return {k: batch[k] for k in ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask")}

    def _prompt_ids(self, prompt, image):
        # the template writes <|begin_of_text|> itself
        return self.tokenizer.encode(self._chat(prompt), add_special_tokens=False)


class QwenVLAdapter(ChatAdapter):
    """A local Qwen2-VL or Qwen2.5-VL checkpoint. The image's merged patch embeddings replace its
    <|image_pad|> tokens in the input embeddings; positions are multimodal RoPE (`mrope_positions`)."""

    image_placeholder = "<|image_pad|>"  # the chat template's image token, expanded to the image's tokens
    vision_modules = ("visual",)

    def __init__(self, model, tokenizer, image_processor, source=None, chat_template=None):
        super().__init__(model, tokenizer, image_processor, source, chat_template)
        self.image_token_id = model.config.image_token_id
        self.merge = model.config.vision_config.spatial_merge_size

    def _encode_images(self, images):
        batch = self.image_processor(images=images, return_tensors="pt")
        grids = batch["image_grid_thw"]  # (N, 3)
        out = self.model.model.get_image_features(batch["pixel_values"].to(self.device, self.model.dtype),
                                                  grids.to(self.device))
        # pooler_output: the merger's output, one (tokens, H) tensor per image (transformers 5.17 and 5.24)
        return [ImageFeatures(e, tuple(int(x) for x in g)) for e, g in zip(out.pooler_output, grids)]

    def _prompt_ids(self, prompt, image):
        t, h, w = image.info
        count = t * h * w // (self.merge ** 2)
        text = self._chat(prompt).replace(self.image_placeholder, self.image_placeholder * count, 1)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def _model_inputs(self, rows, features, left):
        ids = _pad(rows, self.pad_id, left).to(self.device)  # (B, T)
        mask = _pad([[1] * len(row) for row in rows], 0, left).to(self.device)
        embeds = self.model.get_input_embeddings()(ids)  # (B, T, H)
        image_embeds = torch.cat([f.features for f in features]).to(self.device, embeds.dtype)  # (sum tokens, H)
        image_mask = (ids == self.image_token_id)[..., None].expand_as(embeds)
        embeds = embeds.masked_scatter(image_mask, image_embeds)
        positions = mrope_positions(ids, mask, [f.info for f in features], self.image_token_id, self.merge)
        return dict(inputs_embeds=embeds, attention_mask=mask, position_ids=positions)


def mrope_positions(ids: torch.Tensor, mask: torch.Tensor, grids: list[tuple[int, int, int]], image_token_id: int,
                    merge: int) -> torch.Tensor:
    """Qwen2-VL's multimodal RoPE positions (3, B, T) for rows holding one image each.

    Text tokens count up by one in all three components. The image's tokens (a run of image_token_id) get
    (start + t, start + row, start + column) on the merged (t, h / merge, w / merge) grid, and the text after
    it resumes at start + max(t, h / merge, w / merge). Padding gets 1 (it is masked).
    """
    batch, length = ids.shape
    positions = torch.ones(3, batch, length, dtype=torch.long, device=ids.device)
    for b in range(batch):
        real = mask[b].bool()
        tokens = ids[b][real]
        is_image = tokens == image_token_id
        where = torch.nonzero(is_image).flatten()
        t, h, w = grids[b]
        h, w = h // merge, w // merge
        if len(where) != t * h * w:
            raise ValueError(f"row {b}: {len(where)} image tokens for an image of {t * h * w} merged patches")
        row = torch.zeros(3, len(tokens), dtype=torch.long, device=ids.device)
        start = int(where[0]) if len(where) else len(tokens)
        row[:, :start] = torch.arange(start, device=ids.device)
        if len(where):
            grid = torch.stack(torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij"))
            row[:, start:start + len(where)] = grid.reshape(3, -1).to(ids.device) + start
            resume = start + max(t, h, w)
            rest = len(tokens) - start - len(where)
            row[:, start + len(where):] = torch.arange(rest, device=ids.device) + resume
        positions[:, b, real] = row
    return positions


# -------------------------------------------------------------------------------------------------------


# config.json model_type -> (adapter, transformers model class)
FAMILIES = {
    "mllama": (MllamaAdapter, "MllamaForConditionalGeneration"),
    "qwen2_vl": (QwenVLAdapter, "Qwen2VLForConditionalGeneration"),
    "qwen2_5_vl": (QwenVLAdapter, "Qwen2_5_VLForConditionalGeneration"),
}


def default_dtype(device: str, toy_model: bool) -> torch.dtype:
    """float32 for the toy and on the CPU; bfloat16 for a real model on a GPU."""
    return torch.float32 if toy_model or not str(device).startswith("cuda") else torch.bfloat16


def load_adapter(model_path: str | None, *, device: str = "cpu", dtype: torch.dtype | str | None = None) -> Adapter:
    """The toy base model when `model_path` is None, else a local checkpoint: a toy one (marked by
    fastjudge_toy.json), Llama-3.2-Vision (model_type "mllama"), Qwen2-VL or Qwen2.5-VL."""
    from fastjudge import assets
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    if model_path is None:
        return ToyAdapter.load(assets.base_model_dir(), dtype=dtype or torch.float32, device=device)
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
