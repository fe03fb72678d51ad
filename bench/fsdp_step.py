"""One FSDP2 fine-tuning step against the same step unsharded, on a random-weight Mllama (tests/tiny.py).

    torchrun --nproc-per-node 1 bench/fsdp_step.py --device cuda --preset small --out FILE   # a GPU
    torchrun --nproc-per-node 2 bench/fsdp_step.py --device cpu --preset tiny               # 2 CPU processes

The model is sharded as `fastjudge iterate` shards it under torchrun (`Adapter.shard_for_training`: each decoder
layer and the root; the vision tower frozen and whole, or with --train all each of its layers, the rest of it
and the projector sharded too); on a GPU the step runs the fused loss (Triton) and the
Mllama cross-attention kernel (`patch_mllama`) inside the sharded layers. Every rank takes its share of the
batch (`Adapter.sft_backward`). Rank 0 reports the sharded and the unsharded loss, the gradients' and the
updated weights' largest relative difference (per tensor, norm of the difference over the reference's norm;
elementwise too, over the tensor's largest value, where Adam's first step, a division by the gradient's own
size, magnifies the last bits of tiny gradients), how many tensors the step updated, and the step's time; a
table, then one JSON line (--out: also a file).
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
    parser.add_argument("--train", default="text",
                        help="what the step updates, comma-separated modes each measured on a fresh copy: text "
                             "(the language model), all (everything, the vision tower sharded too), lora")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    modes = [mode.strip() for mode in args.train.split(",") if mode.strip()]
    if not modes or any(mode not in ("text", "all", "lora") for mode in modes):
        parser.error(f"--train: expected modes among text, all, lora, got {args.train!r}")

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

    def step(model_adapter, mode: str, shard: bool) -> tuple[float, float]:
        torch.manual_seed(0)  # the same LoRA adapters on both copies and every rank
        params = model_adapter.begin_training(mode)
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

    initial = {name: value.detach().float().cpu().clone() for name, value in adapter.model.state_dict().items()}
    results = {}
    for mode in modes:
        sharded = copy.deepcopy(adapter)  # fresh copies: a model is sharded once
        reference = copy.deepcopy(adapter)
        sharded_loss, sharded_s = step(sharded, mode, shard=True)
        sharded_grads = {name: p.grad.full_tensor().float().cpu()  # every rank takes part in the gathers
                         for name, p in sharded.model.named_parameters() if p.grad is not None}
        weights = gathered_state_dict(sharded)
        del sharded
        if rank != 0:
            continue
        plain_loss, plain_s = step(reference, mode, shard=False)
        plain = reference.model.state_dict()
        plain_grads = {name: p.grad.float().cpu() for name, p in reference.model.named_parameters()
                       if p.grad is not None}
        assert sharded_grads.keys() == plain_grads.keys(), "the two steps trained different parameters"
        # per tensor, over the tensors: the difference's norm over the reference's (gradients, updated weights),
        # and the largest elementwise difference over the tensor's largest value (weights)
        gradient_norm = max(relative_norm(sharded_grads[n], plain_grads[n]) for n in plain_grads)
        weight_norm, weight_max, updated = 0.0, 0.0, 0
        for name, value in weights.items():
            expected = plain[name].detach().float().cpu()
            weight_norm = max(weight_norm, relative_norm(value.float(), expected))
            weight_max = max(weight_max, float((value.float() - expected).abs().max()
                                               / expected.abs().max().clamp(min=1e-6)))
            updated += not torch.equal(value.float(), initial[name]) if name in initial else 1
        results[mode] = {"loss_sharded": sharded_loss, "loss_unsharded": plain_loss,
                         "max_relative_gradient_difference": gradient_norm,
                         "max_relative_weight_difference": weight_norm, "max_elementwise_weight_difference": weight_max,
                         "tensors_updated": updated, "tensors": len(weights), "step_s_sharded": sharded_s,
                         "step_s_unsharded": plain_s}
        del reference
    if rank == 0:
        print(f"{'--train':<8}{'loss sharded':>16}{'unsharded':>16}{'step s':>9}{'unsharded':>11}"
              f"{'grad |d|/|g|':>14}{'weight |d|/|w|':>16}{'elementwise':>13}{'updated':>11}")
        for mode, r in results.items():
            print(f"{mode:<8}{r['loss_sharded']:>16.8f}{r['loss_unsharded']:>16.8f}{r['step_s_sharded']:>9.3f}"
                  f"{r['step_s_unsharded']:>11.3f}{r['max_relative_gradient_difference']:>14.2e}"
                  f"{r['max_relative_weight_difference']:>16.2e}{r['max_elementwise_weight_difference']:>13.2e}"
                  f"{r['tensors_updated']:>6}/{r['tensors']:<4}")
        print(f"({size} ranks; differences: largest over the tensors, sharded against unsharded)")
        report({"bench": "fsdp_step", "preset": args.preset, "device": args.device, "ranks": size,
                "examples": args.examples, "modes": results, "activation_checkpointing": args.activation_checkpointing,
                "cross_attention_kernel": cuda}, args.out)
    dist.barrier()
    dist.destroy_process_group()


def relative_norm(value: torch.Tensor, expected: torch.Tensor) -> float:
    """||value - expected|| / ||expected|| (0 when both are zero)."""
    return float((value - expected).norm() / expected.norm().clamp(min=1e-30)) if expected.norm() > 0 \
        else float((value - expected).norm())


if __name__ == "__main__":
    main()
