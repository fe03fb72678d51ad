"""Files on disk: prompt pools (loaded with counted skips), prediction files, atomic JSON/JSONL writes, images.

Prompt pool schema (one JSON object per line), for `--prompts FILE.jsonl`:
    {"id": str (optional; default "<file stem>-<line>"),
     "image": str   (path to the image, absolute or relative to the JSONL file's folder),
     "instruction": str (non-empty),
     "kind": "open" | "closed",
     "answer_type": "number" | "option" | "short" (optional, closed prompts only; default "short")}

Predictions (`load_predictions`): JSONL, one judge call per line: {"index", "shown_first": 0 or 1 (index into
the item's responses of the one shown first, as "A" / "Answer 1"), "verdict": "A", "B" or null}.

Bad lines never stop a run and are never dropped silently: each becomes a `Skip` (file, line, reason) that
the run writes to `skipped.jsonl` and counts in its summary.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

from PIL import Image

KINDS = ("open", "closed")
ANSWER_TYPES = ("number", "option", "short")


@dataclass(frozen=True)
class Skip:
    file: str
    line: int
    reason: str


@dataclass(frozen=True)
class PromptRecord:
    id: str
    image: str  # absolute path
    instruction: str
    kind: str
    answer_type: str | None


def write_jsonl(path: Path | str, rows: Iterable[dict]) -> int:
    """Write rows atomically (a temporary file renamed into place): a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    count = 0
    try:
        with tmp.open("w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
                count += 1
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
    return count


def write_json(path: Path | str, obj) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def read_jsonl(path: Path | str) -> list[dict]:
    """Strict reader for files this package wrote itself (a bad line here is a bug, not user input)."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def check_image(path: Path) -> str | None:
    """None when the image opens and decodes, else the reason it does not."""
    if not path.is_file():
        return f"image not found: {path}"
    try:
        with Image.open(path) as im:
            im.load()
    except Exception as exc:  # PIL raises many types for corrupt files
        return f"image unreadable: {path} ({type(exc).__name__}: {exc})"
    return None


def load_image(path: str | Path) -> Image.Image:
    with Image.open(path) as im:
        return im.convert("RGB")


def load_images(paths: list[str]) -> list[Image.Image]:
    """One RGB image per path, each distinct file decoded once (pairs and samples share images)."""
    cache: dict[str, Image.Image] = {}
    return [cache[p] if p in cache else cache.setdefault(p, load_image(p)) for p in paths]


def parse_lines(path: Path, skips: list[Skip]):
    """(line number, position, object) for each parseable line, where position counts non-empty lines from 0
    (unparseable ones included); the unparseable lines become skips."""
    position = -1
    with path.open() as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            position += 1
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                skips.append(Skip(str(path), number, f"malformed JSON: {exc.msg} at column {exc.colno}"))
                continue
            if not isinstance(obj, dict):
                skips.append(Skip(str(path), number, f"expected a JSON object, got {type(obj).__name__}"))
                continue
            yield number, position, obj


def load_prompts(path: Path | str) -> tuple[list[PromptRecord], list[Skip]]:
    """Read a prompt pool; every rejected line is returned as a Skip naming file, line and field."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--prompts: file not found: {path}")
    records, skips = [], []
    for number, _, obj in parse_lines(path, skips):
        def skip(reason: str) -> None:
            skips.append(Skip(str(path), number, reason))

        image, instruction, kind = obj.get("image"), obj.get("instruction"), obj.get("kind")
        if not isinstance(image, str) or not image:
            skip("field 'image': missing or not a string")
            continue
        if not isinstance(instruction, str) or not instruction.strip():
            skip("field 'instruction': missing or empty")
            continue
        if kind not in KINDS:
            skip(f"field 'kind': expected one of {KINDS}, got {kind!r}")
            continue
        answer_type = obj.get("answer_type", "short" if kind == "closed" else None)
        if kind == "closed" and answer_type not in ANSWER_TYPES:
            skip(f"field 'answer_type': expected one of {ANSWER_TYPES}, got {answer_type!r}")
            continue
        image_path = (path.parent / image).resolve()
        problem = check_image(image_path)
        if problem:
            skip(f"field 'image': {problem}")
            continue
        records.append(PromptRecord(str(obj.get("id", f"{path.stem}-{number}")), str(image_path),
                                    instruction.strip(), kind, answer_type))
    return records, skips


def load_predictions(path: Path | str) -> list[dict]:
    """Read a predictions JSONL strictly: a bad line is an error naming file, line and field (a score computed
    over silently dropped predictions would be wrong)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"predictions: file not found: {path}")
    predictions = []
    with path.open() as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"predictions: {path} line {number}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{where}: malformed JSON ({exc.msg})") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{where}: expected a JSON object")
            index, first, verdict = obj.get("index"), obj.get("shown_first"), obj.get("verdict")
            if not isinstance(index, int) or isinstance(index, bool) or index < 0:
                raise ValueError(f"{where}: field 'index': expected an integer >= 0, got {index!r}")
            if type(first) is not int or first not in (0, 1):
                raise ValueError(f"{where}: field 'shown_first': expected 0 or 1, got {first!r}")
            if verdict not in ("A", "B", None):
                raise ValueError(f"{where}: field 'verdict': expected \"A\", \"B\" or null, got {verdict!r}")
            predictions.append({"index": index, "shown_first": first, "verdict": verdict})
    return predictions


def write_skips(path: Path | str, skips: list[Skip]) -> None:
    write_jsonl(path, (asdict(s) for s in skips))
