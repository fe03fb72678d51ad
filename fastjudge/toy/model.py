"""The toy preset: a word-level tokenizer for the shapes world and a small MllamaForConditionalGeneration.

The toy model has the paper's architecture (an Mllama vision tower, cross-attention layers into a Llama text
model) at a size that trains on a 2-core CPU. Its vocabulary is every word the shapes world writes, plus the
judge's words; texts are space-separated words (see `normalize_text`).
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import MllamaConfig, MllamaForConditionalGeneration, PreTrainedTokenizerFast

from fastjudge.models.toy import IMAGE_TOKEN, normalize_text
from fastjudge.toy import world

SPECIAL_TOKENS = ("<|pad|>", "<|unk|>", IMAGE_TOKEN, "<|user|>", "<|assistant|>", "<|eos|>")
_WORDS = (
    "a an the is are at of in to with and or which what where how many objects object image answer answers",
    "describe list . , ? : ( ) [[ ]] A B a b c yes no left right top bottom center above below",
    "colour shape size there judge question better my verdict reference text matches rewrite this exactly one",
    "error same different match",
)
# Words from the world's constants, so a new colour or shape cannot silently become <|unk|>.
VOCAB = list(SPECIAL_TOKENS) + sorted(
    set(" ".join(_WORDS).split())
    | set(world.SHAPES) | set(world.COLOURS) | set(world.SIZES) | set(world.DIGITS)
    | {w for name in world.POSITIONS.values() for w in name.split()}
    | {w for text in world.OPEN_INSTRUCTIONS for w in text.split()}
)
__all__ = ["IMAGE_TOKEN", "SPECIAL_TOKENS", "VOCAB", "build_config", "build_model", "build_tokenizer",
           "normalize_text"]


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer over `VOCAB`, wrapped so that `save_pretrained` writes a plain HF tokenizer."""
    vocab = {word: i for i, word in enumerate(VOCAB)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|unk|>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<|pad|>", unk_token="<|unk|>", eos_token="<|eos|>",
        additional_special_tokens=[IMAGE_TOKEN, "<|user|>", "<|assistant|>"],
    )


def build_config(tokenizer: PreTrainedTokenizerFast, *, text_hidden: int = 128, text_layers: int = 8,
                 cross_layers: tuple[int, ...] = (1, 5), vision_hidden: int = 128) -> MllamaConfig:
    """The toy Mllama: 48x48 images in one tile, 16x16 patches (9 patches + CLS), 2 local + 1 global vision
    layers; a Llama text model of `text_layers` layers of which `cross_layers` are cross-attention layers."""
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    vision = dict(
        hidden_size=vision_hidden, num_hidden_layers=2, num_global_layers=1, attention_heads=4,
        intermediate_size=vision_hidden * 4, vision_output_dim=vision_hidden * 2, image_size=world.IMAGE_SIZE,
        patch_size=world.CELL, max_num_tiles=1, intermediate_layers_indices=[0], supported_aspect_ratios=[[1, 1]],
    )
    text = dict(
        vocab_size=len(tokenizer), hidden_size=text_hidden, num_hidden_layers=text_layers,
        num_attention_heads=4, num_key_value_heads=2, intermediate_size=text_hidden * 3,
        cross_attention_layers=list(cross_layers), max_position_embeddings=512, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        bos_token_id=pad, eos_token_id=eos, pad_token_id=pad, tie_word_embeddings=False,
    )
    return MllamaConfig(vision_config=vision, text_config=text,
                        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))


def build_model(config: MllamaConfig, seed: int = 0) -> MllamaForConditionalGeneration:
    """A fresh random-weight toy model. Cross-attention gates start at 0.5, not transformers' 0: at 0 a model
    trained from scratch learns to ignore the image (measured when the toy world was designed)."""
    torch.manual_seed(seed)
    model = MllamaForConditionalGeneration(config)
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            if hasattr(layer, "cross_attn_attn_gate"):
                layer.cross_attn_attn_gate.fill_(0.5)
                layer.cross_attn_mlp_gate.fill_(0.5)
    return model
