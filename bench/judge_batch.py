"""How much one engine call gains from more pairs: `Judge.compare_many` time per pair at several pairs per call
(the toy judge, both orders, greedy), in one run. It bounds what the reward server's batching can gain on a machine.

    python bench/judge_batch.py                    # 4, 16 and 40 pairs a call
    python bench/judge_batch.py --sizes 4,64

Prints a table, then one JSON line; --out also writes it to a file.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _env import median_ms, report  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="4,16,40", help="pairs per call")
    parser.add_argument("--judge-tokens", type=int, default=80, help="as `fastjudge serve` on the toy")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    from PIL import Image

    from fastjudge.judge import Judge
    from fastjudge.toy import files as toy_files
    sizes = [int(x) for x in args.sizes.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        bench = toy_files.write_toy_benchmark(Path(tmp) / "benchmark", per_category=-(-max(sizes) // 5))
        pairs_file, _ = toy_files.write_judge_examples(bench, Path(tmp) / "judge")
        pairs = [json.loads(line) for line in pairs_file.read_text().splitlines()]
        images = [Image.open(pairs_file.parent / p["image"]).convert("RGB") for p in pairs]
    judge = Judge.load(None, judge_tokens=args.judge_tokens, batch_rows=256)

    def call(n: int) -> None:
        judge.compare_many(images[:n], [p["question"] for p in pairs[:n]], [p["response_a"] for p in pairs[:n]],
                           [p["response_b"] for p in pairs[:n]])

    rows = []
    for n in sizes:
        call(n)  # warm-up: the feature cache and the first shapes
        seconds = median_ms(lambda: call(n), args.repeats, False) / 1e3
        rows.append({"pairs": n, "seconds": round(seconds, 4), "ms_per_pair": round(seconds / n * 1e3, 2)})
    for row in rows:
        row["gain_over_smallest"] = round(rows[0]["ms_per_pair"] / row["ms_per_pair"], 2)
    print(f"{'pairs a call':>13} {'seconds':>9} {'ms a pair':>10} {'gain':>6}")
    for row in rows:
        print(f"{row['pairs']:>13} {row['seconds']:>9} {row['ms_per_pair']:>10} {row['gain_over_smallest']:>5}x")
    report({"bench": "judge_batch", "judge_tokens": args.judge_tokens, "rows": rows}, args.out)


if __name__ == "__main__":
    main()
