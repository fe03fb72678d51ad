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

Every file is written atomically, and a stage counts as done when its output exists, so `--resume` continues a
stopped run from its last completed stage.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import random
import re
import shutil
import time
from pathlib import Path
from typing import Callable

import torch

from fastjudge import data
from fastjudge.config import RESUMABLE, LoopConfig
from fastjudge.core import dist
from fastjudge.core.dist import World
from fastjudge.data.runs import RunLock, open_run_folder, run_files
from fastjudge.data.scoring import headline
from fastjudge.models import Adapter, FeatureCache, load_adapter
from fastjudge.models.partial import BatchStore
from fastjudge.stages import evaluate, synth, train
from fastjudge.stages import filter as filter_stage
from fastjudge.toy import rates as toy_rates
from fastjudge.toy import world as toy_world
from fastjudge.toy.files import toy_prompt_truth, write_toy_benchmark, write_toy_prompts



def prepare_inputs(cfg: LoopConfig, out: Path, world: World = World()
                   ) -> tuple[list[data.PromptRecord], list[dict], list[dict]]:
    """The prompt pool, the benchmark items the judge can run on, and the items the score counts (those too
    whose image is missing: they are unpredicted, as `fastjudge score` counts them); bad lines go to
    out/skipped.jsonl (and are counted). In a job of several ranks, rank 0 writes the files first and the others
    read them after it."""
    if not world.main:
        dist.barrier()  # rank 0 writes the toy world, the image copies and skipped.jsonl first
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
    records, skips = data.load_prompts(prompts_path)
    records = stage_prompt_images(records, out, cfg.max_image_pixels, write=world.main)
    items, bench_skips = data.load_bench(cfg.bench, bench_path, cfg.images)
    if world.main:
        data.write_skips(out / "skipped.jsonl", skips + bench_skips)
        dist.barrier()
    if (skips or bench_skips) and world.main:
        print(f"skipped {len(skips)} prompt lines and {len(bench_skips)} benchmark lines: see {out / 'skipped.jsonl'}")
    if not records:
        raise ValueError(f"prompts: no usable prompt in {prompts_path} (see {out / 'skipped.jsonl'})")
    if not items:
        raise ValueError(f"bench: no usable item in {bench_path} (see {out / 'skipped.jsonl'})")
    return records, items, data.load_bench(cfg.bench, bench_path, cfg.images, check_images=False)[0]


def stage_prompt_images(records: list[data.PromptRecord], out: Path, max_pixels: int,
                        write: bool = True) -> list[data.PromptRecord]:
    """The records with their images inside the run folder: an image outside it gets a copy under out/images/
    (hard-linked, or converted to RGB and downscaled to `max_pixels`), so that the run can be moved; images
    already inside (the toy pool's) are taken as they are. What was done is counted in out/inputs.json and said
    when an image was changed."""
    counts: dict[str, int] = {}
    staged: dict[str, str] = {}
    out = out.resolve()
    for record in records:
        source = Path(record.image)
        if record.image in staged or source.is_relative_to(out):
            continue
        target, action = data.stage_image(source, out / "images", max_pixels)
        staged[record.image] = str(target)
        counts[action] = counts.get(action, 0) + 1
    if write:  # rank 0 of a job; the others find its copies ("reused")
        data.write_json(out / "inputs.json", {"images": counts, "max_image_pixels": max_pixels})
    changed = {action: n for action, n in counts.items() if action in ("converted", "downscaled")}
    if changed and write:
        print(f"prompt images: {', '.join(f'{n} {action}' for action, n in changed.items())} "
              f"(RGB, at most {max_pixels} pixels; copies under {out / 'images'})")
    return [dataclasses.replace(r, image=staged.get(r.image, r.image)) for r in records]


def within_context(adapter: Adapter, records: list[data.PromptRecord], cfg: LoopConfig, out: Path,
                   world: World = World()) -> list[data.PromptRecord]:
    """The records whose prompt fits the model: at most cfg.max_prompt_tokens tokens (default: the model's
    context less cfg.answer_tokens); the others are counted skips, added to out/skipped.jsonl."""
    limit = cfg.max_prompt_tokens
    if limit is None and adapter.context_length is not None:
        limit = adapter.context_length - cfg.answer_tokens
    if limit is None:
        return records
    kept, skips = [], []
    for record in records:
        tokens = adapter.prompt_tokens(record.instruction)
        if tokens > limit:
            skips.append(data.Skip(record.source, record.line, f"field 'instruction': {tokens} tokens, more than "
                                   f"the {limit} a prompt may have (--max-prompt-tokens)"))
        else:
            kept.append(record)
    if skips and world.main:
        path = out / "skipped.jsonl"
        known = data.read_jsonl(path) if path.exists() else []
        seen = {(s["file"], s["line"]) for s in known}
        new = [s for s in skips if (s.file, s.line) not in seen]
        data.write_jsonl(path, known + [dataclasses.asdict(s) for s in new])
        print(f"skipped {len(skips)} prompts longer than {limit} tokens: see {path}")
    if not kept:
        raise ValueError(f"prompts: every prompt is longer than {limit} tokens (see {out / 'skipped.jsonl'})")
    return kept


def prompts_for(records: list[data.PromptRecord], cfg: LoopConfig, iteration: int) -> list[data.PromptRecord]:
    """Disjoint slices of the pool while it lasts; a seeded sample of it afterwards."""
    size = cfg.prompts_per_iteration
    if len(records) >= size * iteration:
        return records[size * (iteration - 1): size * iteration]
    return random.Random(cfg.seed * 7919 + iteration).sample(records, min(size, len(records)))


# The files of a checkpoint folder as transformers and fastjudge write them: nothing else is ever replaced
_CHECKPOINT_FILE = re.compile(
    r"(config|generation_config|preprocessor_config|processor_config|video_preprocessor_config|tokenizer_config"
    r"|tokenizer|special_tokens_map|added_tokens|chat_template|fastjudge_toy|vocab)\.(json|jinja)"
    r"|merges\.txt|tokenizer\.model|model(-\d+-of-\d+)?\.safetensors(\.index\.json)?")


def is_checkpoint(folder: Path) -> bool:
    """Whether `folder` holds a model checkpoint and nothing else (config.json, weights, tokenizer and processor
    files, no folder): what `save_checkpoint` may replace. A run folder (config.json beside iter_<k>/) is not."""
    entries = list(Path(folder).iterdir())
    return (any(e.name == "config.json" for e in entries) and any(e.name.endswith(".safetensors") for e in entries)
            and all(e.is_file() and _CHECKPOINT_FILE.fullmatch(e.name) for e in entries))


def check_checkpoint_out(folder: Path) -> None:
    """A ValueError naming `folder` unless a checkpoint may be written there: it does not exist, is empty, or is a
    checkpoint and nothing else (`is_checkpoint`). Commands call it before any work; `save_checkpoint` again."""
    folder = Path(folder)
    if folder.exists() and (not folder.is_dir() or (any(folder.iterdir()) and not is_checkpoint(folder))):
        raise ValueError(f"--out: {folder} exists and is not a checkpoint folder (it holds other files); refusing "
                         "to replace it: choose a new folder")


def save_checkpoint(adapter: Adapter, folder: Path) -> None:
    """Write a checkpoint folder atomically; an existing folder is replaced only if it is a checkpoint and nothing
    else (`check_checkpoint_out`): any other folder is left as it was."""
    folder = Path(folder)
    check_checkpoint_out(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    adapter.save(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


def evaluate_to(folder: Path, judge: Adapter, items: list[dict], cfg: LoopConfig,
                score_items: list[dict] | None = None, before_done: Callable[[], None] | None = None,
                world: World = World()) -> dict:
    """Evaluate and write predictions.jsonl, outputs.jsonl, then metrics.json, the file that marks the stage
    done; `before_done` runs just before it (the stage's record, so that a run cut in between redoes the
    stage rather than lose its record)."""
    with stored_batches(judge, folder, "eval", world):
        result = evaluate.run(judge, items, cfg.eval_options(), seed=cfg.seed, score_items=score_items)
    if world.main:  # every rank holds the whole result; one writes it
        data.write_jsonl(folder / "predictions.jsonl", result.predictions)
        data.write_jsonl(folder / "outputs.jsonl", result.raw)
        if before_done is not None:
            before_done()
        plot_reliability(folder / "reliability.png", result.metrics.get("calibration"))
        data.write_json(folder / "metrics.json", result.metrics)
    dist.barrier()
    drop_stored_batches(folder, world)
    return result.metrics


def plot_reliability(path: Path, calibration: dict | None) -> None:
    """The reliability diagram of an evaluation: accuracy against confidence per bin, and the diagonal."""
    if not calibration or not calibration.get("judgments"):
        return
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    bins = [b for b in calibration["bins"] if b["count"]]
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0.5, 1.0], [0.5, 1.0], color="grey", linestyle="--", linewidth=1, label="calibrated")
    ax.bar([(b["low"] + b["high"]) / 2 for b in bins], [b["accuracy"] for b in bins], width=0.045, alpha=0.7,
           label="accuracy")
    ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], marker="o", color="black", linewidth=1)
    ax.set_xlim(0.5, 1.0)
    ax.set_ylim(0.0, 1.0)
    ax.set_xlabel("confidence: max(p, 1 - p) of the verdict")
    ax.set_ylabel("accuracy")
    ax.set_title(f"reliability (ECE {calibration['ece']:.3f}, {calibration['judgments']} judgments)")
    ax.legend(loc="upper left")
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)


@contextlib.contextmanager
def stored_batches(adapter: Adapter, folder: Path, stage: str, world: World = World()):
    """While the block runs, `adapter.generate` writes each finished batch under folder/partial-batches/<stage>/
    and reads the batches an interrupted run of the stage left there (`fastjudge.models.partial`)."""
    store = BatchStore(folder / "partial-batches" / stage)
    adapter.batch_store = store
    try:
        yield store
    finally:
        adapter.batch_store = None
    if store.loaded:
        print(f"{stage}: {store.loaded} finished generation batches read from {store.folder}"
              + (f" (rank {world.rank})" if world.size > 1 else ""), flush=True)


def drop_stored_batches(folder: Path, world: World = World(), stage: str | None = None) -> None:
    """Remove folder/partial-batches/ once the stages whose batches it holds have written their files (rank 0,
    after every rank is past them); with `stage`, only that stage's batches (the folder shared with other
    commands' stages goes once it is empty)."""
    if not world.main:
        return
    root = folder / "partial-batches"
    shutil.rmtree(root if stage is None else root / stage, ignore_errors=True)
    if root.is_dir() and not any(root.iterdir()):
        root.rmdir()


class _Stages:
    """iter_<k>/stages.json: seconds and counts of each finished stage. A stage's record is written before the
    file that marks the stage done (pairs.jsonl, sft.jsonl, the checkpoint, metrics.json): a run cut between
    the two redoes the stage and writes its record again; the other order would lose it."""

    def __init__(self, folder: Path, world: World = World()):
        self.path, self.world = folder / "stages.json", world
        self.record = json.loads(self.path.read_text()) if self.path.exists() else {"seconds": {}, "stats": {}}

    def done(self, stage: str, seconds: float, stats: dict) -> None:
        self.record["seconds"][stage] = round(seconds, 2)
        self.record["stats"][stage] = stats
        if self.world.main:
            data.write_json(self.path, self.record)


def run_iteration(k: int, cfg: LoopConfig, out: Path, generator: Adapter, judge: Adapter,
                  records: list[data.PromptRecord], items: list[dict], score_items: list[dict],
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
        oracle = None
        if cfg.ablation == "oracle-votes":  # ground truth trains here, on purpose: the paper's oracle baseline
            truth = toy_prompt_truth(cfg.prompts_per_iteration * cfg.iterations, cfg.seed, cfg.closed_fraction)
            oracle = {pid: toy_world.closed_response(q.answer) for pid, q in truth.items() if q.kind == "closed"}
        with stored_batches(generator, folder, "synth", world):
            result = synth.run(generator, prompts_for(records, cfg, k), cfg.synth_options(), seed, oracle=oracle)
        if cfg.ablation == "shuffled-labels":
            swap = random.Random(seed + 5)
            for pair in result.pairs:
                if swap.random() < 0.5:
                    pair["good"], pair["bad"] = pair["bad"], pair["good"]
        stages.done("synth", time.time() - t0, result.stats)
        if world.main:
            data.write_records(folder / "pairs.jsonl", result.pairs)
        dist.barrier()
    pairs = data.read_records(folder / "pairs.jsonl")

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
    traces = data.read_records(folder / "sft.jsonl")

    checkpoint = folder / "checkpoint"
    if not checkpoint.exists():
        t0 = time.time()
        judge = train_to(checkpoint, judge, traces, cfg.train_options(), seed + 20, world, reload, source,
                         on_done=lambda stats: stages.done("train", time.time() - t0, stats),
                         state_dir=folder / "train_state")
        stages = _Stages(folder, world)  # rank 0's record of the stages so far

    if not (folder / "metrics.json").exists():
        t0 = time.time()
        evaluate_to(folder, judge, items, cfg, score_items, before_done=lambda: stages.done(
            "eval", time.time() - t0, {"feature_cache_so_far": dict(judge.feature_cache.stats)}), world=world)
    drop_stored_batches(folder, world)  # also those of a run killed between a stage's files and their removal
    metrics = json.loads((folder / "metrics.json").read_text())
    stages = _Stages(folder, world)
    kept = len({trace["pair"] for trace in traces})  # a kept pair gives one trace or more in each order
    return {"iteration": k, "metrics": headline(metrics), "pairs": len(pairs), "kept": kept,
            "keep_rate": kept / len(pairs) if pairs else None,
            "seconds": stages.record["seconds"], "stats": stages.record["stats"]}, judge


def train_to(checkpoint: Path, judge: Adapter, traces: list[dict], options: train.TrainOptions, seed: int,
             world: World, reload: Callable[[Path | str | None], Adapter], source: Path | str | None,
             on_done: Callable[[dict], None] | None = None, state_dir: Path | None = None,
             go_on: bool = True) -> Adapter | None:
    """Fine-tune `judge` on `traces` and save it as a plain checkpoint at `checkpoint`; returns the judge to go
    on with. In a job whose model can be sharded (`train.can_shard`), every rank trains its shard (FSDP2,
    mid-run state under `state_dir`); rank 0 writes the gathered weights into a fresh copy of the judge's
    `source` (`reload`) and saves that; every rank then loads the checkpoint (a sharded model cannot generate
    on batches that differ between the ranks). Otherwise fine-tuning runs on rank 0 alone and the other ranks
    load its checkpoint. `on_done(stats)` runs on rank 0 before the checkpoint is written (the stage's record).
    With `go_on` False nothing is loaded afterwards and None is returned (the caller is done with the judge); the
    ranks other than 0 then return at once when fine-tuning is not sharded."""
    sharded = world.size > 1 and train.can_shard(judge, options) and bool(traces)
    if sharded:
        stats = train.run(judge, traces, options, seed, world, state_dir=state_dir)
        weights = train.gathered_state_dict(judge)
        if world.main:
            fresh = reload(source)
            if options.train == "lora":  # the same adapters on the fresh copy, loaded, then merged
                fresh.begin_training("lora", lora_rank=options.lora_rank, lora_alpha=options.lora_alpha)
            fresh.model.load_state_dict(weights)
            fresh.end_training()
            if on_done is not None:
                on_done(dict(stats, sharded_ranks=world.size))
            save_checkpoint(fresh, checkpoint)
            if state_dir is not None:
                shutil.rmtree(state_dir, ignore_errors=True)  # the mid-run state, now done with
    elif world.main:
        stats = train.run(judge, traces, options, seed)
        if on_done is not None:
            on_done(stats)
        save_checkpoint(judge, checkpoint)
    if not go_on and not sharded:
        # the other ranks are done: none waits for rank 0's training, which can outlast a collective's timeout
        return None
    dist.barrier()
    if not go_on:
        return None
    if world.size > 1 and (not world.main or judge._sharded):
        judge = reload(checkpoint)
    return judge


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
        cfg = _resolved(cfg, out, given, overrides, world)
        dist.barrier()
        return _run_locked(cfg, out, world)


# what may change when a run resumes, with --override: how far it goes and where and in what batches it runs
# (batch_rows and batch_tokens re-seed the sampling of the stages still to run)
_PATHS = ("model", "prompts", "bench_data", "images")


def _resolved(cfg: LoopConfig, out: Path, given: set[str] | None, overrides: tuple[str, ...],
              world: World = World()) -> LoopConfig:
    """The configuration the run goes on with: `cfg` for a new run, the saved one on --resume (module docstring
    of `run`). Paths are made absolute, so that a resume works from anywhere."""
    unknown = [name for name in overrides if name not in RESUMABLE]
    if unknown:
        raise ValueError(f"override: {', '.join(unknown)} cannot change on --resume (only {', '.join(RESUMABLE)})")
    for name in _PATHS:
        if getattr(cfg, name) is not None:
            setattr(cfg, name, str(Path(getattr(cfg, name)).resolve()))
    if run_files(out) and not cfg.resume:
        raise ValueError(f"out: {out} already holds a run; pass --resume to continue it or choose another --out")
    if not (cfg.resume and (out / "config.json").exists()):
        return cfg
    saved = LoopConfig.load(out / "config.json")
    names = set(given) if given is not None else {f for f in vars(cfg)}
    changed = sorted(name for name in names - {"resume", "out"} if getattr(cfg, name) != getattr(saved, name))
    refused = [name for name in changed if name not in overrides]
    if refused:
        said = "; ".join(f"--{name.replace('_', '-')} {getattr(cfg, name)!r} (the run has "
                         f"{getattr(saved, name)!r})" for name in refused)
        hint = [name for name in refused if name in RESUMABLE]
        raise ValueError(f"resume: {out / 'config.json'} was run with other settings: {said}. "
                         + (f"To change {', '.join(hint)}, pass --override {','.join(hint)}; " if hint else "")
                         + "to run other settings, choose another --out")
    for name in changed:
        setattr(saved, name, getattr(cfg, name))
    saved.out = cfg.out  # where the run is now (it may have been moved)
    if world.main:
        print(f"--resume: continuing {out / 'config.json'}"
              + (f" with {', '.join(f'{n} {getattr(saved, n)!r}' for n in changed)} changed" if changed else ""))
    return saved


def _run_locked(cfg: LoopConfig, out: Path, world: World) -> dict:
    if world.main:
        cfg.save(out / "config.json")
    torch.manual_seed(cfg.seed)
    records, items, score_items = prepare_inputs(cfg, out, world)
    # the run's one feature cache: the base and every judge after it share a frozen vision tower's entries
    cache = FeatureCache(max_bytes=int(cfg.feature_cache_gb * 2**30))

    def load(path: str | Path | None) -> Adapter:
        adapter = load_adapter(None if path is None else str(path), device=cfg.device, dtype=cfg.dtype,
                               feature_cache=cache)
        adapter.shard = world.shard  # in a job, generation is split between the ranks
        return adapter

    base = load(cfg.model)
    records = within_context(base, records, cfg, out, world)
    skipped = out / "skipped.jsonl"
    summary: dict = {"inputs": {"prompts": len(records), "skipped_lines": len(data.read_jsonl(skipped)),
                                "images": json.loads((out / "inputs.json").read_text())["images"]},
                     "iterations": []}
    folder0 = out / "iter_0"
    if not (folder0 / "metrics.json").exists():
        t0 = time.time()
        evaluate_to(folder0, base, items, cfg, score_items,
                    before_done=lambda: _Stages(folder0).done("eval", time.time() - t0, {}), world=world)
    drop_stored_batches(folder0, world)
    summary["iterations"].append({"iteration": 0, "metrics": headline(json.loads((folder0 / "metrics.json").read_text())),
                                  "pairs": 0, "kept": 0, "keep_rate": None, "seconds": _Stages(folder0).record["seconds"]})
    if measures_rates(cfg):
        summary["iterations"][0]["rates"] = rates_of(0, cfg, out, items, world)
    _report(out, summary, world)

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
        entry, judge = run_iteration(k, cfg, out, generator, judge, records, items, score_items, world, load, source)
        if measures_rates(cfg):
            entry["rates"] = rates_of(k, cfg, out, items, world)
        summary["iterations"].append(entry)
        _report(out, summary, world)
        # no scored item (every verdict unparsed) counts as accuracy 0 for the stopping rule
        flat = flat_iterations(summary["iterations"], cfg.min_gain)
        if flat >= cfg.patience:
            if world.main:
                gains = [e["metrics"]["overall"] or 0.0 for e in summary["iterations"][-flat - 1:]]
                changes = ", ".join(f"{b - a:+.3f}" for a, b in zip(gains, gains[1:]))
                print(f"stopping after iteration {k}: overall accuracy changed by {changes} "
                      f"(< min_gain {cfg.min_gain} {flat} time(s) in a row)")
            break
    return summary


def flat_iterations(iterations: list[dict], min_gain: float) -> int:
    """How many iterations in a row, up to the last one, raised overall accuracy by less than `min_gain` over the
    one before (an iteration with no scored item counts as accuracy 0)."""
    overall = [e["metrics"]["overall"] or 0.0 for e in iterations]
    flat = 0
    while flat + 1 < len(overall) and overall[-1 - flat] - overall[-2 - flat] < min_gain:
        flat += 1
    return flat


def _report(out: Path, summary: dict, world: World = World()) -> None:
    # the judge to use: the iteration with the best overall accuracy so far (a later one can be worse)
    scored = [e for e in summary["iterations"] if e["metrics"]["overall"] is not None]
    if scored:
        best = max(scored, key=lambda e: (e["metrics"]["overall"], -e["iteration"]))
        summary["best"] = {"iteration": best["iteration"], "overall": best["metrics"]["overall"],
                           "checkpoint": None if best["iteration"] == 0 else f"iter_{best['iteration']}/checkpoint"}
    if not world.main:
        return
    data.write_json(out / "summary.json", summary)
    plot_accuracy(summary, out / "accuracy.png")
    last = summary["iterations"][-1]
    metrics = last["metrics"]
    categories = ", ".join(f"{name} {_fmt(acc)}" for name, acc in metrics["categories"].items())
    print(f"iteration {last['iteration']}: overall {_fmt(metrics['overall'])} macro {_fmt(metrics['macro'])} "
          f"({categories}); pairs {last['pairs']}, kept {last['kept']}"
          + (f" ({last['keep_rate']:.1%})" if last["keep_rate"] is not None else ""))
    rates = last.get("rates")
    if rates:
        labels = ", ".join(f"{source} {_fmt(share)}" for source, share in rates.get("labels_right", {}).items())
        kept = ", ".join(f"{source} {_fmt(share)}" for source, share in rates.get("kept_labels_right", {}).items())
        print(f"  measured against the scenes: labels right ({labels or 'n/a'}; kept pairs {kept or 'n/a'}), "
              f"verdict agrees with label "
              f"{_fmt(rates.get('verdict_agrees_label'))}; benchmark: own answer right "
              f"{_fmt(rates['own_answer_right'])}, checks right {_fmt(rates['reasoning_right'])}, verdict "
              f"follows checks {_fmt(rates['verdict_follows_reasoning'])}")


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def plot_accuracy(summary: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    iterations = [e["iteration"] for e in summary["iterations"]]
    with_rates = any(e.get("rates") for e in summary["iterations"])
    fig, axes = plt.subplots(1, 2 if with_rates else 1, figsize=(11 if with_rates else 6, 4), dpi=100,
                             squeeze=False)
    ax = axes[0][0]
    names = sorted({n for e in summary["iterations"] for n in e["metrics"]["categories"]})
    for name in names:
        ax.plot(iterations, [e["metrics"]["categories"].get(name) for e in summary["iterations"]], marker="o",
                label=name, alpha=0.8)
    ax.plot(iterations, [e["metrics"]["overall"] for e in summary["iterations"]], marker="s", color="black",
            linewidth=2.5, label="overall")
    _finish_axes(ax, iterations, "judge accuracy", "held-out judge benchmark", top=1.0)
    if with_rates:
        _plot_rates(axes[0][1], summary, iterations)
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)


def _plot_rates(ax, summary: dict, iterations: list[int]) -> None:
    """The toy preset's rates per iteration (`toy.rates`), beside the accuracy."""
    entries = [e.get("rates") or {} for e in summary["iterations"]]
    series = {"own answer right": lambda r: r.get("own_answer_right"),
              "checks right": lambda r: r.get("reasoning_right"),
              "verdict follows checks": lambda r: r.get("verdict_follows_reasoning"),
              "verdict agrees with label": lambda r: r.get("verdict_agrees_label"),
              "labels right (rewrite)": lambda r: r.get("labels_right", {}).get("rewrite"),
              "labels right (vote)": lambda r: r.get("labels_right", {}).get("vote"),
              "kept labels right (vote)": lambda r: r.get("kept_labels_right", {}).get("vote")}
    for name, get in series.items():
        values = [get(r) for r in entries]
        if any(v is not None for v in values):
            ax.plot(iterations, [float("nan") if v is None else v for v in values], marker="o", label=name)
    _finish_axes(ax, iterations, "share", "measured against the scenes (never trained on)", top=1.02)


def _finish_axes(ax, iterations: list[int], ylabel: str, title: str, top: float) -> None:
    """Chance line, labels, one tick per iteration, legend."""
    ax.axhline(0.5, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("iteration")
    ax.set_ylabel(ylabel)
    ax.set_xticks(iterations)
    ax.set_ylim(0, top)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(title)
