"""The `fastjudge` command: `iterate` (the whole loop) and each stage on its own."""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import MISSING, fields
from pathlib import Path

from fastjudge.config import RESUMABLE, LoopConfig
from fastjudge.data.runs import open_run_folder

HELP = {
    "out": "output folder of the run",
    "model": "local checkpoint folder (a toy one, Llama-3.2-Vision, Qwen2-VL or Qwen2.5-VL); default: the shipped "
             "toy base model",
    "prompts": "prompt pool JSONL (schema: README, \"Your own prompts\"); default: a shapes-world pool drawn from "
               "--seed",
    "seed": "random seed; a CPU run with the same seed is reproducible",
    "device": "torch device for the model (cpu, cuda)",
    "dtype": "model dtype: float32, bfloat16, float16 (default: float32 for the toy and on the CPU, bfloat16 for "
             "a real model on a GPU)",
    "feature_cache_gb": "GiB of vision features kept in memory while the vision tower is frozen (0 = off)",
    "max_image_pixels": "a prompt image with more pixels is downscaled to this many (its copy in the run folder; "
                        "counted in the summary)",
    "max_prompt_tokens": "a prompt whose instruction has more tokens is skipped and counted (default: the "
                         "model's context less --answer-tokens)",
    "dist_timeout_s": "under torchrun: seconds a rank waits for the others at a collective before the job fails",
    "iterations": "maximum number of iterations",
    "min_gain": "stop when overall accuracy rises by less than this from one iteration to the next, --patience "
                "times in a row",
    "patience": "how many iterations in a row must gain less than --min-gain to stop (default: 2 for the toy, 1 "
                "for a real model)",
    "prompts_per_iteration": "prompts synthesized into pairs per iteration",
    "closed_fraction": "share of closed-ended prompts in the generated shapes-world pool",
    "n_samples": "answers sampled per closed-ended prompt",
    "temperature": "sampling temperature for closed-ended answers",
    "top_k": "top-k for sampling (0 = off)",
    "top_p": "top-p (nucleus) for sampling",
    "min_votes": "votes the majority answer needs to make a pair",
    "early_stop": "stop sampling a closed prompt once its majority is this sure (Beta criterion; 0 = off, "
                  "e.g. 0.95)",
    "round_size": "with --early-stop: samples decoded at once per prompt (Mllama), or per round (others)",
    "corrupter": "who degrades open-ended answers: the model ('model') or the rule-based corrupter ('rules')",
    "rewrite_temperature": "sampling temperature of the model's degraded rewrite",
    "answer_tokens": "maximum new tokens per answer",
    "synth_model": "which model writes the pairs: the base model ('base') or the latest judge ('judge')",
    "judge_tokens": "maximum new tokens per judgment (reasoning + verdict)",
    "filter_temperature": "sampling temperature of the judge's judgments in the filter (with --filter-reasoning greedy, "
                          "of the verdict alone)",
    "filter_reasoning": "the filter's judgments: all of it 'sampled' (reasoning and verdict), or 'greedy' "
                        "reasoning with the verdict sampled after it",
    "filter_samples": "judgments per pair and order in the filter; a pair is kept when one of them agrees with "
                      "its preference in each order (default: 8 for the toy, 1 for a real model)",
    "filter_traces": "at most this many agreeing judgments of each order of a kept pair become training traces",
    "batch_rows": "sequences per generation batch (default: 256 for the toy, 32 for a real model)",
    "batch_tokens": "at most this many token positions (rows x (longest prompt + new tokens)) per generation "
                    "batch (default: no cap)",
    "epochs": "fine-tuning epochs over the kept traces",
    "lr": "fine-tuning peak learning rate",
    "batch_size": "fine-tuning batch size",
    "micro_batches": "forward passes per fine-tuning step (examples sorted by length pad less)",
    "train_loss": "what fine-tuning trains of each kept trace: 'trace' (reasoning and verdict) or 'verdict' (the "
                  "reasoning read, not trained)",
    "pack": "fine-tuning packs several examples to a row, each attending only to itself and its own image "
            "(Mllama and the toy; exact: the loss and gradients of the unpacked batch)",
    "train": "what fine-tuning updates: 'text' (vision tower frozen), 'all', or 'lora' (peft LoRA on the "
             "language model, merged into the checkpoint)",
    "cpu_offload": "under torchrun, sharded fine-tuning (every --train mode): parameters, gradients and "
                   "optimizer state in CPU memory",
    "activation_checkpointing": "under torchrun, sharded fine-tuning: each decoder layer's activations recomputed "
                                "in the backward pass",
    "train_state_every": "under torchrun, sharded fine-tuning: steps between two saves of the model, optimizer "
                         "and step (torch.distributed.checkpoint), from which a killed job resumes (0: none)",
    "lora_rank": "LoRA rank (with --train lora)",
    "lora_alpha": "LoRA alpha (with --train lora)",
    "bench": "benchmark format: toy (our held-out shapes-world benchmark), vlrewardbench, mmrb",
    "bench_data": "the benchmark file (VL-RewardBench JSONL, Multimodal RewardBench JSON); default: the toy one",
    "toy_bench_per_category": "items per category of the toy benchmark (when there is no --bench-data)",
    "images": "folder that the benchmark's image paths are relative to (default: the data file's folder)",
    "prompt": "judge prompt in eval: 'ours' (what the loop trains on) or 'benchmark' (the benchmark's own)",
    "unparsed": "mmrb: an unparsed verdict counts as 'wrong', or 'random' (the official seeded guess)",
    "k": "judge samples per benchmark item (1 = greedy)",
    "eval_temperature": "sampling temperature of the judge when k > 1",
    "ablation": "take a piece of the loop away to see what it does: 'no-filter' (train on every pair's first "
                "judgments, whatever their verdicts), "
                "'shuffled-labels' (swap good and bad in a random half of the pairs), 'oracle-votes' (closed "
                "pairs labelled by the scene's true answer, not the majority; toy preset)",
    "resume": "continue a stopped run in --out from its last completed stage",
}


def _add_config_flags(parser: argparse.ArgumentParser, names: list[str] | None = None,
                      aliases: dict[str, str] | None = None) -> None:
    for f in fields(LoopConfig):
        if names is not None and f.name not in names:
            continue
        flag = (aliases or {}).get(f.name, "--" + f.name.replace("_", "-"))
        default = f.default if f.default is not MISSING else None
        # a flag not given leaves no attribute (SUPPRESS): LoopConfig's default applies, and --resume can tell
        # the flags given from the ones left out
        if f.type in ("bool", bool):  # on by default: --flag / --no-flag
            action = argparse.BooleanOptionalAction if default else "store_true"
            parser.add_argument(flag, action=action, default=argparse.SUPPRESS,
                                help=HELP[f.name] + (" (default: on)" if default else ""))
            continue
        kind = {"int": int, "float": float, "int | None": int, "float | None": float}.get(str(f.type), str)
        parser.add_argument(flag, dest=f.name, type=kind, default=argparse.SUPPRESS,
                            help=f"{HELP[f.name]} (default: {default})")


def _given(args: argparse.Namespace) -> set[str]:
    """The LoopConfig fields the command line set."""
    return {f.name for f in fields(LoopConfig) if hasattr(args, f.name)}


def _config(args: argparse.Namespace, **overrides) -> LoopConfig:
    values = {name: getattr(args, name) for name in _given(args)}
    values.update(overrides)
    return LoopConfig(**values)


def _job(cfg: LoopConfig):
    """This process's place in a torchrun job (world size 1 without one)."""
    from fastjudge.core import dist
    return dist.start(cfg.dist_timeout_s, cfg.device)


def _load(path: str | None, cfg: LoopConfig, job=None):
    from fastjudge.models import FeatureCache, load_adapter
    adapter = load_adapter(path, device=cfg.device, dtype=cfg.dtype,
                           feature_cache=FeatureCache(max_bytes=int(cfg.feature_cache_gb * 2**30)))
    adapter.shard = job.shard if job is not None else None  # under torchrun: generation split between ranks
    return adapter


def cmd_iterate(args) -> None:
    from fastjudge import loop
    overrides = tuple(name.strip().replace("-", "_") for name in args.override.split(",") if name.strip())
    cfg = _config(args)
    summary = loop.run(cfg, given=_given(args), overrides=overrides)
    if not _job(cfg).main:
        return
    first, last = summary["iterations"][0], summary["iterations"][-1]
    print(json.dumps({"first": first["metrics"]["overall"], "last": last["metrics"]["overall"],
                      "best": summary.get("best"), "iterations": last["iteration"],
                      "summary": str(Path(cfg.out) / "summary.json")}))


def cmd_synth(args) -> None:
    from fastjudge import data
    from fastjudge.loop import drop_stored_batches, stored_batches
    from fastjudge.stages import synth
    open_run_folder(Path(args.out).parent, "--out")
    if Path(args.out).is_dir():
        raise ValueError(f"--out: {args.out} is a folder; name the pairs JSONL file to write")
    cfg = _config(args, out=str(Path(args.out).parent), model=args.model)
    job = _job(cfg)
    records, skips = data.load_prompts(args.prompts)
    adapter = _load(args.model, cfg, job)
    # finished batches kept beside --out until it is written: the same command run again picks them up
    with stored_batches(adapter, Path(args.out).parent, "synth", job):
        result = synth.run(adapter, records, cfg.synth_options(), cfg.seed)
    if not job.main:  # every rank holds the whole result; rank 0 writes it
        return
    data.write_skips(Path(args.out).with_name("skipped.jsonl"), skips)
    data.write_records(args.out, result.pairs)
    drop_stored_batches(Path(args.out).parent, job, "synth")  # a filter's batches may share the folder
    print(json.dumps({"pairs": len(result.pairs), "skipped_lines": len(skips), **result.stats}))


def cmd_filter(args) -> None:
    from fastjudge import data
    from fastjudge.loop import drop_stored_batches, stored_batches
    from fastjudge.stages import filter as filter_stage
    open_run_folder(args.out)
    cfg = _config(args, model=args.judge)
    job = _job(cfg)
    pairs = data.read_records(args.pairs)  # before the model: a missing or bad file fails at once
    judge = _load(args.judge, cfg, job)
    with stored_batches(judge, Path(args.out), "filter", job):
        result = filter_stage.run(judge, pairs, cfg.filter_options(), cfg.seed)
    if not job.main:
        return
    data.write_jsonl(Path(args.out) / "judgments.jsonl", result.judgments)
    data.write_records(Path(args.out) / "sft.jsonl", result.traces)
    drop_stored_batches(Path(args.out), job, "filter")
    print(json.dumps(result.stats))


def cmd_train(args) -> None:
    from fastjudge import data
    from fastjudge.loop import check_checkpoint_out, train_to
    open_run_folder(Path(args.out).parent, "--out")
    check_checkpoint_out(Path(args.out))  # never a run folder or the user's files, before any work
    cfg = _config(args, model=args.judge)
    job = _job(cfg)
    records: list[dict] = []  # rank 0's figures
    # under torchrun (Mllama, the toy) every rank trains its shard; a killed job run again resumes from the
    # state saved beside --out
    train_to(Path(args.out), _load(args.judge, cfg, job), data.read_records(args.sft), cfg.train_options(),
             cfg.seed, job, reload=lambda path: _load(None if path is None else str(path), cfg, job),
             source=args.judge, on_done=records.append,
             state_dir=Path(args.out).with_name(Path(args.out).name + ".train_state"), go_on=False)
    if job.main:
        print(json.dumps(records[0]))


def cmd_eval(args) -> None:
    from fastjudge import data
    from fastjudge.loop import evaluate_to
    from fastjudge.toy.files import write_toy_benchmark
    from fastjudge.core import dist
    out = open_run_folder(args.out)
    cfg = _config(args, model=args.judge)
    job = _job(cfg)
    if job.main and not cfg.bench_data:
        write_toy_benchmark(out / "benchmark", cfg.toy_bench_per_category)
    dist.barrier()
    bench_data = cfg.bench_data or str(out / "benchmark" / "benchmark.jsonl")
    items, skips = data.load_bench(cfg.bench, bench_data, cfg.images)
    if job.main:
        data.write_skips(out / "skipped.jsonl", skips)
    if skips and job.main:
        print(f"skipped {len(skips)} benchmark entries: see {out / 'skipped.jsonl'}", file=sys.stderr)
    if not items:
        raise ValueError(f"data: no usable item in {bench_data} (see {out / 'skipped.jsonl'})")
    judge = _load(args.judge, cfg, job)
    score_items = data.load_bench(cfg.bench, bench_data, cfg.images, check_images=False)[0]
    metrics = evaluate_to(out, judge, items, cfg, score_items, world=job)
    if not job.main:
        return
    print(json.dumps(dict(metrics, skipped_entries=len(skips))))


def cmd_score(args) -> None:
    from fastjudge import data
    from fastjudge.data import scoring
    items, skips = data.load_bench(args.format, args.data, check_images=False)
    for skip in skips:
        print(f"skipped {skip.file} line {skip.line}: {skip.reason}", file=sys.stderr)
    predictions = data.load_predictions(args.predictions, k=args.k)
    known = {item["index"] for item in items}
    skipped_indices = sorted({p["index"] for p in predictions} - known)
    if skipped_indices:
        raise ValueError(f"predictions: {args.predictions} names item(s) {skipped_indices[:5]} that the data "
                         f"{args.data} does not hold (out of range, or skipped above)")
    print(json.dumps(scoring.score(args.format, items, predictions, args.unparsed)))


def cmd_toy_data(args) -> None:
    from fastjudge.toy.files import write_judge_examples, write_toy_benchmark, write_toy_prompts
    from fastjudge.core import dist
    out = open_run_folder(args.out)
    job = dist.start()  # under torchrun each rank saves its share of the images, rank 0 the JSONL files
    shard = job.shard
    prompts = write_toy_prompts(out / "world", args.count, args.seed, args.closed_fraction, shard=shard)
    bench = write_toy_benchmark(out / "benchmark", args.per_category, shard=shard)
    if not job.main:
        return
    pairs, candidates = write_judge_examples(bench, out / "judge")  # inputs for `fastjudge judge` and `rank`
    print(json.dumps({"prompts": str(prompts), "benchmark": str(bench), "pairs": str(pairs),
                      "candidates": str(candidates)}))


def cmd_cost(args) -> None:
    from fastjudge import cost
    rates_path = args.rates
    if rates_path is None:
        results = Path(__file__).resolve().parent.parent / "bench" / "results"
        rates_path = cost.newest_rates(results)
        if rates_path is None:
            raise ValueError(f"--rates: no rates-*.json in {results}; name a rates file "
                             "(bench/paper_scale.py writes one on a GPU)")
    if not Path(rates_path).is_file():
        raise ValueError(f"--rates: {rates_path} is not a file")
    recipe = cost.Recipe(**cost.parse_settings(args.settings))
    result = cost.estimate(recipe, cost.Rates.load(rates_path))
    print(cost.table(result))
    if args.out:
        from fastjudge.data.io import write_json
        write_json(args.out, result)


def _judge_for(args):
    from fastjudge.judge import Judge
    from fastjudge.models import FeatureCache
    dtype = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}[args.dtype]
    import torch
    judge = Judge.load(args.judge, device=args.device, dtype=getattr(torch, dtype), judge_tokens=args.judge_tokens,
                       batch_rows=args.batch_rows, seed=args.seed)
    judge.adapter.feature_cache = FeatureCache(max_bytes=4 << 30)
    return judge


def cmd_judge(args) -> None:
    from tqdm import tqdm
    from fastjudge import data
    out = open_run_folder(args.out)
    items, skips = data.load_judge_pairs(args.pairs, args.images)
    data.write_skips(out / "skipped.jsonl", skips)
    if skips:
        print(f"skipped {len(skips)} pair lines: see {out / 'skipped.jsonl'}", file=sys.stderr)
    if not items:
        raise ValueError(f"--pairs: no usable pair in {args.pairs} (see {out / 'skipped.jsonl'})")
    judge = _judge_for(args)
    images = data.load_images([item["image"] for item in items])
    with tqdm(total=len(items) * (2 if args.both_orders else 1), desc="judge", unit="judgment") as bar:
        judged = judge.compare_many(images, [i["question"] for i in items], [i["response_a"] for i in items],
                                    [i["response_b"] for i in items], k=args.k, both_orders=args.both_orders,
                                    progress=bar.update)
    rows = [dict(item, p_a=j.p_a, verdict=j.verdict, orders_agree=j.orders_agree, p_a_by_order=j.p_a_by_order,
                 reasonings=j.reasonings) for item, j in zip(items, judged)]
    data.write_jsonl(out / "judgments.jsonl", rows)
    summary = judgment_summary(judged, len(skips))
    data.write_json(out / "summary.json", summary)
    print(json.dumps(summary))


def judgment_summary(judged, skipped: int) -> dict:
    """Pairs judged and skipped, how often the two orders agreed (1 - the position-bias rate: verdicts that flip
    when the order flips), and the mean strength of preference |p_a - 0.5|."""
    agreements = [j.orders_agree for j in judged if j.orders_agree is not None]
    agree = sum(agreements) / len(agreements) if agreements else None
    return {"judged": len(judged), "skipped": skipped, "order_agreement": agree,
            "position_bias": None if agree is None else 1 - agree,
            "mean_preference_strength": sum(abs(j.p_a - 0.5) for j in judged) / max(1, len(judged)),
            "verdicts": {v: sum(j.verdict == v for j in judged) for v in ("A", "B", "tie")}}


def cmd_rank(args) -> None:
    from tqdm import tqdm
    from fastjudge import data
    out = open_run_folder(args.out)
    items, skips = data.load_candidates(args.candidates, args.images)
    data.write_skips(out / "skipped.jsonl", skips)
    if skips:
        print(f"skipped {len(skips)} candidate lines: see {out / 'skipped.jsonl'}", file=sys.stderr)
    if not items:
        raise ValueError(f"--candidates: no usable line in {args.candidates} (see {out / 'skipped.jsonl'})")
    judge = _judge_for(args)
    rows = []
    for item, image in zip(tqdm(items, desc="rank", unit="item"), data.load_images([i["image"] for i in items])):
        order, scores = judge.rank(image, item["question"], item["answers"], k=args.k)
        rows.append(dict(item, order=order, scores=scores, best=item["answers"][order[0]]))
    data.write_jsonl(out / "rankings.jsonl", rows)
    print(json.dumps({"ranked": len(rows), "skipped": len(skips), "rankings": str(out / "rankings.jsonl")}))


def cmd_toy_pretrain(args) -> None:
    from fastjudge.toy import pretrain
    open_run_folder(args.out)
    if args.recipe == "shipped":  # every phase's settings are the recipe's own
        defaults = pretrain.PretrainConfig()  # the command's defaults are these (a mixture or init: none given)
        fields = ("steps", "batch_size", "lr", "seed", "verdict_follow", "given_own", "blind_pick_one")
        given = [f"--{name.replace('_', '-')}" for name in fields if getattr(args, name) != getattr(defaults, name)]
        given += [f"--{name.replace('_', '-')}" for name in ("init", "mixture", "qa_families", "blind_checks")
                  if getattr(args, name) is not None]
        if given:
            raise ValueError(f"--recipe: the recipe sets every phase's training settings; drop {', '.join(given)}")
        print(json.dumps({"checkpoint": str(pretrain.run_recipe(pretrain.SHIPPED_RECIPE, args.out, args.threads))}))
        return
    mixture = pretrain.parse_mixture(args.mixture) if args.mixture else dict(pretrain.DEFAULT_MIXTURE)
    qa_families = pretrain.parse_mixture(args.qa_families, "qa-families", "family") if args.qa_families else None
    cfg = pretrain.PretrainConfig(out=args.out, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                                  seed=args.seed, init=args.init, mixture=mixture, threads=args.threads,
                                  verdict_follow=args.verdict_follow, given_own=args.given_own,
                                  qa_families=qa_families, blind_pick_one=args.blind_pick_one,
                                  blind_checks=tuple(f.strip() for f in (args.blind_checks or "").split(",")
                                                     if f.strip()))
    print(json.dumps({"checkpoint": str(pretrain.run(cfg))}))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastjudge", description=__doc__)
    parser.add_argument("--debug", action="store_true",
                        help="show the whole traceback of an error instead of its one-line message")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("iterate", help="the whole loop: synth -> filter -> train -> eval, repeated")
    _add_config_flags(p)
    p.add_argument("--override", default="",
                   help="with --resume: settings that may differ from the run's config.json, comma-separated, "
                        f"among {', '.join(RESUMABLE)} (any other changed flag is an error)")
    p.set_defaults(func=cmd_iterate)

    synth_flags = ["seed", "device", "dtype", "feature_cache_gb", "dist_timeout_s", "n_samples", "temperature",
                   "top_k", "top_p",
                   "min_votes", "early_stop", "round_size", "corrupter",
                   "rewrite_temperature", "answer_tokens", "batch_rows", "batch_tokens"]
    p = sub.add_parser("synth", help="preference pairs from a prompt pool")
    p.add_argument("--model", default=None, help=HELP["model"])
    p.add_argument("--prompts", required=True, help="prompt pool JSONL")
    p.add_argument("--out", required=True, help="pairs JSONL to write")
    _add_config_flags(p, synth_flags)
    p.set_defaults(func=cmd_synth)

    judge_flags = ["seed", "device", "dtype", "feature_cache_gb", "dist_timeout_s", "judge_tokens", "filter_temperature",
                   "filter_reasoning", "filter_samples", "filter_traces", "top_k",
                   "top_p", "batch_rows", "batch_tokens"]
    p = sub.add_parser("filter", help="judge pairs in both orders; keep the agreeing ones as SFT traces")
    p.add_argument("--judge", default=None, help="judge checkpoint (default: the toy base model)")
    p.add_argument("--pairs", required=True, help="pairs JSONL from `fastjudge synth`")
    p.add_argument("--out", required=True, help="folder for judgments.jsonl and sft.jsonl")
    _add_config_flags(p, judge_flags)
    p.set_defaults(func=cmd_filter)

    p = sub.add_parser("train", help="fine-tune a judge on SFT traces")
    p.add_argument("--judge", default=None, help="judge checkpoint to start from (default: the toy base model)")
    p.add_argument("--sft", required=True, help="sft.jsonl from `fastjudge filter`")
    p.add_argument("--out", required=True, help="checkpoint folder to write")
    _add_config_flags(p, ["seed", "device", "dtype", "feature_cache_gb", "epochs", "lr", "batch_size",
                          "micro_batches", "train_loss", "pack", "train", "lora_rank", "lora_alpha", "cpu_offload", "train_state_every",
                          "activation_checkpointing", "dist_timeout_s"])
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="run a judge on a pairwise benchmark and score it with the benchmark's rules")
    p.add_argument("--judge", default=None, help="judge checkpoint (default: the toy base model)")
    p.add_argument("--out", required=True, help="folder for predictions.jsonl, outputs.jsonl, metrics.json")
    _add_config_flags(p, ["bench", "bench_data", "images", "prompt", "unparsed", "k", "eval_temperature", "top_k",
                          "top_p", "seed", "device", "dtype", "feature_cache_gb", "dist_timeout_s", "judge_tokens",
                          "batch_rows",
                          "batch_tokens"],
                      aliases={"bench_data": "--data"})
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("score", help="score predictions with a benchmark's official rules; prints one JSON line")
    p.add_argument("--format", required=True, choices=["vlrewardbench", "mmrb"], help="benchmark format")
    p.add_argument("--data", required=True, help="the benchmark file (VL-RewardBench JSONL, Multimodal "
                   "RewardBench JSON list); images are not needed")
    p.add_argument("--predictions", required=True, help='JSONL of {"index", "shown_first", "verdict"}')
    p.add_argument("--unparsed", choices=["wrong", "random"], default="wrong",
                   help="mmrb: an unparsed verdict is wrong, or the official seeded random guess (default: wrong)")
    p.add_argument("--k", type=int, default=1,
                   help="judge samples per item in the predictions: an item on more lines is an error (default: 1)")
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("toy-data", help="write a shapes-world prompt pool and the held-out toy benchmark")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--count", type=int, default=640, help="prompts in the pool")
    p.add_argument("--seed", type=int, default=0, help="seed of the prompt pool (the benchmark's is fixed)")
    p.add_argument("--closed-fraction", type=float, default=0.5, help="share of closed-ended prompts")
    p.add_argument("--per-category", type=int, default=100, help="benchmark pairs per category")
    p.set_defaults(func=cmd_toy_data)

    p = sub.add_parser("toy-pretrain", help="train the toy base model from scratch (resumable)")
    p.add_argument("--out", default="runs/toy-base", help="output folder (checkpoint in OUT/checkpoint)")
    p.add_argument("--steps", type=int, default=4500, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=64, help="examples per step")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and the data stream")
    p.add_argument("--init", default=None, help="continue from this toy checkpoint instead of random weights")
    p.add_argument("--mixture", default=None,
                   help="task weights as task=weight,... over caption, qa, rewrite, judge, match; a task left out "
                        "has weight 0 (default caption=0.25,qa=0.30,rewrite=0.10,judge=0.30,match=0.05)")
    p.add_argument("--verdict-follow", type=float, default=0.4,
                   help="share of judge examples whose verdict follows the checks; the rest name answer A")
    p.add_argument("--given-own", type=float, default=0.0,
                   help="share of judge examples whose own answer is given (not trained), either response at "
                        "random, the checks made against it")
    p.add_argument("--qa-families", default=None,
                   help="weights of the qa task's closed question families as family=weight,... over count, "
                        "attribute, option, where, relation; a family left out has weight 0 (default: the "
                        "scene's families uniformly)")
    p.add_argument("--blind-checks", default=None,
                   help="question families whose judge examples carry coin-flip checks, comma-separated among "
                        "caption, count, attribute, option, where, relation: the check format without the check, "
                        "left for the loop to teach (default: none)")
    p.add_argument("--blind-pick-one", action="store_true",
                   help="blind checks pick exactly one answer by a coin flip, as right checks do (default: the two "
                        "checks drawn apart)")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads for torch (default 1: faster than 2 per step on a loaded 2-core machine)")
    p.add_argument("--recipe", choices=["shipped"], default=None,
                   help="run the shipped base's whole recipe (its phases in OUT/phase-<k>, the last one's checkpoint "
                        "the base); the other settings are the recipe's own")
    p.set_defaults(func=cmd_toy_pretrain)

    for name, helptext in (("judge", "judge your own pairs: p_a (the probability that A is better) in both orders"),
                           ("rank", "rank N answers per question by a Bradley-Terry fit on the judge's p_a")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--judge", default=None, help="judge checkpoint (default: the shipped toy base)")
        if name == "judge":
            p.add_argument("--pairs", required=True,
                           help='JSONL: {"id", "image", "question", "response_a", "response_b"} a line')
            p.add_argument("--both-orders", action=argparse.BooleanOptionalAction, default=True,
                           help="also judge each pair as (b, a) and average (default: on)")
        else:
            p.add_argument("--candidates", required=True,
                           help='JSONL: {"id", "image", "question", "answers": [...]} a line')
        p.add_argument("--out", required=True, help="output folder")
        p.add_argument("--images", default=None, help="folder the image paths are relative to (default: the file's)")
        p.add_argument("--k", type=int, default=1, help="reasonings per judgment: 1 greedy, more sampled (T 0.6)")
        p.add_argument("--judge-tokens", type=int, default=512, help="most tokens of reasoning a judgment")
        p.add_argument("--batch-rows", type=int, default=32, help="rows a generation batch holds")
        p.add_argument("--device", default="cpu")
        p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
        p.add_argument("--seed", type=int, default=0)
        p.set_defaults(func=cmd_judge if name == "judge" else cmd_rank)

    p = sub.add_parser("cost", help="a recipe's GPU-hours per stage, ours against transformers, from measured rates")
    p.add_argument("--rates", default=None,
                   help="rates file (default: the newest bench/results/rates-*.json of this checkout)")
    p.add_argument("--set", default="", dest="settings",
                   help="recipe changes, name=value,... (default: the paper's recipe; see the printed list)")
    p.add_argument("--out", default=None, help="also write the estimate as JSON here")
    p.set_defaults(func=cmd_cost)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; anticipated failures are one line on stderr (a traceback only with --debug): a bad input
    or setting (ValueError) or a file system error (a missing file, a full disk: OSError) exit 2, Ctrl-C 130, and
    a reader that closed the pipe (`fastjudge cost | head`) 141, as a shell reports SIGPIPE."""
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except BrokenPipeError:
        # whatever is still buffered for the closed pipe must not raise again when the interpreter flushes it
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        _leave_process_group(finished=False)
        return 141
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(f"fastjudge {args.command}: interrupted (a run folder resumes with --resume)", file=sys.stderr)
        _leave_process_group(finished=False)
        return 130
    except (ValueError, OSError) as exc:
        if args.debug:
            raise
        print(f"fastjudge {args.command}: error: {exc}", file=sys.stderr)
        _leave_process_group(finished=False)
        return 2
    _leave_process_group(finished=True)
    return 0


def _leave_process_group(finished: bool) -> None:
    """Under torchrun, leave the process group before the interpreter exits: left to the exit's teardown, gloo's
    threads can abort a rank ("terminate called without an active exception"). A rank that finished waits for
    the others first (rank 0 may still be writing); one that failed leaves at once, and torchrun ends the job."""
    if "torch.distributed" not in sys.modules:  # no command imported it: no process group, torch stays unloaded
        return
    from fastjudge.core import dist
    if finished:
        dist.barrier()
    dist.stop()


if __name__ == "__main__":
    sys.exit(main())
