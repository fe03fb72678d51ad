"""A toy run killed (SIGKILL) at seeded points in every stage and resumed writes exactly what an uninterrupted run
writes: every output file compared, byte for byte where the run is deterministic (verdict probabilities to
1e-6)."""

from __future__ import annotations

import hashlib
import json
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fastjudge import loop
from fastjudge.config import LoopConfig

# the toy preset with the shipped base (the judge keeps pairs, so fine-tuning takes steps), two short iterations
SETTINGS = dict(iterations=2, prompts_per_iteration=8, n_samples=4, min_votes=2, answer_tokens=40, judge_tokens=80,
                epochs=1, batch_size=4, min_gain=-1.0, batch_rows=8, toy_bench_per_category=2)
KILLS = 12

# Runs the loop in a child process and counts "events", the places a run can be cut: every atomic rename (each
# file the run finishes), every optimizer step, every batch of image features (each generation batch of every
# stage). With KILL_AT = k the child SIGKILLs itself at the k-th event, as a crash would: no clean-up at all.
CHILD = textwrap.dedent("""
    import json, os, signal, sys
    import torch
    torch.set_num_threads(2)
    from fastjudge import loop
    from fastjudge.config import LoopConfig
    from fastjudge.models.adapter import Adapter
    cfg, kill_at = LoopConfig(**json.loads(sys.argv[1])), int(sys.argv[2])
    events = [0]

    def counted(function):
        def wrapper(*args, **kwargs):
            events[0] += 1
            if events[0] == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return function(*args, **kwargs)
        return wrapper
    os.replace, os.rename = counted(os.replace), counted(os.rename)
    torch.optim.AdamW.step = counted(torch.optim.AdamW.step)
    Adapter.image_features = counted(Adapter.image_features)
    loop.run(cfg)
    print(json.dumps({"events": events[0]}))
""")


def _child(cfg: LoopConfig, kill_at: int) -> subprocess.CompletedProcess:
    config = {k: v for k, v in vars(cfg).items()}
    return subprocess.run([sys.executable, "-c", CHILD, json.dumps(config), str(kill_at)], capture_output=True,
                          text=True, timeout=600)


def _outputs(out: Path) -> dict[str, str]:
    """Every file of a finished run by its path in the run, as a digest or, for JSON records, the record (compared
    by `_same`); what records time is compared without
    its seconds and cache counts, the plot and report.html, which embeds it, not at all (matplotlib stamps it), the
    lock file not at all."""
    files = {}
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        name = str(path.relative_to(out))
        if name in (".fastjudge.lock", "accuracy.png", "report.html"):
            continue
        if path.name in ("summary.json", "stages.json", "config.json"):
            record = json.loads(path.read_text())
            record.pop("resume", None)
            record.pop("out", None)  # each run's own folder
            text = _without_seconds(record)
        elif path.name in ("outputs.jsonl", "predictions.jsonl", "metrics.json"):
            # the judgments' texts and verdicts exactly; their verdict probabilities (p_first, and the calibration
            # made of them) to 1e-6: a resumed eval reads them from a model it loaded, and they have differed
            # from the uninterrupted run's in the seventh decimal (float rounding), never in a verdict
            lines = path.read_text().splitlines() if path.suffix == ".jsonl" else [path.read_text()]
            text = [json.loads(line) for line in lines if line.strip()]
        else:
            text = hashlib.sha256(path.read_bytes()).hexdigest()
        files[name] = text
    return files


def _same(a, b) -> bool:
    """Two records equal, every float of them to 1e-6 (a tolerance, not a rounding: two values a rounding
    boundary apart differ by less than 1e-6 but round apart)."""
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, (int, float)) and isinstance(b, (int, float)) and abs(a - b) <= 1e-6
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _without_seconds(value):
    """A record without what depends on the process rather than the run: times, peak memory, and the feature
    cache's hit counts (a resumed process starts with a cold cache)."""
    if isinstance(value, dict):
        return {k: _without_seconds(v) for k, v in value.items()
                if k not in ("seconds", "feature_cache_so_far", "peak_mb")}
    if isinstance(value, list):
        return [_without_seconds(v) for v in value]
    return value


def test_killed_anywhere_and_resumed_equals_uninterrupted(tmp_path):
    reference = LoopConfig(out=str(tmp_path / "reference"), **SETTINGS)
    done = _child(reference, kill_at=0)
    assert done.returncode == 0, done.stderr[-3000:]
    events = json.loads(done.stdout.strip().splitlines()[-1])["events"]
    expected = _outputs(Path(reference.out))
    assert any(name.endswith("model.safetensors") for name in expected) and events > 3 * KILLS
    trained = json.loads((Path(reference.out) / "iter_1" / "stages.json").read_text())["stats"]["train"]
    assert trained["steps"] > 0  # the kill points include optimizer steps
    # one kill point in each of KILLS equal spans of the run's events: input preparation, the base's eval, then
    # synth, filter, train (steps and the checkpoint) and eval of both iterations all get one or more
    rng = random.Random(20251205)
    span = events / KILLS
    points = [int(i * span) + 1 + rng.randrange(max(1, int(span))) for i in range(KILLS)]
    for point in points:
        cfg = LoopConfig(**(vars(reference) | {"out": str(tmp_path / f"killed-{point}")}))
        killed = _child(cfg, kill_at=point)
        assert killed.returncode == -9, f"kill point {point}: {killed.stderr[-2000:]}"
        out = Path(cfg.out)
        if (out / "config.json").exists():  # resumed in this process; the dead child's lock is taken over
            with pytest.warns(UserWarning, match="taking over the lock"):
                loop.run(LoopConfig(**(vars(cfg) | {"resume": True})))
        else:  # killed before the run wrote anything of its own: a fresh start
            loop.run(cfg)
        assert not list(out.rglob("*.tmp")), f"kill point {point}: a temporary file was left behind"
        got = _outputs(out)
        assert got.keys() == expected.keys(), f"kill point {point}: {sorted(got.keys() ^ expected.keys())}"
        differ = [name for name in expected if not _same(got[name], expected[name])]
        assert not differ, f"kill point {point} of {events}: {differ}"
