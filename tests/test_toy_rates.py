"""The toy preset's rates measured against the scenes (`toy_rates`), the filter's greedy reasoning, and the
proof that the loop's stages never read the scene ground truth."""

import json
import random
from pathlib import Path

import pytest

from fastjudge import ablations, data, loop
from fastjudge.gate import Gate
from fastjudge.config import LoopConfig
from fastjudge.data import prompts
from fastjudge.models import ToyAdapter
from fastjudge.stages import filter as filter_stage
from fastjudge.toy import files as toy_files
from fastjudge.toy import rates as toy_rates
from fastjudge.toy import world

SMALL = dict(iterations=1, prompts_per_iteration=6, n_samples=4, min_votes=2, answer_tokens=10, judge_tokens=12,
             epochs=1, batch_size=4, min_gain=-1.0, batch_rows=64)


def test_label_rates_compare_each_pair_with_the_truth():
    truth = toy_files.toy_prompt_truth(40, seed=5)
    pairs = []
    for pid, q in truth.items():
        right = world.response_for(q)
        wrong = world.rewrite_with_error(right, random.Random(pid))
        source = "rewrite" if q.kind == "open" else "vote"
        pairs.append({"id": pid, "good": right, "bad": wrong, "source": source})
        pairs.append({"id": pid, "good": wrong, "bad": right, "source": source})  # inverted
        pairs.append({"id": pid, "good": wrong, "bad": wrong, "source": source})  # neither right
    rates = toy_rates.label_rates(pairs, truth)
    for source in ("rewrite", "vote"):
        assert rates["labels_right"][source] == pytest.approx(1 / 3)
        assert rates["labels_inverted"][source] == pytest.approx(1 / 3)
    assert sum(rates["pairs"].values()) == len(pairs)


def test_toy_prompt_truth_is_the_pool_that_was_written(tmp_path):
    path = toy_files.write_toy_prompts(tmp_path, 12, seed=9, closed_fraction=0.5)
    records = data.read_jsonl(path)
    truth = toy_files.toy_prompt_truth(12, seed=9, closed_fraction=0.5)
    assert [r["id"] for r in records] == list(truth)
    assert [r["instruction"] for r in records] == [q.instruction for q in truth.values()]
    # a longer pool starts with the same prompts: the truth of a run's pool does not depend on its length
    assert list(toy_files.toy_prompt_truth(20, seed=9).items())[:12] == list(truth.items())


class _Answerer:
    """A stand-in model for the perception probe: answers each question it is asked (in order) with a given list
    of responses, and records the instructions."""

    def __init__(self, responses):
        self.responses, self.asked = responses, []

    def generate(self, images, texts, max_new_tokens):
        self.asked = list(texts)
        return [(r,) for r in self.responses]


def test_perception_probe_scores_each_category_and_question_family():
    # replay the probe's draws independently to know each question; answer right except where-is questions
    rng = random.Random(toy_rates.PROBE_SEED)
    draws = []
    for category, _, scene, (question, _, _) in world.benchmark_draws(rng, 12):
        world.render(scene, rng)  # the probe renders each scene from the same stream
        draws.append((category, question))
    responses = [world.closed_response("nowhere") if q.family == "where" else world.response_for(q)
                 for _, q in draws]
    model = _Answerer(responses)
    probe = toy_rates.perception_probe(model, 12)
    assert model.asked == [q.instruction for _, q in draws]
    assert probe["counts"] == {c: 12 for c in world.CATEGORIES}
    wheres = sum(q.family == "where" for c, q in draws if c == "spatial")
    assert 0 < wheres < 12  # spatial mixes captions, where-is and relation questions
    assert probe["categories"]["spatial"] == pytest.approx(1 - wheres / 12)
    assert all(probe["categories"][c] == 1.0 for c in world.CATEGORIES if c != "spatial")
    assert probe["families"]["spatial where"] == 0.0
    assert {f for f in probe["families"] if f.startswith("vqa ")} <= {"vqa attribute", "vqa option"}
    assert all(v == 1.0 for f, v in probe["families"].items() if f != "spatial where")


def _output(own, a_yes, b_yes, verdict):
    return prompts.judge_target(prompts.toy_reasoning(own, a_yes, b_yes), verdict)


def test_bench_rates_read_own_answer_checks_and_verdict():
    good, bad = "the answer is 2 .", "the answer is 3 ."
    items = [{"index": i, "response": [good, bad], "human_ranking": [0, 1], "category": "count" if i < 2 else "vqa"}
             for i in range(4)]
    outputs = [
        # shown as given (A = good): right answer, right checks, verdict follows
        {"index": 0, "shown_first": 0, "verdict": "A", "output": _output(good, True, False, "A")},
        # swapped (A = bad): right answer and checks, verdict does not follow (position bias)
        {"index": 1, "shown_first": 1, "verdict": "A", "output": _output(good, False, True, "A")},
        # wrong own answer, checks point to the bad answer, verdict follows them
        {"index": 2, "shown_first": 0, "verdict": "B", "output": _output(bad, False, True, "B")},
        # no checks at all
        {"index": 3, "shown_first": 0, "verdict": None, "output": "my answer : the answer is 2 ."},
    ]
    rates = toy_rates.bench_rates(items, outputs)
    assert rates["own_answer_right"] == pytest.approx(2 / 4)
    assert rates["reasoning_right"] == pytest.approx(2 / 4)
    assert rates["verdict_follows_reasoning"] == pytest.approx(2 / 3)
    assert rates["reasoning_right_by_category"] == {"count": 1.0, "vqa": 0.0}


def count_pairs(folder: Path, count: int) -> list[dict]:
    """`count` closed pairs ("2" against "3" objects) on the images of a toy prompt pool written in `folder`."""
    images = toy_files.write_toy_prompts(folder, count, seed=2).parent / "images"
    return [{"id": f"p{i}", "image": str(images / f"p{i:05d}.png"), "instruction": "how many objects are there ?",
             "good": "the answer is 2 .", "bad": "the answer is 3 .", "source": "vote"} for i in range(count)]


def test_filter_trains_on_greedy_reasoning_with_the_verdict_sampled(tiny_toy_dir, tmp_path):
    judge = ToyAdapter.load(tiny_toy_dir)
    pairs = count_pairs(tmp_path, 4)
    cfg = LoopConfig(out=str(tmp_path), model=str(tiny_toy_dir), judge_tokens=12, filter_reasoning="greedy")
    result = filter_stage.run(judge, pairs, cfg.filter_options(), seed=1)
    images = data.load_images([p["image"] for p in pairs for _ in range(2)])
    judge_prompts = [prompts.judge_prompt(p["instruction"], a, b) for p in pairs
                     for a, b in ((p["good"], p["bad"]), (p["bad"], p["good"]))]
    greedy = [c[0] for c in judge.generate(images, judge_prompts, max_new_tokens=12)]
    assert len(result.judgments) == len(greedy) * cfg.filter_samples
    for judgment in result.judgments:
        # the reasoning is the greedy one of its call; only what follows "[[" may differ
        text = greedy[2 * judgment["pair"] + (judgment["order"] == "bad_first")]
        cut = text.index("[[") + 2 if "[[" in text else len(text)
        assert judgment["output"][:cut] == text[:cut]


def _toy_preset(tmp_path, tiny_toy_dir, monkeypatch, **extra):
    return LoopConfig(out=str(tmp_path / "run"), model=str(tiny_toy_dir), toy_bench_per_category=2,
                      **(SMALL | extra))


def test_toy_preset_records_the_rates_of_every_iteration(tmp_path, tiny_toy_dir, monkeypatch):
    cfg = _toy_preset(tmp_path, tiny_toy_dir, monkeypatch)
    summary = loop.run(cfg)
    for entry in summary["iterations"]:
        rates = entry["rates"]
        assert rates == json.loads((Path(cfg.out) / f"iter_{entry['iteration']}" / "rates.json").read_text())
        for name in ("own_answer_right", "reasoning_right"):
            assert 0 <= rates[name] <= 1
    first = summary["iterations"][1]["rates"]
    assert set(first["labels_right"]) <= {"rewrite", "vote"} and first["labels_right"]
    judgments = data.read_jsonl(Path(cfg.out) / "iter_1" / "judgments.jsonl")
    agree = sum(j["verdict"] == j["expected"] for j in judgments) / len(judgments)
    assert first["verdict_agrees_label"] == pytest.approx(agree)


def test_the_loop_never_reads_the_scene_ground_truth(tmp_path, tiny_toy_dir, monkeypatch):
    """The toy preset's world and benchmark are written first (images and instructions; the benchmark's
    answers are its labels); then every way to the scenes' truth raises, and a whole iteration (synth, filter,
    train, eval) still runs."""
    cfg = _toy_preset(tmp_path, tiny_toy_dir, monkeypatch)
    loop.prepare_inputs(cfg, Path(cfg.out), Gate(Path(cfg.out)))

    def forbidden(*args, **kwargs):
        raise AssertionError("the loop read the scene ground truth")

    for name in ("random_scene", "questions", "benchmark_item", "render", "caption", "response_for"):
        monkeypatch.setattr(world, name, forbidden)
    monkeypatch.setattr(toy_files, "toy_prompt_truth", forbidden)
    monkeypatch.setattr(ablations, "toy_prompt_truth", forbidden)
    monkeypatch.setattr(toy_rates, "toy_prompt_truth", forbidden)
    monkeypatch.setattr(loop, "measures_rates", lambda cfg: False)  # the rates are measured with the truth
    summary = loop.run(LoopConfig(**(vars(cfg) | {"resume": True})))
    assert [e["iteration"] for e in summary["iterations"]] == [0, 1]
    assert summary["iterations"][1]["pairs"] > 0


def test_ablation_no_filter_trains_on_every_judgment(tmp_path, tiny_toy_dir, monkeypatch):
    cfg = _toy_preset(tmp_path, tiny_toy_dir, monkeypatch, ablation="no-filter")
    summary = loop.run(cfg)
    pairs = data.read_jsonl(Path(cfg.out) / "iter_1" / "pairs.jsonl")
    traces = data.read_jsonl(Path(cfg.out) / "iter_1" / "sft.jsonl")
    judgments = data.read_jsonl(Path(cfg.out) / "iter_1" / "judgments.jsonl")
    # every pair gives the traces a kept pair would: its first judgment in each order, whatever the verdicts
    assert len(traces) == 2 * len(pairs) and len(judgments) == 2 * len(pairs) * cfg.filter_samples
    assert [t["target"] for t in traces] == [j["output"] for j in judgments if j["sample"] == 0]
    assert summary["iterations"][1]["keep_rate"] == 1.0


def test_ablation_shuffled_labels_swaps_about_half_the_pairs(tmp_path, tiny_toy_dir, monkeypatch):
    plain = loop.run(_toy_preset(tmp_path / "plain", tiny_toy_dir, monkeypatch, prompts_per_iteration=24))
    shuffled = loop.run(_toy_preset(tmp_path / "shuffled", tiny_toy_dir, monkeypatch, prompts_per_iteration=24,
                                    ablation="shuffled-labels"))
    a = data.read_jsonl(tmp_path / "plain" / "run" / "iter_1" / "pairs.jsonl")
    b = data.read_jsonl(tmp_path / "shuffled" / "run" / "iter_1" / "pairs.jsonl")
    assert [p["id"] for p in a] == [p["id"] for p in b] and len(a) >= 8
    swapped = [(x["good"], x["bad"]) == (y["bad"], y["good"]) for x, y in zip(a, b)]
    assert all(s or (x["good"], x["bad"]) == (y["good"], y["bad"]) for s, x, y in zip(swapped, a, b))
    assert 0 < sum(swapped) < len(swapped)
    assert plain and shuffled


def test_ablation_oracle_votes_labels_closed_pairs_with_the_true_answer(tmp_path, tiny_toy_dir, monkeypatch):
    cfg = _toy_preset(tmp_path, tiny_toy_dir, monkeypatch, ablation="oracle-votes", prompts_per_iteration=24,
                      closed_fraction=1.0, n_samples=8, min_votes=1)
    loop.run(cfg)
    truth = toy_files.toy_prompt_truth(24, cfg.seed, 1.0)
    for pair in data.read_jsonl(Path(cfg.out) / "iter_1" / "pairs.jsonl"):
        question = truth[pair["id"]]
        assert toy_rates.says_truth(pair["good"], question) and not toy_rates.says_truth(pair["bad"], question)
    with pytest.raises(ValueError, match="^ablation: 'oracle-votes' needs"):
        LoopConfig(out=str(tmp_path / "x"), prompts=str(Path(cfg.out) / "world" / "prompts.jsonl"),
                   ablation="oracle-votes")
