"""Fused linear cross-entropy (`fastjudge.kernels.fused_linear_cross_entropy`): the Triton kernels under the
interpreter (float32, tiny shapes) and the chunked torch reference, against float64
`F.cross_entropy(hidden @ weight.T + bias)` on fresh random inputs.

Tolerances: float32 logits through online log-sum-exp against float64: losses and gradients agree to about
1e-6 relative here; we allow 2e-5 relative + 2e-6 absolute (2e-4 relative for logits of +-1e4)."""

import os
import zlib

import pytest
import torch
import torch.nn.functional as F

from fastjudge.kernels.linear_cross_entropy import fused_linear_cross_entropy, fused_linear_cross_entropy_reference

# compiled Triton on a GPU; the interpreter on CPU tensors otherwise (conftest sets TRITON_INTERPRET=1 there)
DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"


def _inputs(seed, rows, size, vocab, ignored=0.2, bias=True, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, size, generator=g, dtype=torch.float64) * scale
    weight = torch.randn(vocab, size, generator=g, dtype=torch.float64) / size ** 0.5
    b = torch.randn(vocab, generator=g, dtype=torch.float64) if bias else None
    target = torch.randint(0, vocab, (rows,), generator=g)
    target[torch.rand(rows, generator=g) < ignored] = -100
    return hidden, weight, b, target


def _reference(hidden, weight, bias, target, reduction, smoothing, grad):
    """float64 loss and gradients of the materialized logits."""
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    b = bias.clone().requires_grad_() if bias is not None else None
    logits = h @ w.T + (b if b is not None else 0)
    loss = F.cross_entropy(logits, target, reduction=reduction, label_smoothing=smoothing)
    loss.backward(grad)
    return loss.detach(), h.grad, w.grad, (b.grad if b is not None else None)


def _ours(hidden, weight, bias, target, grad, **kwargs):
    h, w = hidden.float().to(DEVICE).requires_grad_(), weight.float().to(DEVICE).requires_grad_()
    b = bias.float().to(DEVICE).requires_grad_() if bias is not None else None
    loss = fused_linear_cross_entropy(h, w, target.to(DEVICE), bias=b, **kwargs)
    loss.backward(grad.float().to(DEVICE))

    def back(t):
        return t.detach().double().cpu() if t is not None else None
    return back(loss), back(h.grad), back(w.grad), back(b.grad if b is not None else None)


def _close(ours, reference, rtol=2e-5, atol=2e-6):
    for name, a, b in zip(("loss", "dhidden", "dweight", "dbias"), ours, reference):
        if b is None:
            assert a is None, name
            continue
        assert torch.isfinite(a).all(), name
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m, name=name: f"{name}: {m}")


def _grad_for(reduction, rows, seed):
    if reduction == "none":
        return torch.randn(rows, generator=torch.Generator().manual_seed(seed + 99), dtype=torch.float64)
    return torch.tensor(1.7, dtype=torch.float64)


CASES = [  # (rows, hidden, vocab, design, chunk_rows, chunk_vocab)
    (37, 24, 301, "vocab", None, 64),  # vocabulary blocks; 301 is no multiple of the block or the kernel width
    (37, 24, 301, "vocab", 16, 100),  # row chunks too: dweight accumulates over them
    (29, 17, 257, "rows", 8, None),  # eager gradients over row chunks
    (5, 8, 1000, "rows", None, None),  # one row chunk (N * H < V), a wide block
    (64, 32, 128, "vocab", None, None),  # default block: one block of 256 >= V
    (2100, 8, 50, "rows", None, None),  # the default 1024-row chunks: three of them, the last partial
]


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("case", CASES)
def test_triton_matches_float64_reference(case, reduction):
    rows, size, vocab, design, chunk_rows, chunk_vocab = case
    seed = zlib.crc32(repr((case, reduction)).encode()) % 10_000
    for smoothing, bias in ((0.0, False), (0.1, True)):
        hidden, weight, b, target = _inputs(seed, rows, size, vocab, bias=bias)
        grad = _grad_for(reduction, rows, seed)
        ours = _ours(hidden, weight, b, target, grad, reduction=reduction, label_smoothing=smoothing,
                     backend="triton", design=design, chunk_rows=chunk_rows, chunk_vocab=chunk_vocab)
        # float32 sums over many rows: dweight's absolute error grows with them (about 3e-6 at 2,100 rows)
        _close(ours, _reference(hidden, weight, b, target, reduction, smoothing, grad),
               atol=2e-6 * max(1.0, rows / 200))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_torch_reference_matches_float64(reduction):
    hidden, weight, b, target = _inputs(5, 41, 16, 203)
    grad = _grad_for(reduction, 41, 5)
    for smoothing in (0.0, 0.25):
        ours = _ours(hidden, weight, b, target, grad, reduction=reduction, label_smoothing=smoothing,
                     backend="torch", chunk_rows=7)
        _close(ours, _reference(hidden, weight, b, target, reduction, smoothing, grad))


@pytest.mark.parametrize("design,drop_ignored", [("vocab", True), ("vocab", False), ("rows", True)])
def test_half_the_rows_ignored(design, drop_ignored):
    hidden, weight, b, target = _inputs(11, 33, 16, 150, ignored=0.5)
    grad = torch.tensor(1.0, dtype=torch.float64)
    ours = _ours(hidden, weight, b, target, grad, backend="triton", drop_ignored=drop_ignored, chunk_vocab=64,
                 design=design)
    _close(ours, _reference(hidden, weight, b, target, "mean", 0.0, grad))


@pytest.mark.parametrize("backend,design", [("triton", "vocab"), ("triton", "rows"), ("torch", "rows")])
@pytest.mark.parametrize("drop_ignored", [True, False])
def test_every_target_ignored_gives_zero_not_nan(backend, design, drop_ignored):
    hidden, weight, b, target = _inputs(2, 9, 8, 50)
    target[:] = -100
    for reduction in ("mean", "sum", "none"):
        h, w = hidden.float().to(DEVICE).requires_grad_(), weight.float().to(DEVICE).requires_grad_()
        loss = fused_linear_cross_entropy(h, w, target.to(DEVICE), reduction=reduction, backend=backend,
                                          drop_ignored=drop_ignored, label_smoothing=0.1, design=design)
        assert torch.equal(loss, torch.zeros_like(loss))
        loss.sum().backward()
        assert torch.equal(h.grad, torch.zeros_like(h)) and torch.equal(w.grad, torch.zeros_like(w))


@pytest.mark.parametrize("design", ["vocab", "rows"])
def test_logits_of_ten_thousand(design):
    """Logits of about +-1e4 (hidden scaled up): the online log-sum-exp keeps them finite and exact."""
    hidden, weight, b, target = _inputs(3, 23, 16, 181, bias=False, scale=2500.0)
    logits = hidden @ weight.T
    assert logits.abs().max() > 5e3
    grad = torch.tensor(1.0, dtype=torch.float64)
    for smoothing in (0.0, 0.1):
        ours = _ours(hidden, weight, None, target, grad, backend="triton", design=design, label_smoothing=smoothing,
                     chunk_vocab=64)
        _close(ours, _reference(hidden, weight, None, target, "mean", smoothing, grad), rtol=2e-4, atol=1e-3)


def test_kernels_read_and_write_only_their_block():
    """A logits block that is a view inside a NaN-poisoned buffer: the statistics and the gradient are those of
    the block alone, and the poison around it is untouched (the interpreter does not catch out-of-bounds)."""
    from fastjudge.kernels import linear_cross_entropy as flce
    rows, cols, col0 = 21, 300, 700
    g = torch.Generator().manual_seed(4)
    buffer = torch.full((rows + 5, cols + 61), float("nan"), device=DEVICE)
    block = buffer[2:2 + rows, 7:7 + cols]
    values = torch.randn(rows, cols, generator=g) * 3
    block.copy_(values)
    target = torch.randint(col0 - 20, col0 + cols + 20, (rows,), generator=g)  # some outside the block
    running = tuple(t.to(DEVICE) for t in (torch.full((rows,), -float("inf")), torch.zeros(rows),
                                            torch.zeros(rows), torch.zeros(rows)))
    flce._stats(block, target.to(DEVICE), running, col0, smoothing=0.1)
    running = tuple(t.cpu() for t in running)
    v = values.double()
    inside = (target >= col0) & (target < col0 + cols)
    picked = torch.where(inside, v.gather(1, (target - col0).clamp(0, cols - 1)[:, None])[:, 0], 0.0)
    # float32 sums of float32 exponentials (a GPU's exp is approximate to a few ulp): 1e-5 relative
    torch.testing.assert_close(running[0].double(), v.max(1).values, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(running[1].double(), (v - v.max(1, keepdim=True).values).exp().sum(1),
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(running[2].double(), picked, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(running[3].double(), v.sum(1), rtol=1e-5, atol=1e-4)
    lse = torch.logsumexp(v, 1) + 0.5
    scale = torch.rand(rows, generator=g)
    flce._to_grad(block, target.to(DEVICE), lse.float().to(DEVICE), scale.to(DEVICE), col0, vocab=2000,
                  smoothing=0.1)
    block, buffer = block.cpu(), buffer.cpu()
    expected = (v - lse[:, None]).exp() - 0.1 / 2000
    expected -= 0.9 * torch.nn.functional.one_hot((target - col0).clamp(0, cols - 1), cols) * inside[:, None]
    torch.testing.assert_close(block.double(), expected * scale.double()[:, None], rtol=1e-5, atol=1e-6)
    poison = buffer.clone()
    poison[2:2 + rows, 7:7 + cols] = 0
    assert poison.isnan().sum() == buffer.numel() - rows * cols


def test_agrees_with_liger_kernel():
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    hidden, weight, _, target = _inputs(8, 19, 16, 133, bias=False)
    results = []
    for use_liger in (True, False):
        h, w = hidden.float().to(DEVICE).requires_grad_(), weight.float().to(DEVICE).requires_grad_()
        if use_liger:
            loss = LigerFusedLinearCrossEntropyLoss(label_smoothing=0.1)(w, h, target.to(DEVICE))
        else:
            loss = fused_linear_cross_entropy(h, w, target.to(DEVICE), label_smoothing=0.1, backend="triton",
                                              chunk_vocab=64)
        loss.backward()
        results.append((loss.detach(), h.grad, w.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_training_converges_as_with_the_reference():
    """A tiny language model (embedding, one tanh layer, output layer) trained 50 steps with Adam on a fixed
    mapping, once with the kernel and once with the torch reference: the loss curves agree and fall."""
    curves = []
    for backend in ("triton", "torch"):
        torch.manual_seed(0)
        vocab, size = 97, 16
        embed, layer = torch.nn.Embedding(vocab, size).to(DEVICE), torch.nn.Linear(size, size).to(DEVICE)
        head = torch.nn.Linear(size, vocab, bias=False).to(DEVICE)
        params = [*embed.parameters(), *layer.parameters(), *head.parameters()]
        optimizer = torch.optim.Adam(params, lr=3e-2)
        g = torch.Generator().manual_seed(1)
        inputs = torch.randint(0, vocab, (64,), generator=g).to(DEVICE)
        targets = (inputs * 7 + 3) % vocab
        targets[::9] = -100
        curve = []
        for _ in range(50):
            hidden = torch.tanh(layer(embed(inputs)))
            loss = fused_linear_cross_entropy(hidden, head.weight, targets, backend=backend, chunk_vocab=32)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            curve.append(loss.item())
        curves.append(curve)
    ours, reference = curves
    assert reference[-1] < 0.5 * reference[0]
    assert max(abs(a - b) for a, b in zip(ours, reference)) < 1e-3


def test_auto_backend_on_cpu_is_the_reference_and_bf16_works():
    hidden, weight, _, target = _inputs(6, 12, 16, 90, bias=False)
    h, w = hidden.bfloat16().requires_grad_(), weight.bfloat16().requires_grad_()
    loss = fused_linear_cross_entropy(h, w, target)
    assert loss.dtype == torch.float32  # the loss is float32 whatever the inputs
    loss.backward()
    expected = F.cross_entropy(hidden @ weight.T, target)
    assert abs(loss.double() - expected) < 0.05
    assert h.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.bfloat16


def test_bad_arguments_name_the_argument():
    hidden, weight, _, target = _inputs(1, 4, 8, 20)
    h, w = hidden.float(), weight.float()
    cases = [
        (dict(hidden=h[0]), "^hidden: "),
        (dict(weight=w[:, :5]), "^weight: "),
        (dict(weight=w.double()), "^weight: "),
        (dict(target=target[:3]), "^target: "),
        (dict(target=target.float()), "^target: "),
        (dict(bias=torch.zeros(3)), "^bias: "),
        (dict(reduction="avg"), "^reduction: "),
        (dict(label_smoothing=1.5), "^label_smoothing: "),
        (dict(backend="cuda"), "^backend: "),
        (dict(design="cols"), "^design: "),
        (dict(chunk_rows=0, backend="triton"), "^chunk_rows, chunk_vocab: "),
    ]
    for change, message in cases:
        args = dict(hidden=h, weight=w, target=target)
        args.update(change)
        with pytest.raises(ValueError, match=message):
            fused_linear_cross_entropy(args.pop("hidden"), args.pop("weight"), args.pop("target"), **args)


def test_reference_keeps_one_chunk_of_logits():
    """The reference's backward recomputes each chunk (checkpoint): no (N, V) float32 logits are saved."""
    hidden, weight, _, target = _inputs(9, 64, 8, 500, bias=False)
    h, w = hidden.float().requires_grad_(), weight.float().requires_grad_()
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = fused_linear_cross_entropy_reference(h, w, target, chunk_rows=8)
    assert max(saved) < 64 * 500
    loss.backward()
    expected = _reference(hidden, weight, None, target, "mean", 0.0, torch.tensor(1.0, dtype=torch.float64))
    torch.testing.assert_close(h.grad.double(), expected[1], rtol=2e-5, atol=2e-6)


def test_liger_kernels_patch_the_mllama_text_model(tmp_path):
    """On CUDA fine-tuning applies liger-kernel's RMSNorm, SwiGLU and RoPE with its fused loss off. Its Triton
    RMSNorm cannot run under the interpreter (it calls .to on a Python float), so here: which modules change,
    once; their numbers are checked on the GPU (bench/gpu.sh). Liger also swaps the classes and the
    rotary function module-wide; they are put back after the test."""
    from transformers.models.mllama import modeling_mllama

    import tiny
    from fastjudge.models import apply_liger_kernels, load_adapter
    module_before = dict(vars(modeling_mllama))
    try:
        adapter = load_adapter(str(tiny.build_checkpoint("mllama", tmp_path / "mllama")), dtype=torch.float32)
        forwards = {name: module.forward for name, module in adapter.model.named_modules()}
        head = adapter.model.get_output_embeddings().forward
        patch = adapter.liger_patch
        assert apply_liger_kernels(adapter.model, patch) and apply_liger_kernels(adapter.model, patch)  # once
        changed = {type(m).__name__ for name, m in adapter.model.named_modules() if m.forward != forwards[name]}
        assert changed == {"MllamaTextRMSNorm", "MllamaTextMLP"}
        assert modeling_mllama.apply_rotary_pos_emb.__module__.startswith("liger_kernel")
        assert adapter.model.get_output_embeddings().forward == head  # the loss stays ours
    finally:
        for key in set(vars(modeling_mllama)) - set(module_before):
            delattr(modeling_mllama, key)
        for key, value in module_before.items():
            if vars(modeling_mllama).get(key) is not value:
                setattr(modeling_mllama, key, value)


cuda = pytest.mark.skipif(not torch.cuda.is_available() or __import__("os").environ.get("TRITON_INTERPRET") == "1",
                          reason="needs a GPU (compiled Triton)")


@cuda
@pytest.mark.parametrize("design", ["vocab", "rows"])
def test_bf16_on_the_gpu(design):
    """bf16 inputs on the GPU against float64: the logits are rounded to bf16 by the product (as in
    Liger), so the loss agrees to about 1e-2 and the gradients to bf16's precision."""
    hidden, weight, _, target = _inputs(12, 300, 256, 5003, bias=False)
    h = hidden.to("cuda", torch.bfloat16).requires_grad_()
    w = weight.to("cuda", torch.bfloat16).requires_grad_()
    loss = fused_linear_cross_entropy(h, w, target.cuda(), design=design, label_smoothing=0.1)
    loss.backward()
    ref = _reference(h.detach().double().cpu(), w.detach().double().cpu(), None, target, "mean", 0.1,
                     torch.tensor(1.0, dtype=torch.float64))
    assert abs(loss.item() - ref[0].item()) < 2e-2
    torch.testing.assert_close(h.grad.double().cpu(), ref[1], rtol=5e-2, atol=2e-4)
    torch.testing.assert_close(w.grad.double().cpu(), ref[2], rtol=5e-2, atol=2e-4)


@cuda
def test_liger_patched_mllama_trains_as_unpatched_on_the_gpu(tmp_path):
    import numpy as np
    from PIL import Image

    import tiny
    from fastjudge.models import load_adapter
    folder = tiny.build_checkpoint("mllama", tmp_path / "mllama")
    rs = np.random.RandomState(0)
    images = [Image.fromarray(rs.randint(0, 256, (40, 40, 3), dtype=np.uint8)) for _ in range(2)]
    results = []
    for patched in (False, True):
        adapter = load_adapter(str(folder), device="cuda", dtype=torch.float32)
        params = adapter.begin_training("all") if patched else _unpatched_training(adapter)
        loss = adapter.sft_loss(images, ["how many?", "describe"], ["two things", "a red cat on a mat"])
        loss.backward()
        results.append((loss.item(), [p.grad.clone() for p in params if p.grad is not None]))
        assert getattr(adapter.model, "_fastjudge_liger", False) == patched
    assert abs(results[0][0] - results[1][0]) < 1e-4
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)


def _unpatched_training(adapter):
    """begin_training("all") without the liger patch (marked as already tried)."""
    adapter.model._fastjudge_liger = False
    return adapter.begin_training("all")
