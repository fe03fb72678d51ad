"""A model family fastjudge does not ship, added the way docs/architecture.md says a user adds one: this module
(the family's hooks) and the registry line at its end. LLaVA-1.5's architecture: a CLIP vision tower whose patch
features, projected, replace the <image> token's expansion in the input embeddings of a Llama text model."""

from __future__ import annotations

import torch

from fastjudge.models import ChatAdapter, ImageFeatures, register_family
from fastjudge.models.adapter import _pad


class LlavaAdapter(ChatAdapter):
    """A local LlavaForConditionalGeneration checkpoint: one image token in the chat template, expanded to the
    image's patch features."""

    vision_modules = ("vision_tower", "multi_modal_projector")

    def __init__(self, model, tokenizer, image_processor, source=None, chat_template=None):
        super().__init__(model, tokenizer, image_processor, source, chat_template)
        self.image_token_id = model.config.image_token_id

    def encode_images(self, images):
        pixels = self.image_processor(images=images, return_tensors="pt")["pixel_values"]
        config = self.model.config
        out = self.model.model.get_image_features(pixels.to(self.device, self.model.dtype),
                                                  vision_feature_layer=config.vision_feature_layer,
                                                  vision_feature_select_strategy=config.vision_feature_select_strategy)
        return [ImageFeatures(f, (f.shape[0],)) for f in out.pooler_output]  # (patches, H) each

    def templated_ids(self, text, image):
        marker = self.image_marker
        return self.tokenizer.encode(text.replace(marker, marker * image.info[0], 1), add_special_tokens=False)

    def model_inputs(self, rows, features, left):
        ids = _pad(rows, self.pad_id, left).to(self.device)  # (B, T)
        mask = _pad([[1] * len(row) for row in rows], 0, left).to(self.device)
        embeds = self.model.get_input_embeddings()(ids)  # (B, T, H)
        image_embeds = torch.cat([f.features for f in features]).to(self.device, embeds.dtype)  # (B * patches, H)
        embeds = embeds.masked_scatter((ids == self.image_token_id)[..., None].expand_as(embeds), image_embeds)
        return dict(inputs_embeds=embeds, attention_mask=mask)


register_family("llava", LlavaAdapter, "LlavaForConditionalGeneration")
