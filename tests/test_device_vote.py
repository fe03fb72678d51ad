"""Voting on the device: answer spans found token by token (`engine.vote.SpanTracker`), the fixed-shape vote
and its settle rule (`DeviceVote`), and the shared Mllama decoder that refills slots and stops a prompt early."""

import random

import numpy as np
import pytest
import torch
from PIL import Image

import tiny
from fastjudge.core.answers import extract_answer
from fastjudge.core.sampling_params import SamplingParams
from fastjudge.core.voting import majority_confidence, normalize_answer, sampling_settled
from fastjudge.engine.decoding import decode_groups
from fastjudge.engine.options import DecodeOptions
from fastjudge.engine.vote import DeviceVote, EarlyStop, SpanTables, SpanTracker
from fastjudge.models import ToyAdapter, load_adapter
from fastjudge.toy import world


def _track(tables: SpanTables, sequences: list[list[int]]) -> list[int | None]:
    """Run the tracker over token sequences of different lengths (padded rows do not write); the answer id of
    each, None when there is none."""
    tracker = SpanTracker(tables, len(sequences))
    for step in range(max(map(len, sequences))):
        token = torch.tensor([s[step] if step < len(s) else 0 for s in sequences])
        write = torch.tensor([step < len(s) for s in sequences])
        tracker.update(token, write)
    found, hash_ = tracker.answer()
    return [int(h) if f else None for f, h in zip(found.tolist(), hash_.tolist())]


def _same_partition(device: list[int | None], host: list[str | None]) -> None:
    """Device ids and host answers group the samples the same way, and agree on which have no answer."""
    assert [d is None for d in device] == [h is None for h in host]
    pairs = [(d, h) for d, h in zip(device, host) if d is not None]
    for d1, h1 in pairs:
        for d2, h2 in pairs:
            assert (d1 == d2) == (h1 == h2), (h1, h2)


def test_toy_responses_give_the_host_vote_classes(tiny_toy_dir):
    """Every closed toy answer, its response corrupted or not: the device groups them as the host does
    (extract_answer, then normalize_answer)."""
    adapter = ToyAdapter.load(tiny_toy_dir)
    tables = SpanTables.build(adapter.token_pieces())
    rng = random.Random(0)
    texts = []
    for _ in range(60):
        scene = world.random_scene(rng)
        for question in world.questions(scene, rng):
            if question.kind == "closed":
                texts.append(world.closed_response(question.answer))
                texts.append(world.closed_response(world.corrupt_answer(question, rng)))
    texts += ["there are 2 objects", "the answer is", "the answer is 2 . the answer is 3 ."]
    sequences = [adapter._words(t) for t in texts]
    host = [normalize_answer(a) if (a := extract_answer(t, "short")) else None for t in texts]
    _same_partition(_track(tables, sequences), host)
    assert len({h for h in host if h}) > 10  # many different answers were compared


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    """The byte-level BPE tokenizer of the tiny Mllama checkpoint, with its span tables."""
    adapter = load_adapter(str(tiny.build_checkpoint("mllama", tmp_path_factory.mktemp("mllama"))))
    return adapter, SpanTables.build(adapter.token_pieces(), adapter.model.get_output_embeddings().out_features)


BPE_TEXTS = [
    "Let me count. The answer is 3.",  # "3"
    "There are 3 shapes, so the answer is (3). Done.",  # "3"
    "answer: 3\nThe rest is ignored: 4",  # "3"
    "Final answer: (B)",  # "b"
    "I think the answer is B. It is blue.",  # "b"
    "The answer is: b",  # "b"
    "ANSWER IS 2.5. so",  # "2.5"
    "the answer is 2.5",  # "2.5"
    "First the answer is 7. Wait, the answer is 4.",  # "4": the last marker wins
    "The answer is top left.",  # "top left"
    "no marker here, 5",  # None
    "The answer is",  # None: empty span
]


def test_bpe_responses_give_the_host_vote_classes(bpe):
    adapter, tables = bpe
    sequences = [adapter.tokenizer.encode(t, add_special_tokens=False) for t in BPE_TEXTS]
    assert any(len(s) < len(t) for s, t in zip(sequences, BPE_TEXTS))  # real merges, not one token per byte
    host = [normalize_answer(a) if (a := extract_answer(t, "short")) else None for t in BPE_TEXTS]
    assert host[:2] == ["3", "3"] and host[3:6] == ["b", "b", "b"] and host[8] == "4" and host[10:] == [None, None]
    _same_partition(_track(tables, sequences), host)


def test_tables_cover_a_model_vocabulary_larger_than_the_tokenizer(bpe):
    adapter, tables = bpe
    vocab = tables.content.shape[0]
    bigger = SpanTables.build(adapter.token_pieces(), vocab + 7)
    assert bigger.content.shape == (vocab + 7,) and bigger.transition.shape[1] == vocab + 7
    assert _track(bigger, [[vocab + 3, vocab + 6]]) == [None]


def test_span_identity_does_not_depend_on_the_tokenization(bpe):
    """The hash is over characters: the same span split into other tokens (here one token per character)
    has the same identity; "2.50" and "2.5" do not (the documented limit: the host's number rule merges them)."""
    adapter, tables = bpe
    text = "The answer is Top Left. More"
    merged = adapter.tokenizer.encode(text, add_special_tokens=False)
    by_char = [adapter.tokenizer.convert_tokens_to_ids(adapter.tokenizer.tokenize(c)[0]) for c in text]
    assert len(merged) < len(by_char)
    first, second = _track(tables, [merged, by_char])
    assert first is not None and first == second
    a, b = _track(tables, [adapter.tokenizer.encode(t, add_special_tokens=False)
                           for t in ("the answer is 2.50", "the answer is 2.5")])
    assert a != b


@pytest.mark.parametrize("seed", range(5))
def test_device_settle_rule_equals_the_host_rule(seed):
    """Random vote tables (answers, unparsed samples, samples not yet recorded): the device says settled exactly
    when `sampling_settled` does, on the recorded samples' answers."""
    rng = random.Random(seed)
    prompts, n = 40, 12
    vote = DeviceVote(prompts, n, min_votes=rng.choice([1, 3, 5]), confidence=rng.choice([0.8, 0.9, 0.95]),
                      device="cpu")
    answers = [[rng.choice([None, 11, 22, 33]) if rng.random() < 0.5 else rng.choice([11, 22])
                for _ in range(n)] for _ in range(prompts)]
    drawn = [rng.randint(0, n) for _ in range(prompts)]
    for p in range(prompts):
        order = list(range(drawn[p]))
        if drawn[p] + 1 < n and rng.random() < 0.5:
            order.append(drawn[p] + 1)  # ended after a sample still running: it must not count
        rng.shuffle(order)
        for s in order:  # one sample per call, some calls recording nothing
            ended = torch.tensor([True, False])
            a = answers[p][s]
            vote.record(torch.tensor([p, p]), torch.tensor([s, (s + 1) % n]), ended,
                        torch.tensor([a is not None, True]), torch.tensor([a or 0, 99]))
    assert vote.drawn(torch.arange(prompts)).tolist() == drawn
    settled = vote.settled(torch.arange(prompts)).tolist()
    for p in range(prompts):
        counts: dict[str, int] = {}
        for a in answers[p][:drawn[p]]:
            if a is not None:
                counts[str(a)] = counts.get(str(a), 0) + 1
        assert settled[p] == sampling_settled(counts, drawn[p], n, vote.min_votes, vote.confidence), (p, counts)
    assert vote.table[4, 1] == pytest.approx(majority_confidence([4, 1]))


def _images(count, seed):
    rs = np.random.RandomState(seed)
    return [Image.fromarray(rs.randint(0, 256, (40, 40, 3), dtype=np.uint8)) for _ in range(count)]


@pytest.fixture(scope="module", params=["toy", "mllama"])
def mllama(request, tiny_toy_dir, tmp_path_factory):
    if request.param == "toy":
        return ToyAdapter.load(tiny_toy_dir)
    return load_adapter(str(tiny.build_checkpoint("mllama", tmp_path_factory.mktemp("mllama-refill"))))


PROMPTS = ["how many objects are there ?", "what colour is the big circle ?", "describe the image"]


def _inputs(adapter, images, prompts):
    features = adapter.image_features(images)
    rows = [adapter.prompt_ids(p, f) for p, f in zip(prompts, features)]
    return adapter.model_inputs(rows, features, left=True)


def _greedy(logits, generator):
    return logits.argmax(-1)


@pytest.mark.parametrize("slots", [1, 2, 5])
@pytest.mark.parametrize("sync_every", [1, 3])
def test_refilled_slots_decode_as_a_fresh_prompt(mllama, slots, sync_every):
    """A slot that starts a prompt's next sample restarts from the prompt's prefill: own cache from index 0,
    positions from the prompt's end. With a deterministic sampler every sample is the prompt's greedy output,
    however the samples were spread over slots, and ends where that output ends."""
    images = _images(3, seed=4)
    full = decode_groups(mllama.model, _inputs(mllama, images, PROMPTS), n=1, max_new_tokens=9, eos_ids=set(),
                         sampler=_greedy)
    eos = {full[0][0][2], full[1][0][5]}  # samples that end at different lengths
    kwargs = dict(max_new_tokens=9, eos_ids=eos, sampler=_greedy)
    alone = decode_groups(mllama.model, _inputs(mllama, images, PROMPTS), n=1, **kwargs)
    groups = decode_groups(mllama.model, _inputs(mllama, images, PROMPTS), n=5, slots=slots,
                           options=DecodeOptions(sync_every=sync_every), **kwargs)
    assert [len(g) for g in groups] == [5, 5, 5]
    for (reference,), group in zip(alone, groups):
        assert all(sample == reference for sample in group)
    assert any(len(r[0]) < 9 for r in alone)


def test_host_looks_every_few_steps_without_changing_greedy_text(mllama):
    images = _images(3, seed=5)
    one = mllama.generate(images, PROMPTS, max_new_tokens=10, stop=["e"])
    for sync_every in (2, 4):
        inputs = _inputs(mllama, images, PROMPTS)
        groups = decode_groups(mllama.model, inputs, n=1, max_new_tokens=10, eos_ids=mllama.eos_ids,
                               options=DecodeOptions(sync_every=sync_every),
                               stop=lambda tokens: "e" in mllama.decode_raw(tokens))
        texts = [[mllama.decode(g[0]).split("e")[0] if "e" in mllama.decode(g[0]) else mllama.decode(g[0])]
                 for g in groups]
        assert [[t.rstrip()] for (t,) in texts] == [[t.rstrip()] for (t,) in one]


def test_early_stop_on_the_device_vote_stops_when_the_host_rule_would(tmp_path):
    """The shipped toy, greedy: every sample is the same 'the answer is X .', so a prompt settles after the
    first k samples with k votes >= min_votes and confidence 1 - 2^-(k+1) >= the threshold; with slots
    finishing together, after the first whole group of slots past k."""
    adapter = load_adapter(None)
    images, prompts = _closed_prompts(4, seed=2)
    inputs = _inputs(adapter, images, prompts)
    stopping = EarlyStop(adapter.span_tables(), confidence=0.9, min_votes=3)  # k = 3: 0.9375 >= 0.9
    for slots, expected in [(1, 3), (2, 4), (4, 4), (16, 16)]:
        groups = decode_groups(adapter.model, inputs, n=16, max_new_tokens=12, eos_ids=adapter.eos_ids,
                               sampler=_greedy, slots=slots, early_stop=stopping)
        greedy = decode_groups(adapter.model, inputs, n=1, max_new_tokens=12, eos_ids=adapter.eos_ids,
                               sampler=_greedy)
        assert [len(g) for g in groups] == [expected] * 4, slots
        assert all(s == g[0] for group, g in zip(groups, greedy) for s in group)
        assert all(extract_answer(adapter.decode(g[0])) for g in greedy)  # the samples have answers
    # a prompt whose answers cannot reach min_votes stops as well; above n it is hopeless from the first step,
    # and the samples then running are dropped (as `sampling_settled` says with nothing drawn)
    hopeless = EarlyStop(adapter.span_tables(), confidence=0.9, min_votes=17)
    groups = decode_groups(adapter.model, inputs, n=16, max_new_tokens=12, eos_ids=adapter.eos_ids,
                           sampler=_greedy, slots=2, early_stop=hopeless)
    assert [len(g) for g in groups] == [0] * 4


def test_generate_with_early_stop_is_seeded_and_draws_fewer_samples():
    adapter = load_adapter(None)
    images, prompts = _closed_prompts(12, seed=5)
    kwargs = dict(n=16, max_new_tokens=12, temperature=0.6, top_k=50, top_p=0.9, seed=3, slots=4,
                  early_stop=0.9, min_votes=5)
    first = adapter.generate(images, prompts, **kwargs)
    assert first == adapter.generate(images, prompts, **kwargs)
    sizes = [len(g) for g in first]
    assert all(1 <= s <= 16 for s in sizes) and sum(sizes) < 16 * len(prompts)
    assert all(extract_answer(s) for g in first for s in g)


def test_synth_uses_the_device_vote_for_mllama(tmp_path):
    from fastjudge import data
    from fastjudge.stages import synth
    from fastjudge.toy.files import write_toy_prompts
    path = write_toy_prompts(tmp_path, count=24, seed=3, closed_fraction=1.0)
    records, _ = data.load_prompts(path)
    adapter = load_adapter(None)
    options = synth.SynthOptions(samples=SamplingParams(n=8, max_new_tokens=12, temperature=0.6, top_k=50, top_p=0.9),
                                 round_size=2, min_votes=3, early_stop=0.8, batch_rows=256)
    result = synth.run(adapter, records, options, seed=1)
    assert result.stats["samples"] < 8 * len(records)
    assert synth.run(adapter, records, options, seed=1).stats == result.stats
    full = synth.run(adapter, records, options.__class__(samples=options.samples, min_votes=3, batch_rows=256), seed=1)
    assert full.stats["samples"] == 8 * len(records)


def test_bad_refill_arguments_name_the_argument(tmp_path, tiny_toy_dir):
    adapter = ToyAdapter.load(tiny_toy_dir)
    images = _images(1, seed=0)
    with pytest.raises(ValueError, match="^slots: "):
        adapter.generate(images, PROMPTS[:1], n=4, temperature=1.0, slots=5)
    with pytest.raises(ValueError, match="^early_stop: "):
        adapter.generate(images, PROMPTS[:1], n=4, temperature=1.0, early_stop=1.5)
    with pytest.raises(ValueError, match="^min_votes: "):
        adapter.generate(images, PROMPTS[:1], n=4, temperature=1.0, early_stop=0.9, min_votes=0)
    with pytest.raises(ValueError, match="^min_votes: "):
        adapter.generate(images, PROMPTS[:1], n=4, temperature=1.0, early_stop=0.9, min_votes=5)
    qwen = load_adapter(str(tiny.build_checkpoint("qwen2_vl", tmp_path / "qwen")))
    with pytest.raises(ValueError, match="^early_stop, slots: "):
        qwen.generate(images, ["How many?"], n=4, temperature=1.0, early_stop=0.9)
    with pytest.raises(ValueError, match="^slots: "):
        decode_groups(adapter.model, _inputs(adapter, images, PROMPTS[:1]), n=2, slots=3, max_new_tokens=2,
                      eos_ids=set(), sampler=_greedy)


def test_drop_in_generate_passes_early_stop_through(tmp_path):
    """`fastjudge.sampler.generate` with the Mllama processor: a random model writes no answer marker, so with
    min_votes 3 of n 6 a prompt is hopeless once 4 samples are in (no answer can reach 3 votes): with 2 slots
    that is after the second pair of samples."""
    from transformers import AutoProcessor, MllamaForConditionalGeneration

    from fastjudge.sampler import generate
    folder = tiny.build_checkpoint("mllama", tmp_path / "mllama")
    model, processor = MllamaForConditionalGeneration.from_pretrained(folder), AutoProcessor.from_pretrained(folder)
    images = _images(3, seed=9)
    kwargs = dict(n=6, max_new_tokens=8, temperature=1.0, seed=4)
    out = generate(model, processor, images, PROMPTS, slots=2, early_stop=0.9, min_votes=3, **kwargs)
    assert [len(g) for g in out] == [4, 4, 4]
    assert not any(extract_answer(s) for g in out for s in g)
    assert [len(g) for g in generate(model, processor, images, PROMPTS, **kwargs)] == [6, 6, 6]


def _multinomial(temperature):
    def sampler(logits, generator):
        probs = torch.softmax(logits.float() / temperature, dim=-1)
        return torch.multinomial(probs, 1, generator=generator).flatten()
    return sampler


def _closed_prompts(count, seed):
    rng = random.Random(seed)
    images, prompts = [], []
    while len(prompts) < count:
        scene = world.random_scene(rng)
        closed = [q for q in world.questions(scene, rng) if q.kind == "closed"]
        if closed:
            images.append(world.render(scene, rng))
            prompts.append(closed[0].instruction)
    return images, prompts


def test_device_answers_equal_the_tracker_on_each_sample():
    """Samples that differ (the shipped toy at temperature 3: some with an answer, some without) spread over
    refilled slots: the answer the decoder recorded for each sample is the tracker's on that sample's tokens
    alone, so no span state leaks from a slot's previous sample into its next."""
    adapter = load_adapter(None)
    images, prompts = _closed_prompts(6, seed=8)
    stopping = EarlyStop(adapter.span_tables(), confidence=1.0, min_votes=1)  # never settles: all 8 drawn
    groups = decode_groups(adapter.model, _inputs(adapter, images, prompts), n=8, slots=3, max_new_tokens=12,
                           eos_ids=adapter.eos_ids, sampler=_multinomial(3.0), early_stop=stopping,
                           generator=torch.Generator().manual_seed(0))
    assert [len(g) for g in groups] == [8] * 6
    vote = stopping.last_vote
    recorded = []
    for b, group in enumerate(groups):
        for s, tokens in enumerate(group):
            expected = _track(adapter.span_tables(), [tokens])[0]
            got = int(vote.hash[b, s]) if bool(vote.found[b, s]) else None
            assert got == expected, (b, s, adapter.decode(tokens))
            recorded.append(expected)
    assert any(r is None for r in recorded) and any(r is not None for r in recorded)


@pytest.mark.parametrize("sync_every", [1, 3])
def test_stop_strings_end_samples_where_they_appear(sync_every):
    """A sample that writes a stop string ends at the next look from the host: right after it when the host
    looks every step, within sync_every tokens otherwise; refilled slots included."""
    adapter = load_adapter(None)
    images, prompts = _closed_prompts(4, seed=9)

    def stop(tokens):
        return "is" in adapter.decode_raw(tokens).split()
    groups = decode_groups(adapter.model, _inputs(adapter, images, prompts), n=6, slots=2, max_new_tokens=12,
                           eos_ids=adapter.eos_ids, sampler=_multinomial(1.5), stop=stop,
                           options=DecodeOptions(sync_every=sync_every), generator=torch.Generator().manual_seed(1))
    stopped = 0
    for group in groups:
        assert len(group) == 6
        for tokens in group:
            if stop(tokens):
                stopped += 1
                first = next(i for i in range(1, len(tokens) + 1) if stop(tokens[:i]))
                assert len(tokens) - first <= sync_every - 1, adapter.decode(tokens)
    assert stopped > 6
