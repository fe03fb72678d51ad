"""Finished generation batches on disk, so that a stage killed midway resumes without redoing them.

A stage's generation is split into batches (`Adapter.generate`), each seeded by its place in the call's list of
prompts, never by the process that ran it: a batch's completions are the same whoever makes them and whenever.
With a `BatchStore` set on the adapter (`Adapter.batch_store`), the process that finishes a batch writes its
completions atomically to

    <folder>/<call key>/<batch>.json

and a later call with the same arguments (the resumed stage, with any number of processes) reads them instead
of generating them again. The call key is a sha256 over everything that decides the completions: the prompts,
the images' pixels, the answer prefixes, and the settings `Adapter.generate` passes (the weights' digest, the
device type, the decoding options and the sampling settings). The stage's owner removes the folder once the
stage's own files are written.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
from pathlib import Path

from PIL import Image

from fastjudge.core.dist import World
from fastjudge.data.io import write_json
from fastjudge.models.features import image_hash


class BatchStore:
    """Completed batches of the generation calls made under `folder`; counts what it read and wrote."""

    def __init__(self, folder: Path | str):
        self.folder = Path(folder)
        self.loaded = 0  # batches read back (made by an earlier, interrupted run)
        self.saved = 0

    def call(self, images: list[Image.Image], prompts: list[str], prefixes: list[str] | None,
             settings: dict) -> "StoredCall":
        """The stored batches of one `generate` call, named by a digest of its arguments."""
        h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
        for i, (image, prompt) in enumerate(zip(images, prompts)):
            h.update(f"\n{i}\0{image_hash(image)}\0{prompt}\0".encode())
            if prefixes is not None:
                h.update(prefixes[i].encode())
        return StoredCall(self, self.folder / h.hexdigest()[:32])


class StoredCall:
    """One call's batches: `load(batch)` gives a finished batch's completions or None, `save` writes one."""

    def __init__(self, store: BatchStore, folder: Path):
        self.store, self.folder = store, folder

    def load(self, batch: int, prompts: int) -> list[list[str]] | None:
        """The completions of `batch` ([prompt][sample]) if it was finished, None otherwise; a file that does not
        hold `prompts` completion lists (not one this call wrote, or cut short) is a ValueError naming it."""
        record = self.load_record(batch, prompts)
        return None if record is None else record["completions"]

    def load_record(self, batch: int, prompts: int) -> dict | None:
        """`load`'s batch as its whole record: {"completions", "verdicts"}, the verdict probabilities a
        `VerdictReader` read while the batch was decoded ([prompt][sample], each a list or None), or None where
        the batch holds none that match its completions."""
        path = self.folder / f"{batch}.json"
        if not path.exists():
            return None
        try:
            record = json.loads(path.read_text())
            texts = record["completions"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{path}: not a finished batch ({type(e).__name__}: {e}); delete it to generate "
                             f"the batch again") from e
        if not isinstance(texts, list) or len(texts) != prompts:
            found = len(texts) if isinstance(texts, list) else type(texts).__name__
            raise ValueError(f"{path}: expected completions of {prompts} prompts, found {found}")
        verdicts = record.get("verdicts")
        if not (isinstance(verdicts, list) and len(verdicts) == len(texts)
                and all(isinstance(v, list) and len(v) == len(t) for v, t in zip(verdicts, texts))):
            verdicts = None
        self.store.loaded += 1
        return {"completions": texts, "verdicts": verdicts}

    def save(self, batch: int, texts: list[list[str]], verdicts: list | None = None) -> None:
        record = {"completions": texts} if verdicts is None else {"completions": texts, "verdicts": verdicts}
        write_json(self.folder / f"{batch}.json", record)
        self.store.saved += 1


@contextlib.contextmanager
def stored_batches(adapter, folder: Path, stage: str, world: World = World()):
    """While the block runs, `adapter.generate` writes each finished batch under folder/partial-batches/<stage>/
    and reads the batches an interrupted run of the stage left there (`fastjudge.models.partial`)."""
    store = BatchStore(folder / "partial-batches" / stage)
    adapter.batch_store = store
    try:
        yield store
    finally:
        adapter.batch_store = None
    if store.loaded:
        print(f"{stage}: {store.loaded} finished generation batches read from {store.folder}"
              + (f" (rank {world.rank})" if world.size > 1 else ""), flush=True)


def drop_stored_batches(folder: Path, world: World = World(), stage: str | None = None) -> None:
    """Remove folder/partial-batches/ once the stages whose batches it holds have written their files (rank 0,
    after every rank is past them); with `stage`, only that stage's batches (the folder shared with other
    commands' stages goes once it is empty)."""
    if not world.main:
        return
    root = folder / "partial-batches"
    shutil.rmtree(root if stage is None else root / stage, ignore_errors=True)
    if root.is_dir() and not any(root.iterdir()):
        root.rmdir()
