"""Finished generation batches on disk (`fastjudge.models.partial.BatchStore`): a call made again reads them
instead of generating them, and what it returns is what a call without a store returns."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from fastjudge.engine.options import DecodeOptions
from fastjudge.models import ToyAdapter
from fastjudge.models.partial import BatchStore

PROMPTS = ["How many objects?", "What colour is the big shape on the left?", "Describe the image.",
           "Is there a circle?", "What is left of the square?"]
SAMPLING = dict(n=3, max_new_tokens=6, temperature=1.0, top_k=20, seed=11, batch_rows=6)  # 2 prompts a batch


def _images(count):
    rs = np.random.RandomState(3)
    return [Image.fromarray(rs.randint(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(count)]


@pytest.fixture
def adapter(tiny_toy_dir):
    return ToyAdapter.load(tiny_toy_dir)


def _generate(adapter, store, **changes):
    adapter.batch_store = store
    try:
        return adapter.generate(_images(len(PROMPTS)), PROMPTS, **dict(SAMPLING, **changes))
    finally:
        adapter.batch_store = None


def test_finished_batches_are_read_back_and_equal_a_plain_call(adapter, tmp_path):
    plain = adapter.generate(_images(len(PROMPTS)), PROMPTS, **SAMPLING)
    first = BatchStore(tmp_path)
    assert _generate(adapter, first) == plain
    files = sorted(tmp_path.rglob("*.json"))
    assert first.saved == len(files) == 3 and first.loaded == 0  # 5 prompts, 2 a batch
    again = BatchStore(tmp_path)
    assert _generate(adapter, again) == plain
    assert again.loaded == 3 and again.saved == 0


def test_only_the_missing_batch_is_generated(adapter, tmp_path):
    plain = adapter.generate(_images(len(PROMPTS)), PROMPTS, **SAMPLING)
    _generate(adapter, BatchStore(tmp_path))
    (next(tmp_path.rglob("1.json"))).unlink()  # as if the run was killed while making batch 1
    resumed = BatchStore(tmp_path)
    assert _generate(adapter, resumed) == plain
    assert (resumed.loaded, resumed.saved) == (2, 1)


def test_a_call_with_other_arguments_reads_nothing(adapter, tmp_path):
    _generate(adapter, BatchStore(tmp_path))
    for changes in [dict(seed=12), dict(temperature=0.7), dict(n=2), dict(prefixes=["my answer"] * len(PROMPTS))]:
        other = BatchStore(tmp_path)
        _generate(adapter, other, **changes)
        assert other.loaded == 0 and other.saved > 0, changes


def test_a_batch_file_of_the_wrong_size_names_itself(adapter, tmp_path):
    _generate(adapter, BatchStore(tmp_path))
    path = next(tmp_path.rglob("0.json"))
    path.write_text(json.dumps({"completions": [["a", "b", "c"]]}))
    with pytest.raises(ValueError, match=rf"{path}: expected completions of 2 prompts, found 1"):
        _generate(adapter, BatchStore(tmp_path))


def test_other_weights_or_decoding_read_nothing(adapter, tmp_path):
    """A stage rerun with another model (or the same model changed by one step) must not reuse the batches."""
    _generate(adapter, BatchStore(tmp_path))
    with torch.no_grad():
        weight = next(adapter.model.parameters())
        weight[0].add_(1e-3)  # as after one training step
    other = BatchStore(tmp_path)
    _generate(adapter, other)
    assert other.loaded == 0 and other.saved == 3
    adapter.decode_options = DecodeOptions(shared_mllama=False)
    other = BatchStore(tmp_path)
    _generate(adapter, other)
    assert other.loaded == 0 and other.saved == 3


def test_a_damaged_batch_file_names_itself(adapter, tmp_path):
    _generate(adapter, BatchStore(tmp_path))
    path = next(tmp_path.rglob("0.json"))
    path.write_text('{"completions": [["a"')  # cut short
    with pytest.raises(ValueError, match=rf"{path}: not a finished batch \(JSONDecodeError"):
        _generate(adapter, BatchStore(tmp_path))


def test_a_stage_drops_only_its_own_batches(tmp_path):
    from fastjudge.models.partial import drop_stored_batches
    for stage in ("synth", "filter"):
        (tmp_path / "partial-batches" / stage / "call").mkdir(parents=True)
        (tmp_path / "partial-batches" / stage / "call" / "0.json").write_text("{}")
    drop_stored_batches(tmp_path, stage="synth")  # `fastjudge synth` done; a filter beside it is not
    assert [p.name for p in (tmp_path / "partial-batches").iterdir()] == ["filter"]
    drop_stored_batches(tmp_path, stage="filter")
    assert not (tmp_path / "partial-batches").exists()
