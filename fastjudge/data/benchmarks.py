"""Benchmarks on disk (`load_bench`), each read into the same item dicts: {"index", "id", "query", "response":
[2 str], "human_ranking": [2 ranks, lower is better], "image" (absolute path), "category"}:
- "vlrewardbench": VL-RewardBench's JSONL (id, image_path, query, response[2], human_ranking[2], ...), one item
  per line (ids repeat); `image_path` is relative to an images folder (default: the JSONL's folder);
- "toy": the same schema plus "category" (our held-out shapes-world benchmark);
- "mmrb": Multimodal RewardBench's JSON list of {ID, Text, Image, Output1, Output2, Better, Category}.
`index` is the item's 0-based position in the file (line among non-empty lines, or list element): the key that
predictions use; `line` is the line where it starts (what a skip names). Every rejected entry is a `Skip` naming file, line and field.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from fastjudge.data.images import check_image
from fastjudge.data.io import Skip, parse_lines

BENCH_FORMATS = ("toy", "vlrewardbench", "mmrb")


def load_bench(fmt: str, path: Path | str, images: Path | str | None = None,
               check_images: bool = True, extract_to: Path | str | None = None) -> tuple[list[dict], list[Skip]]:
    """Read a benchmark of format `fmt` (see BENCH_FORMATS) into item dicts (module docstring); every rejected
    entry is returned as a Skip naming file, line and field. `check_images=False` (scoring) skips the check that
    each image opens. VL-RewardBench's parquet (the Hub's `data/test-00000-of-00001.parquet`: the fields of its
    data.jsonl, the image embedded in `image`) is read too: with `extract_to`, each image is written there under
    its content's hash (the judge reads it from there); without, the items name no image (scoring)."""
    if fmt not in BENCH_FORMATS:
        raise ValueError(f"bench: expected one of {BENCH_FORMATS}, got {fmt!r}")
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"data: file not found: {path}")
    if path.suffix == ".parquet":
        if fmt == "mmrb":
            raise ValueError(f"data: {path}: Multimodal RewardBench is read from its JSON list (all_data.json)")
        return _load_vlrb_parquet(path, extract_to)
    root = Path(images) if images is not None else path.parent
    if fmt == "mmrb":
        return _load_mmrb(path, root, check_images)
    return _load_vlrb(path, root, check_images)


def load_benchmark(path: Path | str, images: Path | str | None = None) -> tuple[list[dict], list[Skip]]:
    """A VL-RewardBench-schema JSONL (the toy benchmark's too), images checked."""
    return load_bench("vlrewardbench", path, images)


def _image_problem(root: Path, name, check: bool) -> str | None:
    if not isinstance(name, str) or not name:
        return "missing or not a string"
    return check_image(root / name) if check else None


def _load_vlrb(path: Path, root: Path, check_images: bool) -> tuple[list[dict], list[Skip]]:
    items, skips = [], []
    for number, index, obj in parse_lines(path, skips):
        problem = _vlrb_problem(obj)
        if problem is None:
            problem = _image_problem(root, obj.get("image_path"), check_images)
            problem = problem and f"field 'image_path': {problem}"
        if problem:
            skips.append(Skip(str(path), number, problem))
            continue
        items.append(dict(obj, index=index, line=number, id=str(obj.get("id", index)),
                          image=str((root / obj["image_path"]).resolve())))
    return items, skips


def _vlrb_problem(obj: dict) -> str | None:
    """What is wrong with a VL-RewardBench entry's text fields, or None."""
    responses, ranking = obj.get("response"), obj.get("human_ranking")
    if not isinstance(obj.get("query"), str) or not obj["query"].strip():
        return "field 'query': missing or empty"
    if not (isinstance(responses, list) and len(responses) == 2 and all(isinstance(r, str) for r in responses)):
        return "field 'response': expected a list of 2 strings"
    if not (isinstance(ranking, list) and len(ranking) == 2 and ranking[0] != ranking[1]
            and all(isinstance(r, (int, float)) and not isinstance(r, bool) and math.isfinite(r) for r in ranking)):
        return "field 'human_ranking': expected 2 different finite numeric ranks"
    return None


def _load_vlrb_parquet(path: Path, extract_to: Path | str | None) -> tuple[list[dict], list[Skip]]:
    """VL-RewardBench's parquet, row by row (a row group in memory at a time): the items of its data.jsonl, in
    the same order (`index`: the row's place from 0), each image extracted to `extract_to`."""
    import pyarrow.parquet as pq
    from fastjudge.data.images import stage_image_bytes
    from fastjudge.data.parquet import image_bytes, rows
    try:
        names = pq.ParquetFile(path).schema_arrow.names
    except Exception as exc:  # pyarrow raises its own types for a file that is not parquet
        raise ValueError(f"data: {path}: not a parquet file ({type(exc).__name__}: {exc})") from None
    items, skips = [], []
    for _, row, obj in rows([path], names):
        problem = _vlrb_problem(obj)
        data, _ = image_bytes(obj.get("image"))
        image = ""
        if problem is None and data is None and extract_to is not None:
            problem = "field 'image': no embedded image"
        elif problem is None and extract_to is not None:
            try:
                image = str(stage_image_bytes(data, Path(extract_to), 1 << 62)[0])  # kept as it is: no downscaling
            except Exception as exc:  # PIL raises many types for bytes that are not an image
                problem = f"field 'image': image unreadable ({type(exc).__name__}: {exc})"
        if problem:
            skips.append(Skip(str(path), row, problem))
            continue
        item = {k: v for k, v in obj.items() if k != "image"}
        items.append(dict(item, index=row - 1, line=row, id=str(obj.get("id", row - 1)), image=image))
    return items, skips


_NOT_UTF8 = re.compile("[\udc80-\udcff]")  # a byte that is not UTF-8, as surrogateescape decodes it


def _json_list(path: Path) -> list[tuple[int, object, str | None]]:
    """(line number where it starts, element, problem) for each element of a JSON list file; problem names a
    byte that is not UTF-8 inside the element (that element alone is then skipped)."""
    text = path.read_bytes().decode("utf-8", errors="surrogateescape")
    decoder = json.JSONDecoder()
    position = len(text) - len(text.lstrip())
    if not text.startswith("[", position):
        raise ValueError(f"data: {path}: expected a JSON list (Multimodal RewardBench's all_data.json), not "
                         f"JSONL or another JSON value")
    elements = []
    position += 1
    while True:
        while position < len(text) and text[position] in " \t\r\n,":
            position += 1
        if position >= len(text) or text[position] == "]":
            return elements
        try:
            element, end = decoder.raw_decode(text, position)
        except json.JSONDecodeError as exc:
            raise ValueError(f"data: {path} line {exc.lineno} column {exc.colno}: malformed JSON ({exc.msg})") from None
        line = text.count("\n", 0, position) + 1
        bad = _NOT_UTF8.search(text, position, end)
        problem = None
        if bad:
            column = bad.start() - text.rfind("\n", 0, bad.start())
            problem = (f"not UTF-8: byte 0x{ord(bad.group()) - 0xDC00:02x} at line "
                       f"{text.count(chr(10), 0, bad.start()) + 1} column {column}")
        elements.append((line, element, problem))
        position = end


def _load_mmrb(path: Path, root: Path, check_images: bool) -> tuple[list[dict], list[Skip]]:
    items, skips = [], []
    for index, (line, obj, problem) in enumerate(_json_list(path)):
        if problem:  # a byte that is not UTF-8: the entry is skipped, whatever its fields
            pass
        elif not isinstance(obj, dict):
            problem = f"expected a JSON object, got {type(obj).__name__}"
        elif not isinstance(obj.get("ID"), str) or not obj["ID"]:
            problem = "field 'ID': missing or not a string"
        elif not isinstance(obj.get("Text"), str) or not obj["Text"].strip():
            problem = "field 'Text': missing or empty"
        elif not all(isinstance(obj.get(f), str) for f in ("Output1", "Output2")):
            problem = "field 'Output1'/'Output2': expected strings"
        elif obj.get("Better") not in ("Output1", "Output2"):
            problem = f"field 'Better': expected 'Output1' or 'Output2', got {obj.get('Better')!r}"
        elif not isinstance(obj.get("Category"), str) or not obj["Category"]:
            problem = "field 'Category': missing or not a string"
        else:
            problem = _image_problem(root, obj.get("Image"), check_images)
            problem = problem and f"field 'Image': {problem}"
        if problem:
            skips.append(Skip(str(path), line, f"entry {index}: {problem}"))
            continue
        first_better = obj["Better"] == "Output1"
        items.append({"index": index, "line": line, "id": obj["ID"], "query": obj["Text"],
                      "response": [obj["Output1"], obj["Output2"]],
                      "human_ranking": [0, 1] if first_better else [1, 0],
                      "image": str((root / obj["Image"]).resolve()), "category": obj["Category"]})
    return items, skips
