"""Stage 4, eval: the judge on a pairwise benchmark, k samples per item, scored with the benchmark's own rules.

Each sample shows the item's two responses in a random order drawn from (seed, item index, sample), so the
benchmark's own order (VL-RewardBench lists the preferred response first in 1,245 of 1,250 items) cannot
leak into the score. The prompt is ours (`prompt="ours"`, what the loop trains the judge on) or the
benchmark's own (`prompt="benchmark"`: VL-RewardBench's "Overall Judgment: Answer X is better", Multimodal
RewardBench's MT-Bench prompt with [[A]] / [[B]]). One parser (`data.prompts.parse_verdict`) reads all of them.
Predictions are written in the scorer's format (`fastjudge score` reads them) next to the judge's raw outputs.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from tqdm import tqdm

from fastjudge.core import dist
from fastjudge.core.dist import World
from fastjudge.core.sampling_params import SamplingParams
from fastjudge.data import prompts as prompt_texts
from fastjudge.data.images import load_images
from fastjudge.data.io import write_json, write_jsonl
from fastjudge.data.scoring import score
from fastjudge.models import Adapter, generation
from fastjudge.models.partial import drop_stored_batches, stored_batches
from fastjudge.report import plot_reliability


@dataclass(frozen=True)
class EvalOptions:
    """How the judge is run on a benchmark (the loop's `LoopConfig.eval_options()`)."""
    bench: str = "toy"  # the scoring rules: "toy", "vlrewardbench", "mmrb"
    prompt: str = "ours"  # "ours" (what the loop trains on) or "benchmark" (the benchmark's own)
    unparsed: str = "wrong"  # mmrb: an unparsed verdict is "wrong" or the official seeded "random" guess
    k: int = 1  # judgments per item, each a call of its own (its order drawn anew)
    # each judgment's sampling: greedy for k = 1 (`LoopConfig.eval_options`), T 0.6, top-k 50, top-p 0.9 above
    judgment: SamplingParams = SamplingParams(max_new_tokens=1024)
    batch_rows: int = 32
    batch_tokens: int | None = None


@dataclass
class EvalResult:
    metrics: dict  # the benchmark scorer's output (data.scoring.score)
    predictions: list[dict]  # {"index", "shown_first", "verdict"}
    raw: list[dict]  # predictions plus the judge's output text


def shown_first(seed: int, index: int, sample: int) -> int:
    return random.Random(f"{seed}/{index}/{sample}").randrange(2)


def judge_prompt_for(judge: Adapter, bench: str, prompt: str, question: str, a: str, b: str) -> str:
    """The eval prompt for one pair shown as (A, B): ours in the judge's style, or the benchmark's own."""
    if prompt == "benchmark":
        return prompt_texts.benchmark_prompt(bench, question, a, b)
    return prompt_texts.judge_prompt(question, a, b, judge.judge_style)


def run(judge: Adapter, items: list[dict], options: EvalOptions, seed: int,
        score_items: list[dict] | None = None) -> EvalResult:
    """Judge each of `items` k times; score over `score_items` (default: `items`), so that items that could
    not be run (a missing image) count as unpredicted."""
    calls, images, judge_prompts = [], [], []
    for item, image in zip(items, load_images([item["image"] for item in items])):
        for sample in range(options.k):
            first = shown_first(seed, item["index"], sample)
            a, b = item["response"][first], item["response"][1 - first]
            calls.append((item["index"], first))
            images.append(image)
            judge_prompts.append(judge_prompt_for(judge, options.bench, options.prompt, item["query"], a, b))
    # the probability of the answer shown first is read at the verdict's position: only our prompt asks for a
    # verdict in the form read there
    with tqdm(total=len(calls), desc="eval", unit="judgment") as bar:
        texts, p_first = generation.judgments(judge, images, judge_prompts, options.judgment.replace(seed=seed),
                                              batch_rows=options.batch_rows, batch_tokens=options.batch_tokens,
                                              progress=bar.update, probabilities=options.prompt == "ours")
    outputs = [t[0] for t in texts]
    predictions = [{"index": index, "shown_first": first, "verdict": prompt_texts.parse_verdict(text)}
                   for (index, first), text in zip(calls, outputs)]
    if p_first is not None:
        for prediction, (p,) in zip(predictions, p_first):
            prediction["p_first"] = p
    raw = [dict(p, output=text) for p, text in zip(predictions, outputs)]
    # the scorer adds the calibration of the p_first values (data.scoring.calibration)
    return EvalResult(score(options.bench, score_items or items, predictions, options.unparsed), predictions, raw)


def run_to(folder: Path, judge: Adapter, items: list[dict], options: EvalOptions, seed: int,
           score_items: list[dict] | None = None, before_done: Callable[[], None] | None = None,
           world: World = World()) -> dict:
    """Evaluate and write folder/predictions.jsonl, outputs.jsonl, reliability.png, then metrics.json, the file
    that marks the stage done; `before_done` runs just before it (the stage's record, so that a run cut in
    between redoes the stage rather than lose its record). Finished generation batches are kept under the folder
    until then: a killed evaluation run again picks them up."""
    with stored_batches(judge, folder, "eval", world):
        result = run(judge, items, options, seed=seed, score_items=score_items)
    if world.main:  # every rank holds the whole result; one writes it
        write_jsonl(folder / "predictions.jsonl", result.predictions)
        write_jsonl(folder / "outputs.jsonl", result.raw)
        if before_done is not None:
            before_done()
        plot_reliability(folder / "reliability.png", result.metrics.get("calibration"))
        write_json(folder / "metrics.json", result.metrics)
    dist.barrier()
    drop_stored_batches(folder, world)
    return result.metrics
