"""The cost model (`fastjudge cost`): each stage's work from the recipe, GPU-hours from measured rates, unmeasured
stages reported as such, rates files checked; bench/paper_scale.py writes a rates file the model reads."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fastjudge import cli, cost

ROOT = Path(__file__).resolve().parent.parent
SMALL = cost.Recipe(prompts=1000, closed_fraction=0.4, n_samples=8, prompt_tokens=10, closed_answer_tokens=20,
                    open_answer_tokens=50, rewrite_tokens=40, closed_pair_fraction=0.5, judge_template_tokens=30,
                    judge_reasoning_tokens=100, kept_fraction=0.25, iterations=2, epochs=3, eval_items=200, gpus=4)


def test_work_follows_the_recipe():
    work = cost.work(SMALL)
    closed, open_ = 400, 600
    pairs = open_ + closed * 0.5  # 800
    assert work["synth closed"]["ours"] == closed * 8 * 20 * 2
    assert work["synth open + rewrite"]["ours"] == open_ * (50 + 40) * 2
    assert work["filter judging"]["ours"] == 2 * pairs * 100 * 2
    answer = (open_ * 50 + closed * 20) / 1000  # 38 tokens on average
    traces = 2 * pairs * 0.25
    assert work["fine-tuning"]["ours"] == pytest.approx(traces * (30 + 10 + 2 * answer + 100) * 3 * 2)
    assert work["evaluation"]["ours"] == 200 * 100 * 3  # the base and two iterations
    # transformers' encodings are inside its generation and fine-tuning rates: none outside them
    assert work["image encoding"] == {"ours": 1000 + 200, "baseline": 0.0}
    assert all(w["ours"] == w["baseline"] for stage, w in work.items() if stage != "image encoding")
    assert list(work) == list(cost.STAGES)


def _rates_file(tmp_path, stages, date="2026-12-01", name="rates-test.json"):
    path = tmp_path / name
    path.write_text(json.dumps({"card": "test card", "date": date, "stages": stages}))
    return path


def test_our_image_encodings_count_in_the_totals_and_transformers_none_outside_its_rates(tmp_path):
    rates = cost.Rates.load(_rates_file(tmp_path, {
        "image encoding": {"ours": {"per_s": 10.0, "source": "measured: e"}},
        "synth closed": {"ours": {"per_s": 100.0, "source": "measured: a"}, "baseline": {"per_s": 25.0, "source": "b"}},
    }))
    result = cost.estimate(SMALL, rates)
    rows = {r["stage"]: r for r in result["stages"]}
    encoding = rows["image encoding"]
    assert encoding["ours_gpu_hours"] == pytest.approx(1200 / 10 / 3600) and encoding["baseline_gpu_hours"] == 0.0
    assert encoding["ratio"] is None and result["measured_stages"] == ["image encoding", "synth closed"]
    assert result["total_measured_ours_gpu_hours"] == pytest.approx(
        encoding["ours_gpu_hours"] + rows["synth closed"]["ours_gpu_hours"])
    assert result["total_measured_baseline_gpu_hours"] == pytest.approx(rows["synth closed"]["baseline_gpu_hours"])


def test_gpu_hours_are_work_over_rate_and_unmeasured_stages_stay_unmeasured(tmp_path):
    rates = cost.Rates.load(_rates_file(tmp_path, {
        "synth closed": {"ours": {"per_s": 100.0, "source": "measured: a"}, "baseline": {"per_s": 25.0, "source": "b"}},
        "fine-tuning": {"ours": {"per_s": 50.0, "source": "measured: c"}},  # no baseline rate
    }))
    result = cost.estimate(SMALL, rates)
    rows = {r["stage"]: r for r in result["stages"]}
    work = cost.work(SMALL)
    assert rows["synth closed"]["ours_gpu_hours"] == pytest.approx(work["synth closed"]["ours"] / 100 / 3600)
    assert rows["synth closed"]["ratio"] == pytest.approx(4.0)
    assert rows["fine-tuning"]["ours_gpu_hours"] is not None and rows["fine-tuning"]["ratio"] is None
    assert rows["evaluation"]["ours_gpu_hours"] is None
    assert result["measured_stages"] == ["synth closed"]
    assert set(result["missing_stages"]) == set(cost.STAGES) - {"synth closed"}
    assert result["total_measured_ours_gpu_hours"] == pytest.approx(rows["synth closed"]["ours_gpu_hours"])
    text = cost.table(result)
    assert "not measured" in text and "4.00x" in text
    for name in cost.SOURCES:  # every recipe number is printed with where it comes from
        assert f"  {name} = " in text


@pytest.mark.parametrize("stages, message", [
    ({"decoding": {"ours": {"per_s": 1.0, "source": "x"}}}, "unknown stage 'decoding'"),
    ({"synth closed": {"ours": {"per_s": 0, "source": "x"}}}, r"stages.synth closed.ours: expected \{per_s > 0"),
    # json writes NaN and Infinity, and Python reads them back: a rate of neither gives a figure
    ({"synth closed": {"ours": {"per_s": float("nan"), "source": "x"}}}, r"synth closed.ours: .*finite.*nan"),
    ({"synth closed": {"ours": {"per_s": float("inf"), "source": "x"}}}, r"synth closed.ours: .*finite.*inf"),
    ({"synth closed": {"ours": {"per_s": 5.0}}}, "stages.synth closed.ours"),
    ({"synth closed": {"theirs": {"per_s": 5.0, "source": "x"}}}, "stages.synth closed.theirs"),
])
def test_a_bad_rates_file_is_an_error_naming_it(tmp_path, stages, message):
    path = _rates_file(tmp_path, stages)
    with pytest.raises(ValueError, match=message) as error:
        cost.Rates.load(path)
    assert str(path) in str(error.value)


@pytest.mark.parametrize("text, message", [('{"card": "x", "date": ', "not a rates file: line 1"),
                                           ("[1, 2]", "expected a JSON object"),
                                           ('{"card": "x", "date": "d", "stages": {"synth closed": {"ours": 3}}}',
                                            "stages.synth closed.ours")])
def test_a_damaged_rates_file_is_an_error_naming_it(tmp_path, text, message):
    path = tmp_path / "rates-bad.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=message) as error:
        cost.Rates.load(path)
    assert str(path) in str(error.value)


def test_the_newest_rates_file_is_taken_by_its_date(tmp_path):
    _rates_file(tmp_path, {}, date="2026-12-01", name="rates-b.json")
    newest = _rates_file(tmp_path, {}, date="2026-12-03", name="rates-a.json")
    assert cost.newest_rates(tmp_path) == newest
    assert cost.newest_rates(tmp_path / "none") is None
    (tmp_path / "rates-broken.json").write_text("{")  # never passed over in silence: it might be the newest
    with pytest.raises(ValueError, match="rates-broken.json: not a rates file"):
        cost.newest_rates(tmp_path)


def test_recipe_settings_are_checked():
    assert cost.parse_settings("prompts=2000, kept-fraction=0.5") == {"prompts": 2000, "kept_fraction": 0.5}
    with pytest.raises(ValueError, match="name=value"):
        cost.parse_settings("prompt=3")
    with pytest.raises(ValueError, match="not a number"):
        cost.parse_settings("epochs=five")
    with pytest.raises(ValueError, match="kept_fraction: expected in"):
        cost.estimate(cost.Recipe(kept_fraction=1.5), cost.Rates("c", "d"))


def test_rates_seeded_from_a_committed_sampler_result():
    seeded = cost.seed_rates(ROOT / "bench" / "results" / "sampler-h200-2026-12-04.json")
    closed = seeded["stages"]["synth closed"]
    assert closed["ours"]["per_s"] / closed["baseline"]["per_s"] == pytest.approx(7.89, abs=0.01)
    assert seeded["card"] == "NVIDIA H200" and list(seeded["stages"]) == ["synth closed"]
    with pytest.raises(ValueError, match="expected a bench/sampler.py result"):
        cost.seed_rates(ROOT / "bench" / "results" / "flce-h200-2026-12-04.json")


def test_seeding_takes_the_faster_transformers_setting(tmp_path):
    """A sampler result that timed transformers' static cache with torch.compile too: the baseline is the faster
    of the two settings, named."""
    result = json.loads((ROOT / "bench" / "results" / "sampler-h200-2026-12-04.json").read_text())
    row = next(r for r in result["results"] if r["n"] == 16)
    for factor, setting in ((2.0, "static cache + torch.compile"), (0.5, "eager")):
        row["transformers_static_compile_tok_s"] = row["transformers_tok_s"] * factor
        path = tmp_path / f"sampler-{factor}.json"
        path.write_text(json.dumps(result))
        baseline = cost.seed_rates(path)["stages"]["synth closed"]["baseline"]
        assert baseline["setting"] == setting
        assert baseline["per_s"] == row["transformers_tok_s"] * max(1.0, factor)


def test_the_committed_rates_are_those_seeding_gives(tmp_path):
    """The rates file under bench/results was written by `bench/cost.py --seed-rates`, not by hand."""
    committed = json.loads((ROOT / "bench" / "results" / "rates-h200-2026-12-04.json").read_text())
    assert committed == cost.seed_rates(ROOT / "bench" / "results" / "sampler-h200-2026-12-04.json")


def test_the_command_prints_the_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / "cost.json"
    assert cli.main(["cost", "--set", "prompts=20000", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "synth closed" in printed and "not measured" in printed
    result = json.loads(out.read_text())
    assert result["recipe"]["prompts"] == 20000 and result["measured_stages"] == ["synth closed"]
    assert cli.main(["cost", "--rates", str(tmp_path / "missing.json")]) == 2


def test_paper_scale_writes_a_rates_file_the_model_reads(tmp_path):
    """bench/paper_scale.py on the tiny preset (the CPU): every stage measured for both stacks, each generation
    stage's baseline the faster of transformers' eager generate and its static cache with torch.compile (greedy
    tokens equal to eager's)."""
    out = tmp_path / "rates.json"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "paper_scale.py"), "--preset", "tiny", "--prompts", "2",
                           "--prompt-words", "8", "--answer-tokens", "3", "--judge-prompt-words", "30",
                           "--judge-tokens", "3", "--train-examples", "3", "--repeats", "1", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr[-3000:]
    rates = cost.Rates.load(out)
    result = cost.estimate(cost.Recipe(), rates)
    assert result["missing_stages"] == [] and result["total_measured_ratio"] > 0
    assert "Adapter.sft_backward packed" in rates.stages["fine-tuning"]["ours"]["source"]
    data = json.loads(out.read_text())
    assert "partial" not in data
    for stage in ("synth closed", "synth open + rewrite", "filter judging"):
        both = data["transformers_settings"][stage]
        assert both["greedy_equal"] is True and both["static_compile"] > 0 and both["eager"] > 0, both
        baseline = rates.stages[stage]["baseline"]
        assert baseline["per_s"] == max(both["eager"], both["static_compile"])
        assert baseline["setting"] == ("eager" if both["eager"] >= both["static_compile"]
                                       else "static cache + torch.compile")
    assert rates.stages["evaluation"]["baseline"]["per_s"] == rates.stages["filter judging"]["baseline"]["per_s"]
    assert "baseline (" in cost.table(result)  # the table names the setting each baseline rate comes from


def test_a_partial_rates_file_says_so(tmp_path):
    """A rates file that bench/paper_scale.py left partial (a run cut short) is read, and the table says so."""
    path = _rates_file(tmp_path, {"synth closed": {"ours": {"per_s": 10.0, "source": "measured"},
                                                   "baseline": {"per_s": 5.0, "source": "measured",
                                                                "setting": "eager"}}})
    path.write_text(json.dumps(json.loads(path.read_text()) | {"partial": True}))
    text = cost.table(cost.estimate(SMALL, cost.Rates.load(path)))
    assert "partial: the measuring run was cut short" in text
