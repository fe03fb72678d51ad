"""What the toy base model can do: perception (captions, closed questions), the text-comparison task, and the
judge's verdicts, on fresh shapes-world scenes. A table, then one JSON line.

    python bench/toy_probe.py [--model CKPT] [--scenes 96]
"""

from __future__ import annotations

import argparse
import json
import random

import torch

from fastjudge import pretrain, prompts, world
from fastjudge.models import load_adapter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="toy checkpoint (default: the shipped base model)")
    parser.add_argument("--scenes", type=int, default=96, help="scenes per probe")
    parser.add_argument("--seed", type=int, default=123, help="seed of the scenes")
    args = parser.parse_args()
    torch.set_num_threads(2)
    adapter = load_adapter(args.model)
    rng = random.Random(args.seed)
    scenes = [world.random_scene(rng) for _ in range(args.scenes)]
    images = [world.render(s, rng) for s in scenes]
    questions = [world.questions(s, rng) for s in scenes]
    result = {}

    closed = [rng.choice(q[1:]) for q in questions]
    answers = adapter.generate(images, [q.instruction for q in closed], max_new_tokens=12)
    by_type: dict[str, list[bool]] = {}
    for q, (a,) in zip(closed, answers):
        by_type.setdefault(f"qa {q.topic}/{q.answer_type}", []).append(a == world.closed_response(q.answer))
    result.update({name: sum(v) / len(v) for name, v in sorted(by_type.items())})

    captions = adapter.generate(images, [q[0].instruction for q in questions], max_new_tokens=64)
    recall = []
    for (text,), q in zip(captions, questions):
        got = world.parse_caption(text) or []
        truth = world.parse_caption(q[0].answer)
        recall.append(sum(o in got for o in truth) / len(truth))
    result["caption exact"] = sum(c[0] == q[0].answer for c, q in zip(captions, questions)) / len(questions)
    result["caption object recall"] = sum(recall) / len(recall)

    task_rng = random.Random(args.seed + 1)
    match = [pretrain.example(task_rng, "match") for _ in range(args.scenes)]
    outs = adapter.generate([m[0] for m in match], [m[1] for m in match], max_new_tokens=5)
    result["text comparison (match) accuracy"] = sum(o[0] == m[2] for o, m in zip(outs, match)) / len(match)

    judge = [pretrain.example(task_rng, "judge") for _ in range(args.scenes)]
    outs = adapter.generate([j[0] for j in judge], [j[1] for j in judge], max_new_tokens=80)
    verdicts = [prompts.parse_verdict(o[0]) for (o,) in zip(outs)]
    result["judge verdict share A"] = verdicts.count("A") / len(verdicts)

    print(f"{'probe':<40}{'value':>8}")
    for name, value in result.items():
        print(f"{name:<40}{value:>8.3f}")
    print(json.dumps({"bench": "toy_probe", "scenes": args.scenes} | {k: round(v, 4) for k, v in result.items()}))


if __name__ == "__main__":
    main()
