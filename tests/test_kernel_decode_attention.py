"""Self-attention of a decoding step over a shared prompt (`fastjudge.kernels.shared_prefix_decode_attention`):
the Triton kernel (under the interpreter in float32 on a CPU machine, compiled on a GPU machine) against a
row-by-row float64 definition, and the shared Mllama decoder through it against its SDPA path."""

import os

import numpy as np
import pytest
import torch
from PIL import Image

from fastjudge.kernels.decode_attention import shared_prefix_decode_attention, shared_prefix_decode_attention_reference

DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"

CASES = [  # (batch, heads, kv heads, samples n, prompt T, own steps in the buffer, steps read, splits)
    (3, 6, 2, 5, 11, 7, 5, None),  # G 3: 15 rows; a width past the columns written
    (2, 4, 4, 1, 16, 9, 9, 1),  # no GQA, one sample, one split: the whole buffer
    (2, 8, 2, 9, 5, 4, 3, 6),  # 36 rows in one block of 64, a short prompt
    (2, 8, 2, 20, 9, 4, 3, 5),  # 80 rows: two row blocks of 64 (the 11B at n >= 17)
]


def _inputs(case, seed):
    batch, heads, kv_heads, samples, prompt, steps, read, _ = case
    g = torch.Generator().manual_seed(seed)
    length = prompt + steps * samples
    q = torch.randn(batch, heads, samples, 12, generator=g, dtype=torch.float64)
    keys = torch.randn(batch, kv_heads, length, 12, generator=g, dtype=torch.float64)
    values = torch.randn(batch, kv_heads, length, 12, generator=g, dtype=torch.float64)
    prompt_mask = torch.ones(batch, prompt, dtype=torch.bool)
    prompt_mask[1, :prompt // 2] = False  # left padding
    index = torch.randint(0, read, (batch, samples), generator=g)  # slots at different steps (refilled ones low)
    return q, keys, values, prompt_mask, index, prompt + read * samples


def _definition(q, keys, values, prompt_mask, index, width):
    """Row by row in float64: sample s of prompt b attends to the prompt keys its mask keeps and to its own
    columns T + step * n + s for steps 0..index[b, s]."""
    batch, heads, samples, size = q.shape
    group, prompt = heads // keys.shape[1], prompt_mask.shape[1]
    out = torch.zeros_like(q, dtype=torch.float64)
    for b in range(batch):
        for s in range(samples):
            columns = [c for c in range(prompt) if prompt_mask[b, c]]
            columns += [prompt + step * samples + s for step in range(int(index[b, s]) + 1)]
            assert max(columns) < width
            for h in range(heads):
                k, v = keys[b, h // group, columns].double(), values[b, h // group, columns].double()
                out[b, h, s] = torch.softmax(k @ q[b, h, s].double() * size ** -0.5, dim=0) @ v
    return out


def test_reference_is_the_row_by_row_definition():
    q, keys, values, prompt_mask, index, width = _inputs(CASES[0], 1)
    torch.testing.assert_close(shared_prefix_decode_attention_reference(q, keys, values, prompt_mask, index,
                                                                        width=width),
                               _definition(q, keys, values, prompt_mask, index, width))


@pytest.mark.parametrize("case", CASES)
def test_kernel_matches_float64(case):
    q, keys, values, prompt_mask, index, width = _inputs(case, sum(x or 0 for x in case))
    out = shared_prefix_decode_attention(*(x.float().to(DEVICE) for x in (q, keys, values)), prompt_mask.to(DEVICE),
                                         index.to(DEVICE), width=width, backend="triton", splits=case[-1])
    torch.testing.assert_close(out.double().cpu(), _definition(q, keys, values, prompt_mask, index, width),
                               rtol=1e-5, atol=1e-5)


def test_kernel_writes_every_element_it_reads():
    """The partial buffers and the output NaN-poisoned (the interpreter does not catch unwritten elements):
    every partial element the combine reads is written, chunks that hold nothing a row sees included, and
    every output element."""
    from fastjudge.kernels import _flash_triton
    from fastjudge.kernels import decode_attention_triton as kernels
    from fastjudge.kernels._flash import launch_config
    q, keys, values, prompt_mask, index, width = (x.to(DEVICE) if torch.is_tensor(x) else x
                                                  for x in _inputs(CASES[0], 3))
    q, keys, values = (x.float().contiguous() for x in (q, keys, values))
    batch, heads, samples, size = q.shape
    kv_heads, length, prompt = keys.shape[1], keys.shape[2], prompt_mask.shape[1]
    rows, splits, block_m = heads // kv_heads * samples, 7, 16
    config = launch_config(q)
    parts = torch.full((batch * kv_heads, splits, rows, size), float("nan"), device=DEVICE)
    stats = torch.full((batch * kv_heads, splits, 2, rows), float("nan"), device=DEVICE)
    out = torch.full_like(q, float("nan"))
    row_blocks = -(-rows // block_m)
    kernels.shared_prefix_decode_kernel[(splits, batch * kv_heads, row_blocks)](
        q, keys, values, parts, stats, prompt_mask.to(torch.int8), index.to(torch.int32), rows, length, size,
        kv_heads, prompt, samples, width, splits, -(-width // splits), size ** -0.5, BLOCK_M=block_m,
        BLOCK_N=config["BLOCK_N"], BLOCK_D=config["BLOCK_D"], PRECISION=config["PRECISION"])
    assert not parts.isnan().any() and not stats.isnan().any()
    _flash_triton.decode_combine_kernel[(batch * kv_heads, row_blocks)](
        parts, stats, out, rows, size, splits, BLOCK_M=block_m, BLOCK_D=config["BLOCK_D"])
    assert not out.isnan().any()


def test_bad_arguments_name_the_argument():
    q, keys, values, prompt_mask, index, width = _inputs(CASES[0], 2)
    cases = [(dict(q=q[0]), "^q, keys: "), (dict(values=values[:, :, :4]), "^values: "),
             (dict(prompt_mask=prompt_mask[0]), "^prompt_mask: "), (dict(index=index[:, :2]), "^index: "),
             (dict(width=keys.shape[2] + 1), "^width: "), (dict(width=3), "^width: "),
             (dict(backend="cuda"), "^backend: "), (dict(splits=0), "^splits: ")]
    for change, message in cases:
        args = {**dict(q=q, keys=keys, values=values, prompt_mask=prompt_mask, index=index, width=width), **change}
        with pytest.raises(ValueError, match=message):
            shared_prefix_decode_attention(args.pop("q"), args.pop("keys"), args.pop("values"),
                                           args.pop("prompt_mask"), args.pop("index"), **args)


@pytest.mark.skipif(DEVICE != "cuda", reason="bf16 arithmetic is wrong in the Triton interpreter")
def test_bf16_on_the_gpu_against_float64():
    """bf16 at the 11B's decoding shapes (32 query heads over 8 K/V heads, D 128; 16 samples over a prompt of
    1,156 keys and 40 own steps): norm-relative error within 1e-2, and within twice the reference's in bf16."""
    g = torch.Generator().manual_seed(6)
    batch, samples, prompt, steps = 2, 16, 1156, 40
    q = torch.randn(batch, 32, samples, 128, generator=g, dtype=torch.float64)
    keys = torch.randn(batch, 8, prompt + steps * samples, 128, generator=g, dtype=torch.float64)
    values = torch.randn_like(keys)
    prompt_mask = torch.ones(batch, prompt, dtype=torch.bool)
    prompt_mask[1, :300] = False
    index = torch.randint(0, steps, (batch, samples), generator=g)
    width = prompt + steps * samples
    expected = shared_prefix_decode_attention_reference(q, keys, values, prompt_mask, index, width=width)

    def error(backend):
        out = shared_prefix_decode_attention(*(x.to(DEVICE, torch.bfloat16) for x in (q, keys, values)),
                                             prompt_mask.to(DEVICE), index.to(DEVICE), width=width, backend=backend)
        return float((out.double().cpu() - expected).norm() / expected.norm())
    ours, baseline = error("triton"), error("torch")
    assert ours < 1e-2 and ours <= 2 * baseline + 1e-3, (ours, baseline)


@pytest.mark.parametrize("source", ["toy", "mllama"])
def test_shared_decoder_self_layers_through_the_kernel(source, tiny_toy_dir, tmp_path, monkeypatch):
    """The shared Mllama decoder's self layers through the kernel sample exactly what its SDPA path samples:
    refilled slots (own runs that restart), prompts of different lengths (left padding), end tokens."""
    import tiny
    from fastjudge.engine import shared_cache as mllama_decoding
    from fastjudge.engine.decoding import decode_groups
    from fastjudge.engine.options import DecodeOptions
    from fastjudge.models import ToyAdapter, load_adapter
    adapter = ToyAdapter.load(tiny_toy_dir) if source == "toy" else \
        load_adapter(str(tiny.build_checkpoint("mllama", tmp_path / "mllama")), device=DEVICE, dtype=torch.float32)
    if source == "toy":
        adapter.model.to(DEVICE)  # the adapter's device is its model's
    rs = np.random.RandomState(2)
    images = [Image.fromarray(rs.randint(0, 256, (30 + 9 * i, 44, 3), dtype=np.uint8)) for i in range(3)]
    features = adapter.image_features(images)
    rows = [adapter.prompt_ids(p, f) for p, f in zip(["How many?", "What colour is the big shape?", "x"], features)]
    inputs = adapter.model_inputs(rows, features, left=True)
    calls = []
    kernel = mllama_decoding.shared_prefix_decode_attention

    def counted(*args, **kwargs):
        index = args[4]
        calls.append((kwargs["width"], bool((index != index[:, :1]).any())))
        return kernel(*args, **kwargs)
    monkeypatch.setattr(mllama_decoding, "shared_prefix_decode_attention", counted)

    def options(use_kernel):
        return DecodeOptions(cuda_graphs=False, self_attention_kernel=use_kernel)

    def sample(eos, use_kernel=False):
        return decode_groups(adapter.model, dict(inputs), n=4, slots=2, max_new_tokens=7, eos_ids=eos,
                             temperature=1.0, top_k=20, generator=torch.Generator().manual_seed(5),
                             options=options(use_kernel).with_(sync_every=2))
    # an end token in prompt 0's first sample but not in its second: the two slots end and restart at different
    # steps (their indices differ)
    free = sample(set())
    eos = {next(t for t in free[0][0][1:] if t not in free[0][1])}

    def runs(use_kernel):
        sampled = sample(eos, use_kernel)
        greedy = decode_groups(adapter.model, dict(inputs), n=1, max_new_tokens=10, eos_ids={3, 5, 7},
                               temperature=0.0, options=options(use_kernel))
        return sampled, greedy
    results = [runs(use_kernel) for use_kernel in (False, True)]
    assert results[0] == results[1]
    assert len({width for width, _ in calls}) > 3  # the kernel ran, over widths that grew
    assert any(differ for _, differ in calls)  # slots of a prompt at different steps
