"""Prompt pools and benchmarks on disk: loaders with counted skips, atomic JSONL writes, the toy world's files."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from fastjudge.data import Skip, load_benchmark, load_prompts, read_jsonl, write_jsonl
from fastjudge.toy import files as toy_files
from fastjudge.toy import world


def png(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (200, 10, 10)).save(path)
    return path


def write_lines(path: Path, lines: list) -> Path:
    """Each entry is a raw string (written as is) or an object (written as JSON)."""
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


@pytest.fixture
def folder(tmp_path):
    png(tmp_path / "ok.png")
    png(tmp_path / "sub" / "deep.png")
    (tmp_path / "garbage.png").write_bytes(b"this is not a png at all \x00\x01\x02")
    return tmp_path


def test_load_prompts_keeps_good_lines_and_counts_bad_ones(folder):
    absolute = png(folder / "elsewhere" / "abs.png").resolve()
    lines = [
        {"image": "ok.png", "instruction": "describe the image .", "kind": "open"},  # 1
        "",  # 2: blank
        "   ",  # 3: blank
        '{"image": "ok.png", "instruction": ',  # 4: malformed JSON
        '["ok.png", "describe", "open"]',  # 5: a list
        {"instruction": "describe", "kind": "open"},  # 6: no image
        {"image": "missing.png", "instruction": "describe", "kind": "open"},  # 7
        {"image": "garbage.png", "instruction": "describe", "kind": "open"},  # 8
        {"image": "ok.png", "instruction": "  ", "kind": "open"},  # 9
        {"image": "ok.png", "instruction": "describe", "kind": "essay"},  # 10
        {"image": "ok.png", "instruction": "how many ?", "kind": "closed", "answer_type": "essay"},  # 11
        {"id": "custom", "image": "sub/deep.png", "instruction": " how many ? ", "kind": "closed"},  # 12
        {"image": str(absolute), "instruction": "which ?", "kind": "closed", "answer_type": "option"},  # 13
        {"image": 5, "instruction": "describe", "kind": "open"},  # 14: image not a string
    ]
    path = write_lines(folder / "pool.jsonl", lines)
    records, skips = load_prompts(path)

    assert all(isinstance(s, Skip) and s.file == str(path) for s in skips)
    reasons = {s.line: s.reason for s in skips}
    assert sorted(reasons) == [4, 5, 6, 7, 8, 9, 10, 11, 14]
    assert "JSON" in reasons[4]
    assert "object" in reasons[5] and "list" in reasons[5]
    for line, field in [(6, "image"), (7, "image"), (8, "image"), (9, "instruction"), (10, "kind"),
                        (11, "answer_type"), (14, "image")]:
        assert f"'{field}'" in reasons[line], (line, reasons[line])
    assert "not found" in reasons[7] and "missing.png" in reasons[7]
    assert "unreadable" in reasons[8] and "garbage.png" in reasons[8]
    assert "essay" in reasons[10] and "essay" in reasons[11]

    assert [r.id for r in records] == ["pool-1", "custom", "pool-13"]
    first, second, third = records
    assert first.image == str((folder / "ok.png").resolve()) and Path(first.image).is_absolute()
    assert (first.instruction, first.kind, first.answer_type) == ("describe the image .", "open", None)
    assert second.image == str((folder / "sub" / "deep.png").resolve())
    assert (second.instruction, second.kind, second.answer_type) == ("how many ?", "closed", "short")
    assert third.image == str(absolute) and third.answer_type == "option"


def test_load_prompts_relative_to_the_jsonl_folder(folder, monkeypatch, tmp_path_factory):
    path = write_lines(folder / "pool.jsonl", [{"image": "ok.png", "instruction": "describe", "kind": "open"}])
    monkeypatch.chdir(tmp_path_factory.mktemp("elsewhere"))  # the working directory does not matter
    records, skips = load_prompts(path)
    assert not skips and records[0].image == str((folder / "ok.png").resolve())


def test_load_prompts_missing_file(tmp_path):
    with pytest.raises(ValueError, match="prompts"):
        load_prompts(tmp_path / "nope.jsonl")
    with pytest.raises(ValueError):
        load_prompts(tmp_path)  # a folder is not a file


def bench_row(**overrides) -> dict:
    row = {"id": "RLHF_1", "image_path": "ok.png", "query": "what is this ?", "response": ["good", "bad"],
           "human_ranking": [0, 1]}
    row.update(overrides)
    return {k: v for k, v in row.items() if v is not ...}


def test_load_benchmark_keeps_good_lines_and_counts_bad_ones(folder):
    lines = [
        bench_row(id="first"),  # line 1, index 0
        "",  # line 2, blank: no index
        bench_row(query=...),  # line 3, index 1
        bench_row(query="  "),  # line 4, index 2
        bench_row(response=["only one"]),  # line 5, index 3
        bench_row(response=["text", 3]),  # line 6, index 4
        bench_row(response="good"),  # line 7, index 5
        bench_row(human_ranking=[1, 1]),  # line 8, index 6
        bench_row(human_ranking=[0]),  # line 9, index 7
        bench_row(image_path=...),  # line 10, index 8
        bench_row(image_path="missing.png"),  # line 11, index 9
        bench_row(image_path="garbage.png"),  # line 12, index 10
        bench_row(id="last", image_path="sub/deep.png", human_ranking=[1, 0], category="count"),  # 13, index 11
    ]
    path = write_lines(folder / "bench.jsonl", lines)
    items, skips = load_benchmark(path)

    reasons = {s.line: s.reason for s in skips}
    assert all(s.file == str(path) for s in skips)
    assert sorted(reasons) == list(range(3, 13))
    expected_field = {3: "query", 4: "query", 5: "response", 6: "response", 7: "response", 8: "human_ranking",
                      9: "human_ranking", 10: "image_path", 11: "image_path", 12: "image_path"}
    for line, field in expected_field.items():
        assert f"'{field}'" in reasons[line], (line, reasons[line])

    assert [(it["id"], it["index"]) for it in items] == [("first", 0), ("last", 11)]
    assert items[0]["image"] == str((folder / "ok.png").resolve())
    assert items[1]["image"] == str((folder / "sub" / "deep.png").resolve())
    assert items[1]["human_ranking"] == [1, 0] and items[1]["category"] == "count"  # other fields kept


def test_load_benchmark_images_folder(folder, tmp_path_factory):
    images = tmp_path_factory.mktemp("images")
    png(images / "only-here.png")
    path = write_lines(folder / "bench.jsonl", [bench_row(image_path="only-here.png")])
    assert load_benchmark(path)[0] == []  # not next to the JSONL
    items, skips = load_benchmark(path, images=images)
    assert not skips and items[0]["image"] == str((images / "only-here.png").resolve())


@pytest.mark.parametrize("bad_line", ['{"id": "broken", ', '["a", "list"]'])
def test_load_benchmark_unparseable_line_consumes_an_index(folder, bad_line):
    path = write_lines(folder / "bench.jsonl", [bench_row(id="a"), bad_line, bench_row(id="c")])
    items, skips = load_benchmark(path)
    assert [s.line for s in skips] == [2]
    assert [(it["id"], it["index"]) for it in items] == [("a", 0), ("c", 2)]


def test_load_benchmark_missing_file(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        load_benchmark(tmp_path / "nope.jsonl")


def test_write_jsonl_is_atomic_and_round_trips(tmp_path):
    rows = [{"a": 1, "b": [1, 2]}, {"text": "caf\u00e9 \"quoted\"\nnewline"}, {}]
    path = tmp_path / "deeper" / "rows.jsonl"
    assert write_jsonl(path, iter(rows)) == 3  # a generator works; parent folders are made
    assert read_jsonl(path) == rows
    assert sorted(p.name for p in path.parent.iterdir()) == ["rows.jsonl"]  # no .tmp left behind

    assert write_jsonl(path, [{"x": 0}]) == 1  # replaces, does not append
    assert read_jsonl(path) == [{"x": 0}]

    def failing():
        yield {"y": 1}
        raise RuntimeError("writer died")

    with pytest.raises(RuntimeError):
        write_jsonl(path, failing())
    assert read_jsonl(path) == [{"x": 0}]  # the old file is intact: a reader never sees half a file


def test_write_toy_prompts_loads_cleanly(tmp_path):
    path = toy_files.write_toy_prompts(tmp_path / "pool", count=12, seed=3, closed_fraction=0.5)
    records, skips = load_prompts(path)
    assert skips == [] and len(records) == 12
    assert {r.kind for r in records} <= {"open", "closed"}
    assert len(list((tmp_path / "pool" / "images").glob("*.png"))) == 12
    for r in records:
        with Image.open(r.image) as im:
            assert im.size == (world.IMAGE_SIZE, world.IMAGE_SIZE)
        assert (r.answer_type is None) == (r.kind == "open")
        if r.kind == "open":
            assert r.instruction in world.OPEN_INSTRUCTIONS
    kinds = Counter(r.kind for r in load_prompts(toy_files.write_toy_prompts(tmp_path / "all", 6, 1, 1.0))[0])
    assert kinds == {"closed": 6}
    kinds = Counter(r.kind for r in load_prompts(toy_files.write_toy_prompts(tmp_path / "none", 6, 1, 0.0))[0])
    assert kinds == {"open": 6}


def check_toy_rows(rows: list[dict]) -> None:
    for row in rows:
        good = row["human_ranking"].index(0)
        assert sorted(row["human_ranking"]) == [0, 1]
        assert row["models"][good] == "ground-truth" and row["models"][1 - good] == "one-error"
        assert row["response"][0] != row["response"][1]


def test_write_toy_benchmark_small(tmp_path):
    path = toy_files.write_toy_benchmark(tmp_path, per_category=3, seed=5)
    rows = read_jsonl(path)
    assert len(rows) == 15
    assert Counter(row["category"] for row in rows) == {c: 3 for c in world.CATEGORIES}
    check_toy_rows(rows)
    items, skips = load_benchmark(path)
    assert skips == [] and [it["index"] for it in items] == list(range(15))
    assert all(Path(it["image"]).is_file() for it in items)


def test_write_toy_benchmark_both_orders(tmp_path):
    rows = read_jsonl(toy_files.write_toy_benchmark(tmp_path, per_category=20, seed=7))
    assert len(rows) == 100
    check_toy_rows(rows)
    firsts = Counter(row["human_ranking"][0] for row in rows)
    assert firsts[0] > 0 and firsts[1] > 0  # the preferred response is not always listed first
