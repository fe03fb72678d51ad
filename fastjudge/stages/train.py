"""Stage 3, train: supervised fine-tuning of the judge on the kept traces (prompt -> reasoning + verdict).

The loss covers the assistant tokens only. Training starts from the previous iteration's weights; the vision
tower is frozen by default (`TrainOptions.train == "text"`); "lora" trains LoRA adapters that are merged into the
weights afterwards, so every checkpoint is a plain one.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from fastjudge.core import dist
from fastjudge.core.dist import World
from fastjudge.data import prompts
from fastjudge.data.images import load_images
from fastjudge.data.io import write_json
from fastjudge.data.runs import check_checkpoint_out
from fastjudge.models import Adapter


@dataclass(frozen=True)
class TrainOptions:
    """Fine-tuning settings (the loop's `LoopConfig.train_options()`)."""
    lr: float = 1e-5  # peak learning rate (linear warm-up over 10% of the steps, then cosine to 0)
    epochs: int = 3
    batch_size: int = 32
    micro_batches: int = 2  # forward passes per step, over examples sorted by length (or over packed rows)
    pack: bool = True  # several examples to a row, each seeing only itself (`Adapter.sft_backward(pack=True)`)
    train: str = "text"  # "text": vision tower frozen; "all"; "lora": LoRA adapters (peft), merged after training
    lora_rank: int = 16
    lora_alpha: float = 32.0
    cpu_offload: bool = False  # sharded (torchrun) only: parameters, gradients and optimizer state in CPU memory
    activation_checkpointing: bool = False  # sharded only: decoder layers' activations recomputed in backward
    state_every: int = 100  # sharded only: steps between two saves of the mid-run state (0: none)
    # what the loss covers: "trace", the reasoning and the verdict; "verdict", the verdict alone, the reasoning
    # read as a given start of the answer (the judge's own greedy reasoning, which training on it can only wear
    # down: see `verdict_split`); "checks", the toy judge's checks and verdict, its own answer given (a sampled
    # own answer is wrong on some kept traces: `checks_split`)
    loss_on: str = "trace"

    def __post_init__(self):
        if self.loss_on not in LOSS_ON:
            raise ValueError(f"loss_on: expected one of {LOSS_ON}, got {self.loss_on!r}")


LOSS_ON = ("trace", "verdict", "checks")


def verdict_split(target: str) -> tuple[str, str]:
    """(given, trained) of a judge trace when only its verdict is trained: the reasoning up to and including
    the verdict's opening "[[", then the rest. A trace without a verdict is trained whole (given "")."""
    return prompts.split_at_verdict(target) or ("", target)


def checks_split(target: str) -> tuple[str, str]:
    """(given, trained) of a judge trace when its own answer is not trained: the toy judge's own answer, then
    its checks and verdict. A trace in another form (the natural style's free reasoning) is trained whole."""
    return prompts.split_at_checks(target) or ("", target)


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
    """Whether this fine-tuning can run sharded over a job's ranks (FSDP2: Mllama and the toy, every mode)."""
    return getattr(adapter.model.config, "model_type", None) == "mllama"


def run(adapter: Adapter, traces: list[dict], options: TrainOptions, seed: int,
        job: World = World(), state_dir: Path | None = None) -> dict:
    """Fine-tune `adapter.model` in place on `traces`; returns {"steps", "examples", "loss_first", "loss_last",
    "losses" (one a step)}.

    In a torchrun job (`job.launched`, one rank or more; every rank calls this with the same traces) the model
    is sharded with
    FSDP2 (`Adapter.shard_for_training`) and each rank takes its share of every batch; the losses are the whole
    batch's. The model stays sharded afterwards: `gathered_state_dict` collects its weights. With `state_dir`,
    the sharded model, the optimizer and the step reached are saved there every `options.state_every` steps
    (torch.distributed.checkpoint, each rank its shards); a job killed mid-stage resumes from the last save,
    skipping the steps it had taken."""
    if not traces:
        return {"steps": 0, "examples": 0, "loss_first": None, "loss_last": None, "losses": [], "seconds": 0.0}
    rng = random.Random(seed)
    # what the run's result depends on: a saved state made from other inputs is never resumed from
    inputs_key = _inputs_key(adapter, traces, options, seed, job.size) if job.launched and state_dir else None
    # LoRA's initial adapters are drawn from torch's generator: seeded here, every rank of a job and a resumed
    # run draw the same ones
    torch.manual_seed(seed)
    params = adapter.begin_training(options.train, lora_rank=options.lora_rank, lora_alpha=options.lora_alpha)
    if job.launched:
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
        # each trace as (given answer start, trained target): the reasoning given with loss_on="verdict", the own
        # answer with "checks"
        split = {"verdict": verdict_split, "checks": checks_split}.get(options.loss_on, lambda target: ("", target))
        losses, step, t0 = [], 0, time.time()
        state = _TrainState(state_dir, options.state_every, inputs_key) if inputs_key is not None else None
        resumed = state.load(adapter.model, opt, job) if state is not None else None
        if resumed is not None:
            losses = resumed["losses"]
        with tqdm(total=total, desc="train", unit="step", disable=not job.main) as bar:
            for _ in range(options.epochs):
                order = list(range(len(traces)))
                rng.shuffle(order)  # drawn for every epoch, resumed or not: the data order stays the same
                for start in range(0, len(order), options.batch_size):
                    if resumed is not None and step < resumed["step"]:  # taken before the save
                        step += 1
                        bar.update(1)
                        continue
                    batch = [traces[i] for i in order[start:start + options.batch_size]]
                    for group in opt.param_groups:
                        group["lr"] = cosine_lr(step, total, options.lr, warmup)
                    opt.zero_grad(set_to_none=True)
                    given, targets = zip(*(split(t["target"]) for t in batch))
                    loss = adapter.sft_backward([images[t["image"]] for t in batch], [t["prompt"] for t in batch],
                                                list(targets), micro_batches=options.micro_batches,
                                                pack=options.pack, given=list(given))
                    weights.grads_to_master()
                    torch.nn.utils.clip_grad_norm_(weights.master, 1.0)
                    opt.step()
                    weights.master_to_model()
                    losses.append(loss)
                    step += 1
                    bar.update(1)
                    bar.set_postfix(loss=f"{losses[-1]:.3f}")
                    if state is not None and step % state.every == 0 and step < total:
                        state.save(adapter.model, opt, step, losses, job)
    finally:  # also on an error: merge LoRA back, freeze, eval mode
        adapter.end_training()
    return {"steps": step, "examples": len(traces), "loss_first": losses[0], "loss_last": losses[-1], "losses": losses,
            "seconds": time.time() - t0}


def _inputs_key(adapter: Adapter, traces: list[dict], options: TrainOptions, seed: int, ranks: int) -> str:
    """sha256 over what decides a fine-tuning run: the starting weights, the traces, the settings (how often
    the state is saved aside), the seed and the number of ranks."""
    settings = {k: v for k, v in asdict(options).items() if k != "state_every"}
    h = hashlib.sha256(json.dumps({"weights": adapter.weights_digest(), "settings": settings, "seed": seed,
                                   "ranks": ranks}, sort_keys=True).encode())
    for trace in traces:
        h.update(json.dumps(trace, sort_keys=True).encode() + b"\n")
    return h.hexdigest()


class _TrainState:
    """The mid-run state of sharded fine-tuning under `folder`: `state-<step>/` (torch.distributed.checkpoint:
    the model's and the optimizer's shards, each rank its own) and `state.json`, which names the last complete
    one, the losses so far and the key of the run's inputs (`_inputs_key`); written by rank 0 after every rank
    has saved, so that a save cut short is never the one resumed from. A state saved by a run with other
    inputs (another judge, other traces or settings) is removed, not resumed from."""

    def __init__(self, folder: Path, every: int, inputs_key: str):
        self.folder, self.every, self.inputs_key = Path(folder), max(0, every) or (1 << 62), inputs_key

    def save(self, model, optimizer, step: int, losses: list[float], job: World) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict
        model_state, optimizer_state = get_state_dict(model, optimizer)
        dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(self.folder / f"state-{step}"))
        dist.barrier()
        if job.main:
            previous = self._last()
            write_json(self.folder / "state.json", {"step": step, "losses": losses, "inputs": self.inputs_key})
            if previous is not None:
                shutil.rmtree(self.folder / f"state-{previous['step']}", ignore_errors=True)

    def load(self, model, optimizer, job: World) -> dict | None:
        """Restore the last complete save into the model and optimizer; None when there is none, or when it was
        made from other inputs (then it is removed). Every rank must call it."""
        last = self._last()
        # every rank resumes or none does (each has read state.json before rank 0 may remove it)
        same_inputs: list = [None] * job.size
        torch.distributed.all_gather_object(same_inputs, last is not None and last.get("inputs") == self.inputs_key)
        if not all(same_inputs):
            if last is not None and job.main:
                print(f"{self.folder}: a saved fine-tuning state from other inputs (judge, traces or settings); "
                      f"removed, training from the start")
                shutil.rmtree(self.folder, ignore_errors=True)
            return None
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
        model_state, optimizer_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optimizer": optimizer_state}
        dcp.load(state, checkpoint_id=str(self.folder / f"state-{last['step']}"))
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
        return last

    def _last(self) -> dict | None:
        path = self.folder / "state.json"
        return json.loads(path.read_text()) if path.exists() else None


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


def save_checkpoint(adapter: Adapter, folder: Path) -> None:
    """Write a checkpoint folder atomically; an existing folder is replaced only if it is a checkpoint and nothing
    else (`check_checkpoint_out`): any other folder is left as it was."""
    folder = Path(folder)
    check_checkpoint_out(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        adapter.save(tmp)
    except BaseException:  # a full disk, Ctrl-C: the old checkpoint stays, and no half-written copy beside it
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)




def run_to(checkpoint: Path, judge: Adapter, traces: list[dict], options: TrainOptions, seed: int,
           world: World, reload: Callable[[Path | str | None], Adapter], source: Path | str | None,
           on_done: Callable[[dict], None] | None = None, state_dir: Path | None = None,
           go_on: bool = True) -> Adapter | None:
    """Fine-tune `judge` on `traces` and save it as a plain checkpoint at `checkpoint`; returns the judge to go
    on with. In a job whose model can be sharded (`can_shard`), every rank trains its shard (FSDP2,
    mid-run state under `state_dir`); rank 0 writes the gathered weights into a fresh copy of the judge's
    `source` (`reload`) and saves that; every rank then loads the checkpoint (a sharded model cannot generate
    on batches that differ between the ranks). Otherwise fine-tuning runs on rank 0 alone and the other ranks
    load its checkpoint. `on_done(stats)` runs on rank 0 before the checkpoint is written (the stage's record).
    With `go_on` False nothing is loaded afterwards and None is returned (the caller is done with the judge); the
    ranks other than 0 then return at once when fine-tuning is not sharded."""
    sharded = world.launched and can_shard(judge, options) and bool(traces)
    if sharded:
        stats = run(judge, traces, options, seed, world, state_dir=state_dir)
        weights = gathered_state_dict(judge)
        if world.main:
            fresh = reload(source)
            if options.train == "lora":  # the same adapters on the fresh copy, loaded, then merged
                fresh.begin_training("lora", lora_rank=options.lora_rank, lora_alpha=options.lora_alpha)
            fresh.model.load_state_dict(weights)
            fresh.end_training()
            if on_done is not None:
                on_done(dict(stats, sharded_ranks=world.size))
            save_checkpoint(fresh, checkpoint)
            if state_dir is not None:
                shutil.rmtree(state_dir, ignore_errors=True)  # the mid-run state, now done with
    elif world.main:
        stats = run(judge, traces, options, seed)
        if on_done is not None:
            on_done(stats)
        save_checkpoint(judge, checkpoint)
    if not go_on and not sharded:
        # the other ranks are done: none waits for rank 0's training, which can outlast a collective's timeout
        return None
    dist.barrier()
    if not go_on:
        return None
    if world.launched and (not world.main or judge._sharded):
        judge = reload(checkpoint)
    return judge
