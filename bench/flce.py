"""Fused linear cross-entropy, forward + backward: milliseconds and peak memory per provider.

    python bench/flce.py --device cuda                      # N 1024, 4096, 8192; H 4096; V 128256; bf16
    python bench/flce.py --device cpu --rows 64 --hidden 64 --vocab 1000 --dtype float32   # a smoke run

Providers, all on the same inputs in one run:
- torch: materialized logits, F.cross_entropy on float32 logits (what fine-tuning did before);
- torch-chunked: `fused_linear_cross_entropy_reference` (row chunks recomputed in backward);
- torch-native: torch.nn.functional.linear_cross_entropy, where torch has it (2.13 and later);
- liger: LigerFusedLinearCrossEntropyLoss, where liger-kernel is installed;
- ours-vocab (rows whole, vocabulary blocks of about H: the memory of Liger's chunking; 8 N H V FLOPs) and
  ours-rows-C (row chunks of C rows over the whole vocabulary, eager gradients; 6 N H V FLOPs plus dweight
  accumulated over N / C chunks), C the Liger-sized chunk (N H / V rows) and larger ones; 1024 is the default.
  (The blockwise design of commit 7905f7e, logits as on-chip tiles, ran as "ours-blockwise".)
On CUDA it first measures the card's own bf16 matrix rate (an 8192^3 product), and reports each provider's
time against the floor 6 N H V / that rate. Every provider's loss is checked against the first one's.
Peak memory: torch.cuda.max_memory_allocated during forward + backward, less what the inputs hold.
Prints a table, then one JSON line; --out also writes it to a file.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _env import median_ms, report  # noqa: E402
from fastjudge.kernels.linear_cross_entropy import fused_linear_cross_entropy, fused_linear_cross_entropy_reference  # noqa: E402


def providers(rows: int, size: int, vocab: int, device: str) -> dict:
    """name -> loss(hidden, weight, target)."""
    out = {
        "torch": lambda h, w, t: F.cross_entropy(F.linear(h, w).float(), t),
        "torch-chunked": lambda h, w, t: fused_linear_cross_entropy_reference(h, w, t),
    }
    if hasattr(F, "linear_cross_entropy"):
        out["torch-native"] = lambda h, w, t: F.linear_cross_entropy(h, w, t)
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        liger = LigerFusedLinearCrossEntropyLoss()
        out["liger"] = lambda h, w, t: liger(w, h, t)
    except ImportError:
        pass
    out["ours-vocab"] = lambda h, w, t: fused_linear_cross_entropy(h, w, t, backend="triton", design="vocab")
    liger_rows = max(1, rows * size // vocab)
    for chunk in sorted({liger_rows, 4 * liger_rows, 1024, rows}):
        if chunk <= rows:
            out[f"ours-rows-{chunk}"] = (lambda c: lambda h, w, t: fused_linear_cross_entropy(
                h, w, t, backend="triton", design="rows", chunk_rows=c))(chunk)
    return out


def matmul_rate(device: str, dtype: torch.dtype) -> float | None:
    """The card's measured dense matrix rate in FLOP/s (median of 10 products of 8192^3)."""
    if device != "cuda":
        return None
    a = torch.randn(8192, 8192, device=device, dtype=dtype)
    b = torch.randn(8192, 8192, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * 8192 ** 3 / statistics.median(times)


def measure(loss_fn, hidden, weight, target, repeats: int) -> tuple[float, float | None, float]:
    """(median ms of forward + backward, peak extra MB or None, loss)."""
    cuda = hidden.is_cuda

    def once():
        h = hidden.detach().requires_grad_()
        w = weight.detach().requires_grad_()
        loss = loss_fn(h, w, target)
        loss.backward()
        return loss.item()

    value = once()  # warm-up (compilation, autotuning)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        once()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
    else:
        peak = None
    return median_ms(once, repeats, cuda), peak, value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rows", default="1024,4096,8192")
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip", default="", help="comma-separated providers not to run (e.g. torch at 8192)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    rate = matmul_rate(args.device, dtype)
    skip = set(filter(None, args.skip.split(",")))
    results = []
    for rows in map(int, args.rows.split(",")):
        g = torch.Generator(device=args.device).manual_seed(rows)
        hidden = torch.randn(rows, args.hidden, device=args.device, dtype=dtype, generator=g)
        weight = torch.randn(args.vocab, args.hidden, device=args.device, dtype=dtype, generator=g) \
            / args.hidden ** 0.5
        target = torch.randint(0, args.vocab, (rows,), device=args.device, generator=g)
        target[::10] = -100  # some prompt tokens, as in fine-tuning
        flops = 6 * rows * args.hidden * args.vocab
        reference = None
        for name, loss_fn in providers(rows, args.hidden, args.vocab, args.device).items():
            if name in skip:
                continue
            try:
                ms, peak, value = measure(loss_fn, hidden, weight, target, args.repeats)
            except torch.cuda.OutOfMemoryError:
                results.append({"rows": rows, "provider": name, "error": "out of memory"})
                torch.cuda.empty_cache()
                continue
            reference = value if reference is None else reference
            results.append({"rows": rows, "provider": name, "ms": ms, "peak_mb": peak, "loss": value,
                            "loss_differs": abs(value - reference),
                            "floor_ratio": ms / (flops / rate * 1e3) if rate else None,
                            "tflops": flops / (ms / 1e3) / 1e12})
            if args.device == "cuda":
                torch.cuda.empty_cache()
    print(f"H {args.hidden}, V {args.vocab}, {args.dtype}, {args.device}; matrix rate "
          f"{rate / 1e12:.0f} TFLOP/s" if rate else f"H {args.hidden}, V {args.vocab}, {args.dtype}, {args.device}")
    print(f"{'N':>6} {'provider':<18}{'ms':>10}{'peak MB':>10}{'x floor':>9}{'TFLOP/s':>9}{'|dloss|':>10}")
    for r in results:
        if "error" in r:
            print(f"{r['rows']:>6} {r['provider']:<18}{r['error']:>10}")
            continue
        peak = f"{r['peak_mb']:.0f}" if r["peak_mb"] is not None else "-"
        ratio = f"{r['floor_ratio']:.2f}" if r["floor_ratio"] else "-"
        print(f"{r['rows']:>6} {r['provider']:<18}{r['ms']:>10.2f}{peak:>10}{ratio:>9}{r['tflops']:>9.1f}"
              f"{r['loss_differs']:>10.1e}")
    result = {"bench": "flce", "hidden": args.hidden, "vocab": args.vocab, "dtype": args.dtype,
              "device": args.device, "matmul_tflops": rate / 1e12 if rate else None, "results": results}
    report(result, args.out)


if __name__ == "__main__":
    main()
