"""Mllama cross-attention over key ranges (`fastjudge.kernels.cross_attention`, `patch_mllama`): the Triton
kernels under the interpreter (float32, tiny heads and dims) against a float64 reference, and a patched tiny
MllamaForConditionalGeneration against transformers.

Tolerances: float32 online softmax against float64: outputs and gradients agree to about 1e-6 here; we allow
1e-5 relative + 1e-5 absolute. The patched model against transformers (both float32): 1e-4."""

import copy
import os

import numpy as np
import pytest
import torch
from PIL import Image

from fastjudge import tiny
from fastjudge.kernels.mllama_cross_attention import cross_attention, cross_attention_reference, key_ranges, patch_mllama

DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"


def _inputs(seed, batch=2, heads=4, kv_heads=2, rows=37, keys=45, size=12, empty_rows=3):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, rows, size, generator=g, dtype=torch.float64)
    k = torch.randn(batch, kv_heads, keys, size, generator=g, dtype=torch.float64)
    v = torch.randn(batch, kv_heads, keys, size, generator=g, dtype=torch.float64)
    start = torch.randint(0, keys, (batch, rows), generator=g)
    end = (start + torch.randint(1, keys, (batch, rows), generator=g)).clamp(max=keys)
    start[:, :empty_rows], end[:, :empty_rows] = 0, 0  # text before the image: no key
    start[0, -1], end[0, -1] = 0, keys  # one row sees every key
    return q, k, v, start, end


def _meta_reference(q, k, v, start, end, scale, masked_rows):
    """Row by row in float64, independently of cross_attention_reference: softmax over the row's keys; a row
    with none sees every key ("hf") or gives 0 ("zero")."""
    batch, heads, rows, size = q.shape
    group = heads // k.shape[1]
    out = torch.zeros_like(q, dtype=torch.float64)
    for b in range(batch):
        for h in range(heads):
            for t in range(rows):
                lo, hi = int(start[b, t]), int(end[b, t])
                if lo >= hi:
                    if masked_rows == "zero":
                        continue
                    lo, hi = 0, k.shape[2]
                keys, values = k[b, h // group, lo:hi].double(), v[b, h // group, lo:hi].double()
                weights = torch.softmax(keys @ q[b, h, t].double() * scale, dim=0)
                out[b, h, t] = weights @ values
    return out


@pytest.mark.parametrize("masked_rows", ["hf", "zero"])
def test_reference_is_the_row_by_row_definition(masked_rows):
    q, k, v, start, end = _inputs(1, rows=9, keys=13)
    ours = cross_attention_reference(q, k, v, start, end, masked_rows=masked_rows)
    torch.testing.assert_close(ours, _meta_reference(q, k, v, start, end, 12 ** -0.5, masked_rows))


CASES = [  # (batch, heads, kv heads, rows, keys, head size)
    (2, 4, 2, 37, 45, 12),  # GQA, rows over three query blocks, keys over three key blocks, D padded to 16
    (1, 3, 3, 16, 16, 16),  # one block each way, no GQA
    (3, 8, 1, 5, 70, 8),  # decoding-like: few query rows (n samples), many keys, one K/V head for all
]


@pytest.mark.parametrize("masked_rows", ["hf", "zero"])
@pytest.mark.parametrize("case", CASES)
def test_triton_matches_float64(case, masked_rows):
    batch, heads, kv_heads, rows, keys, size = case
    q, k, v, start, end = _inputs(sum(case), batch, heads, kv_heads, rows, keys, size,
                                  empty_rows=min(3, rows - 1))
    go = torch.randn(batch, heads, rows, size, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    qq, kk, vv = (x.float().to(DEVICE).requires_grad_() for x in (q, k, v))
    out = cross_attention(qq, kk, vv, start.to(DEVICE), end.to(DEVICE), masked_rows=masked_rows, backend="triton")
    out.backward(go.float().to(DEVICE))
    q2, k2, v2 = (x.clone().requires_grad_() for x in (q, k, v))
    ref = cross_attention_reference(q2, k2, v2, start, end, masked_rows=masked_rows)
    ref.backward(go)
    for name, a, b in (("out", out, ref), ("dq", qq.grad, q2.grad), ("dk", kk.grad, k2.grad),
                       ("dv", vv.grad, v2.grad)):
        assert torch.isfinite(a).all(), name
        torch.testing.assert_close(a.detach().double().cpu(), b, rtol=1e-5, atol=1e-5,
                                   msg=lambda m, name=name: f"{name}: {m}")
    if masked_rows == "zero":  # rows that see nothing give 0 and get no gradient
        assert torch.equal(out[:, :, :3].detach().cpu(), torch.zeros_like(out[:, :, :3]).cpu())
        assert torch.equal(qq.grad[:, :, :3].cpu(), torch.zeros_like(qq.grad[:, :, :3]).cpu())


@pytest.mark.skipif(DEVICE != "cuda", reason="bf16 arithmetic is wrong in the Triton interpreter")
@pytest.mark.parametrize("rows", [16, 300])  # decoding's n samples; a training batch's rows
def test_triton_bf16_on_the_gpu_against_float64(rows):
    """bf16 at the 11B's head size (128) and GQA group (4), with keys over many blocks and a partial last one:
    norm-relative error of the output and of each gradient within 1e-2, and within twice that of torch's SDPA
    path in bf16 on the same inputs."""
    q, k, v, start, end = _inputs(11, batch=2, heads=8, kv_heads=2, rows=rows, keys=1601 * 2 - 7, size=128,
                                  empty_rows=3)
    go = torch.randn_like(q)
    ref_inputs = [x.clone().requires_grad_() for x in (q, k, v)]
    ref = cross_attention_reference(*ref_inputs, start, end)
    ref.backward(go)
    expected = [ref.detach()] + [x.grad for x in ref_inputs]

    def errors(attend):
        inputs = [x.to(DEVICE, torch.bfloat16).requires_grad_() for x in (q, k, v)]
        out = attend(*inputs, start.to(DEVICE), end.to(DEVICE))
        out.backward(go.to(DEVICE, torch.bfloat16))
        got = [out.detach()] + [x.grad for x in inputs]
        return [float((a.double().cpu() - b).norm() / b.norm()) for a, b in zip(got, expected)]

    ours = errors(lambda *args: cross_attention(*args, backend="triton"))
    torch_path = errors(lambda *args: cross_attention_reference(*args))  # bf16 inputs, float32 softmax
    for name, error, baseline in zip(("out", "dq", "dk", "dv"), ours, torch_path):
        assert error < 1e-2 and error <= 2 * baseline + 1e-3, (name, error, baseline)


def test_forward_kernel_writes_every_output_element():
    """The output buffer poisoned with NaN before the kernel: every element, masked rows included, is
    written (the interpreter does not catch unwritten or out-of-bounds elements)."""
    from fastjudge.kernels import mllama_cross_attention as module
    from fastjudge.kernels import mllama_cross_attention_triton as kernels
    q, k, v, start, end = _inputs(3)
    q, k, v = (x.float().to(DEVICE).contiguous() for x in (q, k, v))
    start, end = module._row_ranges(start.to(DEVICE), end.to(DEVICE), k.shape[2], "zero")
    config = module._config(q)
    lo, hi, blocks = module._block_ranges(start, end, config["BLOCK_M"])
    out = torch.full_like(q, float("nan"))
    lse = torch.full(q.shape[:3], float("nan"), device=DEVICE)
    batch, heads, rows, size = q.shape
    kernels.cross_attention_forward_kernel[(blocks, batch * heads)](
        q, k, v, out, lse, start, end, lo, hi, rows, k.shape[2], size, heads, heads // k.shape[1], blocks,
        size ** -0.5, **config)
    assert not out.isnan().any() and not lse.isnan().any()


def test_key_ranges_from_transformers_mask():
    mask = torch.zeros(2, 4, 2, 3, dtype=torch.long)  # (B, T, images, tiles)
    mask[0, 1:, 0, :2] = 1  # image 0, tiles 0-1 (tile 2 padded)
    mask[1, 2:, 0, :3] = 1
    mask[1, 3, 1, :1] = 1  # row 3 also sees image 1's first tile: tiles 0-3, contiguous
    start, end, seen = key_ranges(mask, patches=5)
    assert start.tolist() == [[0, 0, 0, 0], [0, 0, 0, 0]]
    assert end.tolist() == [[0, 10, 10, 10], [0, 0, 15, 20]]
    assert seen.tolist() == [[False, True, True, True], [False, False, True, True]]
    mask[0, 3, 1, :1] = 1  # image 0's tiles 0-1 and image 1's tile 0: a padded tile between them
    assert key_ranges(mask, patches=5) is None


@pytest.fixture(scope="module")
def tiny_mllama(tmp_path_factory):
    from fastjudge.models import load_adapter
    adapter = load_adapter(str(tiny.build_checkpoint("mllama", tmp_path_factory.mktemp("mllama"))),
                           dtype=torch.float32)
    with torch.no_grad():  # gates that make the cross layers matter (they start at 0)
        for layer in adapter.model.model.language_model.layers:
            if hasattr(layer, "cross_attn_attn_gate"):
                layer.cross_attn_attn_gate.fill_(0.8)
                layer.cross_attn_mlp_gate.fill_(0.6)
    return adapter


def _batch(adapter):
    """Three prompts whose images have 2, 2 and 1 valid tiles (of 2), with text before the image token."""
    rs = np.random.RandomState(0)
    images = [Image.fromarray(rs.randint(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in [(30, 90), (80, 40),
                                                                                          (50, 50)]]
    features = adapter.image_features(images)
    rows = [adapter._prompt_ids(p, f) for p, f in zip(["how many?", "describe the picture in detail", "x"],
                                                      features)]
    inputs = adapter._model_inputs(rows, features, left=True)
    tiles = inputs["cross_attention_mask"][:, -1, 0].sum(-1).tolist()
    assert tiles == [2, 2, 1] and (inputs["cross_attention_mask"][:, :, 0].sum(-1) == 0).any(dim=1).all()
    return images, inputs


def _logits_and_grads(model, inputs):
    model.zero_grad()
    logits = model(**inputs).logits
    (logits * torch.linspace(-1, 1, logits.shape[-1])).sum().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()
             if p.grad is not None and "cross_attn" in name}
    return logits.detach(), grads


def test_patched_model_gives_transformers_logits_and_gradients(tiny_mllama):
    _, inputs = _batch(tiny_mllama)
    model = copy.deepcopy(tiny_mllama.model).requires_grad_(True)
    reference = _logits_and_grads(model, inputs)
    patch_mllama(model, masked_rows="hf", backend="triton")
    ours = _logits_and_grads(model, inputs)
    torch.testing.assert_close(ours[0], reference[0], rtol=1e-4, atol=1e-4)
    assert reference[1].keys() == ours[1].keys() and len(ours[1]) >= 8
    for name in reference[1]:
        torch.testing.assert_close(ours[1][name], reference[1][name], rtol=1e-4, atol=1e-4, msg=name)
    with pytest.raises(ValueError, match="^model: already patched"):
        patch_mllama(model)


def test_zero_rows_follow_metas_reference(tiny_mllama):
    """masked_rows="zero": transformers' model with the cross-attention output of rows that see no image set
    to 0 (Meta's reference; transformers issue 39379) is the reference."""
    _, inputs = _batch(tiny_mllama)
    model = copy.deepcopy(tiny_mllama.model)
    seen = inputs["cross_attention_mask"].flatten(2).any(-1)  # (B, T)

    def zero_rows(module, args, output):
        return (output[0] * seen[..., None].to(output[0].dtype),) + tuple(output[1:])
    handles = [layer.cross_attn.register_forward_hook(zero_rows) for layer in model.model.language_model.layers
               if hasattr(layer, "cross_attn_attn_gate")]
    with torch.no_grad():
        reference = model(**inputs).logits
    for handle in handles:
        handle.remove()
    with torch.no_grad():
        hf_logits = model(**inputs).logits
        patch_mllama(model, masked_rows="zero", backend="triton")
        ours = model(**inputs).logits
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-4)
    assert (ours - hf_logits).abs().max() > 1e-3  # the two behaviours differ on this batch


def test_patched_greedy_generate_gives_the_same_tokens(tiny_mllama, tmp_path):
    """transformers' own generate from the processor's pixels (its cache, its per-step mask slicing) through the
    patched model."""
    from transformers import AutoProcessor
    processor = AutoProcessor.from_pretrained(tiny_mllama.source)
    images, _ = _batch(tiny_mllama)
    model = copy.deepcopy(tiny_mllama.model)
    for image, prompt in zip(images, ["how many?", "describe the picture", "x"]):  # the last: 1 tile of 2
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        chat = processor.apply_chat_template(messages, add_generation_prompt=True)
        inputs = processor(images=[[image]], text=[chat], return_tensors="pt", add_special_tokens=False)
        expected = tiny_mllama.model.generate(**inputs, max_new_tokens=6, do_sample=False)
        patched = patch_mllama(copy.deepcopy(model), backend="triton")
        assert torch.equal(patched.generate(**inputs, max_new_tokens=6, do_sample=False), expected)
        assert patched.model._fastjudge_cross_attention.ranges is not None  # the ranges were used, not a mask


def test_bad_arguments_name_the_argument():
    q, k, v, start, end = _inputs(2)
    cases = [
        (dict(q=q[0]), "^q: "),
        (dict(k=k[:, :, :, :5]), "^k: "),
        (dict(k=torch.randn(2, 3, 45, 12, dtype=torch.float64)), "^k: "),  # 3 does not divide 4 heads
        (dict(v=v[:, :, :10]), "^v: "),
        (dict(key_start=start[:, :5]), "^key_start: "),
        (dict(key_end=end[:1]), "^key_end: "),
        (dict(masked_rows="meta"), "^masked_rows: "),
        (dict(backend="cuda"), "^backend: "),
    ]
    for change, message in cases:
        args = dict(q=q, k=k, v=v, key_start=start, key_end=end)
        args.update(change)
        with pytest.raises(ValueError, match=message):
            cross_attention(args.pop("q"), args.pop("k"), args.pop("v"), args.pop("key_start"),
                            args.pop("key_end"), **args)
    with pytest.raises(ValueError, match="^model: "):
        patch_mllama(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("blind", [False, True])
def test_shared_decoder_cross_layers_through_the_kernel(tiny_mllama, monkeypatch, blind):
    """The shared Mllama decoder's cross layers through the kernel (n samples of a prompt as query rows over
    its key range) sample exactly what its SDPA path samples; a prompt that sees no image included; with
    end tokens, so that prompts leave the batch (and their ranges with them)."""
    from fastjudge import mllama_decoding
    from fastjudge.decoding import decode_groups
    from fastjudge.kernels import mllama_cross_attention
    _, inputs = _batch(tiny_mllama)
    if blind:
        inputs["cross_attention_mask"][0] = 0
    calls = []
    kernel_function = mllama_cross_attention.cross_attention

    def counted(*args, **kwargs):
        calls.append(args[0].shape)
        return kernel_function(*args, **kwargs)
    monkeypatch.setattr(mllama_cross_attention, "cross_attention", counted)

    def run(eos, sampler=None):
        return decode_groups(tiny_mllama.model, dict(inputs), n=3, max_new_tokens=6, eos_ids=eos, temperature=1.0,
                             generator=torch.Generator().manual_seed(4), sampler=sampler)

    def greedy(logits, generator):
        return logits.argmax(-1)
    monkeypatch.setattr(mllama_decoding, "CROSS_ATTENTION_KERNEL", False)
    free = run(set(), greedy)
    # an end token in prompt 1's greedy text but not in prompt 0's: prompt 1 leaves the batch, prompt 0 stays
    eos = {next(t for t in free[1][0] if t not in free[0][0])}
    results = []
    for kernel in (False, True):
        monkeypatch.setattr(mllama_decoding, "CROSS_ATTENTION_KERNEL", kernel)
        results.append((run(set()), run(eos, greedy)))
    assert results[0] == results[1]
    assert calls and {shape[2] for shape in calls} == {3}  # the kernel ran, the 3 samples as query rows
    assert len({shape[0] for shape in calls}) > 1  # prompts left the batch in between


def test_patched_model_builds_no_dense_mask_and_takes_long_masks(tiny_mllama, monkeypatch):
    """transformers' mask builder is never called through the patched model; a caller that passes the whole
    mask with a cache (fastjudge's generic decoding, transformers 5.17's generate) gets the current rows."""
    from transformers.models.mllama import modeling_mllama

    from fastjudge import decoding
    _, inputs = _batch(tiny_mllama)
    monkeypatch.setattr(decoding, "SHARED_MLLAMA", False)  # the generic path: the whole mask every step
    kwargs = dict(n=2, max_new_tokens=5, eos_ids=set(), temperature=1.0)
    expected = decoding.decode(tiny_mllama.model, dict(inputs), generator=torch.Generator().manual_seed(2), **kwargs)
    model = patch_mllama(copy.deepcopy(tiny_mllama.model), backend="triton")

    def refuse(*args, **kwargs):
        raise AssertionError("a dense cross-attention mask was built")
    monkeypatch.setattr(modeling_mllama, "_prepare_cross_attention_mask", refuse)
    assert decoding.decode(model, dict(inputs), generator=torch.Generator().manual_seed(2), **kwargs) == expected


def test_patched_model_with_gradient_checkpointing(tiny_mllama):
    _, inputs = _batch(tiny_mllama)
    model = copy.deepcopy(tiny_mllama.model).requires_grad_(True)
    model.train()
    reference = _logits_and_grads(model, inputs)
    model.gradient_checkpointing_enable()
    patch_mllama(model, backend="triton")
    ours = _logits_and_grads(model, inputs)
    torch.testing.assert_close(ours[0], reference[0], rtol=1e-4, atol=1e-4)
    for name in reference[1]:
        torch.testing.assert_close(ours[1][name], reference[1][name], rtol=1e-4, atol=1e-4, msg=name)
