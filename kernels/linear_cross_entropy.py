"""Fused linear cross-entropy: loss = cross_entropy(hidden @ weight.T + bias, target) without the (N, V) logits.

Shapes: N tokens, H hidden size, V vocabulary; a block is Nc rows x Vc vocabulary columns of the logits.

The design: chunked matrix products (cuBLAS through torch) with two fused Triton kernels over each logits
block (linear_cross_entropy_triton.py): `block_stats_kernel` folds a block into each row's running max and
sum of exponentials (an online log-sum-exp across vocabulary blocks) and picks the target's logit;
`block_grad_kernel` overwrites the block in place with the gradient of the loss over the logits,
(softmax - (1 - eps) onehot - eps / V) * the row's scale. Two orders of the blocks, both exact:
- "rows" (the default): row chunks of 1024 over the whole vocabulary (a block is 1024 x V: 263 MB in bf16 for
  Llama 3); the forward pass computes the gradients at once (6 N H V FLOPs, the floor), accumulating dweight
  over the chunks, and the backward pass scales them, in place, by the incoming gradient. Each chunk reads and
  writes all of dweight, which is why chunks must not be small.
- "vocab": all rows, vocabulary blocks of about H columns (a block holds as many elements as `hidden`, the
  memory of Liger-Kernel's chunking). The forward pass computes each row's log-sum-exp; the backward pass
  makes each block again, turns it into its gradient, writes dweight[block] = G.T @ hidden once and adds
  G @ weight[block] to dhidden: 8 N H V FLOPs.
"rows" is the default because it timed fastest on an H200 (bf16, H 4096, V 128256; bench/flce.py; the
standing figures and their result files are in docs/performance.md). A third design, logits only as on-chip
tiles with float32 atomics for dweight (Cut Cross-Entropy's layout), timed far slower and was dropped (commit
7905f7e has it).

Ignored rows (target == ignore_index) are dropped before the matrix products: that needs their count on the
host, one synchronization per call (`drop_ignored=False` keeps every row, with no synchronization, at the
cost of their share of the products). The kernels compute in float32; a block holds the input dtype (as the
matrix product writes it); dweight and dhidden accumulate in the parameters' dtype, dbias in float32.

`fused_linear_cross_entropy_reference` is the plain-PyTorch chunked reference (the CPU path, the test oracle
and the benchmark baseline): F.cross_entropy over row chunks, each recomputed in backward (checkpoint).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

REDUCTIONS = ("mean", "sum", "none")
BACKENDS = ("auto", "triton", "torch")
DESIGNS = ("rows", "vocab")
DEFAULT_CHUNK_ROWS = 1024  # "rows": 1024 x 128,256 bf16 logits are 263 MB

def _kernels():
    """The chunked designs' Triton kernels (imported on first use: the CPU driver never imports triton)."""
    from fastjudge.kernels import linear_cross_entropy_triton as kernels
    return kernels.block_stats_kernel, kernels.block_grad_kernel


def _launch(block: torch.Tensor) -> tuple[int, int, int]:
    """(rows per program, BLOCK, grid): one row per program on a GPU; under the interpreter many rows at once
    (numpy then does them together: a program instance costs about 0.5 ms there)."""
    import os
    rows, cols = block.shape
    if block.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        per_program, width = 1, min(1024, max(16, 1 << (cols - 1).bit_length()))
    else:
        per_program, width = 16, 256
    return per_program, width, -(-rows // per_program)


def _stats(block, target, running, col0, smoothing):
    """Fold a logits block (Nc, Vc) into running (4, Nc) float32 (`_new_statistics`), rows contiguous."""
    stats_kernel, _ = _kernels()
    per_program, width, grid = _launch(block)
    stats_kernel[(grid,)](block, block.stride(0), block.shape[0], block.shape[1], col0, target, *running,
                          ROWS=per_program, BLOCK=width, SMOOTH=smoothing > 0)


def _to_grad(block, target, lse, scale, col0, vocab, smoothing):
    """Overwrite a logits block (Nc, Vc) with its gradient (see `_block_grad_kernel`)."""
    _, grad_kernel = _kernels()
    per_program, width, grid = _launch(block)
    grad_kernel[(grid,)](block, block.stride(0), block.shape[0], block.shape[1], col0, target, lse, scale,
                         vocab, float(smoothing), ROWS=per_program, BLOCK=width)


def _logits(hidden, weight, bias, c0, c1):
    """(Nc, c1 - c0) logits of vocabulary columns [c0, c1), in hidden's dtype."""
    w = weight[c0:c1]
    return hidden @ w.t() if bias is None else torch.addmm(bias[c0:c1].to(hidden.dtype), hidden, w.t())


def _spans(total: int, size: int):
    return [(start, min(start + size, total)) for start in range(0, total, size)]


def _loss_rows(lse, picked, total, valid, vocab, smoothing):
    """(N,) float32: lse - (1 - eps) x_target - eps / V sum_j x_j, 0 for ignored rows."""
    loss = lse - (1.0 - smoothing) * picked
    if smoothing > 0:
        loss = loss - smoothing / vocab * total
    return torch.where(valid, loss, torch.zeros_like(loss))


def _new_statistics(rows: int, device) -> torch.Tensor:
    """(4, N) float32, what `_stats` folds blocks into: each row's running max (from -inf), sum of
    exponentials, target logit and logit sum (from 0). Row n's log-sum-exp is then max + log(sum)."""
    stats = torch.zeros(4, rows, dtype=torch.float32, device=device)
    stats[0] = -float("inf")
    return stats


def _zero_gradients(hidden, weight, need):
    """(dhidden, dweight, dbias float32) zeros for the flags need = (hidden, weight, bias), None elsewhere."""
    return (torch.zeros_like(hidden) if need[0] else None, torch.zeros_like(weight) if need[1] else None,
            torch.zeros(weight.shape[0], dtype=torch.float32, device=hidden.device) if need[2] else None)


def _row_statistics(hidden, weight, bias, target, chunk_rows, chunk_vocab, smoothing):
    """Each row's log-sum-exp, target logit and logit sum over the whole vocabulary, by blocks: (N,) x 3."""
    rows, vocab = hidden.shape[0], weight.shape[0]
    stats = _new_statistics(rows, hidden.device)
    for r0, r1 in _spans(rows, chunk_rows):
        for c0, c1 in _spans(vocab, chunk_vocab):
            block = _logits(hidden[r0:r1], weight, bias, c0, c1)
            _stats(block, target[r0:r1], stats[:, r0:r1], c0, smoothing)
    return stats[0] + stats[1].log(), stats[2], stats[3]


def _gradients(hidden, weight, bias, target, lse, scale, chunk_rows, chunk_vocab, smoothing, need):
    """(dhidden, dweight, dbias) by blocks, each block's gradient made from its logits again; `scale` (N,)
    float32 multiplies row n's gradient; need = (hidden, weight, bias) flags."""
    rows, vocab = hidden.shape[0], weight.shape[0]
    dhidden, dweight, dbias = _zero_gradients(hidden, weight, need)
    for r0, r1 in _spans(rows, chunk_rows):
        h = hidden[r0:r1]
        for c0, c1 in _spans(vocab, chunk_vocab):
            block = _logits(h, weight, bias, c0, c1)
            _to_grad(block, target[r0:r1], lse[r0:r1], scale[r0:r1], c0, vocab, smoothing)
            if dhidden is not None:
                dhidden[r0:r1].addmm_(block, weight[c0:c1])
            if dweight is not None:
                dweight[c0:c1].addmm_(block.t().to(weight.dtype), h.to(weight.dtype))
            if dbias is not None:
                dbias[c0:c1] += block.sum(0, dtype=torch.float32)
    return dhidden, dweight, dbias


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, target, ignore_index, reduction, smoothing, order, chunk_rows,
                chunk_vocab, drop_ignored):
        rows_all, vocab = hidden.shape[0], weight.shape[0]
        valid_all = target != ignore_index
        index = None
        if drop_ignored:  # one host synchronization: the number of rows left sizes the matrix products
            index = valid_all.nonzero().flatten()
            hidden, target = hidden[index], target[index]
        valid = target != ignore_index
        safe_target = torch.where(valid, target, torch.full_like(target, -1))  # matches no column
        count = valid.sum()
        rows = hidden.shape[0]
        need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2])
        eager = order == "rows" and reduction != "none" and any(need)
        if order == "rows":
            chunk_vocab = vocab
        chunk_rows, chunk_vocab = max(1, min(chunk_rows, max(rows, 1))), max(1, min(chunk_vocab, vocab))
        if eager:  # rows whole-vocabulary blocks: the gradients now, scaled in backward
            scale = valid.float() / count.clamp(min=1) if reduction == "mean" else valid.float()
            lse, picked, total = _eager(hidden, weight, bias, safe_target, scale, chunk_rows, smoothing, need, ctx)
        else:
            lse, picked, total = _row_statistics(hidden, weight, bias, safe_target, chunk_rows, chunk_vocab,
                                                 smoothing)
        loss_rows = _loss_rows(lse, picked, total, valid, vocab, smoothing)
        if reduction == "none":
            loss = loss_rows if index is None else \
                torch.zeros(rows_all, dtype=torch.float32, device=hidden.device).index_copy(0, index, loss_rows)
        elif reduction == "sum":
            loss = loss_rows.sum()
        else:  # all rows ignored: 0, not NaN
            loss = loss_rows.sum() / count.clamp(min=1)
        ctx.settings = (reduction, smoothing, chunk_rows, chunk_vocab, eager, rows_all, need, bias is not None)
        ctx.save_for_backward(hidden, weight, bias, safe_target, lse, valid, count,
                              index if index is not None else torch.empty(0, dtype=torch.long))
        ctx.dropped = index is not None
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        hidden, weight, bias, target, lse, valid, count, index = ctx.saved_tensors
        reduction, smoothing, chunk_rows, chunk_vocab, eager, rows_all, need, has_bias = ctx.settings
        grad_loss = grad_loss.float()
        if eager:  # scaled in place: a scaled copy of dweight would double its memory
            dhidden, dweight, dbias = (g.mul_(grad_loss.to(g.dtype)) if g is not None else None
                                       for g in ctx.eager_grads)
            ctx.eager_grads = None
        else:
            if reduction == "none":
                scale = grad_loss if not ctx.dropped else grad_loss[index]
                scale = torch.where(valid, scale, torch.zeros_like(scale))
            else:
                scale = valid.float() * grad_loss
                if reduction == "mean":
                    scale = scale / count.clamp(min=1)
            dhidden, dweight, dbias = _gradients(hidden, weight, bias, target, lse, scale, chunk_rows, chunk_vocab,
                                                 smoothing, need)
        if dhidden is not None and ctx.dropped:
            dhidden = torch.zeros(rows_all, hidden.shape[1], dtype=hidden.dtype,
                                  device=hidden.device).index_copy(0, index, dhidden)
        if dbias is not None:
            dbias = dbias.to(bias.dtype)
        return dhidden, dweight, dbias, None, None, None, None, None, None, None, None


def _eager(hidden, weight, bias, target, scale, chunk_rows, smoothing, need, ctx):
    """The "rows" order: per chunk of rows, the whole-vocabulary block's statistics, then its gradient in place,
    then the products. Keeps the gradients on ctx (scaled by the incoming gradient in backward)."""
    rows, vocab = hidden.shape[0], weight.shape[0]
    dhidden, dweight, dbias = _zero_gradients(hidden, weight, need)
    stats = _new_statistics(rows, hidden.device)
    lse = torch.empty(rows, dtype=torch.float32, device=hidden.device)
    for r0, r1 in _spans(rows, chunk_rows):
        h = hidden[r0:r1]
        block = _logits(h, weight, bias, 0, vocab)  # (Nc, V)
        _stats(block, target[r0:r1], stats[:, r0:r1], 0, smoothing)
        lse[r0:r1] = stats[0, r0:r1] + stats[1, r0:r1].log()
        _to_grad(block, target[r0:r1], lse[r0:r1], scale[r0:r1], 0, vocab, smoothing)
        if dhidden is not None:
            torch.mm(block, weight, out=dhidden[r0:r1])
        if dweight is not None:
            dweight.addmm_(block.t().to(weight.dtype), h.to(weight.dtype))
        if dbias is not None:
            dbias += block.sum(0, dtype=torch.float32)
    ctx.eager_grads = (dhidden, dweight, dbias)
    return lse, stats[2], stats[3]


def _check(hidden, weight, target, bias, ignore_index, reduction, label_smoothing, backend, design):
    if hidden.dim() != 2:
        raise ValueError(f"hidden: expected (N, H), got {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"weight: expected (V, H={hidden.shape[1]}), got {tuple(weight.shape)}")
    if target.shape != (hidden.shape[0],):
        raise ValueError(f"target: expected ({hidden.shape[0]},), got {tuple(target.shape)}")
    if target.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"target: expected int64 or int32 class indices, got {target.dtype}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias: expected ({weight.shape[0]},), got {tuple(bias.shape)}")
    if hidden.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"hidden: expected float32, bfloat16 or float16, got {hidden.dtype}")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"weight: expected hidden's dtype {hidden.dtype}, got {weight.dtype}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction: expected one of {REDUCTIONS}, got {reduction!r}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing: expected in [0, 1], got {label_smoothing}")
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    if design not in DESIGNS:
        raise ValueError(f"design: expected one of {DESIGNS}, got {design!r}")


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, *,
                               bias: torch.Tensor | None = None, ignore_index: int = -100,
                               reduction: str = "mean", label_smoothing: float = 0.0, backend: str = "auto",
                               design: str = "rows", chunk_rows: int | None = None,
                               chunk_vocab: int | None = None, drop_ignored: bool = True) -> torch.Tensor:
    """cross_entropy(hidden @ weight.T + bias, target) without materializing the (N, V) logits.

    Args:
        hidden: (N, H) float32, bfloat16 or float16.
        weight: (V, H), same dtype family (the output layer).
        target: (N,) int64 class indices; `ignore_index` rows count for nothing.
        bias: optional (V,).
        reduction: "mean" (over the rows not ignored; 0 when all are), "sum" or "none" ((N,) float32).
        label_smoothing: as `torch.nn.functional.cross_entropy(label_smoothing=...)`.
        backend: "auto" (Triton on CUDA, the torch reference elsewhere), "triton" (the kernels wherever Triton
            runs, the CPU interpreter included), "torch" (`fused_linear_cross_entropy_reference`).
        design: "rows" (row chunks over the whole vocabulary, the gradients made in the forward pass; the
            faster) or "vocab" (all rows, vocabulary blocks, the logits made twice; about Liger's memory). See
            the module docstring.
        chunk_rows, chunk_vocab: the block size; default: "rows" 1024 rows x V (timed fastest on an
            H200: docs/performance.md); "vocab" all rows x H columns (rounded up to 256).
        drop_ignored: drop ignored rows before the products (one host synchronization) or keep them.
    Returns:
        The loss, float32 whatever the inputs' dtype: a scalar (mean, sum) or (N,) (none). Differentiable in
        hidden, weight and bias.
    Raises:
        ValueError: a bad shape, dtype or option (the message names the argument).
    """
    _check(hidden, weight, target, bias, ignore_index, reduction, label_smoothing, backend, design)
    use_triton = backend == "triton" or (backend == "auto" and hidden.is_cuda)
    if not use_triton:
        return fused_linear_cross_entropy_reference(hidden, weight, target, bias=bias, ignore_index=ignore_index,
                                                    reduction=reduction, label_smoothing=label_smoothing,
                                                    chunk_rows=chunk_rows)
    rows, size = hidden.shape
    if chunk_vocab is None:
        chunk_vocab = -(-size // 256) * 256
    if chunk_rows is None:
        chunk_rows = rows if design == "vocab" else DEFAULT_CHUNK_ROWS
    if chunk_rows < 1 or chunk_vocab < 1:
        raise ValueError(f"chunk_rows, chunk_vocab: expected >= 1, got {chunk_rows}, {chunk_vocab}")
    return _FusedLinearCrossEntropy.apply(hidden, weight, bias, target, ignore_index, reduction,
                                          float(label_smoothing), design, chunk_rows, chunk_vocab, drop_ignored)


def fused_linear_cross_entropy_reference(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, *,
                                         bias: torch.Tensor | None = None, ignore_index: int = -100,
                                         reduction: str = "mean", label_smoothing: float = 0.0,
                                         chunk_rows: int | None = None) -> torch.Tensor:
    """The plain-PyTorch chunked reference: F.cross_entropy on float32 logits of `chunk_rows` rows at a time
    (default: a block the size of `hidden`, or 2^24 logits if that is more), each chunk recomputed in backward
    (activation checkpointing), so at most one chunk's logits exist at once. Same arguments and result as
    `fused_linear_cross_entropy`."""
    rows, size = hidden.shape
    vocab = weight.shape[0]
    # a block the size of `hidden`, but at least 2^24 logits (64 MB in float32): small vocabularies in one go
    chunk_rows = chunk_rows or max(1, rows * size // vocab, 2 ** 24 // vocab)
    valid = target != ignore_index

    def chunk_loss(h, t, w, b):
        logits = F.linear(h, w, b).float()
        return F.cross_entropy(logits, t, ignore_index=ignore_index, reduction="none",
                               label_smoothing=label_smoothing)

    parts = []
    for r0, r1 in _spans(rows, chunk_rows):
        args = (hidden[r0:r1], target[r0:r1], weight, bias)
        needs = torch.is_grad_enabled() and any(a is not None and a.requires_grad for a in args)
        parts.append(checkpoint(chunk_loss, *args, use_reentrant=False) if needs else chunk_loss(*args))
    loss_rows = torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)
    if reduction == "none":
        return loss_rows
    total = loss_rows.sum()
    return total / valid.sum().clamp(min=1) if reduction == "mean" else total
