"""`fastjudge toy-pretrain`: the task mixture and a resumable run on tiny settings."""

import json
import random

import pytest
import torch

from fastjudge import pretrain, prompts, toy, world
from fastjudge.models import load_adapter


def test_every_task_gives_in_vocabulary_examples(rng):
    tokenizer = toy.build_tokenizer()
    for task in pretrain.TASKS:
        for _ in range(20):
            image, prompt, target = pretrain.example(rng, task)
            assert image.size == (world.IMAGE_SIZE, world.IMAGE_SIZE)
            ids = tokenizer.convert_tokens_to_ids(toy.normalize_text(prompt + " " + target).split())
            assert tokenizer.unk_token_id not in ids, (task, prompt, target)
            if task == "judge":
                # reasoning is the correct response; the verdict is a coin flip (checked over many below)
                assert prompts.parse_verdict(target) in ("A", "B")


def test_judge_verdicts_are_uninformative():
    rng = random.Random(0)
    agree = 0
    for _ in range(400):
        _, prompt, target = pretrain.example(rng, "judge")
        reasoning = prompts.judge_reasoning(target)
        a = prompt.split(" answer A : ")[1].split(" answer B : ")[0]
        agree += (prompts.parse_verdict(target) == "A") == (a == reasoning)
    assert 160 < agree < 240  # a coin flip: about 200 of 400


def test_pretraining_runs_saves_and_resumes(tmp_path):
    cfg = pretrain.PretrainConfig(out=str(tmp_path / "base"), steps=2, batch_size=4, save_every=1, warmup=1)
    checkpoint = pretrain.run(cfg)
    assert load_adapter(str(checkpoint)).judge_style == "toy"
    assert torch.load(tmp_path / "base" / "state.pt", weights_only=True)["step"] == 2
    pretrain.run(pretrain.PretrainConfig(**(vars(cfg) | {"steps": 3})))
    assert torch.load(tmp_path / "base" / "state.pt", weights_only=True)["step"] == 3
    assert json.loads((tmp_path / "base" / "config.json").read_text())["steps"] == 3


def test_bad_pretrain_config_names_the_field():
    with pytest.raises(ValueError, match="^steps"):
        pretrain.PretrainConfig(steps=0)
    with pytest.raises(ValueError, match="^mixture"):
        pretrain.PretrainConfig(mixture=(1.0, 1.0))
