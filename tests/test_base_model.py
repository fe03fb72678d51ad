"""The shipped toy base model: loads from the package and writes the judge's format."""

import random

from fastjudge.data import prompts
from fastjudge.models import load_adapter
from fastjudge.models.toy import base_model_dir
from fastjudge.toy import world


def test_shipped_base_model_writes_the_judge_format():
    assert (base_model_dir() / "model.safetensors").stat().st_size < 10 * 2**20  # ships at most 10 MB
    adapter = load_adapter(None)
    rng = random.Random(0)
    images, texts, questions = [], [], []
    for category in world.CATEGORIES:
        item = None
        while item is None:
            scene = world.random_scene(rng)
            item = world.benchmark_item(scene, rng, category)
        question, good, bad = item
        images.append(world.render(scene, rng))
        texts.append(prompts.judge_prompt(question.instruction, good, bad))
        questions.append(question)
    outputs = [c[0] for c in adapter.generate(images, texts, max_new_tokens=80)]
    for output in outputs:
        assert output.startswith("my answer : ")
        assert prompts.parse_verdict(output) in ("A", "B")
