"""The loop's ablations, in one place: each takes one piece of the paper's recipe away, to show what it does
(`LoopConfig.ablation`, `fastjudge iterate --ablation NAME`).

- "no-filter": fine-tuning takes every pair's first judgment in each order, whatever its verdicts (the filter's
  keep rule is off: `FilterOptions.keep_all`, set by `LoopConfig.filter_options`); the same amount of data.
- "shuffled-labels": good and bad swapped in a random half of the synthesized pairs (`shuffle_labels`): do the
  synthetic preferences matter?
- "oracle-votes": closed pairs labelled by the scene's true answer instead of the majority vote
  (`oracle_answers`; the toy preset only, the ground truth used on purpose: the paper's oracle baseline).
"""

from __future__ import annotations

import random

from fastjudge.config import ABLATIONS, LoopConfig
from fastjudge.toy import world as toy_world
from fastjudge.toy.files import toy_prompt_truth

__all__ = ["ABLATIONS", "oracle_answers", "shuffle_labels"]


def oracle_answers(cfg: LoopConfig) -> dict[str, str] | None:
    """With "oracle-votes": prompt id -> the true closed-ended response of the toy pool's closed prompts; else
    None (synthesis votes)."""
    if cfg.ablation != "oracle-votes":
        return None
    truth = toy_prompt_truth(cfg.prompts_per_iteration * cfg.iterations, cfg.seed, cfg.closed_fraction)
    return {pid: toy_world.closed_response(q.answer) for pid, q in truth.items() if q.kind == "closed"}


def shuffle_labels(cfg: LoopConfig, pairs: list[dict], seed: int) -> None:
    """With "shuffled-labels": swap good and bad, in place, in each pair with probability one half (seeded)."""
    if cfg.ablation != "shuffled-labels":
        return
    swap = random.Random(seed)
    for pair in pairs:
        if swap.random() < 0.5:
            pair["good"], pair["bad"] = pair["bad"], pair["good"]
