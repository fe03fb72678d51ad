"""The toy world on disk: a prompt pool of shapes-world scenes (images and instructions only) and the held-out
toy judge benchmark in VL-RewardBench's schema; `toy_prompt_truth` is the one way to a pool's ground truth."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

from fastjudge.core import dist
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


def write_toy_prompts(folder: Path | str, count: int, seed: int, closed_fraction: float = 0.5,
                      shard: tuple[int, int] | None = None) -> Path:
    """A prompt pool of `count` shapes-world prompts (images as PNG) in `folder`; returns the JSONL path.

    Only images and instructions are written: the answers stay in the scene generator, unseen by the loop.
    With `shard` = (rank, size) (a torchrun job; every rank calls this) this process saves images rank,
    rank + size, ... (every draw is still made in order, so each image is the same whoever saves it) and,
    once every rank has saved its share, rank 0 writes the JSONL.
    """
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i, _, image, q in _toy_prompts(count, seed, closed_fraction):
        name = f"images/p{i:05d}.png"
        if _saves(i, shard):
            image.save(folder / name)
        row = {"id": f"toy-{seed}-{i}", "image": name, "instruction": q.instruction, "kind": q.kind}
        if q.kind == "closed":
            row["answer_type"] = q.answer_type
        rows.append(row)
    if shard is not None:
        dist.barrier()  # every image saved before the file that lists them
    if shard is None or shard[0] == 0:
        write_jsonl(folder / "prompts.jsonl", rows)
    return folder / "prompts.jsonl"


def _saves(index: int, shard: tuple[int, int] | None) -> bool:
    """Whether this process saves item `index`'s image: all of them alone, its share in a job."""
    return shard is None or index % shard[1] == shard[0]


def toy_prompt_truth(count: int, seed: int, closed_fraction: float = 0.5) -> dict[str, "world.Question"]:
    """Ground truth of the pool `write_toy_prompts(..., count, seed, closed_fraction)` wrote: prompt id ->
    its question with the true answer. For measuring only (how often synthetic labels are right); the loop's
    stages never call it (a test runs them with it made to raise)."""
    return {f"toy-{seed}-{i}": q for i, _, _, q in _toy_prompts(count, seed, closed_fraction)}


def write_toy_benchmark(folder: Path | str, per_category: int = 100, seed: int = 20_251_205,
                        shard: tuple[int, int] | None = None) -> Path:
    """The held-out toy judge benchmark in VL-RewardBench's schema: for each category, `per_category` pairs
    of a correct response and one with exactly one error. The preferred response's position is random.
    `shard`: as in `write_toy_prompts`."""
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    rows = []
    for index, (category, made, scene, (question, good, bad)) in enumerate(world.benchmark_draws(rng, per_category)):
        name = f"images/{category}-{made:04d}.png"
        image = world.render(scene, rng)  # drawn by every process: the draws after it depend on it
        if _saves(index, shard):
            image.save(folder / name)
        good_first = rng.random() < 0.5
        rows.append({
            "id": f"toy_{category}-{made:04d}", "image_path": name, "query": question.instruction,
            "response": [good, bad] if good_first else [bad, good],
            "human_ranking": [0, 1] if good_first else [1, 0],
            "models": ["ground-truth", "one-error"] if good_first else ["one-error", "ground-truth"],
            "judge": "scene ground truth", "rationale": None, "query_source": "fastjudge-shapes",
            "category": category, "meta": {"kind": question.kind, "answer_type": question.answer_type},
        })
    if shard is not None:
        dist.barrier()  # every image saved before the file that lists them
    if shard is None or shard[0] == 0:
        write_jsonl(folder / "benchmark.jsonl", rows)
    return folder / "benchmark.jsonl"


def write_judge_examples(benchmark: Path | str, folder: Path | str) -> tuple[Path, Path]:
    """Inputs for `fastjudge judge` and `fastjudge rank` made from the toy benchmark's items: pairs.jsonl (each
    item's two responses as response_a and response_b, in the benchmark's order) and candidates.jsonl (each
    item's two responses and the next item's first response as a third, an answer to another question). Images stay
    where the benchmark has them (paths relative to the files)."""
    benchmark, folder = Path(benchmark), Path(folder)
    items = [json.loads(line) for line in benchmark.read_text().splitlines() if line.strip()]
    relative = Path(os.path.relpath(benchmark.parent, folder))
    pairs = [{"id": item["id"], "image": str(relative / item["image_path"]), "question": item["query"],
              "response_a": item["response"][0], "response_b": item["response"][1]} for item in items]
    candidates = [{"id": item["id"], "image": str(relative / item["image_path"]), "question": item["query"],
                   "answers": [*item["response"], items[(i + 1) % len(items)]["response"][0]]}
                  for i, item in enumerate(items)]
    write_jsonl(folder / "pairs.jsonl", pairs)
    write_jsonl(folder / "candidates.jsonl", candidates)
    return folder / "pairs.jsonl", folder / "candidates.jsonl"
