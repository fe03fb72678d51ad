"""Qwen2-VL and Qwen2.5-VL: image patch embeddings in the token sequence, multimodal RoPE positions."""

from __future__ import annotations

import torch

from fastjudge.models.adapter import _pad
from fastjudge.models.chat import ChatAdapter
from fastjudge.models.features import ImageFeatures


class QwenVLAdapter(ChatAdapter):
    """A local Qwen2-VL or Qwen2.5-VL checkpoint. The image's merged patch embeddings replace its
    <|image_pad|> tokens in the input embeddings; positions are multimodal RoPE (`mrope_positions`)."""

    image_placeholder = "<|image_pad|>"  # the chat template's image token, expanded to the image's tokens
    vision_modules = ("visual",)

    def __init__(self, model, tokenizer, image_processor, source=None, chat_template=None):
        super().__init__(model, tokenizer, image_processor, source, chat_template)
        # Liger patches Qwen2-VL and Qwen2.5-VL by two functions
        self.liger_patch = {"qwen2_vl": "apply_liger_kernel_to_qwen2_vl",
                            "qwen2_5_vl": "apply_liger_kernel_to_qwen2_5_vl"}[model.config.model_type]
        self.image_token_id = model.config.image_token_id
        self.merge = model.config.vision_config.spatial_merge_size

    def encode_images(self, images):
        batch = self.image_processor(images=images, return_tensors="pt")
        grids = batch["image_grid_thw"]  # (N, 3)
        out = self.model.model.get_image_features(batch["pixel_values"].to(self.device, self.model.dtype),
                                                  grids.to(self.device))
        # pooler_output: the merger's output, one (tokens, H) tensor per image (transformers 5.17 and 5.24)
        return [ImageFeatures(e, tuple(int(x) for x in g)) for e, g in zip(out.pooler_output, grids)]

    def templated_ids(self, text, image):
        t, h, w = image.info
        count = t * h * w // (self.merge ** 2)
        text = text.replace(self.image_placeholder, self.image_placeholder * count, 1)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def model_inputs(self, rows, features, left):
        ids = _pad(rows, self.pad_id, left).to(self.device)  # (B, T)
        mask = _pad([[1] * len(row) for row in rows], 0, left).to(self.device)
        embeds = self.model.get_input_embeddings()(ids)  # (B, T, H)
        image_embeds = torch.cat([f.features for f in features]).to(self.device, embeds.dtype)  # (sum tokens, H)
        image_mask = (ids == self.image_token_id)[..., None].expand_as(embeds)
        embeds = embeds.masked_scatter(image_mask, image_embeds)
        positions = mrope_positions(ids, mask, [f.info for f in features], self.image_token_id, self.merge)
        return dict(inputs_embeds=embeds, attention_mask=mask, position_ids=positions)


def mrope_positions(ids: torch.Tensor, mask: torch.Tensor, grids: list[tuple[int, int, int]], image_token_id: int,
                    merge: int) -> torch.Tensor:
    """Qwen2-VL's multimodal RoPE positions (3, B, T) for rows holding one image each.

    Text tokens count up by one in all three components. The image's tokens (a run of image_token_id) get
    (start + t, start + row, start + column) on the merged (t, h / merge, w / merge) grid, and the text after
    it resumes at start + max(t, h / merge, w / merge). Padding gets 1 (it is masked).
    """
    batch, length = ids.shape
    positions = torch.ones(3, batch, length, dtype=torch.long, device=ids.device)
    for b in range(batch):
        real = mask[b].bool()
        tokens = ids[b][real]
        is_image = tokens == image_token_id
        where = torch.nonzero(is_image).flatten()
        t, h, w = grids[b]
        h, w = h // merge, w // merge
        if len(where) != t * h * w:
            raise ValueError(f"row {b}: {len(where)} image tokens for an image of {t * h * w} merged patches")
        row = torch.zeros(3, len(tokens), dtype=torch.long, device=ids.device)
        start = int(where[0]) if len(where) else len(tokens)
        row[:, :start] = torch.arange(start, device=ids.device)
        if len(where):
            grid = torch.stack(torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij"))
            row[:, start:start + len(where)] = grid.reshape(3, -1).to(ids.device) + start
            resume = start + max(t, h, w)
            rest = len(tokens) - start - len(where)
            row[:, start + len(where):] = torch.arange(rest, device=ids.device) + resume
        positions[:, b, real] = row
    return positions
