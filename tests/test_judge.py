"""Using a judge (`fastjudge.Judge`, `fastjudge judge`, `fastjudge rank`): p_a read from the verdict logits, both
orders combined, Bradley-Terry ranking, the command's verdicts against `eval`'s, bad pair lines skipped."""

import json
import random

import numpy as np
import pytest
import torch
from PIL import Image

import tiny
from fastjudge import cli
from fastjudge.data import prompts as prompt_texts
from fastjudge.judge import Judge, Judgment, bradley_terry
from fastjudge.models import ToyAdapter, load_adapter


def _image(seed=0, size=(40, 40)):
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (*size, 3), dtype=np.uint8))


@pytest.mark.parametrize("source", ["toy", "mllama"])
def test_choice_probabilities_are_the_softmax_of_the_two_verdict_logits(source, tiny_toy_dir, tmp_path):
    adapter = ToyAdapter.load(tiny_toy_dir) if source == "toy" else \
        load_adapter(str(tiny.build_checkpoint("mllama", tmp_path / "m")))
    style = adapter.judge_style
    images = [_image(1), _image(2, (28, 56))]
    prompts = [prompt_texts.judge_prompt("how many circles ?", "two", "three", style),
               prompt_texts.judge_prompt("what colour ?", "a long answer about the red square", "blue", style)]
    outputs = ["my answer : the answer is 2 . A : yes B : no verdict : [[ A", "some reasoning without a verdict"]
    prefixes = [prompt_texts.verdict_prefix(o, style) for o in outputs]
    got = adapter.choice_probabilities(images, prompts, prefixes, prompt_texts.VERDICT_CHOICES[style])
    for image, prompt, prefix, (p_a, p_b) in zip(images, prompts, prefixes, got):
        # by hand: the row alone (no padding), its last position's logits, the two letters' tokens
        feature = adapter.image_features([image])
        a_ids, b_ids = (adapter.prefix_ids(prefix + c) for c in prompt_texts.VERDICT_CHOICES[style])
        shared = next(i for i, (x, y) in enumerate(zip(a_ids, b_ids)) if x != y)
        row = adapter.prompt_ids(prompt, feature[0]) + a_ids[:shared]
        with torch.no_grad():
            logits = adapter.model(**adapter.model_inputs([row], feature, left=True)).logits[0, -1].double()
        expected = torch.softmax(logits[[a_ids[shared], b_ids[shared]]], dim=0)
        assert p_a + p_b == pytest.approx(1.0)
        assert p_a == pytest.approx(float(expected[0]), rel=1e-5, abs=1e-7)


def test_verdict_prefix_cuts_before_the_letter_or_adds_the_lead_in():
    assert prompt_texts.verdict_prefix("reasons verdict : [[ B ]]", "toy") == "reasons verdict : [["
    assert prompt_texts.verdict_prefix("reasons", "toy") == "reasons verdict : [["
    assert prompt_texts.verdict_prefix("Because.\n\n[[A]]", "natural") == "Because.\n\n[["
    assert prompt_texts.verdict_prefix("Because.  ", "natural") == "Because.\n\n[["
    # a bracket in the reasoning is not the verdict's: the last one is
    assert prompt_texts.verdict_prefix("[[A]] looks wrong. [[B]]", "natural") == "[[A]] looks wrong. [["


class _Scripted:
    """An adapter stand-in: each judge prompt's reasoning and its probability of the first-shown answer."""
    judge_style = "toy"

    def __init__(self, p_first):
        self.p_first = p_first  # prompt -> probability of "A"
        self.calls = []

    def prefix_ids(self, text):  # characters as tokens: a verdict reader can be made, and reads nothing here
        return [ord(c) for c in text]

    def generate(self, images, prompts, params, **kwargs):
        self.calls.append((len(prompts), params.n))
        return [[f"reasoning {s} for {p}" for s in range(params.n)] for p in prompts]

    def choice_probabilities(self, images, prompts, prefixes, choices, batch_rows=32):
        return [[self.p_first[p], 1 - self.p_first[p]] for p in prompts]


def test_both_orders_combine_with_the_second_mapped_back():
    ab = prompt_texts.judge_prompt("q", "x", "y", "toy")
    ba = prompt_texts.judge_prompt("q", "y", "x", "toy")
    judge = Judge(_Scripted({ab: 0.9, ba: 0.3}))  # (x, y): A 0.9; (y, x): A (= y) 0.3, so x 0.7
    j = judge.compare(_image(), "q", "x", "y")
    assert j.p_a_by_order == pytest.approx([0.9, 0.7]) and j.p_a == pytest.approx(0.8)
    assert j.verdict == "A" and j.orders_agree is True and len(j.reasonings) == 2
    flipped = Judge(_Scripted({ab: 0.9, ba: 0.8})).compare(_image(), "q", "x", "y")  # "A" whatever is shown first
    assert flipped.orders_agree is False and flipped.p_a == pytest.approx(0.55)
    one = Judge(_Scripted({ab: 0.2, ba: 0.5})).compare(_image(), "q", "x", "y", both_orders=False, k=3)
    assert one.p_a == pytest.approx(0.2) and one.verdict == "B" and one.orders_agree is None
    assert len(one.reasonings) == 3


def test_bradley_terry_recovers_a_known_order():
    rng = random.Random(0)
    strength = [rng.uniform(0.2, 5.0) for _ in range(6)]
    outcomes = [(i, j, strength[i] / (strength[i] + strength[j])) for i in range(6) for j in range(6) if i < j]
    scores = bradley_terry(6, outcomes)
    assert sorted(range(6), key=lambda i: -scores[i]) == sorted(range(6), key=lambda i: -strength[i])
    assert sum(scores) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        bradley_terry(2, [(0, 1, 1.5)])


def test_bradley_terry_adds_one_pseudo_game_per_pair_by_hand():
    # two items, 0 beat 1 once: wins 1 + 0.5 and 0 + 0.5 over 2 games, so s0 / s1 = 3
    assert bradley_terry(2, [(0, 1, 1.0)]) == pytest.approx([0.75, 0.25])
    # the same outcome judged twice weighs twice against the one pseudo-game: s0 / s1 = 2.5 / 0.5
    assert bradley_terry(2, [(0, 1, 1.0), (1, 0, 0.0)]) == pytest.approx([5 / 6, 1 / 6])
    with pytest.raises(ValueError, match=r"items \[2\]: in no outcome"):
        bradley_terry(3, [(0, 1, 0.5)])


def test_rank_orders_by_the_fit(monkeypatch):
    judge = Judge(_Scripted({}))
    truth = {"best": 3.0, "middle": 1.0, "worst": 0.2}

    def compare_many(images, questions, a, b, k=1, both_orders=True, progress=None):
        return [Judgment(p_a=truth[x] / (truth[x] + truth[y]), verdict="A") for x, y in zip(a, b)]
    monkeypatch.setattr(judge, "compare_many", compare_many)
    order, scores = judge.rank(_image(), "q", ["middle", "worst", "best"])
    assert order == [2, 0, 1] and scores[2] > scores[0] > scores[1]


def test_the_judge_command_agrees_with_eval_and_rank_runs(tmp_path):
    """On the toy benchmark, the shipped base judged with `fastjudge judge` (one order, greedy) names the answer
    that `fastjudge eval` names wherever eval parsed a verdict; `fastjudge rank` ranks candidates."""
    assert cli.main(["toy-data", "--out", str(tmp_path / "data"), "--count", "2", "--per-category", "4"]) == 0
    bench = tmp_path / "data" / "benchmark" / "benchmark.jsonl"
    assert cli.main(["eval", "--out", str(tmp_path / "eval"), "--data", str(bench)]) == 0
    items = [json.loads(line) for line in bench.read_text().splitlines()]
    predictions = [json.loads(line) for line in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    pairs = tmp_path / "pairs.jsonl"
    with pairs.open("w") as f:
        for item, prediction in zip(items, predictions):
            first = prediction["shown_first"]
            f.write(json.dumps({"id": item["id"], "image": item["image_path"], "question": item["query"],
                                "response_a": item["response"][first], "response_b": item["response"][1 - first],
                                "eval_verdict": prediction["verdict"]}) + "\n")
    assert cli.main(["judge", "--pairs", str(pairs), "--images", str(bench.parent), "--out", str(tmp_path / "j"),
                     "--no-both-orders"]) == 0
    judged = [json.loads(line) for line in (tmp_path / "j" / "judgments.jsonl").read_text().splitlines()]
    parsed = [j for j in judged if j["eval_verdict"] is not None]
    assert len(judged) == len(items) and len(parsed) >= len(items) // 2
    assert [j["verdict"] for j in parsed] == [j["eval_verdict"] for j in parsed]
    assert all(0.0 <= j["p_a"] <= 1.0 for j in judged)

    both = tmp_path / "both"
    assert cli.main(["judge", "--pairs", str(pairs), "--images", str(bench.parent), "--out", str(both)]) == 0
    summary = json.loads((both / "summary.json").read_text())
    assert summary["judged"] == len(items) and 0 <= summary["order_agreement"] <= 1
    assert summary["position_bias"] == pytest.approx(1 - summary["order_agreement"])

    candidates = tmp_path / "candidates.jsonl"
    candidates.write_text("".join(json.dumps({"id": item["id"], "image": item["image_path"], "question": item["query"],
                                              "answers": [*item["response"], "a red circle"]}) + "\n"
                                  for item in items[:3]))
    assert cli.main(["rank", "--candidates", str(candidates), "--images", str(bench.parent),
                     "--out", str(tmp_path / "r")]) == 0
    ranked = [json.loads(line) for line in (tmp_path / "r" / "rankings.jsonl").read_text().splitlines()]
    assert len(ranked) == 3 and all(sorted(r["order"]) == [0, 1, 2] for r in ranked)
    assert all(r["best"] == r["answers"][r["order"][0]] for r in ranked)


def test_bad_pair_lines_are_counted_skips(tmp_path):
    _image().save(tmp_path / "ok.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    good = {"id": "g", "image": "ok.png", "question": "q ?", "response_a": "two", "response_b": "three"}
    lines = [json.dumps(good), "{not json", json.dumps(dict(good, id="g")), json.dumps(dict(good, id="m", question="")),
             json.dumps(dict(good, id="i", image="broken.png")), json.dumps(dict(good, id="n", response_b=None)),
             json.dumps(dict(good, id="x", image="missing.png"))]
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("\n".join(lines) + "\n")
    assert cli.main(["judge", "--pairs", str(pairs), "--out", str(tmp_path / "out")]) == 0
    skipped = [json.loads(line) for line in (tmp_path / "out" / "skipped-judge.jsonl").read_text().splitlines()]
    assert [s["line"] for s in skipped] == [2, 3, 4, 5, 6, 7]
    reasons = " | ".join(s["reason"] for s in skipped)
    for expected in ("malformed JSON", "already used on line 1", "field 'question'", "field 'image'",
                     "field 'response_b'", "image not found"):
        assert expected in reasons
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["judged"] == 1 and summary["skipped"] == 6


def test_calibration_by_hand():
    """Four judgments of items whose first response is preferred: confidence max(p, 1 - p), right when p >= 0.5
    favours the preferred answer. Bins of width 0.05 over [0.5, 1]."""
    from fastjudge.data.scoring import calibration
    items = [{"index": i, "human_ranking": [0, 1]} for i in range(4)]
    predictions = [{"index": 0, "shown_first": 0, "verdict": "A", "p_first": 0.97},   # right, confidence 0.97
                   {"index": 1, "shown_first": 0, "verdict": "B", "p_first": 0.04},   # wrong, 0.96
                   {"index": 2, "shown_first": 1, "verdict": "B", "p_first": 0.42},   # right (second shown), 0.58
                   {"index": 3, "shown_first": 1, "verdict": "A", "p_first": 0.56}]   # wrong, 0.56
    result = calibration(items, predictions)
    high = result["bins"][-1]
    assert high["count"] == 2 and high["accuracy"] == 0.5 and high["confidence"] == pytest.approx(0.965)
    low = result["bins"][1]  # [0.55, 0.6)
    assert low["count"] == 2 and low["accuracy"] == 0.5 and low["confidence"] == pytest.approx(0.57)
    assert result["ece"] == pytest.approx((2 * abs(0.5 - 0.965) + 2 * abs(0.5 - 0.57)) / 4)
    assert result["judgments"] == 4 and result["first_shown_rate"] == 0.5


def test_predictions_with_a_bad_probability_are_refused(tmp_path):
    from fastjudge.data import load_predictions
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"index": 0, "shown_first": 0, "verdict": "A", "p_first": 1.5}) + "\n")
    with pytest.raises(ValueError, match="line 1: field 'p_first'"):
        load_predictions(path)


@pytest.mark.parametrize("k", [1, 3])
def test_verdicts_read_from_the_decoding_equal_the_second_forward_pass(k, tmp_path):
    """The verdict probabilities read from the logits the decoder drew each verdict from (`VerdictReader`) equal
    those of a second forward pass over prompt and reasoning (`choice_probabilities`), greedy and sampled; the
    shipped toy judge writes its verdicts, so the reader reads (nearly) all of them."""
    from fastjudge.core.sampling_params import SamplingParams
    from fastjudge.models import generation
    from fastjudge.models.toy import base_model_dir
    from fastjudge.toy import files as toy_files
    adapter = ToyAdapter.load(base_model_dir())
    bench = toy_files.write_toy_benchmark(tmp_path / "benchmark", per_category=2)
    pairs_file, _ = toy_files.write_judge_examples(bench, tmp_path / "judge")
    pairs = [json.loads(line) for line in pairs_file.read_text().splitlines()]
    images = [Image.open(pairs_file.parent / p["image"]).convert("RGB") for p in pairs]
    prompts = [prompt_texts.judge_prompt(p["question"], p["response_a"], p["response_b"], "toy") for p in pairs]
    sampling = {} if k == 1 else dict(temperature=1.0, top_k=0, top_p=1.0)
    params = SamplingParams(n=k, max_new_tokens=80, seed=3, stop=("]]",), **sampling)
    reader = generation.VerdictReader(adapter, prompt_texts.VERDICT_CHOICES["toy"])
    outputs = adapter.generate(images, prompts, params, reader=reader)
    read = [p for row in reader.values for p in row]
    assert sum(p is not None for p in read) >= 0.9 * len(read) > 0
    flat = [(row, text) for row, texts in enumerate(outputs) for text in texts]
    forward = adapter.choice_probabilities([images[r] for r, _ in flat], [prompts[r] for r, _ in flat],
                                           [prompt_texts.verdict_prefix(t, "toy") for _, t in flat],
                                           prompt_texts.VERDICT_CHOICES["toy"])
    for got, expected in zip(read, forward):
        if got is not None:
            assert got == pytest.approx(expected, abs=1e-5)
    # judgments: the same texts as a plain generate, and every probability whichever way it was read
    texts, p_first = generation.judgments(adapter, images, prompts, params)
    assert texts == outputs
    assert [p for row in p_first for p in row] == pytest.approx([p[0] for p in forward], abs=1e-5)
