"""The decoding loop against transformers' generate(), and the reference sampler's distribution."""

import math
import random

import pytest
import torch

from fastjudge.core.sampling import sample_logits_reference
from fastjudge.data import prompts
from fastjudge.models import ToyAdapter
from fastjudge.toy import world


def _batch(count: int, seed: int):
    rng = random.Random(seed)
    images, texts = [], []
    for _ in range(count):
        scene = world.random_scene(rng)
        images.append(world.render(scene, rng))
        q = rng.choice(world.questions(scene, rng))
        # prompts of different lengths, so that left padding is exercised
        texts.append(q.instruction if rng.random() < 0.5 else prompts.judge_prompt(q.instruction, "x", "y"))
    return images, texts


def test_greedy_matches_transformers_generate(tiny_toy_dir):
    adapter = ToyAdapter.load(tiny_toy_dir)
    images, texts = _batch(6, seed=1)
    ours = adapter.generate(images, texts, max_new_tokens=12)
    # reference inputs from pixels (transformers runs the vision tower itself), left-padded
    rows = [adapter.encode_prompt(t) for t in texts]
    length = max(map(len, rows))
    ids = torch.tensor([[adapter.pad_id] * (length - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (length - len(r)) + [1] * len(r) for r in rows])
    inputs = dict(input_ids=ids, attention_mask=mask, cross_attention_mask=mask[:, :, None, None],
                  **adapter._pixel_inputs(images))
    reference = adapter.model.generate(**inputs, max_new_tokens=12, do_sample=False, pad_token_id=adapter.pad_id,
                                       eos_token_id=sorted(adapter.eos_ids))
    for row, (text,) in zip(reference[:, inputs["input_ids"].shape[1]:].tolist(), ours):
        tokens = []
        for t in row:
            if t in adapter.eos_ids:
                break
            tokens.append(t)
        assert text == adapter.decode(tokens)


def test_sampling_is_reproducible_by_seed(tiny_toy_dir):
    adapter = ToyAdapter.load(tiny_toy_dir)
    images, texts = _batch(3, seed=2)
    a = adapter.generate(images, texts, n=4, temperature=1.0, max_new_tokens=8, seed=5)
    b = adapter.generate(images, texts, n=4, temperature=1.0, max_new_tokens=8, seed=5)
    c = adapter.generate(images, texts, n=4, temperature=1.0, max_new_tokens=8, seed=6)
    assert a == b
    assert a != c
    assert [len(x) for x in a] == [4, 4, 4]


@pytest.mark.parametrize("bad,message", [(dict(n=0), "^n: "), (dict(temperature=-0.5), "^temperature: "),
                                         (dict(n=2, temperature=0.0), "^n: greedy")])
def test_generate_rejects_bad_arguments(tiny_toy_dir, bad, message):
    adapter = ToyAdapter.load(tiny_toy_dir)
    images, texts = _batch(1, seed=3)
    with pytest.raises(ValueError, match=message):
        adapter.generate(images, texts, **bad)


def _expected_probs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """float64, written independently: sort, keep top-k, keep the shortest prefix reaching top_p."""
    p = torch.softmax(logits.double() / temperature, dim=-1)
    order = torch.argsort(p, descending=True)
    keep = torch.zeros_like(p, dtype=torch.bool)
    kept_k = [i for i in order.tolist()][: (top_k or len(order))]
    # renormalize over top-k, then take the nucleus of that
    pk = torch.zeros_like(p)
    pk[kept_k] = p[kept_k]
    pk /= pk.sum()
    total = 0.0
    for i in sorted(kept_k, key=lambda j: -pk[j].item()):
        keep[i] = True
        total += pk[i].item()
        if total >= top_p:
            break
    out = torch.where(keep, pk, torch.zeros_like(pk))
    return out / out.sum()


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.6, 0, 1.0), (1.0, 4, 1.0),
                                                      (1.0, 0, 0.7), (0.8, 5, 0.9)])
def test_reference_sampler_distribution(temperature, top_k, top_p):
    seed = random.randrange(1 << 30)
    generator = torch.Generator().manual_seed(seed)
    vocab, draws = 9, 20000
    logits = torch.randn(1, vocab, generator=generator) * 1.5
    expected = _expected_probs(logits[0], temperature, top_k, top_p)
    tokens = sample_logits_reference(logits.expand(draws, vocab), temperature=temperature, top_k=top_k,
                                     top_p=top_p, generator=generator)
    counts = torch.bincount(tokens, minlength=vocab).double()
    assert counts[expected == 0].sum() == 0, f"sampled a token outside top-k/top-p (seed {seed})"
    support = expected > 0
    chi2 = (((counts - draws * expected) ** 2)[support] / (draws * expected[support])).sum().item()
    dof = int(support.sum()) - 1
    # the 0.999 quantile of chi-square is below dof + 4.5 sqrt(2 dof) + 5 for these small dof
    assert chi2 < dof + 4.5 * math.sqrt(2 * max(dof, 1)) + 5, f"chi2 {chi2:.1f} with {dof} dof (seed {seed})"


def test_greedy_sampler_is_argmax():
    logits = torch.randn(7, 33)
    assert torch.equal(sample_logits_reference(logits, temperature=0.0), logits.argmax(-1))
