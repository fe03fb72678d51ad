"""The Triton kernels of `linear_cross_entropy` (kept apart so that importing fastjudge.kernels imports no
Triton). Shapes and designs: the docstring of linear_cross_entropy.py."""

import triton
import triton.language as tl

# ---- the chunked designs ("vocab", "rows"): kernels over a logits block made by a matrix product


@triton.jit
def block_stats_kernel(block_ptr, stride, rows, cols, col0, target_ptr, max_ptr, sumexp_ptr, picked_ptr,
                       total_ptr, ROWS: tl.constexpr, BLOCK: tl.constexpr, SMOOTH: tl.constexpr):
    """Fold a (rows, cols) block of logits, vocabulary columns [col0, col0 + cols), into each row's running
    max, sum of exp(x - max), target logit and (with SMOOTH) sum of logits."""
    row = tl.program_id(0) * ROWS + tl.arange(0, ROWS)  # (ROWS,)
    live = row < rows
    base = block_ptr + row.to(tl.int64)[:, None] * stride  # (ROWS, 1)
    target = tl.load(target_ptr + row, mask=live, other=-1).to(tl.int64) - col0  # (ROWS,) column in block
    lane_max = tl.full((ROWS, BLOCK), -float("inf"), tl.float32)
    lane_sum = tl.zeros((ROWS, BLOCK), tl.float32)
    picked = tl.zeros((ROWS,), tl.float32)
    total = tl.zeros((ROWS,), tl.float32)
    for start in range(0, cols, BLOCK):
        offs = start + tl.arange(0, BLOCK)[None, :]  # (1, BLOCK)
        inside = live[:, None] & (offs < cols)
        x = tl.load(base + offs, mask=inside, other=-float("inf")).to(tl.float32)  # (ROWS, BLOCK)
        new_max = tl.maximum(lane_max, x)
        # lanes still at -inf (nothing seen) add nothing; exp(-inf - -inf) would be NaN
        safe = tl.where(new_max == -float("inf"), 0.0, new_max)
        lane_sum = lane_sum * tl.exp(lane_max - safe) + tl.where(inside, tl.exp(x - safe), 0.0)
        lane_max = new_max
        picked += tl.sum(tl.where(inside & (offs == target[:, None]), x, 0.0), axis=1)
        if SMOOTH:
            total += tl.sum(tl.where(inside, x, 0.0), axis=1)
    block_max = tl.max(lane_max, axis=1)  # (ROWS,)
    safe = tl.where(block_max == -float("inf"), 0.0, block_max)
    block_sum = tl.sum(lane_sum * tl.exp(lane_max - safe[:, None]), axis=1)
    old_max = tl.load(max_ptr + row, mask=live, other=0.0)
    old_sum = tl.load(sumexp_ptr + row, mask=live, other=0.0)
    new_max = tl.maximum(old_max, block_max)
    new_sum = old_sum * tl.exp(old_max - new_max) + block_sum * tl.exp(block_max - new_max)
    tl.store(max_ptr + row, new_max, mask=live)
    tl.store(sumexp_ptr + row, new_sum, mask=live)
    tl.store(picked_ptr + row, tl.load(picked_ptr + row, mask=live, other=0.0) + picked, mask=live)
    if SMOOTH:
        tl.store(total_ptr + row, tl.load(total_ptr + row, mask=live, other=0.0) + total, mask=live)

@triton.jit
def block_grad_kernel(block_ptr, stride, rows, cols, col0, target_ptr, lse_ptr, scale_ptr, vocab, smoothing,
                      ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """Overwrite a (rows, cols) block of logits with d loss / d logits:
    (exp(x - lse) - smoothing / vocab - (1 - smoothing) [column == target]) * scale, scale per row."""
    row = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    live = row < rows
    base = block_ptr + row.to(tl.int64)[:, None] * stride
    target = tl.load(target_ptr + row, mask=live, other=-1).to(tl.int64) - col0
    lse = tl.load(lse_ptr + row, mask=live, other=0.0)
    scale = tl.load(scale_ptr + row, mask=live, other=0.0)
    for start in range(0, cols, BLOCK):
        offs = start + tl.arange(0, BLOCK)[None, :]
        inside = live[:, None] & (offs < cols)
        x = tl.load(base + offs, mask=inside, other=0.0).to(tl.float32)
        g = tl.exp(x - lse[:, None]) - smoothing / vocab
        g = tl.where(offs == target[:, None], g - (1.0 - smoothing), g) * scale[:, None]
        tl.store(base + offs, g.to(block_ptr.dtype.element_ty), mask=inside)


# ---- the "blockwise" design (Cut Cross-Entropy's layout): logits only as tiles on chip


@triton.jit
def _logit_tile(h_ptr, w_ptr, b_ptr, source, live, cols, col_live, size, stride_h, stride_w,
                HAS_BIAS: tl.constexpr, BM: tl.constexpr, BV: tl.constexpr, BK: tl.constexpr,
                PRECISION: tl.constexpr):
    """(BM, BV) float32 logits of rows `source` (indices into hidden) and columns `cols`."""
    acc = tl.zeros((BM, BV), tl.float32)
    for k in range(0, size, BK):
        kk = k + tl.arange(0, BK)
        a = tl.load(h_ptr + source[:, None] * stride_h + kk[None, :],
                    mask=live[:, None] & (kk[None, :] < size), other=0.0)
        b = tl.load(w_ptr + cols[:, None].to(tl.int64) * stride_w + kk[None, :],
                    mask=col_live[:, None] & (kk[None, :] < size), other=0.0)
        acc = tl.dot(a, tl.trans(b), acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_live, other=0.0).to(tl.float32)[None, :]
    return acc

@triton.jit
def blockwise_forward_kernel(h_ptr, w_ptr, b_ptr, order_ptr, target_ptr, count_ptr, part_ptr, rows, vocab, size,
                             stride_h, stride_w, tiles_per_split, HAS_BIAS: tl.constexpr, SMOOTH: tl.constexpr,
                             BM: tl.constexpr, BV: tl.constexpr, BK: tl.constexpr, PRECISION: tl.constexpr):
    """Program (row block, vocabulary split): the split's running max, sum of exponentials, target logit
    and logit sum for BM rows, in part (4, splits, rows). Rows are taken in `order` (the kept rows first);
    blocks past the kept count do nothing."""
    count = tl.load(count_ptr)
    block, split = tl.program_id(0), tl.program_id(1)
    splits = tl.num_programs(1)
    if block * BM < count:
        position = block * BM + tl.arange(0, BM)  # (BM,) kept-row positions
        live = position < count
        source = tl.load(order_ptr + position, mask=live, other=0).to(tl.int64)
        target = tl.load(target_ptr + source, mask=live, other=-1).to(tl.int64)
        row_max = tl.full((BM,), -float("inf"), tl.float32)
        row_sum = tl.zeros((BM,), tl.float32)
        picked = tl.zeros((BM,), tl.float32)
        total = tl.zeros((BM,), tl.float32)
        first = split * tiles_per_split
        last = tl.minimum(first + tiles_per_split, tl.cdiv(vocab, BV))
        for tile in range(first, last):
            cols = tile * BV + tl.arange(0, BV)
            col_live = cols < vocab
            logits = _logit_tile(h_ptr, w_ptr, b_ptr, source, live, cols, col_live, size, stride_h, stride_w,
                                 HAS_BIAS, BM, BV, BK, PRECISION)
            logits = tl.where(col_live[None, :], logits, -float("inf"))
            new_max = tl.maximum(row_max, tl.max(logits, axis=1))
            row_sum = row_sum * tl.exp(row_max - new_max) + tl.sum(tl.exp(logits - new_max[:, None]), axis=1)
            row_max = new_max
            picked += tl.sum(tl.where(cols[None, :] == target[:, None], logits, 0.0), axis=1)
            if SMOOTH:
                total += tl.sum(tl.where(col_live[None, :], logits, 0.0), axis=1)
        out = part_ptr + split * rows + position
        plane = splits * rows
        tl.store(out, row_max, mask=live)
        tl.store(out + plane, row_sum, mask=live)
        tl.store(out + 2 * plane, picked, mask=live)
        tl.store(out + 3 * plane, total, mask=live)

@triton.jit
def blockwise_backward_kernel(h_ptr, w_ptr, b_ptr, order_ptr, target_ptr, count_ptr, lse_ptr, scale_ptr, dh_ptr,
                              dw_ptr, db_ptr, vocab, size, stride_h, stride_w, smoothing, HAS_BIAS: tl.constexpr,
                              NEED_DH: tl.constexpr, NEED_DW: tl.constexpr, NEED_DB: tl.constexpr,
                              BM: tl.constexpr, BV: tl.constexpr, BK: tl.constexpr, PRECISION: tl.constexpr):
    """Program (row block, vocabulary tile): the tile's logits again, their gradient G (BM, BV), then
    dhidden[rows] += G @ weight[tile] and dweight[tile] += G.T @ hidden[rows] by float32 atomic adds."""
    count = tl.load(count_ptr)
    block, tile = tl.program_id(0), tl.program_id(1)
    if block * BM < count:
        position = block * BM + tl.arange(0, BM)
        live = position < count
        source = tl.load(order_ptr + position, mask=live, other=0).to(tl.int64)
        target = tl.load(target_ptr + source, mask=live, other=-1).to(tl.int64)
        lse = tl.load(lse_ptr + position, mask=live, other=0.0)
        scale = tl.load(scale_ptr + position, mask=live, other=0.0)
        cols = tile * BV + tl.arange(0, BV)
        col_live = cols < vocab
        logits = _logit_tile(h_ptr, w_ptr, b_ptr, source, live, cols, col_live, size, stride_h, stride_w,
                             HAS_BIAS, BM, BV, BK, PRECISION)
        g = tl.exp(logits - lse[:, None]) - smoothing / vocab
        g = tl.where(cols[None, :] == target[:, None], g - (1.0 - smoothing), g) * scale[:, None]
        g = tl.where(live[:, None] & col_live[None, :], g, 0.0)
        if NEED_DB:
            tl.atomic_add(db_ptr + cols, tl.sum(g, axis=0), mask=col_live)
        g_in = g.to(h_ptr.dtype.element_ty)
        for k in range(0, size, BK):
            kk = k + tl.arange(0, BK)
            k_live = kk < size
            if NEED_DH:
                w = tl.load(w_ptr + cols[:, None].to(tl.int64) * stride_w + kk[None, :],
                            mask=col_live[:, None] & k_live[None, :], other=0.0)
                part = tl.dot(g_in, w, input_precision=PRECISION)  # (BM, BK)
                tl.atomic_add(dh_ptr + source[:, None] * size + kk[None, :], part,
                              mask=live[:, None] & k_live[None, :])
            if NEED_DW:
                h = tl.load(h_ptr + source[:, None] * stride_h + kk[None, :],
                            mask=live[:, None] & k_live[None, :], other=0.0)
                part = tl.dot(tl.trans(g_in), h, input_precision=PRECISION)  # (BV, BK)
                tl.atomic_add(dw_ptr + cols[:, None].to(tl.int64) * size + kk[None, :], part,
                              mask=col_live[:, None] & k_live[None, :])
