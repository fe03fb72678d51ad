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
Every generation runs exactly its token count (end tokens off in both). A table, then one JSON line; --out
writes the rates file (the card, versions and date in it).
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
from fastjudge.models.features import FeatureCache  # noqa: E402
from _env import environment, median_ms, report  # noqa: E402

SAMPLING = dict(temperature=0.6, top_k=50, top_p=0.9)
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

    def generation(prompts: list[str], n: int, tokens: int, sample: bool) -> dict:
        """Generated tokens per second, ours and transformers', for one batch of prompts at n samples each."""
        features = adapter.image_features(images)
        rows = [adapter.prompt_ids(p, f) for p, f in zip(prompts, features)]
        length = max(map(len, rows))
        ids = torch.tensor([[adapter.pad_id] * (length - len(r)) + r for r in rows], device=args.device)
        mask = torch.tensor([[0] * (length - len(r)) + [1] * len(r) for r in rows], device=args.device)
        cross = adapter.model_inputs(rows, features, left=True)["cross_attention_mask"]
        sampling = SAMPLING if sample else dict(temperature=0.0)

        def ours():
            adapter.generate(images, prompts, n=n, max_new_tokens=tokens, seed=0, batch_rows=len(prompts) * n,
                             **sampling)

        @torch.no_grad()
        def theirs():
            pixels = {k: v.to(args.device) for k, v in adapter._pixel_inputs(images).items()}
            pixels["pixel_values"] = pixels["pixel_values"].to(dtype)
            model.generate(input_ids=ids, attention_mask=mask, cross_attention_mask=cross, **pixels,
                           do_sample=sample, num_return_sequences=n, max_new_tokens=tokens, min_new_tokens=tokens,
                           eos_token_id=None, pad_token_id=adapter.pad_id, **(SAMPLING if sample else {}))

        count = len(prompts) * n * tokens
        where = f"{len(prompts)} prompts of {length} tokens, n {n}, {tokens} new tokens each"
        return {"ours": {"per_s": count / timed(ours),
                         "source": f"measured: Adapter.generate, the images' features cached, {where}"},
                "baseline": {"per_s": count / timed(theirs),
                             "source": f"measured: transformers generate(num_return_sequences={n}), {where}"}}

    measured: dict[str, dict] = {}
    wanted = set(args.stages.split(","))
    if "image" in wanted:
        def encode():
            with torch.no_grad():
                adapter.encode_images(images)
        per_s = len(images) / timed(encode)
        source = f"measured: the vision tower and projector, {len(images)} images of {side}x{side} a forward"
        measured["image encoding"] = {"ours": {"per_s": per_s, "source": source},
                                      "baseline": {"per_s": per_s, "source": source + " (the same forward)"}}
    if "closed" in wanted:
        measured["synth closed"] = generation(texts(args.prompt_words), 16, args.answer_tokens, sample=True)
    if "open" in wanted:
        measured["synth open + rewrite"] = generation(texts(args.prompt_words), 1, args.answer_tokens, sample=True)
    if "judge" in wanted:
        measured["filter judging"] = generation(texts(args.judge_prompt_words), 1, args.judge_tokens, sample=False)
        measured["evaluation"] = {stack: {"per_s": rate["per_s"],
                                          "source": rate["source"] + " (filter judging's rate: the same operation)"}
                                  for stack, rate in measured["filter judging"].items()}
    if "train" in wanted:
        measured["fine-tuning"] = fine_tuning(adapter, args, dtype, timed)

    print(f"{'stage':<24}{'ours /s':>14}{'baseline /s':>14}{'ratio':>8}")
    for stage, rates in measured.items():
        ours, base = rates["ours"]["per_s"], rates["baseline"]["per_s"]
        print(f"{stage:<24}{ours:>14,.1f}{base:>14,.1f}{ours / base:>7.2f}x")
    env = environment()
    result = {"card": env.get("gpu", env.get("cpu", "cpu")), "date": env["date"], "preset": args.preset,
              "device": args.device, "versions": env.get("versions", {}), "stages": measured,
              "notes": [f"bench/paper_scale.py --preset {args.preset}: random weights of the architecture's config, "
                        f"{'bf16' if cuda else 'float32'}"]}
    report({"bench": "paper_scale"} | result, args.out)


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
            "baseline": {"per_s": tokens / theirs_s,
                         "source": f"measured: transformers' forward on padded rows with pixels, {loss_name}; {where}"}}


if __name__ == "__main__":
    main()
