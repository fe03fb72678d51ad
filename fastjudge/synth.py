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
import re
from dataclasses import dataclass, field

from tqdm import tqdm

from fastjudge import prompts as prompt_texts
from fastjudge import world
from fastjudge.config import LoopConfig
from fastjudge.data import PromptRecord, load_images
from fastjudge.models import Adapter
from fastjudge.voting import majority_vote, sampling_settled

# a span ends at a sentence end (". " or "." at the end), a newline or the end of the text
_ANSWER_IS = re.compile(r"answer is\s*:?\s*(.+?)\s*(?:\.\s|\.?\s*$|\n)", re.IGNORECASE)
_ANSWER_LINE = re.compile(r"(?:final answer|answer)\s*:\s*(.+?)\s*(?:\.\s|\.?\s*$|\n)", re.IGNORECASE)
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}()")
_NUMBER = re.compile(r"[-+]?\d[\d,]*(?:\.\d+)?|\b(?:zero|one|two|three|four|five|six|seven|eight|nine|ten|"
                     r"eleven|twelve|thirteen|fourteen|fifteen|sixteen|seventeen|eighteen|nineteen|twenty)\b",
                     re.IGNORECASE)
_OPTION = re.compile(r"\(\s*([A-Ea-e])\s*\)|\b([A-E])[.)]|^\s*([A-Ea-e])\s*$")


def extract_answer(text: str, answer_type: str = "short") -> str | None:
    """The final answer in a response, or None when there is none.

    Looks for "\\boxed{X}", "answer is X", "Answer: X" (the last one in the text wins; X ends at a sentence
    end or a newline); then, by answer_type, takes the
    number ("number") or option letter ("option") inside that span, or the last one in the whole text.
    The vote normalizes what this returns ("( b )" and "B." count as the same answer).
    """
    span, at = None, -1
    for pattern in (_BOXED, _ANSWER_LINE, _ANSWER_IS):
        for match in pattern.finditer(text):
            if match.start() > at:
                span, at = match.group(1).strip(), match.start()
    if answer_type == "number":
        numbers = _NUMBER.findall(span if span is not None else text)
        if not numbers:
            return None
        return numbers[0] if span is not None else numbers[-1]
    if answer_type == "option":
        options = _OPTION.findall(span if span is not None else text)
        letters = ["".join(groups) for groups in options]
        if not letters:
            return None
        return letters[0] if span is not None else letters[-1]
    return span or None


@dataclass
class SynthResult:
    pairs: list[dict]
    stats: dict[str, int] = field(default_factory=dict)


def run(adapter: Adapter, records: list[PromptRecord], cfg: LoopConfig, seed: int,
        oracle: dict[str, str] | None = None) -> SynthResult:
    """Make preference pairs for `records` with `adapter`'s model. Reproducible for a fixed seed.

    oracle: prompt id -> true final answer (the toy's "oracle-votes" ablation only): a closed pair's good answer
    is then a sample that gives the true answer, where the majority's would be, and the pair is made only when
    the majority rule would make one too (so both labellings draw on the same prompts)."""
    rng = random.Random(seed)
    stats = {"prompts": len(records), "open": 0, "closed": 0, "samples": 0, "pairs": 0, "identical": 0, "no_majority": 0,
             "unanimous": 0, "uncorruptible": 0, "duplicate": 0, "oracle_unsampled": 0}
    style = adapter.judge_style
    open_records = [r for r in records if r.kind == "open"]
    closed_records = [r for r in records if r.kind == "closed"]
    stats["open"], stats["closed"] = len(open_records), len(closed_records)
    candidates: list[dict] = []

    bar = tqdm(total=len(records) + len(open_records) * (cfg.corrupter == "model"), desc="synth", unit="prompt")
    if open_records:
        images = load_images([r.image for r in open_records])
        answers = [c[0] for c in adapter.generate(
            images, [r.instruction for r in open_records], max_new_tokens=cfg.answer_tokens,
            batch_rows=cfg.batch_rows, batch_tokens=cfg.batch_tokens, seed=seed, progress=bar.update)]
        if cfg.corrupter == "model":
            rewrites = adapter.generate(
                images, [prompt_texts.rewrite_prompt(r.instruction, a, style) for r, a in zip(open_records, answers)],
                max_new_tokens=cfg.answer_tokens, temperature=cfg.rewrite_temperature,
                top_k=cfg.top_k, top_p=cfg.top_p, batch_rows=cfg.batch_rows, batch_tokens=cfg.batch_tokens,
                seed=seed + 1, progress=bar.update)
            degraded = [c[0] for c in rewrites]
        else:
            degraded = [world.rewrite_with_error(a, rng) for a in answers]
        for record, good, bad in zip(open_records, answers, degraded):
            if bad is None:
                stats["uncorruptible"] += 1
            elif bad.strip() == good.strip():
                stats["identical"] += 1
            else:
                candidates.append(_pair(record, good, bad, "rewrite" if cfg.corrupter == "model" else "rules"))

    if closed_records:
        closed_images = load_images([r.image for r in closed_records])
        if cfg.early_stop > 0 and not adapter.refills:  # rounds, voted on the host between them
            samples = sample_adaptively(adapter, closed_images, closed_records, cfg, seed + 2)
            bar.update(len(closed_records))
        else:  # with early stop: one decoding run, voting on the device
            stopping = dict(slots=min(cfg.round_size, cfg.n_samples), early_stop=cfg.early_stop,
                            min_votes=cfg.min_votes) if cfg.early_stop > 0 else {}
            samples = adapter.generate(
                closed_images, [r.instruction for r in closed_records], n=cfg.n_samples,
                max_new_tokens=cfg.answer_tokens, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                batch_rows=cfg.batch_rows, batch_tokens=cfg.batch_tokens, seed=seed + 2, progress=bar.update,
                **stopping)
        stats["samples"] = sum(map(len, samples))
        extracted = [[extract_answer(s, r.answer_type) for s in group] for r, group in zip(closed_records, samples)]
        votes = majority_vote(extracted, min_votes=cfg.min_votes)
        for record, group, vote in zip(closed_records, samples, votes):
            if vote.winner is None:
                stats["no_majority"] += 1
                continue
            others = [answer for answer in vote.counts if answer != vote.winner]
            if not others:
                stats["unanimous"] += 1
                continue
            winner = vote.winner
            if oracle is not None:
                winner = extract_answer(oracle[record.id], record.answer_type)
                others = [answer for answer in vote.counts if answer != winner]
                if winner not in vote.counts or not others:
                    stats["oracle_unsampled"] += 1
                    continue
            good = group[vote.indices[winner][0]]
            bad = group[rng.choice(vote.indices[rng.choice(others)])]
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


def sample_adaptively(adapter: Adapter, images, records: list[PromptRecord], cfg: LoopConfig,
                      seed: int) -> list[list[str]]:
    """Samples for closed prompts, drawn in rounds of `cfg.round_size` (the families without the shared Mllama
    decoder, which does this in one run with the vote on the device): a prompt stops once its vote is settled
    (`voting.sampling_settled`: a leader with min_votes votes and a `majority_confidence` of at least
    `cfg.early_stop`, or no answer able to reach min_votes), or at `cfg.n_samples`. Returns each prompt's
    samples (between round_size and n_samples of them)."""
    groups: list[list[str]] = [[] for _ in records]
    pending = list(range(len(records)))
    for round_index in range(-(-cfg.n_samples // cfg.round_size)):
        if not pending:
            break
        size = min(cfg.round_size, cfg.n_samples - len(groups[pending[0]]))  # every pending prompt has as many
        drawn = adapter.generate([images[i] for i in pending], [records[i].instruction for i in pending], n=size,
                                 max_new_tokens=cfg.answer_tokens, temperature=cfg.temperature, top_k=cfg.top_k,
                                 top_p=cfg.top_p, batch_rows=cfg.batch_rows, batch_tokens=cfg.batch_tokens,
                                 seed=seed * 7919 + round_index)
        for i, new in zip(pending, drawn):
            groups[i].extend(new)
        votes = majority_vote([[extract_answer(s, records[i].answer_type) for s in groups[i]] for i in pending])
        pending = [i for i, vote in zip(pending, votes) if len(groups[i]) < cfg.n_samples and not sampling_settled(
            vote.counts, len(groups[i]), cfg.n_samples, cfg.min_votes, cfg.early_stop)]
    return groups


def _pair(record: PromptRecord, good: str, bad: str, source: str) -> dict:
    return {"id": record.id, "image": record.image, "instruction": record.instruction, "kind": record.kind,
            "good": good, "bad": bad, "source": source}
