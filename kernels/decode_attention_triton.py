"""The Triton kernel of `decode_attention.shared_prefix_decode_attention` (kept apart so that importing
fastjudge.kernels imports no Triton); its chunks are merged by _flash_triton's combine kernel.
Shapes: R = G * n query rows per (prompt, K/V head): row j * n + s is query head kv * G + j of sample s."""

import triton
import triton.language as tl

from fastjudge.kernels._flash_triton import (LOG2E, _decode_queries, _key_tile, _online_softmax_start,
                                             _online_softmax_update, _store_decode_chunk)


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
    rows, row_live, dims, dim_live, q = _decode_queries(q_ptr, bk, R, D, BLOCK_M, BLOCK_D)
    sample = rows % N  # (BLOCK_M,)
    last_step = tl.load(index_ptr + b * N + sample, mask=row_live, other=-1)  # the sample's own steps 0..index
    kv_base = (bk.to(tl.int64) * L) * D
    row_max, row_sum, acc = _online_softmax_start(BLOCK_M, BLOCK_D)
    for first in range(lo, hi, BLOCK_N):
        cols, k, v = _key_tile(k_ptr, v_ptr, kv_base, first, hi, D, dims, dim_live, BLOCK_N)  # columns past hi: 0
        live = cols < hi
        in_prompt = cols < T
        kept = tl.load(prompt_mask_ptr + b * T + cols, mask=live & in_prompt, other=0) != 0  # (BLOCK_N,)
        own = cols - T
        seen = (in_prompt & kept)[None, :] | \
            ((~in_prompt & live)[None, :] & ((own % N)[None, :] == sample[:, None])
             & ((own // N)[None, :] <= last_step[:, None]))  # (BLOCK_M, BLOCK_N)
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * (scale * LOG2E)  # base 2, as the update takes
        row_max, row_sum, acc = _online_softmax_update(scores, seen, v, row_max, row_sum, acc, PRECISION)
    _store_decode_chunk(part_ptr, stats_ptr, bk, split, SPLITS, R, D, rows, row_live, dims, dim_live, acc, row_max,
                        row_sum)
