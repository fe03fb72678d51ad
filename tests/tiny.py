"""Tiny random-weight checkpoints of the real model families, for tests and smoke runs (nothing is downloaded).

`build_checkpoint(family, folder)` writes a folder that plain transformers loads like the real thing:
config, weights, a byte-level BPE tokenizer trained here on a few sentences, the family's chat template, and
its image processor (the PIL one: no torchvision needed). Families:
- "mllama": MllamaForConditionalGeneration (Llama-3.2-Vision's architecture and chat format), 28x28 tiles,
  up to 2 tiles per image;
- "qwen2_vl" / "qwen2_5_vl": Qwen2-VL / Qwen2.5-VL with their chat format, 14x14 patches merged 2x2;
- "llava": LlavaForConditionalGeneration (CLIP tower, Llama text model), 28x28 images of 4 patches. fastjudge has
  no LLaVA family: tests/llava_family.py adds one, as a user would (one module, one registry line).

`build_mllama_adapter(preset)` builds the benchmarks' random-weight Mllamas (up to Llama-3.2-11B-Vision's shapes)
with the same tokenizer and chat template: the one place for the models that tests and benches build.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

FAMILIES = ("mllama", "qwen2_vl", "qwen2_5_vl")

# Llama 3.2 Vision's chat format: a user turn holds the image token, then the text.
LLAMA_CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}{%- else %}"
    "{%- for part in message['content'] %}"
    "{%- if part['type'] == 'image' %}{{- '<|image|>' }}{%- elif part['type'] == 'text' %}{{- part['text'] }}"
    "{%- endif %}{%- endfor %}{%- endif %}"
    "{{- '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
# Qwen2-VL's chat format: a default system turn; an image is <|vision_start|><|image_pad|><|vision_end|>.
QWEN_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] != 'system' %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}{%- else %}"
    "{%- for part in message['content'] %}"
    "{%- if part['type'] == 'image' %}{{- '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif part['type'] == 'text' %}{{- part['text'] }}{%- endif %}{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
LLAMA_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                  "<|image|>", "<|finetune_right_pad_id|>"]
# LLaVA-1.5's chat format: "USER: <image>\n... ASSISTANT:", an assistant turn closed by </s>
LLAVA_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- 'USER: ' if message['role'] == 'user' else 'ASSISTANT: ' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}{%- else %}"
    "{%- for part in message['content'] %}"
    "{%- if part['type'] == 'image' %}{{- '<image>\n' }}{%- elif part['type'] == 'text' %}{{- part['text'] }}"
    "{%- endif %}{%- endfor %}{%- endif %}"
    "{{- '</s>' if message['role'] == 'assistant' else ' ' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- 'ASSISTANT:' }}{%- endif %}"
)
LLAVA_SPECIALS = ["<s>", "</s>", "<image>", "<pad>"]
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                 "<|image_pad|>", "<|video_pad|>"]
_CORPUS = (
    "Please act as an impartial judge and evaluate the two answers to the question about the image. "
    "Answer A is better. Answer B is better. Overall Judgment: Answer 1 is better. [[A]] [[B]] "
    "There are 3 red circles and a blue square on the left, a green triangle at the top right. "
    "How many objects are in the image? What colour is the small shape? Which answer is more accurate?"
)


def build_tokenizer(specials: list[str], vocab_size: int = 320, **tokens: str) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (any text encodes) trained on a few sentences, with `specials` as single
    tokens; `tokens` names the roles (bos_token=..., eos_token=..., pad_token=...)."""
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    core.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=core, **tokens)


def _mllama(folder: Path, seed: int) -> None:
    from transformers import MllamaConfig, MllamaForConditionalGeneration, MllamaProcessor
    from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil
    tokenizer = build_tokenizer(LLAMA_SPECIALS, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                pad_token="<|finetune_right_pad_id|>")
    tokenizer.chat_template = LLAMA_CHAT_TEMPLATE
    ids = tokenizer.convert_tokens_to_ids
    config = MllamaConfig(
        vision_config=dict(hidden_size=32, num_hidden_layers=2, num_global_layers=1, attention_heads=2,
                           intermediate_size=64, vision_output_dim=64, image_size=28, patch_size=14,
                           max_num_tiles=2, intermediate_layers_indices=[0],
                           supported_aspect_ratios=[[1, 1], [1, 2], [2, 1]]),
        text_config=dict(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=128, cross_attention_layers=[1],
                         max_position_embeddings=4096, bos_token_id=ids("<|begin_of_text|>"),
                         eos_token_id=[ids("<|end_of_text|>"), ids("<|eot_id|>")],
                         pad_token_id=ids("<|finetune_right_pad_id|>"), tie_word_embeddings=False),
        image_token_index=ids("<|image|>"))
    torch.manual_seed(seed)
    model = MllamaForConditionalGeneration(config)
    with torch.no_grad():  # open the cross-attention gates (0 at init) so that the image matters
        for layer in model.model.language_model.layers:
            if hasattr(layer, "cross_attn_attn_gate"):
                layer.cross_attn_attn_gate.fill_(0.5)
                layer.cross_attn_mlp_gate.fill_(0.5)
    model.generation_config.eos_token_id = [ids("<|end_of_text|>"), ids("<|eot_id|>")]
    model.save_pretrained(folder)
    image_processor = MllamaImageProcessorPil(size={"height": 28, "width": 28}, max_image_tiles=2)
    MllamaProcessor(image_processor=image_processor, tokenizer=tokenizer,
                    chat_template=LLAMA_CHAT_TEMPLATE).save_pretrained(folder)


def _qwen(folder: Path, seed: int, family: str) -> None:
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    tokenizer = build_tokenizer(QWEN_SPECIALS, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    ids = tokenizer.convert_tokens_to_ids
    text = dict(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, intermediate_size=128, max_position_embeddings=4096,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
                bos_token_id=ids("<|endoftext|>"), eos_token_id=ids("<|im_end|>"),
                pad_token_id=ids("<|endoftext|>"), tie_word_embeddings=False)
    special = dict(image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
                   vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"))
    if family == "qwen2_vl":
        from transformers import Qwen2VLConfig as Config
        from transformers import Qwen2VLForConditionalGeneration as Model
        vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2, in_chans=3)
    else:
        from transformers import Qwen2_5_VLConfig as Config
        from transformers import Qwen2_5_VLForConditionalGeneration as Model
        vision = dict(depth=2, hidden_size=32, out_hidden_size=64, num_heads=2, intermediate_size=64,
                      patch_size=14, spatial_merge_size=2, temporal_patch_size=2, in_chans=3, window_size=56,
                      fullatt_block_indexes=[1])
    config = Config(text_config=text, vision_config=vision, **special)
    torch.manual_seed(seed)
    model = Model(config)
    model.generation_config.eos_token_id = ids("<|im_end|>")
    model.generation_config.pad_token_id = ids("<|endoftext|>")
    model.save_pretrained(folder)
    # 28x28 .. 56x56 pixels: 1 to 4 merged image tokens per image
    image_processor = Qwen2VLImageProcessorPil(min_pixels=28 * 28, max_pixels=56 * 56, patch_size=14,
                                               merge_size=2, temporal_patch_size=2)
    # tokenizer (with the chat template) and image processor; Qwen's processor class also wants a video
    # processor, which needs torchvision
    tokenizer.save_pretrained(folder)
    image_processor.save_pretrained(folder)


def _llava(folder: Path, seed: int) -> None:
    from transformers import LlavaConfig, LlavaForConditionalGeneration
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    tokenizer = build_tokenizer(LLAVA_SPECIALS, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    tokenizer.chat_template = LLAVA_CHAT_TEMPLATE
    ids = tokenizer.convert_tokens_to_ids
    config = LlavaConfig(
        vision_config=dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, image_size=28, patch_size=14, projection_dim=32),
        text_config=dict(model_type="llama", vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
                         max_position_embeddings=4096, bos_token_id=ids("<s>"), eos_token_id=ids("</s>"),
                         pad_token_id=ids("<pad>"), tie_word_embeddings=False),
        image_token_index=ids("<image>"), vision_feature_layer=-1, vision_feature_select_strategy="default")
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.generation_config.eos_token_id = ids("</s>")
    model.generation_config.pad_token_id = ids("<pad>")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    CLIPImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}).save_pretrained(folder)


def build_checkpoint(family: str, folder: Path | str, seed: int = 0) -> Path:
    """Write a tiny random-weight checkpoint of `family` (see FAMILIES) to `folder`; returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if family == "mllama":
        _mllama(folder, seed)
    elif family in ("qwen2_vl", "qwen2_5_vl"):
        _qwen(folder, seed, family)
    elif family == "llava":
        _llava(folder, seed)
    else:
        raise ValueError(f"family: expected one of {FAMILIES} or 'llava', got {family!r}")
    return folder


# ---- the benchmarks' Mllamas

LLAMA_11B = dict(
    vision_config=dict(hidden_size=1280, num_hidden_layers=32, num_global_layers=8, attention_heads=16,
                       intermediate_size=5120, image_size=560, patch_size=14, max_num_tiles=4,
                       intermediate_layers_indices=[3, 7, 15, 23, 30], vision_output_dim=7680),
    text_config=dict(vocab_size=128256, hidden_size=4096, num_hidden_layers=40, num_attention_heads=32,
                     num_key_value_heads=8, intermediate_size=14336, cross_attention_layers=[3, 8, 13, 18, 23, 28, 33, 38],
                     rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                      "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                      "original_max_position_embeddings": 8192},
                     max_position_embeddings=131072, tie_word_embeddings=False),
)

# A CPU-sized Mllama whose vision tower still dominates the encode: 4 tiles of 224x224 (256 patches each)
SMALL = dict(
    vision_config=dict(hidden_size=256, num_hidden_layers=8, num_global_layers=2, attention_heads=4,
                       intermediate_size=1024, image_size=224, patch_size=14, max_num_tiles=4,
                       intermediate_layers_indices=[1, 3, 5], vision_output_dim=1024),
    text_config=dict(vocab_size=4096, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                     num_key_value_heads=2, intermediate_size=768, cross_attention_layers=[1, 3],
                     max_position_embeddings=4096, tie_word_embeddings=False),
)
# The 11B text structure (40 layers, 8 of them cross-attention; 32 query heads over 8 K/V heads) at width 64, with
# a small vision tower: every operator of a decoding step, at a size that runs on the CPU (bench/decode_ops.py)
NARROW_11B = dict(
    vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_global_layers=1,
                       attention_heads=2, image_size=28, patch_size=14, max_num_tiles=4, vision_output_dim=64,
                       intermediate_layers_indices=[0]),
    text_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=40, num_attention_heads=32,
                     num_key_value_heads=8, cross_attention_layers=[3, 8, 13, 18, 23, 28, 33, 38]),
)
# Llama-3.2-11B-Vision's widths, head counts and vocabulary with a few layers, a cross-attention layer among them:
# every stage of the loop at the 11B's tensor shapes, small enough to build, save and reload in a lease
# (bench/e2e.py)
WIDE_11B_SHORT = dict(
    vision_config=dict(LLAMA_11B["vision_config"], num_hidden_layers=2, num_global_layers=1,
                       intermediate_layers_indices=[0, 1], vision_output_dim=3 * 1280),
    text_config=dict(LLAMA_11B["text_config"], num_hidden_layers=3, cross_attention_layers=[1]),
)
# preset -> (shapes, tile side); the tokenizer's vocabulary where the shapes name none
MLLAMA_PRESETS = {"llama-3.2-11b": (LLAMA_11B, 560), "small": (SMALL, 224), "narrow-11b": (NARROW_11B, 28),
                  "wide-11b-short": (WIDE_11B_SHORT, 560)}


def build_mllama_adapter(preset: str, device: str = "cpu", dtype: torch.dtype = torch.float32,
                         folder: Path | str | None = None):
    """A random-weight Mllama adapter for benchmarks: "tiny" (`build_checkpoint("mllama", folder)`, loaded), or a
    preset of MLLAMA_PRESETS built in memory on `device` with this file's Llama tokenizer and chat template."""
    from transformers import MllamaConfig, MllamaForConditionalGeneration
    from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil

    from fastjudge.models import MllamaAdapter, load_adapter
    if preset == "tiny":
        if folder is None:
            raise ValueError("folder: the tiny preset is written to a checkpoint folder; pass one")
        build_checkpoint("mllama", folder)
        return load_adapter(str(folder), device=device, dtype=dtype)
    if preset not in MLLAMA_PRESETS:
        raise ValueError(f"preset: expected 'tiny' or one of {list(MLLAMA_PRESETS)}, got {preset!r}")
    tokenizer = build_tokenizer(LLAMA_SPECIALS, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                pad_token="<|finetune_right_pad_id|>")
    tokenizer.chat_template = LLAMA_CHAT_TEMPLATE
    ids = tokenizer.convert_tokens_to_ids
    shapes, tile = MLLAMA_PRESETS[preset]
    text = {"vocab_size": len(tokenizer) + 8, **shapes["text_config"], "pad_token_id": ids("<|finetune_right_pad_id|>")}
    config = MllamaConfig(vision_config=shapes["vision_config"], text_config=text, image_token_index=ids("<|image|>"))
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):  # initialized where it runs: 11B parameters would take minutes on the CPU
            model = MllamaForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(default)
    model.generation_config.eos_token_id = [ids("<|eot_id|>")]
    processor = MllamaImageProcessorPil(size={"height": tile, "width": tile}, max_image_tiles=4)
    return MllamaAdapter(model.eval(), tokenizer, processor)
