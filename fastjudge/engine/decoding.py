"""The decoding entry point: `decode_groups` sends Mllama to the shared-prefix decoder (`engine.mllama`) and
every other model to the generic decoder over its Hugging Face KV cache (shared prefill, rows leaving when done).

Used by the adapters instead of `generate()`: on the toy model `generate()` spends most of each decoding step
in its own bookkeeping (measured: ~0.7 s against ~0.1 s for the model's forward at 128 rows on 2 cores).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from fastjudge.core.sampling import sample_logits
from fastjudge.engine.mllama import decode_mllama_shared
from fastjudge.engine.options import DecodeOptions
from fastjudge.engine.prefill import cache_argument, cache_of, prefill


@dataclass
class ChoiceCapture:
    """The logits of a few tokens (`ids`, (C,) on the model's device) at every decoding step of every sample:
    what a judgment's verdict probabilities are read from without a second forward pass over its prompt and
    reasoning (`models.generation.VerdictReader`). The shared Mllama decoder fills `values`: per prompt, per
    sample returned, a (tokens, C) float32 CPU tensor whose row j holds the logits the sample's token j was
    drawn from. Left None by the generic decoder (the caller then reads the probabilities another way)."""
    ids: torch.Tensor
    values: list[list[torch.Tensor]] | None = None


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
                  early_stop=None, options: DecodeOptions = DecodeOptions(),
                  shared: bool | None = None, capture: ChoiceCapture | None = None) -> list[list[list[int]]]:
    """Generate up to max_new_tokens after each of B left-padded prompts, n samples each; returns, per prompt,
    its samples' token lists (EOS excluded).

    inputs: the model's prefill inputs: attention_mask (B, T) left-padded, input_ids (B, T) or inputs_embeds
    (B, T, H), any image inputs, and optionally position_ids ((B, T), or Qwen's (3, B, T)); without them
    positions count real tokens. `sampler(logits, generator)` draws one token per row (default:
    `core.sampling.sample_logits` with the given temperature, top_k, top_p, min_p: C++ on the CPU, Triton on a
    GPU). A sample ends at an EOS token or where `stop(sample_tokens)` says a stop string was reached.

    `shared` (the adapter's `refills_with(options)`: its family's `shared_decoder` and `options.shared_mllama`;
    None: an Mllama model with `options.shared_mllama`, the default) decodes in `engine.mllama` (the prompt's cache shared by
    its samples; slots that start the next sample when one ends; early stop on the device vote,
    `engine.vote.EarlyStop`; host looks every `options.sync_every` steps). Other families, and Mllama with
    shared_mllama off, take the generic decoder (`_decode_generic`) with slots=None and early_stop=None.
    `capture`: the shared decoder keeps the logits of `capture.ids` at every step (`ChoiceCapture`)."""
    sync_every = options.sync_every or default_sync_every(inputs["attention_mask"].device)
    if shared is None:
        from transformers import MllamaForConditionalGeneration
        shared = isinstance(model, MllamaForConditionalGeneration) and options.shared_mllama
    if shared:
        # on a GPU our sampler's check of bad logits rows waits for the GPU: the decoder checks them at its looks
        # instead (on the CPU the C++ sampler checks every call at no such cost)
        check_logits = sampler is None and temperature > 0 and inputs["attention_mask"].is_cuda
        if sampler is None:
            sampler = _sampler(temperature, top_k, top_p, min_p, check=not check_logits)
        return decode_mllama_shared(model, inputs, n=n, max_new_tokens=max_new_tokens, eos_ids=eos_ids,
                                    sampler=sampler, generator=generator, stop=stop, slots=slots,
                                    early_stop=early_stop, sync_every=sync_every, check_logits=check_logits,
                                    options=options, capture=capture)
    if sampler is None:
        sampler = _sampler(temperature, top_k, top_p, min_p)
    if slots is not None or early_stop is not None:
        raise ValueError("slots, early_stop: only the shared Mllama decoder refills slots and votes on the device")
    flat = _decode_generic(model, inputs, n=n, max_new_tokens=max_new_tokens, eos_ids=eos_ids,
                           generator=generator, sampler=sampler, stop=stop)
    return [flat[i:i + n] for i in range(0, len(flat), n)]


def _decode_generic(model, inputs: dict[str, torch.Tensor], *, max_new_tokens: int, eos_ids: set[int], n: int,
                    generator: torch.Generator | None, sampler: Callable,
                    stop: Callable[[list[int]], bool] | None) -> list[list[int]]:
    """The generic decoder over a Hugging Face model's KV cache: B * n token lists (prompt-major: the n samples
    of prompt 0 first), EOS excluded.

    Each prompt is prefilled once (B rows, images included); its cache (the prompt's self-attention keys and
    values, and Mllama's cross-attention keys and values of the image) is then repeated for its n samples, and
    decoding runs on B * n rows. A row leaves the batch when it emits an EOS token or `stop(row_tokens)` says a
    stop string was reached, so later steps run on the rows still going. Each new token takes the last position
    + 1; a (B, T, ...) `cross_attention_mask` (Mllama) is continued with its last position.
    """
    cache_arg = cache_argument(model)
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
        cache = cache_of(out)
        next_position = next_position + 1
        logits = out.logits[:, -1]
    return tokens
