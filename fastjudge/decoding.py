"""The decoding engine over a Hugging Face model's KV cache (shared prefill, rows leaving when done).

Used by the adapters instead of `generate()`: on the toy model `generate()` spends most of each decoding step
in its own bookkeeping (measured: ~0.7 s against ~0.1 s for the model's forward at 128 rows on 2 cores).
"""

from __future__ import annotations

import inspect
from typing import Callable

import torch

from fastjudge.sampling import sample_logits

# Mllama decodes with its prompt's cache shared by the n samples (fastjudge.mllama_decoding); False: the
# generic path below (the cache repeated per sample), kept as the reference and for the other families
SHARED_MLLAMA = True


def _cache_of(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def _cache_argument(model) -> str:
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
    return out, _cache_of(out), position_ids


def _sampler(temperature: float, top_k: int, top_p: float, min_p: float, check: bool = True) -> Callable:
    """`sample_logits` with these filters, as a sampler(logits, generator); check=False: on a GPU, bad rows are
    not checked at each call (the caller checks them, as the shared Mllama decoder does at its looks)."""
    def sampler(logits, generator):
        return sample_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                             generator=generator, check=check)
    return sampler


def default_sync_every(device: torch.device) -> int:
    """Decoding steps between two looks from the host: every step on the CPU (nothing to overlap; finished
    rows leave at once), every 8 on a GPU (the host queues steps ahead instead of waiting on each)."""
    return 8 if device.type == "cuda" else 1


@torch.no_grad()
def decode_groups(model, inputs: dict[str, torch.Tensor], *, n: int, max_new_tokens: int, eos_ids: set[int],
                  temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0,
                  generator: torch.Generator | None = None, sampler: Callable | None = None,
                  stop: Callable[[list[int]], bool] | None = None, slots: int | None = None,
                  early_stop=None, sync_every: int | None = None) -> list[list[list[int]]]:
    """Per prompt, its samples' token lists: `decode` with the shared Mllama decoder's options (slots that
    start the next sample when one ends; early stop on the device vote, `answer_spans.EarlyStop`; host looks
    every `sync_every` steps). Other families take only slots=None and early_stop=None (then n samples each)."""
    if sync_every is None:
        sync_every = default_sync_every(inputs["attention_mask"].device)
    if getattr(model.config, "model_type", None) == "mllama" and SHARED_MLLAMA:
        from fastjudge.mllama_decoding import decode_mllama_shared
        # on a GPU our sampler's check of bad logits rows waits for the GPU: the decoder checks them at its looks
        # instead (on the CPU the C++ sampler checks every call at no such cost)
        check_logits = sampler is None and temperature > 0 and inputs["attention_mask"].is_cuda
        if sampler is None:
            sampler = _sampler(temperature, top_k, top_p, min_p, check=not check_logits)
        return decode_mllama_shared(model, inputs, n=n, max_new_tokens=max_new_tokens, eos_ids=eos_ids,
                                    sampler=sampler, generator=generator, stop=stop, slots=slots,
                                    early_stop=early_stop, sync_every=sync_every, check_logits=check_logits)
    if sampler is None:
        sampler = _sampler(temperature, top_k, top_p, min_p)
    if slots is not None or early_stop is not None:
        raise ValueError("slots, early_stop: only the shared Mllama decoder refills slots and votes on the device")
    flat = decode(model, inputs, n=n, max_new_tokens=max_new_tokens, eos_ids=eos_ids, generator=generator,
                  sampler=sampler, stop=stop)
    return [flat[i:i + n] for i in range(0, len(flat), n)]


@torch.no_grad()
def decode(model, inputs: dict[str, torch.Tensor], *, max_new_tokens: int, eos_ids: set[int], n: int = 1,
           temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0,
           generator: torch.Generator | None = None, sampler: Callable | None = None,
           stop: Callable[[list[int]], bool] | None = None) -> list[list[int]]:
    """Generate up to max_new_tokens after each of B left-padded prompts, n samples each; returns B * n token
    lists (prompt-major: the n samples of prompt 0 first), EOS excluded.

    inputs: the model's prefill inputs: attention_mask (B, T) left-padded, input_ids (B, T) or inputs_embeds
    (B, T, H), any image inputs, and optionally position_ids ((B, T), or Qwen's (3, B, T)); without them
    positions count real tokens. Each new token takes the last position + 1. A (B, T, ...)
    `cross_attention_mask` (Mllama) is continued with its last position.

    The shared-prefix engine: each prompt is prefilled once (B rows, images included); its cache (the prompt's
    self-attention keys and values, and Mllama's cross-attention keys and values of the image) is then repeated
    for its n samples, and decoding runs on B * n rows. A row leaves the batch when it emits an EOS token or
    `stop(row_tokens)` says a stop string was reached, so later steps run on the rows still going.
    `sampler(logits, generator)` draws one token per row (default: `fastjudge.sampling.sample_logits` with the
    given temperature, top_k, top_p, min_p: C++ on the CPU, Triton on a GPU).
    """
    if sampler is None:
        sampler = _sampler(temperature, top_k, top_p, min_p)
    if getattr(model.config, "model_type", None) == "mllama" and SHARED_MLLAMA:
        groups = decode_groups(model, inputs, n=n, max_new_tokens=max_new_tokens, eos_ids=eos_ids,
                               sampler=sampler, generator=generator, stop=stop, sync_every=1)
        return [tokens for group in groups for tokens in group]
    cache_arg = _cache_argument(model)
    attention_mask = inputs["attention_mask"]
    out, cache, position_ids = prefill(model, inputs)
    logits = out.logits[:, -1]  # (B, V)
    next_position = position_ids[..., -1:] + 1  # (B, 1) or (3, B, 1)
    # Mllama: each new token sees the images its last prompt token saw. The mask is passed whole (B, T, ...):
    # transformers 5.17 indexes it by absolute position, 5.24 slices it itself.
    cross_mask = inputs.get("cross_attention_mask")
    if n > 1:  # the prompt's work is done once; its n samples share it from here on
        cache.batch_repeat_interleave(n)
        logits = logits.repeat_interleave(n, dim=0)
        attention_mask = attention_mask.repeat_interleave(n, dim=0)
        next_position = next_position.repeat_interleave(n, dim=next_position.dim() - 2)
        if cross_mask is not None:
            cross_mask = cross_mask.repeat_interleave(n, dim=0)
    rows = attention_mask.shape[0]
    device = attention_mask.device
    tokens: list[list[int]] = [[] for _ in range(rows)]
    active = torch.arange(rows, device=device)  # original row of each batch row
    eos = torch.tensor(sorted(eos_ids), device=device)
    for step in range(max_new_tokens):
        token = sampler(logits, generator)  # (rows still going,)
        finished = torch.isin(token, eos)
        for batch_row, (row, t, end) in enumerate(zip(active.tolist(), token.tolist(), finished.tolist())):
            if not end:
                tokens[row].append(t)
                if stop is not None and stop(tokens[row]):
                    finished[batch_row] = True
        if bool(finished.all()) or step == max_new_tokens - 1:
            break
        if bool(finished.any()):  # finished rows leave the batch (and the cache)
            keep = torch.nonzero(~finished).flatten()
            cache.batch_select_indices(keep)
            active, token = active[keep], token[keep]
            attention_mask = attention_mask[keep]
            next_position = next_position[:, keep] if next_position.dim() == 3 else next_position[keep]
            if cross_mask is not None:
                cross_mask = cross_mask[keep]
        attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], dim=1)
        step_extra = {}
        if cross_mask is not None:
            cross_mask = torch.cat([cross_mask, cross_mask[:, -1:]], dim=1)
            step_extra["cross_attention_mask"] = cross_mask
        out = model(input_ids=token[:, None], attention_mask=attention_mask, position_ids=next_position,
                    use_cache=True, **{cache_arg: cache}, **step_extra)
        cache = _cache_of(out)
        next_position = next_position + 1
        logits = out.logits[:, -1]
    return tokens
