"""Real checkpoints: a tokenizer with a chat template and an image processor, loaded from a local folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from fastjudge.models.adapter import Adapter


class ChatAdapter(Adapter):
    """A local checkpoint driven through its tokenizer's chat template and its image processor."""

    def __init__(self, model, tokenizer, image_processor, source: Path | None = None,
                 chat_template: str | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.source = source
        self.chat_template = chat_template or tokenizer.chat_template
        if self.chat_template is None:
            raise ValueError(f"model: the tokenizer of {source or 'the model'} has no chat template")
        # batches need a pad token; its value never reaches the loss (masked) or the output
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.end_of_turn = self._end_of_turn_id()
        eos = model.generation_config.eos_token_id
        eos = eos if isinstance(eos, list) else [eos] if eos is not None else []
        self.eos_ids = set(eos) | {self.end_of_turn}

    @classmethod
    def load(cls, path: Path | str, model_class: str, dtype: torch.dtype = torch.bfloat16,
             device: str = "cpu") -> "ChatAdapter":
        """Model (transformers class `model_class`), tokenizer and image processor from a local folder."""
        import transformers
        from transformers import AutoTokenizer
        path = Path(path)
        model = getattr(transformers, model_class).from_pretrained(path, dtype=dtype).to(device)
        model.requires_grad_(False)  # `begin_training` chooses what trains
        tokenizer = AutoTokenizer.from_pretrained(path)
        # older checkpoints keep the chat template beside the processor
        return cls(model, tokenizer, _load_image_processor(path), source=path,
                   chat_template=tokenizer.chat_template or _read_chat_template(path))

    def save(self, path: Path) -> None:
        path = Path(path)
        self.model.save_pretrained(path)
        if self.tokenizer.chat_template is None:  # the saved tokenizer carries the template we used
            self.tokenizer.chat_template = self.chat_template
        self.tokenizer.save_pretrained(path)
        self.image_processor.save_pretrained(path)
        # what else made the source a processor checkpoint (processor/video configs), so AutoProcessor loads it
        if self.source is not None:
            for name in ("processor_config.json", "video_preprocessor_config.json", "chat_template.json"):
                if (self.source / name).is_file() and not (path / name).exists():
                    shutil.copy(self.source / name, path / name)

    def preprocessing(self):
        return self.image_processor.to_json_string()

    def prompt_ids(self, prompt, image):
        return self.templated_ids(self._chat(prompt), image)

    def prompt_tokens(self, prompt: str) -> int:
        return len(self.tokenizer.encode(self._chat(prompt), add_special_tokens=False))

    def _template_markers(self) -> list[str]:
        """The special tokens the chat template writes around a user turn with an image (headers, the image
        token): text that holds one is already templated."""
        if getattr(self, "_markers", None) is None:
            probe = "FASTJUDGE_PROMPT_PROBE"
            text = self._chat(probe)
            special = set(self.tokenizer.all_special_tokens) | {
                token.content for token in self.tokenizer.added_tokens_decoder.values() if token.special}
            self._markers = sorted(token for token in special if token and token in text)
        return self._markers

    @property
    def image_marker(self) -> str:
        """The chat template's image token as text (Llama 3.2: <|image|>, Qwen: <|image_pad|>)."""
        return self.tokenizer.convert_ids_to_tokens(self.image_token_id)

    def check_prompt(self, index: int, prompt: str, templated: bool) -> None:
        if templated:
            count = prompt.count(self.image_marker)
            if count != 1:
                raise ValueError(f"prompts[{index}]: templated=True expects text through the chat template with "
                                 f"one image token {self.image_marker}, found {count}")
            return
        found = [marker for marker in self._template_markers() if marker in prompt]
        if found:
            raise ValueError(f"prompts[{index}]: holds the chat template's {', '.join(found)}: this text is already "
                             f"templated; pass templated=True, or the user's text alone")

    def _chat(self, prompt: str) -> str:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False,
                                                  chat_template=self.chat_template)

    def _end_of_turn_id(self) -> int:
        """The token the chat template closes an assistant turn with (Llama 3: <|eot_id|>, Qwen: <|im_end|>):
        the first special token after an assistant message; the tokenizer's EOS if there is none."""
        marker = "FASTJUDGE_END_PROBE"
        messages = [{"role": "user", "content": [{"type": "text", "text": "q"}]},
                    {"role": "assistant", "content": [{"type": "text", "text": marker}]}]
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, chat_template=self.chat_template)
        after = self.tokenizer.encode(text[text.rindex(marker) + len(marker):], add_special_tokens=False)
        special = set(self.tokenizer.all_special_ids) | set(self.tokenizer.added_tokens_decoder)
        return next((t for t in after if t in special), self.tokenizer.eos_token_id)

    def target_ids(self, target):
        return self.tokenizer.encode(target, add_special_tokens=False) + [self.end_of_turn]

    def decode(self, tokens: list[int]) -> str:
        return self.decode_raw(tokens).strip()

    def decode_raw(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def token_pieces(self) -> list[str]:
        return self.tokenizer.batch_decode([[i] for i in range(len(self.tokenizer))], skip_special_tokens=True,
                                           clean_up_tokenization_spaces=False)


def _load_image_processor(path: Path):
    """AutoImageProcessor, or, where it needs torchvision and there is none (transformers 5.17), the family's
    PIL processor (`<image_processor_type>Pil`)."""
    import transformers
    try:
        return transformers.AutoImageProcessor.from_pretrained(path)
    except ImportError as exc:
        if (path / "preprocessor_config.json").is_file():
            config = json.loads((path / "preprocessor_config.json").read_text())
        else:  # saved by a processor: the image processor's settings sit inside processor_config.json
            config = json.loads((path / "processor_config.json").read_text()).get("image_processor", {})
        name = config.get("image_processor_type", "").removesuffix("Fast") + "Pil"
        if not hasattr(transformers, name):
            raise ValueError(f"model: {path}: its image processor needs torchvision ({exc}); install torchvision")
        kwargs = {k: v for k, v in config.items() if k not in ("image_processor_type", "processor_class")}
        return getattr(transformers, name)(**kwargs)


def _read_chat_template(path: Path) -> str | None:
    if (path / "chat_template.jinja").is_file():
        return (path / "chat_template.jinja").read_text()
    if (path / "chat_template.json").is_file():
        return json.loads((path / "chat_template.json").read_text()).get("chat_template")
    return None
