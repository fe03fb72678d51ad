"""Run folders: one-line errors for a bad --out, one process at a time (the lock), and --resume that refuses a
changed setting instead of ignoring it."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from fastjudge import cli, loop
from fastjudge.config import LoopConfig
from fastjudge.data import runs
from fastjudge.data.runs import LOCK_NAME, RunLock, open_run_folder
from test_loop import SMALL, inputs  # noqa: F401 (the module's prompt pool and benchmark fixture)


def run_cli(capsys, argv):
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_out_that_is_a_file_or_under_a_file_is_a_one_line_error(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    for out in (afile, afile / "run"):
        with pytest.raises(ValueError, match="^--out: .*a file"):
            open_run_folder(out)
        code, _, err = run_cli(capsys, ["iterate", "--out", str(out)])
        assert code == 2 and err.count("\n") == 1 and "Traceback" not in err and str(afile) in err
    for argv in (["toy-data", "--out", str(afile)], ["eval", "--out", str(afile)],
                 ["filter", "--pairs", str(afile), "--out", str(afile)]):
        code, _, err = run_cli(capsys, argv)
        assert code == 2 and err.count("\n") == 1 and "a file, not a folder" in err, argv


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes in a read-only folder")
def test_out_in_a_read_only_folder_is_a_one_line_error(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        for out in (locked, locked / "run"):
            code, _, err = run_cli(capsys, ["iterate", "--out", str(out)])
            assert code == 2 and err.count("\n") == 1 and "permission denied" in err
    finally:
        locked.chmod(0o700)


def test_a_second_holder_is_refused_naming_the_first(tmp_path):
    with RunLock(tmp_path):
        holder = json.loads((tmp_path / LOCK_NAME).read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        with pytest.raises(ValueError, match=rf"in use by pid {os.getpid()} on {socket.gethostname()}"):
            with RunLock(tmp_path):
                pass
    assert (tmp_path / LOCK_NAME).read_text() == ""  # released: emptied, not removed
    with RunLock(tmp_path):  # free again
        pass


def test_a_lock_left_by_a_killed_process_is_taken_over_with_a_warning(tmp_path):
    # a process that holds the lock and is killed: the kernel releases it, its name stays in the file
    code = (f"import sys, time; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
            f"from fastjudge.data.runs import RunLock; lock = RunLock({str(tmp_path)!r}).__enter__(); "
            f"print('held', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ValueError, match=rf"in use by pid {holder.pid} "):
            with RunLock(tmp_path):
                pass
    finally:
        holder.kill()
        holder.wait()
    with pytest.warns(UserWarning, match=rf"taking over the lock left by pid {holder.pid} "):
        with RunLock(tmp_path):
            assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()


def test_two_runs_of_one_folder_cannot_overlap(tmp_path, tiny_toy_dir, inputs):  # noqa: F811
    """A fresh run and a --resume of the same folder, or two fresh runs started together: the second is refused
    while the first holds the folder (here a process holding its lock)."""
    out = tmp_path / "run"
    out.mkdir()
    code = (f"from fastjudge.data.runs import RunLock; import time; lock = RunLock({str(out)!r}).__enter__(); "
            f"print('held', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        prompts, bench = inputs
        for resume in (False, True):
            cfg = LoopConfig(out=str(out), model=str(tiny_toy_dir), prompts=str(prompts), bench_data=str(bench),
                             resume=resume, **SMALL)
            with pytest.raises(ValueError, match=rf"^--out: .* is in use by pid {holder.pid} "):
                loop.run(cfg)
        assert [p.name for p in out.iterdir()] == [LOCK_NAME]  # nothing was written
    finally:
        holder.kill()
        holder.wait()


def test_resume_refuses_changed_settings_and_takes_the_safe_ones_with_override(tmp_path, tiny_toy_dir, inputs,  # noqa: F811
                                                                             capsys):
    prompts, bench = inputs
    out = tmp_path / "run"
    base = ["iterate", "--out", str(out), "--model", str(tiny_toy_dir), "--prompts", str(prompts), "--bench-data",
            str(bench)] + [f"--{k.replace('_', '-')}={v}" for k, v in SMALL.items()]
    code, _, err = run_cli(capsys, base)
    assert code == 0, err
    saved = (out / "config.json").read_text()
    # a changed setting that would change what the run computes: refused, each one named, nothing written
    code, _, err = run_cli(capsys, base + ["--resume", "--seed", "7", "--lr", "0.01"])
    assert code == 2 and err.count("\n") == 1
    assert "--seed 7 (the run has 0)" in err and "--lr 0.01 (the run has 0.0002)" in err
    # a safe one needs --override; with it the run goes on with it
    code, _, err = run_cli(capsys, base + ["--resume", "--iterations", "2"])
    assert code == 2 and "pass --override iterations" in err
    assert (out / "config.json").read_text() == saved
    code, out_text, err = run_cli(capsys, base + ["--resume", "--iterations", "2", "--override", "iterations"])
    assert code == 0, err
    assert "iterations 2 changed" in out_text and LoopConfig.load(out / "config.json").iterations == 2
    assert json.loads(out_text.strip().splitlines()[-1])["iterations"] == 2
    # flags left out, or given with the run's own values, go on; an unsafe --override is refused
    code, _, err = run_cli(capsys, ["iterate", "--out", str(out), "--resume", "--seed", "0"])
    assert code == 0, err
    code, _, err = run_cli(capsys, base + ["--resume", "--seed", "1", "--override", "seed"])
    assert code == 2 and "override: seed cannot change" in err


def test_train_never_replaces_a_folder_that_is_not_a_checkpoint(tmp_path, capsys, tiny_toy_dir):
    """`fastjudge train --out RUN` on a run folder (its config.json beside iter_<k>/ and the user's files) is a
    one-line error that leaves every file as it was; a checkpoint folder it wrote is replaced by a second run."""
    from fastjudge import data
    from fastjudge.data import prompts
    from fastjudge.toy import files as toy_files
    pool = toy_files.write_toy_prompts(tmp_path / "world", 2, seed=1)
    images = sorted((pool.parent / "images").iterdir())
    target = prompts.judge_target(prompts.toy_reasoning("the answer is 2 .", True, False), "A")
    traces = [{"image": str(image), "prompt": prompts.judge_prompt("how many objects are there ?",
               "the answer is 2 .", "the answer is 3 ."), "target": target, "pair": i, "verdict": "A"}
              for i, image in enumerate(images)]
    sft = tmp_path / "sft.jsonl"
    data.write_records(sft, traces)
    run = tmp_path / "run"
    (run / "iter_1").mkdir(parents=True)
    files = {run / "config.json": '{"seed": 0}', run / "iter_1" / "metrics.json": "{}", run / "notes.txt": "mine"}
    for path, text in files.items():
        path.write_text(text)
    train = ["train", "--judge", str(tiny_toy_dir), "--sft", str(sft), "--epochs", "1", "--batch-size", "2"]
    code, _, err = run_cli(capsys, [*train, "--out", str(run)])
    assert code == 2 and err.count("\n") == 1 and "not a checkpoint folder" in err and str(run) in err
    assert {p: p.read_text() for p in files} == files
    assert sorted(p.name for p in run.iterdir()) == ["config.json", "iter_1", "notes.txt"]
    assert runs.is_checkpoint(tiny_toy_dir) and not runs.is_checkpoint(run)
    checkpoint = tmp_path / "judge"
    for _ in range(2):  # a new folder, then the checkpoint it holds, replaced
        code, _, err = run_cli(capsys, [*train, "--out", str(checkpoint)])
        assert code == 0, err
        assert runs.is_checkpoint(checkpoint)


def test_anticipated_failures_are_one_line_with_their_exit_status(tmp_path, capsys, monkeypatch):
    """A missing file (OSError) exits 2, Ctrl-C 130, each one line naming the command; --debug shows the
    traceback instead."""
    code, _, err = run_cli(capsys, ["filter", "--pairs", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "f")])
    assert code == 2 and err.count("\n") == 1 and err.startswith("fastjudge filter: error:")
    assert "missing.jsonl" in err and "Traceback" not in err

    def interrupted(args):
        raise KeyboardInterrupt
    parser = cli.build_parser
    def patched():
        built = parser()
        built._subparsers._group_actions[0].choices["toy-data"].set_defaults(func=interrupted)
        return built
    monkeypatch.setattr(cli, "build_parser", patched)
    code, _, err = run_cli(capsys, ["toy-data", "--out", str(tmp_path / "d")])
    assert code == 130 and err.count("\n") == 1 and "interrupted" in err
    with pytest.raises(KeyboardInterrupt):
        cli.main(["--debug", "toy-data", "--out", str(tmp_path / "d")])


def test_a_closed_pipe_ends_the_command_quietly():
    """`fastjudge cost | head -1`: the reader leaves after one line; no traceback, the shell's SIGPIPE status."""
    done = subprocess.run(f"{sys.executable} -m fastjudge cost | head -1", shell=True, capture_output=True,
                          text=True, timeout=120, executable="/bin/bash")
    assert done.stdout.count("\n") == 1
    assert "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr, done.stderr[-2000:]
