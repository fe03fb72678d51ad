"""Mllama cross-attention over key ranges (`fastjudge.kernels.cross_attention`, and
`fastjudge.models.mllama.patch_mllama` that puts it into transformers' Mllama): the Triton kernels under the
interpreter (float32, tiny heads and dims) against a float64 reference, and a patched tiny
MllamaForConditionalGeneration against transformers.

Tolerances: float32 online softmax against float64: outputs and gradients agree to about 1e-6 here; we allow
1e-5 relative + 1e-5 absolute. The patched model against transformers (both float32): 1e-4."""

import copy
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import tiny
from fastjudge.engine.options import DecodeOptions
from fastjudge.kernels.mllama_cross_attention import (DECODE_TILE_PRESETS, TILE_PRESETS, cross_attention,
                                                      cross_attention_decode, cross_attention_reference)
from fastjudge.models.mllama import key_ranges, patch_mllama

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


def _assert_matches_float64(out, leaves, inputs, start, end, go, masked_rows):
    """The kernels' output and the gradients of their float32 leaves (q, k, v; after out.backward) against the
    reference in float64 on the float64 inputs, within 1e-5; NaN or inf anywhere fails."""
    copies = [x.clone().requires_grad_() for x in inputs]
    ref = cross_attention_reference(*copies, start, end, masked_rows=masked_rows)
    ref.backward(go)
    for name, a, b in zip(("out", "dq", "dk", "dv"), [out] + [x.grad for x in leaves],
                          [ref] + [x.grad for x in copies]):
        assert torch.isfinite(a).all(), name
        torch.testing.assert_close(a.detach().double().cpu(), b, rtol=1e-5, atol=1e-5,
                                   msg=lambda m, name=name: f"{name}: {m}")


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
    _assert_matches_float64(out, (qq, kk, vv), (q, k, v), start, end, go, masked_rows)
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


@pytest.mark.skipif(DEVICE != "cuda", reason="the tile presets apply to compiled kernels on a GPU")
@pytest.mark.parametrize("preset", [name for name in TILE_PRESETS if name != "base"])
def test_tile_presets_on_the_gpu_against_float64(enter, preset):
    """Every GPU tile preset (base: the test above) compiles within the card's shared memory and gives the
    output and gradients within 1e-2 of float64 in bf16 (11B head size and GQA group, a partial last key block)."""
    from fastjudge.kernels import mllama_cross_attention as module
    enter(module.tile_presets(training=preset))
    q, k, v, start, end = _inputs(12, batch=2, heads=8, kv_heads=2, rows=300, keys=1601 * 2 - 7, size=128,
                                  empty_rows=3)
    go = torch.randn_like(q)
    ref_inputs = [x.clone().requires_grad_() for x in (q, k, v)]
    ref = cross_attention_reference(*ref_inputs, start, end)
    ref.backward(go)
    inputs = [x.to(DEVICE, torch.bfloat16).requires_grad_() for x in (q, k, v)]
    out = cross_attention(*inputs, start.to(DEVICE), end.to(DEVICE), backend="triton")
    out.backward(go.to(DEVICE, torch.bfloat16))
    for name, a, b in zip(("out", "dq", "dk", "dv"), [out.detach()] + [x.grad for x in inputs],
                          [ref.detach()] + [x.grad for x in ref_inputs]):
        error = float((a.double().cpu() - b).norm() / b.norm())
        assert error < 1e-2, (preset, name, error)


DECODE_CASES = [  # (batch, heads, kv heads, samples n, keys, head size, splits)
    (3, 6, 2, 5, 77, 12, None),  # G 3: 15 rows of one block; the default splits
    (2, 4, 4, 1, 45, 16, 1),  # no GQA, one sample, one split
    (2, 8, 2, 9, 130, 8, 7),  # 36 rows in one block of 64, chunks that end mid-tile
    (1, 8, 2, 20, 70, 8, 3),  # 80 rows: two row blocks of 64 (the 11B at n >= 17)
]


def _decode_inputs(case, seed):
    batch, heads, kv_heads, samples, keys, size, _ = case
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, samples, size, generator=g, dtype=torch.float64)
    k = torch.randn(batch, kv_heads, keys, size, generator=g, dtype=torch.float64)
    v = torch.randn(batch, kv_heads, keys, size, generator=g, dtype=torch.float64)
    start = torch.randint(0, keys // 2, (batch,), generator=g)
    end = start + torch.randint(1, keys - keys // 2, (batch,), generator=g)
    start[0], end[0] = 0, keys  # one prompt sees every key
    if batch > 2:
        start[-1], end[-1] = 5, 5  # one sees none: 0
    return q, k, v, start, end


@pytest.mark.parametrize("case", DECODE_CASES)
def test_decode_kernel_matches_float64(case):
    """cross_attention_decode (the n samples of a prompt, and the G heads of a K/V head, as rows of one product
    over the prompt's range, keys split in chunks) against the row-by-row float64 definition."""
    q, k, v, start, end = _decode_inputs(case, sum(x or 0 for x in case))
    out = cross_attention_decode(*(x.float().to(DEVICE) for x in (q, k, v)), start.to(DEVICE), end.to(DEVICE),
                                 backend="triton", splits=case[-1])
    rows = (q.shape[0], q.shape[2])
    expected = _meta_reference(q, k, v, start[:, None].expand(rows), end[:, None].expand(rows), q.shape[-1] ** -0.5,
                               "zero")
    torch.testing.assert_close(out.double().cpu(), expected, rtol=1e-5, atol=1e-5)
    reference = cross_attention_decode(q, k, v, start, end, backend="torch")
    torch.testing.assert_close(reference, expected)


def test_decode_kernels_write_every_element():
    """The partial buffers and the output poisoned with NaN: every element the combine reads is written by the
    split kernel (empty chunks included), and every output element by the combine."""
    from fastjudge.kernels import _flash_triton
    from fastjudge.kernels import mllama_cross_attention as module
    from fastjudge.kernels import mllama_cross_attention_triton as kernels
    case = DECODE_CASES[0]
    q, k, v, start, end = (x.to(DEVICE) for x in _decode_inputs(case, 4))
    q, k, v = (x.float().contiguous() for x in (q, k, v))
    batch, heads, samples, size = q.shape
    kv_heads, keys = k.shape[1], k.shape[2]
    rows, splits = heads // kv_heads * samples, 6
    config = module.launch_config(q)
    block_m = 16
    row_blocks = -(-rows // block_m)
    parts = torch.full((batch * kv_heads, splits, rows, size), float("nan"), device=DEVICE)
    stats = torch.full((batch * kv_heads, splits, 2, rows), float("nan"), device=DEVICE)
    out = torch.full_like(q, float("nan"))
    start32, end32 = start.to(torch.int32), end.to(torch.int32)
    kernels.cross_attention_decode_kernel[(splits, batch * kv_heads, row_blocks)](
        q, k, v, parts, stats, start32, end32, rows, keys, size, kv_heads, splits, -(-keys // splits), size ** -0.5,
        BLOCK_M=block_m, BLOCK_N=config["BLOCK_N"], BLOCK_D=config["BLOCK_D"], PRECISION=config["PRECISION"])
    assert not parts.isnan().any() and not stats.isnan().any()
    _flash_triton.decode_combine_kernel[(batch * kv_heads, row_blocks)](
        parts, stats, out, rows, size, splits, BLOCK_M=block_m, BLOCK_D=config["BLOCK_D"])
    assert not out.isnan().any()
    torch.testing.assert_close(out, cross_attention_decode(q, k, v, start, end, backend="triton", splits=splits))


def test_decode_bad_arguments_name_the_argument():
    q, k, v, start, end = _decode_inputs(DECODE_CASES[0], 1)
    for change, message in [(dict(q=q[0]), "^q, k: "), (dict(v=v[:, :, :9]), "^v: "),
                            (dict(key_start=start[:, None]), "^key_start: "), (dict(key_end=end[:2]), "^key_end: "),
                            (dict(backend="cuda"), "^backend: "), (dict(splits=0), "^splits: ")]:
        args = {**dict(q=q, k=k, v=v, key_start=start, key_end=end), **change}
        with pytest.raises(ValueError, match=message):
            cross_attention_decode(args.pop("q"), args.pop("k"), args.pop("v"), args.pop("key_start"),
                                   args.pop("key_end"), **args)


@pytest.mark.skipif(DEVICE != "cuda", reason="bf16 arithmetic is wrong in the Triton interpreter")
@pytest.mark.parametrize("samples", [1, 16])
@pytest.mark.parametrize("tiles", list(DECODE_TILE_PRESETS))
def test_decode_bf16_on_the_gpu_against_float64(enter, samples, tiles):
    """bf16 at the 11B's decoding shapes (32 query heads over 8 K/V heads, D 128, 4 tiles of 1,601 keys), with
    each of the decoding tile presets: norm-relative error within 1e-2, and within twice that of the torch
    reference path in bf16."""
    from fastjudge.kernels import mllama_cross_attention as module
    enter(module.tile_presets(decode=tiles))
    q, k, v, start, end = _decode_inputs((2, 32, 8, samples, 6404, 128, None), 5)
    expected = cross_attention_decode(q, k, v, start, end, backend="torch")

    def error(backend):
        out = cross_attention_decode(*(x.to(DEVICE, torch.bfloat16) for x in (q, k, v)), start.to(DEVICE),
                                     end.to(DEVICE), backend=backend)
        return float((out.double().cpu() - expected).norm() / expected.norm())
    ours, baseline = error("triton"), error("torch")
    assert ours < 1e-2 and ours <= 2 * baseline + 1e-3, (ours, baseline)


def test_forward_kernel_writes_every_output_element():
    """The output buffer poisoned with NaN before the kernel: every element, masked rows included, is
    written (the interpreter does not catch unwritten or out-of-bounds elements)."""
    from fastjudge.kernels import mllama_cross_attention as module
    from fastjudge.kernels import mllama_cross_attention_triton as kernels
    q, k, v, start, end = _inputs(3)
    q, k, v = (x.float().to(DEVICE).contiguous() for x in (q, k, v))
    start, end = module._row_ranges(start.to(DEVICE), end.to(DEVICE), k.shape[2], "zero")
    config = module.launch_config(q)
    lo, hi, blocks = module._block_ranges(start, end, config["BLOCK_M"])
    out = torch.full_like(q, float("nan"))
    lse = torch.full(q.shape[:3], float("nan"), device=DEVICE)
    batch, heads, rows, size = q.shape
    kernels.cross_attention_forward_kernel[(blocks, batch * heads)](
        q, k, v, out, lse, start, end, lo, hi, rows, k.shape[2], size, heads, heads // k.shape[1], blocks,
        size ** -0.5, **config)
    assert not out.isnan().any() and not lse.isnan().any()


@pytest.mark.parametrize("masked_rows", ["hf", "zero"])
def test_backward_with_other_tiles_per_kernel_writes_every_gradient(monkeypatch, masked_rows):
    """Each training kernel with its own tiles (as GPU_TILES' presets give them: the forward, dQ and dK/dV kernels
    over query blocks of their own), on banded ranges and ranges with a gap between query blocks, and the
    backward's buffers (delta, dQ, dK, dV, allocated without a zero
    fill) poisoned with NaN: the output and the gradients still match float64."""
    from fastjudge.kernels import mllama_cross_attention as module
    tiles = {"forward": (32, 16), "dq": (16, 32), "dkv": (16, 16)}

    def training_tiles(q, kernel):
        return dict(module.launch_config(q), BLOCK_M=tiles[kernel][0], BLOCK_N=tiles[kernel][1])
    monkeypatch.setattr(module, "_training_tiles", training_tiles)
    q, k, v, start, end = _inputs(5, rows=45, keys=70)
    # banded ranges (row t sees keys [t, t + 9)): each query block meets few key blocks, so a kernel that skipped
    # by another kernel's block ranges would drop some
    start[1, 3:] = torch.arange(3, 45)
    end[1, 3:] = start[1, 3:] + 9
    # and a gap: query blocks 0 and 2 (16 rows each) see keys [0, 10), block 1 [50, 60), so key block 0 meets
    # blocks 0 and 2 but not 1, which the dK/dV kernel loops over and must add nothing from
    start[0, 3:], end[0, 3:] = 0, 10
    start[0, 16:32], end[0, 16:32] = 50, 60
    go = torch.randn(q.shape, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    qq, kk, vv = (x.float().to(DEVICE).requires_grad_() for x in (q, k, v))
    out = cross_attention(qq, kk, vv, start.to(DEVICE), end.to(DEVICE), masked_rows=masked_rows, backend="triton")
    empty, empty_like = torch.empty, torch.empty_like
    with monkeypatch.context() as poisoned:  # the backward only: its allocations start as NaN
        poisoned.setattr(torch, "empty", lambda *a, **kw: empty(*a, **kw).fill_(float("nan")))
        poisoned.setattr(torch, "empty_like", lambda *a, **kw: empty_like(*a, **kw).fill_(float("nan")))
        out.backward(go.float().to(DEVICE))
    _assert_matches_float64(out, (qq, kk, vv), (q, k, v), start, end, go, masked_rows)


COMPILE_FOR_SM90 = """
import json, sys
sys.path.insert(0, sys.argv[1])
from kernel_resources import compile_resources
from fastjudge.kernels import mllama_cross_attention_triton as kernels
bf16, f32, i32 = "*bf16", "*fp32", "*i32"
pointers = dict(q_ptr=bf16, k_ptr=bf16, v_ptr=bf16, do_ptr=bf16, lse_ptr=f32, delta_ptr=f32, dk_ptr=bf16,
                dv_ptr=bf16, start_ptr=i32, end_ptr=i32, lo_ptr=i32, hi_ptr=i32)
tiles = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_D=128, PRECISION="tf32")
print(json.dumps([compile_resources(kernels.cross_attention_dkv_kernel, pointers, tiles, 4, stages, 90)[2]
                  for stages in (1, 2)]))
"""


def test_dkv_kernel_loads_are_pipelined_when_compiled_for_sm90(tmp_path):
    """The dK/dV kernel compiled for sm_90 (H100/H200) by Triton's own compiler, no GPU needed: its shared memory
    at 2 stages exceeds that at 1 (no pipelining), i.e. Triton pipelines the loads of its loop (a branch inside
    the loop stopped that). Runs in a subprocess: under TRITON_INTERPRET the kernels are not compilable objects.
    Checked with Triton 3.9; older compilers are skipped (their pipeliner may differ)."""
    import subprocess
    import sys
    from pathlib import Path

    import triton
    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    if not ((tools / "cuobjdump").exists() and (tools / "ptxas").exists()):
        pytest.skip("this Triton has no NVIDIA backend tools")
    if tuple(int(part) for part in triton.__version__.split(".")[:2]) < (3, 9):
        pytest.skip(f"checked with Triton 3.9; this is {triton.__version__}")
    environment = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    environment.update(TRITON_DEFAULT_FP_FUSION="1", TRITON_CACHE_DIR=str(tmp_path))  # a fresh compile, no home dir
    bench = Path(__file__).resolve().parent.parent / "bench"
    done = subprocess.run([sys.executable, "-c", COMPILE_FOR_SM90, str(bench)], capture_output=True, text=True,
                          env=environment, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    one_stage, two_stages = json.loads(done.stdout.strip().splitlines()[-1])
    assert two_stages > one_stage, (one_stage, two_stages)


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
    # on a GPU machine the model runs there: the "triton" backend is compiled, not interpreted (no CPU tensors)
    adapter = load_adapter(str(tiny.build_checkpoint("mllama", tmp_path_factory.mktemp("mllama"))),
                           dtype=torch.float32, device=DEVICE)
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
    rows = [adapter.prompt_ids(p, f) for p, f in zip(["how many?", "describe the picture in detail", "x"],
                                                      features)]
    inputs = adapter.model_inputs(rows, features, left=True)
    tiles = inputs["cross_attention_mask"][:, -1, 0].sum(-1).tolist()
    assert tiles == [2, 2, 1] and (inputs["cross_attention_mask"][:, :, 0].sum(-1) == 0).any(dim=1).all()
    return images, inputs


def _logits_and_grads(model, inputs):
    model.zero_grad()
    logits = model(**inputs).logits
    (logits * torch.linspace(-1, 1, logits.shape[-1], device=logits.device)).sum().backward()
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
        inputs = processor(images=[[image]], text=[chat], return_tensors="pt", add_special_tokens=False).to(DEVICE)
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
    from fastjudge.engine import shared_cache as mllama_decoding
    from fastjudge.engine.decoding import decode_groups
    _, inputs = _batch(tiny_mllama)
    if blind:
        inputs["cross_attention_mask"][0] = 0
    calls = []
    kernel_function = mllama_decoding.cross_attention_decode

    def counted(*args, **kwargs):
        calls.append(args[0].shape)
        return kernel_function(*args, **kwargs)
    monkeypatch.setattr(mllama_decoding, "cross_attention_decode", counted)

    def run(eos, sampler=None, kernel=False):
        # eager steps: with CUDA graphs (on a GPU) the batch keeps a prompt that is done until half are done
        options = DecodeOptions(cuda_graphs=False, cross_attention_kernel=kernel)
        return decode_groups(tiny_mllama.model, dict(inputs), n=3, max_new_tokens=6, eos_ids=eos, temperature=1.0,
                             generator=torch.Generator().manual_seed(4), sampler=sampler, options=options)

    def greedy(logits, generator):
        return logits.argmax(-1)
    free = run(set(), greedy)
    # an end token in prompt 1's greedy text but not in prompt 0's: prompt 1 leaves the batch, prompt 0 stays
    eos = {next(t for t in free[1][0] if t not in free[0][0])}
    results = []
    for kernel in (False, True):
        results.append((run(set(), kernel=kernel), run(eos, greedy, kernel=kernel)))
    assert results[0] == results[1]
    assert calls and {shape[2] for shape in calls} == {3}  # the kernel ran, the 3 samples as query rows
    assert len({shape[0] for shape in calls}) > 1  # prompts left the batch in between


def test_patched_model_builds_no_dense_mask_and_takes_long_masks(tiny_mllama, monkeypatch):
    """transformers' mask builder is never called through the patched model; a caller that passes the whole
    mask with a cache (fastjudge's generic decoding, transformers 5.17's generate) gets the current rows."""
    from transformers.models.mllama import modeling_mllama

    from fastjudge.engine.decoding import decode_groups
    _, inputs = _batch(tiny_mllama)
    # the generic path: the whole mask every step
    kwargs = dict(n=2, max_new_tokens=5, eos_ids=set(), temperature=1.0, options=DecodeOptions(shared_mllama=False))
    expected = decode_groups(tiny_mllama.model, dict(inputs), generator=torch.Generator().manual_seed(2), **kwargs)
    model = patch_mllama(copy.deepcopy(tiny_mllama.model), backend="triton")

    def refuse(*args, **kwargs):
        raise AssertionError("a dense cross-attention mask was built")
    monkeypatch.setattr(modeling_mllama, "_prepare_cross_attention_mask", refuse)
    assert decode_groups(model, dict(inputs), generator=torch.Generator().manual_seed(2), **kwargs) == expected


def test_patched_model_with_gradient_checkpointing(tiny_mllama):
    _, inputs = _batch(tiny_mllama)
    model = copy.deepcopy(tiny_mllama.model).requires_grad_(True)
    model.train()
    reference = _logits_and_grads(model, inputs)
    # transformers 5.25 renamed gradient_checkpointing_enable (a deprecated alias until v6); 5.17 has only that
    (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    patch_mllama(model, backend="triton")
    ours = _logits_and_grads(model, inputs)
    torch.testing.assert_close(ours[0], reference[0], rtol=1e-4, atol=1e-4)
    for name in reference[1]:
        torch.testing.assert_close(ours[1][name], reference[1][name], rtol=1e-4, atol=1e-4, msg=name)
