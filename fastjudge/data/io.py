"""Files on disk: prompt pools, pairs, SFT traces, judge pairs and candidates (loaded with counted skips),
prediction files, atomic JSON/JSONL writes (images: `data.images`).

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

from fastjudge.data.images import check_image

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
    source: str = ""  # the pool file and line it came from (for a skip decided later)
    line: int = 0


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
    """Write `obj` as JSON atomically (`write_text`), its folder made first."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_text(path, json.dumps(obj, indent=2) + "\n")


def write_text(path: Path | str, text: str) -> None:
    """Write `text` atomically (a temporary file renamed into place); a write that fails (a full disk, `path` a
    folder) leaves no temporary file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_jsonl(path: Path | str) -> list[dict]:
    """Strict reader for files this package wrote itself (a bad line here is a bug, not user input)."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def write_records(path: Path | str, rows: list[dict]) -> int:
    """`write_jsonl` of rows that name an image (pairs, SFT traces): each "image" written relative to the file's
    folder, so that a run folder that holds its images can be moved."""
    folder = Path(path).parent.resolve()
    return write_jsonl(path, ({**row, "image": os.path.relpath(row["image"], folder)} if "image" in row else row
                              for row in rows))


def read_records(path: Path | str) -> list[dict]:
    """`read_jsonl` of a file `write_records` wrote: each relative "image" resolved against the file's folder."""
    folder = Path(path).parent.resolve()
    return [{**row, "image": str((folder / row["image"]).resolve())} if "image" in row else row
            for row in read_jsonl(path)]


def decoded_lines(path: Path):
    """(line number, text or None, reason) for each line of a file read as bytes: a line that is not UTF-8 gives
    None and says where (one bad byte must not stop the lines around it from being read)."""
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                yield number, raw.decode("utf-8"), None
            except UnicodeDecodeError as exc:
                yield number, None, f"not UTF-8: byte 0x{raw[exc.start]:02x} at column {exc.start + 1}"


def parse_lines(path: Path, skips: list[Skip]):
    """(line number, position, object) for each parseable line, where position counts non-empty lines from 0
    (unparseable ones included); the unparseable lines (not UTF-8, malformed JSON, not an object) become skips."""
    position = -1
    for number, line, problem in decoded_lines(path):
        if line is not None and not line.strip():
            continue
        position += 1
        if problem:
            skips.append(Skip(str(path), number, problem))
            continue
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
    ids: dict[str, int] = {}  # prompt id -> the line that defined it
    for number, _, obj in parse_lines(path, skips):
        def skip(reason: str) -> None:
            skips.append(Skip(str(path), number, reason))

        prompt_id = obj.get("id", f"{path.stem}-{number}")
        if not isinstance(prompt_id, (str, int)) or isinstance(prompt_id, bool) or str(prompt_id) == "":
            skip(f"field 'id': expected a non-empty string, got {prompt_id!r}")
            continue
        if str(prompt_id) in ids:
            skip(f"field 'id': {str(prompt_id)!r} already used on line {ids[str(prompt_id)]} (the first is kept)")
            continue

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
        ids[str(prompt_id)] = number
        records.append(PromptRecord(str(prompt_id), str(image_path), instruction.strip(), kind, answer_type,
                                    str(path), number))
    return records, skips


def load_predictions(path: Path | str, k: int = 1) -> list[dict]:
    """Read a predictions JSONL strictly: a bad line is an error naming file, line and field (a score computed
    over silently dropped predictions would be wrong). Each line needs "verdict" (null for an unparsed one); an
    item index may occur on at most `k` lines (k judge samples per item): more is an error naming the line."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"predictions: file not found: {path}")
    if k < 1:
        raise ValueError(f"k: expected >= 1, got {k}")
    predictions = []
    seen: dict[int, list[int]] = {}  # item index -> the lines that predict it
    for number, line, problem in decoded_lines(path):
        where = f"predictions: {path} line {number}"
        if problem:
            raise ValueError(f"{where}: {problem}")
        if not line.strip():
            continue
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
        if "verdict" not in obj:
            raise ValueError(f"{where}: field 'verdict': missing (write null for a verdict that was not parsed)")
        if verdict not in ("A", "B", None):
            raise ValueError(f"{where}: field 'verdict': expected \"A\", \"B\" or null, got {verdict!r}")
        lines = seen.setdefault(index, [])
        lines.append(number)
        if len(lines) > k:
            raise ValueError(f"{where}: field 'index': item {index} is predicted on lines "
                             f"{', '.join(map(str, lines))}, more than k={k} samples per item (pass --k)")
        prediction = {"index": index, "shown_first": first, "verdict": verdict}
        p_first = obj.get("p_first")
        if p_first is not None:  # optional: the probability of the answer shown first (calibration)
            if isinstance(p_first, bool) or not isinstance(p_first, (int, float)) or not 0 <= p_first <= 1:
                raise ValueError(f"{where}: field 'p_first': expected a probability in [0, 1], got {p_first!r}")
            prediction["p_first"] = float(p_first)
        predictions.append(prediction)
    if not predictions:
        raise ValueError(f"predictions: {path} holds no prediction (expected a JSON object a line)")
    return predictions


def write_skips(path: Path | str, skips: list[Skip]) -> None:
    write_jsonl(path, (asdict(s) for s in skips))


def _judge_item(path: Path, number: int, obj: dict, images: Path | None, ids: dict[str, int],
                texts: tuple[str, ...], lists: tuple[str, ...] = ()) -> tuple[dict | None, str | None]:
    """One line of a pairs or candidates file checked: (the item with its image resolved, None) or (None, the
    reason to skip it)."""
    item_id = obj.get("id", f"{path.stem}-{number}")
    if not isinstance(item_id, (str, int)) or isinstance(item_id, bool) or str(item_id) == "":
        return None, f"field 'id': expected a non-empty string, got {item_id!r}"
    if str(item_id) in ids:
        return None, f"field 'id': {str(item_id)!r} already used on line {ids[str(item_id)]} (the first is kept)"
    image = obj.get("image")
    if not isinstance(image, str) or not image:
        return None, "field 'image': missing or not a string"
    for name in texts:
        if not isinstance(obj.get(name), str) or not obj[name].strip():
            return None, f"field {name!r}: missing or empty"
    for name in lists:
        value = obj.get(name)
        if not isinstance(value, list) or len(value) < 2 or not all(isinstance(x, str) and x.strip() for x in value):
            return None, f"field {name!r}: expected a list of at least 2 non-empty strings"
    image_path = ((images or path.parent) / image).resolve()
    problem = check_image(image_path)
    if problem:
        return None, f"field 'image': {problem}"
    ids[str(item_id)] = number
    return dict(obj, id=str(item_id), image=str(image_path)), None


def load_judge_pairs(path: Path | str, images: Path | str | None = None,
                     lines: list[int] | None = None) -> tuple[list[dict], list[Skip]]:
    """Pairs to judge, one JSON object a line: {"id", "image" (a path, relative to `images` or else to the file),
    "question", "response_a", "response_b"}, other fields carried through; every rejected line a Skip. `lines`,
    when given, gets each kept item's line."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--pairs: file not found: {path}")
    items, skips, ids = [], [], {}
    for number, _, obj in parse_lines(path, skips):
        item, reason = _judge_item(path, number, obj, Path(images) if images else None, ids,
                                   ("question", "response_a", "response_b"))
        if reason:
            skips.append(Skip(str(path), number, reason))
        else:
            items.append(item)
            if lines is not None:
                lines.append(number)
    return items, skips


def load_candidates(path: Path | str, images: Path | str | None = None,
                    lines: list[int] | None = None) -> tuple[list[dict], list[Skip]]:
    """Answers to rank, one JSON object a line: {"id", "image", "question", "answers": [at least 2]}, other
    fields carried through; every rejected line a Skip. `lines`, when given, gets each kept item's line."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--candidates: file not found: {path}")
    items, skips, ids = [], [], {}
    for number, _, obj in parse_lines(path, skips):
        item, reason = _judge_item(path, number, obj, Path(images) if images else None, ids, ("question",),
                                   ("answers",))
        if reason:
            skips.append(Skip(str(path), number, reason))
        else:
            items.append(item)
            if lines is not None:
                lines.append(number)
    return items, skips


def _load_rows(path: Path | str, flag: str, texts: tuple[str, ...],
               lines: list[int] | None = None) -> tuple[list[dict], list[Skip]]:
    """Rows of a pairs or SFT file (one JSON object a line, "image" relative to the file's folder) with the string
    fields `texts` non-empty and an image that opens; every rejected line a Skip naming its field. `lines`, when
    given, gets each kept row's line."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{flag}: file not found: {path}")
    rows, skips, problems = [], [], {}
    for number, _, obj in parse_lines(path, skips):
        reason = None
        image = obj.get("image")
        if not isinstance(image, str) or not image:
            reason = "field 'image': missing or not a string"
        for name in texts:
            if reason is None and (not isinstance(obj.get(name), str) or not obj[name].strip()):
                reason = f"field {name!r}: missing, empty or not a string"
        if reason is None:
            image = str((path.parent / image).resolve())
            if image not in problems:
                problems[image] = check_image(Path(image))
            reason = problems[image] and f"field 'image': {problems[image]}"
        if reason:
            skips.append(Skip(str(path), number, reason))
        else:
            rows.append(dict(obj, image=image))
            if lines is not None:
                lines.append(number)
    return rows, skips


def load_pairs(path: Path | str, lines: list[int] | None = None) -> tuple[list[dict], list[Skip]]:
    """A pairs file (`fastjudge synth`'s): {"id", "image", "instruction", "good", "bad", ...} a line."""
    return _load_rows(path, "--pairs", ("instruction", "good", "bad"), lines)


def load_traces(path: Path | str, lines: list[int] | None = None) -> tuple[list[dict], list[Skip]]:
    """An SFT file (`fastjudge filter`'s): {"image", "prompt", "target", ...} a line."""
    return _load_rows(path, "--sft", ("prompt", "target"), lines)
