"""Triton pieces the flash-attention kernels share (cross-attention and shared-prefix decoding): key tiles, the
online softmax in base-2 units, the decoding frame's query load, chunk store and the combine kernel that merges
the chunks of a split-K (flash-decoding) pass. Private to fastjudge.kernels; imported only when a kernel runs."""

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)  # exp(x) = exp2(x * LOG2E); a constexpr, as kernels may read no other global


@triton.jit
def _key_tile(k_ptr, v_ptr, kv_base, first, S, D, dims, dim_live, BLOCK_N: tl.constexpr):
    """Keys [first, first + BLOCK_N) of one K/V head: (cols, K, V), zeros at and past S (the keys' end, or a
    decoding chunk's) and past D."""
    cols = first + tl.arange(0, BLOCK_N)
    offs = kv_base + cols[:, None] * D + dims[None, :]
    mask = (cols < S)[:, None] & dim_live[None, :]
    return cols, tl.load(k_ptr + offs, mask=mask, other=0.0), tl.load(v_ptr + offs, mask=mask, other=0.0)


@triton.jit
def _online_softmax_start(BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """The online softmax's state before any key: each row's running max (-inf), exp-sum (0) and unnormalized
    output (BLOCK_M, BLOCK_D) (0), float32."""
    return (tl.full((BLOCK_M,), -float("inf"), tl.float32), tl.zeros((BLOCK_M,), tl.float32),
            tl.zeros((BLOCK_M, BLOCK_D), tl.float32))


@triton.jit
def _online_softmax_update(scores, seen, v, row_max, row_sum, acc, PRECISION: tl.constexpr):
    """Fold one tile of base-2 scores (BLOCK_M, BLOCK_N), of which each row sees `seen`, and its values V into the
    rows' running max (base 2), exp-sum and unnormalized output (flash attention's online softmax)."""
    scores = tl.where(seen, scores, -float("inf"))
    new_max = tl.maximum(row_max, tl.max(scores, axis=1))
    safe = tl.where(new_max == -float("inf"), 0.0, new_max)  # rows that have seen no key yet
    p = tl.where(seen, tl.exp2(scores - safe[:, None]), 0.0)
    alpha = tl.exp2(row_max - safe)
    row_sum = row_sum * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return new_max, row_sum, acc


@triton.jit
def _decode_queries(q_ptr, bk, R, D, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Decoding: the program's block of the R query rows of (prompt, K/V head) bk, and their queries."""
    rows = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_live = rows < R
    dims = tl.arange(0, BLOCK_D)
    dim_live = dims < D
    q = tl.load(q_ptr + (bk.to(tl.int64) * R + rows[:, None]) * D + dims[None, :],
                mask=row_live[:, None] & dim_live[None, :], other=0.0)
    return rows, row_live, dims, dim_live, q


@triton.jit
def _store_decode_chunk(part_ptr, stats_ptr, bk, split, SPLITS, R, D, rows, row_live, dims, dim_live, acc, row_max,
                        row_sum):
    """Decoding: one chunk's unnormalized output (R, D) and its rows' base-2 score max (-inf where the chunk holds
    nothing the row sees) and exp-sum, for the combine kernel."""
    part = bk.to(tl.int64) * SPLITS + split
    tl.store(part_ptr + (part * R + rows[:, None]) * D + dims[None, :], acc,
             mask=row_live[:, None] & dim_live[None, :])
    tl.store(stats_ptr + (part * 2) * R + rows, row_max, mask=row_live)
    tl.store(stats_ptr + (part * 2 + 1) * R + rows, row_sum, mask=row_live)


# SPLITS follows the keys read, which change with the span in the self-attention decoder: unspecialized, so that
# a CUDA graph captured for another span runs the variant already compiled (a compile inside a capture fails)
@triton.jit(do_not_specialize=["SPLITS"])
def decode_combine_kernel(part_ptr, stats_ptr, o_ptr, R, D, SPLITS,
                          BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program (batch x K/V head, row block): the splits' partial outputs merged with their rows' max (base 2)
    and exp-sum into the softmax-normalized output (R, D); a row whose range is empty gets 0."""
    bk = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_live = rows < R
    dims = tl.arange(0, BLOCK_D)
    mask = row_live[:, None] & (dims < D)[None, :]
    base = bk.to(tl.int64) * SPLITS
    top = tl.full((BLOCK_M,), -float("inf"), tl.float32)
    for split in range(0, SPLITS):
        top = tl.maximum(top, tl.load(stats_ptr + ((base + split) * 2) * R + rows, mask=row_live,
                                      other=-float("inf")))
    safe = tl.where(top == -float("inf"), 0.0, top)
    total = tl.zeros((BLOCK_M,), tl.float32)
    out = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for split in range(0, SPLITS):
        weight = tl.exp2(tl.load(stats_ptr + ((base + split) * 2) * R + rows, mask=row_live, other=-float("inf"))
                        - safe)  # 0 for an empty chunk
        total += weight * tl.load(stats_ptr + ((base + split) * 2 + 1) * R + rows, mask=row_live, other=0.0)
        part = tl.load(part_ptr + ((base + split) * R + rows[:, None]) * D + dims[None, :], mask=mask, other=0.0)
        out += weight[:, None] * part
    out = tl.where((total > 0)[:, None], out / tl.where(total > 0, total, 1.0)[:, None], 0.0)
    tl.store(o_ptr + (bk.to(tl.int64) * R + rows[:, None]) * D + dims[None, :], out.to(o_ptr.dtype.element_ty),
             mask=mask)

