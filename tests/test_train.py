"""Fine-tuning: loss on assistant tokens only, it learns, and checkpoints load in plain transformers."""

import random

import pytest
import torch
from transformers import AutoTokenizer, MllamaForConditionalGeneration

from fastjudge.data import prompts
from fastjudge.data.images import load_images
from fastjudge.stages.train import save_checkpoint
from fastjudge.models import ToyAdapter
from fastjudge.stages import train
from fastjudge.toy import model as toy
from fastjudge.toy import world


def _traces(tmp_path, count: int, seed: int):
    rng = random.Random(seed)
    traces = []
    for i in range(count):
        scene = world.random_scene(rng)
        path = tmp_path / f"{i}.png"
        world.render(scene, rng).save(path)
        q = rng.choice(world.questions(scene, rng)[1:])
        good = world.closed_response(q.answer)
        bad = world.closed_response(world.corrupt_answer(q, rng))
        target = prompts.judge_target(prompts.toy_reasoning(good, True, False), "A")  # own answer, checks, verdict
        traces.append({"image": str(path), "prompt": prompts.judge_prompt(q.instruction, good, bad), "target": target,
                       "pair": i, "verdict": "A"})
    return traces


def test_labels_cover_the_assistant_turn_only(tiny_toy_dir, tmp_path):
    adapter = ToyAdapter.load(tiny_toy_dir)
    traces = _traces(tmp_path, 3, seed=0)
    images = [world.render(world.random_scene(random.Random(i)), random.Random(i)) for i in range(3)]
    inputs, labels = adapter.training_inputs(images, [t["prompt"] for t in traces], [t["target"] for t in traces])
    tokenizer = adapter.tokenizer
    for row, (ids, lab, trace) in enumerate(zip(inputs["input_ids"], labels, traces)):
        prompt_len = len(adapter.encode_prompt(trace["prompt"]))
        target_ids = tokenizer.convert_tokens_to_ids(trace["target"].split()) + [tokenizer.eos_token_id]
        assert (lab[:prompt_len] == -100).all()
        assert lab[prompt_len:prompt_len + len(target_ids)].tolist() == target_ids
        assert (lab[prompt_len + len(target_ids):] == -100).all()  # padding
        assert ids[prompt_len:prompt_len + len(target_ids)].tolist() == target_ids


def test_fine_tuning_lowers_the_loss_and_saves_a_plain_checkpoint(tiny_toy_dir, tmp_path):
    adapter = ToyAdapter.load(tiny_toy_dir)
    traces = _traces(tmp_path, 16, seed=1)
    images = [world.render(world.random_scene(random.Random(9)), random.Random(9))] * 4
    batch = traces[:4]
    with torch.no_grad():
        before = adapter.sft_loss(images, [t["prompt"] for t in batch], [t["target"] for t in batch]).item()
    vision_before = {n: p.clone() for n, p in adapter.model.named_parameters() if "vision_model" in n}
    stats = train.run(adapter, traces, train.TrainOptions(epochs=4, batch_size=4, lr=3e-3), seed=0)
    assert stats["steps"] == 16
    assert stats["loss_last"] < stats["loss_first"]
    with torch.no_grad():
        after = adapter.sft_loss(images, [t["prompt"] for t in batch], [t["target"] for t in batch]).item()
    assert after < before
    # default: the vision tower is frozen
    for name, param in adapter.model.named_parameters():
        if name in vision_before:
            assert torch.equal(param, vision_before[name]), name

    save_checkpoint(adapter, tmp_path / "ckpt")
    model = MllamaForConditionalGeneration.from_pretrained(tmp_path / "ckpt")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "ckpt")
    text = toy.normalize_text(traces[0]["target"])
    assert tokenizer.convert_tokens_to_ids(text.split()) == adapter.tokenizer.convert_tokens_to_ids(text.split())
    for (name, a), b in zip(adapter.model.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name


def test_verdict_split_gives_the_reasoning_and_trains_the_rest():
    target = prompts.judge_target(prompts.toy_reasoning("the answer is 3 .", True, False), "A")
    given, trained = train.verdict_split(target)
    assert given + trained == target
    assert given.endswith("verdict : [[") and trained.split() == ["A", "]]"]
    natural = prompts.judge_target("The first answer is right.", "B", style="natural")
    assert train.verdict_split(natural) == ("The first answer is right.\n\n[[", "B]]")
    assert train.verdict_split("no verdict here") == ("", "no verdict here")  # trained whole, never dropped


def test_checks_split_gives_the_own_answer_and_trains_the_checks_and_verdict():
    target = prompts.judge_target(prompts.toy_reasoning("the answer is 3 .", True, False), "A")
    assert train.checks_split(target) == ("my answer : the answer is 3 .", " A : yes B : no verdict : [[ A ]]")
    # an own answer that itself holds " A : " is split at the checks, the last part before the verdict
    tricky = prompts.judge_target(prompts.toy_reasoning("the A : yes box .", False, True), "B")
    assert train.checks_split(tricky)[1] == " A : no B : yes verdict : [[ B ]]"
    natural = prompts.judge_target("The first answer is right.", "B", style="natural")
    assert train.checks_split(natural) == ("", natural)  # no own-answer part: trained whole
    assert train.checks_split("my answer : 3 . verdict : [[ A ]]") == ("", "my answer : 3 . verdict : [[ A ]]")


@pytest.mark.parametrize("loss_on", ["verdict", "checks"])
def test_a_partial_loss_covers_its_tokens_only(tiny_toy_dir, tmp_path, loss_on):
    """loss_on="verdict" ("checks"): the first step's loss (before any update: all traces in one batch) is the
    loss of the verdict tokens given the reasoning (of the checks and verdict given the own answer), not that of
    the whole trace."""
    adapter = ToyAdapter.load(tiny_toy_dir)
    traces = _traces(tmp_path, 5, seed=2)
    images = list(load_images([t["image"] for t in traces]))
    prompt_texts = [t["prompt"] for t in traces]
    split = [{"verdict": train.verdict_split, "checks": train.checks_split}[loss_on](t["target"]) for t in traces]
    assert all(given for given, _ in split)  # every toy trace has the part that is given
    with torch.no_grad():
        partial = adapter.sft_loss(images, prompt_texts, [s[1] for s in split], given=[s[0] for s in split]).item()
        whole = adapter.sft_loss(images, prompt_texts, [t["target"] for t in traces]).item()
    stats = train.run(adapter, traces, train.TrainOptions(epochs=1, batch_size=8, lr=1e-3, loss_on=loss_on,
                                                         pack=False), seed=0)
    assert abs(stats["loss_first"] - partial) < 1e-4 * max(1.0, partial)
    assert abs(partial - whole) > 1e-3
    with pytest.raises(ValueError, match="loss_on"):
        train.TrainOptions(loss_on="reasoning")
