"""VL-RewardBench scoring rules, on hand-computed cases and on the real benchmark's text."""

from __future__ import annotations

import json

import pytest

from conftest import VLRB_FACTS, VLRB_FIXTURE, VLRB_FULL
from fastjudge.data import scoring
from fastjudge.data.scoring import VLRB_GROUPS, item_class, sample_outcome, score_pairwise, vlrb_group


def item(index: int, ranking=(0, 1), group: str = "general") -> dict:
    return {"index": index, "human_ranking": list(ranking), "group": group}


def pred(index: int, shown_first: int, verdict: str | None) -> dict:
    return {"index": index, "shown_first": shown_first, "verdict": verdict}


def by_group(it: dict) -> str:
    return it["group"]


def score(items, predictions, groups=None):
    return score_pairwise(items, predictions, by_group, groups)


# (human_ranking, shown_first, verdict, outcome): the picked response is response[shown_first] for "A",
# the other one for "B"; it agrees when its rank is the lower one.
SAMPLE_CASES = [
    ((0, 1), 0, "A", "agree"),
    ((0, 1), 0, "B", "reject"),
    ((0, 1), 1, "A", "reject"),  # A is response 1, the worse one
    ((0, 1), 1, "B", "agree"),
    ((1, 0), 0, "A", "reject"),
    ((1, 0), 0, "B", "agree"),
    ((1, 0), 1, "A", "agree"),
    ((1, 0), 1, "B", "reject"),
    ((2, 5), 0, "A", "agree"),  # ranks need not be 0/1
    ((0, 1), 0, None, "unparsed"),
    ((0, 1), 1, "C", "unparsed"),
]


@pytest.mark.parametrize("ranking, shown_first, verdict, outcome", SAMPLE_CASES)
def test_one_sample_per_item(ranking, shown_first, verdict, outcome):
    assert sample_outcome(item(0, ranking), pred(0, shown_first, verdict)) == outcome
    result = score([item(0, ranking)], [pred(0, shown_first, verdict)])
    counts = result["items"]
    if outcome == "unparsed":
        assert counts == {"agree": 0, "reject": 0, "excluded": 1, "unpredicted": 0}
        assert result["overall"] is None and result["macro"] is None
    else:
        assert counts[outcome] == 1 and counts["excluded"] == 0
        assert result["overall"] == (1.0 if outcome == "agree" else 0.0)
        assert result["strict"] == (1.0 if outcome == "agree" else 0.0)


def test_shown_first_must_be_0_or_1():
    with pytest.raises(ValueError, match="shown_first"):
        sample_outcome(item(0), pred(0, 2, "A"))


# Outcome lists and their class by the strict-majority rule: a label wins when its count > n / 2.
CLASS_CASES = [
    (["agree"], "agree"),
    (["agree", "agree", "reject"], "agree"),  # 2 > 1.5
    (["reject", "reject", "agree"], "reject"),
    (["agree", "reject"], "tie"),  # 1 is not > 1
    (["unparsed", "unparsed", "agree"], "unparsed"),
    (["agree", "agree", "reject", "unparsed"], "tie"),  # 2 is not > 2
    (["agree", "agree", "agree", "reject"], "agree"),  # 3 > 2
    (["agree", "reject", "unparsed"], "tie"),
    (["agree", "unparsed"], "tie"),
]


@pytest.mark.parametrize("outcomes, expected", CLASS_CASES)
def test_item_class(outcomes, expected):
    assert item_class(outcomes) == expected


def samples_for(outcomes: list[str], index: int) -> list[dict]:
    """Predictions on an item with ranking (0, 1) that produce `outcomes`, alternating the order shown."""
    out = []
    for k, outcome in enumerate(outcomes):
        first = k % 2
        if outcome == "unparsed":
            out.append(pred(index, first, None))
        else:
            good_letter = "A" if first == 0 else "B"  # response 0 is the better one
            bad_letter = "B" if good_letter == "A" else "A"
            out.append(pred(index, first, good_letter if outcome == "agree" else bad_letter))
    return out


@pytest.mark.parametrize("outcomes, expected", CLASS_CASES)
def test_majority_through_score_pairwise(outcomes, expected):
    result = score([item(7)], samples_for(outcomes, 7))
    counts = result["items"]
    if expected in ("agree", "reject"):
        assert counts[expected] == 1 and counts["excluded"] == 0
    else:
        assert counts["excluded"] == 1 and counts["agree"] == counts["reject"] == 0
        assert result["overall"] is None


def test_groups_macro_overall_strict_and_unpredicted():
    items = [
        item(0, group="hallucination"), item(1, group="hallucination"), item(2, group="hallucination"),
        item(3, group="reasoning"),
        item(4, group="reasoning"),  # tie: excluded
        item(5, group="general"),  # no prediction
    ]
    predictions = (
        samples_for(["agree"], 0)
        + samples_for(["agree", "agree", "reject"], 1)  # agree by majority, not unanimous
        + samples_for(["agree", "agree"], 2)
        + samples_for(["reject"], 3)
        + samples_for(["agree", "reject"], 4)
    )
    result = score(items, predictions)
    # hallucination: 3 agree / 3 = 1.0; reasoning: 0 agree / 1 = 0.0; general: nothing scored
    assert result["groups"] == {"hallucination": 1.0, "reasoning": 0.0}
    assert result["overall"] == pytest.approx(3 / 4)  # pooled
    assert result["macro"] == pytest.approx(0.5)  # mean of group accuracies
    assert result["items"] == {"agree": 3, "reject": 1, "excluded": 1, "unpredicted": 1}
    # strict: items 0 and 2 are unanimous agreements among 5 predicted items
    assert result["strict"] == pytest.approx(2 / 5)

    named = score(items, predictions, groups=VLRB_GROUPS)
    assert named["groups"] == {"general": None, "hallucination": 1.0, "reasoning": 0.0}
    assert named["macro"] is None  # the mean of the named groups is undefined while one has no scored item


def test_prediction_order_does_not_matter():
    items = [item(0, group="g"), item(1, (1, 0), group="h")]
    predictions = samples_for(["agree", "reject", "agree"], 0) + [pred(1, 0, "A"), pred(1, 1, "A")]
    forward, backward = score(items, predictions), score(items, predictions[::-1])
    assert forward == backward
    # item 1 is a tie: sample one picks response 0 (rank 1: reject), sample two picks response 1 (agree);
    # by default only groups with a scored item are listed
    assert forward["groups"] == {"g": 1.0}
    assert forward["items"] == {"agree": 1, "reject": 0, "excluded": 1, "unpredicted": 0}


def test_nothing_predicted():
    result = score([item(0), item(1)], [])
    assert result["items"] == {"agree": 0, "reject": 0, "excluded": 0, "unpredicted": 2}
    assert result["overall"] is None and result["macro"] is None and result["strict"] is None


@pytest.mark.parametrize("index", [3, None, "0"])
def test_unknown_prediction_index(index):
    with pytest.raises(ValueError, match="index"):
        score([item(0), item(1)], [pred(0, 0, "A"), pred(index, 0, "A")])


@pytest.mark.parametrize("item_id, group", [
    ("RLAIF-V-14", "hallucination"),
    ("RLHF_x", "hallucination"),
    ("rlhf-12", "hallucination"),
    ("hallucination_pair-1", "hallucination"),
    ("Hallucination-3", "hallucination"),
    ("mathverse_1", "reasoning"),
    ("MathVerse-9", "reasoning"),
    ("mmmu-2", "reasoning"),
    ("MMMU_pro_3", "reasoning"),
    ("wildvision_3", "general"),
    ("LRVInstruction-000000007746", "general"),
    ("mmmupro_1", "general"),  # the prefix must match whole
    ("", "general"),
])
def test_vlrb_group(item_id, group):
    assert vlrb_group(item_id) == group


@pytest.mark.parametrize("which", ["fixture", "full"])
def test_real_vlrewardbench_text(which):
    # the sample of real lines that ships with the tests, and the full file where ../shared has it
    path = VLRB_FIXTURE if which == "fixture" else VLRB_FULL
    lines, groups = VLRB_FACTS[which]["lines"], VLRB_FACTS[which]["groups"]
    if not path.is_file():
        pytest.skip(f"the full VL-RewardBench text is not at {path} (not part of the repository; the sample in "
                    f"tests/fixtures runs this test too)")
    with path.open() as f:
        rows = [json.loads(line) for line in f if line.strip()]
    items = [dict(row, index=i) for i, row in enumerate(rows)]

    # The judge picks the preferred response (rank 0), except on items whose index is a multiple of 4.
    predictions = []
    for it in items:
        preferred = it["human_ranking"].index(0)
        target = 1 - preferred if it["index"] % 4 == 0 else preferred
        first = it["index"] % 3 % 2  # vary which response is shown as A
        predictions.append(pred(it["index"], first, "A" if target == first else "B"))

    def hand_group(row: dict) -> str:
        head = row["id"].replace("-", "_").split("_")[0].lower()
        if head in ("rlaif", "rlhf", "hallucination"):
            return "hallucination"
        if head in ("mathverse", "mmmu"):
            return "reasoning"
        return "general"

    counts = {"hallucination": 0, "reasoning": 0, "general": 0}
    right = {"hallucination": 0, "reasoning": 0, "general": 0}
    for it in items:
        counts[hand_group(it)] += 1
        right[hand_group(it)] += it["index"] % 4 != 0
    assert counts == groups  # the full file's: its README's facts
    assert all(vlrb_group(it["id"]) == hand_group(it) for it in items)

    result = score_pairwise(items, predictions, lambda it: vlrb_group(it["id"]), VLRB_GROUPS)
    total_right = sum(it["index"] % 4 != 0 for it in items)
    assert len(items) == lines
    assert result["items"] == {"agree": total_right, "reject": lines - total_right, "excluded": 0, "unpredicted": 0}
    assert result["overall"] == pytest.approx(total_right / lines)
    group_acc = {name: right[name] / counts[name] for name in counts}
    assert result["groups"] == pytest.approx(group_acc)
    assert result["macro"] == pytest.approx(sum(group_acc.values()) / 3)
    assert result["strict"] == pytest.approx(total_right / lines)


def test_toy_benchmark_counts_an_excluded_item_as_wrong():
    # the toy headline is strict: a judge cannot gain by writing no verdict (or a tie) on hard items
    items = [{"index": i, "human_ranking": [0, 1], "category": category}
             for i, category in enumerate(["count", "count", "spatial", "spatial", "spatial"])]
    predictions = [pred(0, 0, "A"),  # count: agree
                   pred(1, 0, None),  # count: unparsed -> excluded
                   pred(2, 0, "B"),  # spatial: reject
                   pred(3, 0, "A"), pred(3, 1, "A"),  # spatial: one agrees, one rejects -> tie, excluded
                   pred(4, 1, "B")]  # spatial: agree (response 0 shown second)
    toy = scoring.score("toy", items, predictions)
    assert toy["items"] == {"agree": 2, "reject": 1, "excluded": 2, "unpredicted": 0}
    assert toy["overall"] == pytest.approx(2 / 5)
    assert toy["lenient_overall"] == pytest.approx(2 / 3)
    assert toy["groups"] == {"count": pytest.approx(1 / 2), "spatial": pytest.approx(1 / 3)}
    assert toy["macro"] == pytest.approx((1 / 2 + 1 / 3) / 2)
    # VL-RewardBench's own rule leaves excluded items out
    lenient = score_pairwise(items, predictions, lambda it: it["category"])
    assert lenient["overall"] == pytest.approx(2 / 3) and "lenient_overall" not in lenient
    assert lenient["groups"] == {"count": 1.0, "spatial": pytest.approx(1 / 2)}
