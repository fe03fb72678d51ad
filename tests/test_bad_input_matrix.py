"""Every command against every class of bad input: missing, empty, malformed and wrong-typed files, numbers that
are not finite or out of range, hostile paths, a busy output folder and a folder of another command. Each case
asserts the exit status, a one-line message naming the file or the field, and that nothing outside --out changed.
The texts too long for the model and the images too large to decode, and the memory they take, are
tests/test_gate.py's; the two inputs that once took 13 and 9.7 GB are measured in a process of their own here."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fastjudge import cli, cost, data
from fastjudge.data import prompts as prompt_texts
from fastjudge.data.runs import RunLock
from fastjudge.toy import files as toy_files

# the stages' flags that keep a toy run quick
QUICK = {"iterate": ["--iterations", "1", "--prompts-per-iteration", "4", "--n-samples", "2", "--min-votes", "1",
                     "--answer-tokens", "6", "--judge-tokens", "8", "--epochs", "1", "--batch-size", "2"],
         "synth": ["--n-samples", "2", "--min-votes", "1", "--answer-tokens", "6"],
         "filter": ["--judge-tokens", "8", "--filter-samples", "2"],
         "train": ["--epochs", "1", "--batch-size", "2"],
         "eval": ["--judge-tokens", "8"], "judge": ["--judge-tokens", "8"], "rank": ["--judge-tokens", "8"]}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Good inputs for every command, in one folder that no case may change."""
    folder = tmp_path_factory.mktemp("inputs")
    pool = toy_files.write_toy_prompts(folder / "world", 4, seed=2)
    bench = toy_files.write_toy_benchmark(folder / "benchmark", per_category=1)
    pairs_file, candidates = toy_files.write_judge_examples(bench, folder / "judge")
    image = str((pool.parent / json.loads(pool.read_text().splitlines()[0])["image"]).resolve())
    synth_pairs = folder / "pairs.jsonl"
    data.write_records(synth_pairs, [{"id": "p0", "image": image, "instruction": "how many objects are there ?",
                                      "kind": "closed", "good": "the answer is 2 .", "bad": "the answer is 3 .",
                                      "source": "vote"}])
    sft = folder / "sft.jsonl"
    target = prompt_texts.judge_target(prompt_texts.toy_reasoning("the answer is 2 .", True, False), "A")
    data.write_records(sft, [{"image": image, "prompt": prompt_texts.judge_prompt(
        "how many objects are there ?", "the answer is 2 .", "the answer is 3 ."), "target": target, "pair": 0,
        "verdict": "A"}])
    predictions = folder / "predictions.jsonl"
    predictions.write_text(json.dumps({"index": 0, "shown_first": 0, "verdict": "A"}) + "\n")
    rates = cost.newest_rates(Path(__file__).resolve().parents[1] / "bench" / "results")  # a measured one
    return dict(folder=folder, prompts=pool, bench=bench, judge_pairs=pairs_file, candidates=candidates,
                pairs=synth_pairs, sft=sft, predictions=predictions, rates=rates)


def argv(command: str, inputs: dict, out: Path, model: Path, **files) -> list[str]:
    """A command line of `command` on the good inputs, with `files` (flag name -> path) replacing some."""
    paths = {"iterate": {"prompts": inputs["prompts"], "bench_data": inputs["bench"]},
             "synth": {"prompts": inputs["prompts"]}, "filter": {"pairs": inputs["pairs"]},
             "train": {"sft": inputs["sft"]}, "eval": {"data": inputs["bench"]},
             "judge": {"pairs": inputs["judge_pairs"]}, "rank": {"candidates": inputs["candidates"]},
             "score": {"data": inputs["bench"], "predictions": inputs["predictions"]},
             "cost": {"rates": inputs["rates"]}, "toy-data": {}, "toy-pretrain": {}}[command]
    paths = {**paths, **files}
    line = [command] + [x for name, path in paths.items() for x in (f"--{name.replace('_', '-')}", str(path))]
    if command in ("iterate", "synth"):
        line += ["--model", str(model)]
    elif command in ("filter", "train", "eval", "judge", "rank"):
        line += ["--judge", str(model)]
    if command == "score":
        line += ["--format", "vlrewardbench"]
    if command != "score":
        line += ["--out", str(out / "pairs.jsonl" if command == "synth" else out / "ckpt" if command == "train"
                              else out)]
    return line + QUICK.get(command, [])


# the file each command reads, by its flag, for the file classes
READS = {"iterate": "prompts", "synth": "prompts", "filter": "pairs", "train": "sft", "eval": "data",
         "judge": "pairs", "rank": "candidates", "score": "predictions", "cost": "rates"}
BAD_FILES = {
    "missing": (None, "not found|No such file"),
    "empty": (b"", "no usable|expected a JSON|no rates|Expecting value|empty"),
    "malformed": (b"{not json\n[1, 2]\n", "no usable|malformed|expected a JSON|Expecting"),
    "wrong-type": (b'{"image": 5, "instruction": ["x"], "good": 1, "bad": 2, "prompt": 3, "target": {}, '
                   b'"question": 7, "response_a": 8, "response_b": 9, "answers": "ab", "query": 1, '
                   b'"response": 2, "index": "zero", "shown_first": "x", "verdict": 5, "stages": 3}\n',
                   "no usable|field|expected"),
    "a-folder": ("FOLDER", "is a folder|Is a directory|not a file|file not found|a directory"),
}
# a number flag of each command that is not finite or out of range, and the setting its message names
BAD_NUMBERS = {"iterate": (["--lr", "inf"], "lr"), "synth": (["--temperature", "nan"], "temperature"),
               "filter": (["--filter-temperature", "inf"], "filter_temperature"),
               "train": (["--lr", "nan"], "lr"), "eval": (["--eval-temperature=-inf"], "eval_temperature"),
               "judge": (["--judge-tokens", "0"], "judge_tokens"), "rank": (["--k", "0"], "k"),
               "score": (["--k", "0"], "k"), "cost": (["--set", "kept_fraction=nan"], "kept_fraction"),
               "toy-data": (["--closed-fraction", "nan"], "--closed-fraction"),
               "toy-pretrain": (["--lr", "inf", "--steps", "1"], "lr")}
# a child process's own peak resident memory in MB, as Python source: VmHWM, the high-water mark of its address
# space (ru_maxrss outlives exec, and a child forked from this large test process would report the parent's)
PEAK_MB = "next(int(line.split()[1]) for line in open('/proc/self/status') if line.startswith('VmHWM')) // 1024"
WRITERS = ["iterate", "synth", "filter", "train", "eval", "judge", "rank", "toy-data"]


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


def run_case(capsys, line: list[str]) -> tuple[int, str]:
    code = cli.main(line)
    return code, capsys.readouterr().err


def one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("fastjudge ")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


@pytest.mark.parametrize("kind", list(BAD_FILES))
@pytest.mark.parametrize("command", list(READS))
def test_a_bad_input_file_is_a_one_line_error_that_names_it(tmp_path, capsys, inputs, tiny_toy_dir, command, kind):
    content, expected = BAD_FILES[kind]
    bad = tmp_path / f"bad-{kind}.jsonl"
    if content == "FOLDER":
        bad.mkdir()
    elif content is not None:
        bad.write_bytes(content)
    before = snapshot(inputs["folder"])
    out = tmp_path / "out"
    code, err = run_case(capsys, argv(command, inputs, out, tiny_toy_dir, **{READS[command]: bad}))
    message = one_line(err)
    assert code == 2, message
    assert str(bad) in message or bad.name in message, message
    assert re.search(expected, message), message
    assert snapshot(inputs["folder"]) == before


@pytest.mark.parametrize("command", list(BAD_NUMBERS))
def test_a_number_out_of_range_is_a_one_line_error_naming_the_setting(tmp_path, capsys, inputs, tiny_toy_dir,
                                                                      command):
    flags, name = BAD_NUMBERS[command]
    before = snapshot(inputs["folder"])
    out = tmp_path / "out"
    code, err = run_case(capsys, argv(command, inputs, out, tiny_toy_dir) + flags)
    message = one_line(err)
    assert code == 2 and name in message, message
    assert snapshot(inputs["folder"]) == before
    assert not out.exists() or not [p for p in out.rglob("*") if p.is_file() and p.name != ".fastjudge.lock"]


@pytest.mark.parametrize("command", WRITERS + ["cost"])
def test_an_out_under_a_file_is_a_one_line_error(tmp_path, capsys, inputs, tiny_toy_dir, command):
    blocker = tmp_path / "a-file"
    blocker.write_text("mine")
    code, err = run_case(capsys, argv(command, inputs, blocker / "sub", tiny_toy_dir) +
                         (["--out", str(blocker / "sub" / "cost.json")] if command == "cost" else []))
    message = one_line(err)
    assert code == 2 and "a-file" in message, message
    assert blocker.read_text() == "mine"


@pytest.mark.parametrize("command", WRITERS)
def test_a_busy_out_is_refused_naming_its_holder(tmp_path, capsys, inputs, tiny_toy_dir, command):
    out = tmp_path / "out"  # the folder each command holds (synth's pairs file and train's checkpoint are in it)
    out.mkdir()
    with RunLock(out):
        code, err = run_case(capsys, argv(command, inputs, out, tiny_toy_dir))
    message = one_line(err)
    assert code == 2 and "in use by pid" in message, message


@pytest.mark.parametrize("command", WRITERS)
def test_a_folder_of_another_command_is_refused_and_left_as_it_was(tmp_path, capsys, inputs, tiny_toy_dir,
                                                                  command):
    """An `iterate` run's folder for the single-stage commands; another command's outputs for `iterate`."""
    out = tmp_path / "out"
    if command == "iterate":
        out.mkdir()
        (out / "predictions.jsonl").write_text("eval's\n")
        (out / ".fastjudge-outputs.json").write_text(json.dumps({"predictions.jsonl": "eval"}))
    else:
        (out / "iter_0").mkdir(parents=True)
        (out / "config.json").write_text("{}")
    before = snapshot(out)
    code, err = run_case(capsys, argv(command, inputs, out, tiny_toy_dir))
    message = one_line(err)
    assert code == 2 and ("iterate` run" in message or "already holds a run" in message), message
    after = {k: v for k, v in snapshot(out).items() if k != ".fastjudge.lock"}
    assert after == before


@pytest.mark.parametrize("command", ["synth", "judge"])
def test_the_inputs_that_once_took_gigabytes_stay_within_2_gb(tmp_path, inputs, command):
    """synth on a pool with an 80,000-word instruction (once 13 GB, then a traceback) and judge on a pair with a
    100,000-character answer (once 9.7 GB and minutes): counted skips, on the shipped toy base, in under 2 GB."""
    if command == "synth":
        rows = [json.loads(line) for line in inputs["prompts"].read_text().splitlines()]
        rows = [dict(r, image=str((inputs["prompts"].parent / r["image"]).resolve())) for r in rows]
        rows[0]["instruction"] = "describe " * 80_000
        path = tmp_path / "pool.jsonl"
        flags = ["synth", "--prompts", str(path), "--out", str(tmp_path / "out" / "pairs.jsonl"), *QUICK["synth"]]
        skipped = tmp_path / "out" / "skipped-synth.jsonl"
    else:
        rows = [json.loads(line) for line in inputs["judge_pairs"].read_text().splitlines()]
        rows = [dict(r, image=str((inputs["judge_pairs"].parent / r["image"]).resolve())) for r in rows]
        rows[0]["response_a"] = "red " * 25_000  # 100,000 characters, 25,000 words
        path = tmp_path / "pairs.jsonl"
        flags = ["judge", "--pairs", str(path), "--out", str(tmp_path / "out"), *QUICK["judge"]]
        skipped = tmp_path / "out" / "skipped-judge.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    script = f"import sys\nfrom fastjudge.cli import main\ncode = main(sys.argv[1:])\nprint(code, {PEAK_MB})\n"
    done = subprocess.run([sys.executable, "-c", script, *flags], capture_output=True, text=True, timeout=600)
    code, peak_mb = done.stdout.split()[-2:]
    assert code == "0", done.stderr[-3000:]
    assert int(peak_mb) < 2048, f"peak {peak_mb} MB"
    assert [s["line"] for s in data.read_jsonl(skipped)] == [1]


@pytest.mark.parametrize("command", ["iterate", "synth", "filter", "train", "eval", "judge", "rank"])
def test_an_unavailable_device_is_a_one_line_error(tmp_path, capsys, inputs, tiny_toy_dir, command):
    if __import__("torch").cuda.is_available():
        pytest.skip("this machine has a GPU: cuda is available")
    code, err = run_case(capsys, argv(command, inputs, tmp_path / "out", tiny_toy_dir) + ["--device", "cuda"])
    message = one_line(err)
    assert code == 2 and "device" in message and "cuda" in message, message


def test_a_full_disk_while_a_checkpoint_is_written_loses_nothing(tmp_path, capsys, inputs, tiny_toy_dir, monkeypatch):
    """The disk fills up while `train` writes its checkpoint over the one it wrote before: a one-line error,
    the earlier checkpoint intact, no half-written copy left; the same command then succeeds."""
    import errno
    from fastjudge.models import ToyAdapter, load_adapter
    out = tmp_path / "out"
    line = argv("train", inputs, out, tiny_toy_dir)
    assert run_case(capsys, line)[0] == 0
    before = snapshot(out / "ckpt")
    save = ToyAdapter.save

    def full_disk(self, path):
        save(self, path)  # most of it written, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device", str(path))
    monkeypatch.setattr(ToyAdapter, "save", full_disk)
    code, err = run_case(capsys, line)
    message = one_line(err)
    assert code == 2 and "No space left on device" in message, message
    assert snapshot(out / "ckpt") == before and not (out / "ckpt.tmp").exists()
    load_adapter(str(out / "ckpt"))  # still a checkpoint
    monkeypatch.setattr(ToyAdapter, "save", save)
    assert run_case(capsys, line)[0] == 0
