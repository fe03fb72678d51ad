"""A decoding step's self-attention over a shared prompt, at Llama-3.2-11B-Vision's shapes: ours
(`fastjudge.kernels.shared_prefix_decode_attention`, one split-K kernel) against the shared decoder's SDPA
paths over the same key buffer.

    python bench/decode_attention.py --device cuda

The key buffer of each prompt holds its T prompt keys, then the samples' own keys step-major (as
fastjudge/engine/mllama.py lays it out); each sample sees the prompt and its own steps. Providers:
- "sdpa rows": the decoder's SDPA path: the G query heads of a K/V head and the n samples as G x n query rows,
  one additive mask (B, 1, G n, width) in the activations' dtype (built once per step, outside the timing);
- "sdpa gqa": SDPA with enable_gqa and a boolean (B, 1, n, width) mask (what the decoder did before);
- "ours".
One layer's call in milliseconds (median of --repeats after a warm-up), and x 32 for the 11B's self layers.
Prints a table, then one JSON line; --out also writes it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _env import median_ms, report  # noqa: E402
from fastjudge.kernels.decode_attention import (  # noqa: E402
    _seen,
    shared_prefix_decode_attention,
    shared_prefix_decode_attention_reference,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--prompt-tokens", type=int, default=1156)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--ns", default="1,16")
    parser.add_argument("--steps", default="16,64", help="own steps read (the width is T + steps x n)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    cuda = args.device.startswith("cuda")
    dtype = torch.bfloat16 if cuda else torch.float32
    g = torch.Generator(device=args.device).manual_seed(0)
    batch, prompt, group = args.prompts, args.prompt_tokens, args.heads // args.kv_heads
    results = []
    for n in map(int, args.ns.split(",")):
        for steps in map(int, args.steps.split(",")):
            width = prompt + steps * n
            q = torch.randn(batch, args.heads, n, args.head_dim, device=args.device, dtype=dtype, generator=g)
            keys = torch.randn(batch, args.kv_heads, width, args.head_dim, device=args.device, dtype=dtype,
                               generator=g)
            values = torch.randn_like(keys)
            prompt_mask = torch.ones(batch, prompt, dtype=torch.bool, device=args.device)
            prompt_mask[1:, :prompt // 4] = False  # left padding
            index = torch.full((batch, n), steps - 1, device=args.device)  # every sample at its last step
            seen = _seen(prompt_mask, index, width)  # (B, n, width)
            bias = torch.zeros(batch, 1, group, n, width, dtype=dtype, device=args.device)
            bias = bias.masked_fill(~seen[:, None, None], float("-inf")).view(batch, 1, group * n, width)
            providers = {
                "sdpa rows": lambda: F.scaled_dot_product_attention(
                    q.reshape(batch, args.kv_heads, group * n, args.head_dim), keys, values, attn_mask=bias),
                "sdpa gqa": lambda: F.scaled_dot_product_attention(q, keys, values, attn_mask=seen[:, None],
                                                                   enable_gqa=True),
                "ours": lambda: shared_prefix_decode_attention(q, keys, values, prompt_mask, index, width=width,
                                                               backend="triton"),
            }
            expected = shared_prefix_decode_attention_reference(q.float(), keys.float(), values.float(),
                                                                prompt_mask, index, width=width)
            row = {"n": n, "steps": steps, "width": width}
            for name, fn in providers.items():
                out = fn().reshape(expected.shape).float()
                row[f"{name} error"] = float((out - expected).norm() / expected.norm())
                fn()
                row[f"{name} ms"] = median_ms(fn, args.repeats, cuda)
            results.append(row)
            print(row, flush=True)
    print(f"B {batch}, T {prompt}, heads {args.heads}/{args.kv_heads}, D {args.head_dim}, {dtype}, {args.device}; "
          f"one layer's call (x 32 self layers in the 11B)")
    print(f"{'n':>4}{'steps':>7}{'width':>7}{'sdpa rows':>11}{'sdpa gqa':>10}{'ours':>9}{'vs rows':>9}")
    for r in results:
        print(f"{r['n']:>4}{r['steps']:>7}{r['width']:>7}{r['sdpa rows ms']:>11.3f}{r['sdpa gqa ms']:>10.3f}"
              f"{r['ours ms']:>9.3f}{r['sdpa rows ms'] / r['ours ms']:>8.2f}x")
    report({"bench": "decode_attention", "prompts": batch, "prompt_tokens": prompt, "heads": args.heads,
            "kv_heads": args.kv_heads, "head_dim": args.head_dim, "dtype": str(dtype), "device": args.device,
            "results": results}, args.out)


if __name__ == "__main__":
    main()
