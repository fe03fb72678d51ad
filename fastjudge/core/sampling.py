"""Draw one token per row from logits: temperature, top-k, top-p, min-p.

`sample_logits` runs in C++ (fastjudge._C) on CPU tensors, without sorting the vocabulary;
`sample_logits_reference` is the plain-PyTorch version (sort-based), the test oracle and the fallback
on other devices. Both follow these rules, in this order (transformers' order), on scores
s = logits / temperature computed in float32:

  1. temperature == 0: argmax, the first index of the maximum (torch.argmax's rule). No randomness.
  2. top_k > 0 (and < V): keep the tokens whose score is >= the k-th largest score; ties with the
     k-th score are all kept, so more than k tokens can remain.
  3. top_p < 1: with p = softmax over the tokens kept so far, keep the smallest set of most likely
     tokens whose probability reaches top_p: token j is dropped when the tokens more likely than it
     already sum to >= top_p. The most likely token is always kept. (C++ breaks ties in probability
     by lower index first; the reference by torch.sort's order.)
  4. min_p > 0: with p = softmax over the tokens kept so far, drop tokens with p < min_p * max(p).
     The ratio p / max(p) = exp(s - max(s)) does not depend on the normalization, so this is
     "drop tokens with s - max(s) < log(min_p)"; the most likely token is always kept. (The C++
     kernel tests the log form, the reference the probability form; they can disagree only for
     a token within float rounding of the boundary.)
  5. Draw from the renormalized probabilities of the kept tokens.

Randomness: `sample_logits` draws u = torch.rand(B, generator=generator, dtype=torch.float64) (one
per row, on the CPU) and returns, per row, the first kept token, in increasing index order, at
which the running sum of the kept probabilities exceeds u (inverse-CDF sampling). A seeded
generator therefore reproduces the tokens. The reference draws with torch.multinomial, so the two
produce the same distribution but not the same tokens for a seed.
"""

from __future__ import annotations

import math
import numbers

import torch

from fastjudge.core.sampling_params import SamplingParams

__all__ = ["SamplingParams", "sample_logits", "sample_logits_reference"]


def _check_arguments(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, min_p: float) -> None:
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dim() != 2 or logits.numel() == 0:
        raise ValueError(f"logits must be a non-empty 2-D tensor (B, V), got shape {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise ValueError(f"logits must be a floating-point tensor, got {logits.dtype}")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be finite and >= 0, got {temperature}")
    if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 0:
        raise ValueError(f"top_k must be an int >= 0, got {top_k!r}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if not 0 <= min_p < 1:
        raise ValueError(f"min_p must be in [0, 1), got {min_p}")


def sample_logits_reference(logits: torch.Tensor, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                            min_p: float = 0.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """Plain-PyTorch sampler (sorts each row for top-p): the oracle and fallback for `sample_logits`.

    Args:
        logits: (B, V) floating point, any device.
        temperature, top_k, top_p, min_p: the filters (module docstring); each is off at its default.
        generator: the torch.Generator for torch.multinomial; None = torch's default.
    Returns:
        (B,) int64 token ids, on logits' device.
    Raises:
        ValueError: a bad argument (the message names it).
    """
    _check_arguments(logits, temperature, top_k, top_p, min_p)
    if temperature == 0:
        return logits.argmax(dim=-1)
    scores = logits.float() / temperature  # (B, V)
    if 0 < top_k < scores.shape[-1]:
        kth = torch.topk(scores, top_k, dim=-1).values[:, -1:]  # (B, 1)
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True, dim=-1)
        probs = sorted_scores.softmax(dim=-1)
        # drop a token when the tokens before it already reach top_p
        drop = probs.cumsum(dim=-1) - probs >= top_p
        drop[:, 0] = False
        scores = scores.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    if min_p > 0.0:
        probs = scores.softmax(dim=-1)
        scores = scores.masked_fill(probs < min_p * probs.amax(dim=-1, keepdim=True), float("-inf"))
    return torch.multinomial(scores.softmax(dim=-1), 1, generator=generator).squeeze(-1)


def bad_rows(logits: torch.Tensor) -> torch.Tensor:
    """(B,) bool: the rows of logits (B, V) with NaN or +inf, or with only -inf (no token to draw)."""
    return torch.isnan(logits).any(-1) | torch.isposinf(logits).any(-1) | torch.isneginf(logits).all(-1)


def check_rows(logits: torch.Tensor) -> None:
    """ValueError naming the first bad row (`bad_rows`): the Triton kernel's rule, as the C++ kernel's."""
    bad = bad_rows(logits)
    if bool(bad.any()):
        row = int(torch.nonzero(bad)[0])
        raise ValueError(f"logits[{row}] contains NaN or +inf, or is all -inf")


def sample_logits(logits: torch.Tensor, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                  min_p: float = 0.0, generator: torch.Generator | None = None, check: bool = True) -> torch.Tensor:
    """Draw one token per row of logits (rules and randomness in the module docstring).

    CPU tensors go to the C++ kernel (fastjudge._C.sample_logits: no sort of the vocabulary, rows
    split over torch.get_num_threads() threads, GIL released); float32 is used as is, other floating
    types are converted to float32 first. CUDA tensors go to the Triton kernel
    (fastjudge.kernels.sampling: no sort either; top-k by bisection, top-p by rejection).

    Args:
        logits: (B, V) floating point.
        temperature: >= 0; 0 = argmax (no random draw).
        top_k: keep the top_k highest-scoring tokens (and ties with the k-th); 0 = off.
        top_p: in (0, 1]; keep the smallest most-likely set with probability >= top_p; 1 = off.
        min_p: in [0, 1); drop tokens with probability < min_p times the top probability; 0 = off.
        generator: a torch.Generator on logits' device (the CPU's draws the uniforms, CUDA's the Philox
            seed); None = torch's default generator.
        check: on a GPU, raise on bad rows (below) at once. The check waits for the GPU; a decoding loop that
            looks from the host only every few steps passes False and checks `bad_rows` at its looks.
    Returns:
        (B,) int64 token ids, on logits' device.
    Raises:
        ValueError: a bad argument (the message names it), or, when temperature > 0, a row of
            logits with NaN or +inf, or with only -inf (on a GPU only with check=True).
    """
    _check_arguments(logits, temperature, top_k, top_p, min_p)
    if logits.device.type == "cuda":
        from fastjudge.kernels.sampling import sample_logits_triton
        if temperature > 0 and check:
            check_rows(logits)
        return sample_logits_triton(logits, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                                    generator=generator)
    if logits.device.type != "cpu":
        return sample_logits_reference(logits, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                                       generator=generator)
    from fastjudge import _C  # imported here so the pure-Python parts work without the build

    scores = logits.detach()
    if scores.dtype != torch.float32:
        scores = scores.float()
    rows = scores.shape[0]
    if temperature == 0:
        uniforms = torch.zeros(rows, dtype=torch.float64)  # unused: argmax draws nothing
    else:
        uniforms = torch.rand(rows, generator=generator, dtype=torch.float64)
    tokens = _C.sample_logits(scores.contiguous().numpy(), uniforms.numpy(), temperature=float(temperature),
                              top_k=int(top_k), top_p=float(top_p), min_p=float(min_p),
                              num_threads=torch.get_num_threads())
    return torch.from_numpy(tokens)
