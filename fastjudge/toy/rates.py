"""What each iteration does to the toy judge, measured against the shapes world's ground truth (toy preset only).

The loop never reads these figures: they are computed after each iteration from the files it wrote (pairs,
judgments, benchmark outputs) and the scene ground truth, for the people watching it. The rates:

- labels_right[source]: the share of synthetic pairs whose preference is right: the "good" response says what
  the scene says and the "bad" one does not. Sources: "rewrite" (open-ended: the model's answer and its
  degraded rewrite), "vote" (closed-ended: the majority answer and a minority one).
  labels_inverted[source]: the share where it is the other way round (the majority was wrong, say).
  kept_labels_right[source] / kept_labels_inverted[source]: the same over the pairs the filter kept, which are
  what fine-tuning learns from.
- verdict_agrees_label: the share of the filter's judgments (each pair in both orders, before any pair is
  dropped) whose verdict picks the synthetic preference. Chance is 0.5; a judge gives the filter something
  to select only when this is above it.
- On the held-out benchmark (greedy judgments; each item has exactly one correct response):
  own_answer_right: the judge's own answer, where its reasoning starts, says what the correct response says;
  reasoning_right: its checks single out the correct response ("A : yes B : no" with A correct), overall and
  per benchmark category (reasoning_right_by_category);
  verdict_follows_reasoning: of the judgments whose checks single out one response, the share whose verdict
  names that response.
"""

from __future__ import annotations

import random

from fastjudge.core.answers import extract_answer
from fastjudge.core.sampling_params import SamplingParams
from fastjudge.data import prompts
from fastjudge.toy import world
from fastjudge.toy.files import toy_prompt_truth

RATE_NAMES = ("labels_right", "labels_inverted", "kept_labels_right", "kept_labels_inverted", "verdict_agrees_label",
              "own_answer_right", "reasoning_right",
              "verdict_follows_reasoning")


def _share(flags: list[bool]) -> float | None:
    return sum(flags) / len(flags) if flags else None


def says_truth(response: str, question: world.Question) -> bool:
    """Whether a response gives the true answer: for a closed question its final answer as the vote reads it
    (`core.answers.extract_answer`), for an open one the true caption word for word."""
    if question.kind == "closed":
        return extract_answer(response, question.answer_type) == extract_answer(
            world.closed_response(question.answer), question.answer_type)
    return world.same_answer(response, question.answer)


def label_rates(pairs: list[dict], truth: dict[str, world.Question]) -> dict:
    """{"labels_right": {source: share}, "labels_inverted": {source: share}, "pairs": {source: count}}."""
    right: dict[str, list[bool]] = {}
    inverted: dict[str, list[bool]] = {}
    for pair in pairs:
        question = truth[pair["id"]]
        good_right, bad_right = (says_truth(pair[side], question) for side in ("good", "bad"))
        right.setdefault(pair["source"], []).append(good_right and not bad_right)
        inverted.setdefault(pair["source"], []).append(bad_right and not good_right)
    return {"labels_right": {s: _share(v) for s, v in sorted(right.items())},
            "labels_inverted": {s: _share(v) for s, v in sorted(inverted.items())},
            "pairs": {s: len(v) for s, v in sorted(right.items())}}


def judgment_rates(judgments: list[dict]) -> dict:
    """{"verdict_agrees_label": share of the filter's judgments whose verdict is the expected one}."""
    return {"verdict_agrees_label": _share([j["verdict"] == j["expected"] for j in judgments])}


def _checks_right(item: dict, row: dict) -> bool:
    """Whether a judgment's checks single out the item's correct response (the lower human rank)."""
    correct = min((0, 1), key=lambda i: item["human_ranking"][i])
    correct_letter = "A" if row["shown_first"] == correct else "B"
    return prompts.checks_verdict(prompts.judge_reasoning(row["output"] or "")) == correct_letter


def checks_pass_at_k(items: list[dict], outputs: list[dict]) -> dict:
    """Sampled judgments (`evaluate` raw rows, several per item): {"pass_at_k": share of items where at least
    one judgment's checks single out the correct response, "sampled_right": share of judgments whose checks do,
    "k": judgments per item (the fewest any item has)}, overall and per category ("<category> pass_at_k", ...)."""
    by_index = {item["index"]: item for item in items}
    per_item: dict[int, list[bool]] = {}
    for row in outputs:
        per_item.setdefault(row["index"], []).append(_checks_right(by_index[row["index"]], row))
    result = {"k": min((len(v) for v in per_item.values()), default=0)}
    groups: dict[str, list[int]] = {"": sorted(per_item)}
    for index in sorted(per_item):
        groups.setdefault(by_index[index].get("category", "all") + " ", []).append(index)
    for prefix, indices in groups.items():
        result[f"{prefix}pass_at_k"] = _share([any(per_item[i]) for i in indices])
        result[f"{prefix}sampled_right"] = _share([ok for i in indices for ok in per_item[i]])
    return result


def bench_rates(items: list[dict], outputs: list[dict]) -> dict:
    """Own answer, checks and verdict of the judge's benchmark outputs (`evaluate` raw rows: index,
    shown_first, verdict, output) against each item's correct response (the lower human rank)."""
    by_index = {item["index"]: item for item in items}
    own_right, checks_right, follows = [], [], []
    by_category: dict[str, list[bool]] = {}
    for row in outputs:
        item = by_index[row["index"]]
        correct = min((0, 1), key=lambda i: item["human_ranking"][i])
        correct_letter = "A" if row["shown_first"] == correct else "B"
        reasoning = prompts.judge_reasoning(row["output"] or "")
        parsed = prompts.parse_toy_reasoning(reasoning)
        own_right.append(parsed is not None and world.same_answer(parsed[0], item["response"][correct]))
        pick = prompts.checks_verdict(reasoning)
        checks_right.append(pick == correct_letter)
        by_category.setdefault(item.get("category", "all"), []).append(pick == correct_letter)
        if pick is not None:
            follows.append(row["verdict"] == pick)
    return {"own_answer_right": _share(own_right), "reasoning_right": _share(checks_right),
            "verdict_follows_reasoning": _share(follows),
            "reasoning_right_by_category": {c: _share(v) for c, v in sorted(by_category.items())}}


def iteration_rates(pairs: list[dict], judgments: list[dict], items: list[dict], outputs: list[dict],
                    pool_size: int, seed: int, closed_fraction: float, traces: list[dict] | None = None) -> dict:
    """All the rates of one iteration (iteration 0, the base judge, has no pairs: benchmark rates only);
    `traces` (the filter's sft.jsonl rows, each naming its pair) add the label rates of the kept pairs."""
    rates = bench_rates(items, outputs)
    if pairs:
        truth = toy_prompt_truth(pool_size, seed, closed_fraction)
        rates |= label_rates(pairs, truth)
        rates |= judgment_rates(judgments)
        if traces is not None:
            kept = label_rates([pairs[i] for i in sorted({t["pair"] for t in traces})], truth)
            rates |= {"kept_labels_right": kept["labels_right"], "kept_labels_inverted": kept["labels_inverted"],
                      "kept_pairs": kept["pairs"]}
    return rates


PROBE_SEED = 424_242  # held-out scenes: neither the benchmark's seed nor a pretraining step's stream


def perception_probe(adapter, per_category: int = 100, seed: int = PROBE_SEED) -> dict:
    """What the toy model sees, per benchmark category: on fresh scenes, the benchmark's kind of question for
    that category (a caption for attribute and existence, a caption or a closed question for spatial, closed
    questions for count and vqa), answered greedily by the model itself; the share whose answer says what the
    scene says. This is the judge's first step (its own answer), so it bounds how often its checks are right.

    Returns {"categories": {category: share}, "counts": {category: n}, "families": {"category family": share}}
    (families: the question families within a category, e.g. "spatial where" or "vqa option").
    """
    rng = random.Random(seed)
    images, questions, categories = [], [], []
    for category, _, scene, (question, _, _) in world.benchmark_draws(rng, per_category):
        images.append(world.render(scene, rng))
        questions.append(question)
        categories.append(category)
    outputs = adapter.generate(images, [q.instruction for q in questions], SamplingParams(max_new_tokens=64))
    right: dict[str, list[bool]] = {}
    by_family: dict[str, list[bool]] = {}
    for (text,), q, category in zip(outputs, questions, categories):
        ok = world.same_answer(text, world.response_for(q))
        right.setdefault(category, []).append(ok)
        by_family.setdefault(f"{category} {q.family}", []).append(ok)
    return {"categories": {c: _share(v) for c, v in right.items()}, "counts": {c: len(v) for c, v in right.items()},
            "families": {f: _share(v) for f, v in sorted(by_family.items())}}
