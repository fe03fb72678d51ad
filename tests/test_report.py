"""`fastjudge report`: one self-contained page per run, written by every `iterate` too. It is checked as HTML
here (every iteration's accuracy, kept and dropped pairs with their images, the judge's judgments, nothing fetched
from elsewhere) and, where a Chromium is installed, opened in it headless."""

from __future__ import annotations

import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from fastjudge import cli, loop
from fastjudge.config import LoopConfig

# the shipped toy base (a random one writes no verdict, and keeps nothing), on a small pool
SMALL = dict(iterations=2, prompts_per_iteration=16, n_samples=4, min_votes=2, epochs=1, batch_size=8,
             min_gain=-1.0, toy_bench_per_category=4, filter_samples=4)


class Page(HTMLParser):
    """The page's tags and attributes, its text, and whether every tag it opens is closed."""
    VOID = {"img", "meta", "br", "hr", "link", "input"}

    def __init__(self):
        super().__init__()
        self.tags, self.text, self.open = [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag not in self.VOID:
            self.open.append(tag)

    def handle_endtag(self, tag):
        assert self.open and self.open[-1] == tag, f"</{tag}> closes {self.open[-1:]}"
        self.open.pop()

    def handle_data(self, data):
        self.text.append(data)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("report")
    cfg = LoopConfig(out=str(folder / "run"), seed=6, log_to="tensorboard", **SMALL)
    return Path(cfg.out), loop.run(cfg)


def test_iterate_writes_a_self_contained_report_of_every_iteration(run):
    out, summary = run
    page = Page()
    page.feed((out / "report.html").read_text())
    assert not page.open
    text = " ".join(page.text)
    for entry in summary["iterations"]:
        overall = entry["metrics"]["overall"]
        assert f"iteration {entry['iteration']}" in text and f"{overall:.3f}" in text
    cards = [attrs for tag, attrs in page.tags if tag == "div" and "card" in attrs.get("class", "")]
    assert any("kept" in c["class"] for c in cards) and any("dropped" in c["class"] for c in cards)
    images = [attrs["src"] for tag, attrs in page.tags if tag == "img"]
    assert images and all(src.startswith("data:image/png;base64,") for src in images)
    assert not any(tag == "script" or attrs.get("href", "").startswith("http") for tag, attrs in page.tags)
    assert "kept: a judgment in each order picked the synthetic preference" in text
    assert "dropped: no judgment" in text and "judgments picked the preference" in text


def test_the_report_command_rewrites_it_and_refuses_a_folder_without_a_run(run, tmp_path, capsys):
    out, _ = run
    written = (out / "report.html").read_bytes()
    (out / "report.html").unlink()
    assert cli.main(["report", str(out)]) == 0
    assert (out / "report.html").read_bytes() == written  # the same run, the same page
    assert json.loads(capsys.readouterr().out.strip())["report"] == str(out / "report.html")
    assert cli.main(["report", str(tmp_path)]) == 2
    assert "holds no fastjudge run" in capsys.readouterr().err


def _chromium() -> str | None:
    return next((path for name in ("chromium", "chromium-browser", "google-chrome", "headless_shell")
                 if (path := shutil.which(name))), None)


@pytest.mark.skipif(_chromium() is None, reason="no Chromium installed here (apt install chromium to run this)")
def test_the_report_opens_in_headless_chromium_without_a_console_error(run):
    out, _ = run
    done = subprocess.run([_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr",
                           "--v=0", "--dump-dom", (out / "report.html").resolve().as_uri()],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Accuracy on the benchmark" in done.stdout
    assert "CONSOLE" not in done.stderr and "Uncaught" not in done.stderr, done.stderr[-2000:]


def test_tensorboard_curves_hold_the_loss_and_the_accuracy_the_summary_holds(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out, summary = run
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    accuracy = [(e.step, e.value) for e in events.Scalars("accuracy/overall")]
    assert accuracy == [(e["iteration"], pytest.approx(e["metrics"]["overall"])) for e in summary["iterations"]]
    losses = [loss for e in summary["iterations"] for loss in e.get("stats", {}).get("train", {}).get("losses", [])]
    assert losses and [e.value for e in events.Scalars("train/loss")] == pytest.approx(losses, rel=1e-6)
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, len(losses) + 1))
    kept = [(e.step, e.value) for e in events.Scalars("pairs/kept")]
    assert kept == [(e["iteration"], e["kept"]) for e in summary["iterations"][1:]]
    assert len(list((out / "tensorboard").iterdir())) == 1  # written anew: one event file, each point once
