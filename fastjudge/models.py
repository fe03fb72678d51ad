"""Model adapters: the one small interface that synth, filter, train and eval use.

An adapter owns a model and whatever turns (image, prompt[, target]) into its inputs:
- `generate(images, prompts, n=..., ...) -> list[list[str]]`: n completions per prompt;
- `sft_loss(images, prompts, targets) -> loss`: mean cross-entropy on the target (assistant) tokens only;
- `save(path)`: `save_pretrained` of model and tokenizer/processor, loadable by plain transformers.

`ToyAdapter` drives the toy Mllama with the word-level tokenizer; `MllamaAdapter` a real Llama-3.2-Vision
checkpoint through its processor and chat template.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from fastjudge import toy
from fastjudge.decoding import decode

Progress = Callable[[int], None]
TOY_MARKER = "fastjudge_toy.json"


def _chunks(count: int, size: int):
    for start in range(0, count, size):
        yield start, min(count, start + size)


class Adapter:
    """Shared driver code; subclasses provide `_generation_inputs`, `_training_inputs` and `decode`."""

    model: torch.nn.Module
    judge_style: str = "natural"
    eos_ids: set[int]
    pad_id: int

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def generate(self, images: list[Image.Image], prompts: list[str], *, n: int = 1, max_new_tokens: int = 64,
                 temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                 batch_rows: int = 256, progress: Progress | None = None) -> list[list[str]]:
        """n completions for each (image, prompt); temperature 0 is greedy (then n must be 1).

        Rows are batched so that one forward pass holds at most `batch_rows` sequences (prompts x n).
        Each batch is seeded from (seed, batch index), so a run is reproducible for a fixed batch_rows.
        """
        if len(images) != len(prompts):
            raise ValueError(f"images and prompts: expected the same length, got {len(images)} and {len(prompts)}")
        if n < 1:
            raise ValueError(f"n: expected >= 1, got {n}")
        if temperature < 0:
            raise ValueError(f"temperature: expected >= 0, got {temperature}")
        if temperature == 0 and n > 1:
            raise ValueError("n: greedy decoding (temperature 0) gives one completion per prompt; use n=1")
        self.model.eval()
        out: list[list[str]] = []
        per_batch = max(1, batch_rows // n)
        for batch_index, (start, stop) in enumerate(_chunks(len(prompts), per_batch)):
            inputs = self._generation_inputs(images[start:stop], prompts[start:stop])
            if n > 1:  # every sample its own row (the shared-prefix sampler is issue 4's)
                inputs = {k: v.repeat_interleave(n, dim=0) for k, v in inputs.items()}
            generator = torch.Generator(device=self.device).manual_seed(seed * 1_000_003 + batch_index)
            rows = decode(self.model, inputs, max_new_tokens=max_new_tokens, eos_ids=self.eos_ids,
                          pad_id=self.pad_id, temperature=temperature, top_k=top_k, top_p=top_p,
                          generator=generator)
            texts = [self.decode(row) for row in rows]
            out.extend(texts[i * n:(i + 1) * n] for i in range(stop - start))
            if progress:
                progress(stop - start)
        return out

    def sft_loss(self, images: list[Image.Image], prompts: list[str], targets: list[str],
                 reduction: str = "mean") -> torch.Tensor:
        """Cross-entropy over target tokens (the assistant turn, its end-of-turn token included): their mean,
        or with reduction="sum" their sum."""
        return self._loss(*self._training_inputs(images, prompts, targets), reduction=reduction)

    def _loss(self, inputs: dict[str, torch.Tensor], labels: torch.Tensor, reduction: str) -> torch.Tensor:
        logits = self.model(**inputs).logits  # (B, T, V)
        # predict token t+1 from position t
        return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100,
                               reduction=reduction)

    def sft_backward(self, images: list[Image.Image], prompts: list[str], targets: list[str],
                     micro_batches: int = 3) -> float:
        """Backward of the batch's mean target-token loss, run as `micro_batches` forward passes over
        examples sorted by length; returns the loss. Each pass pads only to its own longest example (in the
        toy mixture one batch holds 30- and 170-token examples: a single padded pass wastes most of its work).
        """
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]) + len(targets[i]))
        size = -(-len(order) // max(1, micro_batches))
        prepared = [self._training_inputs([images[i] for i in group], [prompts[i] for i in group],
                                          [targets[i] for i in group])
                    for group in (order[k:k + size] for k in range(0, len(order), size))]
        total_tokens = sum(int((labels[:, 1:] != -100).sum()) for _, labels in prepared)
        total = 0.0
        for inputs, labels in prepared:
            loss_sum = self._loss(inputs, labels, reduction="sum")
            (loss_sum / total_tokens).backward()
            total += loss_sum.item()
        return total / total_tokens

    def trainable_parameters(self, train: str = "text") -> list[torch.nn.Parameter]:
        """What fine-tuning updates: "text" freezes the vision tower (the default), "all" trains everything."""
        if train not in ("text", "all"):
            raise ValueError(f"train: expected 'text' or 'all', got {train!r}")
        params = []
        for name, p in self.model.named_parameters():
            frozen = train == "text" and "vision_model" in name
            p.requires_grad_(not frozen)
            if not frozen:
                params.append(p)
        return params

    # subclasses
    def _generation_inputs(self, images, prompts) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _training_inputs(self, images, prompts, targets) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        raise NotImplementedError

    def decode(self, tokens: list[int]) -> str:
        raise NotImplementedError

    def save(self, path: Path) -> None:
        raise NotImplementedError


def image_tensor(image: Image.Image, size: int) -> torch.Tensor:
    """(3, size, size) float, scaled to about [-1, 1]."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    if image.size != (size, size):
        image = image.resize((size, size), Image.BILINEAR)
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1)


class ToyAdapter(Adapter):
    """The toy Mllama: sequence = <|image|> <|user|> prompt <|assistant|> target <|eos|>, one 48x48 tile."""

    judge_style = "toy"

    def __init__(self, model, tokenizer):
        self.model = model
        self.tokenizer = tokenizer
        self.pad_id = tokenizer.pad_token_id
        self.eos_ids = {tokenizer.eos_token_id}
        ids = tokenizer.convert_tokens_to_ids
        self._head = [ids(toy.IMAGE_TOKEN), ids("<|user|>")]
        self._assistant = ids("<|assistant|>")
        self._image_size = model.config.vision_config.image_size

    @classmethod
    def load(cls, path: Path | str, dtype: torch.dtype = torch.float32, device: str = "cpu") -> "ToyAdapter":
        from transformers import MllamaForConditionalGeneration
        model = MllamaForConditionalGeneration.from_pretrained(path, dtype=dtype).to(device)
        return cls(model, toy.build_tokenizer())

    def save(self, path: Path) -> None:
        path = Path(path)
        self.model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)
        # marks a toy checkpoint: `load_adapter` then drives it with the word-level tokenizer
        (path / TOY_MARKER).write_text('{"preset": "toy"}\n')

    def _words(self, text: str) -> list[int]:
        return self.tokenizer.convert_tokens_to_ids(toy.normalize_text(text).split())

    def encode_prompt(self, prompt: str) -> list[int]:
        return self._head + self._words(prompt) + [self._assistant]

    def decode(self, tokens: list[int]) -> str:
        return " ".join(self.tokenizer.convert_ids_to_tokens(tokens))

    def _batch(self, images, rows: list[list[int]], left: bool) -> dict[str, torch.Tensor]:
        """Pad token rows into (B, T) ids and mask (left for generation, right for training), plus the image
        inputs; every real token comes after the image token, so every real token sees the image."""
        ids = _pad(rows, self.pad_id, left)
        mask = _pad([[1] * len(row) for row in rows], 0, left)
        pixels = torch.stack([image_tensor(im, self._image_size) for im in images])  # (B, 3, S, S)
        return dict(
            input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
            pixel_values=pixels[:, None, None].to(self.device, self.model.dtype),  # (B, 1 image, 1 tile, 3, S, S)
            aspect_ratio_ids=torch.ones(len(rows), 1, dtype=torch.long, device=self.device),
            aspect_ratio_mask=torch.ones(len(rows), 1, 1, dtype=torch.long, device=self.device),
            cross_attention_mask=mask[:, :, None, None].to(self.device),  # (B, T, 1 image, 1 tile)
        )

    def _generation_inputs(self, images, prompts):
        return self._batch(images, [self.encode_prompt(p) for p in prompts], left=True)

    def _training_inputs(self, images, prompts, targets):
        rows, label_rows = [], []
        for prompt, target in zip(prompts, targets):
            head = self.encode_prompt(prompt)
            tail = self._words(target) + [self.tokenizer.eos_token_id]
            rows.append(head + tail)
            label_rows.append([-100] * len(head) + tail)
        return self._batch(images, rows, left=False), _pad(label_rows, -100, left=False).to(self.device)


def _pad(rows: list[list[int]], value: int, left: bool) -> torch.Tensor:
    """(B, T) int64: each row padded with `value` to the longest row, on the left or on the right."""
    length = max(map(len, rows))
    out = torch.full((len(rows), length), value, dtype=torch.long)
    for i, row in enumerate(rows):
        start = length - len(row) if left else 0
        out[i, start:start + len(row)] = torch.tensor(row, dtype=torch.long)
    return out


class MllamaAdapter(Adapter):
    """A local Llama-3.2-Vision checkpoint (MllamaForConditionalGeneration + its processor and chat template)."""

    judge_style = "natural"

    def __init__(self, model, processor):
        self.model = model
        self.processor = processor
        tokenizer = processor.tokenizer
        if tokenizer.pad_token is None:  # the processor cannot pad a batch without one
            tokenizer.pad_token = tokenizer.eos_token
        self.pad_id = tokenizer.pad_token_id
        eos = model.generation_config.eos_token_id
        eos = eos if isinstance(eos, list) else [eos if eos is not None else tokenizer.eos_token_id]
        self.eos_ids = set(eos)

    @classmethod
    def load(cls, path: Path | str, dtype: torch.dtype = torch.bfloat16, device: str = "cpu") -> "MllamaAdapter":
        from transformers import AutoProcessor, MllamaForConditionalGeneration
        model = MllamaForConditionalGeneration.from_pretrained(path, dtype=dtype).to(device)
        processor = AutoProcessor.from_pretrained(path)
        processor.tokenizer.padding_side = "left"
        return cls(model, processor)

    def save(self, path: Path) -> None:
        self.model.save_pretrained(path)
        self.processor.save_pretrained(path)

    def _chat(self, prompt: str) -> str:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        return self.processor.apply_chat_template(messages, add_generation_prompt=True)

    def decode(self, tokens: list[int]) -> str:
        return self.processor.tokenizer.decode(tokens, skip_special_tokens=True).strip()

    def _generation_inputs(self, images, prompts):
        self.processor.tokenizer.padding_side = "left"
        batch = self.processor(images=[[im] for im in images], text=[self._chat(p) for p in prompts],
                               return_tensors="pt", padding=True, add_special_tokens=False)
        return {k: v.to(self.device) for k, v in batch.items()}

    def _training_inputs(self, images, prompts, targets):
        tokenizer = self.processor.tokenizer
        tokenizer.padding_side = "right"
        heads = [self._chat(p) for p in prompts]
        # the chat template ends an assistant turn with <|eot_id|> (Llama 3), not with <|end_of_text|>
        vocab = tokenizer.get_vocab()
        eos = "<|eot_id|>" if "<|eot_id|>" in vocab else tokenizer.eos_token
        texts = [h + t + eos for h, t in zip(heads, targets)]
        batch = self.processor(images=[[im] for im in images], text=texts, return_tensors="pt", padding=True,
                               add_special_tokens=False)
        labels = batch["input_ids"].clone()
        labels[batch["attention_mask"] == 0] = -100
        for i, (image, head) in enumerate(zip(images, heads)):
            # the prompt's length as the processor itself tokenizes it (it may add a BOS)
            head_len = len(self.processor(images=[[image]], text=[head], add_special_tokens=False)["input_ids"][0])
            labels[i, :head_len] = -100  # loss on the assistant turn only
        tokenizer.padding_side = "left"
        return {k: v.to(self.device) for k, v in batch.items()}, labels.to(self.device)


def load_adapter(model_path: str | None, *, device: str = "cpu") -> Adapter:
    """The toy base model when `model_path` is None, else a local Mllama checkpoint (toy or real)."""
    from fastjudge import assets
    if model_path is None:
        return ToyAdapter.load(assets.base_model_dir(), device=device)
    path = Path(model_path)
    if not path.is_dir() or not (path / "config.json").is_file():
        raise ValueError(f"model: expected a local checkpoint directory with config.json, got {model_path!r}")
    if (path / TOY_MARKER).is_file():
        return ToyAdapter.load(path, device=device)
    return MllamaAdapter.load(path, device=device)
