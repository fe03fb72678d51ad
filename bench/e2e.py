"""The whole loop end to end, as a user would run it: every stage's time and peak memory, and the checkpoint
reloaded with plain transformers.

    python bench/e2e.py --preset wide-11b-short --device cuda --out $OUT/e2e.json   # bench/gpu.sh, call 1
    python bench/e2e.py --preset tiny                                              # CPU (tests/test_e2e.py)

A random-weight Mllama (`tiny`: tests/tiny.py's checkpoint; `wide-11b-short`: Llama-3.2-11B-Vision's widths,
head counts and 128k vocabulary with 3 text layers, one of them cross-attention, and a 2+1-layer vision tower) is
saved as a checkpoint with the Llama chat template. Then, each a `fastjudge` command in a process of its own:
1. `iterate` for one iteration on a shapes-world pool and the toy benchmark: synth (closed and open prompts),
   filter, fine-tune (`--train text`), eval with verdict probabilities; with `--ablation no-filter`, since random
   weights write no parseable verdict and the filter would keep nothing to train on. Each stage's seconds and
   peak memory come from the run's stages.json;
2. `train` under torchrun (world size 1: FSDP2 over one rank), `--train text`, then `--train lora` (where peft
   is installed);
3. `judge` with the fine-tuned checkpoint on the toy judge pairs;
4. the checkpoint loaded with `AutoModelForImageTextToText`.
Prints a table, then one JSON line; --out also writes it to a file, and rewrites it after each stage (marked
"partial" until the end), so that a run cut short keeps what it measured. A stage that fails is recorded with its
error; the stages after it still run where they can.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # tiny.py: the models we build
import tiny  # noqa: E402
from _env import report, save_partial  # noqa: E402

# a command in a process of its own, reporting its exit status, seconds and peak memory as its last line
RUNNER = """
import json, sys, time
t0 = time.perf_counter()
from fastjudge.cli import main
code = main(sys.argv[1:])
import torch
with open("/proc/self/status") as f:
    rss = next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) // 1024
cuda = torch.cuda.max_memory_allocated() // 2**20 if torch.cuda.is_available() else None
print(json.dumps({"code": code, "seconds": round(time.perf_counter() - t0, 2), "rss_peak_mb": rss,
                  "cuda_peak_mb": cuda}))
"""
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1"]  # a free port


def command(argv: list[str], launcher: list[str] | None = None) -> dict:
    """Run `fastjudge ARGV` (under `launcher`, torchrun) in a fresh process; its figures, or its error."""
    if launcher:
        runner = Path(tempfile.mkdtemp()) / "runner.py"
        runner.write_text(RUNNER)
        line = [*launcher, str(runner), *argv]
    else:
        line = [sys.executable, "-c", RUNNER, *argv]
    t0 = time.perf_counter()
    done = subprocess.run(line, capture_output=True, text=True, timeout=3600)
    lines = done.stdout.strip().splitlines()
    try:
        result = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        result = {"code": done.returncode}
    for line in lines[:-1]:  # train's own line: over how many ranks FSDP2 sharded the model
        if line.startswith("{") and '"sharded_ranks"' in line:
            result["sharded_ranks"] = json.loads(line)["sharded_ranks"]
    result["wall_seconds"] = round(time.perf_counter() - t0, 2)
    if result.get("code") != 0:
        result["error"] = done.stderr.strip().splitlines()[-1:] if done.stderr.strip() else []
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=["tiny", "wide-11b-short"], default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--prompts", type=int, default=8, help="prompts synthesized into pairs")
    parser.add_argument("--work", default=None, help="folder for the checkpoint and runs (default: a temporary one)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    from fastjudge.toy import files as toy_files
    work = Path(args.work or tempfile.mkdtemp(prefix="fastjudge-e2e-"))
    checkpoint = work / "checkpoint"
    t0 = time.perf_counter()
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    if args.preset == "tiny":
        tiny.build_checkpoint("mllama", checkpoint)
    else:
        tiny.build_mllama_adapter(args.preset, args.device, dtype).save(checkpoint)
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    built = time.perf_counter() - t0
    pool = toy_files.write_toy_prompts(work / "world", args.prompts, seed=0, closed_fraction=0.5)
    bench = toy_files.write_toy_benchmark(work / "benchmark", per_category=2)
    pairs, _ = toy_files.write_judge_examples(bench, work / "judge-inputs")
    common = ["--device", args.device, "--answer-tokens", "16", "--judge-tokens", "16"]
    stages: dict[str, dict] = {}

    def measured(name: str, row: dict) -> None:
        stages[name] = row
        save_partial(args.out, {"bench": "e2e", "preset": args.preset, "device": args.device,
                                "build_seconds": round(built, 1), "commands": stages})

    measured("iterate", command(["iterate", "--model", str(checkpoint), "--prompts", str(pool), "--bench-data",
                                 str(bench), "--out", str(work / "run"), "--iterations", "1", "--prompts-per-iteration",
                                 str(args.prompts), "--n-samples", "4", "--min-votes", "2", "--filter-samples", "2",
                                 "--epochs", "1", "--batch-size", "4", "--ablation", "no-filter", *common]))
    record = work / "run" / "iter_1" / "stages.json"
    loop_stages = json.loads(record.read_text()) if record.is_file() else {}
    sft = work / "run" / "iter_1" / "sft.jsonl"
    training = ["--judge", str(checkpoint), "--sft", str(sft), "--epochs", "1", "--batch-size", "4", "--device",
                args.device]
    measured("train text (torchrun)", command(["train", *training, "--train", "text", "--out", str(work / "text")],
                                              TORCHRUN))
    if importlib.util.find_spec("peft") is not None:
        measured("train lora (torchrun)", command(["train", *training, "--train", "lora", "--out",
                                                   str(work / "lora")], TORCHRUN))
    else:
        measured("train lora (torchrun)", {"skipped": "peft is not installed"})
    measured("judge", command(["judge", "--judge", str(work / "text"), "--pairs", str(pairs), "--out",
                               str(work / "judged"), "--judge-tokens", "16", "--device", args.device]))
    try:
        from transformers import AutoModelForImageTextToText
        AutoModelForImageTextToText.from_pretrained(work / "text")
        reload = "ok"
    except Exception as failure:  # recorded: the figures above stand
        reload = repr(failure)
    metrics = work / "run" / "iter_1" / "metrics.json"
    result = {"bench": "e2e", "preset": args.preset, "device": args.device, "build_seconds": round(built, 1),
              "loop_stages": {"seconds": loop_stages.get("seconds"), "peak_mb": loop_stages.get("peak_mb")},
              "commands": stages, "transformers_reload": reload,
              "eval_has_p_first": metrics.is_file() and "calibration" in json.loads(metrics.read_text()),
              "ok": all(s.get("code") == 0 for s in stages.values() if "skipped" not in s) and reload == "ok"}
    print(f"{'stage':>24} {'seconds':>9} {'rss peak MB':>12} {'cuda peak MB':>13}")
    for name in ("synth", "filter", "train", "eval"):
        peak = (loop_stages.get("peak_mb") or {}).get(name) or {}
        print(f"{'iterate: ' + name:>24} {(loop_stages.get('seconds') or {}).get(name, '-'):>9} "
              f"{peak.get('rss', '-')!s:>12} {peak.get('cuda', '-')!s:>13}")
    for name, row in stages.items():
        print(f"{name:>24} {row.get('seconds', row.get('skipped', '-'))!s:>9} {row.get('rss_peak_mb', '-')!s:>12} "
              f"{row.get('cuda_peak_mb', '-')!s:>13}" + (f"  error: {row['error']}" if "error" in row else ""))
    print(f"checkpoint reloaded with transformers: {reload}; ok: {result['ok']}")
    report(result, args.out)


if __name__ == "__main__":
    main()
