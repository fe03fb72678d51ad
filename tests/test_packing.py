"""Packed fine-tuning (`Adapter.sft_backward(pack=True)`): several examples to a row, each attending only to
itself and to its own image, give the loss and the gradients of the unpacked batch (float64)."""

import numpy as np
import pytest
import torch
from PIL import Image

import tiny
from fastjudge.models import ToyAdapter, load_adapter
from fastjudge.models.training import pack_rows

PROMPTS = ["How many objects are in the image?", "What colour is the small shape?",
           "Describe the image in one sentence, please, with every object and where it is.", "Which is larger?",
           "Is there a red circle?", "Count the squares.", "What is to the left of the triangle?"]
TARGETS = ["three", "The small shape is blue, and it sits on the right of the big one.", "a red square", "the circle",
           "no", "There are two squares: one large and one small, both green.", "a blue triangle next to a circle"]


def test_pack_rows_places_each_example_once_within_the_capacity():
    rs = np.random.RandomState(0)
    for _ in range(50):
        lengths = rs.randint(1, 40, size=rs.randint(1, 30)).tolist()
        capacity = int(rs.randint(max(lengths) // 2, 2 * max(lengths)))
        rows = pack_rows(lengths, capacity)
        assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
        for row in rows:
            assert len(row) == 1 or sum(lengths[i] for i in row) <= capacity
        assert pack_rows(lengths, capacity) == rows  # deterministic
    assert pack_rows([5, 3, 2, 4], 7) == [[0, 2], [3, 1]]  # first fit, longest first
    assert pack_rows([9, 2], 4) == [[0], [1]]  # longer than the capacity: a row of its own


def _images(count, seed):
    """Images of several shapes: in the tiny Mllama some fill one tile, the wide ones two."""
    rs = np.random.RandomState(seed)
    sizes = [(28, 28), (28, 56), (40, 30), (28, 60), (50, 50), (30, 70), (28, 28)]
    return [Image.fromarray(rs.randint(0, 256, (h, w, 3), dtype=np.uint8)) for (h, w) in sizes[:count]]


@pytest.fixture(scope="module")
def mllama_dir(tmp_path_factory):
    return tiny.build_checkpoint("mllama", tmp_path_factory.mktemp("mllama"))


def _adapter(source, mllama_dir, tiny_toy_dir):
    if source == "toy":
        return ToyAdapter.load(tiny_toy_dir, dtype=torch.float64)
    return load_adapter(str(mllama_dir), dtype=torch.float64)


def _loss_and_grads(adapter, train, pack, micro_batches):
    adapter.begin_training(train)
    for p in adapter.model.parameters():
        p.grad = None
    if pack and train == "all":  # sft_backward packs a frozen tower's batches only (any number of processes
        # runs the same rows); the packed inputs are exact with a training tower too: their loss, backward here
        images, heads = _images(len(PROMPTS), 1), {i: adapter.prompt_ids(p, None) for i, p in enumerate(PROMPTS)}
        tails = {i: adapter.target_ids(t) for i, t in enumerate(TARGETS)}
        lengths = [len(heads[i]) + len(tails[i]) for i in range(len(PROMPTS))]
        rows = pack_rows(lengths, max(lengths))
        size = -(-len(rows) // micro_batches)
        count = sum(map(len, tails.values()))
        loss = 0.0
        for k in range(0, len(rows), size):
            inputs, labels = adapter.packed_training_inputs(images, rows[k:k + size], heads, tails)
            part = adapter.target_loss(inputs, labels, reduction="sum")
            (part / count).backward()
            loss += part.item() / count
    else:
        loss = adapter.sft_backward(_images(len(PROMPTS), 1), PROMPTS, TARGETS, micro_batches=micro_batches,
                                    pack=pack)
    grads = {name: p.grad.clone() for name, p in adapter.model.named_parameters() if p.grad is not None}
    adapter.end_training()
    return loss, grads


@pytest.mark.parametrize("source", ["mllama", "toy"])
@pytest.mark.parametrize("train", ["text", "all"])
@pytest.mark.parametrize("micro_batches", [1, 2])
def test_packed_loss_and_gradients_equal_the_unpacked_batch(source, train, micro_batches, mllama_dir, tiny_toy_dir):
    adapter = _adapter(source, mllama_dir, tiny_toy_dir)
    assert adapter.packs
    if source == "mllama":  # mixed tile counts: the packed rows hold images of 1 and 2 valid tiles
        valid = {f.info[0] for f in adapter.image_features(_images(len(PROMPTS), 1))}
        assert valid == {1, 2}
    loss, grads = _loss_and_grads(adapter, train, pack=False, micro_batches=micro_batches)
    packed_loss, packed_grads = _loss_and_grads(adapter, train, pack=True, micro_batches=micro_batches)
    assert packed_loss == pytest.approx(loss, rel=1e-12)
    assert packed_grads.keys() == grads.keys() and grads
    assert any("vision" in name for name in grads) == (train == "all")
    for name, grad in grads.items():
        scale = grad.abs().max().clamp(min=1e-30)
        assert float((packed_grads[name] - grad).abs().max() / scale) < 1e-9, name


def test_packing_puts_several_examples_in_a_row(mllama_dir, tiny_toy_dir):
    """The batch above does pack: fewer rows than examples, and a row's examples each see their own image."""
    adapter = _adapter("mllama", mllama_dir, tiny_toy_dir)
    heads = {i: adapter.prompt_ids(p, None) for i, p in enumerate(PROMPTS)}
    tails = {i: adapter.target_ids(t) for i, t in enumerate(TARGETS)}
    lengths = [len(heads[i]) + len(tails[i]) for i in range(len(PROMPTS))]
    rows = pack_rows(lengths, max(lengths))
    assert len(rows) < len(PROMPTS)
    inputs, labels = adapter.packed_training_inputs(_images(len(PROMPTS), 1), rows, heads, tails)
    assert inputs["input_ids"].shape == (len(rows), max(lengths))
    assert int((labels != -100).sum()) == sum(len(t) for t in tails.values())
    cross = inputs["cross_attention_mask"]  # (R, T, slots, tiles): a token sees one image slot at most
    assert int((cross.sum(dim=-1) > 0).sum(dim=-1).max()) == 1
    mask = inputs["attention_mask"][:, 0]  # (R, T, T): no token sees a later one or another example's
    assert not bool((mask & ~torch.ones_like(mask[0]).tril()).any())


@pytest.mark.parametrize("pack", [False, True])
@pytest.mark.parametrize("micro_batches", [1, 2])
def test_a_given_answer_start_is_read_but_not_trained(pack, micro_batches, tiny_toy_dir):
    """`sft_backward(given=...)`: the given start of each answer sits between the prompt and the target, and only
    the target's tokens are trained: the loss and gradients are those of the whole answer's per-token losses with
    the given tokens' left out (a float64 reference from one plain forward)."""
    adapter = ToyAdapter.load(tiny_toy_dir, dtype=torch.float64)
    prompts = ["how many objects are there ?", "describe the image .", "what colour is the object at top ?"]
    given = ["my answer : the answer is 2 .", "", "my answer : the answer is red ."]
    targets = ["A : yes B : no verdict : [[ A ]]", "a small red circle at top left .", "A : no B : yes"]
    images = _images(3, 2)

    adapter.begin_training("text")
    for p in adapter.model.parameters():
        p.grad = None
    loss = adapter.sft_backward(images, prompts, targets, micro_batches=micro_batches, pack=pack, given=given)
    grads = {name: p.grad.clone() for name, p in adapter.model.named_parameters() if p.grad is not None}

    for p in adapter.model.parameters():
        p.grad = None
    whole = [f"{g} {t}".strip() for g, t in zip(given, targets)]
    inputs, labels = adapter.training_inputs(images, prompts, whole)  # labels on the given tokens too
    logits = adapter.model(**inputs).logits[:, :-1]  # (B, T - 1, V), position t predicts token t + 1
    following = labels[:, 1:]
    trained = following != -100
    for row, start in enumerate(given):  # leave out the first len(given ids) labelled tokens of each row
        skip = len(adapter.prefix_ids(start)) if start else 0
        first = int(trained[row].nonzero()[0])
        trained[row, first:first + skip] = False
    token_losses = torch.nn.functional.cross_entropy(logits[trained], following[trained], reduction="none")
    reference = token_losses.sum() / sum(len(adapter.target_ids(t)) for t in targets)
    reference.backward()
    adapter.end_training()

    assert int(trained.sum()) == sum(len(adapter.target_ids(t)) for t in targets)
    assert loss == pytest.approx(reference.item(), rel=1e-12)
    for name, p in adapter.model.named_parameters():
        if name in grads:
            scale = p.grad.abs().max().clamp(min=1e-30)
            assert float((grads[name] - p.grad).abs().max() / scale) < 1e-9, name
    # the given tokens are read: without them the targets' loss is another one
    adapter.begin_training("text")
    without = adapter.sft_backward(images, prompts, targets, micro_batches=micro_batches, pack=pack)
    adapter.end_training()
    assert abs(without - loss) > 1e-6
