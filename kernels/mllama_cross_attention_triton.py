"""The Triton kernels of `cross_attention` (kept apart so that importing fastjudge.kernels imports no Triton).
Shapes: B batch, Hq query heads in Hkv groups of G, T query rows, S keys, D head size; each query row t of
batch b sees the keys [start[b, t], end[b, t]) (empty: none). Flash-attention style: online softmax, no score
matrix in memory; a query block visits only the key tiles of its rows' union range [lo, hi).

Scores are kept in base-2 units (scaled by scale * log2(e)), so that each softmax weight is one exp2: the running
maxima, the forward pass's saved log-sum-exp and the decoding chunks' statistics are all base-2."""

import triton
import triton.language as tl

from fastjudge.kernels._flash_triton import (LOG2E, _decode_queries, _key_tile, _online_softmax_start,
                                             _online_softmax_update, _store_decode_chunk)


@triton.jit
def _query_block(start_ptr, end_ptr, lo_ptr, hi_ptr, block, b, T, D, BLOCKS_T,
                 BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """The rows of one query block, their key ranges and the block's union range [lo, hi)."""
    rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
    row_live = rows < T
    dims = tl.arange(0, BLOCK_D)
    dim_live = dims < D
    start = tl.load(start_ptr + b * T + rows, mask=row_live, other=0)
    end = tl.load(end_ptr + b * T + rows, mask=row_live, other=0)
    lo = tl.load(lo_ptr + b * BLOCKS_T + block)
    hi = tl.load(hi_ptr + b * BLOCKS_T + block)
    return rows, row_live, dims, dim_live, start, end, lo, hi


@triton.jit
def _scores(q, k, cols, start, end, scale2, PRECISION: tl.constexpr):
    """(BLOCK_M, BLOCK_N) scores in base-2 units (scale2 = scale * LOG2E), and which of them each row's range lets
    it see."""
    scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale2
    seen = (cols[None, :] >= start[:, None]) & (cols[None, :] < end[:, None])
    return scores, seen


@triton.jit
def _grad_rows(q_ptr, do_ptr, lse_ptr, delta_ptr, bh, T, D, rows, row_live, dims, dim_live):
    """The backward passes' loads for one query block of query head bh: (offsets, mask) of its (BLOCK_M,
    BLOCK_D) tiles, Q, dO, and each row's log-sum-exp and delta."""
    offs = (bh.to(tl.int64) * T) * D + rows[:, None] * D + dims[None, :]
    mask = row_live[:, None] & dim_live[None, :]
    q = tl.load(q_ptr + offs, mask=mask, other=0.0)
    do = tl.load(do_ptr + offs, mask=mask, other=0.0)
    lse = tl.load(lse_ptr + bh * T + rows, mask=row_live, other=0.0)
    delta = tl.load(delta_ptr + bh * T + rows, mask=row_live, other=0.0)
    return offs, mask, q, do, lse, delta


@triton.jit
def cross_attention_forward_kernel(q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, start_ptr, end_ptr, lo_ptr, hi_ptr,
                                   T, S, D, HQ, GROUP, BLOCKS_T, scale,
                                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                                   PRECISION: tl.constexpr):
    """Program (query block, batch x query head): O (BLOCK_M, D) and each row's log-sum-exp of its scores, base 2
    (log2 of the sum of exp2 of the base-2 scores)."""
    block, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // HQ, bh % HQ
    kv = b * (HQ // GROUP) + h // GROUP  # the key/value head of this query head (GQA: no repeated K/V)
    rows, row_live, dims, dim_live, start, end, lo, hi = _query_block(start_ptr, end_ptr, lo_ptr, hi_ptr, block, b,
                                                                      T, D, BLOCKS_T, BLOCK_M, BLOCK_D)
    offs = (bh.to(tl.int64) * T) * D + rows[:, None] * D + dims[None, :]
    mask = row_live[:, None] & dim_live[None, :]
    q = tl.load(q_ptr + offs, mask=mask, other=0.0)
    kv_base = (kv.to(tl.int64) * S) * D
    row_max, row_sum, acc = _online_softmax_start(BLOCK_M, BLOCK_D)
    for first in range((lo // BLOCK_N) * BLOCK_N, hi, BLOCK_N):
        cols, k, v = _key_tile(k_ptr, v_ptr, kv_base, first, S, D, dims, dim_live, BLOCK_N)
        scores, seen = _scores(q, k, cols, start, end, scale * LOG2E, PRECISION)  # (BLOCK_M, BLOCK_N)
        row_max, row_sum, acc = _online_softmax_update(scores, seen, v, row_max, row_sum, acc, PRECISION)
    some = row_sum > 0  # rows with no key ("zero" rows): output 0
    out = tl.where(some[:, None], acc / tl.where(some, row_sum, 1.0)[:, None], 0.0)
    tl.store(o_ptr + offs, out.to(o_ptr.dtype.element_ty), mask=mask)
    lse = tl.where(some, row_max + tl.log2(tl.where(some, row_sum, 1.0)), 0.0)
    tl.store(lse_ptr + bh * T + rows, lse, mask=row_live)


@triton.jit
def cross_attention_delta_kernel(o_ptr, do_ptr, delta_ptr, ROWS, D, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program (block of the B * Hq * T rows): delta = rowsum(dO * O) in float32, the backward passes' softmax
    correction (one read of O and dO; torch's float casts, product and sum would write three float32 copies)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    mask = (rows < ROWS)[:, None] & (dims < D)[None, :]
    offs = rows[:, None] * D + dims[None, :]
    o = tl.load(o_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    do = tl.load(do_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(delta_ptr + rows, tl.sum(o * do, axis=1), mask=rows < ROWS)


@triton.jit
def cross_attention_dq_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, start_ptr, end_ptr, lo_ptr,
                              hi_ptr, T, S, D, HQ, GROUP, BLOCKS_T, scale,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                              PRECISION: tl.constexpr):
    """Program (query block, batch x query head): dQ = sum over its keys of dS K * scale, with
    dS = P (dP - delta), dP = dO V^T, P recomputed from the saved (base-2) log-sum-exp."""
    block, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // HQ, bh % HQ
    kv = b * (HQ // GROUP) + h // GROUP
    rows, row_live, dims, dim_live, start, end, lo, hi = _query_block(start_ptr, end_ptr, lo_ptr, hi_ptr, block, b,
                                                                      T, D, BLOCKS_T, BLOCK_M, BLOCK_D)
    offs, mask, q, do, lse, delta = _grad_rows(q_ptr, do_ptr, lse_ptr, delta_ptr, bh, T, D, rows, row_live, dims,
                                               dim_live)
    kv_base = (kv.to(tl.int64) * S) * D
    dq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for first in range((lo // BLOCK_N) * BLOCK_N, hi, BLOCK_N):
        cols, k, v = _key_tile(k_ptr, v_ptr, kv_base, first, S, D, dims, dim_live, BLOCK_N)
        scores, seen = _scores(q, k, cols, start, end, scale * LOG2E, PRECISION)
        p = tl.where(seen, tl.exp2(scores - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    tl.store(dq_ptr + offs, (dq * scale).to(dq_ptr.dtype.element_ty), mask=mask)


@triton.jit
def cross_attention_dkv_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, start_ptr, end_ptr,
                               lo_ptr, hi_ptr, T, S, D, HQ, GROUP, BLOCKS_T, scale,
                               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                               PRECISION: tl.constexpr):
    """Program (key block, batch x key/value head): dK and dV of its keys, summed over the GROUP query heads
    that share them and over the query blocks from the first to the last whose range meets the key block (the
    others are skipped; one between them that does not meet it adds 0: its rows see none of these keys)."""
    block, bkv = tl.program_id(0), tl.program_id(1)
    hkv = HQ // GROUP
    b, kv_head = bkv // hkv, bkv % hkv
    dims = tl.arange(0, BLOCK_D)
    dim_live = dims < D
    kv_base = (bkv.to(tl.int64) * S) * D
    first_col = block * BLOCK_N
    cols, k, v = _key_tile(k_ptr, v_ptr, kv_base, first_col, S, D, dims, dim_live, BLOCK_N)
    kv_offs = kv_base + cols[:, None] * D + dims[None, :]
    kv_mask = (cols < S)[:, None] & dim_live[None, :]
    # the first and last query block that meets the key block (none: q_last < q_first), 16 blocks a load
    q_first = BLOCKS_T + 0
    q_last = BLOCKS_T * 0 - 1
    for first_block in range(0, BLOCKS_T, 16):
        blocks = first_block + tl.arange(0, 16)
        live = blocks < BLOCKS_T
        meets = live & (tl.load(lo_ptr + b * BLOCKS_T + blocks, mask=live, other=0) < first_col + BLOCK_N) & \
            (tl.load(hi_ptr + b * BLOCKS_T + blocks, mask=live, other=0) > first_col)
        q_first = tl.minimum(q_first, tl.min(tl.where(meets, blocks, BLOCKS_T), axis=0))
        q_last = tl.maximum(q_last, tl.max(tl.where(meets, blocks, -1), axis=0))
    count = tl.maximum(q_last - q_first + 1, 0)
    dk = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    # one loop over (query head of the group, query block) without branches, so that Triton can pipeline its loads
    for step in range(0, GROUP * count):
        qb = q_first + step % count
        bh = b * HQ + kv_head * GROUP + step // count
        rows, row_live, _, _, start, end, _, _ = _query_block(
            start_ptr, end_ptr, lo_ptr, hi_ptr, qb, b, T, D, BLOCKS_T, BLOCK_M, BLOCK_D)
        _, _, q, do, lse, delta = _grad_rows(q_ptr, do_ptr, lse_ptr, delta_ptr, bh, T, D, rows, row_live, dims,
                                             dim_live)
        scores, seen = _scores(q, k, cols, start, end, scale * LOG2E, PRECISION)  # (BLOCK_M, BLOCK_N)
        p = tl.where(seen, tl.exp2(scores - lse[:, None]), 0.0)
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)
    tl.store(dk_ptr + kv_offs, (dk * scale).to(dk_ptr.dtype.element_ty), mask=kv_mask)
    tl.store(dv_ptr + kv_offs, dv.to(dv_ptr.dtype.element_ty), mask=kv_mask)


@triton.jit(do_not_specialize=["SPLITS", "CHUNK"])  # see the combine kernel
def cross_attention_decode_kernel(q_ptr, k_ptr, v_ptr, part_ptr, stats_ptr, start_ptr, end_ptr,
                                  R, S, D, HKV, SPLITS, CHUNK, scale,
                                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                                  PRECISION: tl.constexpr):
    """Decoding, program (split, batch x K/V head, row block): the R = G * n query rows that share one K/V head (its G
    query heads times the prompt's n samples) against one chunk of the prompt's key range, [start + split *
    CHUNK, start + (split + 1) * CHUNK) cut at end. Writes the chunk's unnormalized output (R, D) and each row's
    score max (base 2) and exp-sum, float32, for the combine kernel (flash-decoding: the splits fill the GPU when
    B * Hkv programs alone would not)."""
    split, bk = tl.program_id(0), tl.program_id(1)
    b = bk // HKV
    lo = tl.load(start_ptr + b) + split * CHUNK
    hi = tl.minimum(lo + CHUNK, tl.load(end_ptr + b))
    rows, row_live, dims, dim_live, q = _decode_queries(q_ptr, bk, R, D, BLOCK_M, BLOCK_D)
    kv_base = (bk.to(tl.int64) * S) * D
    row_max, row_sum, acc = _online_softmax_start(BLOCK_M, BLOCK_D)
    for first in range(lo, hi, BLOCK_N):
        cols, k, v = _key_tile(k_ptr, v_ptr, kv_base, first, hi, D, dims, dim_live, BLOCK_N)  # keys past hi: 0
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * (scale * LOG2E)  # (BLOCK_M, BLOCK_N), base 2
        row_max, row_sum, acc = _online_softmax_update(scores, (cols < hi)[None, :], v, row_max, row_sum, acc,
                                                       PRECISION)
    _store_decode_chunk(part_ptr, stats_ptr, bk, split, SPLITS, R, D, rows, row_live, dims, dim_live, acc, row_max,
                        row_sum)


