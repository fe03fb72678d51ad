"""Dirty input, all at once: a prompt pool holding every kind of bad line and every kind of odd image beside
good ones. Each bad line is a counted skip naming its file, line and reason; each odd image is converted (or
downscaled) and counted; the good lines still make their pairs; the run folder holds every image it uses."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fastjudge import data, loop
from fastjudge.config import LoopConfig
from fastjudge.toy import files as toy_files

SMALL = dict(iterations=1, prompts_per_iteration=40, n_samples=4, min_votes=2, answer_tokens=10, judge_tokens=12,
             epochs=1, batch_size=4, min_gain=-1.0, batch_rows=64, max_image_pixels=48 * 48)

# (the line's JSON or raw bytes, a word of the reason its skip must give)
BAD_LINES = [
    (b"{not json", "malformed JSON"),
    (b"[1, 2]", "expected a JSON object"),
    (b'{"instruction": "what is in the image ?", "kind": "open", "image": "caf\xe9.png"}', "not UTF-8"),
    ({"instruction": "what is in the image ?", "kind": "open"}, "field 'image'"),
    ({"image": "GOOD", "instruction": "   ", "kind": "open"}, "field 'instruction'"),
    ({"image": "GOOD", "instruction": "what is in the image ?", "kind": "essay"}, "field 'kind'"),
    ({"image": "GOOD", "instruction": "how many ?", "kind": "closed", "answer_type": "date"}, "field 'answer_type'"),
    ({"image": "missing.png", "instruction": "what is in the image ?", "kind": "open"}, "image not found"),
    ({"image": "corrupt.png", "instruction": "what is in the image ?", "kind": "open"}, "image unreadable"),
    ({"image": "empty.png", "instruction": "what is in the image ?", "kind": "open"}, "image unreadable"),
    ({"id": "DUPLICATE", "image": "GOOD", "instruction": "what is in the image ?", "kind": "open"}, "already used"),
    ({"id": ["x"], "image": "GOOD", "instruction": "what is in the image ?", "kind": "open"}, "field 'id'"),
    ({"image": "GOOD", "instruction": "describe " * 600 + ".", "kind": "open"}, "tokens, more than"),
]
# images the pool's good lines use besides the toy's own: each must be converted to RGB (or downscaled)
ODD_IMAGES = {
    "gray.png": lambda scene: scene.convert("L"),
    "rgba.png": lambda scene: scene.convert("RGBA"),
    "palette.png": lambda scene: scene.convert("P"),
    "deep.png": lambda scene: Image.fromarray((np.asarray(scene.convert("L"), dtype=np.uint16) * 257)),
    "huge.png": lambda scene: scene.resize((480, 480), Image.NEAREST),
}


@pytest.fixture(scope="module")
def dirty_pool(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dirty")
    pool = toy_files.write_toy_prompts(folder, 40, seed=11, closed_fraction=0.5)
    lines = pool.read_bytes().splitlines()
    first = json.loads(lines[0])
    good_image = first["image"]
    scene = Image.open(folder / good_image).convert("RGB")
    for name, make in ODD_IMAGES.items():
        make(scene).save(folder / name)
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (folder / "empty.png").write_bytes(b"")
    # the odd images replace the images of the first good lines; the duplicate id repeats line 1's
    for i, name in enumerate(ODD_IMAGES):
        row = json.loads(lines[i])
        row["image"] = name
        lines[i] = json.dumps(row).encode()
    lines[0] = json.dumps(dict(json.loads(lines[0]), id="DUPLICATE")).encode()
    bad_at = {}
    for offset, (line, reason) in enumerate(BAD_LINES):
        if isinstance(line, dict):
            line = json.dumps({k: (good_image if v == "GOOD" else v) for k, v in line.items()}).encode()
        lines.insert(3 + 2 * offset, line)  # spread among the good lines
    for number, line in enumerate(lines, start=1):
        for bad, reason in BAD_LINES:
            raw = bad if isinstance(bad, bytes) else json.dumps(
                {k: (good_image if v == "GOOD" else v) for k, v in bad.items()}).encode()
            if line == raw:
                bad_at[number] = reason
    pool.write_bytes(b"\n".join(lines) + b"\n")
    bench = toy_files.write_toy_benchmark(folder / "benchmark", per_category=2)
    return pool, bench, bad_at


def test_every_bad_line_is_a_counted_skip_and_the_good_ones_still_count(tmp_path, tiny_toy_dir, dirty_pool):
    pool, bench, bad_at = dirty_pool
    assert len(bad_at) == len(BAD_LINES)
    cfg = LoopConfig(out=str(tmp_path / "run"), model=str(tiny_toy_dir), prompts=str(pool), bench_data=str(bench),
                     max_prompt_tokens=200, **SMALL)
    summary = loop.run(cfg)
    out = Path(cfg.out)
    skips = {s["line"]: s for s in data.read_jsonl(out / "skipped.jsonl")}
    assert sorted(skips) == sorted(bad_at), "every bad line skipped, and nothing else"
    for line, reason in bad_at.items():
        assert reason in skips[line]["reason"], (line, skips[line])
        assert skips[line]["file"] == str(pool)
    inputs = summary["inputs"]
    assert inputs["skipped_lines"] == len(BAD_LINES) and inputs["prompts"] == 40  # the duplicate id's first line kept
    assert inputs["images"].get("converted", 0) == 4 and inputs["images"].get("downscaled", 0) == 1
    # the odd images' copies in the run folder: RGB, within the pixel limit
    staged = {p.name: p for p in (out / "images").iterdir()}
    for path in staged.values():
        with Image.open(path) as im:
            if path.suffix == ".png" and "-" in path.stem:
                assert im.mode == "RGB" and im.width * im.height <= SMALL["max_image_pixels"]
    # the good lines made their pairs, from images inside the run folder, written relative to it
    pairs = data.read_jsonl(out / "iter_1" / "pairs.jsonl")
    assert pairs and all(not Path(p["image"]).is_absolute() for p in pairs)
    for pair in data.read_records(out / "iter_1" / "pairs.jsonl"):
        assert Path(pair["image"]).is_relative_to(out.resolve()) and Path(pair["image"]).is_file()


def test_a_moved_run_folder_resumes(tmp_path, tiny_toy_dir, dirty_pool):
    """The run holds its images and writes paths relative to itself: moved (pool and benchmark where they
    were), it resumes and redoes nothing that was done."""
    pool, bench, _ = dirty_pool
    cfg = LoopConfig(out=str(tmp_path / "before"), model=str(tiny_toy_dir), prompts=str(pool),
                     bench_data=str(bench), max_prompt_tokens=200, **SMALL)
    loop.run(cfg)
    (tmp_path / "before" / "iter_1" / "metrics.json").unlink()  # as if it stopped during the last eval
    moved = tmp_path / "after"
    (tmp_path / "before").rename(moved)
    sft = (moved / "iter_1" / "sft.jsonl").read_text()
    summary = loop.run(LoopConfig(**(vars(cfg) | {"out": str(moved), "resume": True})))
    assert (moved / "iter_1" / "metrics.json").exists() and summary["iterations"][-1]["iteration"] == 1
    assert (moved / "iter_1" / "sft.jsonl").read_text() == sft
    for trace in data.read_records(moved / "iter_1" / "sft.jsonl"):
        assert Path(trace["image"]).is_relative_to(moved.resolve())


@pytest.mark.parametrize("mode, make", [
    ("L", lambda: Image.new("L", (6, 4), 200)),
    ("1", lambda: Image.new("1", (6, 4), 1)),
    ("RGBA", lambda: Image.new("RGBA", (6, 4), (10, 20, 30, 0))),
    ("LA", lambda: Image.new("LA", (6, 4), (10, 0))),
    ("P", lambda: Image.new("RGB", (6, 4), (250, 20, 20)).convert("P")),
    ("CMYK", lambda: Image.new("CMYK", (6, 4), (0, 255, 255, 0))),
    ("I;16", lambda: Image.fromarray(np.full((4, 6), 51400, dtype=np.uint16))),
    ("I", lambda: Image.fromarray(np.full((4, 6), 51400, dtype=np.int32))),
    ("F", lambda: Image.fromarray(np.full((4, 6), 300.0, dtype=np.float32))),
])
def test_every_image_mode_loads_as_8_bit_rgb(tmp_path, mode, make):
    image = make()
    rgb = data.to_rgb(image)
    assert rgb.mode == "RGB" and rgb.size == (6, 4)
    expected = {"L": 200, "1": 255, "RGBA": 255, "LA": 255, "P": image.convert("RGB").getpixel((0, 0)),
                "CMYK": (255, 0, 0), "I;16": 200, "I": 200, "F": 255}[mode]
    # transparent: white; 16-bit 51400 -> 200; float clipped to 255; the palette's own colour
    pixel = rgb.getpixel((0, 0))
    if isinstance(expected, int):
        assert pixel == (expected,) * 3
    else:
        assert max(abs(a - b) for a, b in zip(pixel, expected)) <= 3
    image.save(tmp_path / "x.tiff")  # TIFF holds every one of these modes
    assert data.load_image(tmp_path / "x.tiff").getpixel((0, 0)) == pixel
