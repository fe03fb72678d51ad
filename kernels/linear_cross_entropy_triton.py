"""The Triton kernels of `linear_cross_entropy` (kept apart so that importing fastjudge.kernels imports no
Triton). Shapes and designs: the docstring of linear_cross_entropy.py."""

import triton
import triton.language as tl


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
