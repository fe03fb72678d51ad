"""The input gate, from every entry point: an over-long text is a counted skip naming its file, line and field in
each command as in `iterate`, a huge image is downscaled (or, past the decode budget, refused from its header
with bounded memory), the engine refuses a prompt longer than the context, and each command owns its output."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fastjudge import cli, data
from fastjudge.data import prompts as prompt_texts
from fastjudge.gate import Gate
from fastjudge.toy import files as toy_files

LONG = "describe " * 600 + "."
# a child process's own peak resident memory in MB, as Python source (see test_bad_input_matrix.PEAK_MB)
PEAK_MB = "next(int(line.split()[1]) for line in open('/proc/self/status') if line.startswith('VmHWM')) // 1024"  # 601 words: the toy model's context is 512 tokens
FAST = ["--batch-rows", "64"]


def run_cli(capsys, argv):
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def skips_of(path: Path) -> list[dict]:
    return data.read_jsonl(path)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A small toy pool and benchmark, and the toy judge's own pairs, candidates and SFT traces."""
    folder = tmp_path_factory.mktemp("gate")
    pool = toy_files.write_toy_prompts(folder / "world", 6, seed=5, closed_fraction=0.5)
    bench = toy_files.write_toy_benchmark(folder / "benchmark", per_category=1)
    pairs_file, candidates_file = toy_files.write_judge_examples(bench, folder / "judge")
    image = json.loads(pool.read_text().splitlines()[0])["image"]
    return dict(folder=folder, pool=pool, bench=bench, pairs=pairs_file, candidates=candidates_file,
                image=str((pool.parent / image).resolve()))


def with_line(path: Path, out: Path, change) -> tuple[Path, int]:
    """A copy of JSONL `path` at `out` whose second line is `change(line's object)`, its image paths made
    absolute; returns it and that line."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    for key in ("image", "image_path"):
        rows = [dict(r, **{key: str((path.parent / r[key]).resolve())}) if key in r else r for r in rows]
    rows[1] = change(rows[1])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out, 2


def test_synth_skips_an_over_long_instruction_and_downscales_a_huge_image(tmp_path, capsys, world, tiny_toy_dir):
    big = tmp_path / "big.png"
    Image.open(world["image"]).convert("RGB").resize((400, 400)).save(big)
    pool, line = with_line(world["pool"], tmp_path / "pool.jsonl", lambda r: dict(r, instruction=LONG))
    rows = pool.read_text().splitlines()
    rows[0] = json.dumps(dict(json.loads(rows[0]), image=str(big)))
    pool.write_text("\n".join(rows) + "\n")
    out = tmp_path / "run" / "pairs.jsonl"
    code, _, err = run_cli(capsys, ["synth", "--model", str(tiny_toy_dir), "--prompts", str(pool), "--out", str(out),
                                    "--n-samples", "2", "--min-votes", "1", "--answer-tokens", "8",
                                    "--max-image-pixels", str(64 * 64), *FAST])
    assert code == 0, err
    skipped = skips_of(out.parent / "skipped-synth.jsonl")
    assert [(s["file"], s["line"]) for s in skipped] == [(str(pool), line)]
    assert "field 'instruction'" in skipped[0]["reason"] and "tokens, more than" in skipped[0]["reason"]
    staged = [Image.open(p) for p in (out.parent / "images").iterdir()]
    assert staged and all(im.width * im.height <= 64 * 64 for im in staged)
    assert json.loads(out.parent.joinpath("inputs.json").read_text())["images"]["downscaled"] == 1
    assert all(LONG not in p["instruction"] for p in data.read_records(out))


def test_filter_skips_a_pair_whose_judge_prompt_does_not_fit(tmp_path, capsys, world, tiny_toy_dir):
    pairs = [{"id": f"p{i}", "image": world["image"], "instruction": "how many objects are there ?",
              "kind": "closed", "good": "the answer is 2 .", "bad": "the answer is 3 .", "source": "vote"}
             for i in range(3)]
    pairs[1]["good"] = LONG
    path = tmp_path / "pairs.jsonl"
    data.write_records(path, pairs)
    out = tmp_path / "filter"
    code, _, err = run_cli(capsys, ["filter", "--judge", str(tiny_toy_dir), "--pairs", str(path), "--out", str(out),
                                    "--judge-tokens", "12", "--filter-samples", "2", *FAST])
    assert code == 0, err
    skipped = skips_of(out / "skipped-filter.jsonl")
    assert [(s["file"], s["line"]) for s in skipped] == [(str(path), 2)]
    assert "field 'good, bad'" in skipped[0]["reason"]
    judged = {j["id"] for j in data.read_jsonl(out / "judgments.jsonl")}
    assert judged == {"p0", "p2"}


def test_train_skips_a_trace_longer_than_the_context(tmp_path, capsys, world, tiny_toy_dir):
    target = prompt_texts.judge_target(prompt_texts.toy_reasoning("the answer is 2 .", True, False), "A")
    prompt = prompt_texts.judge_prompt("how many objects are there ?", "the answer is 2 .", "the answer is 3 .")
    traces = [{"image": world["image"], "prompt": prompt, "target": target, "pair": i, "verdict": "A"}
              for i in range(3)]
    traces[2]["target"] = LONG
    path = tmp_path / "sft.jsonl"
    data.write_records(path, traces)
    code, out, err = run_cli(capsys, ["train", "--judge", str(tiny_toy_dir), "--sft", str(path), "--out",
                                      str(tmp_path / "ckpt"), "--epochs", "1", "--batch-size", "2"])
    assert code == 0, err
    skipped = skips_of(tmp_path / "skipped-train.jsonl")
    assert [(s["file"], s["line"]) for s in skipped] == [(str(path), 3)]
    assert json.loads(out.splitlines()[-1])["skipped"] == 1


def test_eval_skips_an_item_whose_judge_prompt_does_not_fit_and_scores_it_unpredicted(tmp_path, capsys, world,
                                                                                         tiny_toy_dir):
    bench, line = with_line(world["bench"], tmp_path / "bench" / "benchmark.jsonl",
                            lambda r: dict(r, response=[LONG, r["response"][1]]))
    out = tmp_path / "eval"
    code, stdout, err = run_cli(capsys, ["eval", "--judge", str(tiny_toy_dir), "--data", str(bench), "--images",
                                         str(world["bench"].parent), "--out", str(out), "--judge-tokens", "12",
                                         *FAST])
    assert code == 0, err
    skipped = skips_of(out / "skipped-eval.jsonl")
    assert [(s["file"], s["line"]) for s in skipped] == [(str(bench), line)]
    predicted = {p["index"] for p in data.read_jsonl(out / "predictions.jsonl")}
    assert line - 1 not in predicted and len(predicted) == len(bench.read_text().splitlines()) - 1


@pytest.mark.parametrize("command", ["judge", "rank"])
def test_judge_and_rank_skip_an_answer_too_long_for_the_context(tmp_path, capsys, world, tiny_toy_dir, command):
    if command == "judge":
        path, line = with_line(world["pairs"], tmp_path / "in.jsonl", lambda r: dict(r, response_b=LONG))
        flag, result = "--pairs", "judgments.jsonl"
    else:
        path, line = with_line(world["candidates"], tmp_path / "in.jsonl",
                               lambda r: dict(r, answers=[*r["answers"][:1], LONG]))
        flag, result = "--candidates", "rankings.jsonl"
    images = world["pairs"].parent if command == "judge" else world["candidates"].parent
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, [command, "--judge", str(tiny_toy_dir), flag, str(path), "--images", str(images),
                                    "--out", str(out), "--judge-tokens", "8"])
    assert code == 0, err
    skipped = skips_of(out / f"skipped-{command}.jsonl")
    assert [(s["file"], s["line"]) for s in skipped] == [(str(path), line)]
    rows = data.read_jsonl(out / result)
    assert len(rows) == len(path.read_text().splitlines()) - 1 and all(LONG not in json.dumps(r) for r in rows)
    assert not (out / "partial-batches").exists()  # the stored batches go once the results are written


def test_the_engine_refuses_a_prompt_longer_than_the_context(tiny_toy_dir):
    from fastjudge.models import ToyAdapter
    adapter = ToyAdapter.load(tiny_toy_dir)
    image = Image.new("RGB", (32, 32))
    with pytest.raises(ValueError, match=r"^prompts\[1\]: \d+ tokens, more than the model's context of 512"):
        adapter.generate([image, image], ["how many ?", LONG], max_new_tokens=2)
    with pytest.raises(ValueError, match=r"^prompts\[0\]: \d+ tokens, more than the model's context"):
        adapter.choice_probabilities([image], [LONG], ["verdict : [["], ("A", "B"))


def test_gate_fit_names_file_line_and_field_and_refuses_when_nothing_fits(tmp_path):
    class Model:  # a stand-in: one token per word, a context of 10
        context_length = 10

        def prompt_tokens(self, text):
            return len(text.split())
    gate = Gate(tmp_path)
    rows = ["a b c", "a b c d e f g h", "a"]
    kept = gate.fit(Model(), rows, lambda r: len(r.split()), 4, lambda i, r: ("in.jsonl", i + 1), "text")
    assert kept == ["a b c", "a"]
    assert data.read_jsonl(tmp_path / "skipped.jsonl") == [
        {"file": "in.jsonl", "line": 2, "reason": "field 'text': 8 tokens, more than the 6 a prompt may have (10 "
                                                  "of context, 4 for the answer)"}]
    with pytest.raises(ValueError, match="every input is longer than the 6 tokens"):
        gate.fit(Model(), ["a b c d e f g"], lambda r: len(r.split()), 4, lambda i, r: ("in.jsonl", i + 1), "text")
    assert len(data.read_jsonl(tmp_path / "skipped.jsonl")) == 2  # every skip stays on record


def test_a_16_bit_png_past_the_decode_budget_is_refused_from_its_header_in_bounded_memory(tmp_path):
    """13,000 x 13,000 16-bit pixels in a 329 KB file took 4.5 GB to decode and downscale: now its header alone is
    read. A JPEG past the budget decodes at a reduced scale instead."""
    path = tmp_path / "deep.png"
    Image.new("I;16", (13000, 13000), 1234).save(path)
    script = ("from pathlib import Path\nfrom fastjudge.data import images\n"
              f"print(images.check_image(Path({str(path)!r})))\n"
              f"print({PEAK_MB})\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    reason, peak_mb = done.stdout.splitlines()
    assert reason.startswith("image too large") and "13000 x 13000 pixels" in reason
    assert int(peak_mb) < 1024, f"peak {peak_mb} MB"
    jpeg = tmp_path / "wide.jpg"
    Image.new("RGB", (3000, 2000), (10, 200, 30)).save(jpeg)
    assert data.load_image(jpeg, max_pixels=1_000_000).size == (750, 500)  # 1/4 scale: the first that fits
    assert "image too large" in data.check_image(tmp_path / "deep.png")


def test_sixteen_bit_gray_converts_in_bands_to_the_same_pixels():
    rs = np.random.RandomState(0)
    values = rs.randint(0, 65536, (700, 33)).astype(np.uint16)
    image = Image.fromarray(values)
    expected = np.clip(values.astype(np.float64) * 255.0 / 65535 + 0.5, 0, 255).astype(np.uint8)
    assert np.array_equal(np.asarray(data.to_rgb(image))[..., 0], expected)


def test_each_command_owns_its_outputs(tmp_path, capsys, world, tiny_toy_dir):
    """A file the command did not write is refused (unless --overwrite); the command's own outputs are replaced
    when it runs again; two commands share a folder; a folder holding an `iterate` run is refused."""
    out = tmp_path / "stage"
    out.mkdir()
    (out / "judgments.jsonl").write_text("my notes\n")
    judge = ["judge", "--judge", str(tiny_toy_dir), "--pairs", str(world["pairs"]), "--out", str(out),
             "--judge-tokens", "8"]
    code, _, err = run_cli(capsys, judge)
    assert code == 2 and err.count("\n") == 1 and "judgments.jsonl exists and was written by no fastjudge" in err
    assert (out / "judgments.jsonl").read_text() == "my notes\n"
    assert run_cli(capsys, [*judge, "--overwrite"])[0] == 0
    assert run_cli(capsys, judge)[0] == 0  # its own outputs now
    rank = ["rank", "--judge", str(tiny_toy_dir), "--candidates", str(world["candidates"]), "--out", str(out),
            "--judge-tokens", "8"]
    assert run_cli(capsys, rank)[0] == 0  # another command beside it, other files
    code, _, err = run_cli(capsys, ["filter", "--judge", str(tiny_toy_dir), "--pairs", str(world["pairs"]),
                                    "--out", str(out)])
    assert code == 2 and "judgments.jsonl exists and was written by `fastjudge judge`" in err
    run = tmp_path / "run"
    (run / "iter_0").mkdir(parents=True)
    (run / "config.json").write_text("{}")
    code, _, err = run_cli(capsys, ["eval", "--judge", str(tiny_toy_dir), "--out", str(run)])
    assert code == 2 and "holds a `fastjudge iterate` run" in err
    assert sorted(p.name for p in run.iterdir() if p.name != ".fastjudge.lock") == ["config.json", "iter_0"]


def test_a_failed_start_leaves_nothing_that_blocks_the_corrected_command(tmp_path, capsys, world, tiny_toy_dir):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    out = tmp_path / "run"
    base = ["iterate", "--model", str(tiny_toy_dir), "--out", str(out), "--bench-data", str(world["bench"]),
            "--iterations", "1", "--prompts-per-iteration", "4", "--n-samples", "2", "--min-votes", "1",
            "--answer-tokens", "6", "--judge-tokens", "8", "--epochs", "1", "--batch-size", "2", *FAST]
    code, _, err = run_cli(capsys, [*base, "--prompts", str(empty)])
    assert code == 2 and "no usable prompt" in err
    assert sorted(p.name for p in out.iterdir()) == [".fastjudge.lock", "skipped.jsonl"]  # the record of why
    code, _, err = run_cli(capsys, [*base, "--prompts", str(world["pool"])])
    assert code == 0, err


def test_judge_killed_midway_keeps_its_finished_batches_and_a_rerun_reads_them(tmp_path, world, tiny_toy_dir):
    """Results are kept as they are made: a `judge` killed after some generation batches finds them on the next
    run (and writes the same judgments as a run never killed)."""
    import os
    import signal
    import time
    out = tmp_path / "out"
    line = [sys.executable, "-m", "fastjudge", "judge", "--judge", str(tiny_toy_dir), "--pairs", str(world["pairs"]),
            "--out", str(out), "--judge-tokens", "24", "--batch-rows", "1"]
    process = subprocess.Popen(line, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not list((out / "partial-batches").rglob("*.json")) and process.poll() is None:
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    stored = list((out / "partial-batches").rglob("*.json"))
    assert stored, "no batch was stored before the kill"
    again = subprocess.run(line, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "finished generation batches read from" in again.stdout
    assert not (out / "partial-batches").exists()
    fresh = subprocess.run(line[:-6] + ["--out", str(tmp_path / "fresh"), "--judge-tokens", "24", "--batch-rows", "1"],
                           capture_output=True, text=True, timeout=600)
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    assert data.read_jsonl(out / "judgments.jsonl") == data.read_jsonl(tmp_path / "fresh" / "judgments.jsonl")
