"""What every `fastjudge` command shares: flags made from LoopConfig's fields (their help and defaults are the
fields' own: `config.option`), the configuration a command line gives, the torchrun job, and model loading."""

from __future__ import annotations

import argparse
import contextlib
import sys
from dataclasses import MISSING, fields
from pathlib import Path

from fastjudge.config import LoopConfig
from fastjudge.data.runs import OwnedOutputs, open_run_folder


def add_config_flags(parser: argparse.ArgumentParser, names: list[str] | None = None,
                     aliases: dict[str, str] | None = None) -> None:
    """One flag per LoopConfig field (those in `names`; None: all), with the field's help and default."""
    for f in fields(LoopConfig):
        if names is not None and f.name not in names:
            continue
        flag = (aliases or {}).get(f.name, "--" + f.name.replace("_", "-"))
        default = f.default if f.default is not MISSING else None
        helptext = f.metadata["help"]
        # a flag not given leaves no attribute (SUPPRESS): LoopConfig's default applies, and --resume can tell
        # the flags given from the ones left out
        if f.type in ("bool", bool):  # on by default: --flag / --no-flag
            action = argparse.BooleanOptionalAction if default else "store_true"
            parser.add_argument(flag, action=action, default=argparse.SUPPRESS,
                                help=helptext + (" (default: on)" if default else ""))
            continue
        kind = {"int": int, "float": float, "int | None": int, "float | None": float}.get(str(f.type), str)
        if "(default:" not in helptext:
            helptext += f" (default: {default})"
        parser.add_argument(flag, dest=f.name, type=kind, default=argparse.SUPPRESS, help=helptext)


def add_overwrite_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--overwrite", action="store_true",
                        help="replace outputs in --out that this command did not write (another command's, or your "
                             "own files); by default they are refused")


def given(args: argparse.Namespace) -> set[str]:
    """The LoopConfig fields the command line set."""
    return {f.name for f in fields(LoopConfig) if hasattr(args, f.name)}


def config(args: argparse.Namespace, **overrides) -> LoopConfig:
    values = {name: getattr(args, name) for name in given(args)}
    values.update(overrides)
    return LoopConfig(**values)


def job(cfg: LoopConfig):
    """This process's place in a torchrun job (world size 1 without one)."""
    from fastjudge.core import dist
    return dist.start(cfg.dist_timeout_s, cfg.device)


def load(path: str | None, cfg: LoopConfig, world=None):
    from fastjudge.models import FeatureCache, load_adapter
    adapter = load_adapter(path, device=cfg.device, dtype=cfg.dtype,
                           feature_cache=FeatureCache(max_bytes=int(cfg.feature_cache_gb * 2**30)))
    adapter.shard = world.shard if world is not None else None  # under torchrun: generation split between ranks
    return adapter


@contextlib.contextmanager
def owned(folder: Path | str, command: str, names: list[str], overwrite: bool, main: bool = True,
          flag: str = "--out"):
    """The output folder, created and checked (`open_run_folder`), held and owned by this command for the
    block (`data.runs.OwnedOutputs`). In a torchrun job rank 0 holds it for all, and the others enter the block
    only once it does."""
    open_run_folder(folder, flag)
    with OwnedOutputs(folder, command, names, overwrite, flag) if main else contextlib.nullcontext():
        if "torch.distributed" in sys.modules:  # a job may have started: no rank writes before rank 0 holds it
            from fastjudge.core import dist
            dist.barrier()
        yield


def skipped_name(command: str) -> str:
    """The counted-skips file of a single-stage command (commands may share a folder)."""
    return f"skipped-{command}.jsonl"
