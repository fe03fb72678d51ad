"""Stage 4, eval: the judge on a pairwise benchmark, k samples per item, scored with VL-RewardBench's rules.

Each sample shows the item's two responses in a random order drawn from (seed, item index, sample), so the
benchmark's own order (VL-RewardBench lists the preferred response first in 1,245 of 1,250 items) cannot
leak into the score. Predictions are written in the scorer's format next to the judge's raw outputs.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from tqdm import tqdm

from fastjudge import prompts as prompt_texts
from fastjudge.config import LoopConfig
from fastjudge.data import load_images
from fastjudge.models import Adapter
from fastjudge.scoring import score_pairwise, vlrb_group


def group_of(item: dict) -> str:
    """Toy benchmark items carry their category; others are VL-RewardBench items grouped by id prefix."""
    return item.get("category") or vlrb_group(str(item.get("id", "")))


@dataclass
class EvalResult:
    metrics: dict  # {"overall", "macro", "categories", "items", "strict"}
    predictions: list[dict]  # {"index", "shown_first", "verdict"}
    raw: list[dict]  # predictions plus the judge's output text


def shown_first(seed: int, index: int, sample: int) -> int:
    return random.Random(f"{seed}/{index}/{sample}").randrange(2)


def run(judge: Adapter, items: list[dict], cfg: LoopConfig, seed: int) -> EvalResult:
    style = judge.judge_style
    calls, images, judge_prompts = [], [], []
    for item, image in zip(items, load_images([item["image"] for item in items])):
        for sample in range(cfg.k):
            first = shown_first(seed, item["index"], sample)
            a, b = item["response"][first], item["response"][1 - first]
            calls.append((item["index"], first))
            images.append(image)
            judge_prompts.append(prompt_texts.judge_prompt(item["query"], a, b, style))
    temperature = 0.0 if cfg.k == 1 else cfg.eval_temperature
    with tqdm(total=len(calls), desc="eval", unit="judgment") as bar:
        outputs = [c[0] for c in judge.generate(images, judge_prompts, max_new_tokens=cfg.judge_tokens,
                                               temperature=temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                                               batch_rows=cfg.batch_rows, seed=seed, progress=bar.update)]
    predictions = [{"index": index, "shown_first": first, "verdict": prompt_texts.parse_verdict(text)}
                   for (index, first), text in zip(calls, outputs)]
    raw = [dict(p, output=text) for p, text in zip(predictions, outputs)]
    score = score_pairwise(items, predictions, group_of)
    metrics = {"overall": score["overall"], "macro": score["macro"], "categories": score["groups"],
               "items": score["items"], "strict": score["strict"]}
    return EvalResult(metrics, predictions, raw)
