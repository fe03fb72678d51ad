"""LoopConfig: defaults, self-validation (errors name the field), save/load."""

from __future__ import annotations

import json

import pytest

from fastjudge.config import LoopConfig
from fastjudge.core.sampling_params import SamplingParams


def test_defaults_construct():
    cfg = LoopConfig()
    assert cfg.model is None and cfg.prompts is None and cfg.bench == "toy" and cfg.bench_data is None
    assert cfg.min_votes <= cfg.n_samples and 0 < cfg.top_p <= 1


def test_the_toy_and_a_real_model_have_their_own_training_defaults(tmp_path):
    """Both train the reasoning and the verdict, the paper's recipe: the toy its checks and verdict (its own
    answer read, not trained) at lr 2e-4 with 8 judgments per pair and order in the filter, a real model the whole
    trace at 1e-5 with one; a value given is kept."""
    toy = LoopConfig()
    assert (toy.train_loss, toy.lr, toy.train_options().loss_on) == ("checks", 2e-4, "checks")
    assert (toy.filter_reasoning, toy.filter_samples, toy.filter_options().judgment.n) == ("sampled", 8, 8)
    (tmp_path / "config.json").write_text("{}")  # a checkpoint that is not the toy's
    real = LoopConfig(model=str(tmp_path))
    assert (real.train_loss, real.lr, real.train_options().loss_on) == ("trace", 1e-5, "trace")
    assert (real.filter_samples, real.patience) == (1, 1)
    assert LoopConfig(train_loss="verdict").train_options().loss_on == "verdict"


@pytest.mark.parametrize("overrides, field", [
    ({"iterations": 0}, "iterations"),
    ({"n_samples": 0, "min_votes": 0}, "n_samples"),
    ({"n_samples": 0}, "n_samples"),
    ({"min_votes": 0}, "min_votes"),
    ({"n_samples": 4, "min_votes": 5}, "min_votes"),
    ({"batch_size": 0}, "batch_size"),
    ({"k": 0}, "k"),
    ({"train_loss": "reasoning"}, "train_loss"),
    ({"top_p": 0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -1}, "top_k"),
    ({"temperature": -1}, "temperature"),
    ({"temperature": 0, "n_samples": 16}, "temperature"),
    ({"device": "tpu"}, "device"),
    ({"rewrite_temperature": -0.1}, "rewrite_temperature"),
    ({"eval_temperature": -1}, "eval_temperature"),
    ({"corrupter": "x"}, "corrupter"),
    ({"train": "x"}, "train"),
    ({"synth_model": "x"}, "synth_model"),
    ({"closed_fraction": 2}, "closed_fraction"),
    ({"closed_fraction": -0.5}, "closed_fraction"),
    ({"lr": 0}, "lr"),
    ({"lr": -1e-3}, "lr"),
    ({"model": "/nonexistent"}, "model"),
    ({"prompts": "/nonexistent.jsonl"}, "prompts"),
    ({"bench_data": "/nonexistent"}, "bench_data"),
    ({"bench": "vlrewardbench"}, "bench_data"),
    ({"bench": "nope"}, "bench"),
    ({"prompt": "benchmark"}, "prompt"),
    ({"train": "qlora"}, "train"),
    ({"unparsed": "maybe"}, "unparsed"),
    ({"dtype": "int8"}, "dtype"),
    ({"feature_cache_gb": -1}, "feature_cache_gb"),
])
def test_invalid_values_name_the_field(overrides, field):
    with pytest.raises(ValueError) as info:
        LoopConfig(**overrides)
    assert str(info.value).startswith(f"{field}:"), str(info.value)


@pytest.mark.parametrize("overrides", [
    {"top_p": 1.0}, {"temperature": 0, "n_samples": 1, "min_votes": 1}, {"closed_fraction": 0}, {"closed_fraction": 1},
    {"n_samples": 5, "min_votes": 5}, {"top_k": 0}, {"corrupter": "rules", "synth_model": "judge", "train": "all"},
])
def test_boundary_values_are_valid(overrides):
    cfg = LoopConfig(**overrides)
    for name, value in overrides.items():
        assert getattr(cfg, name) == value


def test_existing_paths_are_accepted(tmp_path):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text("{}")
    (tmp_path / "p.jsonl").write_text("")
    (tmp_path / "b.jsonl").write_text("")
    cfg = LoopConfig(model=str(tmp_path / "ckpt"), prompts=str(tmp_path / "p.jsonl"), bench_data=str(tmp_path / "b.jsonl"))
    assert cfg.model == str(tmp_path / "ckpt")
    with pytest.raises(ValueError, match="^model:"):
        LoopConfig(model=str(tmp_path))  # a folder without config.json is no checkpoint


def test_save_load_round_trip(tmp_path):
    (tmp_path / "p.jsonl").write_text("")
    cfg = LoopConfig(out=str(tmp_path / "run"), prompts=str(tmp_path / "p.jsonl"), seed=7, iterations=2,
                     n_samples=8, min_votes=3, top_p=0.5, lr=1e-3, corrupter="rules", train="all", resume=True)
    path = tmp_path / "sub" / "config.json"
    cfg.save(path)
    assert json.loads(path.read_text())["n_samples"] == 8
    assert LoopConfig.load(path) == cfg
    assert not list(path.parent.glob("*.tmp"))


def test_load_ignores_unknown_keys_and_validates(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"seed": 3, "from_an_older_version": 1}))
    # settings it does not name are those of a run written before they existed (one judgment per order, no
    # patience, the whole trace trained)
    assert LoopConfig.load(path) == LoopConfig(seed=3, filter_samples=1, patience=1, train_loss="trace")
    path.write_text(json.dumps({"top_p": 2}))
    with pytest.raises(ValueError, match="^top_p:"):
        LoopConfig.load(path)


def test_each_stage_gets_its_own_settings_from_the_config():
    """The stages take small options, not the loop's config: every setting a stage reads comes from the field
    of the same meaning (renamed where the stage's name is shorter)."""
    from fastjudge.toy.world import rewrite_with_error
    cfg = LoopConfig(n_samples=12, temperature=0.7, top_k=40, top_p=0.8, min_votes=4, early_stop=0.9, round_size=3,
                     answer_tokens=33, rewrite_temperature=0.4, batch_rows=48, batch_tokens=9000, judge_tokens=55,
                     filter_temperature=0.5, filter_reasoning="sampled", epochs=2, lr=2e-4, batch_size=8,
                     micro_batches=3, train="lora", lora_rank=4, lora_alpha=8.0, bench="toy", k=3,
                     eval_temperature=0.2, unparsed="random")
    synth = cfg.synth_options()
    assert synth.samples == SamplingParams(n=12, max_new_tokens=33, temperature=0.7, top_k=40, top_p=0.8)
    assert synth.rewrite == SamplingParams(max_new_tokens=33, temperature=0.4, top_k=40, top_p=0.8)
    assert synth.answer == SamplingParams(max_new_tokens=33)  # greedy
    assert (synth.min_votes, synth.early_stop, synth.round_size, synth.batch_rows,
            synth.batch_tokens) == (4, 0.9, 3, 48, 9000)
    assert synth.corrupter is None  # the model rewrites its own answers
    assert LoopConfig(corrupter="rules").synth_options().corrupter is rewrite_with_error
    filtering = cfg.filter_options()
    assert filtering.judgment == SamplingParams(n=8, max_new_tokens=55, temperature=0.5, top_k=40, top_p=0.8)
    assert (filtering.reasoning, filtering.batch_rows, filtering.keep_all) == ("sampled", 48, False)
    assert LoopConfig(ablation="no-filter").filter_options().keep_all
    training = cfg.train_options()
    assert (training.epochs, training.lr, training.batch_size, training.micro_batches, training.train,
            training.lora_rank, training.lora_alpha) == (2, 2e-4, 8, 3, "lora", 4, 8.0)
    evaluation = cfg.eval_options()
    assert evaluation.judgment == SamplingParams(max_new_tokens=55, temperature=0.2, top_k=40, top_p=0.8)
    assert (evaluation.bench, evaluation.k, evaluation.unparsed, evaluation.batch_tokens) == ("toy", 3, "random", 9000)
    assert LoopConfig(k=1).eval_options().judgment == SamplingParams(max_new_tokens=80)  # one judgment: greedy


@pytest.mark.parametrize("name", ["lr", "min_gain", "temperature", "top_p", "filter_temperature", "dist_timeout_s",
                                  "feature_cache_gb", "lora_alpha"])
@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_a_number_that_is_not_finite_is_refused_by_name(name, value):
    with pytest.raises(ValueError, match=f"^{name}: expected a finite number"):
        LoopConfig(**{name: value})


def test_train_with_an_infinite_lr_is_a_one_line_error(tmp_path, capsys):
    from fastjudge import cli
    code = cli.main(["train", "--sft", str(tmp_path / "sft.jsonl"), "--out", str(tmp_path / "ckpt"), "--lr", "inf"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "lr: expected a finite number, got inf" in err
    assert not (tmp_path / "ckpt").exists()
