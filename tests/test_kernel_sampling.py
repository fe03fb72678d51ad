"""The Triton token sampler (fastjudge.kernels.sampling), under the interpreter on a CPU machine (float32: the
interpreter's bf16 arithmetic is not the GPU's), compiled on a GPU machine: it must draw from exactly the
distribution the plain-PyTorch filters define, computed here in float64."""

import math
import os
import random

import pytest
import torch

from fastjudge.kernels.sampling import sample_logits_triton

ROWS = 2048  # rows per program under the interpreter (numpy then does them at once)
DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"


def sample(logits: torch.Tensor, **kwargs) -> torch.Tensor:
    """sample_logits_triton on DEVICE, tokens back on the CPU: many rows per program under the interpreter,
    one compiled (the GPU's layout; thousands would not compile)."""
    if DEVICE == "cuda":
        kwargs["rows_per_program"] = 1
    if kwargs.get("out") is not None:
        kwargs["out"] = kwargs["out"].to(DEVICE)
    return sample_logits_triton(logits.to(DEVICE), **kwargs).cpu()


def exact_distribution(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, min_p: float):
    """float64, by sorting: temperature, top-k (ties at the k-th value kept), top-p over the top-k set (a token
    is dropped when the renormalized mass before it reaches top_p), min-p relative to the largest."""
    x = logits.double() / temperature
    vocab = x.numel()
    if 0 < top_k < vocab:
        kth = torch.topk(x, top_k).values[-1]
        x = torch.where(x < kth, -torch.inf, x)
    probs = x.softmax(0)
    order = torch.argsort(probs, descending=True)
    sorted_probs = probs[order]
    drop = sorted_probs.cumsum(0) - sorted_probs >= top_p
    drop[0] = False
    probs = probs.clone()
    probs[order[drop]] = 0
    probs = probs / probs.sum()
    probs = torch.where(probs >= min_p * probs.max(), probs, 0)
    return probs / probs.sum()


def chi_square_p_value(observed: torch.Tensor, expected: torch.Tensor) -> float:
    """Upper tail of the chi-square statistic over the categories with expected count > 0 (Wilson-Hilferty).
    Categories expected fewer than 5 times are pooled into one, as the statistic's chi-square law needs: a
    single draw of a token expected 0.02 times would otherwise weigh 48 on its own (a 2% chance per test)."""
    small = (expected > 0) & (expected < 5)
    if small.any():
        observed = torch.cat([observed[~small], observed[small].sum().reshape(1)])
        expected = torch.cat([expected[~small], expected[small].sum().reshape(1)])
    keep = expected > 0
    statistic = float(((observed[keep] - expected[keep]) ** 2 / expected[keep]).sum())
    dof = int(keep.sum()) - 1
    if dof < 1:
        return 1.0
    z = ((statistic / dof) ** (1 / 3) - (1 - 2 / (9 * dof))) / math.sqrt(2 / (9 * dof))
    return 0.5 * math.erfc(z / math.sqrt(2))


@pytest.mark.parametrize("vocab,temperature,top_k,top_p,min_p", [
    (5, 1.0, 0, 1.0, 0.0), (17, 0.7, 0, 1.0, 0.0), (17, 1.0, 5, 1.0, 0.0), (17, 1.0, 0, 0.8, 0.0),
    (50, 1.3, 12, 0.7, 0.0), (17, 1.0, 0, 1.0, 0.2), (33, 0.9, 9, 0.85, 0.05), (7, 2.0, 6, 0.999, 0.0),
])
def test_draws_follow_the_reference_distribution(vocab, temperature, top_k, top_p, min_p):
    seed = random.randrange(1 << 30)
    print(f"seed {seed}")
    logits = torch.randn(vocab, generator=torch.Generator().manual_seed(seed)) * 2
    draws = 12_000
    out = torch.full((draws,), -7, dtype=torch.long)  # poisoned: every row must be written
    tokens = sample(logits.expand(draws, vocab).contiguous(), temperature=temperature, top_k=top_k,
                    top_p=top_p, min_p=min_p, generator=torch.Generator().manual_seed(seed),
                    block=16, rows_per_program=ROWS, out=out)
    assert tokens.min() >= 0 and tokens.max() < vocab
    expected = exact_distribution(logits, temperature, top_k, top_p, min_p)
    observed = torch.bincount(tokens, minlength=vocab).double()
    assert observed[expected == 0].sum() == 0  # nothing outside the kept set
    assert chi_square_p_value(observed, expected * draws) > 1e-4


def test_rows_differ_and_seeds_reproduce():
    logits = torch.randn(37, 23)
    a = sample(logits, top_p=0.9, generator=torch.Generator().manual_seed(1), rows_per_program=64)
    b = sample(logits, top_p=0.9, generator=torch.Generator().manual_seed(1), rows_per_program=64)
    c = sample(logits, top_p=0.9, generator=torch.Generator().manual_seed(2), rows_per_program=64)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_seed_read_from_memory_draws_what_the_host_passed_seed_draws():
    """On a GPU the seed stays in device memory (no synchronization); the host-passed value must draw the same
    tokens, and different seeds different ones."""
    logits = torch.randn(33, 29) * 2

    def draw(seed, in_memory):
        return sample(logits, top_k=9, top_p=0.8, generator=torch.Generator().manual_seed(seed),
                      rows_per_program=64, seed_in_memory=in_memory)

    assert torch.equal(draw(5, True), draw(5, False))
    assert not torch.equal(draw(5, True), draw(6, True))


def test_top_k_by_torch_topk_keeps_what_the_bisection_keeps():
    """The k-th value from torch.topk (the default for k <= 1024) and from the kernel's bisection select the same
    tokens, so the same seed draws the same tokens; ties at the k-th value and -inf entries included."""
    logits = (torch.randn(70, 41, generator=torch.Generator().manual_seed(3)) * 2).round(decimals=1)  # many ties
    logits[5, :30] = -float("inf")
    for top_k, top_p, temperature in [(1, 1.0, 1.0), (7, 1.0, 0.6), (12, 0.8, 1.3), (40, 0.9, 1.0)]:
        draws = [sample(logits, top_k=top_k, top_p=top_p, temperature=temperature, top_k_by=by,
                        generator=torch.Generator().manual_seed(9), rows_per_program=128)
                 for by in ("topk", "bisection")]
        assert torch.equal(draws[0], draws[1]), (top_k, top_p, temperature)
    with pytest.raises(ValueError, match="^top_k_by: "):
        sample(logits, top_k=3, top_k_by="sort")


def test_one_row_per_program_and_blocks_that_do_not_divide_the_vocabulary():
    """The GPU layout (one row per program) over a vocabulary of several blocks, the last one partial."""
    logits = torch.randn(3, 45) * 3
    logits[:, 44] = 20.0  # the last token, in the partial block, dominates
    tokens = sample(logits, top_k=3, top_p=0.5, block=16, rows_per_program=1)
    assert tokens.tolist() == [44, 44, 44]
    assert torch.equal(sample(logits, temperature=0.0), logits.argmax(-1))


def test_rows_with_minus_infinity_keep_the_top_k():
    """-inf entries (masked tokens) must not break the top-k bisection: the threshold starts at the smallest
    finite value."""
    logits = torch.arange(16, dtype=torch.float32).expand(400, 16).clone()
    logits[:, 0] = -float("inf")
    logits[:, 7] = -float("inf")
    tokens = sample(logits, top_k=2, generator=torch.Generator().manual_seed(0), rows_per_program=512)
    assert set(tokens.tolist()) == {14, 15}
    tokens = sample(logits, top_p=0.5, generator=torch.Generator().manual_seed(1), rows_per_program=512)
    assert set(tokens.tolist()) <= {14, 15} and not set(tokens.tolist()) & {0, 7}


def test_rows_without_a_token_to_draw_are_named():
    from fastjudge.core.sampling import check_rows
    logits = torch.zeros(3, 5)
    check_rows(logits)
    logits[1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"logits\[1\]"):
        check_rows(logits)
    logits[1, 2] = 0.0
    logits[2] = -float("inf")
    with pytest.raises(ValueError, match=r"logits\[2\]"):
        check_rows(logits)
