"""Stage 3, train: supervised fine-tuning of the judge on the kept traces (prompt -> reasoning + verdict).

The loss covers the assistant tokens only. Training starts from the previous iteration's weights; the vision
tower is frozen by default (`TrainOptions.train == "text"`); "lora" trains LoRA adapters that are merged into the
weights afterwards, so every checkpoint is a plain one.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

from fastjudge.core.dist import World
from fastjudge.data.io import load_images
from fastjudge.models import Adapter


@dataclass(frozen=True)
class TrainOptions:
    """Fine-tuning settings (the loop's `LoopConfig.train_options()`)."""
    lr: float = 1e-5  # peak learning rate (linear warm-up over 10% of the steps, then cosine to 0)
    epochs: int = 3
    batch_size: int = 32
    micro_batches: int = 2  # forward passes per step, over examples sorted by length
    train: str = "text"  # "text": vision tower frozen; "all"; "lora": LoRA adapters (peft), merged after training
    lora_rank: int = 16
    lora_alpha: float = 32.0
    cpu_offload: bool = False  # sharded (torchrun) only: parameters, gradients and optimizer state in CPU memory
    activation_checkpointing: bool = False  # sharded only: decoder layers' activations recomputed in backward


class MasterWeights:
    """float32 copies of low-precision trainable parameters for the optimizer to update.

    A bf16 weight cannot take a 1e-5 step: updates smaller than its rounding step (about 1/256 of its size) are
    lost (measured: after 100 AdamW steps at lr 1e-5, 85% of bf16 weights of size 0.02 had not changed, against
    none in float32). The optimizer steps the float32 copies; the model's weights are rounded from them.
    """

    def __init__(self, params: list[torch.nn.Parameter]):
        self.model_params = params
        self.master = [p.detach().float().clone().requires_grad_(True) if p.dtype != torch.float32 else p
                       for p in params]

    def grads_to_master(self) -> None:
        for p, m in zip(self.model_params, self.master):
            if m is not p:
                m.grad = None if p.grad is None else p.grad.float()
                p.grad = None

    @torch.no_grad()
    def master_to_model(self) -> None:
        for p, m in zip(self.model_params, self.master):
            if m is not p:
                p.copy_(m)


def can_shard(adapter: Adapter, options: TrainOptions) -> bool:
    """Whether this fine-tuning can run sharded over a job's ranks (FSDP2: Mllama, vision tower frozen)."""
    return options.train in ("text", "lora") and getattr(adapter.model.config, "model_type", None) == "mllama"


def run(adapter: Adapter, traces: list[dict], options: TrainOptions, seed: int,
        job: World = World()) -> dict:
    """Fine-tune `adapter.model` in place on `traces`; returns {"steps", "examples", "loss_first", "loss_last"}.

    In a torchrun job (`job.size` > 1; every rank calls this with the same traces) the model is sharded with
    FSDP2 (`Adapter.shard_for_training`) and each rank takes its share of every batch; the losses are the whole
    batch's. The model stays sharded afterwards: `gathered_state_dict` collects its weights."""
    if not traces:
        return {"steps": 0, "examples": 0, "loss_first": None, "loss_last": None, "seconds": 0.0}
    rng = random.Random(seed)
    params = adapter.begin_training(options.train, lora_rank=options.lora_rank, lora_alpha=options.lora_alpha)
    if job.size > 1:
        adapter.shard_for_training((job.rank, job.size), cpu_offload=options.cpu_offload,
                                   activation_checkpointing=options.activation_checkpointing)
        params = [p for p in adapter.model.parameters() if p.requires_grad]  # the sharded ones
    try:
        weights = MasterWeights(params)
        opt = torch.optim.AdamW(weights.master, lr=options.lr, weight_decay=0.0, betas=(0.9, 0.98))
        images = dict(zip([t["image"] for t in traces], load_images([t["image"] for t in traces])))
        batches_per_epoch = (len(traces) + options.batch_size - 1) // options.batch_size
        total = batches_per_epoch * options.epochs
        warmup = max(1, total // 10)
        adapter.model.train()
        losses, step, t0 = [], 0, time.time()
        with tqdm(total=total, desc="train", unit="step", disable=not job.main) as bar:
            for _ in range(options.epochs):
                order = list(range(len(traces)))
                rng.shuffle(order)
                for start in range(0, len(order), options.batch_size):
                    batch = [traces[i] for i in order[start:start + options.batch_size]]
                    for group in opt.param_groups:
                        group["lr"] = cosine_lr(step, total, options.lr, warmup)
                    opt.zero_grad(set_to_none=True)
                    loss = adapter.sft_backward([images[t["image"]] for t in batch], [t["prompt"] for t in batch],
                                                [t["target"] for t in batch], micro_batches=options.micro_batches)
                    weights.grads_to_master()
                    torch.nn.utils.clip_grad_norm_(weights.master, 1.0)
                    opt.step()
                    weights.master_to_model()
                    losses.append(loss)
                    step += 1
                    bar.update(1)
                    bar.set_postfix(loss=f"{losses[-1]:.3f}")
    finally:  # also on an error: merge LoRA back, freeze, eval mode
        adapter.end_training()
    return {"steps": step, "examples": len(traces), "loss_first": losses[0], "loss_last": losses[-1],
            "seconds": time.time() - t0}


def gathered_state_dict(adapter: Adapter) -> dict[str, torch.Tensor]:
    """The full weights of a model sharded for training, on rank 0 (in CPU memory); every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(adapter.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def cosine_lr(step: int, total: int, peak: float, warmup: int) -> float:
    """Learning rate at `step`: linear warm-up over `warmup` steps to `peak`, then cosine decay to 0."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
