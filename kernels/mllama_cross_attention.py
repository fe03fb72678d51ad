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

import torch
import torch.utils.checkpoint

MASKED_ROWS = ("hf", "zero")
BACKENDS = ("auto", "triton", "torch")


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
# "base" is what the H200 runs of 2026-11-26 timed (Triton's default warps and stages), but for dK/dV at 2 stages:
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
# The decoding kernels' (cross_attention_decode's and shared_prefix_decode_attention's) key tile, warps and stages
# on a GPU for 16-bit inputs: "base" timed on the H200 on 2026-11-26, the others untimed candidates
# (`bench/cross_attention.py --decode-tiles`). Their query rows are the G x n rows of a K/V head (at most 64 a block).
DECODE_TILE_PRESETS = {"base": (64, 4, 3), "keys-128": (128, 4, 3), "warps-8": (64, 8, 3), "stages-4": (64, 4, 4)}
DECODE_TILES = DECODE_TILE_PRESETS["base"]


def _on_gpu(q: torch.Tensor) -> bool:
    import os
    return q.is_cuda and os.environ.get("TRITON_INTERPRET") != "1"


def _gpu_tiles_apply(q: torch.Tensor) -> bool:
    """Whether the GPU presets (GPU_TILES, DECODE_TILES) apply: compiled kernels, 16-bit inputs (float32 tiles
    take twice the shared memory: they keep _config's)."""
    return _on_gpu(q) and q.element_size() == 2


def _config(q: torch.Tensor) -> dict:
    """The decoding kernels' tiles, and the head-size block and dot precision every kernel takes."""
    size = q.shape[-1]
    block_d = max(16, 1 << (size - 1).bit_length())
    blocks = dict(BLOCK_M=64, BLOCK_N=64) if _on_gpu(q) else dict(BLOCK_M=16, BLOCK_N=16)
    return dict(blocks, BLOCK_D=block_d, PRECISION="ieee" if q.dtype == torch.float32 else "tf32")


def _training_tiles(q: torch.Tensor, kernel: str) -> dict:
    """Launch arguments of training kernel `kernel` ("forward", "dq", "dkv"): _config's, with GPU_TILES' tiles,
    warps and stages where they apply (_gpu_tiles_apply)."""
    config = _config(q)
    if _gpu_tiles_apply(q):
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
        config = _config(q)
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


def _decode_splits(programs: int, keys: int, block: int, device: torch.device, program_bytes: int) -> int:
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


def _check_decode_arguments(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, names: tuple[str, str],
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


def _split_decode(q: torch.Tensor, kv_heads: int, columns: int, splits: int | None, launch) -> torch.Tensor:
    """The frame both decoding kernels share (flash-decoding): q (B, Hq, n, D) contiguous, whose G query heads
    of a K/V head and n samples are the R = G * n rows of (prompt, K/V head), split into row blocks; `columns`
    keys split in chunks over programs. `launch(grid, parts, stats, rows, splits, chunk, blocks)` runs the split
    kernel, which writes each chunk's partial output and row statistics; the combine kernel then merges them.
    Returns (B, Hq, n, D) in q's dtype."""
    from fastjudge.kernels import mllama_cross_attention_triton as kernels
    batch, heads, samples, size = q.shape
    config = _config(q)
    launch_options = {}
    if _gpu_tiles_apply(q):
        config["BLOCK_N"], warps, stages = DECODE_TILES
        launch_options = dict(num_warps=warps, num_stages=stages)
    rows = (heads // kv_heads) * samples
    block_m = min(64, max(16, 1 << (rows - 1).bit_length()))  # more rows: several row blocks
    row_blocks = -(-rows // block_m)
    # shared memory of a program: its queries, and K and V tiles for each pipeline stage (Triton's default 3)
    stages = launch_options.get("num_stages", 3)
    program_bytes = q.element_size() * config["BLOCK_D"] * (block_m + 2 * stages * config["BLOCK_N"])
    splits = splits or _decode_splits(batch * kv_heads * row_blocks, columns, config["BLOCK_N"], q.device,
                                      program_bytes)
    chunk = -(-max(columns, 1) // splits)
    parts = torch.empty(batch * kv_heads, splits, rows, size, dtype=torch.float32, device=q.device)
    stats = torch.empty(batch * kv_heads, splits, 2, rows, dtype=torch.float32, device=q.device)
    out = torch.empty_like(q)
    launch((splits, batch * kv_heads, row_blocks), parts, stats, rows, splits, chunk,
           dict(BLOCK_M=block_m, BLOCK_N=config["BLOCK_N"], BLOCK_D=config["BLOCK_D"],
                PRECISION=config["PRECISION"], **launch_options))
    kernels.cross_attention_decode_combine_kernel[(batch * kv_heads, row_blocks)](
        parts, stats, out, rows, size, splits, BLOCK_M=block_m, BLOCK_D=config["BLOCK_D"])
    return out


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
    _check_decode_arguments(q, k, v, ("k", "v"), backend, splits)
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
    return _split_decode(q, kv_heads, keys, splits, launch)


# ---- transformers' Mllama, patched


class _PatchState:
    """What the patched layers of one model share: the key ranges of the current forward call."""

    def __init__(self, masked_rows: str, backend: str, patches: int):
        self.masked_rows, self.backend, self.patches = masked_rows, backend, patches
        self.ranges: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None


def key_ranges(cross_attention_mask: torch.Tensor, patches: int):
    """From transformers' compact mask (B, T, images, tiles) of 0/1 to (start, end, seen), each (B, T): row t
    sees keys [start, end) of the (images x tiles x patches) keys; seen is 1.0 where it sees any. None when some
    row's keys are not one contiguous run (several images with padded tiles between them): transformers' dense
    path must run then."""
    batch, rows = cross_attention_mask.shape[:2]
    valid = cross_attention_mask.reshape(batch, rows, -1) > 0  # (B, T, images * tiles)
    tiles = valid.shape[-1]
    seen = valid.any(dim=-1)
    first = valid.int().argmax(dim=-1)
    last = tiles - 1 - valid.flip(-1).int().argmax(dim=-1)
    contiguous = (valid.sum(dim=-1) == last - first + 1) | ~seen
    if not bool(contiguous.all()):  # one host synchronization per forward call, not per layer
        return None
    start = torch.where(seen, first * patches, torch.zeros_like(first))
    end = torch.where(seen, (last + 1) * patches, torch.zeros_like(last))
    return start.to(torch.int32), end.to(torch.int32), seen


def _current_rows(mask: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """The mask's rows of the tokens this call processes, as transformers takes them: a caller may pass the
    whole mask with a cache (fastjudge's generic decoding; transformers 5.17's generate): rows
    cache_position, else [past, past + tokens)."""
    tokens = next((kwargs[name].shape[1] for name in ("input_ids", "inputs_embeds") if kwargs.get(name) is not None),
                  mask.shape[1])
    if mask.shape[1] == tokens:
        return mask
    position = kwargs.get("cache_position")
    if position is not None:
        return mask[:, position]
    cache = next((kwargs[name] for name in ("cache", "past_key_values") if kwargs.get(name) is not None), None)
    past = int(cache.get_seq_length()) if cache is not None else 0
    return mask[:, past:past + tokens]


def _capture_ranges(state: _PatchState):
    def hook(module, args, kwargs):
        mask = kwargs.get("cross_attention_mask")
        state.ranges = None
        if mask is not None:
            ranges = key_ranges(_current_rows(mask, kwargs), state.patches)
            if ranges is not None:  # transformers builds no dense mask: the patched layers take the ranges
                state.ranges = ranges
                kwargs = dict(kwargs, cross_attention_mask=None)
        return args, kwargs
    return hook


def _patched_cross_layer(layer, state: _PatchState, original):
    """`MllamaCrossAttentionDecoderLayer.forward` with the attention through `cross_attention` (transformers'
    order of operations: norm, attention, gate, norm, MLP zeroed on rows that see no image, gate)."""
    def forward(hidden_states, cross_attention_states=None, cross_attention_mask=None, attention_mask=None,
                full_text_row_masked_out_mask=None, **kwargs):
        if cross_attention_mask is not None:  # a dense mask (the hook passes none on): transformers' path
            return original(hidden_states, cross_attention_states=cross_attention_states,
                            cross_attention_mask=cross_attention_mask, attention_mask=attention_mask,
                            full_text_row_masked_out_mask=full_text_row_masked_out_mask, **kwargs)
        ranges = state.ranges  # this call's (a recomputation in backward must see the same)
        if layer.training and getattr(layer, "gradient_checkpointing", False) and torch.is_grad_enabled():
            # the instance's forward replaces the class's, which is where transformers checkpoints
            return torch.utils.checkpoint.checkpoint(attend, hidden_states, cross_attention_states, kwargs, ranges,
                                                     use_reentrant=False)
        return attend(hidden_states, cross_attention_states, kwargs, ranges)

    def attend(hidden_states, cross_attention_states, kwargs, ranges):
        cache = next((kwargs[name] for name in ("cache", "past_key_values", "past_key_value")
                      if kwargs.get(name) is not None), None)
        attn = layer.cross_attn
        residual = hidden_states
        x = layer.input_layernorm(hidden_states)
        batch, rows, _ = x.shape
        q = attn.q_norm(attn.q_proj(x).view(batch, rows, attn.num_heads, attn.head_dim).transpose(1, 2))
        if cross_attention_states is not None:
            k = attn.k_proj(cross_attention_states).view(batch, -1, attn.num_key_value_heads, attn.head_dim)
            v = attn.v_proj(cross_attention_states).view(batch, -1, attn.num_key_value_heads, attn.head_dim)
            k, v = attn.k_norm(k.transpose(1, 2)), v.transpose(1, 2)
            if cache is not None:
                k, v = cache.update(k, v, attn.layer_idx)
        else:
            k, v = cache.layers[attn.layer_idx].keys, cache.layers[attn.layer_idx].values
        if ranges is None:  # no mask given: every row sees every key, as transformers does
            start = torch.zeros(batch, rows, dtype=torch.int32, device=x.device)
            end, seen = torch.full_like(start, k.shape[2]), None
        else:
            start, end, seen = ranges
            if start.shape != (batch, rows):
                raise RuntimeError(f"patch_mllama: key ranges for {tuple(start.shape)} rows, but the layer has "
                                   f"{(batch, rows)}: a call reached the text model without passing the MllamaModel")
        out = cross_attention(q, k, v, start, end, scale=attn.scaling, masked_rows=state.masked_rows,
                              backend=state.backend)  # (B, Hq, T, D)
        h = residual + layer.cross_attn_attn_gate.tanh() * attn.o_proj(out.transpose(1, 2).reshape(batch, rows, -1))
        x = layer.mlp(layer.post_attention_layernorm(h))
        if seen is not None:
            x = x * seen[..., None].to(x.dtype)
        return h + layer.cross_attn_mlp_gate.tanh() * x
    return forward


def patch_mllama(model, masked_rows: str = "hf", backend: str = "auto"):
    """Swap the attention of every cross-attention layer of a `MllamaForConditionalGeneration` (or its
    `MllamaModel`) for `cross_attention`, in place, for training, prefill and decoding; returns the model.

    A forward pre-hook on the `MllamaModel` turns the compact `cross_attention_mask` (B, T, images, tiles) into
    key ranges and passes no mask on, so transformers builds no dense (B, 1, T, S) mask; when some row's keys
    are not contiguous (several images with padded tiles between them), that call runs transformers' own path.
    masked_rows and backend: as `cross_attention`. Patching twice raises ValueError.
    """
    if masked_rows not in MASKED_ROWS:
        raise ValueError(f"masked_rows: expected one of {MASKED_ROWS}, got {masked_rows!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    inner = getattr(model, "model", model)
    if not (hasattr(inner, "vision_model") and hasattr(inner, "language_model")):
        raise ValueError(f"model: expected a MllamaForConditionalGeneration or MllamaModel, got {type(model).__name__}")
    if getattr(inner, "_fastjudge_cross_attention", None) is not None:
        raise ValueError("model: already patched")
    state = _PatchState(masked_rows, backend, inner.vision_model.num_patches)
    layers = [layer for layer in inner.language_model.layers if hasattr(layer, "cross_attn_attn_gate")]
    for layer in layers:
        layer.forward = _patched_cross_layer(layer, state, layer.forward)
    inner.register_forward_pre_hook(_capture_ranges(state), with_kwargs=True)
    inner._fastjudge_cross_attention = state
    return model
