"""The toy world on disk: a prompt pool of shapes-world scenes (images and instructions only) and the held-out
toy judge benchmark in VL-RewardBench's schema; `toy_prompt_truth` is the one way to a pool's ground truth."""

from __future__ import annotations

import random
from pathlib import Path

from fastjudge.data.io import write_jsonl
from fastjudge.toy import world


def _toy_prompts(count: int, seed: int, closed_fraction: float):
    """The toy prompt pool's scenes, drawn in order: (index, scene, image, question) for each prompt."""
    rng = random.Random(seed)
    for i in range(count):
        scene = world.random_scene(rng)
        image = world.render(scene, rng)
        qs = world.questions(scene, rng)
        yield i, scene, image, (rng.choice(qs[1:]) if rng.random() < closed_fraction else qs[0])


def write_toy_prompts(folder: Path | str, count: int, seed: int, closed_fraction: float = 0.5) -> Path:
    """A prompt pool of `count` shapes-world prompts (images as PNG) in `folder`; returns the JSONL path.

    Only images and instructions are written: the answers stay in the scene generator, unseen by the loop.
    """
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i, _, image, q in _toy_prompts(count, seed, closed_fraction):
        name = f"images/p{i:05d}.png"
        image.save(folder / name)
        row = {"id": f"toy-{seed}-{i}", "image": name, "instruction": q.instruction, "kind": q.kind}
        if q.kind == "closed":
            row["answer_type"] = q.answer_type
        rows.append(row)
    write_jsonl(folder / "prompts.jsonl", rows)
    return folder / "prompts.jsonl"


def toy_prompt_truth(count: int, seed: int, closed_fraction: float = 0.5) -> dict[str, "world.Question"]:
    """Ground truth of the pool `write_toy_prompts(..., count, seed, closed_fraction)` wrote: prompt id ->
    its question with the true answer. For measuring only (how often synthetic labels are right); the loop's
    stages never call it (a test runs them with it made to raise)."""
    return {f"toy-{seed}-{i}": q for i, _, _, q in _toy_prompts(count, seed, closed_fraction)}


def write_toy_benchmark(folder: Path | str, per_category: int = 100, seed: int = 20_251_205) -> Path:
    """The held-out toy judge benchmark in VL-RewardBench's schema: for each category, `per_category` pairs
    of a correct response and one with exactly one error. The preferred response's position is random."""
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    rows = []
    for category, made, scene, (question, good, bad) in world.benchmark_draws(rng, per_category):
        name = f"images/{category}-{made:04d}.png"
        world.render(scene, rng).save(folder / name)
        good_first = rng.random() < 0.5
        rows.append({
            "id": f"toy_{category}-{made:04d}", "image_path": name, "query": question.instruction,
            "response": [good, bad] if good_first else [bad, good],
            "human_ranking": [0, 1] if good_first else [1, 0],
            "models": ["ground-truth", "one-error"] if good_first else ["one-error", "ground-truth"],
            "judge": "scene ground truth", "rationale": None, "query_source": "fastjudge-shapes",
            "category": category, "meta": {"kind": question.kind, "answer_type": question.answer_type},
        })
    write_jsonl(folder / "benchmark.jsonl", rows)
    return folder / "benchmark.jsonl"
