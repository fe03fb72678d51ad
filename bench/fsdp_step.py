"""One FSDP2 fine-tuning step against the same step unsharded, on a random-weight Mllama (tests/tiny.py).

    torchrun --nproc-per-node 1 bench/fsdp_step.py --device cuda --preset small --out FILE   # a GPU
    torchrun --nproc-per-node 2 bench/fsdp_step.py --device cpu --preset tiny               # 2 CPU processes

The model is sharded as `fastjudge iterate` shards it under torchrun (`Adapter.shard_for_training`: each decoder
layer and the root, the vision tower frozen and whole); on a GPU the step runs the fused loss (Triton) and the
Mllama cross-attention kernel (`patch_mllama`) inside the sharded layers. Every rank takes its share of the
batch (`Adapter.sft_backward`). Rank 0 reports the sharded and the unsharded loss, the largest relative
difference of the updated weights, and the step's time; a table, then one JSON line (--out: also a file).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # tiny.py: the models we build
import tiny  # noqa: E402
from _env import report  # noqa: E402

from fastjudge.stages.train import gathered_state_dict  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=["tiny", "small"], default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--examples", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    cuda = args.device.startswith("cuda")
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, size = dist.get_rank(), dist.get_world_size()
    device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu"
    if cuda:
        torch.cuda.set_device(device)
    folder = Path("/tmp/fastjudge-fsdp-tiny")
    if args.preset == "tiny" and rank == 0:
        tiny.build_checkpoint("mllama", folder)  # written once, then read by every rank
    dist.barrier()
    if args.preset == "tiny":
        from fastjudge.models import load_adapter
        adapter = load_adapter(str(folder), device=device, dtype=torch.float32)
    else:  # the same random weights on every rank (seeded)
        adapter = tiny.build_mllama_adapter(args.preset, device, torch.float32)
    rs = np.random.RandomState(0)
    side = {"tiny": 56, "small": 448}[args.preset]
    images = [Image.fromarray(rs.randint(0, 256, (side, side, 3), dtype=np.uint8)) for _ in range(args.examples)]
    prompts = [f"question {i} about the picture: which answer is better" for i in range(args.examples)]
    targets = [" ".join(["answer", str(i)] * (2 + i % 3)) for i in range(args.examples)]

    def step(model_adapter, shard: bool) -> tuple[float, float]:
        params = model_adapter.begin_training("text")
        if shard:
            model_adapter.shard_for_training((rank, size), activation_checkpointing=args.activation_checkpointing)
            params = [p for p in model_adapter.model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=args.lr)
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        loss = model_adapter.sft_backward(images, prompts, targets, micro_batches=2)
        optimizer.step()
        if cuda:
            torch.cuda.synchronize()
        return loss, time.perf_counter() - start

    reference = copy.deepcopy(adapter)
    sharded_loss, sharded_s = step(adapter, shard=True)
    weights = gathered_state_dict(adapter)
    if rank == 0:
        plain_loss, plain_s = step(reference, shard=False)
        plain = reference.model.state_dict()
        worst, changed = 0.0, 0
        for name, value in weights.items():
            expected = plain[name].detach().float().cpu()
            scale = expected.abs().max().clamp(min=1e-6)
            worst = max(worst, float((value.float() - expected).abs().max() / scale))
            changed += not torch.equal(value.float(), expected)
        print(f"{'':<12}{'loss':>14}{'step s':>10}")
        print(f"{'sharded':<12}{sharded_loss:>14.8f}{sharded_s:>10.3f}   ({size} ranks)")
        print(f"{'unsharded':<12}{plain_loss:>14.8f}{plain_s:>10.3f}")
        print(f"largest relative weight difference after the step: {worst:.2e}")
        report({"bench": "fsdp_step", "preset": args.preset, "device": args.device, "ranks": size,
                "examples": args.examples, "loss_sharded": sharded_loss, "loss_unsharded": plain_loss,
                "max_relative_weight_difference": worst, "step_s_sharded": sharded_s, "step_s_unsharded": plain_s,
                "weights_changed": changed, "activation_checkpointing": args.activation_checkpointing, "cross_attention_kernel": cuda}, args.out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
