"""Files shipped inside the package: the toy base model."""

from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "assets"


def base_model_dir() -> Path:
    """The shipped toy base model (`fastjudge toy-pretrain` writes a new one; see README)."""
    path = ASSETS / "toy-base"
    if not (path / "config.json").is_file():
        raise ValueError(f"toy base model: no checkpoint at {path}; build one with "
                         f"`fastjudge toy-pretrain --out runs/toy-base` and pass --model runs/toy-base/checkpoint")
    return path
