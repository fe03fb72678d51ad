"""What a benchmark result needs beside its numbers: machine, versions, git revision, date, stamped by the code
that ran (never by hand).

`git` is `git describe --always --dirty`: a commit, with "-dirty" when tracked files differ from it; then
`git_diff_sha256` is the sha256 of `git diff HEAD` (the uncommitted change that ran) and `git_tree` the tree hash
of the files as they were (tracked and untracked-not-ignored), which equals `git rev-parse COMMIT^{tree}` of the
commit that holds exactly those files."""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
from pathlib import Path


def environment() -> dict:
    import torch
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
        "machine": platform.machine(),
        "cpu": _cpu_name(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "versions": _versions(),
        "git": _git_revision(),
        "git_tree": _git_tree(),
    }
    if info["git"].endswith("-dirty"):
        info["git_diff_sha256"] = _git_diff_hash()
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _versions() -> dict:
    """The versions of the packages whose code the measurement ran (None: not installed)."""
    import importlib.metadata
    out = {}
    for name in ("torch", "triton", "transformers", "liger-kernel", "numpy", "pillow", "tokenizers", "fastjudge"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def _git_diff_hash() -> str:
    """sha256 of `git diff HEAD` (tracked files' uncommitted changes, binary included)."""
    import hashlib
    try:
        diff = subprocess.run(["git", "diff", "--binary", "HEAD"], capture_output=True, check=True,
                              cwd=Path(__file__).resolve().parent.parent).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return hashlib.sha256(diff).hexdigest()


def _git_revision() -> str:
    try:
        # "-dirty" when tracked files differ from the commit: the numbers then measured uncommitted code
        return subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=10"], capture_output=True,
                              text=True, cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _git_tree() -> str:
    """The tree hash of the working tree as it is (tracked and untracked-not-ignored files), through a scratch
    index: equal to `git rev-parse COMMIT^{tree}` of the commit whose files ran, even where the checkout's own
    history is stale (a device machine gets a copy of the working tree beside an older .git)."""
    import tempfile
    root = Path(__file__).resolve().parent.parent

    def git(*args: str, env: dict | None = None) -> str:
        return subprocess.run(["git", *args], cwd=root, env=env, check=True, capture_output=True,
                              text=True).stdout.strip()

    with tempfile.TemporaryDirectory() as scratch:
        try:
            # the blobs and trees that hashing writes go to the scratch folder, not into the repository's objects
            objects = (root / git("rev-parse", "--git-path", "objects")).resolve()
            env = os.environ | {"GIT_INDEX_FILE": str(Path(scratch) / "index"), "GIT_OBJECT_DIRECTORY": scratch,
                                "GIT_ALTERNATE_OBJECT_DIRECTORIES": str(objects)}
            git("add", "-A", ".", env=env)
            return git("write-tree", env=env)
        except (OSError, subprocess.CalledProcessError):
            return "unknown"


def save(path: str | Path, result: dict) -> None:
    """Write one result (numbers + environment) as a JSON file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result | {"environment": environment()}, indent=2) + "\n")


def save_partial(path: str | Path | None, result: dict) -> None:
    """What a bench has measured so far, marked "partial": rewritten after each of its parts, so that a run cut
    short (a lease's time limit) keeps them; the bench's last `report` replaces it with the whole result."""
    if path:
        save(path, result | {"partial": True})


def median_ms(fn, repeats: int, cuda: bool) -> float:
    """Median milliseconds of fn() over `repeats` calls (no warm-up here); on CUDA synchronized around each
    call, so the device's work is inside the time."""
    import statistics
    import time

    import torch
    times = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def graph_ms(fn, repeats: int, calls: int = 20) -> float:
    """Median milliseconds of one fn() on CUDA, replayed from a CUDA graph of `calls` back-to-back calls and timed
    by CUDA events around each replay: the device's time without the host's launch overhead, as a decoder that
    captures its step runs it. fn must be capturable (no host synchronization) and compiled already (a Triton
    compile inside a capture fails): call it once before."""
    import statistics

    import torch
    side = torch.cuda.Stream()  # warm-up on a side stream, as torch.cuda.graphs asks before a capture
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    del graph
    return statistics.median(times)


def report(result: dict, out: str | Path | None = None) -> None:
    """The benchmark's last line: its result with the environment as one JSON line; also a file with --out."""
    print(json.dumps(result | {"environment": environment()}))
    if out:
        save(out, result)
