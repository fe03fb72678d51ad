"""The paper's recipe on the toy: the rejection-sampling filter's keep rule, the pretraining that leaves some checks
unlearned (blind), and the probes that watch the reasoning (pass@k of right checks, label accuracy of kept pairs)."""

import json
import random

import pytest

from fastjudge.config import LoopConfig
from fastjudge.core.voting import majority_vote
from fastjudge.data import prompts
from fastjudge.models import ToyAdapter
from fastjudge.stages import filter as filter_stage
from fastjudge.stages import synth
from fastjudge.toy import files as toy_files
from fastjudge.toy import pretrain, world
from fastjudge.toy import rates as toy_rates
from test_toy_rates import count_pairs


@pytest.mark.parametrize("good_first, bad_first, per_order, expected", [
    ([False, False], [True, True], 1, ([], [])),  # never right shown good-first: dropped
    ([True, False], [False, False], 3, ([], [])),  # never right shown bad-first: dropped
    ([False, True, True], [True, False, False], 1, ([1], [0])),  # the first agreeing judgment of each order
    ([True, True, True], [False, True, True], 2, ([0, 1], [1, 2])),
    ([True, True, True], [False, False, True], 5, ([0], [2])),  # as many of each order: balanced A and B
])
def test_the_keep_rule_takes_agreeing_judgments_balanced_between_orders(good_first, bad_first, per_order, expected):
    assert filter_stage.select_traces(good_first, bad_first, per_order) == expected


def test_pair_from_vote_takes_the_majority_and_a_random_rival():
    """The vote-to-pair rule on its own: the good sample is the winner's first, the bad one a random sample of a
    random rival answer; no pair without a majority, without a rival, or (oracle) without the true answer."""
    vote = majority_vote([["2", "3", "2", "4", "2", "3"]], min_votes=2)[0]
    picks = {synth.pair_from_vote(vote, random.Random(seed))[0] for seed in range(40)}
    assert {good for good, _ in picks} == {0} and {bad for _, bad in picks} == {1, 3, 5}
    assert synth.pair_from_vote(vote, random.Random(0))[1] == "pair"
    assert synth.pair_from_vote(majority_vote([["2", "3"]], min_votes=2)[0], random.Random(0)) == (None, "no_majority")
    assert synth.pair_from_vote(majority_vote([["2", "2"]], min_votes=2)[0], random.Random(0)) == (None, "unanimous")
    (good, bad), _ = synth.pair_from_vote(vote, random.Random(0), truth="3")  # the oracle's answer wins
    assert good == 1 and bad in (0, 2, 3, 4)
    assert synth.pair_from_vote(vote, random.Random(0), truth="7") == (None, "oracle_unsampled")


def test_the_filter_samples_k_judgments_per_order_and_keeps_the_agreeing_ones(tiny_toy_dir, tmp_path):
    judge = ToyAdapter.load(tiny_toy_dir)
    pairs = count_pairs(tmp_path, 6)
    options = LoopConfig(out=str(tmp_path), model=str(tiny_toy_dir), judge_tokens=12, filter_samples=5,
                         filter_traces=2, filter_temperature=3.0).filter_options()
    result = filter_stage.run(judge, pairs, options, seed=1)
    assert len(result.judgments) == 6 * 2 * 5
    by_call = {}
    for j in result.judgments:
        by_call.setdefault((j["pair"], j["order"]), []).append(j)
    kept = 0
    for i in range(6):
        first, second = by_call[(i, "good_first")], by_call[(i, "bad_first")]
        assert [j["sample"] for j in first] == list(range(5))
        a_idx, b_idx = filter_stage.select_traces([j["verdict"] == "A" for j in first],
                                                  [j["verdict"] == "B" for j in second], 2)
        traces = [t for t in result.traces if t["pair"] == i]
        assert [t["target"] for t in traces] == [first[s]["output"] for s in a_idx] + [second[s]["output"] for s in b_idx]
        assert [t["verdict"] for t in traces] == ["A"] * len(a_idx) + ["B"] * len(b_idx)
        kept += bool(traces)
    assert result.stats["kept"] == kept
    assert sum(t["verdict"] == "A" for t in result.traces) == sum(t["verdict"] == "B" for t in result.traces)


def test_blind_checks_are_coin_flips_only_for_their_family():
    rng = random.Random(0)
    right = {"caption": [], "closed": []}
    a_yes = []
    for _ in range(1500):
        _, prompt, target, _ = pretrain.example(rng, "judge", verdict_follow=1.0, blind_checks=("caption",))
        a = prompt.split(" answer A : ")[1].split(" answer B : ")[0]
        b = prompt.split(" answer B : ")[1].removesuffix(" which answer is better ?")
        own, a_agrees, b_agrees = prompts.parse_toy_reasoning(prompts.judge_reasoning(target))
        kind = "caption" if world.parse_caption(own) is not None else "closed"
        right[kind].append((a_agrees, b_agrees) == (own == a, own == b))
        if kind == "caption":
            a_yes.append(a_agrees)
        # the verdict follows the checks where they pick one answer, else the position bias
        assert prompts.parse_verdict(target) == (prompts.checks_verdict(prompts.judge_reasoning(target)) or "A")
    assert all(right["closed"])
    # both checks right by chance: a quarter of caption examples; "yes" half the time
    assert abs(sum(right["caption"]) / len(right["caption"]) - 0.25) < 0.05
    assert abs(sum(a_yes) / len(a_yes) - 0.5) < 0.05


def test_blind_checks_leave_other_settings_data_stream_alone_and_name_bad_families():
    plain = [pretrain.example(random.Random(4), "judge", given_own=0.8)[1:] for _ in range(1)]
    blind_elsewhere = [pretrain.example(random.Random(4), "judge", given_own=0.8, blind_checks=())[1:]]
    assert plain == blind_elsewhere
    with pytest.raises(ValueError, match="^blind_checks: unknown famil"):
        pretrain.PretrainConfig(blind_checks=("captions",))


def _item(index, category, correct_first=True):
    return {"index": index, "category": category, "human_ranking": [0, 1] if correct_first else [1, 0],
            "response": ["the answer is 2 .", "the answer is 3 ."]}


def _row(index, shown_first, a_yes, b_yes):
    reasoning = prompts.toy_reasoning("the answer is 2 .", a_yes, b_yes)
    return {"index": index, "shown_first": shown_first, "output": prompts.judge_target(reasoning, "A")}


def test_pass_at_k_counts_an_item_once_one_sample_checks_right():
    items = [_item(0, "count"), _item(1, "count"), _item(2, "vqa")]
    rows = [
        _row(0, 0, True, False), _row(0, 1, True, False),  # right shown first (A correct), wrong shown second
        _row(1, 0, True, True), _row(1, 0, False, True),  # never singles out the correct answer
        _row(2, 1, False, True), _row(2, 1, False, True),  # correct shown second (B): right twice
    ]
    passed = toy_rates.checks_pass_at_k(items, rows)
    assert passed["k"] == 2
    assert passed["pass_at_k"] == pytest.approx(2 / 3)
    assert passed["sampled_right"] == pytest.approx(3 / 6)
    assert passed["count pass_at_k"] == pytest.approx(1 / 2) and passed["vqa pass_at_k"] == 1.0
    assert passed["count sampled_right"] == pytest.approx(1 / 4)


def test_kept_pairs_label_rates_read_the_traces_pairs(tmp_path):
    truth = toy_files.toy_prompt_truth(30, seed=5)
    pairs = []
    for pid, q in truth.items():
        right = world.response_for(q)
        wrong = world.rewrite_with_error(right, random.Random(pid))
        source = "rewrite" if q.kind == "open" else "vote"
        good, bad = (right, wrong) if len(pairs) % 3 else (wrong, right)  # every third label inverted
        pairs.append({"id": pid, "good": good, "bad": bad, "source": source})
    kept = [i for i in range(len(pairs)) if i % 2 == 0]
    traces = [{"pair": i} for i in kept for _ in range(2)]
    rates = toy_rates.iteration_rates(pairs, [], [], [], 30, 5, 0.5, traces)
    expected = toy_rates.label_rates([pairs[i] for i in kept], truth)
    assert rates["kept_labels_right"] == expected["labels_right"]
    assert rates["kept_labels_inverted"] == expected["labels_inverted"]
    assert sum(rates["kept_pairs"].values()) == len(kept)


def test_a_run_config_written_before_the_recipe_settings_resumes_as_it_ran(tmp_path):
    old = {"out": str(tmp_path / "run"), "seed": 3, "train_loss": None, "filter_reasoning": "greedy"}
    (tmp_path / "config.json").write_text(json.dumps(old))
    cfg = LoopConfig.load(tmp_path / "config.json")
    assert (cfg.train_loss, cfg.filter_reasoning, cfg.filter_samples) == ("verdict", "greedy", 1)
    older = {"out": str(tmp_path / "run"), "seed": 3, "filter_reasoning": "greedy"}  # before train_loss
    (tmp_path / "config.json").write_text(json.dumps(older))
    assert LoopConfig.load(tmp_path / "config.json").train_loss == "trace"
    fresh = LoopConfig(out=str(tmp_path / "new"))
    assert (fresh.train_loss, fresh.filter_reasoning, fresh.filter_samples) == ("checks", "sampled", 8)


def _entries(*overall):
    return [{"metrics": {"overall": x}} for x in overall]


@pytest.mark.parametrize("overall, flat", [
    ((0.5,), 0), ((0.5, 0.8), 0), ((0.5, 0.8, 0.79), 1), ((0.5, 0.8, 0.79, 0.795), 2),
    ((0.5, 0.8, 0.79, 0.85), 0), ((0.5, None), 1),
])
def test_flat_iterations_count_the_iterations_in_a_row_that_gained_too_little(overall, flat):
    from fastjudge.loop import flat_iterations
    assert flat_iterations(_entries(*overall), 0.01) == flat
