"""`fastjudge toy-pretrain`: the task mixture and a resumable run on tiny settings."""

import json
import random
from collections import Counter

import pytest
import torch

from fastjudge.data import prompts
from fastjudge.models import load_adapter
from fastjudge.models.toy import base_model_dir
from fastjudge.toy import model as toy
from fastjudge.toy import pretrain, world


def test_every_task_gives_in_vocabulary_examples(rng):
    tokenizer = toy.build_tokenizer()
    for task in pretrain.TASKS:
        for _ in range(20):
            image, prompt, target, given = pretrain.example(rng, task)
            assert image.size == (world.IMAGE_SIZE, world.IMAGE_SIZE)
            ids = tokenizer.convert_tokens_to_ids(toy.normalize_text(prompt + " " + target).split())
            assert tokenizer.unk_token_id not in ids, (task, prompt, target)
            if task == "judge":
                assert prompts.parse_verdict(target) in ("A", "B")


@pytest.mark.parametrize("follow", [0.0, 0.4, 1.0])
def test_judge_examples_have_right_checks_and_a_verdict_that_follows_them_as_often_as_configured(follow):
    rng = random.Random(0)
    follows, picks_a, captions, total = 0, 0, 0, 600
    for _ in range(total):
        _, prompt, target, _ = pretrain.example(rng, "judge", verdict_follow=follow)
        a = prompt.split(" answer A : ")[1].split(" answer B : ")[0]
        b = prompt.split(" answer B : ")[1].removesuffix(" which answer is better ?")
        own, a_yes, b_yes = prompts.parse_toy_reasoning(prompts.judge_reasoning(target))
        # the own answer is the correct response; exactly one answer agrees with it, and the checks say which
        assert (a_yes, b_yes) == (own == a, own == b) and a_yes != b_yes
        verdict = prompts.parse_verdict(target)
        pick = prompts.checks_verdict(prompts.judge_reasoning(target))
        follows += verdict == pick
        picks_a += pick == "A"
        assert verdict in ("A", pick)  # the checks' pick, or the position bias
        captions += world.parse_caption(own) is not None
    # following the checks: the `follow` share, plus the other examples whose checks happen to say A
    expected = follow + (1 - follow) * picks_a / total
    assert abs(follows / total - expected) < 0.06, (follows / total, expected)
    assert 0.4 < captions / total < 0.6  # half the judge examples are about captions


@pytest.mark.parametrize("given_own", [0.0, 0.5])
def test_a_given_own_answer_is_either_response_and_the_checks_compare_with_it(given_own, monkeypatch):
    made_bad = []  # the response with the error of each example, as the world writes it
    rewrite = world.rewrite_with_error
    monkeypatch.setattr(world, "rewrite_with_error", lambda *args: made_bad.append(rewrite(*args)) or made_bad[-1])
    rng = random.Random(3)
    total, given_count, own_is_bad = 600, 0, 0
    for _ in range(total):
        _, prompt, target, given = pretrain.example(rng, "judge", given_own=given_own)
        a = prompt.split(" answer A : ")[1].split(" answer B : ")[0]
        b = prompt.split(" answer B : ")[1].removesuffix(" which answer is better ?")
        whole = f"{given} {target}".strip()
        own, a_yes, b_yes = prompts.parse_toy_reasoning(prompts.judge_reasoning(whole))
        assert own in (a, b) and (a_yes, b_yes) == (own == a, own == b)  # the checks compare with the own answer
        assert prompts.parse_verdict(target) in ("A", prompts.checks_verdict(prompts.judge_reasoning(whole)))
        if given:
            given_count += 1
            assert given == f"my answer : {own}" and target.startswith("A : ")  # the own answer is not trained
            own_is_bad += own == made_bad[-1]
        else:
            assert own != made_bad[-1]  # a trained own answer is always the right one
    assert abs(given_count / total - given_own) < 0.06, given_count / total
    if given_own:
        assert abs(own_is_bad / given_count - 0.5) < 0.08  # either response, as often


def test_a_recipe_runs_its_phases_in_order_each_from_the_last(tmp_path):
    phases = ({"steps": 1, "batch_size": 2, "warmup": 1}, {"steps": 1, "batch_size": 2, "warmup": 1, "seed": 1})
    configs = pretrain.recipe_configs(phases, tmp_path / "r")
    assert configs[0].init is None and configs[1].init == str(tmp_path / "r" / "phase-0" / "checkpoint")
    checkpoint = pretrain.run_recipe(phases, tmp_path / "r")
    assert checkpoint == tmp_path / "r" / "phase-1" / "checkpoint" and load_adapter(str(checkpoint))
    record = json.loads((tmp_path / "r" / "pretrain_config.json").read_text())
    assert [p["seed"] for p in record["phases"]] == [0, 1] and "init" not in record["phases"][1]
    # a finished phase is not run again
    stamp = (tmp_path / "r" / "phase-0" / "checkpoint" / "model.safetensors").stat().st_mtime_ns
    pretrain.run_recipe(phases, tmp_path / "r")
    assert (tmp_path / "r" / "phase-0" / "checkpoint" / "model.safetensors").stat().st_mtime_ns == stamp


def test_pretraining_runs_saves_and_resumes(tmp_path):
    cfg = pretrain.PretrainConfig(out=str(tmp_path / "base"), steps=2, batch_size=4, save_every=1, warmup=1)
    checkpoint = pretrain.run(cfg)
    assert load_adapter(str(checkpoint)).judge_style == "toy"
    assert torch.load(tmp_path / "base" / "state.pt", weights_only=True)["step"] == 2
    pretrain.run(pretrain.PretrainConfig(**(vars(cfg) | {"steps": 3})))
    assert torch.load(tmp_path / "base" / "state.pt", weights_only=True)["step"] == 3
    assert json.loads((tmp_path / "base" / "config.json").read_text())["steps"] == 3


def _family_of(instruction: str) -> str:
    """The closed question family of a qa prompt, read from its words (independently of Question.family)."""
    words = instruction.split()
    if words[:2] == ["how", "many"]:
        return "count"
    if words[0] == "what":
        return "attribute"
    return {"which": "option", "where": "where", "is": "relation"}[words[0]]


def test_qa_families_weigh_the_closed_question_families():
    # uniform by default: every family drawn, relation less often (absent from one-object scenes)
    uniform = Counter(_family_of(pretrain.example(random.Random(i), "qa")[1]) for i in range(1000))
    assert set(uniform) == set(world.CLOSED_FAMILIES)
    assert all(170 < uniform[f] < 240 for f in ("count", "attribute", "option", "where")), uniform
    assert uniform["relation"] < uniform["where"]
    # weighted: a family left out is never drawn; the others in proportion to their weights on scenes that have
    # both: 2/3 of the two- and three-object scenes (2/3 of all), none of the one-object ones, so 4/9 overall
    weights = {"where": 1.0, "relation": 2.0}
    drawn = Counter(_family_of(pretrain.example(random.Random(i), "qa", qa_families=weights)[1])
                    for i in range(1000))
    assert set(drawn) == {"where", "relation"}
    assert abs(drawn["relation"] / 1000 - 4 / 9) < 0.05, drawn
    # and the answer is still the scene's truth
    for i in range(50):
        image_rng = random.Random(i)
        _, prompt, target, _ = pretrain.example(image_rng, "qa", qa_families={"relation": 1.0, "count": 1.0})
        assert world.final_answer(target) is not None


def test_bad_pretrain_config_names_the_field():
    with pytest.raises(ValueError, match="^steps"):
        pretrain.PretrainConfig(steps=0)
    with pytest.raises(ValueError, match="^mixture: expected a dict"):
        pretrain.PretrainConfig(mixture=(1.0, 1.0))  # the old positional form is refused, not misread
    with pytest.raises(ValueError, match=r"^mixture: unknown task\(s\) \['captions'\]"):
        pretrain.PretrainConfig(mixture={"captions": 1.0})
    with pytest.raises(ValueError, match="^mixture: expected non-negative"):
        pretrain.PretrainConfig(mixture={"caption": 1.0, "qa": -0.5})
    with pytest.raises(ValueError, match="^threads"):
        pretrain.PretrainConfig(threads=0)
    with pytest.raises(ValueError, match=r"^qa_families: unknown famil\(ies\) \['colour'\]"):
        pretrain.PretrainConfig(qa_families={"colour": 1.0})
    with pytest.raises(ValueError, match="^qa_families: expected non-negative"):
        pretrain.PretrainConfig(qa_families={"where": -1.0, "count": 2.0})
    with pytest.raises(ValueError, match="^qa_families: expected a positive weight for at least one of"):
        pretrain.PretrainConfig(qa_families={"relation": 1.0})  # a one-object scene would have nothing to draw


def test_mixture_is_named_per_task():
    assert pretrain.parse_mixture("qa=0.5, caption=1") == {"qa": 0.5, "caption": 1.0}
    with pytest.raises(ValueError, match="^mixture: expected task=weight"):
        pretrain.parse_mixture("0.3,0.36")
    with pytest.raises(ValueError, match="^mixture: weight of 'qa'"):
        pretrain.parse_mixture("qa=lots")
    # the default weighs the tasks as the shipped base's record says, in the order TASKS draws them
    record = json.loads((base_model_dir() / "pretrain_config.json").read_text())
    assert record["phases"][0]["mixture"] == pretrain.DEFAULT_MIXTURE
    assert pretrain.PretrainConfig().weights() == [pretrain.DEFAULT_MIXTURE[t] for t in pretrain.TASKS]
    # and the rest of the recipe: `fastjudge toy-pretrain --recipe shipped` rebuilds the shipped base
    assert record == pretrain.recipe_record(pretrain.recipe_configs(pretrain.SHIPPED_RECIPE, "out"))
    # a task left out has weight 0: it is never drawn, and the others keep their names
    cfg = pretrain.PretrainConfig(mixture={"qa": 1.0, "match": 1.0})
    assert cfg.weights() == [0.0, 1.0, 0.0, 0.0, 1.0]
    _, _, _, tasks, _ = pretrain.batch(random.Random(0), 40, cfg.weights())
    assert set(tasks) == {"qa", "match"}


def test_toy_pretrain_command_takes_named_weights_and_threads(tmp_path, capsys):
    from fastjudge import cli
    out = tmp_path / "base"
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert cli.main(["toy-pretrain", "--out", str(out), "--steps", "1", "--batch-size", "2",
                         "--mixture", "qa=1,judge=1", "--threads", "1"]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    saved = json.loads((out / "config.json").read_text())
    assert saved["mixture"] == {"qa": 1.0, "judge": 1.0} and saved["threads"] == 1
    assert cli.main(["toy-pretrain", "--out", str(tmp_path / "bad"), "--mixture", "0.3,0.7"]) == 2
    assert "mixture: expected task=weight" in capsys.readouterr().err
    assert cli.main(["toy-pretrain", "--out", str(tmp_path / "families"), "--steps", "1", "--batch-size", "2",
                     "--qa-families", "where=2,relation=1"]) == 0
    saved = json.loads((tmp_path / "families" / "config.json").read_text())
    assert saved["qa_families"] == {"where": 2.0, "relation": 1.0}
    assert cli.main(["toy-pretrain", "--out", str(tmp_path / "bad2"), "--qa-families", "where"]) == 2
    assert "qa-families: expected family=weight" in capsys.readouterr().err
    assert cli.main(["toy-pretrain", "--out", str(tmp_path / "bad3"), "--recipe", "shipped",
                     "--qa-families", "where=1"]) == 2
    assert "drop --qa-families" in capsys.readouterr().err
    assert cli.main(["toy-pretrain", "--out", str(tmp_path / "blind"), "--steps", "1", "--batch-size", "2",
                     "--blind-checks", "caption, where", "--blind-pick-one"]) == 0
    saved = json.loads((tmp_path / "blind" / "config.json").read_text())
    assert saved["blind_checks"] == ["caption", "where"] and saved["blind_pick_one"] is True
    assert cli.main(["toy-pretrain", "--out", str(tmp_path / "bad4"), "--blind-checks", "captions"]) == 2
    assert "blind_checks: unknown famil" in capsys.readouterr().err
    assert cli.main(["toy-pretrain", "--out", str(tmp_path / "bad5"), "--recipe", "shipped", "--blind-pick-one"]) == 2
    assert "drop --blind-pick-one" in capsys.readouterr().err


def test_blind_checks_that_pick_one_single_out_an_answer_by_a_coin_flip():
    rng = random.Random(1)
    picks_right = []
    for _ in range(800):
        _, prompt, target, _ = pretrain.example(rng, "judge", verdict_follow=1.0, blind_checks=("caption",),
                                                blind_pick_one=True)
        own, a_agrees, b_agrees = prompts.parse_toy_reasoning(prompts.judge_reasoning(target))
        if world.parse_caption(own) is None:
            continue
        a = prompt.split(" answer A : ")[1].split(" answer B : ")[0]
        assert a_agrees != b_agrees  # one answer picked, as right checks do
        picks_right.append(a_agrees == (own == a))
    assert abs(sum(picks_right) / len(picks_right) - 0.5) < 0.06
