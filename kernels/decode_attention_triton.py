"""The Triton kernel of `decode_attention.shared_prefix_decode_attention` (kept apart so that importing
fastjudge.kernels imports no Triton); its chunks are merged by mllama_cross_attention_triton's combine kernel.
Shapes: R = G * n query rows per (prompt, K/V head): row j * n + s is query head kv * G + j of sample s."""

import triton
import triton.language as tl


# WIDTH, SPLITS and CHUNK change with the span read: unspecialized, so that a CUDA graph captured for a wider span
# runs the variant already compiled (a compile inside a capture fails)
@triton.jit(do_not_specialize=["WIDTH", "SPLITS", "CHUNK"])
def shared_prefix_decode_kernel(q_ptr, k_ptr, v_ptr, part_ptr, stats_ptr, prompt_mask_ptr, index_ptr,
                                R, L, D, HKV, T, N, WIDTH, SPLITS, CHUNK, scale,
                                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                                PRECISION: tl.constexpr):
    """Program (split, prompt x K/V head, row block): the R rows against columns [split * CHUNK, + CHUNK) of the
    first WIDTH columns of the prompt's key buffer (L columns: the T prompt keys, then the samples' own keys
    step-major, column T + step * N + s). A row of sample s sees the prompt keys its prompt mask keeps and its
    own keys of steps 0..index[b, s]. Writes the chunk's unnormalized output and each row's max and exp-sum
    (-inf and 0 where the chunk holds nothing the row sees)."""
    split, bk = tl.program_id(0), tl.program_id(1)
    b = bk // HKV
    lo = split * CHUNK
    hi = tl.minimum(lo + CHUNK, WIDTH)
    rows = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_live = rows < R
    dims = tl.arange(0, BLOCK_D)
    dim_live = dims < D
    q = tl.load(q_ptr + (bk.to(tl.int64) * R + rows[:, None]) * D + dims[None, :],
                mask=row_live[:, None] & dim_live[None, :], other=0.0)
    sample = rows % N  # (BLOCK_M,)
    last_step = tl.load(index_ptr + b * N + sample, mask=row_live, other=-1)  # the sample's own steps 0..index
    kv_base = (bk.to(tl.int64) * L) * D
    row_max = tl.full((BLOCK_M,), -float("inf"), tl.float32)
    row_sum = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for first in range(lo, hi, BLOCK_N):
        cols = first + tl.arange(0, BLOCK_N)
        live = cols < hi
        offs = kv_base + cols[:, None] * D + dims[None, :]
        mask = live[:, None] & dim_live[None, :]
        k = tl.load(k_ptr + offs, mask=mask, other=0.0)
        v = tl.load(v_ptr + offs, mask=mask, other=0.0)
        in_prompt = cols < T
        kept = tl.load(prompt_mask_ptr + b * T + cols, mask=live & in_prompt, other=0) != 0  # (BLOCK_N,)
        own = cols - T
        seen = (in_prompt & kept)[None, :] | \
            ((~in_prompt & live)[None, :] & ((own % N)[None, :] == sample[:, None])
             & ((own // N)[None, :] <= last_step[:, None]))  # (BLOCK_M, BLOCK_N)
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        scores = tl.where(seen, scores, -float("inf"))
        new_max = tl.maximum(row_max, tl.max(scores, axis=1))
        safe = tl.where(new_max == -float("inf"), 0.0, new_max)  # rows that have seen nothing yet
        p = tl.where(seen, tl.exp(scores - safe[:, None]), 0.0)
        alpha = tl.exp(row_max - safe)
        row_sum = row_sum * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        row_max = new_max
    part = bk.to(tl.int64) * SPLITS + split
    tl.store(part_ptr + (part * R + rows[:, None]) * D + dims[None, :], acc,
             mask=row_live[:, None] & dim_live[None, :])
    tl.store(stats_ptr + (part * 2) * R + rows, row_max, mask=row_live)
    tl.store(stats_ptr + (part * 2 + 1) * R + rows, row_sum, mask=row_live)
