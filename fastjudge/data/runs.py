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
import re
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


# The files of a checkpoint folder as transformers and fastjudge write them: nothing else is ever replaced
_CHECKPOINT_FILE = re.compile(
    r"(config|generation_config|preprocessor_config|processor_config|video_preprocessor_config|tokenizer_config"
    r"|tokenizer|special_tokens_map|added_tokens|chat_template|fastjudge_toy|vocab)\.(json|jinja)"
    r"|merges\.txt|tokenizer\.model|model(-\d+-of-\d+)?\.safetensors(\.index\.json)?")


def is_checkpoint(folder: Path) -> bool:
    """Whether `folder` holds a model checkpoint and nothing else (config.json, weights, tokenizer and processor
    files, no folder): what `save_checkpoint` may replace. A run folder (config.json beside iter_<k>/) is not."""
    entries = list(Path(folder).iterdir())
    return (any(e.name == "config.json" for e in entries) and any(e.name.endswith(".safetensors") for e in entries)
            and all(e.is_file() and _CHECKPOINT_FILE.fullmatch(e.name) for e in entries))


def check_checkpoint_out(folder: Path) -> None:
    """A ValueError naming `folder` unless a checkpoint may be written there: it does not exist, is empty, or is a
    checkpoint and nothing else (`is_checkpoint`). Commands call it before any work; `save_checkpoint` again."""
    folder = Path(folder)
    if folder.exists() and (not folder.is_dir() or (any(folder.iterdir()) and not is_checkpoint(folder))):
        raise ValueError(f"--out: {folder} exists and is not a checkpoint folder (it holds other files); refusing "
                         "to replace it: choose a new folder")


MANIFEST_NAME = ".fastjudge-outputs.json"


class OwnedOutputs:
    """`with OwnedOutputs(folder, command, names):` holds `folder` (`RunLock`) for a single-stage command that
    writes the files or folders `names` there, and makes sure it replaces nothing it did not write.

    Before any work: a folder holding a `fastjudge iterate` run (config.json beside iter_0/) is refused, and so is
    every name that exists but that the folder's manifest (.fastjudge-outputs.json, {name: command}) does not
    list as this command's: another command's output or the user's own file. With `overwrite` both are allowed.
    The names are then written to the manifest as this command's, so that the same command run again (after a
    kill, or to redo it) may replace them. Nothing is deleted here; the command replaces its own files."""

    def __init__(self, folder: Path | str, command: str, names: list[str], overwrite: bool = False,
                 flag: str = "--out"):
        self.folder, self.command, self.names, self.overwrite, self.flag = Path(folder), command, names, overwrite, flag
        self.lock = RunLock(self.folder, flag)

    def __enter__(self) -> "OwnedOutputs":
        self.lock.__enter__()
        try:
            self._claim()
        except BaseException:
            self.lock.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.lock.__exit__(*exc)

    def _claim(self) -> None:
        manifest_path = self.folder / MANIFEST_NAME
        try:
            manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
        except (OSError, json.JSONDecodeError):
            manifest = {}
        if not self.overwrite:
            if (self.folder / "config.json").is_file() and (self.folder / "iter_0").is_dir():
                raise ValueError(f"{self.flag}: {self.folder} holds a `fastjudge iterate` run; refusing to write "
                                 f"`fastjudge {self.command}` output into it: choose another {self.flag}")
            for name in self.names:
                path = self.folder / name
                if path.exists() and manifest.get(name) != self.command:
                    owner = manifest.get(name)
                    who = f"`fastjudge {owner}`" if owner else "no fastjudge command (a file of yours?)"
                    raise ValueError(f"{self.flag}: {path} exists and was written by {who}; refusing to replace it: "
                                     f"choose another {self.flag}, or pass --overwrite")
        manifest.update({name: self.command for name in self.names})
        tmp = manifest_path.with_name(manifest_path.name + ".tmp")
        tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
        os.replace(tmp, manifest_path)
