"""Rates of every stage of the paper's recipe at Llama-3.2-11B-Vision's shapes, ours against the stack a user would
otherwise assemble, written as a rates file for the cost model (`fastjudge cost`).

    python bench/paper_scale.py --preset llama-3.2-11b --device cuda --out bench/results/rates-CARD-DATE.json
    python bench/paper_scale.py --preset tiny                               # the same code on the CPU, tiny

The model is built from the architecture's config with random bf16 weights (no download: tests/tiny.py's
presets). Measured, each the median of --repeats after a warm-up, per GPU:
- image encoding: images per second of the vision tower and projector (one forward per --prompts images): our
  stack's encodings, once per set of vision weights (transformers' are inside its generation rates);
- synth closed: generated tokens per second at n 16 (T 0.6, top-k 50, top-p 0.9): `Adapter.generate`, the
  images' features cached as the loop has them, against transformers' `generate(num_return_sequences=16)`,
  which encodes the pixels in every call;
- synth open + rewrite: the same at n 1 (one answer, then one rewrite, per prompt);
- filter judging: greedy, n 1, from judge prompts of about --judge-prompt-words words (question and two answers);
  evaluation is the same operation and takes the same rate;
- fine-tuning: trained tokens (prompt and target) per second of one forward and backward (the optimizer step left
  out: an 11B model's Adam state does not fit one GPU), vision tower frozen. Ours: `Adapter.sft_backward`
  (packed, the fused loss, the cross-attention kernel and Liger's norms on CUDA, features cached as the loop
  has them after the first epoch); baseline: transformers' model on padded rows with its pixels, the loss by
  Liger's fused linear cross-entropy where liger-kernel is installed, else the logits and torch's
  cross-entropy.
Each generation stage times transformers twice: eagerly with its default dynamic cache, and on its documented
fast path, the static cache with `torch.compile` (`--no-static` skips it): the compile is a warm-up reported apart,
and the compiled path's greedy tokens must equal eager's on the stage's prompts. The rates file's baseline is the
faster transformers setting of each stage (its `setting` names it); both settings' rates are kept under
`transformers_settings`. Every generation runs exactly its token count (end tokens off in both). A table, then
one JSON line; --out writes the rates file (the card, versions and date in it), rewritten after each stage
(marked "partial" until the end) so that a run cut short keeps the stages it measured.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # tiny.py: the models we build
import tiny  # noqa: E402
from fastjudge.core.sampling_params import SamplingParams  # noqa: E402
from fastjudge.models.features import FeatureCache  # noqa: E402
from _env import environment, median_ms, report, save_partial  # noqa: E402

SAMPLING = dict(temperature=0.6, top_k=50, top_p=0.9)
GREEDY = dict(temperature=0.0)
WORDS = ("which answer is better for the picture of two red circles and a blue square on the left the image "
         "shows a small dog next to a wooden bench under a tree").split()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=["tiny", "small", "llama-3.2-11b"], default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--prompts", type=int, default=8, help="prompts per generation call")
    parser.add_argument("--prompt-words", type=int, default=60)
    parser.add_argument("--answer-tokens", type=int, default=32, help="tokens per sample (synth)")
    parser.add_argument("--judge-prompt-words", type=int, default=400)
    parser.add_argument("--judge-tokens", type=int, default=32, help="tokens per judgment (filter)")
    parser.add_argument("--train-examples", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--stages", default="image,closed,open,judge,train")
    parser.add_argument("--no-static", action="store_true",
                        help="skip transformers' static cache with torch.compile (a compile per stage's shapes)")
    parser.add_argument("--out", default=None, help="the rates file to write")
    args = parser.parse_args()

    cuda = args.device.startswith("cuda")
    dtype = torch.bfloat16 if cuda else torch.float32
    adapter = tiny.build_mllama_adapter(args.preset, args.device, dtype, Path("/tmp/fastjudge-paper-scale"))
    # ours generates with the images' features cached, as the loop does with the vision tower frozen (an image is
    # encoded once per set of vision weights: the cost model's image-encoding stage); transformers encodes the
    # pixels in every generate call, inside its rates
    adapter.feature_cache = FeatureCache(max_bytes=8 << 30)
    adapter.eos_ids = set()  # every sample runs its whole token count, in both stacks
    model = adapter.model
    rs = np.random.RandomState(0)
    side = {"tiny": 56, "small": 448, "llama-3.2-11b": 1120}[args.preset]
    images = [Image.fromarray(rs.randint(0, 256, (side, side, 3), dtype=np.uint8)) for _ in range(args.prompts)]

    def texts(words: int) -> list[str]:
        return [f"{i} " + " ".join(WORDS[(i + j) % len(WORDS)] for j in range(words)) for i in range(args.prompts)]

    def timed(fn) -> float:
        fn()  # warm-up: new shapes compile kernels and plan attention on first use
        return median_ms(fn, args.repeats, cuda) / 1e3

    compiled_stages = []  # (stage, theirs, tokens count, greedy eager tokens): timed on the fast path at the end

    def generation(stage: str, prompts: list[str], n: int, tokens: int, sample: bool) -> dict:
        """Generated tokens per second, ours and transformers' (eager), for one batch of prompts at n samples
        each; the stage is queued for transformers' static cache with torch.compile (`fast_path`)."""
        features = adapter.image_features(images)
        rows = [adapter.prompt_ids(p, f) for p, f in zip(prompts, features)]
        length = max(map(len, rows))
        ids = torch.tensor([[adapter.pad_id] * (length - len(r)) + r for r in rows], device=args.device)
        mask = torch.tensor([[0] * (length - len(r)) + [1] * len(r) for r in rows], device=args.device)
        cross = adapter.model_inputs(rows, features, left=True)["cross_attention_mask"]

        def ours():
            params = SamplingParams(n=n, max_new_tokens=tokens, seed=0, **(SAMPLING if sample else GREEDY))
            adapter.generate(images, prompts, params, batch_rows=len(prompts) * n)

        @torch.no_grad()
        def theirs(samples: int = n, greedy: bool = not sample, **cache):
            pixels = {k: v.to(args.device) for k, v in adapter._pixel_inputs(images).items()}
            pixels["pixel_values"] = pixels["pixel_values"].to(dtype)
            options = dict(do_sample=False, temperature=None, top_k=None, top_p=None) if greedy \
                else dict(do_sample=True, **SAMPLING)
            return model.generate(input_ids=ids, attention_mask=mask, cross_attention_mask=cross, **pixels,
                                  num_return_sequences=samples, max_new_tokens=tokens, min_new_tokens=tokens,
                                  eos_token_id=None, pad_token_id=adapter.pad_id, **options, **cache)

        count = len(prompts) * n * tokens
        where = f"{len(prompts)} prompts of {length} tokens, n {n}, {tokens} new tokens each"
        rates = {"ours": {"per_s": count / timed(ours),
                          "source": f"measured: Adapter.generate, the images' features cached, {where}"},
                 "baseline": {"per_s": count / timed(theirs), "setting": "eager",
                              "source": f"measured: transformers generate(num_return_sequences={n}), dynamic cache, "
                                        f"eager, {where}"}}
        if not args.no_static:
            compiled_stages.append((stage, theirs, count, where, theirs(1, greedy=True)))
        return rates

    def fast_path(measured: dict) -> dict:
        """transformers' static cache with `torch.compile(forward)`, timed after every eager column (it replaces
        the model's forward, restored afterwards), for each queued stage: the first call compiles (its time
        reported, not timed; near 0 where an earlier stage compiled the same shapes), the greedy tokens at n 1
        must equal eager's, and the faster setting becomes the stage's baseline. Returns, per stage, both
        settings' rates."""
        settings = {stage: {"eager": rates["baseline"]["per_s"]} for stage, rates in measured.items()
                    if rates["baseline"].get("setting") == "eager"}
        if not compiled_stages:
            return settings
        eager_forward = model.forward
        model.forward = torch.compile(model.forward)
        try:
            for stage, theirs, count, where, eager_tokens in compiled_stages:
                t0 = time.perf_counter()
                theirs(cache_implementation="static")  # compiles for this stage's shapes
                warmup = time.perf_counter() - t0
                equal = bool(torch.equal(theirs(1, greedy=True, cache_implementation="static"), eager_tokens))
                seconds = median_ms(lambda: theirs(cache_implementation="static"), args.repeats, cuda) / 1e3
                settings[stage].update(static_compile=count / seconds, warmup_s=round(warmup, 2), greedy_equal=equal)
                baseline = measured[stage]["baseline"]
                if equal and count / seconds > baseline["per_s"]:
                    measured[stage]["baseline"] = {
                        "per_s": count / seconds, "setting": "static cache + torch.compile",
                        "source": f"measured: transformers generate(num_return_sequences=...), static cache with "
                                  f"torch.compile (the faster setting; eager {baseline['per_s']:,.1f}/s), {where}"}
                print(f"{stage}: transformers static cache + compile {count / seconds:,.1f}/s (eager "
                      f"{settings[stage]['eager']:,.1f}/s), compile {warmup:.1f} s, greedy equal: {equal}", flush=True)
                keep(measured, settings)
        except Exception as failure:  # reported in the result: the eager baselines stand
            for stage, *_ in compiled_stages:
                settings[stage].setdefault("static_compile_failed", repr(failure))
            print(f"static cache + compile failed: {failure!r}", flush=True)
        finally:
            model.forward = eager_forward
        return settings

    measured: dict[str, dict] = {}
    wanted = set(args.stages.split(","))

    def keep(done: dict, settings: dict | None = None) -> None:  # what is measured so far, should the run be cut
        save_partial(args.out, result_of(done, settings or {}, args, cuda))

    if "image" in wanted:
        def encode():
            with torch.no_grad():
                adapter.encode_images(images)
        per_s = len(images) / timed(encode)
        source = f"measured: the vision tower and projector, {len(images)} images of {side}x{side} a forward"
        measured["image encoding"] = {"ours": {"per_s": per_s, "source": source},
                                      "baseline": {"per_s": per_s, "source": source + " (the same forward)"}}
    if "closed" in wanted:
        measured["synth closed"] = generation("synth closed", texts(args.prompt_words), 16, args.answer_tokens,
                                              sample=True)
        keep(measured)
    if "open" in wanted:
        measured["synth open + rewrite"] = generation("synth open + rewrite", texts(args.prompt_words), 1,
                                                      args.answer_tokens, sample=True)
        keep(measured)
    if "judge" in wanted:
        measured["filter judging"] = generation("filter judging", texts(args.judge_prompt_words), 1,
                                                args.judge_tokens, sample=False)
        keep(measured)
    if "train" in wanted:
        measured["fine-tuning"] = fine_tuning(adapter, args, dtype, timed)
        keep(measured)
    settings = fast_path(measured)
    if "filter judging" in measured:
        measured["evaluation"] = {stack: dict(rate, source=rate["source"] + " (filter judging's rate: the same "
                                                                           "operation)")
                                  for stack, rate in measured["filter judging"].items()}

    print(f"{'stage':<24}{'ours /s':>14}{'baseline /s':>14}{'ratio':>8}  baseline setting")
    for stage, rates in measured.items():
        ours, base = rates["ours"]["per_s"], rates["baseline"]["per_s"]
        print(f"{stage:<24}{ours:>14,.1f}{base:>14,.1f}{ours / base:>7.2f}x  {rates['baseline'].get('setting', '')}")
    report(result_of(measured, settings, args, cuda), args.out)


def result_of(measured: dict, settings: dict, args, cuda: bool) -> dict:
    """The rates file: the card, versions and date, each stage's rates, both transformers settings."""
    env = environment()
    return {"bench": "paper_scale", "card": env.get("gpu", env.get("cpu", "cpu")), "date": env["date"],
            "preset": args.preset, "device": args.device, "versions": env.get("versions", {}), "stages": measured,
            "transformers_settings": settings,
            "notes": [f"bench/paper_scale.py --preset {args.preset}: random weights of the architecture's config, "
                      f"{'bf16' if cuda else 'float32'}; the baseline of each generation stage is the faster of "
                      "transformers' eager generate and its static cache with torch.compile"
                      + (" (--no-static: eager only)" if args.no_static else "")]}


def fine_tuning(adapter, args, dtype, timed) -> dict:
    """Trained tokens per second of one forward and backward, ours (packed, fused) against transformers'."""
    from fastjudge.data import prompts as prompt_texts
    rs = np.random.RandomState(1)
    side = {"tiny": 56, "small": 448, "llama-3.2-11b": 1120}[args.preset]
    count = args.train_examples
    images = [Image.fromarray(rs.randint(0, 256, (side, side, 3), dtype=np.uint8)) for _ in range(count)]
    # judge traces of uneven length, as the filter keeps them: a question, two answers, reasoning and verdict
    answers = [" ".join(WORDS[(i + j) % len(WORDS)] for j in range(20 + 37 * (i % 5))) for i in range(2 * count)]
    prompts = [prompt_texts.judge_prompt(f"question {i} about the picture", answers[2 * i], answers[2 * i + 1],
                                         adapter.judge_style) for i in range(count)]
    targets = [" ".join(WORDS[(i + j) % len(WORDS)] for j in range(40 + 29 * (i % 4))) + " [[A]]"
               for i in range(count)]
    heads = [adapter.prompt_ids(p, None) for p in prompts]
    tails = [adapter.target_ids(t) for t in targets]
    tokens = sum(len(h) + len(t) for h, t in zip(heads, tails))
    model = adapter.model
    device = adapter.device

    adapter.begin_training("text")  # on CUDA: Liger's norms, SwiGLU and RoPE, the cross-attention kernel
    adapter.image_features(images)  # cached, as after the first epoch

    def ours():
        for p in model.parameters():
            p.grad = None
        adapter.sft_backward(images, prompts, targets, micro_batches=2, pack=True)

    ours_s = timed(ours)
    adapter.end_training()

    # baseline: transformers' own forward on padded rows with the pixels, the loss from the last hidden states
    fused, loss_name = None, "logits and torch cross-entropy (no liger-kernel here)"
    if device.type != "cuda":
        loss_name = "logits and torch cross-entropy (Liger's fused loss runs on GPUs only)"
    else:
        try:
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
            fused, loss_name = LigerFusedLinearCrossEntropyLoss(), "Liger's fused linear cross-entropy"
        except ImportError:
            pass
    for name, p in model.named_parameters():
        p.requires_grad_(not adapter.is_vision(name))
    model.train()
    rows = [h + t for h, t in zip(heads, tails)]
    length = max(map(len, rows))
    ids = torch.tensor([r + [adapter.pad_id] * (length - len(r)) for r in rows], device=device)
    mask = torch.tensor([[1] * len(r) + [0] * (length - len(r)) for r in rows], device=device)
    labels = torch.tensor([[-100] * len(h) + t + [-100] * (length - len(h) - len(t)) for h, t in zip(heads, tails)],
                          device=device)
    pixels = {k: v.to(device) for k, v in adapter._pixel_inputs(images).items()}
    pixels["pixel_values"] = pixels["pixel_values"].to(dtype)
    valid = pixels["aspect_ratio_mask"].sum(dim=(1, 2)).tolist()
    cross = adapter._text_inputs(rows, pixels["pixel_values"].shape[2], valid, left=False)["cross_attention_mask"]
    half = (count + 1) // 2  # two micro-batches, as ours

    def theirs():
        for p in model.parameters():
            p.grad = None
        for start in (0, half):
            part = slice(start, min(count, start + half))
            hidden = model.model(input_ids=ids[part], attention_mask=mask[part], cross_attention_mask=cross[part],
                                 **{k: v[part] for k, v in pixels.items()}).last_hidden_state
            shifted, target = hidden[:, :-1].reshape(-1, hidden.shape[-1]), labels[part, 1:].reshape(-1)
            head = model.get_output_embeddings()
            if fused is not None:
                loss = fused(head.weight, shifted, target)
            else:
                loss = torch.nn.functional.cross_entropy(head(shifted).float(), target)
            loss.backward()

    theirs_s = timed(theirs)
    for p in model.parameters():
        p.requires_grad_(False)
        p.grad = None
    model.eval()
    where = f"{count} judge traces, {tokens} tokens, 2 micro-batches, forward and backward (no optimizer step)"
    return {"ours": {"per_s": tokens / ours_s,
                     "source": f"measured: Adapter.sft_backward packed, fused loss, features cached; {where}"},
            "baseline": {"per_s": tokens / theirs_s, "setting": "eager",
                         "source": f"measured: transformers' forward on padded rows with pixels, {loss_name}; {where}"}}


if __name__ == "__main__":
    main()
