"""What the vision feature cache saves: judge evaluation (k samples per item, as `fastjudge eval`) with the
cache off, cold (first use: every image encoded once) and warm (a later stage: no image encoded).

    python bench/feature_cache.py --preset llama-3.2-11b --device cuda   # random weights, the real shapes
    python bench/feature_cache.py --preset small                         # a CPU-sized Mllama
    python bench/feature_cache.py                                        # tiny Mllama on the CPU (smoke)

Random weights in the architecture of Llama-3.2-11B-Vision (4 tiles of 560x560, 40-layer text model with 8
cross-attention layers): the time of a forward pass does not depend on the weights' values. Greedy decoding
runs to --new-tokens (random weights rarely emit an end token; every variant decodes the same tokens).
Prints a table, then one JSON line; --out also writes it to a file.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # tiny.py: the models we build
import tiny  # noqa: E402
from _env import environment, save  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=["tiny", "small", "llama-3.2-11b"], default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--items", type=int, default=16, help="benchmark items (one image each)")
    parser.add_argument("--k", type=int, default=4, help="judge samples per item")
    parser.add_argument("--prompt-words", type=int, default=200)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--batch-rows", type=int, default=64)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    from fastjudge.models import FeatureCache
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    folder = Path("/tmp/fastjudge-bench-feature-cache")
    adapter = tiny.build_mllama_adapter(args.preset, args.device, dtype, folder)
    rs = np.random.RandomState(0)
    # one 4-tile-ish aspect ratio per image (Mllama: 1120x1120 -> 4 tiles of 560)
    side = {"tiny": 56, "small": 448, "llama-3.2-11b": 1120}[args.preset]
    images = [Image.fromarray(rs.randint(0, 256, (side, side, 3), dtype=np.uint8)) for _ in range(args.items)]
    words = "the answer on the left shows two red circles while the other one shows three".split()
    prompt = " ".join(words[i % len(words)] for i in range(args.prompt_words))
    rows_images = [im for im in images for _ in range(args.k)]
    rows_prompts = [f"{i}: {prompt}" for i in range(len(rows_images))]

    def run() -> float:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        adapter.generate(rows_images, rows_prompts, max_new_tokens=args.new_tokens, batch_rows=args.batch_rows)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    # warm-up (kernels, allocator) on a slice, cache off
    adapter.feature_cache = FeatureCache(0)
    adapter.generate(rows_images[:2], rows_prompts[:2], max_new_tokens=2)
    off = [run() for _ in range(2)]
    adapter.feature_cache = FeatureCache(64 << 30)
    cold = run()
    encoded = adapter.feature_cache.stats["misses"]
    warm = [run() for _ in range(2)]
    entry_mb = next(iter(adapter.feature_cache._entries.values())).nbytes / 2**20
    with torch.no_grad():
        t0 = time.perf_counter()
        adapter.encode_images(images[:1])
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        one_image = time.perf_counter() - t0

    result = {
        "bench": "feature_cache", "preset": args.preset, "device": args.device, "items": args.items, "k": args.k,
        "prompt_words": args.prompt_words, "new_tokens": args.new_tokens, "batch_rows": args.batch_rows,
        "seconds_off": min(off), "seconds_cold": cold, "seconds_warm": min(warm), "images_encoded_cold": encoded,
        "speedup_warm_vs_off": min(off) / min(warm), "speedup_cold_vs_off": min(off) / cold,
        "one_image_encode_s": one_image, "cached_mb_per_image": entry_mb, "environment": environment(),
    }
    print(f"{'variant':<12}{'seconds':>10}{'vs off':>9}")
    for name, value in (("off", min(off)), ("cold", cold), ("warm", min(warm))):
        print(f"{name:<12}{value:>10.3f}{min(off) / value:>8.2f}x")
    print(f"{args.items} images x k={args.k}; one image encode {one_image * 1000:.1f} ms; "
          f"{entry_mb:.1f} MB cached per image")
    print(json.dumps(result))
    if args.out:
        save(args.out, result)


if __name__ == "__main__":
    main()
