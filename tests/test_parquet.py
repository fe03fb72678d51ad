"""Parquet as the Hub has it: prompt pools in LLaVA-OneVision-Data's schema (embedded images, conversations,
bad rows among good ones), sampled across shards, and the same pairs as the same prompts given as JSONL."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fastjudge import data, loop
from fastjudge.config import LoopConfig
from fastjudge.data import parquet
from fastjudge.toy import files as toy_files

# an answer of each kind the toy pool's questions have: the rule classes them as the pool does
ANSWERS = {("closed", "number"): "2", ("closed", "short"): "small",
           ("closed", "option"): "(B)", ("open", None): "a small red circle at the top left of the image ."}


def llava_rows(pool: Path) -> list[dict]:
    """The toy pool's lines as LLaVA-OneVision-Data rows: the image's bytes, the instruction after <image>."""
    out = []
    for line in pool.read_text().splitlines():
        row = json.loads(line)
        image = (pool.parent / row["image"]).read_bytes()
        answer = ANSWERS[(row["kind"], row.get("answer_type"))]
        out.append({"id": row["id"], "image": {"bytes": image, "path": None},
                    "conversations": [{"from": "human", "value": "<image>\n" + row["instruction"]},
                                      {"from": "gpt", "value": answer}],
                    "data_source": "toy"})
    return out


def write_shards(rows: list[dict], folder: Path, shards: int, row_group: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    size = -(-len(rows) // shards)
    for k in range(shards):  # contiguous: the shards in name order hold the rows in order
        part = rows[k * size:(k + 1) * size]
        path = folder / f"train-{k:05d}-of-{shards:05d}.parquet"
        pq.write_table(pa.Table.from_pylist(part), path, row_group_size=row_group)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    folder = tmp_path_factory.mktemp("parquet-pool")
    jsonl = toy_files.write_toy_prompts(folder / "world", 24, seed=4, closed_fraction=0.5)
    return jsonl, llava_rows(jsonl)


def test_the_answer_rule_classes_numbers_options_short_and_open_answers():
    for answer, expected in [("12", ("closed", "number")), ("-3.5", ("closed", "number")),
                             ("1,024", ("closed", "number")), ("40%", ("closed", "number")),
                             ("12.", ("closed", "number")), ("B", ("closed", "option")),
                             ("(C)", ("closed", "option")), ("D.", ("closed", "option")),
                             ("red", ("closed", "short")), ("Big red car", ("closed", "short")),
                             ("The car is red", ("open", None)), ("yes\nno", ("open", None)),
                             ("a" * 40, ("open", None))]:
        assert parquet.classify_answer(answer) == expected, answer


def test_a_parquet_pool_gives_the_same_pairs_as_the_same_prompts_in_jsonl(tmp_path, pool, tiny_toy_dir):
    jsonl, rows = pool
    shards = write_shards(rows, tmp_path / "shards", shards=2, row_group=5)
    common = dict(model=str(tiny_toy_dir), iterations=1, prompts_per_iteration=24, n_samples=4, min_votes=2,
                  answer_tokens=10, judge_tokens=12, epochs=1, batch_size=4, batch_rows=64, toy_bench_per_category=2)
    pairs = {}
    for name, prompts in (("jsonl", str(jsonl)), ("parquet", str(shards[0].parent))):
        cfg = LoopConfig(out=str(tmp_path / name), prompts=prompts, **common)
        loop.run(cfg)
        pairs[name] = data.read_jsonl(tmp_path / name / "iter_1" / "pairs.jsonl")
        assert data.read_jsonl(tmp_path / name / "skipped.jsonl") == []
    assert pairs["parquet"] == pairs["jsonl"] and pairs["jsonl"]


def test_bad_rows_are_counted_skips_naming_file_row_and_column(tmp_path, pool):
    _, rows = pool
    good = rows[:4]
    bad = [dict(good[0], id="text-only", image=None),
           dict(good[0], id="two-images", conversations=[{"from": "human", "value": "<image><image> which ?"}]),
           dict(good[0], id="no-question", conversations=[{"from": "gpt", "value": "2"}]),
           dict(good[0], id="not-an-image", image={"bytes": b"\x89PNG\r\n\x1a\n broken", "path": None}),
           dict(good[1]),  # its id again
           dict(good[0], id=None)]
    path = tmp_path / "pool.parquet"
    pq.write_table(pa.Table.from_pylist(good + bad), path, row_group_size=3)
    records, skips, counts = parquet.load_prompts(path, parquet.Columns(), tmp_path / "images", 48 * 48)
    assert [r.id for r in records] == [r["id"] for r in good]
    reasons = {s.line: s.reason for s in skips}
    assert {s.file for s in skips} == {str(path)} and sorted(reasons) == [5, 6, 7, 8, 9, 10]
    for row, word in zip(range(5, 11), ["no image", "several images", "no instruction", "image unreadable",
                                        "already used", "expected a non-empty id"]):
        assert word in reasons[row], (row, reasons[row])
    assert all(Path(r.image).parent == tmp_path / "images" and Path(r.image).is_file() for r in records)
    assert sum(counts.values()) == 4 and records[0].line == 1 and records[0].source == str(path)


def test_sampling_draws_uniformly_across_shards_reproducibly(tmp_path, pool):
    _, rows = pool
    shards = write_shards(rows, tmp_path / "shards", shards=3, row_group=4)
    glob = str(tmp_path / "shards" / "*.parquet")
    first, _, _ = parquet.load_prompts(glob, parquet.Columns(), tmp_path / "images", 48 * 48, sample=9, seed=1)
    again, _, _ = parquet.load_prompts(glob, parquet.Columns(), tmp_path / "images", 48 * 48, sample=9, seed=1)
    other, _, _ = parquet.load_prompts(glob, parquet.Columns(), tmp_path / "images", 48 * 48, sample=9, seed=2)
    assert [r.id for r in first] == [r.id for r in again] != [r.id for r in other]
    assert len({r.id for r in first}) == 9 and len({r.source for r in first}) >= 2
    # every row is drawn about as often: 500 draws of 6 of the 24 rows, each row expected 125 times (5 standard
    # deviations: 76 to 174)
    hits = {r["id"]: 0 for r in rows}
    for seed in range(500):
        for _, _, values in parquet.rows(shards, ["id"], sample=6, seed=seed):
            hits[values["id"]] += 1
    assert min(hits.values()) > 76 and max(hits.values()) < 174, hits


def test_a_column_mapping_reads_another_schema(tmp_path, pool):
    _, rows = pool
    other = [{"qid": r["id"], "img": r["image"]["bytes"], "question": r["conversations"][0]["value"],
              "type": "closed" if i % 2 else "open"} for i, r in enumerate(rows[:6])]
    path = tmp_path / "other.parquet"
    pq.write_table(pa.Table.from_pylist(other), path)
    columns = parquet.Columns.parse("id=qid,image=img,instruction=question,answer=none,kind=type")
    records, skips, _ = parquet.load_prompts(path, columns, tmp_path / "images", 48 * 48)
    assert not skips and [r.kind for r in records] == ["open", "closed"] * 3
    assert all(r.answer_type == "short" for r in records if r.kind == "closed")
    with pytest.raises(ValueError, match=r"no column 'id', 'image' \(it has qid, img"):
        list(parquet.rows([path], ["id", "image"]))
    with pytest.raises(ValueError, match="prompt_columns: expected name=column"):
        parquet.Columns.parse("picture=img")


def test_a_sample_of_a_jsonl_pool_is_drawn_the_same_way(tmp_path, pool):
    jsonl, _ = pool
    from fastjudge.gate import Gate
    records = Gate(tmp_path).prompts(jsonl, 48 * 48, sample=5, seed=3)
    everything = data.load_prompts(jsonl)[0]
    ids = [r.id for r in everything]
    assert len(records) == 5 and [r.id for r in records] == sorted((r.id for r in records), key=ids.index)
    assert random.Random(3).sample(range(len(ids)), 5)  # the draw is seeded: the same five every time
    assert [r.id for r in Gate(tmp_path / "again").prompts(jsonl, 48 * 48, sample=5, seed=3)] == [r.id for r in records]


def test_vlrewardbench_from_its_parquet_scores_as_from_its_jsonl(tmp_path, capsys, tiny_toy_dir):
    """The real VL-RewardBench lines of tests/fixtures as the Hub has them (one parquet file, images embedded in
    `image`): `eval` writes the same predictions and metrics as from data.jsonl and an images folder, and `score`
    gives the same figures from either file."""
    import numpy as np
    from PIL import Image

    from conftest import VLRB_FIXTURE
    from fastjudge import cli
    lines = [json.loads(line) for line in VLRB_FIXTURE.read_text().splitlines()[:6]]
    rs = np.random.RandomState(0)
    rows = []
    for line in lines:
        target = tmp_path / "images" / line["image_path"]
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rs.randint(0, 256, (40, 52, 3), dtype=np.uint8)).save(target)
        row = {k: v for k, v in line.items() if k not in ("image_path", "meta", "human_error_analysis")}
        rows.append(dict(row, image={"bytes": target.read_bytes(), "path": line["image_path"]}))
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text("".join(json.dumps(line) + "\n" for line in lines))
    table = tmp_path / "test-00000-of-00001.parquet"
    pq.write_table(pa.Table.from_pylist(rows), table, row_group_size=4)
    results = {}
    for name, extra in (("jsonl", ["--data", str(jsonl), "--images", str(tmp_path / "images")]),
                        ("parquet", ["--data", str(table)])):
        out = tmp_path / name
        assert cli.main(["eval", "--bench", "vlrewardbench", *extra, "--judge", str(tiny_toy_dir), "--k", "2",
                         "--judge-tokens", "12", "--out", str(out)]) == 0
        capsys.readouterr()
        results[name] = (data.read_jsonl(out / "predictions.jsonl"), json.loads((out / "metrics.json").read_text()))
    assert results["parquet"] == results["jsonl"]
    assert len(list((tmp_path / "parquet" / "bench-images").iterdir())) == len(lines)
    scores = []
    for source in (jsonl, table):
        assert cli.main(["score", "--format", "vlrewardbench", "--data", str(source), "--predictions",
                         str(tmp_path / "jsonl" / "predictions.jsonl"), "--k", "2"]) == 0
        scores.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1]))
    assert scores[0] == scores[1] == results["jsonl"][1]
