import contextlib
import os
import random
from pathlib import Path

import pytest
import torch

# Triton kernels run in the interpreter on a machine without a GPU; this must happen before anything imports
# triton (transformers does, through fastjudge.models)
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from fastjudge.models import ToyAdapter  # noqa: E402
from fastjudge.toy import model as toy  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_toy_dir(tmp_path_factory):
    """A random-weight toy Mllama (smaller than the shipped one) saved as a checkpoint folder."""
    tokenizer = toy.build_tokenizer()
    config = toy.build_config(tokenizer, text_hidden=64, text_layers=4, cross_layers=(1,), vision_hidden=32)
    folder = tmp_path_factory.mktemp("tiny-toy")
    ToyAdapter(toy.build_model(config, seed=0), tokenizer).save(folder)
    return folder


@pytest.fixture
def enter():
    """enter(context_manager): entered for the rest of the test and left after it (tile presets, say)."""
    with contextlib.ExitStack() as stack:
        yield stack.enter_context


@pytest.fixture
def rng():
    seed = random.randrange(1 << 30)
    print(f"random seed {seed}")
    return random.Random(seed)


# ../shared beside the checkout (data and notes for the project); FASTJUDGE_SHARED points elsewhere (a copy
# carried to another machine)
SHARED = Path(os.environ.get("FASTJUDGE_SHARED", Path(__file__).resolve().parents[2] / "shared"))

# VL-RewardBench's text: the full file where ../shared has it, and the sample of real lines that ships with the
# tests (tests/fixtures/vlrewardbench/README.md says which and why), so that the suite runs on a bare clone
VLRB_FULL = SHARED / "vlrewardbench" / "data.jsonl"
VLRB_FIXTURE = Path(__file__).resolve().parent / "fixtures" / "vlrewardbench" / "data.jsonl"

# What each file holds, counted by hand from its lines (the full file's figures are its README's):
# lines, items per group, ids on two lines, and the two lines of the repeated id mmmu_pro_test_Marketing_150
VLRB_FACTS = {
    "fixture": {"lines": 29, "groups": {"hallucination": 9, "reasoning": 13, "general": 7}, "repeated_ids": 3,
                "marketing_150": (20, 26)},
    "full": {"lines": 1250, "groups": {"hallucination": 749, "reasoning": 318, "general": 183}, "repeated_ids": 18,
             "marketing_150": (938, 1166)},
}
