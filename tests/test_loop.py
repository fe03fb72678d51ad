"""`fastjudge iterate` end to end on the CPU: outputs, schema, bad input, resume, reproducibility."""

import json
import os
from pathlib import Path

import pytest
from PIL import Image

from fastjudge import cli, data, loop
from fastjudge.config import LoopConfig
from fastjudge.toy import files as toy_files

SMALL = dict(iterations=1, prompts_per_iteration=8, n_samples=4, min_votes=2, answer_tokens=10, judge_tokens=12,
             epochs=1, batch_size=4, min_gain=-1.0, batch_rows=64)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("inputs")
    prompts = toy_files.write_toy_prompts(folder / "world", 8, seed=3)
    # bad lines: each must become a counted skip naming file, line and reason
    Image.new("RGB", (4, 4)).save(folder / "world" / "ok.png")
    (folder / "world" / "broken.png").write_bytes(b"not a png")
    with prompts.open("a") as f:
        f.write("{not json\n")
        f.write(json.dumps({"image": "images/p00000.png", "instruction": "", "kind": "open"}) + "\n")
        f.write(json.dumps({"image": "missing.png", "instruction": "describe the image .", "kind": "open"}) + "\n")
        f.write(json.dumps({"image": "broken.png", "instruction": "describe the image .", "kind": "open"}) + "\n")
        f.write(json.dumps({"instruction": "describe the image .", "kind": "open"}) + "\n")
    bench = toy_files.write_toy_benchmark(folder / "benchmark", per_category=2)
    return prompts, bench


def _run(tmp_path, model_dir, inputs, name="run", **extra):
    prompts, bench = inputs
    cfg = LoopConfig(out=str(tmp_path / name), model=str(model_dir), prompts=str(prompts), bench_data=str(bench),
                     **(SMALL | extra))
    return cfg, loop.run(cfg)


def test_iterate_writes_every_output(tmp_path, tiny_toy_dir, inputs):
    cfg, summary = _run(tmp_path, tiny_toy_dir, inputs)
    out = Path(cfg.out)
    assert [e["iteration"] for e in summary["iterations"]] == [0, 1]
    for entry in summary["iterations"]:
        metrics = entry["metrics"]
        assert set(metrics) == {"overall", "macro", "categories"}
        assert set(metrics["categories"]) <= {"attribute", "count", "spatial", "existence", "vqa"}
        for value in [metrics["overall"], metrics["macro"], *metrics["categories"].values()]:
            assert value is None or 0.0 <= value <= 1.0
    assert set(summary["iterations"][1]["seconds"]) == {"synth", "filter", "train", "eval"}
    assert json.loads((out / "summary.json").read_text()) == summary
    overall = [e["metrics"]["overall"] for e in summary["iterations"]]
    assert summary["best"]["overall"] == max(overall)
    assert overall[summary["best"]["iteration"]] == max(overall)
    for name in ("pairs.jsonl", "judgments.jsonl", "sft.jsonl", "metrics.json", "predictions.jsonl",
                 "outputs.jsonl", "checkpoint/config.json", "checkpoint/model.safetensors"):
        assert (out / "iter_1" / name).exists(), name
    assert (out / "iter_0" / "metrics.json").exists()
    assert (out / "accuracy.png").stat().st_size > 1000
    assert LoopConfig.load(out / "config.json") == cfg
    assert not list(out.rglob("*.tmp")), "a temporary file was left behind"

    pairs = data.read_jsonl(out / "iter_1" / "pairs.jsonl")
    assert summary["iterations"][1]["pairs"] == len(pairs)
    traces = data.read_jsonl(out / "iter_1" / "sft.jsonl")
    kept_pairs = len({t["pair"] for t in traces})
    assert len(traces) == 2 * kept_pairs  # one A and one B trace per kept pair (--filter-traces 1)
    assert summary["iterations"][1]["kept"] == kept_pairs
    assert summary["iterations"][1]["keep_rate"] == pytest.approx(kept_pairs / len(pairs))
    judgments = data.read_jsonl(out / "iter_1" / "judgments.jsonl")
    assert len(judgments) == 2 * len(pairs) * cfg.filter_samples  # both orders of each pair, k judgments each

    # the five bad prompt lines are counted skips with file, line and reason; the run went on
    skips = data.read_jsonl(out / "skipped.jsonl")
    assert [s["line"] for s in skips] == [9, 10, 11, 12, 13]
    assert all(s["file"].endswith("prompts.jsonl") for s in skips)
    reasons = " | ".join(s["reason"] for s in skips)
    for word in ("malformed JSON", "'instruction'", "image not found", "image unreadable", "'image'"):
        assert word in reasons

    # predictions: k=1 sample per benchmark item, scored items + excluded = all items
    predictions = data.read_jsonl(out / "iter_1" / "predictions.jsonl")
    assert sorted(p["index"] for p in predictions) == list(range(10))
    counts = json.loads((out / "iter_1" / "metrics.json").read_text())["items"]
    assert counts["agree"] + counts["reject"] + counts["excluded"] == 10


def test_resume_redoes_only_missing_stages(tmp_path, tiny_toy_dir, inputs):
    cfg, first = _run(tmp_path, tiny_toy_dir, inputs)
    out = Path(cfg.out)
    pairs_time = os.stat(out / "iter_1" / "pairs.jsonl").st_mtime_ns
    sft_time = os.stat(out / "iter_1" / "sft.jsonl").st_mtime_ns
    (out / "iter_1" / "metrics.json").unlink()  # as if the run had stopped during eval

    with pytest.raises(ValueError, match="^out: .*--resume"):
        loop.run(LoopConfig(**(vars(cfg) | {"resume": False})))
    again = loop.run(LoopConfig(**(vars(cfg) | {"resume": True})))
    assert os.stat(out / "iter_1" / "pairs.jsonl").st_mtime_ns == pairs_time
    assert os.stat(out / "iter_1" / "sft.jsonl").st_mtime_ns == sft_time
    assert again["iterations"][1]["metrics"] == first["iterations"][1]["metrics"]


def test_same_seed_same_run(tmp_path, tiny_toy_dir, inputs):
    a, _ = _run(tmp_path, tiny_toy_dir, inputs, name="a")
    b, _ = _run(tmp_path, tiny_toy_dir, inputs, name="b")
    for name in ("pairs.jsonl", "judgments.jsonl", "predictions.jsonl"):
        assert (Path(a.out) / "iter_1" / name).read_text() == (Path(b.out) / "iter_1" / name).read_text()


def test_cli_reports_bad_config_before_any_work(tmp_path, capsys):
    code = cli.main(["iterate", "--out", str(tmp_path / "x"), "--model", str(tmp_path / "nope")])
    assert code == 2
    assert "model: no checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    assert cli.main(["iterate", "--out", str(tmp_path / "y"), "--top-p", "0"]) == 2
    assert "top_p" in capsys.readouterr().err


def test_cli_help_lists_every_stage(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    text = capsys.readouterr().out
    for command in ("iterate", "synth", "filter", "train", "eval", "toy-pretrain"):
        assert command in text
