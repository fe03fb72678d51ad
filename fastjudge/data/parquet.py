"""Parquet, as people get the paper's data from the Hugging Face Hub: prompt pools in LLaVA-OneVision-Data's schema
(or any other through a column mapping) and VL-RewardBench's test file, images embedded.

Read with pyarrow one row group at a time, never a whole shard in memory. `--prompts` takes a parquet file, a
folder of shards (every *.parquet under it, in name order) or a glob. A row's place is its file and its row number
(from 1), which a counted skip names as a JSONL line would be named.

LLaVA-OneVision-Data's schema: `id` (str), `image` (a struct of `bytes` and `path`, null for a text-only row),
`conversations` (a list of `{"from", "value"}` turns: the first "human" turn holds the instruction with an
`<image>` placeholder, the first "gpt" turn the reference answer), `data_source`. With a reference answer the
prompt is classed by it (`classify_answer`): a number, an option letter or a short answer make a closed prompt,
anything longer an open one.
"""

from __future__ import annotations

import glob
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

IMAGE_PLACEHOLDER = "<image>"
# a short answer: at most this many words and characters, on one line
SHORT_WORDS, SHORT_CHARS = 3, 32
_NUMBER = re.compile(r"[+-]?(\d{1,3}(,\d{3})+|\d+)(\.\d+)?%?")
_OPTION = re.compile(r"\(?([A-Z])\)?[.):]?")


@dataclass(frozen=True)
class Columns:
    """Which column holds what (`--prompt-columns image=...,instruction=...`). `instruction` and `answer` name a
    string column, or the same list-of-turns column (LLaVA's `conversations`, the default) from which the first
    human and the first gpt turn are taken; `kind` (optional) a column of "open" / "closed"."""
    id: str = "id"
    image: str = "image"
    instruction: str = "conversations"
    answer: str | None = "conversations"
    kind: str | None = None

    @classmethod
    def parse(cls, text: str | None) -> "Columns":
        """"image=img,instruction=question,answer=none" -> Columns; "none" leaves a column out."""
        if not text:
            return cls()
        values = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            name, sep, column = part.partition("=")
            if not sep or name.strip() not in cls.__dataclass_fields__ or not column.strip():
                raise ValueError(f"prompt_columns: expected name=column with names among "
                                 f"{sorted(cls.__dataclass_fields__)}, got {part!r}")
            values[name.strip()] = None if column.strip().lower() == "none" else column.strip()
        for required in ("id", "image", "instruction"):
            if values.get(required, "") is None:
                raise ValueError(f"prompt_columns: {required} is needed, it cannot be none")
        return cls(**values)

    def names(self) -> list[str]:
        return sorted({c for c in (self.id, self.image, self.instruction, self.answer, self.kind) if c})


def is_parquet(spec: str | Path) -> bool:
    """Whether a `--prompts` or `--data` value names parquet: a .parquet file, a folder holding some, or a glob."""
    text = str(spec)
    if any(ch in text for ch in "*?["):
        return True
    path = Path(text)
    return path.suffix == ".parquet" or (path.is_dir() and any(path.rglob("*.parquet")))


def parquet_files(spec: str | Path, flag: str = "--prompts") -> list[Path]:
    """The files a spec names, in name order; a ValueError when there are none."""
    text = str(spec)
    if any(ch in text for ch in "*?["):
        files = sorted(Path(p) for p in glob.glob(text, recursive=True) if p.endswith(".parquet"))
    elif Path(text).is_dir():
        files = sorted(Path(text).rglob("*.parquet"))
    else:
        files = [Path(text)] if Path(text).is_file() else []
    if not files:
        raise ValueError(f"{flag}: no parquet file at {text}")
    return files


def rows(files: list[Path], columns: list[str], sample: int | None = None,
         seed: int = 0) -> Iterator[tuple[Path, int, dict]]:
    """(file, row number from 1, {column: value}) for every row of `files`, a row group in memory at a time; with
    `sample`, `sample` rows drawn uniformly over all the files (seeded), found by the files' row counts (their
    metadata) and read from the row groups that hold them only, in file order. A column missing from a file is a
    ValueError naming it."""
    import pyarrow.parquet as pq
    handles = []
    for path in files:
        try:
            handle = pq.ParquetFile(path)
        except Exception as exc:  # pyarrow raises its own types for a file that is not parquet
            raise ValueError(f"--prompts: {path}: not a parquet file ({type(exc).__name__}: {exc})") from None
        missing = sorted(set(columns) - set(handle.schema_arrow.names))
        if missing:
            raise ValueError(f"{path}: no column {', '.join(map(repr, missing))} (it has "
                             f"{', '.join(handle.schema_arrow.names)}); name the columns with --prompt-columns")
        handles.append(handle)
    wanted: list[set[int]] | None = None
    if sample is not None:
        total = sum(h.metadata.num_rows for h in handles)
        chosen = sorted(random.Random(seed).sample(range(total), min(sample, total)))
        wanted, offset = [], 0
        for handle in handles:
            count = handle.metadata.num_rows
            wanted.append({i - offset for i in chosen if offset <= i < offset + count})
            offset += count
    for index, (path, handle) in enumerate(zip(files, handles)):
        start = 0
        for group in range(handle.metadata.num_row_groups):
            size = handle.metadata.row_group(group).num_rows
            picks = None if wanted is None else sorted(i - start for i in wanted[index] if start <= i < start + size)
            if picks == []:
                start += size
                continue
            table = handle.read_row_group(group, columns=columns)
            data = table.to_pydict()
            del table
            for i in picks if picks is not None else range(size):
                yield path, start + i + 1, {name: data[name][i] for name in columns}
            start += size


def first_turn(turns, speaker: str) -> str | None:
    """The value of the first turn from `speaker` ("human" or "gpt") in a list of {"from", "value"} turns."""
    if not isinstance(turns, list):
        return None
    for turn in turns:
        if isinstance(turn, dict) and turn.get("from") == speaker and isinstance(turn.get("value"), str):
            return turn["value"]
    return None


def classify_answer(answer: str) -> tuple[str, str | None]:
    """(kind, answer_type) of a prompt from its reference answer, after stripping white space and a final period:
    a number ("12", "-3.5", "1,024", "40%") is ("closed", "number"); one capital letter, alone or as "(B)", "B."
    or "B)", is ("closed", "option"); at most SHORT_WORDS words and SHORT_CHARS characters on one line is
    ("closed", "short"); anything else, a caption or a long answer, is ("open", None)."""
    text = answer.strip()
    if text.endswith(".") and not _NUMBER.fullmatch(text):
        text = text[:-1].strip()
    if _NUMBER.fullmatch(text):
        return "closed", "number"
    if _OPTION.fullmatch(text):
        return "closed", "option"
    if text and "\n" not in text and len(text.split()) <= SHORT_WORDS and len(text) <= SHORT_CHARS:
        return "closed", "short"
    return "open", None


def image_bytes(value) -> tuple[bytes | None, str | None]:
    """(embedded bytes, or None; a path, or None) of an image cell: Hugging Face's {"bytes", "path"} struct, raw
    bytes, or a path string. A list (several images) gives (None, None): the caller skips it."""
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
        return (bytes(data) if data else None), (path if isinstance(path, str) and path else None)
    if isinstance(value, (bytes, bytearray)):
        return bytes(value), None
    if isinstance(value, str) and value:
        return None, value
    return None, None


def load_prompts(spec: str | Path, columns: Columns, images: Path, max_pixels: int, sample: int | None = None,
                 seed: int = 0) -> tuple[list, list, dict[str, int]]:
    """A parquet prompt pool: (`PromptRecord`s, counted `Skip`s naming file, row and field, what was done to the
    images). Each image is extracted once into `images` under its content's hash (`stage_image_bytes`), so a
    resumed run finds it there; a path instead of bytes is relative to the parquet file."""
    from fastjudge.data.images import check_image, stage_image, stage_image_bytes
    from fastjudge.data.io import PromptRecord, Skip
    records, skips, counts = [], [], {}
    ids: dict[str, tuple[str, int]] = {}
    for path, row, values in rows(parquet_files(spec), columns.names(), sample, seed):
        def skip(reason: str) -> None:
            skips.append(Skip(str(path), row, reason))

        prompt_id = values[columns.id]
        if not isinstance(prompt_id, (str, int)) or isinstance(prompt_id, bool) or str(prompt_id) == "":
            skip(f"column {columns.id!r}: expected a non-empty id, got {prompt_id!r}")
            continue
        if str(prompt_id) in ids:
            skip(f"column {columns.id!r}: {str(prompt_id)!r} already used at {ids[str(prompt_id)][0]} row "
                 f"{ids[str(prompt_id)][1]} (the first is kept)")
            continue
        cell = values[columns.instruction]
        instruction = first_turn(cell, "human") if isinstance(cell, list) else cell
        if not isinstance(instruction, str) or not instruction.replace(IMAGE_PLACEHOLDER, "").strip():
            skip(f"column {columns.instruction!r}: no instruction (a first human turn with text)")
            continue
        if instruction.count(IMAGE_PLACEHOLDER) > 1 or isinstance(values[columns.image], list):
            skip(f"column {columns.image!r}: several images; fastjudge's prompts hold one")
            continue
        data, image_path = image_bytes(values[columns.image])
        if data is None and image_path is None:
            skip(f"column {columns.image!r}: no image (a text-only row)")
            continue
        try:
            if data is not None:
                target, action = stage_image_bytes(data, images, max_pixels)
            else:
                source = (path.parent / image_path).resolve()
                problem = check_image(source)
                if problem:
                    skip(f"column {columns.image!r}: {problem}")
                    continue
                target, action = stage_image(source, images, max_pixels)
        except ValueError as exc:  # over the decode budget
            skip(f"column {columns.image!r}: image too large ({exc})")
            continue
        except Exception as exc:  # PIL raises many types for bytes that are not an image
            skip(f"column {columns.image!r}: image unreadable ({type(exc).__name__}: {exc})")
            continue
        counts[action] = counts.get(action, 0) + 1
        kind, answer_type = "open", None
        answer = values[columns.answer] if columns.answer else None
        answer = first_turn(answer, "gpt") if isinstance(answer, list) else answer
        if isinstance(answer, str) and answer.strip():
            kind, answer_type = classify_answer(answer)
        if columns.kind:
            given = values[columns.kind]
            if given not in ("open", "closed"):
                skip(f"column {columns.kind!r}: expected 'open' or 'closed', got {given!r}")
                continue
            kind, answer_type = given, (answer_type or "short") if given == "closed" else None
        text = instruction.replace(IMAGE_PLACEHOLDER + "\n", "").replace(IMAGE_PLACEHOLDER, "").strip()
        ids[str(prompt_id)] = (str(path), row)
        records.append(PromptRecord(str(prompt_id), str(target), text, kind, answer_type, str(path), row))
    return records, skips, counts
