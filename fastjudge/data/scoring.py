"""Scoring pairwise judges with VL-RewardBench's and Multimodal RewardBench's rules (`score`).

A prediction is one judge call on one item: {"index": item index, "shown_first": 0 or 1 (index into the item's
`response` list of the response shown as A), "verdict": "A", "B" or None}. Several predictions for one item are
several samples.

- A sample agrees when the response it picks has the better (lower) `human_ranking`, rejects when it picks the
  other, and is unparsed when its verdict is None.
- An item is classed by strict majority of its samples: agree if agree > n/2, reject if reject > n/2, unparsed
  if unparsed > n/2, else tie. Unparsed and tie items are excluded.
- Group accuracy = agree items / (agree + reject items); `overall` pools the items of all groups; `macro` is the
  mean of the group accuracies. `strict` (ours): the fraction of predicted items in which every sample agrees.
- Our toy benchmark follows these rules grouped by its items' categories, except that an excluded item counts as
  wrong (its headline is strict accuracy; `lenient_overall` is VL-RewardBench's figure).

Multimodal RewardBench (its official `2_get_accuracy.py`): an example is right when the verdict picks its
`Better` output. Categories are the data's `Category`, with "safety" split into "safety/bias" (ID starting
"pairs") and "safety/toxicity", and "reasoning" into "reasoning/math" (ID starting "math") and
"reasoning/coding". `overall` is the accuracy over all predicted examples. An unparsed verdict is wrong
(unparsed="wrong", ours) or, with unparsed="random", replaced by the official seeded guess: one draw of
Random(123).random() < 0.5 per unparsed prediction, in file order, picking Output1 (the official "A": it always
shows Output1 first) when true, Output2 otherwise, whatever order our judge saw. With several samples per example
(ours; the official script takes one), an example is right when more than half of its samples are.
One difference is by design: an output with both [[A]] and [[B]] is unparsed here, "A" in the official script.
"""

from __future__ import annotations

import random
import re
from collections import defaultdict
from typing import Callable

VLRB_GROUPS = ("general", "hallucination", "reasoning")
_VLRB_PREFIX_GROUP = {"rlaif": "hallucination", "rlhf": "hallucination", "hallucination": "hallucination",
                      "mathverse": "reasoning", "mmmu": "reasoning"}


def vlrb_group(item_id: str) -> str:
    """VL-RewardBench's group of an item from its id's prefix (the text before the first '_' or '-')."""
    prefix = re.split(r"[_-]", item_id, maxsplit=1)[0].lower()
    return _VLRB_PREFIX_GROUP.get(prefix, "general")


def sample_outcome(item: dict, prediction: dict) -> str:
    """"agree", "reject" or "unparsed" for one prediction on its item."""
    verdict = prediction.get("verdict")
    if verdict not in ("A", "B"):
        return "unparsed"
    shown_first = prediction["shown_first"]
    if type(shown_first) is not int or shown_first not in (0, 1):
        raise ValueError(f"shown_first: expected 0 or 1, got {shown_first!r} (index {prediction.get('index')})")
    picked = shown_first if verdict == "A" else 1 - shown_first
    ranking = item["human_ranking"]
    return "agree" if ranking[picked] < ranking[1 - picked] else "reject"


def item_class(outcomes: list[str]) -> str:
    n = len(outcomes)
    for label in ("agree", "reject", "unparsed"):
        if outcomes.count(label) * 2 > n:
            return label
    return "tie"


def score_pairwise(items: list[dict], predictions: list[dict], group_of: Callable[[dict], str],
                   groups: tuple[str, ...] | None = None, excluded_wrong: bool = False) -> dict:
    """Score predictions on items (each with "index" and "human_ranking") under VL-RewardBench's rules.

    groups: the groups that `macro` averages over (default: those that have at least one scored item); when
    one of them has no scored item, `macro` is None (the mean of the three is undefined, not the mean of two).
    excluded_wrong: count excluded items (tie or unparsed majority) as wrong in `overall`, the groups and
    `macro` instead of leaving them out (strict accuracy: a judge cannot gain by writing no verdict on hard
    items); `lenient_overall` then keeps VL-RewardBench's figure.
    Returns {"overall", "macro", "groups": {name: acc}, "items": {agree, reject, excluded, unpredicted},
    "strict"}; accuracies are fractions, None where a group has no scored item.
    """
    by_index = {item["index"]: item for item in items}
    outcomes: dict[int, list[str]] = defaultdict(list)
    for prediction in predictions:
        index = prediction.get("index")
        if index not in by_index:
            raise ValueError(f"prediction index {index!r} names no item")
        outcomes[index].append(sample_outcome(by_index[index], prediction))

    counts = {"agree": 0, "reject": 0, "excluded": 0, "unpredicted": 0}
    per_group: dict[str, list[int]] = defaultdict(lambda: [0, 0])  # group -> [agree, reject]
    all_agree = 0
    for item in items:
        samples = outcomes.get(item["index"])
        if not samples:
            counts["unpredicted"] += 1
            continue
        label = item_class(samples)
        all_agree += all(s == "agree" for s in samples)
        if label in ("agree", "reject"):
            counts[label] += 1
            per_group[group_of(item)][0 if label == "agree" else 1] += 1
        else:
            counts["excluded"] += 1
            if excluded_wrong:
                per_group[group_of(item)][1] += 1

    def accuracy(agree: int, reject: int) -> float | None:
        return agree / (agree + reject) if agree + reject else None

    names = groups if groups is not None else tuple(sorted(per_group))
    group_acc = {name: accuracy(*per_group.get(name, (0, 0))) for name in names}
    scored = list(group_acc.values())
    predicted = len(items) - counts["unpredicted"]
    result = {
        "overall": accuracy(counts["agree"], counts["reject"] + (counts["excluded"] if excluded_wrong else 0)),
        "macro": sum(scored) / len(scored) if scored and None not in scored else None,
        "groups": group_acc,
        "items": counts,
        "strict": all_agree / predicted if predicted else None,
    }
    if excluded_wrong:
        result["lenient_overall"] = accuracy(counts["agree"], counts["reject"])
    return result


MMRB_RANDOM_SEED = 123  # the official script's random.seed(123)


def mmrb_category(item: dict) -> str:
    """Multimodal RewardBench's scoring category: the data's Category, with safety and reasoning split."""
    category, example_id = item["category"], item["id"].lower()
    if category == "safety":
        return "safety/bias" if example_id.startswith("pairs") else "safety/toxicity"
    if category == "reasoning":
        return "reasoning/math" if example_id.startswith("math") else "reasoning/coding"
    return category


def score_mmrb(items: list[dict], predictions: list[dict], unparsed: str = "wrong") -> dict:
    """Score predictions on Multimodal RewardBench items (module docstring).

    Returns {"overall", "categories": {name: acc}, "counts": {name: {"correct", "total"}},
    "items": {"correct", "wrong", "unpredicted"}, "unparsed_samples"}.
    """
    if unparsed not in ("wrong", "random"):
        raise ValueError(f"unparsed: expected 'wrong' or 'random', got {unparsed!r}")
    by_index = {item["index"]: item for item in items}
    guesses = random.Random(MMRB_RANDOM_SEED)
    right: dict[int, list[bool]] = defaultdict(list)
    unparsed_samples = 0
    for prediction in predictions:
        index = prediction.get("index")
        if index not in by_index:
            raise ValueError(f"prediction index {index!r} names no item")
        if prediction.get("verdict") in ("A", "B"):
            right[index].append(sample_outcome(by_index[index], prediction) == "agree")
            continue
        unparsed_samples += 1
        if unparsed == "random":  # the guess names Output1 or Output2 (response 0 or 1), not a shown position
            guess = {"shown_first": 0, "verdict": "A" if guesses.random() < 0.5 else "B"}
            right[index].append(sample_outcome(by_index[index], guess) == "agree")
        else:
            right[index].append(False)

    counts: dict[str, dict[str, int]] = defaultdict(lambda: {"correct": 0, "total": 0})
    totals = {"correct": 0, "wrong": 0, "unpredicted": 0}
    for item in items:
        samples = right.get(item["index"])
        if not samples:
            totals["unpredicted"] += 1
            continue
        correct = sum(samples) * 2 > len(samples)
        totals["correct" if correct else "wrong"] += 1
        entry = counts[mmrb_category(item)]
        entry["correct"] += correct
        entry["total"] += 1
    scored = totals["correct"] + totals["wrong"]
    return {
        "overall": totals["correct"] / scored if scored else None,
        "categories": {name: c["correct"] / c["total"] for name, c in sorted(counts.items())},
        "counts": {name: dict(c) for name, c in sorted(counts.items())},
        "items": totals,
        "unparsed_samples": unparsed_samples,
    }


def score(bench: str, items: list[dict], predictions: list[dict], unparsed: str = "wrong") -> dict:
    """Score predictions with the rules of `bench`: "vlrewardbench", "mmrb", or "toy" (VL-RewardBench's rules,
    grouped by the items' own category, except that an excluded item, tie or unparsed, counts as wrong). When
    the predictions carry `p_first` (`fastjudge eval` writes it), "calibration" is added (`calibration`)."""
    if bench == "vlrewardbench":
        metrics = score_pairwise(items, predictions, lambda item: vlrb_group(item["id"]), VLRB_GROUPS)
    elif bench == "toy":
        metrics = score_pairwise(items, predictions, lambda item: item["category"], excluded_wrong=True)
    elif bench == "mmrb":
        metrics = score_mmrb(items, predictions, unparsed)
    else:
        raise ValueError(f"bench: expected 'vlrewardbench', 'mmrb' or 'toy', got {bench!r}")
    if any(p.get("p_first") is not None for p in predictions):
        metrics["calibration"] = calibration(items, predictions)
    return metrics


def calibration(items: list[dict], predictions: list[dict], bins: int = 10) -> dict:
    """How well the verdict probabilities match the judge's accuracy, over the judgments of items with a
    strict human preference: each judgment's confidence is max(p, 1 - p) of its `p_first` and it is right when
    the answer it favours is the preferred one. Expected calibration error over `bins` equal-width confidence
    bins (the |accuracy - confidence| of each bin, weighted by its share), the bins themselves (for the
    reliability diagram), and the share of parsed verdicts naming the answer shown first (0.5 for a judge with
    no position preference on a benchmark whose order is drawn at random)."""
    ranking = {item["index"]: item["human_ranking"] for item in items}
    rows = []
    for p in predictions:
        rank = ranking.get(p["index"])
        if rank is None or rank[0] == rank[1] or p.get("p_first") is None:
            continue
        preferred_first = (rank[0] < rank[1]) == (p["shown_first"] == 0)  # the preferred answer was shown first
        favours_first = p["p_first"] >= 0.5
        rows.append((max(p["p_first"], 1 - p["p_first"]), favours_first == preferred_first))
    table = []
    for b in range(bins):
        low, high = 0.5 + 0.5 * b / bins, 0.5 + 0.5 * (b + 1) / bins
        inside = [(c, ok) for c, ok in rows if low <= c < high or (b == bins - 1 and c == high)]
        table.append({"low": low, "high": high, "count": len(inside),
                      "confidence": sum(c for c, _ in inside) / len(inside) if inside else None,
                      "accuracy": sum(ok for _, ok in inside) / len(inside) if inside else None})
    ece = sum(abs(t["accuracy"] - t["confidence"]) * t["count"] for t in table if t["count"]) / max(1, len(rows))
    parsed = [p for p in predictions if p["verdict"] in ("A", "B")]
    return {"judgments": len(rows), "ece": ece if rows else None, "bins": table,
            "first_shown_rate": sum(p["verdict"] == "A" for p in parsed) / len(parsed) if parsed else None}



def headline(metrics: dict) -> dict:
    """{"overall", "macro", "categories"}: the figures the loop tracks, whatever the benchmark."""
    return {"overall": metrics["overall"], "macro": metrics.get("macro"),
            "categories": metrics.get("groups", metrics.get("categories", {}))}
