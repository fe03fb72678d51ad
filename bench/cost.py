"""The cost model of `fastjudge cost` as a bench: a recipe's GPU-hours per stage, ours against the stack a user
would otherwise assemble, from a rates file; a table, then one JSON line (--out: also a file).

    python bench/cost.py                                   # the paper's recipe, the newest rates file
    python bench/cost.py --set prompts=20000 --rates FILE
    python bench/cost.py --seed-rates bench/results/sampler-h200-2026-12-04.json --write-rates FILE

--seed-rates builds a rates file from a committed bench/sampler.py result at 11B shapes (the one stage such a
run measures as the cost model counts it: closed sampling at n 16); bench/paper_scale.py writes a whole one
on a GPU.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _env import report  # noqa: E402

from fastjudge import cost  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", default=None, help="rates file (default: the newest results/rates-*.json)")
    parser.add_argument("--set", default="", dest="settings", help="recipe changes, name=value,...")
    parser.add_argument("--seed-rates", default=None, help="a bench/sampler.py result to build a rates file from")
    parser.add_argument("--write-rates", default=None, help="where --seed-rates writes the rates file")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.seed_rates:
        if not args.write_rates:
            parser.error("--seed-rates needs --write-rates")
        Path(args.write_rates).write_text(json.dumps(cost.seed_rates(args.seed_rates), indent=2) + "\n")
        print(f"wrote {args.write_rates}")
        return
    rates = args.rates or cost.newest_rates(RESULTS)
    if rates is None:
        parser.error(f"no rates-*.json in {RESULTS}: pass --rates")
    result = cost.estimate(cost.Recipe(**cost.parse_settings(args.settings)), cost.Rates.load(rates))
    print(cost.table(result))
    report({"bench": "cost"} | result, args.out)


if __name__ == "__main__":
    main()
