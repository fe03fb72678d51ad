"""Mllama decoding whose n samples share their prompt's cache (Llama-3.2-Vision, the toy).

After transformers' prefill of the B prompts, the decoding steps run here, on the model's own modules:
- each self-attention layer keeps one key buffer per prompt, (B, kv heads, T + max_new_tokens * n, d): the
  prompt's keys once (copied from the prefill once, not per sample), then the samples' own keys step-major
  (a static cache, preallocated). The n samples of a prompt are n queries of one row of
  F.scaled_dot_product_attention over the buffer's columns written so far, each masked to the prompt and
  its own keys;
- the image's cross-attention keys and values, (B, kv heads, tiles * patches, d), are shared the same way
  (for the 11B model about 210 MB per prompt that `generate(num_return_sequences=n)` stores n times); on a
  GPU the cross layers run fastjudge.kernels.cross_attention_decode over each prompt's key range;
- with fewer slots than samples, a slot whose sample ends starts the prompt's next sample (its own run from
  index 0); with early stop the prompt stops once its device vote is settled (`engine.vote`);
- a prompt leaves the batch once all its samples have ended (a slot whose sample ended decodes on, its tokens
  ignored), at the next look from the host (every `sync_every` steps).
One step is a fixed set of operators whatever the step (`bench/decode_ops.py` counts them; only the width
read grows): a step of a small batch on a GPU is bound by their launches. On a GPU the step is therefore
captured as a CUDA graph (one per bucket of widths read, `DecodeOptions.graph_first_span`) and replayed: one
launch instead of ~1,600. With graphs, the batch shrinks only when at most half of its prompts are still going
(each shrink means new captures).

Shapes: B prompts, n samples (slots), Hq query heads in Hkv groups of g, d head size, T prompt length, S image
keys.
"""

from __future__ import annotations

from typing import Callable

import torch

from fastjudge.core.sampling import bad_rows
from fastjudge.engine.options import DecodeOptions
from fastjudge.engine.host import stop_requests
from fastjudge.engine.prefill import prefill
from fastjudge.engine.vote import DeviceVote, EarlyStop, SpanTracker
from fastjudge.engine.shared_cache import SharedMllamaDecoder


@torch.no_grad()
def decode_mllama_shared(model, inputs: dict[str, torch.Tensor], *, n: int, max_new_tokens: int,
                         eos_ids: set[int], sampler: Callable, generator,
                         stop: Callable[[list[int]], bool] | None = None, slots: int | None = None,
                         early_stop: EarlyStop | None = None, sync_every: int = 1, check_logits: bool = False,
                         options: DecodeOptions = DecodeOptions(), capture=None) -> list[list[list[int]]]:
    """`engine.decoding.decode_groups` for Mllama with the shared cache (module docstring): for each of the B prompts,
    its finished samples' tokens (EOS excluded), in the order they were started.

    slots: samples decoded at once per prompt (default n). With fewer slots than n, a slot whose sample ends
    starts the prompt's next sample at once, from the prompt's prefill (no second prefill, no waiting for the
    prompt's other slots). early_stop: stop a prompt's sampling once its device vote is settled
    (`engine.vote.DeviceVote`, over the first samples started that have all ended); samples still running
    then are dropped, and so are ended samples after the first one still running (they ended early because
    they are short: keeping them would favour short answers). A prompt returns between 1 and n samples when
    min_votes <= n. sync_every: the decoding steps between two looks from the host (prompts that are done leave the
    batch, stop strings are checked); in between, the loop keeps no device value on the host. check_logits:
    ValueError at the next look if a row of logits had NaN or +inf, or only -inf (`core.sampling.bad_rows`;
    for a sampler that does not check them itself). options: kernels, CUDA graphs (`cuda_graphs`: None = on a
    GPU), SDPA backends (`DecodeOptions`). capture (`engine.decoding.ChoiceCapture`): the logits of its C token
    ids at each sample's every step are kept, and set as its `values`, aligned with the samples returned.
    """
    slots = n if slots is None else slots
    if not 1 <= slots <= n:
        raise ValueError(f"slots: expected in [1, n={n}], got {slots}")
    if sync_every < 1:
        raise ValueError(f"sync_every: expected >= 1, got {sync_every}")
    attention_mask = inputs["attention_mask"]
    device = attention_mask.device
    out, cache, position_ids = prefill(model, inputs)
    cross = inputs.get("cross_attention_mask")  # (B, T, 1 image, tiles): new tokens see what the last one saw
    image_keys_mask = None
    if cross is not None:  # (B, images, tiles) -> (B, images * tiles * patches), transformers' key order
        patches = model.model.vision_model.num_patches
        image_keys_mask = cross[:, -1].bool().repeat_interleave(patches, dim=-1).flatten(1)
    graphs = device.type == "cuda" if options.cuda_graphs is None else options.cuda_graphs
    if graphs and device.type != "cuda":
        raise ValueError(f"graphs: CUDA graphs need a CUDA device, got {device}")
    decoder = SharedMllamaDecoder(model, cache, attention_mask, image_keys_mask, slots, max_new_tokens, graphs,
                                  options=options)
    first_logits = out.logits[:, -1]  # (B', V): every sample's first token is drawn from these
    del out, cache  # the prompt's keys now live in the decoder's buffers: free transformers' copy
    batch = attention_mask.shape[0]
    eos = torch.tensor(sorted(eos_ids), device=device)
    # everything per prompt or per (prompt, slot) lives on the device; B' prompts still going, S slots
    groups = torch.arange(batch, device=device)  # (B',) the original prompt of each batch prompt
    base = position_ids[:, -1] + 1  # (B',) the position of each sample's first token
    sample = torch.arange(slots, device=device).repeat(batch, 1)  # (B', S) the sample in each slot
    length = torch.zeros(batch, slots, dtype=torch.long, device=device)  # (B', S) tokens the sample has
    alive = torch.ones(batch, slots, dtype=torch.bool, device=device)  # (B', S) the slot's sample is going
    fresh = torch.ones(batch, slots, dtype=torch.bool, device=device)  # (B', S) its next token is its first
    started = torch.full((batch,), slots, dtype=torch.long, device=device)  # (B',) samples started
    end_request = torch.zeros(batch, slots, dtype=torch.bool, device=device)  # stop strings, set by the host
    # the samples' tokens; sample column n and the last token column take the writes that are no-ops
    written = torch.zeros(batch, n + 1, max_new_tokens, dtype=torch.long, device=device)
    lengths = torch.zeros(batch, n + 1, dtype=torch.long, device=device)
    finished = torch.zeros(batch, n + 1, dtype=torch.bool, device=device)
    captured = None  # (B, n + 1, max_new_tokens, C): the captured ids' logits, written where the tokens are
    if capture is not None:
        captured = torch.zeros(batch, n + 1, max_new_tokens, len(capture.ids), device=device)
    tracker = vote = None
    if early_stop is not None:
        tracker = SpanTracker(early_stop.tables, batch * slots)
        vote = DeviceVote(batch, n, early_stop.min_votes, early_stop.confidence, device)
    host_tokens: dict[tuple[int, int], list[int]] = {}  # (prompt, sample) -> tokens, for stop strings
    pending: list[tuple[torch.Tensor, ...]] = []  # (prompt, sample, token, write) of steps the host has not seen
    bad_logits = torch.zeros((), dtype=torch.bool, device=device)  # a row of logits was bad (check_logits)
    step_logits = None
    step = 0
    while True:
        if step_logits is None:
            logits = first_logits[:, None].expand(-1, slots, -1)
        elif slots < n:  # slots that start a sample draw from the prompt's own logits
            logits = torch.where(fresh[..., None], first_logits[:, None], step_logits)
        else:
            logits = step_logits
        flat_logits = logits.reshape(-1, logits.shape[-1])  # (B' * S, V)
        if check_logits:
            bad_logits = bad_logits | bad_rows(flat_logits).any()
        token = sampler(flat_logits, generator).view(-1, slots)  # (B', S)
        ends_here = alive & (torch.isin(token, eos) | end_request)
        write = alive & ~ends_here
        index = length.clamp(max=max_new_tokens - 1)  # where this token goes (in the output and own cache)
        rows = groups[:, None].expand_as(sample)
        written[rows, torch.where(write, sample, n), index] = token
        if captured is not None:  # (B' * S, C) -> (B', S, C), beside the token drawn from them
            picked = flat_logits[:, capture.ids].float().view(-1, slots, len(capture.ids))
            captured[rows, torch.where(write, sample, n), index] = picked
        if tracker is not None:
            tracker.update(token.flatten(), write.flatten())
        length = length + write.long()
        ended = ends_here | (write & (length >= max_new_tokens))  # (B', S) samples that end with this step
        done_sample = torch.where(ended, sample, n)
        lengths[rows, done_sample] = length
        # a device tensor, not the Python True: that would be copied from the host and wait for the GPU
        finished[rows, done_sample] = torch.ones_like(ended)
        alive = alive & ~ended
        stopped = torch.zeros_like(groups, dtype=torch.bool)  # (B',) prompts that stop sampling
        if vote is not None:
            found, hash_ = tracker.answer()
            vote.record(rows.flatten(), sample.flatten(), ended.flatten(), found, hash_)
            stopped = vote.settled(groups)
            alive = alive & ~stopped[:, None]  # samples still running are dropped
        token_sample = sample  # (B', S) the sample each token belongs to
        # free slots start the prompt's next samples, in slot order
        free = ~alive & ~stopped[:, None]
        number = started[:, None] + free.long().cumsum(dim=1) - 1
        starts = free & (number < n)
        sample = torch.where(starts, number, torch.where(alive, sample, torch.full_like(sample, n)))
        started = torch.minimum(started + free.long().sum(dim=1), torch.full_like(started, n))
        if tracker is not None:
            tracker.reset(starts.flatten())
        fresh = starts
        length = torch.where(starts, torch.zeros_like(length), length)
        alive = alive | starts
        if stop is not None:  # requests are for one step; the host sets them at its looks
            end_request = torch.zeros_like(end_request)
            pending.append((rows, token_sample, token, write))
        step += 1
        if step % sync_every == 0:
            going = alive.any(dim=1)  # (B',) prompts with a sample still to decode
            if check_logits and bool(bad_logits):
                raise ValueError("logits: a row had NaN or +inf, or only -inf, in the last "
                                 f"{sync_every} decoding steps (before step {step})")
            if stop is not None:
                end_request = stop_requests(stop, host_tokens, pending, groups, alive, sample)
                pending = []
            going_count = int(going.sum())
            if going_count == 0:
                break
            if going_count < len(groups) and decoder.worth_shrinking(going_count, len(groups)):
                keep = torch.nonzero(going).flatten()
                decoder.keep(keep)
                groups, first_logits, base = groups[keep], first_logits[keep], base[keep]
                sample, length, alive, fresh = sample[keep], length[keep], alive[keep], fresh[keep]
                started, end_request, index, token = started[keep], end_request[keep], index[keep], token[keep]
                if tracker is not None:
                    tracker.select((keep[:, None] * slots + torch.arange(slots, device=device)).flatten())
        # the sampled tokens go in (a slot that ended or starts over feeds a token nobody reads)
        step_logits = decoder.step(token, base[:, None] + index, index, min(step, max_new_tokens))
    if vote is not None:  # a stopped prompt keeps the samples its vote counted (the first ones started)
        early_stop.last_vote = vote
        counted = torch.arange(n, device=device) < vote.drawn(torch.arange(batch, device=device))[:, None]
        finished[:, :n] &= counted
    written, lengths, finished = written.cpu(), lengths.cpu(), finished.cpu()
    if captured is not None:
        captured = captured.cpu()
        capture.values = [[captured[b, s, :lengths[b, s]] for s in range(n) if finished[b, s]]
                          for b in range(batch)]
    return [[written[b, s, :lengths[b, s]].tolist() for s in range(n) if finished[b, s]] for b in range(batch)]
