"""Prompt pools and benchmarks on disk: loading with counted skips, atomic JSONL writes, the toy world's files.

Prompt pool schema (one JSON object per line), for `--prompts FILE.jsonl`:
    {"id": str (optional; default "<file stem>-<line>"),
     "image": str   (path to the image, absolute or relative to the JSONL file's folder),
     "instruction": str (non-empty),
     "kind": "open" | "closed",
     "answer_type": "number" | "option" | "short" (optional, closed prompts only; default "short")}

Benchmarks (`load_bench`), each read into the same item dicts: {"index", "id", "query", "response": [2 str],
"human_ranking": [2 ranks, lower is better], "image" (absolute path), "category"}:
- "vlrewardbench": VL-RewardBench's JSONL (id, image_path, query, response[2], human_ranking[2], ...), one item
  per line (ids repeat); `image_path` is relative to an images folder (default: the JSONL's folder);
- "toy": the same schema plus "category" (our held-out shapes-world benchmark);
- "mmrb": Multimodal RewardBench's JSON list of {ID, Text, Image, Output1, Output2, Better, Category}.
`index` is the item's 0-based position in the file (line among non-empty lines, or list element): the key that
predictions use.

Predictions (`load_predictions`): JSONL, one judge call per line: {"index", "shown_first": 0 or 1 (index into
the item's responses of the one shown first, as "A" / "Answer 1"), "verdict": "A", "B" or null}.

Bad lines never stop a run and are never dropped silently: each becomes a `Skip` (file, line, reason) that
the run writes to `skipped.jsonl` and counts in its summary.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

from PIL import Image

from fastjudge import world

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


def _parse_lines(path: Path, skips: list[Skip]):
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
    for number, _, obj in _parse_lines(path, skips):
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


BENCH_FORMATS = ("toy", "vlrewardbench", "mmrb")


def load_bench(fmt: str, path: Path | str, images: Path | str | None = None,
               check_images: bool = True) -> tuple[list[dict], list[Skip]]:
    """Read a benchmark of format `fmt` (see BENCH_FORMATS) into item dicts (module docstring); every rejected
    entry is returned as a Skip naming file, line and field. `check_images=False` (scoring) skips the check that
    each image opens."""
    if fmt not in BENCH_FORMATS:
        raise ValueError(f"bench: expected one of {BENCH_FORMATS}, got {fmt!r}")
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"data: file not found: {path}")
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
    for number, index, obj in _parse_lines(path, skips):
        responses, ranking = obj.get("response"), obj.get("human_ranking")
        problem = None
        if not isinstance(obj.get("query"), str) or not obj["query"].strip():
            problem = "field 'query': missing or empty"
        elif not (isinstance(responses, list) and len(responses) == 2 and all(isinstance(r, str) for r in responses)):
            problem = "field 'response': expected a list of 2 strings"
        elif not (isinstance(ranking, list) and len(ranking) == 2 and ranking[0] != ranking[1]
                  and all(isinstance(r, (int, float)) and not isinstance(r, bool) for r in ranking)):
            problem = "field 'human_ranking': expected 2 different numeric ranks"
        else:
            problem = _image_problem(root, obj.get("image_path"), check_images)
            problem = problem and f"field 'image_path': {problem}"
        if problem:
            skips.append(Skip(str(path), number, problem))
            continue
        items.append(dict(obj, index=index, id=str(obj.get("id", index)),
                          image=str((root / obj["image_path"]).resolve())))
    return items, skips


def _json_list(path: Path) -> list[tuple[int, object]]:
    """(line number where it starts, element) for each element of a JSON list file."""
    text = path.read_text()
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
        elements.append((text.count("\n", 0, position) + 1, element))
        position = end


def _load_mmrb(path: Path, root: Path, check_images: bool) -> tuple[list[dict], list[Skip]]:
    items, skips = [], []
    for index, (line, obj) in enumerate(_json_list(path)):
        problem = None
        if not isinstance(obj, dict):
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
        items.append({"index": index, "id": obj["ID"], "query": obj["Text"],
                      "response": [obj["Output1"], obj["Output2"]],
                      "human_ranking": [0, 1] if first_better else [1, 0],
                      "image": str((root / obj["Image"]).resolve()), "category": obj["Category"]})
    return items, skips


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


# -------------------------------------------------------------------------------------------------------
# The toy world on disk


def _toy_prompts(count: int, seed: int, closed_fraction: float):
    """The toy prompt pool's scenes, drawn in order: (index, scene, image, question) for each prompt."""
    rng = random.Random(seed)
    for i in range(count):
        scene = world.random_scene(rng)
        image = world.render(scene, rng)
        qs = world.questions(scene, rng)
        yield i, scene, image, (rng.choice(qs[1:]) if rng.random() < closed_fraction else qs[0])


def write_toy_prompts(folder: Path | str, count: int, seed: int, closed_fraction: float = 0.5) -> Path:
    """A prompt pool of `count` shapes-world prompts (images as PNG) in `folder`; returns the JSONL path.

    Only images and instructions are written: the answers stay in the scene generator, unseen by the loop.
    """
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i, _, image, q in _toy_prompts(count, seed, closed_fraction):
        name = f"images/p{i:05d}.png"
        image.save(folder / name)
        row = {"id": f"toy-{seed}-{i}", "image": name, "instruction": q.instruction, "kind": q.kind}
        if q.kind == "closed":
            row["answer_type"] = q.answer_type
        rows.append(row)
    write_jsonl(folder / "prompts.jsonl", rows)
    return folder / "prompts.jsonl"


def toy_prompt_truth(count: int, seed: int, closed_fraction: float = 0.5) -> dict[str, "world.Question"]:
    """Ground truth of the pool `write_toy_prompts(..., count, seed, closed_fraction)` wrote: prompt id ->
    its question with the true answer. For measuring only (how often synthetic labels are right); the loop's
    stages never call it (a test runs them with it made to raise)."""
    return {f"toy-{seed}-{i}": q for i, _, _, q in _toy_prompts(count, seed, closed_fraction)}


def write_toy_benchmark(folder: Path | str, per_category: int = 100, seed: int = 20_251_205) -> Path:
    """The held-out toy judge benchmark in VL-RewardBench's schema: for each category, `per_category` pairs
    of a correct response and one with exactly one error. The preferred response's position is random."""
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    rows = []
    for category, made, scene, (question, good, bad) in world.benchmark_draws(rng, per_category):
        name = f"images/{category}-{made:04d}.png"
        world.render(scene, rng).save(folder / name)
        good_first = rng.random() < 0.5
        rows.append({
            "id": f"toy_{category}-{made:04d}", "image_path": name, "query": question.instruction,
            "response": [good, bad] if good_first else [bad, good],
            "human_ranking": [0, 1] if good_first else [1, 0],
            "models": ["ground-truth", "one-error"] if good_first else ["one-error", "ground-truth"],
            "judge": "scene ground truth", "rationale": None, "query_source": "fastjudge-shapes",
            "category": category, "meta": {"kind": question.kind, "answer_type": question.answer_type},
        })
    write_jsonl(folder / "benchmark.jsonl", rows)
    return folder / "benchmark.jsonl"
