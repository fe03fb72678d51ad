"""Training curves where people look for them: with `--log-to tensorboard`, DIR/tensorboard/ holds TensorBoard
event files of the run (`tensorboard --logdir DIR/tensorboard`): the fine-tuning loss at every step (steps counted
across iterations) and, per iteration, the benchmark accuracy (overall and per category), the pairs made and kept,
and the rates measured against the toy world's scenes. The files are written anew from summary.json whenever it
changes, so that a resumed run's curves hold each point once. TensorBoard is an optional dependency
(`pip install 'fastjudge[tensorboard]'`)."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

LOG_TO = (None, "tensorboard")


def check_available() -> None:
    """A ValueError before any work when TensorBoard is asked for but not installed."""
    if importlib.util.find_spec("tensorboard") is None:
        raise ValueError("log_to: 'tensorboard' needs the tensorboard package (pip install 'fastjudge[tensorboard]')")


def write_curves(folder: Path, summary: dict) -> None:
    """Write the run's curves (module docstring) from `summary` (summary.json's content) into `folder`."""
    check_available()  # torch's writer needs the tensorboard package
    from torch.utils.tensorboard import SummaryWriter
    shutil.rmtree(folder, ignore_errors=True)  # our own files, written anew: each point once
    writer = SummaryWriter(str(folder))
    step = 0
    for entry in summary["iterations"]:
        k = entry["iteration"]
        for loss in (entry.get("stats") or {}).get("train", {}).get("losses", []):
            step += 1
            writer.add_scalar("train/loss", loss, step)
        metrics = entry["metrics"]
        if metrics["overall"] is not None:
            writer.add_scalar("accuracy/overall", metrics["overall"], k)
        for name, value in metrics["categories"].items():
            if value is not None:
                writer.add_scalar(f"accuracy/{name}", value, k)
        if k > 0:
            writer.add_scalar("pairs/made", entry["pairs"], k)
            writer.add_scalar("pairs/kept", entry["kept"], k)
            if entry["keep_rate"] is not None:
                writer.add_scalar("pairs/keep_rate", entry["keep_rate"], k)
        rates = entry.get("rates") or {}
        for name in ("own_answer_right", "reasoning_right", "verdict_follows_reasoning", "verdict_agrees_label"):
            if rates.get(name) is not None:
                writer.add_scalar(f"rates/{name}", rates[name], k)
        for source, value in (rates.get("labels_right") or {}).items():
            if value is not None:
                writer.add_scalar(f"rates/labels_right_{source}", value, k)
    writer.close()
