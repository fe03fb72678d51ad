"""More than one process: the run's place in a `torchrun` job (torch.distributed), and nothing else.

`torchrun --nproc-per-node N [--nnodes M --rdzv-backend c10d --rdzv-endpoint HOST:PORT] -m fastjudge ...` starts
N (x M) processes with RANK, WORLD_SIZE, LOCAL_RANK and the rendezvous in their environment; `start()` joins
them into one process group (NCCL on GPUs, gloo on CPUs) with a collective timeout, so that a rank that dies or
hangs takes the job down with a clear error rather than a hang. One process (no torchrun) is world size 1:
nothing is started and every function here is a no-op. `torchrun --nproc-per-node 1` is a job of one rank: its
process group is started, so that fine-tuning is sharded (FSDP2, with its CPU offload and activation
checkpointing) as in a job of several.

How the work is split is the caller's: the stages hand each rank every `size`-th generation batch
(`Adapter.generate(shard=...)`), whose random draws are keyed by the batch's place in the whole list, never by
the rank, so that any number of processes writes the same files as one.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    """This process's place in the job: rank in [0, size)."""
    rank: int = 0
    size: int = 1
    launched: bool = False  # a torchrun job (a process group exists), one rank or more

    @property
    def main(self) -> bool:
        """Whether this is the process that writes the run's shared files (rank 0)."""
        return self.rank == 0

    @property
    def shard(self) -> tuple[int, int] | None:
        """(rank, size) for `Adapter.generate(shard=...)`; None for one process."""
        return (self.rank, self.size) if self.size > 1 else None


def current() -> World:
    """The job this process belongs to (world size 1 without a process group)."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size(), launched=True)
    return World()


def start(timeout_s: float = 1800.0, device: str = "cpu") -> World:
    """Join the `torchrun` job named by the environment, once (one rank or more); world size 1 without torchrun.
    A collective that waits longer than `timeout_s` raises (a dead or stuck rank)."""
    launched = "TORCHELASTIC_RUN_ID" in os.environ and "MASTER_ADDR" in os.environ  # set by torchrun
    if not (launched or int(os.environ.get("WORLD_SIZE", "1")) > 1) or not dist.is_available():
        return current()
    if not dist.is_initialized():
        if os.environ.get("MASTER_PORT") == "0":  # the workers would wait for ever on a store they cannot find
            raise ValueError("torchrun --master-port 0: the workers are given port 0, not the port the job's store "
                             "took; give a free port, or use torchrun --standalone")
        backend = "nccl" if str(device).startswith("cuda") else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    return current()


@contextlib.contextmanager
def main_first(world: World):
    """In a job of several ranks, rank 0 runs the block first and the others after it (rank 0 writes files the
    others then read); alone, just the block."""
    if not world.main:
        barrier()
    yield
    if world.main:
        barrier()


def barrier() -> None:
    """Wait for every rank (a no-op for one process)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def stop() -> None:
    """Leave the process group, if any."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
