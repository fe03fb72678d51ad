"""The shared Mllama decoder's CUDA-graph mode: bucketed reads of the own keys (checked here on the CPU against
exact reads), the graphs themselves (GPU only), and the check of bad logits deferred to the host's looks."""

import numpy as np
import pytest
import torch
from PIL import Image

import tiny
from fastjudge.engine import mllama as mllama_decoding
from fastjudge.engine.decoding import decode_groups
from fastjudge.engine.options import DecodeOptions
from fastjudge.models import ToyAdapter, load_adapter

PROMPTS = ["How many objects?", "What colour is the big shape on the left?", "Describe the image."]


def _inputs(adapter, seed=11):
    rs = np.random.RandomState(seed)
    images = [Image.fromarray(rs.randint(0, 256, (28 + 9 * i, 48 - 7 * i, 3), dtype=np.uint8)) for i in range(3)]
    features = adapter.image_features(images)
    rows = [adapter.prompt_ids(p, f) for p, f in zip(PROMPTS, features)]
    return adapter.model_inputs(rows, features, left=True)


def _adapter(source, tiny_toy_dir, tmp_path):
    if source == "toy":
        return ToyAdapter.load(tiny_toy_dir)
    return load_adapter(str(tiny.build_checkpoint("mllama", tmp_path / "mllama")))


def _force_buckets(monkeypatch, reads):
    """Decoders built from here on read bucketed spans (as with graphs) and record (span, span read)."""
    init, read_span = mllama_decoding.SharedMllamaDecoder.__init__, mllama_decoding.SharedMllamaDecoder.read_span

    def bucketed_init(self, *args, **kwargs):
        init(self, *args, **{**kwargs, "bucket_spans": True})

    def recorded_read_span(self, span):
        reads.append((span, read_span(self, span)))
        return reads[-1][1]
    monkeypatch.setattr(mllama_decoding.SharedMllamaDecoder, "__init__", bucketed_init)
    monkeypatch.setattr(mllama_decoding.SharedMllamaDecoder, "read_span", recorded_read_span)


def _runs(adapter, inputs, device="cpu", eos=frozenset({3, 5, 7}), options=DecodeOptions()):
    """Sampled with refilled slots, and greedy with end tokens (prompts leave the batch)."""
    model = adapter.model
    sampled = decode_groups(model, dict(inputs), n=4, slots=2, max_new_tokens=9, eos_ids=set(), temperature=1.0,
                            top_k=20, generator=torch.Generator(device=device).manual_seed(5),
                            options=options.with_(sync_every=3))
    greedy = decode_groups(model, dict(inputs), n=1, max_new_tokens=12, eos_ids=set(eos), temperature=0.0,
                           options=options.with_(sync_every=2))
    return sampled, greedy


def _early_end(adapter, inputs, options=DecodeOptions()):
    """An end token that prompt 1's greedy text reaches but prompt 0's does not: prompt 1 leaves early."""
    free = decode_groups(adapter.model, dict(inputs), n=1, max_new_tokens=12, eos_ids=set(), temperature=0.0,
                         options=options)
    return {next(t for t in free[1][0] if t not in free[0][0])}


@pytest.mark.parametrize("source", ["toy", "mllama"])
def test_bucketed_reads_sample_what_exact_reads_sample(source, tiny_toy_dir, tmp_path, monkeypatch):
    """Reading past the columns written (masked, zero-filled) changes nothing: the graphs' buckets of spans
    sample exactly what exact spans sample."""
    adapter = _adapter(source, tiny_toy_dir, tmp_path)
    inputs = _inputs(adapter)
    exact = _runs(adapter, inputs)
    reads = []
    _force_buckets(monkeypatch, reads)
    assert _runs(adapter, inputs, options=DecodeOptions(graph_first_span=2)) == exact
    assert {read for _, read in reads} == {2, 4, 8, 9, 12}  # buckets 2, 4, 8, ..., capped at max_new_tokens
    assert any(read > span for span, read in reads)  # the bucketed runs did read past the columns written
    assert all(read >= span for span, read in reads)


def test_bucket_spans_double_up_to_the_buffer():
    decoder = mllama_decoding.SharedMllamaDecoder.__new__(mllama_decoding.SharedMllamaDecoder)
    decoder.bucket_spans, decoder.max_new, decoder.options = True, 100, DecodeOptions()
    assert [decoder.read_span(s) for s in (1, 16, 17, 33, 64, 65, 100)] == [16, 16, 32, 64, 64, 100, 100]
    decoder.bucket_spans = False
    assert decoder.read_span(17) == 17


def test_graphs_refused_off_a_gpu(tiny_toy_dir):
    adapter = ToyAdapter.load(tiny_toy_dir)
    with pytest.raises(ValueError, match="^graphs: "):
        mllama_decoding.decode_mllama_shared(adapter.model, _inputs(adapter), n=1, max_new_tokens=2, eos_ids=set(),
                                             sampler=lambda logits, g: logits.argmax(-1), generator=None,
                                             options=DecodeOptions(cuda_graphs=True))


def test_bad_logits_raise_at_the_next_look(tiny_toy_dir):
    """check_logits: a NaN row is reported at the host's next look (not at every step, which would wait for the
    GPU), naming the argument."""
    adapter = ToyAdapter.load(tiny_toy_dir)
    model = adapter.model
    inputs = _inputs(adapter)
    steps = []

    def greedy(logits, generator):
        steps.append(1)
        return logits.argmax(-1)
    kwargs = dict(n=2, max_new_tokens=8, eos_ids=set(), sampler=greedy, generator=None, sync_every=3)
    with torch.no_grad():
        model.lm_head.weight[5, 0] = float("nan")
    try:
        mllama_decoding.decode_mllama_shared(model, dict(inputs), **kwargs)  # unchecked: runs to the end
        assert len(steps) == 9  # 8 tokens, and the step before the look that sees all ended
        steps.clear()
        with pytest.raises(ValueError, match="^logits: "):
            mllama_decoding.decode_mllama_shared(model, dict(inputs), check_logits=True, **kwargs)
        assert len(steps) == 3  # the first look, after 3 steps
    finally:
        with torch.no_grad():
            model.lm_head.weight[5, 0] = 0.0


@pytest.mark.parametrize("source", ["toy", "mllama"])
def test_keeping_done_prompts_decodes_what_dropping_them_decodes(source, tiny_toy_dir, tmp_path, monkeypatch):
    """With graphs the batch keeps the prompts that are done until at most half are going: their slots must stay
    inert (no token written, no sample started). Greedy, so that the draws do not depend on the rows' order."""
    adapter = _adapter(source, tiny_toy_dir, tmp_path)
    inputs = _inputs(adapter)
    eos = _early_end(adapter, inputs)

    def run():
        return [decode_groups(adapter.model, dict(inputs), n=n, slots=slots, max_new_tokens=12, eos_ids=eos,
                              temperature=0.0, options=DecodeOptions(sync_every=sync))
                for n, slots, sync in [(1, 1, 1), (3, 2, 2)]]
    dropped = run()
    kept_calls = []

    def never(self, going, batch):
        kept_calls.append(going)
        return False
    monkeypatch.setattr(mllama_decoding.SharedMllamaDecoder, "worth_shrinking", never)
    assert run() == dropped
    assert any(going < 3 for going in kept_calls)  # a done prompt was kept


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("self_kernel", [False, True])
@pytest.mark.parametrize("source", ["toy", "mllama"])
def test_graphs_sample_what_the_eager_steps_sample(source, self_kernel, tiny_toy_dir, tmp_path, monkeypatch):
    """On a GPU: the steps replayed as CUDA graphs give the tokens of the same steps run eagerly (both reading
    bucketed spans), with refilled slots and a prompt leaving the batch, which captures new graphs for the
    smaller batch (both runs drop a done prompt at once, so that their batches match); with the self layers
    through SDPA and through the self-attention kernel (whose splits change with the span: a capture must not
    compile a new variant)."""
    eager = DecodeOptions(self_attention_kernel=self_kernel, cuda_graphs=False, graph_first_span=2)
    adapter = _adapter(source, tiny_toy_dir, tmp_path)
    inputs = {k: v.to("cuda") for k, v in _inputs(adapter).items()}
    adapter.model.to("cuda")
    eos = _early_end(adapter, inputs, eager)
    # a GEMM over other rows may round differently on a GPU: both runs drop done prompts at once
    monkeypatch.setattr(mllama_decoding.SharedMllamaDecoder, "worth_shrinking", lambda self, going, batch: True)
    captures = []
    capture = mllama_decoding.SharedMllamaDecoder._capture

    def counted(self, span):
        captures.append((len(self.prompt_mask), span))
        return capture(self, span)
    monkeypatch.setattr(mllama_decoding.SharedMllamaDecoder, "_capture", counted)
    graphed = _runs(adapter, inputs, "cuda", eos, eager.with_(cuda_graphs=True))
    assert len({span for _, span in captures}) >= 3
    assert len({batch for batch, _ in captures}) >= 2  # captured again after the batch shrank
    _force_buckets(monkeypatch, [])
    assert _runs(adapter, inputs, "cuda", eos, eager) == graphed


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host synchronizations are a GPU matter")
def test_steps_between_looks_do_not_synchronize(tiny_toy_dir):
    """The decoder waits for the GPU only at its looks: 16 more steps (2 more looks at sync_every 8) add at most
    the looks' synchronizations, not one per step (a Python scalar written into a device tensor, an .item(), a
    check of the logits would each add 16)."""
    import warnings
    adapter = ToyAdapter.load(tiny_toy_dir)
    inputs = {k: v.to("cuda") for k, v in _inputs(adapter).items()}
    adapter.model.to("cuda")

    def synchronizations(tokens):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                decode_groups(adapter.model, dict(inputs), n=4, max_new_tokens=tokens, eos_ids=set(),
                              temperature=1.0, top_k=20, generator=torch.Generator(device="cuda").manual_seed(0),
                              options=DecodeOptions(sync_every=8))
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return sum("synchroniz" in str(w.message).lower() for w in caught)

    synchronizations(8)  # warm-up: compiles, captures
    extra = synchronizations(24) - synchronizations(8)
    assert extra <= 2 * 3, extra
