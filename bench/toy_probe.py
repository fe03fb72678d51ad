"""What the toy base model can do, on fresh shapes-world scenes: perception per benchmark category (its own
answers to the benchmark's kind of question), and its judge on the held-out benchmark (own answer, checks,
verdict; overall and per category). A table, then one JSON line.

    python bench/toy_probe.py [--model CKPT] [--per-category 100] [--out bench/results/toy-probe-cpu.json]
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

from fastjudge import data
from fastjudge.config import LoopConfig
from fastjudge.models import load_adapter
from fastjudge.stages import evaluate
from fastjudge.toy import files as toy_files
from fastjudge.toy import pretrain
from fastjudge.toy import rates as toy_rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="toy checkpoint (default: the shipped base model)")
    parser.add_argument("--per-category", type=int, default=100, help="scenes per benchmark category")
    parser.add_argument("--pass-k", type=int, default=8,
                        help="sampled judgments per benchmark item for the checks' pass@k (0: skip)")
    parser.add_argument("--pass-temperature", type=float, default=1.0,
                        help="their sampling temperature (the filter's default)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for torch")
    parser.add_argument("--out", default=None, help="also write the result with its environment to this JSON file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    adapter = load_adapter(args.model)
    result = {}
    perception = toy_rates.perception_probe(adapter, args.per_category)
    result |= {f"perception {c}": v for c, v in perception["categories"].items()}
    # which question families make a category's figure (a category mixes captions and closed questions); a
    # category of one family of its own name (count) adds nothing
    for name, share in perception["families"].items():
        category, family = name.split(" ", 1)
        if family != category:
            result[f"perception {name}"] = share

    with tempfile.TemporaryDirectory() as tmp:
        bench = toy_files.write_toy_benchmark(Path(tmp), args.per_category)
        items, _ = data.load_bench("toy", bench)
        judged = evaluate.run(adapter, items, LoopConfig(out=tmp, model=args.model).eval_options(), seed=0)
        result["judge accuracy (strict)"] = judged.metrics["overall"]
        rates = toy_rates.bench_rates(items, judged.raw)
        rates.pop("reasoning_right_by_category")  # the per-category lines below say it with the own answer
        result |= rates
        # per category: where the checks fail, and whether the own answer or the comparison with it is to blame
        category_of = {item["index"]: item["category"] for item in items}
        for category in sorted(set(category_of.values())):
            rows = [row for row in judged.raw if category_of[row["index"]] == category]
            rates = toy_rates.bench_rates(items, rows)
            result[f"judge {category}: own answer right"] = rates["own_answer_right"]
            result[f"judge {category}: checks right"] = rates["reasoning_right"]
        result["judge verdict share A"] = sum(r["verdict"] == "A" for r in judged.raw) / len(judged.raw)
        # can sampling find right checks where greedy misses them? (what the rejection-sampling filter relies on)
        if args.pass_k > 0:
            options = replace(LoopConfig(out=tmp, model=args.model).eval_options(), k=args.pass_k,
                              temperature=args.pass_temperature)
            sampled = evaluate.run(adapter, items, options, seed=1)
            passed = toy_rates.checks_pass_at_k(items, sampled.raw)
            result[f"checks pass@{args.pass_k}"] = passed["pass_at_k"]
            result["checks right, sampled"] = passed["sampled_right"]
            for category in sorted(set(category_of.values())):
                result[f"judge {category}: checks pass@{args.pass_k}"] = passed[f"{category} pass_at_k"]
                result[f"judge {category}: checks right, sampled"] = passed[f"{category} sampled_right"]

    task_rng = random.Random(7)
    match = [pretrain.example(task_rng, "match") for _ in range(args.per_category)]
    outs = adapter.generate([m[0] for m in match], [m[1] for m in match], max_new_tokens=5)
    result["text comparison (match) accuracy"] = sum(o[0] == m[2] for o, m in zip(outs, match)) / len(match)

    print(f"{'probe':<50}{'value':>8}")
    for name, value in result.items():
        print(f"{name:<50}{value:>8.3f}")
    record = {"bench": "toy_probe", "model": args.model or "shipped toy base",
              "per_category": args.per_category} | {k: round(v, 4) for k, v in result.items()}
    if args.out:
        from _env import save
        save(args.out, record)
    print(json.dumps(record))


if __name__ == "__main__":
    main()
