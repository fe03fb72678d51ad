"""Diagnostic: can the judge learn its verdict from kept traces at all? Fine-tunes a judge with the loss on
the verdict letter only (reasoning tokens masked out), then measures its verdict on the benchmark by teacher
forcing: the base judge's own reasoning for each item, then which of "A" / "B" the tuned judge puts more
probability on. A table, then one JSON line. If this stays near chance, the loop cannot lift the judge
either: the verdict is not learnable from the judge's own reasoning in this budget.

    python bench/verdict_probe.py --sft runs/demo/iter_1/sft.jsonl --bench runs/demo/benchmark/benchmark.jsonl
"""

from __future__ import annotations

import argparse
import json
import random

import torch

from fastjudge import data
from fastjudge.config import LoopConfig
from fastjudge.data import prompts
from fastjudge.models import load_adapter
from fastjudge.stages import evaluate


def verdict_accuracy(adapter, items: list[dict], raw: list[dict], batch: int = 64) -> float:
    """Teacher-forced verdict accuracy: (prompt, reasoning) from `raw`, verdict letter by A/B logits."""
    by_index = {item["index"]: item for item in items}
    a_id, b_id = adapter.tokenizer.convert_tokens_to_ids(["A", "B"])
    correct = 0
    for start in range(0, len(raw), batch):
        rows = raw[start:start + batch]
        images, prompt_texts, targets, truth = [], [], [], []
        for row in rows:
            item = by_index[row["index"]]
            first = row["shown_first"]
            images.append(data.load_image(item["image"]))
            prompt_texts.append(prompts.judge_prompt(item["query"], item["response"][first],
                                                     item["response"][1 - first]))
            targets.append(row["output"].split(" verdict :")[0] + " verdict : [[ A ]]")
            good = min((0, 1), key=lambda i: item["human_ranking"][i])
            truth.append("A" if first == good else "B")
        inputs, labels = adapter.training_inputs(images, prompt_texts, targets)
        with torch.no_grad():
            logits = adapter.model(**inputs).logits
        for i, letter in enumerate(truth):
            position = (labels[i] != -100).nonzero().flatten()[-3]  # the verdict letter
            pick = "A" if logits[i, position - 1, a_id] > logits[i, position - 1, b_id] else "B"
            correct += pick == letter
    return correct / len(raw)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="judge to start from (default: the shipped toy base model)")
    parser.add_argument("--sft", required=True, help="sft.jsonl of kept traces")
    parser.add_argument("--bench", required=True, help="benchmark JSONL")
    parser.add_argument("--steps", type=int, default=150, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=32, help="traces per step")
    parser.add_argument("--lr", type=float, default=1e-3, help="learning rate")
    args = parser.parse_args()
    torch.set_num_threads(2)
    adapter = load_adapter(args.model)
    items, _ = data.load_benchmark(args.bench)
    base_raw = evaluate.run(adapter, items, LoopConfig().eval_options(), seed=0).raw  # the base judge's reasoning
    before = verdict_accuracy(adapter, items, base_raw)
    traces = data.read_records(args.sft)
    images = {p: data.load_image(p) for p in {t["image"] for t in traces}}
    opt = torch.optim.AdamW(adapter.begin_training("text"), lr=args.lr)
    rng = random.Random(0)
    losses = []
    for _ in range(args.steps):
        batch = rng.sample(traces, min(args.batch_size, len(traces)))
        inputs, labels = adapter.training_inputs([images[t["image"]] for t in batch],
                                                  [t["prompt"] for t in batch], [t["target"] for t in batch])
        verdict = torch.zeros_like(labels, dtype=torch.bool)
        for i in range(labels.shape[0]):
            target_positions = (labels[i] != -100).nonzero().flatten()
            verdict[i, target_positions[-3]] = True  # "... [[ X ]] <|eos|>": X is third from the end
        loss = adapter.target_loss(inputs, labels.masked_fill(~verdict, -100), "mean")
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    after = verdict_accuracy(adapter, items, base_raw)
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    print(f"{'verdict loss, first 10 steps':<40}{first:>8.3f}")
    print(f"{'verdict loss, last 10 steps':<40}{last:>8.3f}")
    print(f"{'benchmark verdict accuracy, before':<40}{before:>8.3f}")
    print(f"{'benchmark verdict accuracy, after':<40}{after:>8.3f}")
    print(json.dumps({"bench": "verdict_probe", "steps": args.steps, "traces": len(traces),
                      "verdict_loss_first": round(first, 4), "verdict_loss_last": round(last, 4),
                      "accuracy_before": round(before, 4), "accuracy_after": round(after, 4)}))


if __name__ == "__main__":
    main()
