"""Host-side pieces the flash-attention kernels share: launch tiles, the argument checks of the two decoding
functions and the split-K (flash-decoding) frame they both run in. Private to fastjudge.kernels."""

from __future__ import annotations

import contextlib
import os

import torch

BACKENDS = ("auto", "triton", "torch")
# The decoding kernels' (cross_attention_decode's and shared_prefix_decode_attention's) key tile, warps and stages
# on a GPU for 16-bit inputs: "base" the default, the others candidates that `bench/cross_attention.py
# --decode-tiles` times beside it (docs/performance.md). Their query rows are the G x n rows of a K/V head (at
# most 64 a block).
DECODE_TILE_PRESETS = {"base": (64, 4, 3), "keys-128": (128, 4, 3), "warps-8": (64, 8, 3), "stages-4": (64, 4, 4)}
DECODE_TILES = DECODE_TILE_PRESETS["base"]


@contextlib.contextmanager
def decode_tiles(preset: str):
    """Within the block, the decoding kernels take DECODE_TILE_PRESETS[preset] (benches and tests time and check
    the candidates with it); the previous tiles come back after it."""
    global DECODE_TILES
    if preset not in DECODE_TILE_PRESETS:
        raise ValueError(f"preset: expected one of {tuple(DECODE_TILE_PRESETS)}, got {preset!r}")
    previous, DECODE_TILES = DECODE_TILES, DECODE_TILE_PRESETS[preset]
    try:
        yield
    finally:
        DECODE_TILES = previous


def on_gpu(q: torch.Tensor) -> bool:
    return q.is_cuda and os.environ.get("TRITON_INTERPRET") != "1"


def gpu_tiles_apply(q: torch.Tensor) -> bool:
    """Whether the GPU presets (GPU_TILES, DECODE_TILES) apply: compiled kernels, 16-bit inputs (float32 tiles
    take twice the shared memory: they keep launch_config's)."""
    return on_gpu(q) and q.element_size() == 2


def launch_config(q: torch.Tensor) -> dict:
    """The decoding kernels' tiles, and the head-size block and dot precision every kernel takes."""
    size = q.shape[-1]
    block_d = max(16, 1 << (size - 1).bit_length())
    blocks = dict(BLOCK_M=64, BLOCK_N=64) if on_gpu(q) else dict(BLOCK_M=16, BLOCK_N=16)
    return dict(blocks, BLOCK_D=block_d, PRECISION="ieee" if q.dtype == torch.float32 else "tf32")


def decode_splits(programs: int, keys: int, block: int, device: torch.device, program_bytes: int) -> int:
    """Key splits per (prompt, K/V head, row block) for decoding (`programs` of them without splits): as many
    programs as the multiprocessors' shared memory holds at once (`program_bytes` each), so that they run in one
    wave (a second, partial wave would double the time), at least one key tile each."""
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        per_processor = getattr(properties, "shared_memory_per_multiprocessor", 228 * 1024)  # Hopper's 228 KB
        # the driver reserves 1 KB of shared memory per resident program
        slots = properties.multi_processor_count * max(1, per_processor // (program_bytes + 1024))
    else:
        slots = 8  # the interpreter: a few splits, so that the tests combine several
    return max(1, min(slots // max(programs, 1), -(-keys // block)))


def check_decode_arguments(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, names: tuple[str, str],
                             backend: str, splits: int | None) -> None:
    """The checks both decoding functions make (names: what they call k and v), ValueError naming the argument."""
    if q.dim() != 4 or k.dim() != 4 or k.shape[0] != q.shape[0] or k.shape[3] != q.shape[3] \
            or q.shape[1] % max(k.shape[1], 1):
        raise ValueError(f"q, {names[0]}: expected (B, Hq, n, D) and (B, Hkv dividing Hq, S, D), got "
                         f"{tuple(q.shape)} and {tuple(k.shape)}")
    if v.shape != k.shape:
        raise ValueError(f"{names[1]}: expected the shape of {names[0]}, {tuple(k.shape)}, got {tuple(v.shape)}")
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    if splits is not None and splits < 1:
        raise ValueError(f"splits: expected >= 1, got {splits}")


def split_decode(q: torch.Tensor, kv_heads: int, columns: int, splits: int | None, launch) -> torch.Tensor:
    """The frame both decoding kernels share (flash-decoding): q (B, Hq, n, D) contiguous, whose G query heads
    of a K/V head and n samples are the R = G * n rows of (prompt, K/V head), split into row blocks; `columns`
    keys split in chunks over programs. `launch(grid, parts, stats, rows, splits, chunk, blocks)` runs the split
    kernel, which writes each chunk's partial output and row statistics; the combine kernel then merges them.
    Returns (B, Hq, n, D) in q's dtype."""
    from fastjudge.kernels import _flash_triton
    batch, heads, samples, size = q.shape
    config = launch_config(q)
    launch_options = {}
    if gpu_tiles_apply(q):
        config["BLOCK_N"], warps, stages = DECODE_TILES
        launch_options = dict(num_warps=warps, num_stages=stages)
    rows = (heads // kv_heads) * samples
    block_m = min(64, max(16, 1 << (rows - 1).bit_length()))  # more rows: several row blocks
    row_blocks = -(-rows // block_m)
    # shared memory of a program: its queries, and K and V tiles for each pipeline stage (Triton's default 3)
    stages = launch_options.get("num_stages", 3)
    program_bytes = q.element_size() * config["BLOCK_D"] * (block_m + 2 * stages * config["BLOCK_N"])
    splits = splits or decode_splits(batch * kv_heads * row_blocks, columns, config["BLOCK_N"], q.device,
                                      program_bytes)
    chunk = -(-max(columns, 1) // splits)
    parts = torch.empty(batch * kv_heads, splits, rows, size, dtype=torch.float32, device=q.device)
    stats = torch.empty(batch * kv_heads, splits, 2, rows, dtype=torch.float32, device=q.device)
    out = torch.empty_like(q)
    launch((splits, batch * kv_heads, row_blocks), parts, stats, rows, splits, chunk,
           dict(BLOCK_M=block_m, BLOCK_N=config["BLOCK_N"], BLOCK_D=config["BLOCK_D"],
                PRECISION=config["PRECISION"], **launch_options))
    _flash_triton.decode_combine_kernel[(batch * kv_heads, row_blocks)](
        parts, stats, out, rows, size, splits, BLOCK_M=block_m, BLOCK_D=config["BLOCK_D"])
    return out

