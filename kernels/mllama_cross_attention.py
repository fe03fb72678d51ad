"""Mllama's vision cross-attention as flash attention over key ranges (training, prefill and decoding).

Shapes: B batch, Hq query heads in Hkv groups of G = Hq / Hkv (GQA: K and V are never repeated), T query rows,
S keys (an image's tiles x patches; the processor pads to 4 tiles), D head size.

Each query row (b, t) sees one contiguous run of keys, [key_start[b, t], key_end[b, t]): a text token sees the
valid tiles of the images before it, which are contiguous, and padded tiles fall outside the range, so they
are skipped rather than masked; no dense (B, 1, T, S) mask is built. Rows that see no key (text before the
`<|image|>` token) follow `masked_rows`:
- "hf": as transformers, which resets their mask to zeros: they attend to all S keys, padded tiles included
  (transformers then zeroes the layer's MLP output for them, outside this function);
- "zero": as Meta's reference: their output is 0 (and they add nothing to the gradients).

`cross_attention_reference` is the plain-PyTorch reference (a dense mask, softmax in float32 or float64): the
CPU path, the test oracle and the benchmark baseline. `cross_attention` runs the Triton kernels
(mllama_cross_attention_triton.py): a forward pass that keeps each row's log-sum-exp, and a backward pass as flash
attention's (rowsum(dO * O) by a small kernel; dQ per query block; dK, dV per key block summed over the G heads
that share them), each kernel with its own tiles on a GPU (GPU_TILES). Decoding needs
nothing special: the n samples of an image are n query rows with the same range, so each query block reads the
image's keys once for all of them.
"""

from __future__ import annotations

import contextlib

import torch

from fastjudge.kernels import _flash
from fastjudge.kernels._flash import (BACKENDS, check_decode_arguments, gpu_tiles_apply, launch_config,
                                      split_decode)
from fastjudge.kernels._flash import DECODE_TILE_PRESETS  # noqa: F401 (the decoding presets, beside TILE_PRESETS)

MASKED_ROWS = ("hf", "zero")


def _row_ranges(key_start: torch.Tensor, key_end: torch.Tensor, keys: int, masked_rows: str):
    """(start, end) int32 (B, T) with the masked-row rule applied: "hf" rows see every key."""
    start, end = key_start.to(torch.int32), key_end.to(torch.int32)
    if masked_rows == "hf":
        empty = start >= end
        start = torch.where(empty, torch.zeros_like(start), start)
        end = torch.where(empty, torch.full_like(end, keys), end)
    return start.contiguous(), end.contiguous()


def cross_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_start: torch.Tensor,
                              key_end: torch.Tensor, *, scale: float | None = None,
                              masked_rows: str = "hf") -> torch.Tensor:
    """The plain-PyTorch reference: a dense mask from the ranges, K/V repeated to Hq heads, softmax in float32
    (or the inputs' dtype if wider). Same arguments and result as `cross_attention`."""
    batch, heads, rows, size = q.shape
    keys = k.shape[2]
    group = heads // k.shape[1]
    scale = size ** -0.5 if scale is None else scale
    start, end = _row_ranges(key_start, key_end, keys, masked_rows)
    columns = torch.arange(keys, device=q.device)
    seen = (columns >= start[..., None].long()) & (columns < end[..., None].long())  # (B, T, S)
    compute = torch.promote_types(q.dtype, torch.float32)
    k_full = k.repeat_interleave(group, dim=1).to(compute)
    v_full = v.repeat_interleave(group, dim=1).to(compute)
    scores = torch.einsum("bhtd,bhsd->bhts", q.to(compute), k_full) * scale
    scores = scores.masked_fill(~seen[:, None], float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    weights = torch.where(seen.any(-1)[:, None, :, None], weights, torch.zeros_like(weights))  # no NaN rows
    return torch.einsum("bhts,bhsd->bhtd", weights, v_full).to(q.dtype)


def _block_ranges(start: torch.Tensor, end: torch.Tensor, block: int):
    """(lo, hi) int32 (B, blocks of T): the union of the rows' ranges in each query block (0, 0 if empty)."""
    batch, rows = start.shape
    blocks = -(-rows // block)
    pad = blocks * block - rows
    empty = start >= end
    lo = torch.where(empty, torch.full_like(start, 2 ** 30), start)
    hi = torch.where(empty, torch.zeros_like(end), end)
    lo = torch.nn.functional.pad(lo, (0, pad), value=2 ** 30).view(batch, blocks, block).amin(-1)
    hi = torch.nn.functional.pad(hi, (0, pad), value=0).view(batch, blocks, block).amax(-1)
    lo = torch.where(hi > 0, lo, torch.zeros_like(lo))
    return lo.to(torch.int32).contiguous(), hi.to(torch.int32).contiguous(), blocks


# The training kernels' tiles on a GPU, per kernel: (BLOCK_M query rows, BLOCK_N keys, num_warps, num_stages).
# "base" is the preset timed on an H200 (Triton's default warps and stages), but for dK/dV at 2 stages:
# its loop is pipelined since (bench/kernel_resources.py: at 3 stages only one program fits a multiprocessor, at 2
# two, as before). The others are candidates from Hopper flash-attention practice (128-row forward blocks over 8
# warps; dK/dV over 128-key blocks with short query steps, dQ over 128-row blocks, as in Triton's fused-attention
# tutorial) that `bench/cross_attention.py --tile-presets` times beside "base" in one run; GPU_TILES is the one
# used. The interpreter takes 16 x 16 tiles.
TILE_PRESETS = {
    "base": {"forward": (64, 64, 4, 3), "dq": (64, 64, 4, 3), "dkv": (64, 64, 4, 2)},
    "dkv-3-stages": {"forward": (64, 64, 4, 3), "dq": (64, 64, 4, 3), "dkv": (64, 64, 4, 3)},
    "forward-128": {"forward": (128, 64, 8, 3), "dq": (64, 64, 4, 3), "dkv": (64, 64, 4, 2)},
    "backward-wide": {"forward": (64, 64, 4, 3), "dq": (128, 64, 8, 2), "dkv": (32, 128, 8, 2)},
    "wide": {"forward": (128, 64, 8, 3), "dq": (128, 64, 8, 2), "dkv": (32, 128, 8, 2)},
    "stages-4": {"forward": (64, 64, 4, 4), "dq": (64, 64, 4, 4), "dkv": (64, 64, 4, 4)},
    "dq-32": {"forward": (64, 64, 4, 3), "dq": (64, 32, 4, 3), "dkv": (64, 64, 4, 2)},  # two dQ programs a processor
}
GPU_TILES = TILE_PRESETS["base"]


@contextlib.contextmanager
def tile_presets(training: str = "base", decode: str = "base"):
    """Within the block, the training kernels take TILE_PRESETS[training] and the decoding kernels
    DECODE_TILE_PRESETS[decode] (`bench/cross_attention.py` times the candidates with it); the previous tiles
    come back after it."""
    global GPU_TILES
    if training not in TILE_PRESETS:
        raise ValueError(f"training: expected one of {tuple(TILE_PRESETS)}, got {training!r}")
    previous, GPU_TILES = GPU_TILES, TILE_PRESETS[training]
    try:
        with _flash.decode_tiles(decode):
            yield
    finally:
        GPU_TILES = previous


def _training_tiles(q: torch.Tensor, kernel: str) -> dict:
    """Launch arguments of training kernel `kernel` ("forward", "dq", "dkv"): launch_config's, with GPU_TILES' tiles,
    warps and stages where they apply (gpu_tiles_apply)."""
    config = launch_config(q)
    if gpu_tiles_apply(q):
        block_m, block_n, warps, stages = GPU_TILES[kernel]
        config.update(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages)
    return config


class _CrossAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, start, end, scale):
        from fastjudge.kernels import mllama_cross_attention_triton as kernels
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        batch, heads, rows, size = q.shape
        keys, group = k.shape[2], heads // k.shape[1]
        config = _training_tiles(q, "forward")
        lo, hi, blocks = _block_ranges(start, end, config["BLOCK_M"])
        out = torch.empty_like(q)
        lse = torch.empty(batch, heads, rows, dtype=torch.float32, device=q.device)
        if rows and keys:
            kernels.cross_attention_forward_kernel[(blocks, batch * heads)](
                q, k, v, out, lse, start, end, lo, hi, rows, keys, size, heads, group, blocks, scale, **config)
        else:
            out.zero_()
        ctx.save_for_backward(q, k, v, out, lse, start, end, lo, hi)
        ctx.scale, ctx.block_m = scale, config["BLOCK_M"]
        return out

    @staticmethod
    def backward(ctx, grad_out):
        from fastjudge.kernels import mllama_cross_attention_triton as kernels
        q, k, v, out, lse, start, end, lo, hi = ctx.saved_tensors
        scale = ctx.scale
        ranges = {ctx.block_m: (lo, hi, -(-q.shape[2] // ctx.block_m))}  # (lo, hi, blocks) per BLOCK_M

        def block_ranges(block_m):  # the forward's where the kernel's query blocks are the same (all of "base")
            if block_m not in ranges:
                ranges[block_m] = _block_ranges(start, end, block_m)
            return ranges[block_m]
        batch, heads, rows, size = q.shape
        keys, group = k.shape[2], heads // k.shape[1]
        if not (rows and keys):
            return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v), None, None, None
        grad_out = grad_out.contiguous()
        config = launch_config(q)
        delta = torch.empty(batch, heads, rows, dtype=torch.float32, device=q.device)  # rowsum(dO * O)
        kernels.cross_attention_delta_kernel[(-(-batch * heads * rows // config["BLOCK_M"]),)](
            out, grad_out, delta, batch * heads * rows, size, BLOCK_M=config["BLOCK_M"], BLOCK_D=config["BLOCK_D"])
        # every query block writes its rows of dQ and every key block its keys of dK and dV: no zero fill
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        config = _training_tiles(q, "dq")
        lo, hi, blocks = block_ranges(config["BLOCK_M"])
        kernels.cross_attention_dq_kernel[(blocks, batch * heads)](
            q, k, v, grad_out, lse, delta, dq, start, end, lo, hi, rows, keys, size, heads, group, blocks, scale,
            **config)
        config = _training_tiles(q, "dkv")
        lo, hi, blocks = block_ranges(config["BLOCK_M"])
        kernels.cross_attention_dkv_kernel[(-(-keys // config["BLOCK_N"]), batch * k.shape[1])](
            q, k, v, grad_out, lse, delta, dk, dv, start, end, lo, hi, rows, keys, size, heads, group, blocks, scale,
            **config)
        return dq, dk, dv, None, None, None


def cross_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_start: torch.Tensor,
                    key_end: torch.Tensor, *, scale: float | None = None, masked_rows: str = "hf",
                    backend: str = "auto") -> torch.Tensor:
    """Attention of each query row over its own contiguous run of keys.

    Args:
        q: (B, Hq, T, D) queries; k, v: (B, Hkv, S, D) with Hq a multiple of Hkv (GQA).
        key_start, key_end: (B, T) integer: row t of batch b sees keys [key_start, key_end); empty when
            key_start >= key_end (see `masked_rows`).
        scale: the score scale (default D ** -0.5).
        masked_rows: "hf" (rows that see no key attend to all S keys, as transformers) or "zero" (their
            output is 0, as Meta's reference).
        backend: "auto" (Triton on CUDA, the reference elsewhere), "triton" (the kernels wherever Triton
            runs, the CPU interpreter included), "torch" (`cross_attention_reference`).
    Returns:
        (B, Hq, T, D) in q's dtype; differentiable in q, k and v.
    Raises:
        ValueError: a bad shape or option (the message names the argument).
    """
    if q.dim() != 4:
        raise ValueError(f"q: expected (B, Hq, T, D), got {tuple(q.shape)}")
    batch, heads, rows, size = q.shape
    if k.dim() != 4 or k.shape[0] != batch or k.shape[3] != size or heads % max(k.shape[1], 1):
        raise ValueError(f"k: expected (B={batch}, Hkv dividing {heads}, S, D={size}), got {tuple(k.shape)}")
    if v.shape != k.shape:
        raise ValueError(f"v: expected k's shape {tuple(k.shape)}, got {tuple(v.shape)}")
    for name, tensor in (("key_start", key_start), ("key_end", key_end)):
        if tensor.shape != (batch, rows):
            raise ValueError(f"{name}: expected ({batch}, {rows}), got {tuple(tensor.shape)}")
    if masked_rows not in MASKED_ROWS:
        raise ValueError(f"masked_rows: expected one of {MASKED_ROWS}, got {masked_rows!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    scale = size ** -0.5 if scale is None else float(scale)
    if backend == "torch" or (backend == "auto" and not q.is_cuda):
        return cross_attention_reference(q, k, v, key_start, key_end, scale=scale, masked_rows=masked_rows)
    start, end = _row_ranges(key_start, key_end, k.shape[2], masked_rows)
    end = torch.minimum(end, torch.full_like(end, k.shape[2]))
    return _CrossAttention.apply(q, k, v, start, end, scale)


def cross_attention_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_start: torch.Tensor,
                           key_end: torch.Tensor, *, scale: float | None = None, backend: str = "auto",
                           splits: int | None = None) -> torch.Tensor:
    """Decoding over a shared image: the n samples of each of B prompts, one query each, over the prompt's key
    range, read once for all of them. The G query heads that share a K/V head and the n samples become the
    G * n rows of one matrix product per (prompt, K/V head); the keys are split in chunks over programs
    (flash-decoding) and the chunks' softmax statistics merged by a second kernel. No gradient.

    Args:
        q: (B, Hq, n, D); k, v: (B, Hkv, S, D) with Hq a multiple of Hkv.
        key_start, key_end: (B,) integer: every sample of prompt b sees keys [key_start[b], key_end[b]); an empty
            range gives 0 (a caller that follows transformers passes (0, S) for a prompt that sees no image).
        scale: the score scale (default D ** -0.5).
        backend: "auto" (Triton on CUDA, the reference elsewhere), "triton", "torch" (`cross_attention_reference`).
        splits: key chunks per (prompt, K/V head) (default: enough programs to fill the GPU).
    Returns:
        (B, Hq, n, D) in q's dtype.
    """
    check_decode_arguments(q, k, v, ("k", "v"), backend, splits)
    batch, heads, samples, size = q.shape
    kv_heads, keys = k.shape[1], k.shape[2]
    for name, tensor in (("key_start", key_start), ("key_end", key_end)):
        if tensor.shape != (batch,):
            raise ValueError(f"{name}: expected ({batch},), got {tuple(tensor.shape)}")
        if tensor.device != q.device:  # the kernel would be handed a pointer it cannot read
            raise ValueError(f"{name}: expected on q's device {q.device}, got {tensor.device}")
    scale = size ** -0.5 if scale is None else float(scale)
    if backend == "torch" or (backend == "auto" and not q.is_cuda):
        rows = (batch, samples)
        return cross_attention_reference(q, k, v, key_start[:, None].expand(rows), key_end[:, None].expand(rows),
                                         scale=scale, masked_rows="zero")
    from fastjudge.kernels import mllama_cross_attention_triton as kernels
    q = q.contiguous()  # (B, Hkv, G, n, D) in memory: row j * n + s of K/V head kv is query head kv * G + j
    k, v = k.contiguous(), v.contiguous()
    start = key_start.to(torch.int32).contiguous()
    end = torch.minimum(key_end.to(torch.int32), torch.full_like(start, keys)).contiguous()

    def launch(grid, parts, stats, rows, splits, chunk, blocks):
        kernels.cross_attention_decode_kernel[grid](q, k, v, parts, stats, start, end, rows, keys, size, kv_heads,
                                                    splits, chunk, scale, **blocks)
    return split_decode(q, kv_heads, keys, splits, launch)
