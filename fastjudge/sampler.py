"""Sampling: the shared-prefix generation engine as a drop-in, token sampling, and voting.

    from fastjudge.sampler import generate
    completions = generate(model, processor, images, prompts, n=16, temperature=0.6, top_k=50, top_p=0.9)

`generate` works with any supported Hugging Face VLM (Llama-3.2-Vision's `MllamaForConditionalGeneration`,
Qwen2-VL, Qwen2.5-VL) and its processor (or any object with `.tokenizer` and `.image_processor`). A prompt is
either the user's text (the default: one user turn, the image then the text, put through the chat template) or,
with `templated=True`, text already through the template as the processor takes it:

    chat = processor.apply_chat_template(messages, add_generation_prompt=True)
    completions = generate(model, processor, images, [chat], templated=True)

Text of the other form is refused (ValueError naming the prompt): templated text passed as raw would be
templated twice. Each image is encoded once and
each prompt prefilled once; its n samples share that work (`fastjudge.engine.decoding.decode_groups`).
"""

from __future__ import annotations

from PIL import Image

from fastjudge.core.sampling import sample_logits, sample_logits_reference
from fastjudge.core.voting import Vote, majority_vote, majority_vote_reference, normalize_answer
from fastjudge.engine.options import DecodeOptions
from fastjudge.models import FAMILIES

__all__ = ["Vote", "adapter_for", "generate", "majority_vote", "majority_vote_reference", "normalize_answer",
           "sample_logits", "sample_logits_reference"]


def adapter_for(model, processor):
    """The fastjudge adapter that drives `model` with `processor` (its tokenizer, image processor and chat
    template); nothing of either is modified, and no feature cache is kept between calls."""
    model_type = getattr(model.config, "model_type", None)
    if model_type not in FAMILIES:
        raise ValueError(f"model: model_type {model_type!r} is not supported (supported: {', '.join(FAMILIES)})")
    tokenizer = getattr(processor, "tokenizer", None)
    image_processor = getattr(processor, "image_processor", None)
    if tokenizer is None or image_processor is None:
        raise ValueError("processor: expected an object with .tokenizer and .image_processor (an AutoProcessor)")
    chat_template = getattr(processor, "chat_template", None) or tokenizer.chat_template
    return FAMILIES[model_type][0](model, tokenizer, image_processor, chat_template=chat_template)


def generate(model, processor, images: list[Image.Image], prompts: list[str], *, n: int = 1,
             max_new_tokens: int = 256, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             min_p: float = 0.0, seed: int = 0, stop: list[str] | None = None,
             batch_rows: int = 64, slots: int | None = None, early_stop: float = 0.0,
             min_votes: int = 1, templated: bool = False,
             options: DecodeOptions | None = None) -> list[list[str]]:
    """n decoded completions for each (image, prompt), as a list per prompt. prompts: the user's text, or with
    templated=True text already through the chat template (module docstring). options: how decoding runs
    (`fastjudge.engine.options.DecodeOptions`; default: from the environment, as every adapter's).

    temperature 0 is greedy (n must then be 1) and gives exactly the tokens of transformers' greedy
    `generate` on the same model. Sampling is reproducible for a fixed seed and batch_rows. A completion ends
    at the chat template's end-of-turn (or the model's EOS) or just before the first `stop` string.

    Closed-ended prompts on Llama-3.2-Vision may stop early: with `early_stop` (a confidence in (0, 1]) each
    prompt decodes `slots` samples at a time and stops once the device vote over the samples' final answers
    ("answer is X", "Answer: X") is settled (docs/sampler.md, "Voting on the device"); a prompt then gets between
    1 and n completions.
    """
    if not isinstance(images, (list, tuple)) or not isinstance(prompts, (list, tuple)):
        raise ValueError("images and prompts: expected lists (one image per prompt)")
    return adapter_for(model, processor).generate(
        list(images), list(prompts), n=n, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
        top_p=top_p, min_p=min_p, seed=seed, stop=stop, batch_rows=batch_rows, slots=slots,
        early_stop=early_stop, min_votes=min_votes, templated=templated, options=options)
