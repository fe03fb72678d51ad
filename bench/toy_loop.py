"""The toy loop's documented runs: `fastjudge iterate` on several seeds with the defaults (as `make demo`), and
the ablations (three iterations, seed 0); each run's summary.json stamped with the environment, one file a run.
A table, then one JSON line.

    python bench/toy_loop.py --out-dir bench/results/toy-loop-DATE [--seeds 0,1,2,500] [--ablations all] [--jobs 2]

Each run is its own process with one torch thread (`--jobs` of them at a time: on 2 cores, 2).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _env import environment, report  # noqa: E402

# seed 0 with every piece (the "full" run), then one piece taken away at a time; all three iterations, never
# stopped early, so that each ends where the same number of iterations leads
ABLATION_ARGS = ["--seed", "0", "--iterations", "3", "--min-gain", "-1"]
ABLATIONS = {"full": [], "nofilter": ["--ablation", "no-filter"], "shuffled": ["--ablation", "shuffled-labels"],
             "oracle": ["--ablation", "oracle-votes"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", required=True, help="folder of the result files (NAME.json a run)")
    parser.add_argument("--seeds", default="0,1,2,500", help="seeds of the default runs ('' for none)")
    parser.add_argument("--ablations", default="",
                        help=f"also these three-iteration runs of seed 0, comma-separated among {', '.join(ABLATIONS)} "
                             "('all' for every one)")
    parser.add_argument("--model", default=None, help="toy checkpoint (default: the shipped base)")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time")
    args = parser.parse_args()
    runs = {f"s{seed}": ["--seed", seed] for seed in args.seeds.split(",") if seed}
    wanted = list(ABLATIONS) if args.ablations == "all" else [a for a in args.ablations.split(",") if a]
    unknown = sorted(set(wanted) - set(ABLATIONS))
    if unknown:
        parser.error(f"--ablations: unknown {unknown}, expected some of {list(ABLATIONS)}")
    runs |= {name: ABLATION_ARGS + ABLATIONS[name] for name in wanted}
    model = ["--model", args.model] if args.model else []
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = environment()

    with tempfile.TemporaryDirectory() as tmp:
        def one(name: str) -> dict:
            command = [sys.executable, "-m", "fastjudge", "iterate", "--out", str(Path(tmp) / name), *model,
                       *runs[name]]
            done = subprocess.run(command, capture_output=True, text=True, env=env)
            if done.returncode != 0:
                raise RuntimeError(f"{name}: {' '.join(command)} failed:\n{done.stderr[-3000:]}")
            summary = json.loads((Path(tmp) / name / "summary.json").read_text())
            command[0:3] = ["fastjudge"]
            command[command.index("--out") + 1] = f"runs/{name}"
            result = {"bench": "toy_loop", "run": name, "command": " ".join(command), **summary,
                      "environment": stamp}
            (out_dir / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
            return result

        with ThreadPoolExecutor(max(1, args.jobs)) as pool:
            results = dict(zip(runs, pool.map(one, runs)))

    print(f"{'run':<10}{'accuracy per iteration':<44}{'gain':>8}")
    for name, result in results.items():
        overall = [it["metrics"]["overall"] for it in result["iterations"]]
        print(f"{name:<10}{' / '.join(f'{x:.3f}' for x in overall):<44}{overall[-1] - overall[0]:>+8.3f}")
    report({"bench": "toy_loop", "runs": {name: [it["metrics"]["overall"] for it in r["iterations"]]
                                          for name, r in results.items()}})


if __name__ == "__main__":
    main()
