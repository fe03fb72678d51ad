"""Token sampling: C++ sample_logits and the PyTorch reference against exact float64 distributions."""

from __future__ import annotations

import math

import pytest
import torch

from fastjudge import _C
from fastjudge.core.sampling import sample_logits, sample_logits_reference

SAMPLERS = {"c++": sample_logits, "reference": sample_logits_reference}


def exact_probs(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                min_p: float = 0.0, check_margins: bool = True) -> torch.Tensor:
    """(V,) -> (V,) float64 probabilities after the filters, written from the rules in fastjudge.core.sampling.

    check_margins: assert that no token lies within float rounding of a top-p or min-p boundary, where
    float32 and float64 could disagree on whether it is kept.
    """
    scores = (logits.float() / temperature).double()  # float32 division, as both implementations
    keep = torch.ones_like(scores, dtype=torch.bool)

    def probs() -> torch.Tensor:
        return torch.where(keep, scores, -math.inf).softmax(-1)

    if 0 < top_k < len(scores):
        kth = scores.topk(top_k).values[-1]
        keep &= scores >= kth
    if top_p < 1:
        p = probs()
        kept = keep.nonzero().squeeze(1)
        order = kept[scores[kept].sort(descending=True, stable=True).indices]  # ties by lower index
        before = p[order].cumsum(0) - p[order]  # the mass of the tokens more likely than each
        if check_margins:
            assert ((before - top_p).abs() > 1e-5).all(), "top-p boundary too close to call"
        keep[order[before >= top_p]] = False
    if min_p > 0:
        p = probs()
        ratio = p / p.max()
        if check_margins:
            assert ((ratio - min_p).abs()[keep] > 1e-5).all(), "min-p boundary too close to call"
        keep &= ratio >= min_p
    return probs()


def chi2_sf(x: float, dof: int) -> float:
    """P(chi-square with dof degrees of freedom >= x): the regularized upper incomplete gamma Q(dof/2, x/2)."""
    a, x = dof / 2, x / 2
    if x <= 0:
        return 1.0
    log_prefactor = -x + a * math.log(x) - math.lgamma(a)
    if x < a + 1:  # series for the lower function P
        term = total = 1 / a
        k = a
        while term > total * 1e-16:
            k += 1
            term *= x / k
            total += term
        return max(0.0, 1 - total * math.exp(log_prefactor))
    tiny = 1e-300  # continued fraction for Q (modified Lentz)
    b = x + 1 - a
    c, d = 1 / tiny, 1 / b
    h = d
    for i in range(1, 10_000):
        an = -i * (i - a)
        b += 2
        d = an * d + b
        d = 1 / (d if abs(d) > tiny else tiny)
        c = b + an / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        if abs(d * c - 1) < 1e-15:
            break
    return math.exp(log_prefactor) * h


def test_chi2_sf_matches_tables():
    # the 0.05 and 0.001 critical values of chi-square tables
    for x, dof, p in [(3.841, 1, 0.05), (5.991, 2, 0.05), (18.307, 10, 0.05), (10.828, 1, 0.001),
                      (59.703, 30, 0.001), (124.342, 100, 0.05)]:
        assert chi2_sf(x, dof) == pytest.approx(p, rel=2e-3)
    assert chi2_sf(0.0, 3) == 1.0


def goodness_of_fit(tokens: torch.Tensor, expected: torch.Tensor) -> float:
    """Chi-square p-value of the drawn tokens against the expected probabilities. Bins expected to get
    fewer than 5 draws are pooled, smallest first, until each pool expects at least 5."""
    draws = len(tokens)
    counts = torch.bincount(tokens, minlength=len(expected)).tolist()
    wanted = (draws * expected).tolist()
    bins: list[list[float]] = []  # [observed, expected]
    pool = [0.0, 0.0]
    for i in sorted(range(len(wanted)), key=lambda i: wanted[i]):
        if wanted[i] == 0:
            continue
        pool = [pool[0] + counts[i], pool[1] + wanted[i]]
        if pool[1] >= 5:
            bins.append(pool)
            pool = [0.0, 0.0]
    if pool[1] > 0:
        if bins:
            bins[-1] = [bins[-1][0] + pool[0], bins[-1][1] + pool[1]]
        else:
            bins.append(pool)
    chi2 = sum((o - e) ** 2 / e for o, e in bins)
    return chi2_sf(chi2, len(bins) - 1) if len(bins) > 1 else 1.0


FILTERS = [
    dict(),
    dict(temperature=0.6),
    dict(top_k=3),
    dict(top_p=0.7),
    dict(min_p=0.1),
    dict(temperature=0.8, top_k=10, top_p=0.9, min_p=0.05),
    dict(temperature=2.5, top_p=0.35, min_p=0.3),
    dict(temperature=1.3, top_k=4, top_p=0.999),
]


# V = 400 (C++ only, to keep the test fast) takes the kernel's paths for more than a block of tokens and
# for more than a few dozen candidates.
@pytest.mark.parametrize("impl,vocab", [(impl, vocab) for impl in SAMPLERS for vocab in (5, 17, 50)] + [("c++", 400)])
@pytest.mark.parametrize("filters", FILTERS, ids=lambda f: ",".join(f"{k}={v}" for k, v in f.items()) or "plain")
def test_distribution_matches_exact(impl, vocab, filters):
    draws = 20_000
    generator = torch.Generator().manual_seed(1000 * vocab + FILTERS.index(filters))
    logits = torch.randn(vocab, generator=generator) * 2.0
    expected = exact_probs(logits, **filters)
    tokens = SAMPLERS[impl](logits.expand(draws, vocab), generator=generator, **filters)
    assert tokens.shape == (draws,) and tokens.dtype == torch.int64
    assert (expected[tokens] > 0).all(), "drew a token the filters drop"
    p_value = goodness_of_fit(tokens, expected)
    assert p_value > 1e-4, f"chi-square p-value {p_value:.2e}"


@pytest.mark.parametrize("shape", [(37, 1000), (3, 1), (5, 7), (2, 259)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_temperature_zero_is_argmax(shape, dtype):
    generator = torch.Generator().manual_seed(shape[1])
    logits = torch.randn(shape, generator=generator).to(dtype)
    if shape[1] > 3:
        # ties for the maximum: the first index wins
        logits[0, [1, shape[1] // 2, shape[1] - 1]] = 100.0
        logits[1, :] = 0.0
        logits[-1, 2:] = float("-inf")
    assert torch.equal(sample_logits(logits, temperature=0.0), logits.argmax(-1))


def test_argmax_counts_nan_as_the_maximum_like_torch():
    logits = torch.tensor([[1.0, float("nan"), 3.0, float("nan")], [float("-inf")] * 4])
    assert torch.equal(sample_logits(logits, temperature=0.0), logits.argmax(-1))


def test_inverse_cdf_walks_kept_tokens_in_index_order():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]]).numpy()
    p1 = math.e / (1 + math.e)  # top-k 2 keeps tokens 1 and 3, with weights e^3 and e^2
    for u, token in [(0.0, 1), (p1 - 1e-6, 1), (p1 + 1e-6, 3), (1 - 1e-12, 3)]:
        uniforms = torch.tensor([u], dtype=torch.float64).numpy()
        assert _C.sample_logits(logits, uniforms, top_k=2)[0] == token
    # a flat row: every u lands in its quarter
    flat = torch.zeros(1, 4).numpy()
    for u, token in [(0.1, 0), (0.3, 1), (0.6, 2), (0.9, 3)]:
        assert _C.sample_logits(flat, torch.tensor([u], dtype=torch.float64).numpy())[0] == token


def test_top_p_ties_break_by_lower_index():
    # four equally likely tokens, top_p 0.5: the first two in index order are the smallest set reaching it
    uniforms = torch.linspace(0, 0.999, 200, dtype=torch.float64)
    tokens = _C.sample_logits(torch.zeros(200, 4).numpy(), uniforms.numpy(), top_p=0.5)
    assert set(tokens.tolist()) == {0, 1}


def test_top_p_just_below_one_keeps_every_token():
    # The collected mass cannot reach top_p * Z after float rounding: the kernel must fall back to keeping
    # every token, and then draw what the unfiltered path draws for the same uniforms.
    logits = (torch.randn(500, 300, generator=torch.Generator().manual_seed(3)) * 2).numpy()
    uniforms = torch.rand(500, dtype=torch.float64, generator=torch.Generator().manual_seed(4)).numpy()
    for kwargs in [dict(), dict(min_p=1e-3)]:
        unfiltered = _C.sample_logits(logits, uniforms, **kwargs)
        assert (_C.sample_logits(logits, uniforms, top_p=1 - 1e-12, **kwargs) == unfiltered).all()


@pytest.mark.parametrize("impl", SAMPLERS)
def test_top_k_keeps_ties_at_the_kth_score(impl):
    logits = torch.tensor([3.0, 2.0, 2.0, 2.0, 1.0]).expand(4000, 5)
    tokens = SAMPLERS[impl](logits, top_k=2, generator=torch.Generator().manual_seed(0))
    assert set(tokens.tolist()) == {0, 1, 2, 3}


def test_seed_reproduces_and_different_seeds_differ():
    logits = torch.randn(64, 1000, generator=torch.Generator().manual_seed(0))
    kwargs = dict(temperature=0.9, top_k=100, top_p=0.95)
    first = sample_logits(logits, generator=torch.Generator().manual_seed(7), **kwargs)
    again = sample_logits(logits, generator=torch.Generator().manual_seed(7), **kwargs)
    other = sample_logits(logits, generator=torch.Generator().manual_seed(8), **kwargs)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    torch.manual_seed(3)  # generator=None: torch's default generator
    default = sample_logits(logits, **kwargs)
    torch.manual_seed(3)
    assert torch.equal(default, sample_logits(logits, **kwargs))


def test_threads_do_not_change_the_draws():
    logits = torch.randn(50, 3000, generator=torch.Generator().manual_seed(1)).numpy()
    uniforms = torch.rand(50, dtype=torch.float64, generator=torch.Generator().manual_seed(2)).numpy()
    for kwargs in [dict(), dict(top_p=0.8), dict(top_k=20, min_p=0.01)]:
        one = _C.sample_logits(logits, uniforms, num_threads=1, **kwargs)
        four = _C.sample_logits(logits, uniforms, num_threads=4, **kwargs)
        assert (one == four).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_other_float_types_sample_as_their_float32_values(dtype):
    logits = (torch.randn(16, 300, generator=torch.Generator().manual_seed(4)) * 3).to(dtype)
    kwargs = dict(temperature=0.7, top_k=40, top_p=0.9)
    tokens = sample_logits(logits, generator=torch.Generator().manual_seed(5), **kwargs)
    as_float = sample_logits(logits.float(), generator=torch.Generator().manual_seed(5), **kwargs)
    assert torch.equal(tokens, as_float)
    assert sample_logits_reference(logits, generator=torch.Generator().manual_seed(5), **kwargs).shape == (16,)


def test_noncontiguous_and_grad_logits():
    base = torch.randn(300, 8, generator=torch.Generator().manual_seed(6), requires_grad=True)
    logits = base.t()  # (8, 300), not contiguous, requires grad
    tokens = sample_logits(logits, top_p=0.9, generator=torch.Generator().manual_seed(1))
    assert torch.equal(tokens, sample_logits(logits.detach().contiguous(), top_p=0.9,
                                             generator=torch.Generator().manual_seed(1)))


@pytest.mark.parametrize("kwargs", [dict(top_k=50, top_p=0.9), dict(top_p=0.9), dict(top_k=50),
                                    dict(temperature=0.7, min_p=0.05)])
def test_llama_vocabulary_draws_stay_in_the_kept_set(kwargs):
    vocab, rows, repeats = 128_256, 3, 16
    generator = torch.Generator().manual_seed(9)
    logits = torch.randn(rows, vocab, generator=generator) * 2
    # a peaked head, as an LLM's: a few plausible tokens well above the rest
    head = torch.randint(0, vocab, (rows, 20), generator=generator)
    logits.scatter_(1, head, 8 + 3 * torch.randn(rows, 20, generator=generator))
    tokens = sample_logits(logits.repeat_interleave(repeats, dim=0), generator=generator, **kwargs)
    # Among 128k tokens some lie within rounding of the top-p boundary: check against a slightly larger set.
    loose = dict(kwargs, top_p=min(1.0, kwargs.get("top_p", 1.0) + 1e-4), min_p=kwargs.get("min_p", 0.0) * 0.999)
    for row in range(rows):
        kept = exact_probs(logits[row], **loose, check_margins=False) > 0
        assert kept[tokens[row * repeats:(row + 1) * repeats]].all()


BAD_ARGUMENTS = [
    (dict(temperature=-0.1), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(top_k=-1), "top_k"),
    (dict(top_k=2.0), "top_k"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(min_p=-0.1), "min_p"),
    (dict(min_p=1.0), "min_p"),
]


@pytest.mark.parametrize("impl", SAMPLERS)
@pytest.mark.parametrize("kwargs,name", BAD_ARGUMENTS, ids=[f"{n}={list(k.values())[0]}" for k, n in BAD_ARGUMENTS])
def test_bad_arguments_name_the_argument(impl, kwargs, name):
    with pytest.raises(ValueError, match=name):
        SAMPLERS[impl](torch.zeros(2, 5), **kwargs)


@pytest.mark.parametrize("impl", SAMPLERS)
@pytest.mark.parametrize("logits", [torch.zeros(5), torch.zeros(2, 0), torch.zeros(0, 5), torch.zeros(2, 3, 4),
                                    torch.zeros(2, 5, dtype=torch.int64)],
                         ids=["1d", "no-vocab", "no-rows", "3d", "int"])
def test_bad_logits_are_named(impl, logits):
    with pytest.raises(ValueError, match="logits"):
        SAMPLERS[impl](logits)


@pytest.mark.parametrize("value,message", [(float("nan"), "NaN"), (float("inf"), r"\+inf")])
def test_nan_or_inf_rows_are_named(value, message):
    logits = torch.zeros(3, 10)
    logits[1, 4] = value
    with pytest.raises(ValueError, match=rf"logits\[1\] contains {message}"):
        sample_logits(logits)
    logits = torch.zeros(3, 10)
    logits[2] = float("-inf")
    with pytest.raises(ValueError, match=r"logits\[2\] is all -inf"):
        sample_logits(logits, top_p=0.5)


def test_binding_checks_its_arrays():
    logits, uniforms = torch.zeros(2, 5).numpy(), torch.zeros(2, dtype=torch.float64).numpy()
    with pytest.raises(ValueError, match="logits must be float32"):
        _C.sample_logits(logits.astype("float64"), uniforms)
    with pytest.raises(ValueError, match="C-contiguous"):
        _C.sample_logits(torch.zeros(5, 2).numpy().T, uniforms)
    with pytest.raises(ValueError, match="uniforms"):
        _C.sample_logits(logits, uniforms[:1])
    with pytest.raises(ValueError, match="uniforms must be in"):
        _C.sample_logits(logits, uniforms + 1.0)


def test_other_devices_fall_back_to_the_reference(monkeypatch):
    import fastjudge.core.sampling as sampling

    calls = []
    monkeypatch.setattr(sampling, "sample_logits_reference", lambda logits, **kwargs: calls.append(kwargs) or "ref")
    logits = torch.zeros(2, 5, device="meta")  # stands in for CUDA: any non-CPU device
    assert sampling.sample_logits(logits, temperature=0.5, top_k=3, top_p=0.9, min_p=0.1) == "ref"
    assert calls == [dict(temperature=0.5, top_k=3, top_p=0.9, min_p=0.1, generator=None)]
