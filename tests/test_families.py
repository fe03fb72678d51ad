"""The real model families (Llama-3.2-Vision's Mllama, Qwen2-VL, Qwen2.5-VL) through their adapters, on tiny
random-weight checkpoints with local tokenizers that carry each family's chat template (tests/tiny.py); and LLaVA,
a family fastjudge does not ship, added in one module and one registry line (tests/llava_family.py): every test
here is the contract a family meets."""

import inspect
import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

import llava_family  # noqa: F401  (registers the LLaVA family: its one line)
import tiny
from conftest import VLRB_FIXTURE
from fastjudge import data
from fastjudge.config import LoopConfig
from fastjudge.models import FeatureCache, ImageFeatures, load_adapter, mrope_positions
from fastjudge.toy import files as toy_files

FAMILIES = [*tiny.FAMILIES, "llava"]


@pytest.fixture(scope="module", params=FAMILIES)
def checkpoint(request, tmp_path_factory):
    return tiny.build_checkpoint(request.param, tmp_path_factory.mktemp(request.param), seed=0)


def _images(count: int, seed: int) -> list[Image.Image]:
    """Random images of different sizes (Mllama: 1 or 2 tiles; Qwen: 1 to 4 merged tokens)."""
    rs = np.random.RandomState(seed)
    sizes = [(28, 28), (30, 56), (56, 30), (44, 44), (20, 50)]
    return [Image.fromarray(rs.randint(0, 256, (*sizes[i % len(sizes)], 3), dtype=np.uint8)) for i in range(count)]


PROMPTS = ["How many objects?", "What colour is the big shape on the left?", "Describe the image.",
           "Which answer is better? Answer A: two. Answer B: three."]


def _reference_inputs(adapter, image, prompt):
    """One unpadded example as the family's own transformers path takes it: pixels, not cached features."""
    feature = adapter.image_features([image])[0]
    ids = torch.tensor([adapter.prompt_ids(prompt, feature)])
    if adapter.model.config.model_type == "mllama":
        pixels = adapter._pixel_inputs([image])
        cross = torch.zeros(1, ids.shape[1], 1, pixels["pixel_values"].shape[2], dtype=torch.long)
        start = int((ids[0] == adapter.image_token_id).nonzero()[0])
        cross[0, start:, 0, :feature.info[0]] = 1
        return ids, dict(pixels, cross_attention_mask=cross)
    batch = adapter.image_processor(images=[image], return_tensors="pt")
    if adapter.model.config.model_type == "llava":
        return ids, dict(pixel_values=batch["pixel_values"])
    extra = dict(pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"])
    if "mm_token_type_ids" in inspect.signature(adapter.model.forward).parameters:  # transformers >= 5.1x
        extra["mm_token_type_ids"] = (ids == adapter.image_token_id).int()
    return ids, extra


def test_greedy_batch_matches_transformers_generate_per_example(checkpoint):
    adapter = load_adapter(str(checkpoint))
    images = _images(4, seed=1)
    ours = adapter.generate(images, PROMPTS, max_new_tokens=10)
    for (text,), image, prompt in zip(ours, images, PROMPTS):
        ids, extra = _reference_inputs(adapter, image, prompt)
        out = adapter.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=10,
                                     do_sample=False, eos_token_id=sorted(adapter.eos_ids),
                                     pad_token_id=adapter.pad_id, **extra)
        tokens = []
        for t in out[0, ids.shape[1]:].tolist():
            if t in adapter.eos_ids:
                break
            tokens.append(t)
        assert text == adapter.decode(tokens)


def test_sft_loss_is_transformers_loss_on_assistant_tokens_only(checkpoint):
    adapter = load_adapter(str(checkpoint))
    images = _images(3, seed=2)
    targets = ["two red circles", "Answer A is better. [[A]]", "no"]
    losses = []
    for image, prompt, target in zip(images, PROMPTS, targets):
        ids, extra = _reference_inputs(adapter, image, prompt)
        tail = adapter.target_ids(target)
        # the labelled tokens are exactly the target and the chat template's end of turn
        assert adapter.tokenizer.decode(tail[:-1]) == target
        assert tail[-1] == adapter.end_of_turn
        full = torch.cat([ids, torch.tensor([tail])], dim=1)
        labels = torch.full_like(full, -100)
        labels[0, ids.shape[1]:] = torch.tensor(tail)
        if "cross_attention_mask" in extra:  # continue Mllama's mask over the target tokens
            cross = extra["cross_attention_mask"]
            extra = dict(extra, cross_attention_mask=torch.cat([cross, cross[:, -1:].expand(-1, len(tail), -1, -1)], 1))
        if "mm_token_type_ids" in extra:
            extra = dict(extra, mm_token_type_ids=(full == adapter.image_token_id).int())
        with torch.no_grad():
            out = adapter.model(input_ids=full, attention_mask=torch.ones_like(full), labels=labels, **extra)
        losses.append((out.loss.item(), len(tail)))
    # ours: one right-padded batch, mean over all target tokens
    expected = sum(loss * n for loss, n in losses) / sum(n for _, n in losses)
    with torch.no_grad():
        ours = adapter.sft_loss(images, PROMPTS[:3], targets).item()
    assert ours == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_mrope_positions_match_transformers_get_rope_index(family, tmp_path):
    adapter = load_adapter(str(tiny.build_checkpoint(family, tmp_path)))
    images = _images(4, seed=3)
    features = adapter.image_features(images)
    inputs = adapter.model_inputs([adapter.prompt_ids(p, f) for p, f in zip(PROMPTS, features)], features,
                                   left=True)
    mask = inputs["attention_mask"]
    rows = [adapter.prompt_ids(p, f) for p, f in zip(PROMPTS, features)]
    length = max(map(len, rows))
    input_ids = torch.tensor([[adapter.pad_id] * (length - len(r)) + r for r in rows])
    grids = torch.tensor([f.info for f in features])
    kwargs = dict(image_grid_thw=grids, attention_mask=mask)
    if "mm_token_type_ids" in inspect.signature(adapter.model.model.get_rope_index).parameters:
        kwargs["mm_token_type_ids"] = (input_ids == adapter.image_token_id).int()
    reference, _ = adapter.model.model.get_rope_index(input_ids, **kwargs)
    ours = mrope_positions(input_ids, mask, [f.info for f in features], adapter.image_token_id, adapter.merge)
    real = mask.bool()[None].expand(3, -1, -1)
    assert torch.equal(ours[real], reference[real])
    assert torch.equal(inputs["position_ids"][real], reference[real])


def test_feature_cache_encodes_each_image_once_and_bypasses_when_vision_trains(checkpoint):
    adapter = load_adapter(str(checkpoint))
    adapter.feature_cache = FeatureCache(max_bytes=1 << 30)
    images = _images(3, seed=4)
    copies = [im.copy() for im in images]  # other objects, same pixels: same entries
    first = adapter.image_features(images + images)
    assert adapter.feature_cache.stats["misses"] == 3 and len(adapter.feature_cache) == 3
    again = adapter.image_features(copies)
    assert adapter.feature_cache.stats["misses"] == 3
    for a, b in zip(first, again):
        assert torch.equal(a.features, b.features) and a.info == b.info
    # the cached features are what the vision tower computes now, no gradient attached
    fresh = adapter.encode_images(images)
    for a, b in zip(first, fresh):
        assert torch.allclose(a.features, b.features.cpu(), atol=1e-6)
    # vision trains: computed live, with gradients, and the cache is untouched
    adapter.begin_training("all")
    live = adapter.image_features(images)
    assert all(f.features.requires_grad for f in live)
    assert adapter.feature_cache.stats["misses"] == 3
    adapter.end_training()


def test_feature_cache_evicts_least_recently_used_within_its_budget():
    entry = lambda value: ImageFeatures(torch.full((4,), float(value)), (1,))  # 16 bytes each
    cache = FeatureCache(max_bytes=40)
    cache.put(("a", "v"), entry(1))
    cache.put(("b", "v"), entry(2))
    assert cache.get(("a", "v")) is not None  # a is now the most recent
    cache.put(("c", "v"), entry(3))
    assert cache.get(("b", "v")) is None and cache.get(("a", "v")) is not None
    assert cache.stats["evictions"] == 1 and len(cache) == 2
    assert cache.get(("a", "other weights")) is None  # another vision fingerprint is another entry


def test_text_training_freezes_the_vision_tower(checkpoint):
    adapter = load_adapter(str(checkpoint))
    params = adapter.begin_training("text")
    names = {id(p): n for n, p in adapter.model.named_parameters()}
    trained = [names[id(p)] for p in params]
    assert trained and not any(adapter.is_vision(n) for n in trained)
    assert any("vision" in n or "visual" in n for n, _ in adapter.model.named_parameters())
    loss = adapter.sft_loss(_images(2, seed=5), PROMPTS[:2], ["yes", "no"])
    loss.backward()
    grads = {name: p.grad for name, p in adapter.model.named_parameters()}
    assert all(g is None for name, g in grads.items() if adapter.is_vision(name))
    assert any(g is not None and g.abs().sum() > 0 for name, g in grads.items() if not adapter.is_vision(name))
    adapter.end_training()


def test_lora_trains_adapters_then_merges_into_a_plain_checkpoint(checkpoint, tmp_path):
    pytest.importorskip("peft")
    adapter = load_adapter(str(checkpoint))
    keys = set(adapter.model.state_dict())
    images, targets = _images(2, seed=6), ["two", "a red circle"]
    with torch.no_grad():
        before = adapter.sft_loss(images, PROMPTS[:2], targets).item()
    params = adapter.begin_training("lora", lora_rank=4, lora_alpha=8)
    assert params and all("lora_" in n for n, p in adapter.model.named_parameters() if p.requires_grad)
    opt = torch.optim.AdamW(params, lr=2e-2)
    for _ in range(20):
        opt.zero_grad()
        adapter.sft_backward(images, PROMPTS[:2], targets, micro_batches=1)
        opt.step()
    adapter.end_training()
    assert set(adapter.model.state_dict()) == keys  # merged: no LoRA module is left
    with torch.no_grad():
        after = adapter.sft_loss(images, PROMPTS[:2], targets).item()
    assert after < before - 0.1  # LoRA leaves lm_head alone: on random weights it learns slowly
    adapter.save(tmp_path / "merged")
    plain = AutoModelForImageTextToText.from_pretrained(tmp_path / "merged")
    for name, tensor in plain.state_dict().items():
        assert torch.allclose(tensor, adapter.model.state_dict()[name]), name
    reloaded = load_adapter(str(tmp_path / "merged"))
    with torch.no_grad():
        assert reloaded.sft_loss(images, PROMPTS[:2], targets).item() == pytest.approx(after, rel=1e-5)


def test_saved_checkpoint_loads_in_plain_transformers(checkpoint, tmp_path):
    adapter = load_adapter(str(checkpoint))
    adapter.save(tmp_path / "copy")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "copy")
    assert tokenizer.chat_template == adapter.tokenizer.chat_template
    assert type(AutoImageProcessor.from_pretrained(tmp_path / "copy")) is type(adapter.image_processor)
    assert type(AutoModelForImageTextToText.from_pretrained(tmp_path / "copy")) is type(adapter.model)
    images = _images(2, seed=7)
    assert load_adapter(str(tmp_path / "copy")).generate(images, PROMPTS[:2], max_new_tokens=6) == \
        adapter.generate(images, PROMPTS[:2], max_new_tokens=6)


def test_unsupported_model_type_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "paligemma"}))
    with pytest.raises(ValueError, match="model_type 'paligemma' is not supported"):
        load_adapter(str(tmp_path))


def test_iterate_micro_run(checkpoint, tmp_path):
    """A whole `fastjudge iterate` (one iteration, a few prompts) with each family on the CPU."""
    from fastjudge import loop
    prompts = toy_files.write_toy_prompts(tmp_path / "world", count=6, seed=0, closed_fraction=0.5)
    bench = toy_files.write_toy_benchmark(tmp_path / "benchmark", per_category=1)
    cfg = LoopConfig(out=str(tmp_path / "run"), model=str(checkpoint), prompts=str(prompts),
                     bench_data=str(bench), iterations=1, prompts_per_iteration=6, n_samples=4, min_votes=2,
                     answer_tokens=6, judge_tokens=8, batch_rows=16, epochs=1, batch_size=4, min_gain=-1.0)
    summary = loop.run(cfg)
    assert [e["iteration"] for e in summary["iterations"]] == [0, 1]
    for name in ("pairs.jsonl", "judgments.jsonl", "sft.jsonl", "metrics.json", "predictions.jsonl",
                 "outputs.jsonl", "stages.json"):
        assert (tmp_path / "run" / "iter_1" / name).is_file(), name
    checkpoint_dir = tmp_path / "run" / "iter_1" / "checkpoint"
    assert type(AutoModelForImageTextToText.from_pretrained(checkpoint_dir)).__name__ == \
        type(load_adapter(str(checkpoint)).model).__name__
    predictions = data.read_jsonl(tmp_path / "run" / "iter_1" / "predictions.jsonl")
    assert len(predictions) == 5  # k=1 sample for each of the 5 toy benchmark items
    stages = json.loads((tmp_path / "run" / "iter_1" / "stages.json").read_text())
    assert stages["stats"]["eval"]["feature_cache_so_far"]["hits"] > 0


def test_training_stage_on_traces_lowers_the_loss(checkpoint):
    """train.run (the loop's fine-tuning stage) on hand-made traces: a random judge keeps no pair, so the
    micro-run above trains on nothing; this runs the same stage on something to learn."""
    from fastjudge.stages import train
    adapter = load_adapter(str(checkpoint))
    folder = checkpoint.parent / (checkpoint.name + "-traces")
    folder.mkdir(exist_ok=True)
    images = _images(4, seed=8)
    traces = []
    for i, image in enumerate(images):
        path = folder / f"{i}.png"
        image.save(path)
        traces.append({"image": str(path), "prompt": PROMPTS[i], "target": f"reasoning {i}. [[{'AB'[i % 2]}]]"})
    loaded = data.load_images([t["image"] for t in traces])
    with torch.no_grad():
        before = adapter.sft_loss(loaded, [t["prompt"] for t in traces], [t["target"] for t in traces]).item()
    options = LoopConfig(model=str(checkpoint), epochs=8, batch_size=4, lr=3e-3).train_options()
    stats = train.run(adapter, traces, options, seed=0)
    assert stats["steps"] == 8
    with torch.no_grad():
        after = adapter.sft_loss(loaded, [t["prompt"] for t in traces], [t["target"] for t in traces]).item()
    assert after < before * 0.8
    assert not any(p.requires_grad for p in adapter.model.parameters())  # end_training froze it again


def _vlrb_subset(folder, count=4):
    """The first `count` lines of the real VL-RewardBench text (the sample in tests/fixtures), with random images
    where its paths point."""
    lines = VLRB_FIXTURE.read_text().splitlines()[:count]
    for i, line in enumerate(lines):
        target = folder / "images" / json.loads(line)["image_path"]
        target.parent.mkdir(parents=True, exist_ok=True)
        _images(i + 1, seed=i)[-1].save(target)
    (folder / "data.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "data.jsonl", folder / "images"


def _mmrb_fixture(folder):
    rows = []
    for i, (category, prefix) in enumerate([("open_generation/correctness_task", "nocaps"), ("safety", "pairs"),
                                             ("reasoning", "mathvista"), ("vqa", "mmbench")]):
        name = f"images/{i}.png"
        (folder / "images").mkdir(parents=True, exist_ok=True)
        _images(i + 1, seed=10 + i)[-1].save(folder / name)
        rows.append({"ID": f"{prefix}_{i}", "Text": PROMPTS[i], "Image": name, "Output1": f"first {i}",
                     "Output2": f"second {i}", "Better": "Output1" if i % 2 else "Output2", "Category": category})
    (folder / "all_data.json").write_text(json.dumps(rows, indent=1))
    return folder / "all_data.json", folder


@pytest.mark.parametrize("bench", ["vlrewardbench", "mmrb"])
def test_eval_command_writes_predictions_that_score_reproduces(checkpoint, tmp_path, capsys, bench):
    from fastjudge import cli
    data_file, images = (_vlrb_subset if bench == "vlrewardbench" else _mmrb_fixture)(tmp_path)
    out = tmp_path / "eval"
    assert cli.main(["eval", "--bench", bench, "--data", str(data_file), "--images", str(images), "--judge",
                     str(checkpoint), "--k", "3", "--prompt", "benchmark", "--judge-tokens", "5",
                     "--out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    predictions = data.read_jsonl(out / "predictions.jsonl")
    raw = data.read_jsonl(out / "outputs.jsonl")
    assert len(predictions) == 4 * 3 and [p["index"] for p in predictions] == [i for i in range(4) for _ in range(3)]
    assert all(r["verdict"] == p["verdict"] and "output" in r for r, p in zip(raw, predictions))
    assert {p["shown_first"] for p in predictions} == {0, 1}  # seeded random order per sample
    metrics = json.loads((out / "metrics.json").read_text())
    # the benchmark's prompt asks for "Answer 1/2", not our "[[A]]": no verdict probability is read from it
    assert not any("p_first" in p for p in predictions) and "calibration" not in metrics
    assert cli.main(["score", "--format", bench, "--data", str(data_file), "--predictions",
                     str(out / "predictions.jsonl")]) == 2  # 3 samples an item, not declared
    assert "more than k=1" in capsys.readouterr().err
    assert cli.main(["score", "--format", bench, "--data", str(data_file), "--predictions",
                     str(out / "predictions.jsonl"), "--k", "3"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == metrics
    assert printed["overall"] == metrics["overall"]


def test_cached_entries_own_their_memory_and_replacing_a_key_keeps_the_count(checkpoint):
    adapter = load_adapter(str(checkpoint))
    adapter.feature_cache = FeatureCache(max_bytes=1 << 30)
    entries = adapter.image_features(_images(4, seed=9))
    for entry in entries:  # a copy, not a view into the batch's tensor
        assert entry.features.untyped_storage().nbytes() == entry.nbytes
    before = adapter.feature_cache._bytes
    key = next(iter(adapter.feature_cache._entries))
    adapter.feature_cache.put(key, adapter.feature_cache._entries[key])
    assert adapter.feature_cache._bytes == before and len(adapter.feature_cache) == 4


def test_palette_images_hash_by_colour_not_index():
    from fastjudge.models import image_hash
    indices = Image.fromarray(np.arange(16, dtype=np.uint8).reshape(4, 4), mode="P")
    a, b = indices.copy(), indices.copy()
    a.putpalette([i % 256 for i in range(768)])
    b.putpalette([(255 - i) % 256 for i in range(768)])
    assert a.tobytes() == b.tobytes()  # same indices...
    assert image_hash(a) != image_hash(b)  # ...other colours: other features


def test_image_processor_falls_back_to_pil_without_torchvision(checkpoint, monkeypatch):
    import transformers

    from fastjudge.models.chat import _load_image_processor

    def needs_torchvision(*args, **kwargs):
        raise ImportError("requires the torchvision library")

    expected = type(transformers.AutoImageProcessor.from_pretrained(checkpoint))
    monkeypatch.setattr(transformers.AutoImageProcessor, "from_pretrained", needs_torchvision)
    processor = _load_image_processor(checkpoint)
    assert type(processor).__name__.endswith("Pil") and type(processor) is expected


def test_master_weights_keep_small_updates_that_bf16_weights_lose():
    from fastjudge.stages.train import MasterWeights
    torch.manual_seed(0)
    start = (torch.randn(4096) * 0.02).to(torch.bfloat16)
    grads = torch.randn(4096).to(torch.bfloat16)  # what a bf16 model's backward gives

    def steps(params, optimizer_params, weights=None):
        opt = torch.optim.AdamW(optimizer_params, lr=1e-5, weight_decay=0.0)
        for _ in range(50):
            params[0].grad = grads.to(params[0].dtype)
            if weights:
                weights.grads_to_master()
            opt.step()
            if weights:
                weights.master_to_model()

    plain = [torch.nn.Parameter(start.clone())]
    steps(plain, plain)
    mixed = [torch.nn.Parameter(start.clone())]
    weights = MasterWeights(mixed)
    steps(mixed, weights.master, weights)
    reference = [torch.nn.Parameter(start.float())]
    steps(reference, reference)
    assert weights.master[0].dtype == torch.float32
    assert torch.equal(weights.master[0].detach(), reference[0].detach())  # the float32 trajectory, exactly
    assert torch.equal(mixed[0].detach(), reference[0].detach().to(torch.bfloat16))
    moved = lambda p: (p.detach() != start).float().mean().item()
    assert moved(plain[0]) < 0.5 < moved(mixed[0])  # bf16 alone drops most of the 5e-4 total movement
