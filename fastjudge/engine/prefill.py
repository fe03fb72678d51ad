"""Prefill: the prompts run once through the model, their cache kept for decoding."""

from __future__ import annotations

import inspect

import torch


def cache_of(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def cache_argument(model) -> str:
    """transformers 5.x renamed `past_key_values` to `cache`; accept both."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def prefill(model, inputs: dict[str, torch.Tensor]):
    """Run the prompts once: (model output, its cache, position_ids (B, T) or (3, B, T)); positions count
    real tokens when `inputs` has none. Only the last position's logits are computed: (B, T, V) of a 128k
    vocabulary would not fit."""
    inputs = dict(inputs)
    position_ids = inputs.pop("position_ids", None)
    if position_ids is None:
        position_ids = (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    out = model(**inputs, position_ids=position_ids, use_cache=True, logits_to_keep=1)
    return out, cache_of(out), position_ids
