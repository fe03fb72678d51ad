"""The shared-prefix generation engine (`fastjudge.engine.decoding.decode_groups` with n > 1, rows leaving the
strings) and the drop-in `fastjudge.sampler.generate`."""

import types

import numpy as np
import pytest
import torch
from PIL import Image

import tiny
from fastjudge.core.sampling_params import SamplingParams
from fastjudge.data import prompts as prompt_texts
from fastjudge.engine.decoding import decode_groups
from fastjudge.engine.options import DecodeOptions
from fastjudge.models import ToyAdapter, load_adapter
from fastjudge.sampler import generate
from fastjudge.toy import world

PROMPTS = ["How many objects?", "What colour is the big shape on the left?", "Describe the image."]


@pytest.fixture(scope="module", params=["toy", *tiny.FAMILIES])
def adapter(request, tmp_path_factory, tiny_toy_dir):
    if request.param == "toy":
        return ToyAdapter.load(tiny_toy_dir)
    return load_adapter(str(tiny.build_checkpoint(request.param, tmp_path_factory.mktemp(request.param))))


GENERIC = DecodeOptions(shared_mllama=False)  # Mllama through the generic decoder too


def decode(model, inputs, *, n, options=DecodeOptions(), **kwargs):
    """decode_groups' samples as one list, prompt-major (the n samples of prompt 0 first)."""
    return [tokens for group in decode_groups(model, inputs, n=n, options=options, **kwargs) for tokens in group]


def _images(count, seed):
    rs = np.random.RandomState(seed)
    return [Image.fromarray(rs.randint(0, 256, (28 + 9 * i, 48 - 7 * i, 3), dtype=np.uint8)) for i in range(count)]


def _inputs(adapter, images, prompts, repeat=1):
    features = adapter.image_features(images)
    rows = [adapter.prompt_ids(p, f) for p, f in zip(prompts, features)]
    rows = [r for r in rows for _ in range(repeat)]
    features = [f for f in features for _ in range(repeat)]
    return adapter.model_inputs(rows, features, left=True)


def test_shared_prefill_samples_as_repeated_rows_do(adapter):
    """n samples from one prefill per prompt draw exactly what n repeated prompts draw (same generator, no
    row leaves: no EOS), so sharing the prompt's cache changes nothing but the work."""
    images, n = _images(3, seed=1), 4
    kwargs = dict(max_new_tokens=6, eos_ids=set(), temperature=1.0)
    shared = decode(adapter.model, _inputs(adapter, images, PROMPTS), n=n,
                    generator=torch.Generator().manual_seed(7), **kwargs)
    repeated = decode(adapter.model, _inputs(adapter, images, PROMPTS, repeat=n), n=1,
                      generator=torch.Generator().manual_seed(7), **kwargs)
    assert len(shared) == len(PROMPTS) * n and all(len(row) == 6 for row in shared)
    assert shared == repeated
    assert len({tuple(row) for row in shared}) > 1  # they are samples, not copies


def test_finished_rows_leave_without_changing_the_others(adapter):
    """Greedy rows that stop early leave the batch; the rows still going decode what they decode alone."""
    images = _images(3, seed=2)
    batch = adapter.generate(images, PROMPTS, max_new_tokens=12)
    for image, prompt, (text,) in zip(images, PROMPTS, batch):
        assert adapter.generate([image], [prompt], max_new_tokens=12) == [[text]]


def test_stop_strings_cut_the_completion(adapter):
    images = _images(3, seed=3)
    free = [c[0] for c in adapter.generate(images, PROMPTS, max_new_tokens=10)]
    # a stop string taken from the middle of each greedy completion
    stops = [text[len(text) // 2:len(text) // 2 + 2] for text in free if len(text) >= 4]
    if not stops:
        pytest.skip("completions too short to hold a stop string")
    cut = [c[0] for c in adapter.generate(images, PROMPTS, max_new_tokens=10, stop=stops)]
    for full, short in zip(free, cut):
        first = min((full.find(s) for s in stops if s in full), default=len(full))
        assert short == full[:first]
        assert not any(s in short for s in stops)


def test_a_given_answer_start_is_continued(adapter):
    """generate(prefixes=...): each completion is its prefix followed by the model's continuation. For the toy's
    word-level tokens, greedy decoding continued from the first words of its own greedy answer writes that same
    answer (the prefix's tokens are the ones it generated)."""
    images = _images(3, seed=4)
    free = [c[0] for c in adapter.generate(images, PROMPTS, max_new_tokens=10)]
    prefixes = [" ".join(text.split()[:3]) for text in free]
    continued = [c[0] for c in adapter.generate(images, PROMPTS, max_new_tokens=10, prefixes=prefixes)]
    for prefix, full, text in zip(prefixes, free, continued):
        assert text.startswith(prefix)
        if isinstance(adapter, ToyAdapter):
            assert text.split()[:10] == full.split()[:10]
    with pytest.raises(ValueError, match="^prefixes: expected one per prompt"):
        adapter.generate(images, PROMPTS, prefixes=prefixes[:1])


def test_sampling_is_reproducible_by_seed(adapter):
    images = _images(2, seed=4)
    a = adapter.generate(images, PROMPTS[:2], n=3, temperature=1.0, max_new_tokens=5, seed=1)
    b = adapter.generate(images, PROMPTS[:2], n=3, temperature=1.0, max_new_tokens=5, seed=1)
    c = adapter.generate(images, PROMPTS[:2], n=3, temperature=1.0, max_new_tokens=5, seed=2)
    assert a == b and a != c
    assert [len(x) for x in a] == [3, 3]


@pytest.mark.parametrize("bad,message", [
    (dict(n=0), "^n: "), (dict(temperature=-1.0), "^temperature: "), (dict(top_p=0.0), "^top_p: "),
    (dict(top_p=1.5), "^top_p: "), (dict(top_k=-1), "^top_k: "), (dict(max_new_tokens=0), "^max_new_tokens: "),
    (dict(prompts=["  "]), r"^prompts\[0\]: "), (dict(images=[None]), r"^images\[0\]: "),
    (dict(images=[]), "^images and prompts: "),
])
def test_bad_arguments_name_the_argument(tiny_toy_dir, bad, message):
    adapter = ToyAdapter.load(tiny_toy_dir)
    args = dict(images=_images(1, seed=5), prompts=["describe the image"], temperature=1.0)
    args.update(bad)
    with pytest.raises(ValueError, match=message):
        adapter.generate(args.pop("images"), args.pop("prompts"), **args)


def test_drop_in_generate_with_mllama_processor_matches_transformers(tmp_path):
    """`fastjudge.sampler.generate(model, processor, ...)` with the checkpoint's own AutoProcessor: greedy gives
    the tokens of transformers' greedy `generate` on the processor's inputs."""
    from transformers import AutoProcessor, MllamaForConditionalGeneration
    folder = tiny.build_checkpoint("mllama", tmp_path / "mllama")
    model, processor = MllamaForConditionalGeneration.from_pretrained(folder), AutoProcessor.from_pretrained(folder)
    requires_grad = [p.requires_grad for p in model.parameters()]
    images = _images(3, seed=6)
    ours = generate(model, processor, images, PROMPTS, temperature=0.0, max_new_tokens=8)
    for image, prompt, (text,) in zip(images, PROMPTS, ours):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        chat = processor.apply_chat_template(messages, add_generation_prompt=True)
        inputs = processor(images=[[image]], text=[chat], return_tensors="pt", add_special_tokens=False)
        out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
        assert text == processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    assert [p.requires_grad for p in model.parameters()] == requires_grad  # the model is left as it was


@pytest.mark.parametrize("family", ["mllama", "qwen2_vl"])
def test_drop_in_generate_takes_templated_text_and_refuses_the_wrong_form(family, tmp_path):
    """Text already through the chat template (what transformers' processor takes) with templated=True gives
    what the user's text gives (both equal to transformers' greedy generate for Mllama, above); templated text
    passed as the user's text, or raw text passed as templated, is a ValueError naming the prompt."""
    from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer
    folder = tiny.build_checkpoint(family, tmp_path / family)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    processor = types.SimpleNamespace(tokenizer=tokenizer, image_processor=AutoImageProcessor.from_pretrained(folder))
    model = AutoModelForImageTextToText.from_pretrained(folder)
    images = _images(3, seed=8)
    chats = [tokenizer.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}],
        add_generation_prompt=True, tokenize=False) for prompt in PROMPTS]
    raw = generate(model, processor, images, PROMPTS, temperature=0.0, max_new_tokens=8)
    assert generate(model, processor, images, chats, temperature=0.0, max_new_tokens=8, templated=True) == raw
    with pytest.raises(ValueError, match=r"^prompts\[1\]: holds the chat template's .*templated=True"):
        generate(model, processor, images, [PROMPTS[0], chats[1], PROMPTS[2]], temperature=0.0)
    with pytest.raises(ValueError, match=r"^prompts\[0\]: templated=True expects"):
        generate(model, processor, images, PROMPTS, temperature=0.0, templated=True)
    toy = load_adapter(None)
    with pytest.raises(ValueError, match="^templated: "):
        toy.generate(images[:1], ["describe the image ."], templated=True)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_drop_in_generate_with_qwen(family, tmp_path):
    from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer
    folder = tiny.build_checkpoint(family, tmp_path / family)
    processor = types.SimpleNamespace(tokenizer=AutoTokenizer.from_pretrained(folder),
                                      image_processor=AutoImageProcessor.from_pretrained(folder))
    model = AutoModelForImageTextToText.from_pretrained(folder)
    images = _images(3, seed=7)
    ours = generate(model, processor, images, PROMPTS, temperature=0.0, max_new_tokens=8)
    assert ours == load_adapter(str(folder)).generate(images, PROMPTS, max_new_tokens=8)
    sampled = generate(model, processor, images, PROMPTS, n=4, temperature=1.0, max_new_tokens=4, seed=3)
    assert [len(s) for s in sampled] == [4, 4, 4]
    with pytest.raises(ValueError, match="^processor: "):
        generate(model, object(), images, PROMPTS)


def test_toy_judge_prompts_decode_in_one_batch_with_shared_samples(tiny_toy_dir):
    """The loop's own use: judge prompts of different lengths, n samples each, rows leaving as they end."""
    adapter = ToyAdapter.load(tiny_toy_dir)
    rng = __import__("random").Random(0)
    scenes = [world.random_scene(rng) for _ in range(4)]
    images = [world.render(s, rng) for s in scenes]
    texts = [prompt_texts.judge_prompt(q.instruction, "a red circle", "two blue squares")
             for q in (world.questions(s, rng)[0] for s in scenes)]
    out = adapter.generate(images, texts, n=5, temperature=1.0, max_new_tokens=20, seed=0)
    assert [len(x) for x in out] == [5] * 4


@pytest.mark.parametrize("v1,v2", [(0, 0), (1, 0), (4, 0), (3, 1), (5, 2), (8, 7), (12, 3), (2, 2)])
def test_majority_confidence_is_the_beta_posterior_probability(v1, v2):
    """P(p1 > p2) for Beta(v1 + 1, v2 + 1) shares, by numerical integration of the density in float64."""
    from math import lgamma

    from fastjudge.core.voting import majority_confidence
    a, b = v1 + 1, v2 + 1
    x = np.linspace(0.5, 1.0, 200_001)
    log_norm = lgamma(a + b) - lgamma(a) - lgamma(b)
    density = np.exp(log_norm) * x ** (a - 1) * (1 - x) ** (b - 1)
    expected = np.trapezoid(density, x)
    counts = {"x": v1, "y": v2} if v2 else ({"x": v1} if v1 else {})
    assert majority_confidence(counts) == pytest.approx(expected, abs=1e-6)


def test_sampling_settled_needs_min_votes_or_a_hopeless_prompt():
    from fastjudge.core.voting import sampling_settled
    assert not sampling_settled({"2": 4}, drawn=4, n_samples=16, min_votes=5, confidence=0.9)  # 4 < min_votes
    assert sampling_settled({"2": 8}, drawn=8, n_samples=16, min_votes=5, confidence=0.99)
    assert not sampling_settled({"2": 5, "3": 3}, drawn=8, n_samples=16, min_votes=5, confidence=0.95)
    # 1 + 4 remaining samples can never reach 6 votes: no pair possible, stop
    assert sampling_settled({"a": 1, "b": 1, "c": 1}, drawn=12, n_samples=16, min_votes=6, confidence=0.95)


def test_rounds_early_stop_draws_fewer_samples_in_whole_rounds(tmp_path):
    """The host-side rounds (the families without the shared Mllama decoder), driven here with the toy."""
    from fastjudge import data
    from fastjudge.stages import synth
    from fastjudge.toy.files import write_toy_prompts
    path = write_toy_prompts(tmp_path, count=24, seed=3, closed_fraction=1.0)
    records, _ = data.load_prompts(path)
    adapter = load_adapter(None)
    cfg = synth.SynthOptions(samples=SamplingParams(n=8, max_new_tokens=12, temperature=0.6, top_k=50, top_p=0.9),
                             round_size=2, min_votes=3, early_stop=0.8, batch_rows=256)
    groups = synth.sample_adaptively(adapter, data.load_images([r.image for r in records]), records, cfg, seed=1)
    sizes = [len(g) for g in groups]
    assert all(2 <= size <= 8 and size % 2 == 0 for size in sizes)
    assert sum(sizes) < 8 * len(records)  # the shipped model agrees with itself often enough to stop early
    again = synth.sample_adaptively(adapter, data.load_images([r.image for r in records]), records, cfg, seed=1)
    assert again == groups
    from fastjudge.config import LoopConfig
    with pytest.raises(ValueError, match="^early_stop: "):
        LoopConfig(early_stop=1.0)


def test_token_budget_splits_batches_without_changing_greedy_output(tiny_toy_dir):
    from fastjudge.models.generation import _token_budget
    rows = [[1] * 10, [1] * 30, [1] * 5, [1] * 12]
    # 2 samples x (longest + 6 new): [10, 30] holds 2 x 2 x 36 = 144 > 100 positions, so 10 goes alone
    assert list(_token_budget(rows, 2, 6, 100)) == [(0, 1), (1, 2), (2, 4)]
    assert list(_token_budget(rows, 2, 6, 1)) == [(0, 1), (1, 2), (2, 3), (3, 4)]  # one prompt at least
    assert list(_token_budget(rows, 2, 6, None)) == [(0, 4)]
    adapter = ToyAdapter.load(tiny_toy_dir)
    images = _images(3, seed=8)
    texts = ["describe the image", "how many objects are there ?", "what colour is the big circle ?"]
    assert adapter.generate(images, texts, max_new_tokens=6, batch_tokens=20) == \
        adapter.generate(images, texts, max_new_tokens=6)
    with pytest.raises(ValueError, match="^batch_tokens: "):
        adapter.generate(images, texts, batch_tokens=0)


@pytest.mark.parametrize("source", ["toy", "mllama"])
def test_mllama_shared_cache_decoding_equals_the_generic_path(source, tiny_toy_dir, tmp_path):
    """Mllama's decoder without copies (prefix and image keys shared as extra query positions, own keys in a
    preallocated buffer) samples exactly what transformers' forward on repeated rows samples."""
    adapter = ToyAdapter.load(tiny_toy_dir) if source == "toy" else \
        load_adapter(str(tiny.build_checkpoint("mllama", tmp_path / "mllama")))
    images, n = _images(3, seed=11), 5
    kwargs = dict(max_new_tokens=7, eos_ids=set(), temperature=1.0, top_k=20)
    shared = decode(adapter.model, _inputs(adapter, images, PROMPTS), n=n,
                    generator=torch.Generator().manual_seed(3), **kwargs)
    generic = decode(adapter.model, _inputs(adapter, images, PROMPTS, repeat=n), n=1, options=GENERIC,
                     generator=torch.Generator().manual_seed(3), **kwargs)
    assert shared == generic
    # with end tokens: a prompt leaves when all its samples have ended; each sample stops at its own end
    eos = set(list(adapter.eos_ids)[:1])
    kwargs = dict(max_new_tokens=12, eos_ids=eos | {3, 5, 7}, temperature=0.0)
    shared = decode(adapter.model, _inputs(adapter, images, PROMPTS), n=1, **kwargs)
    assert shared == decode(adapter.model, _inputs(adapter, images, PROMPTS), n=1, options=GENERIC, **kwargs)


@pytest.mark.parametrize("blind", ["one prompt", "every prompt"])
def test_mllama_shared_decoding_handles_prompts_that_see_no_image(blind):
    """A prompt whose tokens see no image key (cross mask all zero): transformers attends evenly and zeroes the
    cross layer's MLP; the shared decoder must give the same logits, with or without other prompts seeing."""
    from fastjudge.toy import model as toy
    tokenizer = toy.build_tokenizer()
    config = toy.build_config(tokenizer, text_hidden=64, text_layers=4, cross_layers=(1,), vision_hidden=32)
    adapter = ToyAdapter(toy.build_model(config, seed=0), tokenizer)
    with torch.no_grad():  # gates that make the cross layer matter
        for layer in adapter.model.model.language_model.layers:
            if hasattr(layer, "cross_attn_attn_gate"):
                layer.cross_attn_attn_gate.fill_(0.7)
                layer.cross_attn_mlp_gate.fill_(0.5)
    inputs = _inputs(adapter, _images(3, seed=12), PROMPTS)
    if blind == "one prompt":
        inputs["cross_attention_mask"][0] = 0
    else:
        inputs["cross_attention_mask"].zero_()
    seen = {True: [], False: []}
    for shared in (True, False):
        def spy(logits, generator, shared=shared):
            seen[shared].append(logits.clone())
            return logits.argmax(-1)
        decode(adapter.model, dict(inputs), n=1, max_new_tokens=5, eos_ids=set(), sampler=spy,
               options=DecodeOptions(shared_mllama=shared))
    for a, b in zip(seen[True], seen[False]):
        assert torch.isfinite(a).all()
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)


def test_decode_options_validate_and_read_the_environment_in_one_place(monkeypatch):
    from fastjudge.engine.options import DecodeOptions
    with pytest.raises(ValueError, match="^graph_first_span: "):
        DecodeOptions(graph_first_span=0)
    with pytest.raises(ValueError, match="^sync_every: "):
        DecodeOptions(sync_every=0)
    monkeypatch.delenv("FASTJUDGE_GPU_KERNELS", raising=False)
    monkeypatch.delenv("FASTJUDGE_CUDA_GRAPHS", raising=False)
    assert DecodeOptions.from_environment() == DecodeOptions()
    monkeypatch.setenv("FASTJUDGE_GPU_KERNELS", "0")
    monkeypatch.setenv("FASTJUDGE_CUDA_GRAPHS", "0")
    options = DecodeOptions.from_environment()
    assert not options.gpu_kernels and options.cuda_graphs is False
    # with gpu_kernels off no kernel runs, even one asked for; otherwise as asked, or on a GPU when not asked
    assert not options.kernel_on(True, on_cuda=True)
    assert DecodeOptions().kernel_on(None, on_cuda=True) and not DecodeOptions().kernel_on(None, on_cuda=False)
    assert DecodeOptions().kernel_on(True, on_cuda=False) and not DecodeOptions().kernel_on(False, on_cuda=True)
    assert load_adapter(None).decode_options == options  # the loader takes the environment's
    from fastjudge.models.toy import base_model_dir
    assert ToyAdapter.load(base_model_dir()).decode_options == options  # and so does an adapter built directly
    assert load_adapter(None, decode_options=DecodeOptions()).decode_options == DecodeOptions()


def test_adapters_of_a_run_share_one_feature_cache(tiny_toy_dir):
    """A run hands one cache to every adapter it loads; a copied adapter (the judge made from the base) reads
    the same entries; an adapter loaded alone gets a cache of its own."""
    import copy

    from fastjudge.models import FeatureCache
    cache = FeatureCache(max_bytes=1 << 30)
    base = load_adapter(str(tiny_toy_dir), feature_cache=cache)
    judge = copy.deepcopy(base)
    assert judge.feature_cache is cache and judge.model is not base.model
    images = _images(2, seed=21)
    base.image_features(images)
    judge.image_features(images)
    assert cache.stats["misses"] == 2 and cache.stats["hits"] == 2
    alone = load_adapter(str(tiny_toy_dir))
    assert alone.feature_cache is not cache and alone.feature_cache.max_bytes > 0
