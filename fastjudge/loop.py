"""`fastjudge iterate`: synthesize -> filter -> train -> eval, repeated until the gain flattens.

Layout of a run (`--out DIR`):
    DIR/config.json          the resolved LoopConfig
    DIR/skipped.jsonl        bad prompt / benchmark lines: file, line, reason
    DIR/world/, DIR/benchmark/   the toy prompt pool and held-out benchmark (toy preset only)
    DIR/iter_0/metrics.json  the base judge, before any training
    DIR/iter_<k>/            pairs.jsonl, judgments.jsonl, sft.jsonl, checkpoint/, metrics.json,
                             predictions.jsonl, outputs.jsonl, stages.json (seconds and counts per stage)
    DIR/iter_<k>/rates.json  toy preset only: the iteration measured against the scene ground truth (`toy.rates`)
    DIR/summary.json         {"iterations": [{"iteration", "metrics", "pairs", "kept", "keep_rate", "rates",
                             "seconds"}, ...], "best": {"iteration", "overall", "checkpoint"}}
    DIR/accuracy.png         accuracy per category over iterations (and, toy preset, the rates)
    DIR/report.html          the run to read: accuracy, rates, sample pairs with the judge's judgments (`report_html`)

Every file is written atomically, and a stage counts as done when its output exists, so `--resume` continues a
stopped run from its last completed stage.
"""

from __future__ import annotations

import contextlib
import copy
import json
import random
import shutil
import time
from pathlib import Path
from typing import Callable

import torch

from fastjudge import ablations, data
from fastjudge.config import LoopConfig, resolved
from fastjudge.core import dist
from fastjudge.core.dist import World
from fastjudge.curves import check_available, write_curves
from fastjudge.data.runs import RunLock, open_run_folder, run_files
from fastjudge.data.scoring import headline
from fastjudge.gate import Gate
from fastjudge.models import Adapter, FeatureCache, load_adapter
from fastjudge.models.partial import drop_stored_batches, stored_batches
from fastjudge.report import write_summary
from fastjudge.report_html import write_report
from fastjudge.stages import evaluate, synth, train
from fastjudge.stages import filter as filter_stage
from fastjudge.toy import rates as toy_rates
from fastjudge.toy.files import write_toy_benchmark, write_toy_prompts


# what a start that failed before its first stage leaves in the run folder: the record of the inputs it refused
FAILED_START_KEEPS = ("skipped.jsonl",)


def prepare_inputs(cfg: LoopConfig, out: Path, gate: Gate, world: World = World()
                   ) -> tuple[list[data.PromptRecord], list[dict], list[dict], Path]:
    """The prompt pool (images staged in the run folder), the benchmark items the judge can run on, the items
    the score counts (`Gate.bench`) and the benchmark file, read through the run's input gate; the toy preset's
    pool and benchmark are written first. In a job of several ranks, rank 0 writes the files first and the others read them after it."""
    with dist.main_first(world):  # rank 0 writes the toy world, the image copies and skipped.jsonl first
        prompts_path = cfg.prompts
        if prompts_path is None:
            prompts_path = out / "world" / "prompts.jsonl"
            if not prompts_path.exists():
                write_toy_prompts(out / "world", cfg.prompts_per_iteration * cfg.iterations, cfg.seed,
                                  cfg.closed_fraction)
        bench_path = cfg.bench_data
        if bench_path is None:  # the toy benchmark (LoopConfig requires a file for the others)
            bench_path = out / "benchmark" / "benchmark.jsonl"
            if not bench_path.exists():
                write_toy_benchmark(out / "benchmark", cfg.toy_bench_per_category)
        records = gate.prompts(prompts_path, cfg.max_image_pixels, cfg.prompt_columns, cfg.sample, cfg.seed)
        items, score_items = gate.bench(cfg.bench, bench_path, cfg.images)
    return records, items, score_items, Path(bench_path)


def fit_inputs(gate: Gate, adapter: Adapter, cfg: LoopConfig, records: list[data.PromptRecord], items: list[dict],
               bench_path: Path) -> tuple[list[data.PromptRecord], list[dict]]:
    """The prompts and benchmark items whose texts fit the model's context (`Gate.fit_prompts`,
    `Gate.fit_judged`); the others are counted skips."""
    records = gate.fit_prompts(adapter, records, cfg.answer_tokens, cfg.max_prompt_tokens)
    items = gate.fit_judged(adapter, items, cfg.judge_tokens, lambda item, a, b: evaluate.judge_prompt_for(
        adapter, cfg.bench, cfg.prompt, item["query"], a, b), lambda item: item["response"], bench_path,
        "query, response")
    return records, items


def prompts_for(records: list[data.PromptRecord], cfg: LoopConfig, iteration: int) -> list[data.PromptRecord]:
    """Disjoint slices of the pool while it lasts; a seeded sample of it afterwards."""
    size = cfg.prompts_per_iteration
    if len(records) >= size * iteration:
        return records[size * (iteration - 1): size * iteration]
    return random.Random(cfg.seed * 7919 + iteration).sample(records, min(size, len(records)))


class _Stages:
    """iter_<k>/stages.json: seconds, counts and peak memory of each finished stage. A stage's record is written
    before the file that marks the stage done (pairs.jsonl, sft.jsonl, the checkpoint, metrics.json): a run cut
    between the two redoes the stage and writes its record again; the other order would lose it."""

    def __init__(self, folder: Path, world: World = World()):
        self.path, self.world = folder / "stages.json", world
        self.record = json.loads(self.path.read_text()) if self.path.exists() else {"seconds": {}, "stats": {}}

    def done(self, stage: str, seconds: float, stats: dict) -> None:
        self.record["seconds"][stage] = round(seconds, 2)
        self.record["stats"][stage] = stats
        self.record.setdefault("peak_mb", {})[stage] = peak_memory_mb()
        if self.world.main:
            data.write_json(self.path, self.record)


def peak_memory_mb() -> dict:
    """This process's peak memory since the last call (the first: since it began), then reset: resident memory
    (Linux's VmHWM, reset through /proc/self/clear_refs) and, on a GPU, the memory torch allocated."""
    peak: dict = {"rss": None, "cuda": None}
    try:
        with open("/proc/self/status") as f:
            peak["rss"] = next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) // 1024
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except (OSError, StopIteration):  # not Linux: no resident peak
        pass
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        peak["cuda"] = torch.cuda.max_memory_allocated() // 2**20
        torch.cuda.reset_peak_memory_stats()
    return peak


def run_iteration(k: int, cfg: LoopConfig, out: Path, generator: Adapter, judge: Adapter,
                  records: list[data.PromptRecord], items: list[dict], score_items: list[dict], gate: Gate,
                  world: World = World(), reload: Callable[[Path | None], Adapter] | None = None,
                  source: Path | str | None = None) -> tuple[dict, Adapter]:
    """One iteration; returns its summary entry and the judge after it (`judge` fine-tuned in place, or on the
    other ranks of a job, rank 0's checkpoint loaded with `reload`; `source`: the checkpoint the judge was
    loaded from, None for the shipped toy base). Stages whose outputs exist are loaded, not
    redone. In a job every rank runs every stage (generation split between them); rank 0 writes the files."""
    folder = out / f"iter_{k}"
    folder.mkdir(parents=True, exist_ok=True)
    stages = _Stages(folder, world)
    seed = cfg.seed * 1000 + k * 100  # stages offset it by 0, 10, 20: no two share a random stream

    if not (folder / "pairs.jsonl").exists():
        t0 = time.time()
        with stored_batches(generator, folder, "synth", world):
            result = synth.run(generator, prompts_for(records, cfg, k), cfg.synth_options(), seed,
                               oracle=ablations.oracle_answers(cfg))
        ablations.shuffle_labels(cfg, result.pairs, seed + 5)
        stages.done("synth", time.time() - t0, result.stats)
        if world.main:
            data.write_records(folder / "pairs.jsonl", result.pairs)
        dist.barrier()
    pairs = gate.fit_pairs(judge, data.read_records(folder / "pairs.jsonl"), cfg.judge_tokens,
                           folder / "pairs.jsonl")

    if not (folder / "sft.jsonl").exists():
        t0 = time.time()
        with stored_batches(judge, folder, "filter", world):
            result = filter_stage.run(judge, pairs, cfg.filter_options(), seed + 10)
        if world.main:
            data.write_jsonl(folder / "judgments.jsonl", result.judgments)
        stages.done("filter", time.time() - t0, result.stats)
        if world.main:
            data.write_records(folder / "sft.jsonl", result.traces)
        dist.barrier()
    traces = gate.fit_traces(judge, data.read_records(folder / "sft.jsonl"), folder / "sft.jsonl")

    checkpoint = folder / "checkpoint"
    if not checkpoint.exists():
        t0 = time.time()
        judge = train.run_to(checkpoint, judge, traces, cfg.train_options(), seed + 20, world, reload, source,
                         on_done=lambda stats: stages.done("train", time.time() - t0, stats),
                         state_dir=folder / "train_state")
        stages = _Stages(folder, world)  # rank 0's record of the stages so far

    if not (folder / "metrics.json").exists():
        t0 = time.time()
        evaluate.run_to(folder, judge, items, cfg.eval_options(), cfg.seed, score_items, before_done=lambda: stages.done(
            "eval", time.time() - t0, {"feature_cache_so_far": dict(judge.feature_cache.stats)}), world=world)
    drop_stored_batches(folder, world)  # also those of a run killed between a stage's files and their removal
    metrics = json.loads((folder / "metrics.json").read_text())
    stages = _Stages(folder, world)
    kept = len({trace["pair"] for trace in traces})  # a kept pair gives one trace or more in each order
    return {"iteration": k, "metrics": headline(metrics), "pairs": len(pairs), "kept": kept,
            "keep_rate": kept / len(pairs) if pairs else None,
            "seconds": stages.record["seconds"], "stats": stages.record["stats"]}, judge



def measures_rates(cfg: LoopConfig) -> bool:
    """The toy preset end to end (shipped or toy model, generated pool, toy benchmark): ground truth exists."""
    return cfg.prompts is None and cfg.bench == "toy" and cfg.bench_data is None


def rates_of(k: int, cfg: LoopConfig, out: Path, items: list[dict], world: World = World()) -> dict:
    """iter_<k>/rates.json, computed once from the iteration's files and the scene ground truth (by every rank
    of a job alike; rank 0 writes it)."""
    folder = out / f"iter_{k}"
    path = folder / "rates.json"
    if not path.exists():
        pairs = data.read_records(folder / "pairs.jsonl") if k > 0 else []
        judgments = data.read_jsonl(folder / "judgments.jsonl") if k > 0 else []
        traces = data.read_records(folder / "sft.jsonl") if k > 0 else None
        rates = toy_rates.iteration_rates(pairs, judgments, items, data.read_jsonl(folder / "outputs.jsonl"),
                                          cfg.prompts_per_iteration * cfg.iterations, cfg.seed,
                                          cfg.closed_fraction, traces)
        if world.main:
            data.write_json(path, rates)
        return rates
    return json.loads(path.read_text())


def run(cfg: LoopConfig, given: set[str] | None = None, overrides: tuple[str, ...] = ()) -> dict:
    """Run (or, with cfg.resume, continue) the loop; returns the summary written to DIR/summary.json.

    The run folder is held by this process for the whole run (`data.runs.RunLock`). On --resume the saved
    config.json decides: a setting in `given` (the flags the command line gave; None: every field of `cfg`) that
    differs from the saved one is a ValueError naming each, except those of RESUMABLE that `overrides` names."""
    world = dist.start(cfg.dist_timeout_s, cfg.device)
    out = open_run_folder(cfg.out)
    # rank 0 holds the folder for the job; every rank checks the configuration before rank 0 writes anything
    with RunLock(out) if world.main else contextlib.nullcontext():
        cfg = resolved(cfg, out, given, overrides, world.main)
        dist.barrier()
        return _run_locked(cfg, out, world)


def _run_locked(cfg: LoopConfig, out: Path, world: World) -> dict:
    """The run in its held folder: inputs through the gate, the base evaluated (iter_0), then the iterations
    until `cfg.iterations` or `cfg.patience` flat ones in a row."""
    # a new run: a start that fails leaves the folder as it found it, but for the record of why
    fresh = world.main and not [p for p in run_files(out) if p.name not in FAILED_START_KEEPS]
    gate = Gate(out, world)
    # the run's one feature cache: the base and every judge after it share a frozen vision tower's entries
    cache = FeatureCache(max_bytes=int(cfg.feature_cache_gb * 2**30))

    def load(path: str | Path | None) -> Adapter:
        adapter = load_adapter(None if path is None else str(path), device=cfg.device, dtype=cfg.dtype,
                               feature_cache=cache)
        adapter.shard = world.shard  # in a job, generation is split between the ranks
        return adapter

    try:
        if cfg.log_to == "tensorboard":
            check_available()  # before any work
        if world.main:
            cfg.save(out / "config.json")
        torch.manual_seed(cfg.seed)
        records, items, score_items, bench_path = prepare_inputs(cfg, out, gate, world)
        base = load(cfg.model)
        records, items = fit_inputs(gate, base, cfg, records, items, bench_path)
    except BaseException:
        if fresh:  # nothing of a failed start may block the corrected command; skipped.jsonl says why it failed
            for entry in run_files(out):
                if entry.name not in FAILED_START_KEEPS:
                    shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        raise
    summary: dict = {"inputs": {"prompts": len(records), "skipped_lines": len(gate.skips),
                                "images": json.loads((out / "inputs.json").read_text())["images"]},
                     "iterations": []}
    folder0 = out / "iter_0"
    if not (folder0 / "metrics.json").exists():
        t0 = time.time()
        evaluate.run_to(folder0, base, items, cfg.eval_options(), cfg.seed, score_items,
                        before_done=lambda: _Stages(folder0).done("eval", time.time() - t0, {}), world=world)
    drop_stored_batches(folder0, world)
    summary["iterations"].append({"iteration": 0, "metrics": headline(json.loads((folder0 / "metrics.json").read_text())),
                                  "pairs": 0, "kept": 0, "keep_rate": None, "seconds": _Stages(folder0).record["seconds"]})
    if measures_rates(cfg):
        summary["iterations"][0]["rates"] = rates_of(0, cfg, out, items, world)
    _written(out, summary, cfg, world)

    judge: Adapter | None = None
    for k in range(1, cfg.iterations + 1):
        if judge is None:  # first iteration of this process: start from the base or, resuming, the last judge
            previous = out / f"iter_{k - 1}" / "checkpoint"
            if k > 1:
                judge = load(str(previous))
            else:
                judge = copy.deepcopy(base) if cfg.synth_model == "base" else base
        if (out / f"iter_{k}" / "checkpoint").exists():  # resuming past this iteration's training
            judge = load(str(out / f"iter_{k}" / "checkpoint"))
        generator = base if cfg.synth_model == "base" else judge
        source = out / f"iter_{k - 1}" / "checkpoint" if k > 1 else cfg.model
        entry, judge = run_iteration(k, cfg, out, generator, judge, records, items, score_items, gate, world, load,
                                     source)
        if measures_rates(cfg):
            entry["rates"] = rates_of(k, cfg, out, items, world)
        summary["iterations"].append(entry)
        _written(out, summary, cfg, world)
        # no scored item (every verdict unparsed) counts as accuracy 0 for the stopping rule
        flat = flat_iterations(summary["iterations"], cfg.min_gain)
        if flat >= cfg.patience:
            if world.main:
                gains = [e["metrics"]["overall"] or 0.0 for e in summary["iterations"][-flat - 1:]]
                changes = ", ".join(f"{b - a:+.3f}" for a, b in zip(gains, gains[1:]))
                print(f"stopping after iteration {k}: overall accuracy changed by {changes} "
                      f"(< min_gain {cfg.min_gain} {flat} time(s) in a row)")
            break
    if world.main:
        print(f"report: {write_report(out)}")
    return summary


def _written(out: Path, summary: dict, cfg: LoopConfig, world: World) -> None:
    """summary.json, accuracy.png and the line of the last iteration; with --log-to tensorboard, the curves."""
    write_summary(out, summary, world.main)
    if cfg.log_to == "tensorboard" and world.main:
        write_curves(out / "tensorboard", summary)


def flat_iterations(iterations: list[dict], min_gain: float) -> int:
    """How many iterations in a row, up to the last one, raised overall accuracy by less than `min_gain` over the
    one before (an iteration with no scored item counts as accuracy 0)."""
    overall = [e["metrics"]["overall"] or 0.0 for e in iterations]
    flat = 0
    while flat + 1 < len(overall) and overall[-1 - flat] - overall[-2 - flat] < min_gain:
        flat += 1
    return flat

