"""Run folders: checked before anything is written, and held by one process at a time.

`open_run_folder(path)` turns every way a `--out` can be wrong (a file, a folder that cannot be written) into a
one-line ValueError. `RunLock(folder)` holds the folder for one process: an exclusive `flock` on
`folder/.fastjudge.lock`, taken atomically by the kernel and released by it when the process ends, however it
ends. The lock file names its holder (pid, host, start time) so that a second process can say who holds the
folder; a holder that ends normally empties it, so a file still naming a holder that no longer holds the lock
is what a killed run leaves: it is taken over with a warning.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import socket
import warnings
from pathlib import Path

LOCK_NAME = ".fastjudge.lock"


def open_run_folder(path: Path | str, flag: str = "--out") -> Path:
    """Create `path` as a folder if needed and check that this process can write in it; ValueError naming the
    flag and the problem otherwise."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{flag}: {path} is a file, not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:  # a parent is a file
        raise ValueError(f"{flag}: {path}: a part of the path is a file, not a folder") from None
    except NotADirectoryError:
        raise ValueError(f"{flag}: {path}: a part of the path is a file, not a folder") from None
    except PermissionError:
        raise ValueError(f"{flag}: {path}: permission denied (cannot create the folder)") from None
    except OSError as exc:
        raise ValueError(f"{flag}: {path}: {exc.strerror or exc}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ValueError(f"{flag}: {path}: permission denied (the folder is not writable)")
    return path


def run_files(folder: Path) -> list[Path]:
    """What a run folder holds besides its lock file."""
    return [p for p in folder.iterdir() if p.name != LOCK_NAME]


class RunLock:
    """`with RunLock(folder):` holds `folder` for this process (module docstring); a second holder gets a
    ValueError naming the first."""

    def __init__(self, folder: Path | str, flag: str = "--out"):
        self.folder, self.flag = Path(folder), flag
        self.path = self.folder / LOCK_NAME
        self._fd: int | None = None

    def __enter__(self) -> "RunLock":
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise ValueError(f"{self.flag}: {self.folder}: cannot create the lock file ({exc.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            who = (f"pid {holder.get('pid')} on {holder.get('host')} since {holder.get('started')}" if holder
                   else "another process")
            raise ValueError(f"{self.flag}: {self.folder} is in use by {who} ({self.path}); wait for it to "
                             f"finish or choose another {self.flag}") from None
        previous = _holder(fd)
        if previous:
            warnings.warn(f"{self.folder}: taking over the lock left by pid {previous.get('pid')} on "
                          f"{previous.get('host')} (started {previous.get('started')}), which no longer runs",
                          stacklevel=2)
        me = {"pid": os.getpid(), "host": socket.gethostname(),
              "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
        os.fsync(fd)
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is None:
            return
        # emptied, not removed: a process waiting on this file must not end up holding a removed one
        os.ftruncate(self._fd, 0)
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None


def _holder(fd: int) -> dict:
    """The holder a lock file names ({} when empty or unreadable)."""
    try:
        text = os.pread(fd, 4096, 0).decode("utf-8", errors="replace").strip()
        return json.loads(text) if text else {}
    except (OSError, json.JSONDecodeError):
        return {"pid": "unknown", "host": "unknown", "started": "unknown"}
