"""The toy Mllama's adapter: our shapes-world model with a word-level tokenizer, and the shipped base.

The toy checkpoint is a plain transformers Mllama folder plus `fastjudge_toy.json`, which marks it for this
adapter. Texts are space-separated words with punctuation split off (`normalize_text`); the tokenizer is the
checkpoint's own (built by `fastjudge.toy.model.build_tokenizer`).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fastjudge.models.mllama import MllamaFamily

TOY_MARKER = "fastjudge_toy.json"
IMAGE_TOKEN = "<|image|>"
# the shipped toy base model: package data (`fastjudge toy-pretrain` writes a new one)
BASE_MODEL_DIR = Path(__file__).resolve().parent.parent / "toy" / "base"
_SPLIT = re.compile(r"(\[\[|\]\]|[,.?:()])")


def normalize_text(text: str) -> str:
    """Split punctuation off and collapse white space: "a red circle." -> "a red circle ."."""
    return " ".join(_SPLIT.sub(r" \1 ", text).split())


def base_model_dir() -> Path:
    """The shipped toy base model."""
    if not (BASE_MODEL_DIR / "config.json").is_file():
        raise ValueError(f"toy base model: no checkpoint at {BASE_MODEL_DIR}; build one with "
                         f"`fastjudge toy-pretrain --out runs/toy-base` and pass --model runs/toy-base/checkpoint")
    return BASE_MODEL_DIR


class ToyAdapter(MllamaFamily):
    """The toy Mllama: sequence = <|image|> <|user|> prompt <|assistant|> target <|eos|>, one 48x48 tile."""

    judge_style = "toy"

    def __init__(self, model, tokenizer):
        self.model = model
        self.tokenizer = tokenizer
        self.pad_id = tokenizer.pad_token_id
        self.eos_ids = {tokenizer.eos_token_id}
        ids = tokenizer.convert_tokens_to_ids
        self.image_token_id = ids(IMAGE_TOKEN)
        self._head = [self.image_token_id, ids("<|user|>")]
        self._assistant = ids("<|assistant|>")
        self._image_size = model.config.vision_config.image_size

    @classmethod
    def load(cls, path: Path | str, dtype: torch.dtype = torch.float32, device: str = "cpu") -> "ToyAdapter":
        from transformers import MllamaForConditionalGeneration, PreTrainedTokenizerFast
        model = MllamaForConditionalGeneration.from_pretrained(path, dtype=dtype).to(device)
        tokenizer = PreTrainedTokenizerFast.from_pretrained(path)  # the word-level tokenizer saved with it
        return cls(model.requires_grad_(False), tokenizer)  # `begin_training` chooses what trains

    def save(self, path: Path) -> None:
        path = Path(path)
        self.model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)
        # marks a toy checkpoint: `load_adapter` then drives it with the word-level tokenizer
        (path / TOY_MARKER).write_text('{"preset": "toy"}\n')

    def _words(self, text: str) -> list[int]:
        return self.tokenizer.convert_tokens_to_ids(normalize_text(text).split())

    def encode_prompt(self, prompt: str) -> list[int]:
        return self._head + self._words(prompt) + [self._assistant]

    def prompt_ids(self, prompt, image):
        return self.encode_prompt(prompt)

    def prompt_tokens(self, prompt: str) -> int:
        return len(self.encode_prompt(prompt))

    def target_ids(self, target):
        return self._words(target) + [self.tokenizer.eos_token_id]

    def decode(self, tokens: list[int]) -> str:
        return " ".join(self.tokenizer.convert_ids_to_tokens(tokens))

    def join_prefix(self, prefix: str, completion: str) -> str:
        return " ".join(part for part in (normalize_text(prefix), completion) if part)

    def token_pieces(self) -> list[str]:
        return [" " + token for token in self.tokenizer.convert_ids_to_tokens(list(range(len(self.tokenizer))))]

    def preprocessing(self):
        return f"toy image_tensor {self._image_size}"

    def _pixel_inputs(self, images):
        pixels = torch.stack([image_tensor(im, self._image_size) for im in images])  # (N, 3, S, S)
        n = len(images)
        return dict(pixel_values=pixels[:, None, None], aspect_ratio_ids=torch.ones(n, 1, dtype=torch.long),
                    aspect_ratio_mask=torch.ones(n, 1, 1, dtype=torch.long))


def image_tensor(image: Image.Image, size: int) -> torch.Tensor:
    """(3, size, size) float, scaled to about [-1, 1]."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    if image.size != (size, size):
        image = image.resize((size, size), Image.BILINEAR)
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1)
