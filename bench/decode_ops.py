"""Operators dispatched per decoding step: our shared Mllama decoder against transformers' `generate`, on the
Llama-3.2-11B-Vision layer structure (40 text layers, 8 of them cross-attention, 32/8 heads) at tiny widths.

    python bench/decode_ops.py [--n 16] [--prompts 4] [--new-tokens 8] [--out FILE]

On a GPU a decoding step of a small batch is bound by kernel launches and Python, not by arithmetic (see the
H200 sampler figures in docs/performance.md): each operator that computes (views and reshapes excluded) launches
at least one kernel. This counts them on the CPU, where the count is the same as on a GPU (the same Python code runs;
the kernel path of the cross layers, GPU-only, is not counted here). The count per step is the total of a run
with --new-tokens steps minus one with a single step, divided by the difference; prefill and set-up cancel.
Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # tiny.py: the models we build
import tiny  # noqa: E402
from _env import report  # noqa: E402

# operators that only make a view or read metadata: no kernel
VIEWS = {"view", "_unsafe_view", "expand", "transpose", "t", "slice", "select", "unsqueeze", "squeeze", "permute",
         "as_strided", "alias", "detach", "reshape", "unbind", "split", "split_with_sizes", "chunk", "narrow",
         "lift_fresh", "_reshape_alias", "sym_size", "sym_stride", "sym_numel", "is_same_size", "view_as_real",
         "_to_copy_noop", "unfold", "diagonal", "movedim", "flatten", "unflatten"}


class CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name not in VIEWS:
            self.counts[name] += 1
        return func(*args, **(kwargs or {}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    adapter = tiny.build_mllama_adapter("narrow-11b")
    adapter.feature_cache = None
    adapter.eos_ids = set()  # exactly --new-tokens steps
    rs = np.random.RandomState(0)
    images = [Image.fromarray(rs.randint(0, 256, (56, 56, 3), dtype=np.uint8)) for _ in range(args.prompts)]
    prompts = [f"prompt {i} about the picture" for i in range(args.prompts)]
    features = adapter.image_features(images)
    rows = [adapter.prompt_ids(p, f) for p, f in zip(prompts, features)]
    inputs = adapter.model_inputs(rows, features, left=True)
    pixels = adapter._pixel_inputs(images)
    sampling = dict(temperature=0.6, top_k=50, top_p=0.9)

    def ours(steps):
        adapter.generate(images, prompts, n=args.n, max_new_tokens=steps, batch_rows=args.prompts * args.n,
                         **sampling)

    @torch.no_grad()
    def theirs(steps):
        adapter.model.generate(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                               cross_attention_mask=inputs["cross_attention_mask"], **pixels, do_sample=True,
                               num_return_sequences=args.n, max_new_tokens=steps, min_new_tokens=steps,
                               eos_token_id=None, pad_token_id=adapter.pad_id, **sampling)

    result = {}
    for name, fn in (("ours", ours), ("transformers", theirs)):
        totals = []
        for steps in (1, args.new_tokens):
            with CountOps() as counter:
                fn(steps)
            totals.append(counter.counts)
        per_step = {op: (totals[1][op] - totals[0][op]) / (args.new_tokens - 1) for op in totals[1]}
        result[name] = {"ops_per_step": sum(per_step.values()),
                        "top": dict(sorted(per_step.items(), key=lambda kv: -kv[1])[:12])}
    print(f"11B text structure (40 layers, 8 cross), {args.prompts} prompts x n {args.n}, operators per decoding step "
          f"(views excluded)")
    for name, r in result.items():
        top = ", ".join(f"{op} {count:.0f}" for op, count in list(r["top"].items())[:8])
        print(f"{name:>13}: {r['ops_per_step']:7.0f}   ({top})")
    report({"bench": "decode_ops", "n": args.n, "prompts": args.prompts, **result}, args.out)


if __name__ == "__main__":
    main()
