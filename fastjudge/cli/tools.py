"""The commands around the loop: score predictions, judge and rank your own answers, estimate a recipe's cost,
and the toy world's data and base model."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fastjudge.cli import common
from fastjudge.data.runs import open_run_folder


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
    if args.count < 1 or args.per_category < 1:
        raise ValueError(f"--count, --per-category: expected >= 1, got {args.count} and {args.per_category}")
    if not 0 <= args.closed_fraction <= 1:  # nan fails this too
        raise ValueError(f"--closed-fraction: expected a share in [0, 1], got {args.closed_fraction}")
    out = Path(args.out)
    job = dist.start()  # under torchrun each rank saves its share of the images, rank 0 the JSONL files
    shard = job.shard
    with common.owned(out, "toy-data", ["world", "benchmark", "judge"], args.overwrite, job.main):
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
        results = Path(__file__).resolve().parents[2] / "bench" / "results"
        rates_path = cost.newest_rates(results)
        if rates_path is None:
            raise ValueError(f"--rates: no rates-*.json in {results}; name a rates file "
                             "(bench/paper_scale.py writes one on a GPU)")
    if not Path(rates_path).exists():
        raise ValueError(f"--rates: file not found: {rates_path}")
    if not Path(rates_path).is_file():
        raise ValueError(f"--rates: {rates_path} is a folder, not a rates file")
    if args.out and Path(args.out).is_dir():
        raise ValueError(f"--out: {args.out} is a folder; name the JSON file to write")
    if args.out and not Path(args.out).resolve().parent.is_dir():
        raise ValueError(f"--out: {Path(args.out).parent} is not a folder")
    recipe = cost.Recipe(**cost.parse_settings(args.settings))
    result = cost.estimate(recipe, cost.Rates.load(rates_path))
    print(cost.table(result))
    if args.out:
        from fastjudge.data.io import write_json
        write_json(args.out, result)


def _judge_tokens(args) -> int:
    """The judge's token budget: the loop's own default for this model (toy or real) unless given; the flags
    checked as the loop checks them, before any work."""
    from fastjudge.config import LoopConfig
    return LoopConfig(model=args.judge, judge_tokens=args.judge_tokens, batch_rows=args.batch_rows, k=args.k,
                      device=args.device).judge_tokens


def _judge_for(args, judge_tokens: int):
    from fastjudge.judge import Judge
    return Judge.load(args.judge, device=args.device, dtype=args.dtype, judge_tokens=judge_tokens,
                      batch_rows=args.batch_rows, seed=args.seed)


def _fit(gate, judge, items: list[dict], path: str, answers, field: str) -> list[dict]:
    """The items whose judge prompt, on their two longest answers, fits the judge's context (`Gate.fit_judged`)."""
    from fastjudge.data import prompts as prompt_texts
    style = judge.adapter.judge_style
    return gate.fit_judged(judge.adapter, items, judge.judge_tokens, lambda item, a, b: prompt_texts.judge_prompt(
        item["question"], a, b, style), answers, path, field)


def cmd_judge(args) -> None:
    from tqdm import tqdm
    from fastjudge import data
    from fastjudge.gate import Gate
    from fastjudge.models.partial import drop_stored_batches, stored_batches
    from fastjudge.report import judgment_summary
    out = Path(args.out)
    judge_tokens = _judge_tokens(args)
    names = ["judgments.jsonl", "summary.json", common.skipped_name("judge"), "partial-batches/judge"]
    with common.owned(out, "judge", names, args.overwrite):
        gate = Gate(out, skipped_name=common.skipped_name("judge"))
        items = gate.judge_pairs(args.pairs, args.images)
        judge = _judge_for(args, judge_tokens)
        items = _fit(gate, judge, items, args.pairs, lambda item: [item["response_a"], item["response_b"]],
                     "question, response_a, response_b")
        images = data.load_images([item["image"] for item in items])
        # finished generation batches are kept under --out: a killed run, run again, picks them up
        with stored_batches(judge.adapter, out, "judge"), \
                tqdm(total=len(items) * (2 if args.both_orders else 1), desc="judge", unit="judgment") as bar:
            judged = judge.compare_many(images, [i["question"] for i in items], [i["response_a"] for i in items],
                                        [i["response_b"] for i in items], k=args.k, both_orders=args.both_orders,
                                        progress=bar.update)
        rows = [dict(item, p_a=j.p_a, verdict=j.verdict, orders_agree=j.orders_agree, p_a_by_order=j.p_a_by_order,
                     reasonings=j.reasonings) for item, j in zip(items, judged)]
        data.write_jsonl(out / "judgments.jsonl", rows)
        summary = judgment_summary(judged, len(gate.skips))
        data.write_json(out / "summary.json", summary)
        drop_stored_batches(out, stage="judge")
    print(json.dumps(summary))


def cmd_rank(args) -> None:
    from tqdm import tqdm
    from fastjudge import data
    from fastjudge.gate import Gate
    from fastjudge.models.partial import drop_stored_batches, stored_batches
    out = Path(args.out)
    judge_tokens = _judge_tokens(args)
    with common.owned(out, "rank", ["rankings.jsonl", common.skipped_name("rank"), "partial-batches/rank"],
                      args.overwrite):
        gate = Gate(out, skipped_name=common.skipped_name("rank"))
        items = gate.candidates(args.candidates, args.images)
        judge = _judge_for(args, judge_tokens)
        items = _fit(gate, judge, items, args.candidates, lambda item: item["answers"], "question, answers")
        rows = []
        # each item's judgments are stored under --out as they are made: a killed run, run again, picks them up
        with stored_batches(judge.adapter, out, "rank"):
            for item, image in zip(tqdm(items, desc="rank", unit="item"),
                                   data.load_images([i["image"] for i in items])):
                order, scores = judge.rank(image, item["question"], item["answers"], k=args.k)
                rows.append(dict(item, order=order, scores=scores, best=item["answers"][order[0]]))
        data.write_jsonl(out / "rankings.jsonl", rows)
        drop_stored_batches(out, stage="rank")
    print(json.dumps({"ranked": len(rows), "skipped": len(gate.skips), "rankings": str(out / "rankings.jsonl")}))


def cmd_report(args) -> None:
    from fastjudge.data.runs import RunLock
    from fastjudge.report_html import write_report
    run = Path(args.run)
    if not run.is_dir():
        raise ValueError(f"report: {run} is not a folder")
    with RunLock(run, "RUN"):  # not while a run writes there
        print(json.dumps({"report": str(write_report(run))}))


def cmd_serve(args) -> None:
    import os
    import signal
    import uvicorn
    from fastjudge.serve import ServeSettings, create_app
    judge_tokens = _judge_tokens(args)
    settings = ServeSettings(max_wait_ms=args.max_wait_ms, max_batch_pairs=args.max_batch_pairs,
                             max_queue=args.max_queue, max_body_mb=args.max_body_mb, max_pairs=args.max_pairs,
                             image_root=args.image_root, api_key=args.api_key or os.environ.get("FASTJUDGE_API_KEY"))
    if args.image_root and not Path(args.image_root).is_dir():
        raise ValueError(f"--image-root: {args.image_root} is not a folder")
    judge = _judge_for(args, judge_tokens)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not settings.api_key:
        print(f"serve: listening on {args.host} with no --api-key: anyone who reaches it may use it",
              file=sys.stderr)
    # uvicorn ends on SIGTERM: it stops accepting, finishes the requests in flight, returns, and raises the signal
    # again for the handler it found; this one lets the command end as a finished one (exit 0)
    signal.signal(signal.SIGTERM, lambda number, frame: None)
    uvicorn.run(create_app(judge, settings, k=args.k), host=args.host, port=args.port, log_level="warning",
                timeout_graceful_shutdown=args.grace_s)


def cmd_toy_pretrain(args) -> None:
    from fastjudge.toy import pretrain
    open_run_folder(args.out)  # toy-pretrain resumes from its own files in --out
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


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("score", help="score predictions with a benchmark's official rules; prints one JSON line")
    p.add_argument("--format", required=True, choices=["vlrewardbench", "mmrb"], help="benchmark format")
    p.add_argument("--data", required=True, help="the benchmark file (VL-RewardBench JSONL or its Hub parquet, "
                   "Multimodal RewardBench JSON list); images are not needed")
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
    common.add_overwrite_flag(p)
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

    p = sub.add_parser("serve", help="the judge as a batched HTTP reward server (POST /v1/judge, /v1/rank; "
                                     "docs/serve.md)")
    p.add_argument("--judge", default=None, help="judge checkpoint (default: the shipped toy base)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-wait-ms", type=float, default=10.0,
                   help="how long a batch waits for more requests to join it (default: 10)")
    p.add_argument("--max-batch-pairs", type=int, default=64, help="pairs an engine call holds at most (default: 64)")
    p.add_argument("--max-queue", type=int, default=256,
                   help="requests waiting at most; more are answered 429 (default: 256)")
    p.add_argument("--max-body-mb", type=float, default=32.0, help="largest request body; more is 413 (default: 32)")
    p.add_argument("--max-pairs", type=int, default=256,
                   help="pairs a request may hold, n candidates to rank counting as n(n-1)/2 (default: 256)")
    p.add_argument("--image-root", default=None,
                   help="requests may name images by a path under this folder (default: base64 only)")
    p.add_argument("--api-key", default=None,
                   help="a bearer token every request must carry (default: $FASTJUDGE_API_KEY, else none)")
    p.add_argument("--grace-s", type=float, default=60.0,
                   help="on SIGTERM, seconds the requests in flight have to finish (default: 60)")
    p.add_argument("--k", type=int, default=1, help="reasonings per judgment: 1 greedy, more sampled (T 0.6)")
    p.add_argument("--judge-tokens", type=int, default=None,
                   help="most tokens of reasoning a judgment (default: 80 for the toy, 1024 for a real model)")
    p.add_argument("--batch-rows", type=int, default=256,
                   help="rows a generation batch holds: a batch's pairs x orders x k (default: 256)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("report", help="RUN/report.html: a run's accuracy, rates and sample pairs with the judge's "
                                      "judgments, one self-contained page")
    p.add_argument("run", help="the folder of a `fastjudge iterate` run")
    p.set_defaults(func=cmd_report)

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
        p.add_argument("--judge-tokens", type=int, default=None,
                       help="most tokens of reasoning a judgment (default: 80 for the toy, 1024 for a real model)")
        p.add_argument("--batch-rows", type=int, default=32, help="rows a generation batch holds")
        p.add_argument("--device", default="cpu")
        p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
        p.add_argument("--seed", type=int, default=0)
        common.add_overwrite_flag(p)
        p.set_defaults(func=cmd_judge if name == "judge" else cmd_rank)

    p = sub.add_parser("cost", help="a recipe's GPU-hours per stage, ours against transformers, from measured rates")
    p.add_argument("--rates", default=None,
                   help="rates file (default: the newest bench/results/rates-*.json of this checkout)")
    p.add_argument("--set", default="", dest="settings",
                   help="recipe changes, name=value,... (default: the paper's recipe; see the printed list)")
    p.add_argument("--out", default=None, help="also write the estimate as JSON here")
    p.set_defaults(func=cmd_cost)
