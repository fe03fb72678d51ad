"""`fastjudge iterate` and each stage on its own: synth, filter, train, eval. Every command reads its inputs
through the input gate (`fastjudge.gate`) and owns the outputs it writes (`common.owned`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fastjudge.cli import common
from fastjudge.config import RESUMABLE


def cmd_iterate(args) -> None:
    from fastjudge import loop
    overrides = tuple(name.strip().replace("-", "_") for name in args.override.split(",") if name.strip())
    cfg = common.config(args)
    summary = loop.run(cfg, given=common.given(args), overrides=overrides)
    if not common.job(cfg).main:
        return
    first, last = summary["iterations"][0], summary["iterations"][-1]
    print(json.dumps({"first": first["metrics"]["overall"], "last": last["metrics"]["overall"],
                      "best": summary.get("best"), "iterations": last["iteration"],
                      "summary": str(Path(cfg.out) / "summary.json")}))


def cmd_synth(args) -> None:
    from fastjudge import data
    from fastjudge.core import dist
    from fastjudge.gate import Gate
    from fastjudge.models.partial import drop_stored_batches, stored_batches
    from fastjudge.stages import synth
    out_file = Path(args.out)
    folder = out_file.parent
    if out_file.is_dir():
        raise ValueError(f"--out: {args.out} is a folder; name the pairs JSONL file to write")
    cfg = common.config(args, out=str(folder), model=args.model)
    job = common.job(cfg)
    names = [out_file.name, common.skipped_name("synth"), "images", "inputs.json", "partial-batches/synth"]
    with common.owned(folder, "synth", names, args.overwrite, job.main):
        gate = Gate(folder, job, common.skipped_name("synth"))
        with dist.main_first(job):  # rank 0 stages the images; the others find its copies
            records = gate.prompts(args.prompts, cfg.max_image_pixels, cfg.prompt_columns, cfg.sample, cfg.seed)
        adapter = common.load(args.model, cfg, job)
        records = gate.fit_prompts(adapter, records, cfg.answer_tokens, cfg.max_prompt_tokens)
        # finished batches kept beside --out until it is written: the same command run again picks them up
        with stored_batches(adapter, folder, "synth", job):
            result = synth.run(adapter, records, cfg.synth_options(), cfg.seed)
        if not job.main:  # every rank holds the whole result; rank 0 writes it
            return
        data.write_records(out_file, result.pairs)
        drop_stored_batches(folder, job, "synth")  # a filter's batches may share the folder
    print(json.dumps({"pairs": len(result.pairs), "skipped_lines": len(gate.skips), **result.stats}))


def cmd_filter(args) -> None:
    from fastjudge import data
    from fastjudge.gate import Gate
    from fastjudge.models.partial import drop_stored_batches, stored_batches
    from fastjudge.stages import filter as filter_stage
    out = Path(args.out)
    cfg = common.config(args, model=args.judge)
    job = common.job(cfg)
    names = ["judgments.jsonl", "sft.jsonl", common.skipped_name("filter"), "partial-batches/filter"]
    with common.owned(out, "filter", names, args.overwrite, job.main):
        gate = Gate(out, job, common.skipped_name("filter"))
        pairs = gate.pairs(args.pairs)  # before the model: a missing or bad file fails at once
        judge = common.load(args.judge, cfg, job)
        pairs = gate.fit_pairs(judge, pairs, cfg.judge_tokens, args.pairs)
        with stored_batches(judge, out, "filter", job):
            result = filter_stage.run(judge, pairs, cfg.filter_options(), cfg.seed)
        if not job.main:
            return
        data.write_jsonl(out / "judgments.jsonl", result.judgments)
        data.write_records(out / "sft.jsonl", result.traces)
        drop_stored_batches(out, job, "filter")
    print(json.dumps(dict(result.stats, skipped=len(gate.skips))))


def cmd_train(args) -> None:
    from fastjudge.data.runs import check_checkpoint_out
    from fastjudge.gate import Gate
    from fastjudge.stages import train
    checkpoint = Path(args.out)
    folder = checkpoint.parent
    cfg = common.config(args, model=args.judge)
    job = common.job(cfg)
    state_dir = checkpoint.with_name(checkpoint.name + ".train_state")
    names = [checkpoint.name, state_dir.name, common.skipped_name("train")]
    check_checkpoint_out(checkpoint)  # never a run folder or the user's files, whatever --overwrite says
    with common.owned(folder, "train", names, args.overwrite, job.main):
        gate = Gate(folder, job, common.skipped_name("train"))
        traces = gate.traces(args.sft)
        judge = common.load(args.judge, cfg, job)
        traces = gate.fit_traces(judge, traces, args.sft)
        records: list[dict] = []  # rank 0's figures
        # under torchrun (Mllama, the toy) every rank trains its shard; a killed job run again resumes from the
        # state saved beside --out
        train.run_to(checkpoint, judge, traces, cfg.train_options(), cfg.seed, job,
                     reload=lambda path: common.load(None if path is None else str(path), cfg, job),
                     source=args.judge, on_done=records.append, state_dir=state_dir, go_on=False)
    if job.main:
        print(json.dumps({k: v for k, v in records[0].items() if k != "losses"} | {"skipped": len(gate.skips)}))


def cmd_eval(args) -> None:
    from fastjudge.core import dist
    from fastjudge.gate import Gate
    from fastjudge.stages import evaluate
    from fastjudge.toy.files import write_toy_benchmark
    out = Path(args.out)
    cfg = common.config(args, model=args.judge)
    job = common.job(cfg)
    names = ["predictions.jsonl", "outputs.jsonl", "metrics.json", "reliability.png", "benchmark", "bench-images",
             common.skipped_name("eval"), "partial-batches/eval"]
    with common.owned(out, "eval", names, args.overwrite, job.main):
        if job.main and not cfg.bench_data:
            write_toy_benchmark(out / "benchmark", cfg.toy_bench_per_category)
        dist.barrier()
        bench_data = cfg.bench_data or str(out / "benchmark" / "benchmark.jsonl")
        gate = Gate(out, job, common.skipped_name("eval"))
        items, score_items = gate.bench(cfg.bench, bench_data, cfg.images)
        judge = common.load(args.judge, cfg, job)
        items = gate.fit_judged(judge, items, cfg.judge_tokens, lambda item, a, b: evaluate.judge_prompt_for(
            judge, cfg.bench, cfg.prompt, item["query"], a, b), lambda item: item["response"], bench_data,
            "query, response")
        metrics = evaluate.run_to(out, judge, items, cfg.eval_options(), cfg.seed, score_items, world=job)
    if job.main:
        print(json.dumps(dict(metrics, skipped_entries=len(gate.skips))))


SYNTH_FLAGS = ["prompt_columns", "sample", "seed", "device", "dtype", "feature_cache_gb", "dist_timeout_s",
               "max_image_pixels",
               "max_prompt_tokens", "n_samples", "temperature", "top_k", "top_p", "min_votes", "early_stop",
               "round_size", "corrupter", "rewrite_temperature", "answer_tokens", "batch_rows", "batch_tokens"]
FILTER_FLAGS = ["seed", "device", "dtype", "feature_cache_gb", "dist_timeout_s", "judge_tokens", "filter_temperature",
                "filter_reasoning", "filter_samples", "filter_traces", "top_k", "top_p", "batch_rows", "batch_tokens"]
TRAIN_FLAGS = ["seed", "device", "dtype", "feature_cache_gb", "epochs", "lr", "batch_size", "micro_batches",
               "train_loss", "pack", "train", "lora_rank", "lora_alpha", "cpu_offload", "train_state_every",
               "activation_checkpointing", "dist_timeout_s"]
EVAL_FLAGS = ["bench", "bench_data", "toy_bench_per_category", "images", "prompt", "unparsed", "k",
              "eval_temperature", "top_k", "top_p", "seed", "device", "dtype", "feature_cache_gb", "dist_timeout_s",
              "judge_tokens", "batch_rows", "batch_tokens"]


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("iterate", help="the whole loop: synth -> filter -> train -> eval, repeated")
    common.add_config_flags(p)
    p.add_argument("--override", default="",
                   help="with --resume: settings that may differ from the run's config.json, comma-separated, "
                        f"among {', '.join(RESUMABLE)} (any other changed flag is an error)")
    p.set_defaults(func=cmd_iterate)

    p = sub.add_parser("synth", help="preference pairs from a prompt pool")
    p.add_argument("--model", default=None, help="local checkpoint folder (default: the shipped toy base model)")
    p.add_argument("--prompts", required=True, help="prompt pool: JSONL, or parquet (a file, a folder of shards, a "
                                                    "glob)")
    p.add_argument("--out", required=True, help="pairs JSONL to write (its folder gets the staged images and "
                                                "skipped-synth.jsonl)")
    common.add_config_flags(p, SYNTH_FLAGS)
    common.add_overwrite_flag(p)
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("filter", help="judge pairs in both orders; keep the agreeing ones as SFT traces")
    p.add_argument("--judge", default=None, help="judge checkpoint (default: the toy base model)")
    p.add_argument("--pairs", required=True, help="pairs JSONL from `fastjudge synth`")
    p.add_argument("--out", required=True, help="folder for judgments.jsonl and sft.jsonl")
    common.add_config_flags(p, FILTER_FLAGS)
    common.add_overwrite_flag(p)
    p.set_defaults(func=cmd_filter)

    p = sub.add_parser("train", help="fine-tune a judge on SFT traces")
    p.add_argument("--judge", default=None, help="judge checkpoint to start from (default: the toy base model)")
    p.add_argument("--sft", required=True, help="sft.jsonl from `fastjudge filter`")
    p.add_argument("--out", required=True, help="checkpoint folder to write")
    common.add_config_flags(p, TRAIN_FLAGS)
    common.add_overwrite_flag(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="run a judge on a pairwise benchmark and score it with the benchmark's rules")
    p.add_argument("--judge", default=None, help="judge checkpoint (default: the toy base model)")
    p.add_argument("--out", required=True, help="folder for predictions.jsonl, outputs.jsonl, metrics.json")
    common.add_config_flags(p, EVAL_FLAGS, aliases={"bench_data": "--data"})
    common.add_overwrite_flag(p)
    p.set_defaults(func=cmd_eval)
