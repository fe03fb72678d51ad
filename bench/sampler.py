"""Generated tokens per second: our shared-prefix engine (`Adapter.generate`) against transformers'
`generate(num_return_sequences=n)` on the same weights and inputs, n in {1, 4, 16}, measured in one run: eagerly
with its default dynamic cache, and on its documented fast path, the static cache with `torch.compile` (each n's
compile a warm-up, reported apart; its greedy tokens checked equal to eager's; `--no-static` skips it).

    python bench/sampler.py                                   # CPU, the "small" Mllama (tests/tiny.py)
    python bench/sampler.py --preset llama-3.2-11b --device cuda

On a GPU ours runs its decoding steps as CUDA graphs (the default there) and, in a second column, eagerly.
Every timing follows one untimed call at the same n (a new n compiles kernels and plans attention for its
shapes); the median of --repeats calls is reported.
Both start from the same PIL images and prompt texts (the image processor and the tokenizer run in both
timings; their time alone is printed) and sample (temperature 0.6, top-k 50, top-p 0.9, the paper's) exactly
--new-tokens tokens per sample: end
tokens are switched off in both, so that both do the same number of decoding steps. Our engine encodes each
image once and prefills each prompt once for its n samples (no feature cache between calls: every call
starts cold); transformers repeats image and prompt n times before its first forward pass.
Prints a table, then one JSON line; --out also writes it to a file, and rewrites it after each n and after the
fast path (marked "partial" until the end), so that a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # tiny.py: the models we build
import tiny  # noqa: E402
from _env import median_ms, report, save_partial  # noqa: E402

from fastjudge.engine.options import DecodeOptions  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=["tiny", "small", "llama-3.2-11b"], default="small")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--prompt-words", type=int, default=150)
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--ns", default="1,4,16")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default=None)
    parser.add_argument("--no-eager", action="store_true", help="on a GPU, skip timing ours without CUDA graphs")
    parser.add_argument("--self-attention", default="",
                        help="on a GPU, also time ours at the largest n with the decoding step's SDPA limited to each "
                             "of these backends (comma-separated: efficient, cudnn, flash, math), or 'kernel': the "
                             "self layers through shared_prefix_decode_attention")
    parser.add_argument("--sync-check", action="store_true",
                        help="count the host synchronizations of one call of ours at the largest n, by code line")
    parser.add_argument("--profile", type=int, default=0,
                        help="after the timings, profile one call of ours at this n (GPU kernels, top 15 by time)")
    parser.add_argument("--no-static", action="store_true",
                        help="skip transformers' fast path: generate with its static cache and torch.compile (each "
                             "n compiles anew: minutes on the CPU)")
    args = parser.parse_args()

    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    adapter = tiny.build_mllama_adapter(args.preset, args.device, dtype, Path("/tmp/fastjudge-bench-sampler"))
    adapter.feature_cache = None  # every call encodes its images, as transformers does
    adapter.eos_ids = set()  # both run exactly --new-tokens steps
    model = adapter.model
    rs = np.random.RandomState(0)
    side = {"tiny": 56, "small": 448, "llama-3.2-11b": 1120}[args.preset]
    images = [Image.fromarray(rs.randint(0, 256, (side, side, 3), dtype=np.uint8)) for _ in range(args.prompts)]
    words = "which answer is better for the picture of two red circles and a blue square on the left".split()
    prompts = [f"{i} " + " ".join(words[(i + j) % len(words)] for j in range(args.prompt_words))
               for i in range(args.prompts)]
    sampling = dict(temperature=0.6, top_k=50, top_p=0.9)

    # transformers' inputs: the same token ids and pixels, left-padded as its batch generation wants
    features = adapter.image_features(images)
    rows = [adapter.prompt_ids(p, f) for p, f in zip(prompts, features)]
    length = max(map(len, rows))
    ids = torch.tensor([[adapter.pad_id] * (length - len(r)) + r for r in rows], device=args.device)
    mask = torch.tensor([[0] * (length - len(r)) + [1] * len(r) for r in rows], device=args.device)
    cross = adapter.model_inputs(rows, features, left=True)["cross_attention_mask"]

    def ours(n, graphs=None, new_tokens=args.new_tokens, options=DecodeOptions()):
        adapter.generate(images, prompts, n=n, max_new_tokens=new_tokens, seed=0, batch_rows=args.prompts * n,
                         options=options.with_(cuda_graphs=graphs), **sampling)

    @torch.no_grad()
    def theirs(n, **extra):
        # from the same PIL images and texts as ours: the image processor and the tokenizer run in both
        pixels = {k: v.to(args.device) for k, v in adapter._pixel_inputs(images).items()}
        pixels["pixel_values"] = pixels["pixel_values"].to(dtype)
        [adapter.prompt_ids(p, f) for p, f in zip(prompts, features)]
        options = dict(do_sample=True, num_return_sequences=n, max_new_tokens=args.new_tokens,
                       min_new_tokens=args.new_tokens, eos_token_id=None, pad_token_id=adapter.pad_id, **sampling)
        return model.generate(input_ids=ids, attention_mask=mask, cross_attention_mask=cross, **pixels,
                              **(options | extra))

    def timed(fn, n, **kwargs):
        # one untimed call first at each n: new shapes compile kernels (Triton, cuDNN plans) on first use
        fn(n, **kwargs)
        return median_ms(lambda: fn(n, **kwargs), args.repeats, args.device.startswith("cuda")) / 1e3

    # on a GPU our decoding steps run as CUDA graphs (the default) and, for comparison, eagerly
    on_gpu = args.device.startswith("cuda")
    graphs_failure = None
    if on_gpu:
        ours(1, graphs=False)  # warm-up
        try:
            ours(1, graphs=True)
        except Exception as failure:  # reported in the result; the eager steps are still timed
            graphs_failure, on_gpu = repr(failure), False
            print(f"CUDA graphs failed: {graphs_failure}", flush=True)
    else:
        ours(1)
    theirs(1)
    start = time.perf_counter()
    adapter._pixel_inputs(images)
    [adapter.prompt_ids(p, f) for p, f in zip(prompts, features)]
    preprocessing = time.perf_counter() - start
    results = []
    for n in (int(x) for x in args.ns.split(",")):
        tokens = args.prompts * n * args.new_tokens
        t_ours, t_theirs = timed(ours, n, graphs=on_gpu), timed(theirs, n)
        # what does not grow with the tokens (image, prefill, first step; with graphs one capture): the rest,
        # divided by the steps after the first, is our time per decoding step
        t_first = timed(ours, n, graphs=on_gpu, new_tokens=1)
        row = {"n": n, "tokens": tokens, "ours_s": t_ours, "transformers_s": t_theirs, "ours_one_token_s": t_first,
               "ours_step_ms": (t_ours - t_first) / max(1, args.new_tokens - 1) * 1e3,
               "ours_tok_s": tokens / t_ours, "transformers_tok_s": tokens / t_theirs, "speedup": t_theirs / t_ours}
        if on_gpu and not args.no_eager:
            t_eager = timed(ours, n, graphs=False)
            t_eager_first = timed(ours, n, graphs=False, new_tokens=1)
            row.update(ours_eager_s=t_eager, ours_eager_tok_s=tokens / t_eager, speedup_eager=t_theirs / t_eager,
                       ours_eager_step_ms=(t_eager - t_eager_first) / max(1, args.new_tokens - 1) * 1e3)
        results.append(row)
        print(row, flush=True)
        save_partial(args.out, {"bench": "sampler", "preset": args.preset, "device": args.device,
                                "prompts": args.prompts, "prompt_tokens": length, "new_tokens": args.new_tokens,
                                "results": results})
    print(f"preset {args.preset} on {args.device}: {args.prompts} prompts of ~{length} tokens, one image each, "
          f"{args.new_tokens} new tokens per sample; image processor + tokenizer {preprocessing:.2f} s per call")
    print(f"{'n':>4}{'ours tok/s':>12}{'hf tok/s':>12}{'speedup':>9}{'step ms':>9}"
          + (f"{'eager tok/s':>13}{'speedup':>9}{'step ms':>9}" if on_gpu else ""))
    for r in results:
        line = (f"{r['n']:>4}{r['ours_tok_s']:>12.1f}{r['transformers_tok_s']:>12.1f}{r['speedup']:>8.2f}x"
                f"{r['ours_step_ms']:>9.2f}")
        if "ours_eager_tok_s" in r:
            line += f"{r['ours_eager_tok_s']:>13.1f}{r['speedup_eager']:>8.2f}x{r['ours_eager_step_ms']:>9.2f}"
        print(line)
    static = None if args.no_static else static_compile_baseline(model, theirs, results, args)
    save_partial(args.out, {"bench": "sampler", "preset": args.preset, "device": args.device, "prompts": args.prompts,
                            "prompt_tokens": length, "new_tokens": args.new_tokens, "results": results,
                            "transformers_static_compile": static})
    largest = results[-1]
    backends = {}
    for name in filter(None, args.self_attention.split(",")):
        from torch.nn.attention import SDPBackend
        if name == "kernel":  # fastjudge.kernels.shared_prefix_decode_attention in the self layers
            options = DecodeOptions(self_attention_kernel=True)
        else:
            options = DecodeOptions(step_sdpa_backends=({"efficient": SDPBackend.EFFICIENT_ATTENTION,
                                                         "cudnn": SDPBackend.CUDNN_ATTENTION,
                                                         "flash": SDPBackend.FLASH_ATTENTION,
                                                         "math": SDPBackend.MATH}[name],))
        try:
            seconds = timed(ours, largest["n"], graphs=on_gpu, options=options)
            backends[name] = {"ours_s": seconds, "speedup": largest["transformers_s"] / seconds}
        except Exception as failure:
            backends[name] = {"failed": repr(failure)}
        print(f"n={largest['n']}, the step's SDPA limited to {name}: {backends[name]}", flush=True)
    syncs = None
    if args.sync_check:
        try:
            syncs = sync_check(lambda: ours(largest["n"], graphs=on_gpu))
        except Exception as failure:  # reported, not raised: the timings are already printed
            print(f"sync check failed: {failure!r}")
            syncs = {"failed": repr(failure)}
    profile = kernel_profile(lambda: ours(args.profile, graphs=on_gpu), args.new_tokens) if args.profile else None
    result = {"bench": "sampler", "preset": args.preset, "device": args.device, "cuda_graphs": on_gpu,
              "profile_n": args.profile, "profile": profile, "step_sdpa_backends": backends,
              "host_synchronizations": syncs,
              "cuda_graphs_failure": graphs_failure,
              "prompts": args.prompts,
              "prompt_tokens": length, "new_tokens": args.new_tokens, "sampling": sampling,
              "preprocessing_s": preprocessing, "results": results, "transformers_static_compile": static}
    report(result, args.out)


def static_compile_baseline(model, theirs, results: list[dict], args) -> dict:
    """transformers' documented fast path, timed after every other column (it replaces the model's forward with
    a compiled one, restored afterwards): `generate(cache_implementation="static")` with `torch.compile(forward)`.
    Each n's first call compiles (its time reported as warm-up, not timed); its greedy tokens must equal eager
    generate's. Adds to each row the fast path's time and the speedup of ours against the faster transformers."""
    eager_forward = model.forward
    out = {"greedy_equal": None, "warmup_s": {}}
    try:
        greedy_options = dict(do_sample=False, temperature=None, top_k=None, top_p=None)
        eager = theirs(1, **greedy_options)
        model.forward = torch.compile(model.forward)
        for row in results:
            n = row["n"]
            t0 = time.perf_counter()
            compiled = theirs(n, cache_implementation="static")  # compiles for this batch shape
            out["warmup_s"][n] = time.perf_counter() - t0
            if n == 1:
                greedy = theirs(1, cache_implementation="static", **greedy_options)
                out["greedy_equal"] = bool(torch.equal(eager, greedy))
            seconds = median_ms(lambda: theirs(n, cache_implementation="static"), args.repeats,
                                args.device.startswith("cuda")) / 1e3
            best = min(seconds, row["transformers_s"])
            row.update(transformers_static_compile_s=seconds, transformers_static_compile_tok_s=row["tokens"] / seconds,
                       transformers_best_s=best, speedup_vs_best=best / row["ours_s"])
            print(f"n={n}: transformers static cache + compile {row['tokens'] / seconds:.1f} tok/s "
                  f"(eager {row['transformers_tok_s']:.1f}); ours {row['ours_tok_s']:.1f}, "
                  f"{row['speedup_vs_best']:.2f}x the faster", flush=True)
        del compiled
    except Exception as failure:  # reported in the result: the other columns stand
        out["failed"] = repr(failure)
        print(f"static cache + compile failed: {failure!r}", flush=True)
    finally:
        model.forward = eager_forward
    return out


def sync_check(call) -> dict:
    """Host synchronizations of one call (torch.cuda.set_sync_debug_mode), counted by the innermost line of
    fastjudge's code that asked for them; prints them. The decoder means to synchronize only at its looks."""
    import collections
    import traceback
    import warnings
    places = collections.Counter()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        original = warnings.showwarning

        def record(message, category, filename, lineno, file=None, line=None):
            if "synchroniz" not in str(message).lower():
                return original(message, category, filename, lineno, file, line)
            ours = [f for f in traceback.extract_stack()[:-1]
                    if ("/fastjudge/" in f.filename or "/kernels/" in f.filename)]
            frame = ours[-1] if ours else None
            places[f"{frame.filename.rsplit('/', 2)[-2]}/{frame.filename.rsplit('/', 1)[-1]}:{frame.lineno}"
                   if frame else f"{filename}:{lineno}"] += 1
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            call()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    print(f"host synchronizations in one call: {sum(places.values())}")
    for where, count in places.most_common(12):
        print(f"{count:>6}  {where}")
    return dict(places.most_common())


def kernel_profile(call, steps: int) -> dict | None:
    """GPU kernel time of one call by kernel name (graph replays included), per decoding step; prints the top 15.
    A failure to profile is reported, not raised (the timings are already printed)."""
    try:
        from torch.autograd import DeviceType
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            call()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
        kernels = [e for e in prof.key_averages() if e.device_type == DeviceType.CUDA]
        total_us = sum(e.self_device_time_total for e in kernels)
        top = sorted(kernels, key=lambda e: e.self_device_time_total, reverse=True)[:15]
        rows = [{"kernel": e.key[:90], "calls": e.count, "ms_per_step": e.self_device_time_total / steps / 1e3,
                 "share": e.self_device_time_total / max(total_us, 1)} for e in top]
        print(f"GPU kernel time of one call: {total_us / 1e3:.1f} ms, {total_us / steps / 1e3:.2f} ms per step "
              f"({steps} steps; prefill and image included)")
        for r in rows:
            print(f"{r['ms_per_step']:>8.3f} ms/step {r['share']:>6.1%} {r['calls']:>7}  {r['kernel']}")
        return {"total_ms": total_us / 1e3, "steps": steps, "top": rows}
    except Exception as failure:
        print(f"profile failed: {failure!r}")
        return {"failed": repr(failure)}


if __name__ == "__main__":
    main()
