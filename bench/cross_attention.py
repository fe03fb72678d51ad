"""Mllama vision cross-attention: ours (Triton over key ranges) against transformers' SDPA path, FlexAttention
and flash-attn varlen where present; forward, forward + backward, and decoding.

    python bench/cross_attention.py --device cuda          # the 11B shapes: 32 query heads, 8 K/V heads, D 128
    TRITON_INTERPRET=1 python bench/cross_attention.py --device cpu --batch 1 --rows 32 --heads 4 --kv-heads 2 \\
        --head-dim 16 --patches 20 --tiles 1,2 --ns 1,4 --repeats 1     # a smoke run (CPU times mean nothing)

Training and prefill: B text rows of T tokens over one image of 4 tiles x `patches` keys (the processor pads to
4), of which 1 to 4 are valid; the first 5% of the rows come before the image token (they see no key: "hf").
- sdpa: transformers' path: K and V repeated to the query heads, a dense additive (B, 1, T, S) mask (built
  once per forward there, so outside the timed call here), F.scaled_dot_product_attention (which cannot use
  its flash backend with a mask);
- flex: torch's FlexAttention with a block mask from the same ranges (where torch has it; compiled);
- ours: `fastjudge.kernels.cross_attention`.
Decoding: B prompts x n samples, one query each, over the prompt's image: "per-sample" is transformers' layout
(generate(num_return_sequences=n) repeats the image's K/V for every sample), the faster of SDPA with GQA over
B * n rows and what transformers runs (K/V repeated to the query heads in the call, then SDPA);
"ours" `cross_attention_decode` (the G query heads of a K/V head times the n samples as the rows of one product
over the prompt's keys, split over programs, flash-decoding), and the training kernel with each sample a row.
Decoding is timed twice on CUDA: each call synchronized (the host's launch overhead included: about 0.1 ms for a
Python wrapper and two kernels, as much as the kernels take) and replayed from a CUDA graph of 20 calls (the
device's time alone, as the sampler's captured decoding step runs it); SDPA with GQA and ours both ways, the
repeated-K/V path (many milliseconds, device-bound) only the first.
--tile-presets times the training kernels with each of mllama_cross_attention.TILE_PRESETS (tiles, warps and
stages per kernel), as providers "ours:<preset>".
TFLOP/s count the valid keys only (4 T S_valid D per head forward, 2.5 times that forward + backward).
Prints a table, then one JSON line; --out also writes it.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _env import graph_ms, median_ms, report  # noqa: E402
from fastjudge.kernels import mllama_cross_attention  # noqa: E402
from fastjudge.kernels.mllama_cross_attention import cross_attention, cross_attention_decode, cross_attention_reference  # noqa: E402


def timed(fn, repeats: int, cuda: bool) -> float:
    """Median milliseconds of fn() after one warm-up (compilation)."""
    fn()
    return median_ms(fn, repeats, cuda)


def graph_timed(fn, repeats: int) -> float | None:
    """graph_ms, or None (reported) where the capture fails: the synchronized times still stand."""
    try:
        return graph_ms(fn, repeats)
    except Exception as failure:
        print(f"CUDA graph timing failed: {failure!r}", flush=True)
        return None


def ours_triton(q, k, v, start, end, mask):
    """cross_attention's Triton kernels, with whatever training tiles are in force (the caller's tile_presets
    block holds them through the backward pass too)."""
    return cross_attention(q, k, v, start, end, backend="triton")


def dense_mask(start, end, keys, dtype):
    """transformers' additive (B, 1, T, S) mask; rows that see nothing see everything ("hf"). Built once per
    forward call there (shared by the layers), so outside the timed calls here."""
    columns = torch.arange(keys, device=start.device)
    seen = ((columns >= start[..., None]) & (columns < end[..., None])) | (start >= end)[..., None]
    return torch.zeros(seen.shape, dtype=dtype, device=start.device).masked_fill(~seen, torch.finfo(dtype).min)[:, None]


def sdpa(q, k, v, mask):
    """transformers' layer: K and V repeated to the query heads, then SDPA with the dense mask."""
    group = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1),
                                          attn_mask=mask)


def flex_provider():
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        return None
    compiled = torch.compile(flex_attention)

    def run(q, k, v, start, end):
        empty = start >= end
        lo = torch.where(empty, torch.zeros_like(start), start)
        hi = torch.where(empty, torch.full_like(end, k.shape[2]), end)

        def rule(b, h, q_index, kv_index):
            return (kv_index >= lo[b, q_index]) & (kv_index < hi[b, q_index])
        block = create_block_mask(rule, q.shape[0], None, q.shape[2], k.shape[2], device=q.device)
        return compiled(q, k, v, block_mask=block, enable_gqa=True)
    return lambda q, k, v, start, end, mask: run(q, k, v, start, end)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rows", default="512,2048")
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--patches", type=int, default=1601)
    parser.add_argument("--tiles", default="1,4")
    parser.add_argument("--ns", default="1,16")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--decode-only", action="store_true", help="skip the training and prefill shapes")
    parser.add_argument("--decode-splits", default="",
                        help="also time cross_attention_decode with these key splits (comma-separated)")
    parser.add_argument("--no-flex", action="store_true", help="leave FlexAttention out (its compiles take long)")
    parser.add_argument("--tile-presets", default="base",
                        help="training tiles to time (comma-separated names of TILE_PRESETS, or 'all')")
    parser.add_argument("--decode-tiles", default="",
                        help="also time cross_attention_decode with these DECODE_TILE_PRESETS (comma-separated, 'all')")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    cuda = args.device == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    keys = 4 * args.patches
    presets = list(mllama_cross_attention.TILE_PRESETS) if args.tile_presets == "all" else args.tile_presets.split(",")
    for preset in presets:
        if preset not in mllama_cross_attention.TILE_PRESETS:
            parser.error(f"--tile-presets: {preset!r} is not one of {list(mllama_cross_attention.TILE_PRESETS)}")
    decode_splits = [int(x) for x in args.decode_splits.split(",") if x]
    decode_tiles = list(mllama_cross_attention.DECODE_TILE_PRESETS) if args.decode_tiles == "all" else \
        [x for x in args.decode_tiles.split(",") if x]
    for preset in decode_tiles:
        if preset not in mllama_cross_attention.DECODE_TILE_PRESETS:
            parser.error(f"--decode-tiles: {preset!r} is not one of {list(mllama_cross_attention.DECODE_TILE_PRESETS)}")
    providers = {"sdpa": lambda q, k, v, s, e, mask: sdpa(q, k, v, mask)}
    provider_tiles: dict[str, str] = {}  # provider -> the training tile preset it runs under
    for preset in presets:
        name = "ours" if presets == ["base"] else f"ours:{preset}"
        providers[name] = ours_triton
        provider_tiles[name] = preset
    flex = flex_provider() if cuda and not args.no_flex else None
    if flex is not None:
        providers["flex"] = flex
    g = torch.Generator(device=args.device).manual_seed(0)
    results = []
    # decoding first: it is quick, and flex's compiler (training) may take long
    for n in [int(x) for x in args.ns.split(",") if x]:  # --ns "": no decoding
        tiles = 4
        q = torch.randn(args.batch, args.heads, n, args.head_dim, device=args.device, dtype=dtype, generator=g)
        k = torch.randn(args.batch, args.kv_heads, keys, args.head_dim, device=args.device, dtype=dtype, generator=g)
        v = torch.randn_like(k)
        start = torch.zeros(args.batch, n, dtype=torch.int32, device=args.device)
        end = torch.full_like(start, tiles * args.patches)
        # transformers' decoding layout: every sample its own copy of the image's keys and values (made by
        # generate before decoding, so outside the timed call); one query per row, K/V not repeated to the query
        # heads (SDPA's GQA, as transformers 5.24 does for one-token queries)
        q_rows = q.transpose(1, 2).reshape(args.batch * n, args.heads, 1, args.head_dim)
        k_rows, v_rows = k.repeat_interleave(n, 0), v.repeat_interleave(n, 0)
        mask = dense_mask(start.reshape(-1, 1), end.reshape(-1, 1), keys, dtype)
        per_sample_gqa = timed(lambda: F.scaled_dot_product_attention(q_rows, k_rows, v_rows, attn_mask=mask,
                                                                      enable_gqa=True), args.repeats, cuda)
        # what transformers 5.x does with a mask on CUDA (use_gqa_in_sdpa is False then): repeat_kv to the query
        # heads in every layer call, then SDPA (its memory-efficient kernel)
        per_sample_hf = timed(lambda: sdpa(q_rows, k_rows, v_rows, mask), args.repeats, cuda)
        per_sample = min(per_sample_gqa, per_sample_hf)  # the faster baseline
        # ours: cross_attention_decode (the G heads of a K/V head x the n samples as the rows of one product over
        # the prompt's range, keys split over programs); "rows": the training kernel with each sample as a row
        rows_ms = timed(lambda: cross_attention(q, k, v, start, end, backend="triton"), args.repeats, cuda)
        start_b, end_b = start[:, 0].contiguous(), end[:, 0].contiguous()
        expected = cross_attention_reference(q.float(), k.float(), v.float(), start, end)

        def decode(**options):  # ours on this n's inputs (options: splits)
            return cross_attention_decode(q, k, v, start_b, end_b, backend="triton", **options)
        got = decode()
        error = ((got.float() - expected).norm() / expected.norm()).item()
        ours = timed(decode, args.repeats, cuda)
        by_splits = {x: timed(lambda x=x: decode(splits=x), args.repeats, cuda) for x in decode_splits}
        by_tiles, graph_by_tiles = {}, {}
        for preset in decode_tiles:  # each with its default splits (as many programs as fit at once)
            try:
                with mllama_cross_attention.tile_presets(decode=preset):
                    by_tiles[preset] = timed(decode, args.repeats, cuda)
                    if cuda:
                        graph_by_tiles[preset] = graph_timed(decode, args.repeats)
            except Exception as failure:  # out of shared memory on this card, say: reported, not fatal
                print(f"decode n={n} tiles {preset}: failed: {failure!r}", flush=True)
                by_tiles[preset] = None
        graph = {}
        if cuda:  # the device's time alone (a captured decoding step pays no launch overhead)
            graph = {"per_sample_gqa_ms": graph_timed(lambda: F.scaled_dot_product_attention(
                         q_rows, k_rows, v_rows, attn_mask=mask, enable_gqa=True), args.repeats),
                     "ours_ms": graph_timed(decode, args.repeats),
                     "ours_ms_by_splits": {x: graph_timed(lambda x=x: decode(splits=x), args.repeats)
                                           for x in decode_splits},
                     "ours_ms_by_tiles": graph_by_tiles}
            if graph["per_sample_gqa_ms"] and graph["ours_ms"]:
                graph["speedup"] = graph["per_sample_gqa_ms"] / graph["ours_ms"]  # both in graphs
        results.append({"case": "decode", "n": n, "ours_ms_by_splits": by_splits, "ours_ms_by_tiles": by_tiles,
                        "graph": graph,
                        "per_sample_ms": per_sample, "per_sample_gqa_ms": per_sample_gqa,
                        "per_sample_repeat_kv_ms": per_sample_hf, "ours_ms": ours,
                        "ours_rows_ms": rows_ms, "speedup": per_sample / ours, "relative_error": error})
        print(results[-1], flush=True)
    for rows in [] if args.decode_only else map(int, args.rows.split(",")):
        for tiles in map(int, args.tiles.split(",")):
            q = torch.randn(args.batch, args.heads, rows, args.head_dim, device=args.device, dtype=dtype, generator=g)
            k = torch.randn(args.batch, args.kv_heads, keys, args.head_dim, device=args.device, dtype=dtype,
                            generator=g)
            v = torch.randn_like(k)
            start = torch.zeros(args.batch, rows, dtype=torch.int32, device=args.device)
            end = torch.full_like(start, tiles * args.patches)
            end[:, :max(1, rows // 20)] = 0  # text before the image
            flops = 4 * args.batch * args.heads * rows * tiles * args.patches * args.head_dim
            mask = dense_mask(start, end, keys, dtype)
            reference = sdpa(q.float(), k.float(), v.float(), dense_mask(start, end, keys, torch.float32))
            for name, fn in providers.items():
                # a preset's tiles hold for the forward and the backward pass alike
                tiles_in_force = (mllama_cross_attention.tile_presets(training=provider_tiles[name])
                                  if name in provider_tiles else contextlib.nullcontext())
                try:
                    with tiles_in_force:
                        error = ((fn(q, k, v, start, end, mask).float() - reference).norm()
                                 / reference.norm()).item()
                        forward = timed(lambda: fn(q, k, v, start, end, mask), args.repeats, cuda)
                        qq, kk, vv = (x.detach().requires_grad_() for x in (q, k, v))
                        grad = torch.randn_like(q)
                        both = timed(lambda: fn(qq, kk, vv, start, end, mask).backward(grad), args.repeats, cuda)
                except Exception as failure:  # a provider that fails (flex's compiler, say) is reported, not fatal
                    print(f"T {rows} tiles {tiles} {name}: failed: {failure!r}", flush=True)
                    results.append({"case": "train", "rows": rows, "tiles": tiles, "provider": name,
                                    "failed": repr(failure)})
                    continue
                results.append({"case": "train", "rows": rows, "tiles": tiles, "provider": name, "forward_ms": forward,
                                "forward_backward_ms": both, "forward_tflops": flops / forward / 1e9,
                                "forward_backward_tflops": 2.5 * flops / both / 1e9, "relative_error": error})
                print(results[-1], flush=True)  # as it goes: a run cut short keeps what it measured
    print(f"B {args.batch}, heads {args.heads}/{args.kv_heads}, D {args.head_dim}, 4 tiles x {args.patches} keys, "
          f"{dtype}, {args.device}")
    print(f"{'T':>6}{'tiles':>6} {'provider':<20}{'fwd ms':>9}{'fwd+bwd ms':>12}{'fwd TF/s':>10}{'f+b TF/s':>10}"
          f"{'rel err':>10}")
    for r in results:
        if r["case"] == "train" and "failed" in r:
            print(f"{r['rows']:>6}{r['tiles']:>6} {r['provider']:<20} failed")
        elif r["case"] == "train":
            print(f"{r['rows']:>6}{r['tiles']:>6} {r['provider']:<20}{r['forward_ms']:>9.3f}"
                  f"{r['forward_backward_ms']:>12.3f}{r['forward_tflops']:>10.1f}{r['forward_backward_tflops']:>10.1f}"
                  f"{r['relative_error']:>10.1e}")
    for r in results:
        if r["case"] == "decode":
            print(f"decode n={r['n']:<3} per-sample {r['per_sample_ms']:.3f} ms (SDPA GQA {r['per_sample_gqa_ms']:.3f}, "
                  f"repeat_kv + SDPA {r['per_sample_repeat_kv_ms']:.3f}), ours {r['ours_ms']:.3f} ms: "
                  f"{r['speedup']:.2f}x (samples as rows of the training kernel: {r['ours_rows_ms']:.3f} ms; "
                  f"rel err {r['relative_error']:.1e})")
            if r["ours_ms_by_splits"]:
                print("    by key splits: " + ", ".join(f"{s_}: {ms:.3f} ms" for s_, ms in r["ours_ms_by_splits"].items()))
            if r["ours_ms_by_tiles"]:
                print("    by decode tiles: " + ", ".join(f"{s_}: {ms:.3f} ms" if ms else f"{s_}: failed"
                                                        for s_, ms in r["ours_ms_by_tiles"].items()))
            graph = r["graph"]
            if graph.get("speedup"):
                print(f"    in a CUDA graph: per-sample SDPA GQA {graph['per_sample_gqa_ms']:.3f} ms, ours "
                      f"{graph['ours_ms']:.3f} ms: {graph['speedup']:.2f}x")
            if graph.get("ours_ms_by_splits"):
                print("    in a CUDA graph, by key splits: " + ", ".join(
                    f"{s_}: {ms:.3f} ms" if ms else f"{s_}: failed" for s_, ms in graph["ours_ms_by_splits"].items()))
            if graph.get("ours_ms_by_tiles"):
                print("    in a CUDA graph, by decode tiles: " + ", ".join(
                    f"{s_}: {ms:.3f} ms" if ms else f"{s_}: failed" for s_, ms in graph["ours_ms_by_tiles"].items()))
    result = {"bench": "cross_attention", "batch": args.batch, "heads": args.heads, "kv_heads": args.kv_heads,
              "head_dim": args.head_dim, "patches": args.patches, "dtype": str(dtype), "device": args.device,
              "results": results}
    report(result, args.out)


if __name__ == "__main__":
    main()
