"""What adaptive early stop saves on the toy world, and what it changes: closed prompts sampled n_samples times
by the shipped toy base model.

    python bench/early_stop.py [--prompts 400] [--confidence 0.9 0.95 0.99] [--out FILE]

1. Replay: the host rule (rounds of round_size, `core.voting.sampling_settled`) on the first k of the same samples.
   For each confidence: samples drawn (and saved against always drawing n_samples), how often the chosen
   majority (the pair's good answer under min_votes) differs from the full-sample one, how many prompts still
   make a pair.
2. Device vote on the same samples: `engine.vote.SpanTracker` run over each sample's tokens; how often its
   vote (the samples it groups with the winner) equals the host's C++ vote.
3. Online, as `--early-stop` runs for Mllama: one decoding run with round_size slots per prompt and the device
   vote (`Adapter.generate(..., slots, early_stop)`), against the full run; wall time, samples, generated
   tokens, and how often the majority differs from the full run's. Two full runs with different seeds differ
   too (sampling noise): that rate is printed beside it.
Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import time  # noqa: E402

import torch  # noqa: E402

from _env import report  # noqa: E402
from fastjudge.config import LoopConfig  # noqa: E402
from fastjudge.core.answers import extract_answer  # noqa: E402
from fastjudge.core.voting import majority_vote, sampling_settled  # noqa: E402
from fastjudge.engine import mllama as mllama_decoding  # noqa: E402
from fastjudge.engine.vote import SpanTracker  # noqa: E402
from fastjudge.models import load_adapter  # noqa: E402
from fastjudge.toy import world  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=400)
    parser.add_argument("--confidence", type=float, nargs="+", default=[0.9, 0.95, 0.99])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    cfg = LoopConfig()  # the loop's defaults: n_samples 16, T 0.6, top-k 50, top-p 0.9, min_votes 5, round 4
    rng = random.Random(args.seed)
    images, questions = [], []
    while len(questions) < args.prompts:
        scene = world.random_scene(rng)
        closed = [q for q in world.questions(scene, rng) if q.kind == "closed"]
        if closed:
            images.append(world.render(scene, rng))
            questions.append(rng.choice(closed))
    adapter = load_adapter(None)
    samples = adapter.generate(images, [q.instruction for q in questions], n=cfg.n_samples,
                               max_new_tokens=cfg.answer_tokens, temperature=cfg.temperature, top_k=cfg.top_k,
                               top_p=cfg.top_p, seed=args.seed)
    answers = [[extract_answer(s, q.answer_type) for s in group] for q, group in zip(questions, samples)]
    full = majority_vote(answers, min_votes=cfg.min_votes)

    def makes_pair(vote) -> bool:
        return vote.winner is not None and len(vote.counts) > 1

    rows = []
    for confidence in args.confidence:
        drawn, changed, pairs = 0, 0, 0
        for group, final in zip(answers, full):
            used = cfg.n_samples
            for k in range(cfg.round_size, cfg.n_samples + 1, cfg.round_size):
                counts = majority_vote([group[:k]])[0].counts
                if sampling_settled(counts, k, cfg.n_samples, cfg.min_votes, confidence):
                    used = k
                    break
            vote = majority_vote([group[:used]], min_votes=cfg.min_votes)[0]
            drawn += used
            changed += vote.winner != final.winner
            pairs += makes_pair(vote)
        rows.append({"confidence": confidence, "samples": drawn, "saved": 1 - drawn / (cfg.n_samples * len(answers)),
                     "majority_changed": changed / len(answers), "pairs": pairs})
    full_pairs = sum(makes_pair(v) for v in full)

    # 2. the device vote over the same samples' tokens, against the host vote
    tables = adapter.span_tables()
    agree = 0
    for group, final in zip(samples, full):
        sequences = [adapter._words(s) for s in group]
        tracker = SpanTracker(tables, len(sequences))
        for step in range(max(map(len, sequences))):
            token = torch.tensor([s[step] if step < len(s) else 0 for s in sequences])
            tracker.update(token, torch.tensor([step < len(s) for s in sequences]))
        found, hash_ = tracker.answer()
        classes: dict[int, list[int]] = {}
        for j, (f, h) in enumerate(zip(found.tolist(), hash_.tolist())):
            if f:
                classes.setdefault(h, []).append(j)
        sizes = sorted((len(v) for v in classes.values()), reverse=True) + [0, 0]
        device_winner = None
        if sizes[0] >= cfg.min_votes and sizes[0] > sizes[1]:
            device_winner = next(v for v in classes.values() if len(v) == sizes[0])
        host_winner = final.indices[final.winner] if final.winner is not None else None
        agree += device_winner == host_winner

    # 3. online: one decoding run per confidence with the device vote, against full runs; decoding steps and
    # rows counted by a wrapper around the shared decoder's step
    work = {"steps": 0, "row_steps": 0}
    step = mllama_decoding.SharedMllamaDecoder.step

    def counted(self, tokens, *rest, **kwargs):
        work["steps"] += 1
        work["row_steps"] += tokens.numel()
        return step(self, tokens, *rest, **kwargs)
    mllama_decoding.SharedMllamaDecoder.step = counted

    def timed(**kwargs):
        work.update(steps=0, row_steps=0)
        start = time.perf_counter()
        out = adapter.generate(images, [q.instruction for q in questions], n=cfg.n_samples,
                               max_new_tokens=cfg.answer_tokens, temperature=cfg.temperature, top_k=cfg.top_k,
                               top_p=cfg.top_p, batch_rows=cfg.batch_rows, **kwargs)
        seconds = time.perf_counter() - start
        winners = [v.winner for v in majority_vote(
            [[extract_answer(s, q.answer_type) for s in group] for q, group in zip(questions, out)],
            min_votes=cfg.min_votes)]
        tokens = sum(len(adapter._words(s)) + 1 for group in out for s in group)  # + its end token
        return out, seconds, winners, tokens, dict(work)

    _, full_seconds, full_winners, full_tokens, full_work = timed(seed=args.seed + 1)
    _, _, other_winners, _, _ = timed(seed=args.seed + 2)
    noise = sum(a != b for a, b in zip(full_winners, other_winners)) / len(questions)
    online = []
    for confidence in args.confidence:
        out, seconds, winners, tokens, counts = timed(seed=args.seed + 1, slots=cfg.round_size,
                                                      early_stop=confidence, min_votes=cfg.min_votes)
        online.append({"confidence": confidence, "samples": sum(map(len, out)), "tokens": tokens, **counts,
                       "seconds": seconds, "speedup": full_seconds / seconds,
                       "majority_differs": sum(a != b for a, b in zip(winners, full_winners)) / len(questions)})
    print(f"{len(answers)} closed toy prompts x {cfg.n_samples} samples (T {cfg.temperature}, top-k {cfg.top_k}, "
          f"top-p {cfg.top_p}), rounds of {cfg.round_size}, min_votes {cfg.min_votes}; {full_pairs} make a pair "
          f"with all samples")
    print(f"{'confidence':>10}{'samples':>9}{'saved':>8}{'changed':>9}{'pairs':>7}")
    for r in rows:
        print(f"{r['confidence']:>10.2f}{r['samples']:>9}{r['saved']:>8.1%}{r['majority_changed']:>9.1%}{r['pairs']:>7}")
    print(f"device vote on the same samples equals the host vote (same winner samples, or both none) on "
          f"{agree}/{len(samples)} prompts")
    print(f"online, {cfg.round_size} slots per prompt, batch_rows {cfg.batch_rows}: full run {full_seconds:.2f} s, "
          f"{cfg.n_samples * len(questions)} samples, {full_tokens} tokens, {full_work['steps']} steps, "
          f"{full_work['row_steps']} row-steps; two full runs' majorities differ on {noise:.1%}")
    print(f"{'confidence':>10}{'samples':>9}{'tokens':>8}{'steps':>7}{'row-steps':>10}{'seconds':>9}{'speedup':>9}"
          f"{'differs':>9}")
    for r in online:
        print(f"{r['confidence']:>10.2f}{r['samples']:>9}{r['tokens']:>8}{r['steps']:>7}{r['row_steps']:>10}"
              f"{r['seconds']:>9.2f}{r['speedup']:>8.2f}x{r['majority_differs']:>9.1%}")
    result = {"bench": "early_stop", "prompts": len(answers), "n_samples": cfg.n_samples, "round_size": cfg.round_size,
              "min_votes": cfg.min_votes, "pairs_full": full_pairs, "rows": rows,
              "device_vote_agrees": agree / len(samples),
              "online": {"batch_rows": cfg.batch_rows, "full_seconds": full_seconds, "full_tokens": full_tokens,
                         **{f"full_{k}": v for k, v in full_work.items()},
                         "full_runs_differ": noise, "rows": online}}
    report(result, args.out)


if __name__ == "__main__":
    main()
