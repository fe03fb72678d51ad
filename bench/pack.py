"""Packed against padded fine-tuning: tokens per second of `Adapter.sft_backward` with and without `pack`.

    python bench/pack.py                       # the shipped toy base on the CPU, the loop's batch of 32
    python bench/pack.py --device cuda --preset small --out FILE

Two batches are measured: the toy pretraining mixture (captions, short answers, rewrites, judge traces: 10 to
170 tokens an example, where padding wastes most) and judge traces alone (what the loop fine-tunes on, of more
even length). Each step is one forward and backward over the batch in `--micro-batches` passes, as the loop
runs it (the vision tower frozen: features cached before timing), packed and padded in turn, the median of
`--repeats` after a warm-up. The table gives the rows each way, the share of padding positions, seconds per
step, target tokens per second and the ratio, and the losses' relative difference (the same batch: packing
is exact up to the order of the sums); then one JSON line (--out: also a file).
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # tiny.py: the models we build
from _env import report  # noqa: E402

from fastjudge.models import ToyAdapter  # noqa: E402
from fastjudge.models.training import pack_rows  # noqa: E402
from fastjudge.models.toy import base_model_dir  # noqa: E402
from fastjudge.toy import pretrain  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=["toy", "small"], default="toy",
                        help="toy: the shipped toy base; small: a random-weight Mllama of tests/tiny.py's 'small'")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--micro-batches", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.preset == "toy":
        adapter = ToyAdapter.load(base_model_dir(), device=args.device)
    else:
        import tiny
        adapter = tiny.build_mllama_adapter("small", args.device, torch.bfloat16 if "cuda" in args.device
                                            else torch.float32)
    mixture = list(pretrain.DEFAULT_MIXTURE.values())
    judge_only = [1.0 if task == "judge" else 0.0 for task in pretrain.TASKS]
    batches = {"pretraining mixture": mixture, "judge traces": judge_only}

    print(f"{'batch':<22}{'rows padded':>12}{'packed':>8}{'pad share':>10}{'packed':>8}"
          f"{'s/step padded':>15}{'packed':>9}{'tok/s padded':>14}{'packed':>10}{'ratio':>8}{'loss diff':>11}")
    results = []
    for name, weights in batches.items():
        rng = random.Random(0)
        images, prompts, targets, _, _ = pretrain.batch(rng, args.batch_size, weights)
        heads = [adapter.prompt_ids(p, None) for p in prompts]
        tails = [adapter.target_ids(t) for t in targets]
        lengths = [len(h) + len(t) for h, t in zip(heads, tails)]
        target_tokens = sum(map(len, tails))
        rows = pack_rows(lengths, max(lengths))
        # padded positions: each pass pads to its own longest example (sorted by length, as sft_backward does)
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]) + len(targets[i]))
        size = -(-len(order) // args.micro_batches)
        padded_positions = sum(len(group) * max(lengths[i] for i in group)
                               for group in (order[k:k + size] for k in range(0, len(order), size)))
        # packed: the rows in the order packed (longest first), each pass padded to its own longest row
        row_lengths = [sum(lengths[i] for i in row) for row in rows]
        size_rows = -(-len(rows) // args.micro_batches)
        packed_positions = sum(len(part) * max(part) for part in
                               (row_lengths[k:k + size_rows] for k in range(0, len(rows), size_rows)))
        adapter.begin_training("text")
        adapter.image_features(images)  # cached before timing: the loop's frozen tower

        def step(pack: bool) -> tuple[float, float]:
            for p in adapter.model.parameters():
                p.grad = None
            if "cuda" in args.device:
                torch.cuda.synchronize()
            start = time.perf_counter()
            loss = adapter.sft_backward(images, prompts, targets, micro_batches=args.micro_batches, pack=pack)
            if "cuda" in args.device:
                torch.cuda.synchronize()
            return time.perf_counter() - start, loss

        step(False), step(True)  # warm-up
        times = {False: [], True: []}
        losses = {}
        for _ in range(args.repeats):
            for pack in (False, True):
                seconds, losses[pack] = step(pack)
                times[pack].append(seconds)
        adapter.end_training()
        padded_s, packed_s = statistics.median(times[False]), statistics.median(times[True])
        result = {"batch": name, "examples": len(prompts), "target_tokens": target_tokens,
                  "tokens": sum(lengths), "rows_padded": len(prompts), "rows_packed": len(rows),
                  "positions_padded": padded_positions, "positions_packed": packed_positions,
                  "pad_share_padded": 1 - sum(lengths) / padded_positions,
                  "pad_share_packed": 1 - sum(lengths) / packed_positions,
                  "padded_s": padded_s, "packed_s": packed_s,
                  "padded_target_tok_s": target_tokens / padded_s, "packed_target_tok_s": target_tokens / packed_s,
                  "speedup": padded_s / packed_s,
                  "loss_relative_difference": abs(losses[True] - losses[False]) / abs(losses[False])}
        results.append(result)
        print(f"{name:<22}{len(prompts):>12}{len(rows):>8}{result['pad_share_padded']:>10.2f}"
              f"{result['pad_share_packed']:>8.2f}{padded_s:>15.3f}{packed_s:>9.3f}"
              f"{result['padded_target_tok_s']:>14.0f}{result['packed_target_tok_s']:>10.0f}"
              f"{result['speedup']:>8.2f}{result['loss_relative_difference']:>11.1e}")
    report({"bench": "pack", "preset": args.preset, "device": args.device, "batch_size": args.batch_size,
            "micro_batches": args.micro_batches, "repeats": args.repeats, "threads": torch.get_num_threads(),
            "results": results}, args.out)


if __name__ == "__main__":
    main()
