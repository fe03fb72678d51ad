"""Token sampling from logits in Triton, without sorting the vocabulary (the GPU side of
`fastjudge.core.sampling.sample_logits`).

One program per row. The filters are those of the plain-PyTorch reference (`sample_logits_reference`), in its
order: temperature; top-k (keep every token whose scaled logit is at least the k-th largest); top-p over the
top-k tokens (keep a token when the probability of the tokens more likely than it, renormalized over the
top-k set, is below top_p); min-p (keep a token whose probability is at least min_p times the largest).

- top-k: the k-th largest scaled logit, from torch.topk for k <= 1024 (one pass), else by bisection on its value
  in the kernel: each step counts the tokens at or above the midpoint in one pass; the interval shrinks to two
  adjacent floats, so the threshold is the k-th value itself.
- top-p by rejection, as FlashInfer does: draw a token from the candidates (top-k, min-p, and more likely than
  the pivot) by inverse CDF in one blocked scan; accept it when the top-k mass strictly above its probability
  is below top_p of the top-k mass (it is then in the nucleus); otherwise every candidate at most as likely is
  outside the nucleus too, so the pivot rises to its probability and we draw again. An accepted draw is
  distributed as the nucleus renormalized; each rejection removes at least the drawn token.

Probabilities are kept unnormalized as exp(x - max) (the largest is 1). Uniforms come from Philox
(`tl.rand(seed, row * MAX_ROUNDS + round)`); the seed is drawn from the caller's torch generator.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_ROUNDS = 64  # rejection rounds; each removes at least one token (at 64 the last draw is kept)
# after 64 halvings the interval is 2^-64 of the row's finite logit range: a token would have to lie inside it,
# just below the k-th value, to be kept wrongly
BISECTION_STEPS = 64


@triton.jit
def _scaled_block(base, offs, live, V, inv_temperature):
    """(ROWS, BLOCK) logits / temperature of one block, -inf past the row's end and for rows past B."""
    x = tl.load(base + offs, mask=live[:, None] & (offs < V), other=-float("inf")).to(tl.float32)
    return x * inv_temperature


@triton.jit
def _sample_rows_kernel(logits_ptr, out_ptr, kth_ptr, B, V, stride, inv_temperature, top_k, top_p, min_p, seed,
                        SEED_IN_MEMORY: tl.constexpr, USE_TOP_K: tl.constexpr, KTH_GIVEN: tl.constexpr,
                        ROWS: tl.constexpr, BLOCK: tl.constexpr, MAX_ROUNDS: tl.constexpr,
                        BISECTION_STEPS: tl.constexpr):
    if SEED_IN_MEMORY:  # a (1,) int64 tensor on the GPU: the host never reads it (no synchronization)
        seed = tl.load(seed)
    # ROWS rows per program (1 on a GPU; many under the interpreter, where numpy then does the rows at once)
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)  # (ROWS,)
    live = rows < B
    base = logits_ptr + rows.to(tl.int64)[:, None] * stride  # (ROWS, 1)

    # pass 1: the largest and smallest scaled logit of each row
    top = tl.full((ROWS,), -float("inf"), tl.float32)
    bottom = tl.full((ROWS,), float("inf"), tl.float32)
    for start in range(0, V, BLOCK):
        offs = start + tl.arange(0, BLOCK)[None, :]  # (1, BLOCK)
        inside = live[:, None] & (offs < V)
        x = tl.load(base + offs, mask=inside, other=0.0).to(tl.float32) * inv_temperature  # (ROWS, BLOCK)
        top = tl.maximum(top, tl.max(tl.where(inside, x, -float("inf")), axis=1))
        # the smallest finite value: a -inf would turn the bisection's midpoints into NaN
        bottom = tl.minimum(bottom, tl.min(tl.where(inside & (x > -float("inf")), x, float("inf")), axis=1))

    top = tl.where(live, top, 0.0)  # rows past the end: finite values, nothing stored
    bottom = tl.where(live, bottom, 0.0)
    # top-k threshold: the largest t with count(x >= t) >= k, i.e. the k-th largest value
    threshold = bottom
    if KTH_GIVEN:  # the k-th largest scaled logit of each row, found by the caller (torch.topk)
        threshold = tl.load(kth_ptr + rows, mask=live, other=0.0)
    elif USE_TOP_K:
        low = bottom
        high = top + 1.0  # count(x >= high) = 0 < k
        for _ in range(BISECTION_STEPS):
            middle = low + (high - low) * 0.5
            count = tl.zeros((ROWS,), tl.int32)
            for start in range(0, V, BLOCK):
                offs = start + tl.arange(0, BLOCK)[None, :]
                x = _scaled_block(base, offs, live, V, inv_temperature)
                count += tl.sum((x >= middle[:, None]).to(tl.int32), axis=1)
            enough = count >= top_k
            low = tl.where(enough, middle, low)
            high = tl.where(enough, high, middle)
        threshold = low

    # the top-k mass (unnormalized: the most likely token weighs 1)
    kept_mass = tl.zeros((ROWS,), tl.float32)
    for start in range(0, V, BLOCK):
        offs = start + tl.arange(0, BLOCK)[None, :]
        x = _scaled_block(base, offs, live, V, inv_temperature)
        kept_mass += tl.sum(tl.where(x >= threshold[:, None], tl.exp(x - top[:, None]), 0.0), axis=1)

    pivot = tl.full((ROWS,), -1.0, tl.float32)  # candidates weigh more than this
    token = tl.where(live, -1, 0).to(tl.int64)
    rounds = 0
    while (tl.min(token, axis=0) < 0) & (rounds < MAX_ROUNDS):
        pending = token < 0
        # candidate mass, then the inverse-CDF position of one uniform per row in a blocked scan
        mass = tl.zeros((ROWS,), tl.float32)
        for start in range(0, V, BLOCK):
            offs = start + tl.arange(0, BLOCK)[None, :]
            x = _scaled_block(base, offs, live, V, inv_temperature)
            w = tl.exp(x - top[:, None])
            candidate = (x >= threshold[:, None]) & (w >= min_p) & (w > pivot[:, None])
            mass += tl.sum(tl.where(candidate, w, 0.0), axis=1)
        target = tl.rand(seed, rows * MAX_ROUNDS + rounds) * mass
        running = tl.zeros((ROWS,), tl.float32)
        drawn = tl.full((ROWS,), -1, tl.int64)
        last = tl.full((ROWS,), -1, tl.int64)
        weight = tl.zeros((ROWS,), tl.float32)  # the drawn token's w, as the scans compute it (same rounding)
        last_weight = tl.zeros((ROWS,), tl.float32)
        for start in range(0, V, BLOCK):
            offs = start + tl.arange(0, BLOCK)[None, :]
            x = _scaled_block(base, offs, live, V, inv_temperature)
            w = tl.exp(x - top[:, None])
            w = tl.where((x >= threshold[:, None]) & (w >= min_p) & (w > pivot[:, None]), w, 0.0)
            cumulative = tl.cumsum(w, axis=1) + running[:, None]
            index = offs.to(tl.int64) + tl.zeros((ROWS, BLOCK), tl.int64)
            hit = tl.min(tl.where((cumulative > target[:, None]) & (w > 0), index, V), axis=1)
            first_hit = (drawn < 0) & (hit < V)
            weight = tl.where(first_hit, tl.sum(tl.where(index == hit[:, None], w, 0.0), axis=1), weight)
            drawn = tl.where(first_hit, hit, drawn)
            block_last = tl.max(tl.where(w > 0, index, -1), axis=1)
            last_weight = tl.where(block_last >= 0, tl.sum(tl.where(index == block_last[:, None], w, 0.0), axis=1),
                                   last_weight)
            last = tl.maximum(last, block_last)
            running += tl.sum(w, axis=1)
        weight = tl.where(drawn < 0, last_weight, weight)
        drawn = tl.where(drawn < 0, last, drawn)  # rounding: the target fell past the total
        drawn = tl.maximum(drawn, 0)
        # in the nucleus: the top-k mass strictly more likely than it is below top_p of the top-k mass
        above = tl.zeros((ROWS,), tl.float32)
        for start in range(0, V, BLOCK):
            offs = start + tl.arange(0, BLOCK)[None, :]
            x = _scaled_block(base, offs, live, V, inv_temperature)
            w = tl.exp(x - top[:, None])
            above += tl.sum(tl.where((x >= threshold[:, None]) & (w > weight[:, None]), w, 0.0), axis=1)
        accepted = pending & ((above < top_p * kept_mass) | (rounds == MAX_ROUNDS - 1))
        token = tl.where(accepted, drawn, token)
        pivot = tl.where(pending & ~accepted, weight, pivot)
        rounds += 1
    tl.store(out_ptr + rows, token, mask=live)


def sample_logits_triton(logits: torch.Tensor, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                         min_p: float = 0.0, generator: torch.Generator | None = None, block: int | None = None,
                         rows_per_program: int = 1, out: torch.Tensor | None = None,
                         seed_in_memory: bool | None = None, top_k_by: str | None = None) -> torch.Tensor:
    """One token per row of logits (B, V), float32/bf16/fp16 on a GPU (or anywhere under TRITON_INTERPRET=1),
    with the reference's filters (module docstring); temperature 0 is argmax. Arguments are checked by the
    caller (`fastjudge.core.sampling.sample_logits`). rows_per_program > 1 (a power of two) suits the interpreter.
    seed_in_memory: the kernel reads the generator's seed from memory instead of the host passing its value
    (None: when the generator is on logits' device; then no call waits on the GPU); both draw the same tokens.
    top_k_by: how the k-th largest value is found: "topk" (torch.topk, then the kernel reads it) or "bisection"
    (in the kernel: 64 passes over the row, no k limit); None: "topk" for k <= 1024. Both keep the same tokens
    (every token at least the k-th value), so both draw the same tokens."""
    if top_k_by not in (None, "topk", "bisection"):
        raise ValueError(f"top_k_by: expected 'topk' or 'bisection', got {top_k_by!r}")
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.contiguous()
    rows, vocab = logits.shape
    out = torch.empty(rows, dtype=torch.long, device=logits.device) if out is None else out
    device = generator.device if generator is not None else logits.device
    seed = torch.randint(0, 2**31 - 1, (1,), generator=generator, device=device)  # (1,) int64
    if seed_in_memory is None:  # a seed drawn on the GPU stays there: reading it would wait for the GPU's queue
        seed_in_memory = seed.device == logits.device
    if seed_in_memory:
        seed = seed.to(logits.device)
    else:
        seed = int(seed.item())
    use_top_k = 0 < top_k < vocab
    if top_k_by is None:
        top_k_by = "topk" if top_k <= 1024 else "bisection"
    inv_temperature = 1.0 / temperature
    kth = out  # unused unless KTH_GIVEN
    kth_given = use_top_k and top_k_by == "topk"
    if kth_given:
        # scaling by 1 / temperature keeps the order, so the k-th scaled value is the scaled k-th value; scaled as
        # the kernel scales (float32 times a float32 scalar), it is the bisection's threshold exactly
        kth = (torch.topk(logits, top_k, dim=-1).values[:, -1].float() * inv_temperature).contiguous()  # (B,)
    block = block or min(4096, triton.next_power_of_2(vocab))
    grid = (triton.cdiv(rows, rows_per_program),)
    _sample_rows_kernel[grid](logits, out, kth, rows, vocab, logits.stride(0), inv_temperature, top_k, top_p, min_p,
                              seed, SEED_IN_MEMORY=seed_in_memory, USE_TOP_K=use_top_k, KTH_GIVEN=kth_given,
                              ROWS=rows_per_program, BLOCK=block, MAX_ROUNDS=MAX_ROUNDS,
                              BISECTION_STEPS=BISECTION_STEPS)
    return out
