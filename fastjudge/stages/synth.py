"""Stage 1, synth: preference pairs from (image, instruction) prompts, with no labels.

- Open-ended prompts: the model answers (greedy), then rewrites its answer with exactly one error (or the
  rule-based corrupter does): (answer, degraded answer).
- Closed-ended prompts: N sampled answers; final answers are extracted, normalized and voted on (the C++ vote);
  the majority answer (at least `min_votes` votes, no tie) is good, a random response with another answer bad.

Pairs whose two responses are identical, prompts without a clear majority and unanimous prompts (no response
with another answer) give no pair; each is counted in the stage's stats.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Callable

from tqdm import tqdm

from fastjudge.core.answers import extract_answer
from fastjudge.core.sampling_params import SamplingParams
from fastjudge.core.voting import Vote, majority_vote, sampling_settled
from fastjudge.data import prompts as prompt_texts
from fastjudge.data.images import load_images
from fastjudge.data.io import PromptRecord
from fastjudge.models import Adapter

Corrupter = Callable[[str, random.Random], "str | None"]


@dataclass(frozen=True)
class SynthOptions:
    """How pairs are made (the loop's `LoopConfig.synth_options()`): the sampling of each generation call
    (defaults: the paper's), then the vote. Each call's seed is the stage's, offset per call."""
    answer: SamplingParams = SamplingParams(max_new_tokens=512)  # an open prompt's answer: greedy
    rewrite: SamplingParams = SamplingParams(max_new_tokens=512, temperature=0.6, top_k=50, top_p=0.9)  # degraded
    samples: SamplingParams = SamplingParams(n=16, max_new_tokens=512, temperature=0.6, top_k=50, top_p=0.9)  # closed
    min_votes: int = 5  # the majority answer needs at least this many votes
    # adaptive early stop for closed prompts: stop a prompt's sampling once its majority's confidence
    # (`core.voting.majority_confidence`) reaches `early_stop`; 0 = always samples.n. Mllama decodes
    # `round_size` samples at a time per prompt, voting on the device; other families sample in rounds of
    # `round_size`, voting on the host between rounds
    early_stop: float = 0.0
    round_size: int = 4
    batch_rows: int = 32  # decoding rows per generation batch
    batch_tokens: int | None = None  # cap on rows x (longest prompt + new tokens) per generation batch
    # None: the model rewrites its answer with one error; else a rule-based corrupter (answer, rng) -> the
    # answer with one error, or None when it cannot make one
    corrupter: Corrupter | None = None


@dataclass
class SynthResult:
    pairs: list[dict]
    stats: dict[str, int] = field(default_factory=dict)


def run(adapter: Adapter, records: list[PromptRecord], options: SynthOptions, seed: int,
        oracle: dict[str, str] | None = None) -> SynthResult:
    """Make preference pairs for `records` with `adapter`'s model. Reproducible for a fixed seed.

    oracle: prompt id -> true final answer (the toy's "oracle-votes" ablation only): a closed pair's good answer
    is then a sample that gives the true answer, where the majority's would be, and the pair is made only when
    the majority rule would make one too (so both labellings draw on the same prompts)."""
    rng = random.Random(seed)
    stats = {"prompts": len(records), "open": 0, "closed": 0, "samples": 0, "pairs": 0, "identical": 0,
             "no_majority": 0, "unanimous": 0, "uncorruptible": 0, "duplicate": 0, "oracle_unsampled": 0}
    batching = dict(batch_rows=options.batch_rows, batch_tokens=options.batch_tokens)
    style = adapter.judge_style
    open_records = [r for r in records if r.kind == "open"]
    closed_records = [r for r in records if r.kind == "closed"]
    stats["open"], stats["closed"] = len(open_records), len(closed_records)
    candidates: list[dict] = []

    bar = tqdm(total=len(records) + len(open_records) * (options.corrupter is None), desc="synth", unit="prompt")
    if open_records:
        images = load_images([r.image for r in open_records])
        answers = [c[0] for c in adapter.generate(
            images, [r.instruction for r in open_records], options.answer.replace(seed=seed),
            progress=bar.update, **batching)]
        if options.corrupter is None:
            rewrites = adapter.generate(
                images, [prompt_texts.rewrite_prompt(r.instruction, a, style) for r, a in zip(open_records, answers)],
                options.rewrite.replace(seed=seed + 1), progress=bar.update, **batching)
            degraded = [c[0] for c in rewrites]
        else:
            degraded = [options.corrupter(a, rng) for a in answers]
        for record, good, bad in zip(open_records, answers, degraded):
            if bad is None:
                stats["uncorruptible"] += 1
            elif bad.strip() == good.strip():
                stats["identical"] += 1
            else:
                candidates.append(_pair(record, good, bad, "rewrite" if options.corrupter is None else "rules"))

    if closed_records:
        closed_images = load_images([r.image for r in closed_records])
        if options.early_stop > 0 and not adapter.refills:  # rounds, voted on the host between them
            samples = sample_adaptively(adapter, closed_images, closed_records, options, seed + 2)
            bar.update(len(closed_records))
        else:  # with early stop: one decoding run, voting on the device
            stopping = dict(slots=min(options.round_size, options.samples.n), early_stop=options.early_stop,
                            min_votes=options.min_votes) if options.early_stop > 0 else {}
            samples = adapter.generate(
                closed_images, [r.instruction for r in closed_records], options.samples.replace(seed=seed + 2),
                progress=bar.update, **batching, **stopping)
        stats["samples"] = sum(map(len, samples))
        extracted = [[extract_answer(s, r.answer_type) for s in group] for r, group in zip(closed_records, samples)]
        votes = majority_vote(extracted, min_votes=options.min_votes)
        for record, group, vote in zip(closed_records, samples, votes):
            truth = None if oracle is None else extract_answer(oracle[record.id], record.answer_type)
            chosen, outcome = pair_from_vote(vote, rng, truth)
            if chosen is None:
                stats[outcome] += 1
                continue
            good, bad = group[chosen[0]], group[chosen[1]]
            if good.strip() == bad.strip():
                stats["identical"] += 1
                continue
            pair = _pair(record, good, bad, "vote")
            pair["votes"] = vote.counts
            candidates.append(pair)
    bar.close()

    pairs, seen = [], set()
    for pair in candidates:
        key = (pair["image"], pair["instruction"], pair["good"], pair["bad"])
        if key in seen:
            stats["duplicate"] += 1
            continue
        seen.add(key)
        pairs.append(pair)
    stats["pairs"] = len(pairs)
    return SynthResult(pairs, stats)


def pair_from_vote(vote: Vote, rng: random.Random, truth: str | None = None) -> tuple[tuple[int, int] | None, str]:
    """The vote-to-pair rule of a closed prompt: ((index of the good sample, index of the bad one), "pair"), or
    (None, why not). The good sample is the first that gives the winning answer (the majority's; with `truth`,
    the "oracle-votes" ablation, the true answer, where the majority rule would make a pair too); the bad one a
    random sample of a random other answer. No pair: "no_majority" (no answer has min_votes votes), "unanimous"
    (no other answer), "oracle_unsampled" (no sample gives the true answer, or no other)."""
    if vote.winner is None:
        return None, "no_majority"
    winner = vote.winner
    others = [answer for answer in vote.counts if answer != winner]
    if not others:
        return None, "unanimous"
    if truth is not None:
        winner = truth
        others = [answer for answer in vote.counts if answer != winner]
        if winner not in vote.counts or not others:
            return None, "oracle_unsampled"
    return (vote.indices[winner][0], rng.choice(vote.indices[rng.choice(others)])), "pair"


def sample_adaptively(adapter: Adapter, images, records: list[PromptRecord], options: SynthOptions,
                      seed: int) -> list[list[str]]:
    """Samples for closed prompts, drawn in rounds of `round_size` (the families without the shared Mllama
    decoder, which does this in one run with the vote on the device): a prompt stops once its vote is settled
    (`core.voting.sampling_settled`: a leader with min_votes votes and a `majority_confidence` of at least
    `early_stop`, or no answer able to reach min_votes), or at `samples.n`. Returns each prompt's
    samples (between round_size and samples.n of them)."""
    groups: list[list[str]] = [[] for _ in records]
    pending = list(range(len(records)))
    n = options.samples.n
    for round_index in range(-(-n // options.round_size)):
        if not pending:
            break
        # every pending prompt has as many samples
        size = min(options.round_size, n - len(groups[pending[0]]))
        drawn = adapter.generate([images[i] for i in pending], [records[i].instruction for i in pending],
                                 options.samples.replace(n=size, seed=seed * 7919 + round_index),
                                 batch_rows=options.batch_rows, batch_tokens=options.batch_tokens)
        for i, new in zip(pending, drawn):
            groups[i].extend(new)
        votes = majority_vote([[extract_answer(s, records[i].answer_type) for s in groups[i]] for i in pending])
        pending = [i for i, vote in zip(pending, votes) if len(groups[i]) < n and not sampling_settled(
            vote.counts, len(groups[i]), n, options.min_votes, options.early_stop)]
    return groups


def _pair(record: PromptRecord, good: str, bad: str, source: str) -> dict:
    return {"id": record.id, "image": record.image, "instruction": record.instruction, "kind": record.kind,
            "good": good, "bad": bad, "source": source}
