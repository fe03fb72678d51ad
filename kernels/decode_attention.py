"""Self-attention of a decoding step whose n samples share their prompt's keys (the shared Mllama decoder's
layout, fastjudge/engine/mllama.py), as one split-K kernel (flash-decoding).

Per prompt b and K/V head, the key buffer holds L columns: the prompt's T keys (those its mask keeps are seen by
every sample), then the samples' own keys step-major, column T + step * n + s for sample s. Sample s sees its
own steps 0..index[b, s]. As in `cross_attention_decode`, the G query heads of a K/V head and the n samples are
the G * n rows of one product per (prompt, K/V head), whose keys are read once for all of them; the columns
[0, width) are split in chunks over programs and the chunks merged by the softmax statistics.

`shared_prefix_decode_attention_reference` is the plain-PyTorch reference (the mask built densely, softmax in
float32 or wider): the CPU path and the tests' oracle.
"""

from __future__ import annotations

import torch

from fastjudge.kernels._flash import check_decode_arguments, split_decode


def _seen(prompt_mask: torch.Tensor, index: torch.Tensor, width: int) -> torch.Tensor:
    """(B, n, width) bool: the columns each sample sees."""
    batch, prompt = prompt_mask.shape
    samples = index.shape[1]
    own = torch.arange(width - prompt, device=index.device)  # own columns, step-major
    own_seen = ((own % samples)[None, None, :] == torch.arange(samples, device=index.device)[None, :, None]) & \
        ((own // samples)[None, None, :] <= index[..., None])
    return torch.cat([prompt_mask.bool()[:, None, :].expand(-1, samples, -1), own_seen], dim=-1)


def shared_prefix_decode_attention_reference(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                                             prompt_mask: torch.Tensor, index: torch.Tensor, *, width: int,
                                             scale: float | None = None) -> torch.Tensor:
    """The plain-PyTorch reference: same arguments and result as `shared_prefix_decode_attention`."""
    batch, heads, samples, size = q.shape
    group = heads // keys.shape[1]
    scale = size ** -0.5 if scale is None else scale
    compute = torch.promote_types(q.dtype, torch.float32)
    k = keys[:, :, :width].repeat_interleave(group, dim=1).to(compute)  # (B, Hq, width, D)
    v = values[:, :, :width].repeat_interleave(group, dim=1).to(compute)
    scores = torch.einsum("bhsd,bhcd->bhsc", q.to(compute), k) * scale
    scores = scores.masked_fill(~_seen(prompt_mask, index, width)[:, None], float("-inf"))
    return torch.einsum("bhsc,bhcd->bhsd", torch.softmax(scores, dim=-1), v).to(q.dtype)


def shared_prefix_decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                                   prompt_mask: torch.Tensor, index: torch.Tensor, *, width: int,
                                   scale: float | None = None, backend: str = "auto",
                                   splits: int | None = None) -> torch.Tensor:
    """One decoding step's self-attention over a shared prompt (module docstring). No gradient.

    Args:
        q: (B, Hq, n, D): one query per sample.
        keys, values: (B, Hkv, L, D), Hq a multiple of Hkv: the prompt's T keys, then the own keys step-major.
        prompt_mask: (B, T) bool or integer (nonzero: seen): the prompt keys the samples see (left padding
            excluded).
        index: (B, n) integer: sample s sees its own steps 0..index[b, s] (its current token's key included).
        width: the columns read, T <= width <= L (T + steps written so far x n, or more). Columns a sample
            does not see get no weight but are read: they must hold finite values (the decoder's buffers start
            as zeros), as for SDPA with a mask.
        scale: the score scale (default D ** -0.5).
        backend: "auto" (Triton on CUDA, the reference elsewhere), "triton", "torch" (the reference).
        splits: column chunks per (prompt, K/V head) (default: enough programs to fill the GPU in one wave).
    Returns:
        (B, Hq, n, D) in q's dtype; 0 for a row that sees no column (the reference, as SDPA, gives NaN; in the
        decoder every sample sees at least its current token).
    Raises:
        ValueError: a bad shape, device, dtype or option (the message names the argument).
    """
    check_decode_arguments(q, keys, values, ("keys", "values"), backend, splits)
    batch, heads, samples, size = q.shape
    kv_heads, length = keys.shape[1], keys.shape[2]
    if prompt_mask.dim() != 2 or prompt_mask.shape[0] != batch:
        raise ValueError(f"prompt_mask: expected ({batch}, T), got {tuple(prompt_mask.shape)}")
    prompt = prompt_mask.shape[1]
    if index.shape != (batch, samples):
        raise ValueError(f"index: expected ({batch}, {samples}), got {tuple(index.shape)}")
    for name, tensor in (("keys", keys), ("values", values), ("prompt_mask", prompt_mask), ("index", index)):
        if tensor.device != q.device:  # the kernel would be handed a pointer it cannot read
            raise ValueError(f"{name}: expected on q's device {q.device}, got {tensor.device}")
    if keys.dtype != q.dtype or values.dtype != q.dtype:
        raise ValueError(f"keys, values: expected q's dtype {q.dtype}, got {keys.dtype} and {values.dtype}")
    if not prompt <= width <= length:
        raise ValueError(f"width: expected in [T={prompt}, L={length}], got {width}")
    scale = size ** -0.5 if scale is None else float(scale)
    if backend == "torch" or (backend == "auto" and not q.is_cuda):
        return shared_prefix_decode_attention_reference(q, keys, values, prompt_mask, index, width=width, scale=scale)
    from fastjudge.kernels import decode_attention_triton as kernels
    q = q.contiguous()  # (B, Hkv, G, n, D) in memory: row j * n + s of K/V head kv is query head kv * G + j
    if not keys.is_contiguous() or not values.is_contiguous():
        raise ValueError("keys, values: expected contiguous buffers (B, Hkv, L, D)")
    # the decoder passes an int8 mask and int32 indices made once per step: no conversion in every layer
    mask = prompt_mask if prompt_mask.dtype == torch.int8 else (prompt_mask != 0).to(torch.int8)
    mask = mask.contiguous()
    index = index.to(torch.int32).contiguous()

    def launch(grid, parts, stats, rows, splits, chunk, blocks):
        kernels.shared_prefix_decode_kernel[grid](q, keys, values, parts, stats, mask, index, rows, length, size,
                                                  kv_heads, prompt, samples, width, splits, chunk, scale, **blocks)
    return split_decode(q, kv_heads, width, splits, launch)
