"""Benchmark: C++ sample_logits against the sort-based PyTorch reference and plain softmax + multinomial.

Logits (B, V) = (64, 128256) float32 (Llama 3's vocabulary), drawn with a fixed seed in two shapes:
  llm:    an LLM-like peaked mixture: every token N(0, 2^2), then 32 random "plausible" tokens per row
          at 14 + 3 N(0, 1). Median top-1 probability ~0.5, median top-p(0.9) set ~5 tokens.
  randn3: randn * 3, a heavy flat tail: top-1 probability ~0.05, top-p(0.9) set ~5,500 tokens. The
          kernel's worst kind of input for top-p (the set it must find is large).
Settings: top_k=50 + top_p=0.9 (the paper's), top_p=0.9 alone, temperature=0.7 alone. Each
implementation is timed in this one run (median of --repeats after a warm-up), with the same
torch.get_num_threads() threads. "softmax+multinomial" applies only the temperature (no filtering):
the least any torch sampler does. Draws are checked: the kernel's tokens must be in the top-50 for
the top-k setting.

    python bench/sample_logits.py --repeats 5 --out bench/results/sample-logits-cpu-2core.json
    python bench/sample_logits.py --device cuda --dtype bfloat16    # "ours" is then the Triton kernel
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from fastjudge.core.sampling import sample_logits, sample_logits_reference

DISTS = {
    "llm": "peaked mixture: N(0, 2^2) for every token, then 32 random tokens per row at 14 + 3 N(0, 1)",
    "randn3": "randn * 3: a heavy flat tail",
}
SETTINGS = {
    "top_k=50,top_p=0.9": dict(top_k=50, top_p=0.9),
    "top_p=0.9": dict(top_p=0.9),
    "temperature=0.7": dict(temperature=0.7),
}


def make_logits(kind: str, rows: int, vocab: int, seed: int = 0) -> torch.Tensor:
    """(B, V) float32 logits of the named shape (module docstring)."""
    generator = torch.Generator().manual_seed(seed)
    if kind == "randn3":
        return torch.randn(rows, vocab, generator=generator) * 3
    logits = torch.randn(rows, vocab, generator=generator) * 2
    head = torch.randint(0, vocab, (rows, 32), generator=generator)
    return logits.scatter_(1, head, 14 + 3 * torch.randn(rows, 32, generator=generator))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=64, help="rows B")
    parser.add_argument("--vocab", type=int, default=128_256, help="vocabulary V")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per implementation (the median is reported)")
    parser.add_argument("--dists", default="llm,randn3", help="comma-separated logit shapes: llm, randn3")
    parser.add_argument("--seed", type=int, default=0, help="seed for the logits and the draws")
    parser.add_argument("--out", default=None, help="also write the result with its environment to this JSON file")
    parser.add_argument("--device", default="cpu", help="cpu (ours: the C++ kernel) or cuda (ours: Triton)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _env import median_ms
    cuda = args.device.startswith("cuda")
    ours_name = "triton" if cuda else "c++"
    threads = torch.get_num_threads()
    print(f"logits=({args.rows}, {args.vocab}) {args.dtype} on {args.device}, threads={threads} "
          f"repeats={args.repeats} (median ms)")
    print(f"{'logits':<8}{'setting':<22}{ours_name:>9}{'reference':>11}{'softmax+mult':>14}{'vs ref':>9}{'vs s+m':>9}")
    def time_ms(fn):
        fn()  # warm-up (Triton compiles)
        return median_ms(fn, args.repeats, cuda)

    results = []
    for dist in args.dists.split(","):
        if dist not in DISTS:
            raise SystemExit(f"--dists: unknown logits shape {dist!r}; known: {', '.join(DISTS)}")
        logits = make_logits(dist, args.rows, args.vocab, args.seed).to(args.device, getattr(torch, args.dtype))
        for name, kwargs in SETTINGS.items():
            generator = torch.Generator(device=args.device).manual_seed(args.seed)
            tokens = sample_logits(logits, generator=generator, **kwargs)
            if "top_k" in kwargs:
                top = logits.topk(kwargs["top_k"], dim=-1).indices
                if not (top == tokens[:, None]).any(-1).all():
                    raise SystemExit(f"{dist} {name}: a token outside the top-k")
            temperature = kwargs.get("temperature", 1.0)
            ours_ms = time_ms(lambda: sample_logits(logits, generator=generator, **kwargs))
            ref_ms = time_ms(lambda: sample_logits_reference(logits, generator=generator, **kwargs))
            plain_ms = time_ms(lambda: torch.multinomial((logits.float() / temperature).softmax(-1), 1,
                                                         generator=generator))
            print(f"{dist:<8}{name:<22}{ours_ms:>9.2f}{ref_ms:>11.2f}{plain_ms:>14.2f}"
                  f"{ref_ms / ours_ms:>8.1f}x{plain_ms / ours_ms:>8.1f}x")
            results.append({"logits": dist, "setting": name, "ours_ms": round(ours_ms, 3),
                            "reference_ms": round(ref_ms, 3), "softmax_multinomial_ms": round(plain_ms, 3),
                            "speedup_vs_reference": round(ref_ms / ours_ms, 1),
                            "speedup_vs_softmax_multinomial": round(plain_ms / ours_ms, 1)})
    dists = args.dists.split(",")
    result = {"bench": "sample_logits", "device": args.device, "ours": ours_name, "rows": args.rows,
              "vocab": args.vocab, "dtype": args.dtype, "threads": threads,
              "repeats": args.repeats, "logits": {d: DISTS[d] for d in dists}, "results": results}
    if args.out:
        from _env import save
        save(args.out, result)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
