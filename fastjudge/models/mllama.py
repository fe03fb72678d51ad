"""Mllama (Llama-3.2-Vision and the toy): the text attends to the image through cross-attention layers.

`MllamaFamily` is what both share (vision tower + projector as the features, the cross-attention mask);
`MllamaAdapter` drives a real checkpoint through its chat template; `patch_mllama` swaps transformers'
cross-attention for `fastjudge.kernels.cross_attention` on a GPU.
"""

from __future__ import annotations

import torch
import torch.utils.checkpoint
from PIL import Image

from fastjudge.engine.options import DecodeOptions
from fastjudge.kernels.mllama_cross_attention import BACKENDS, MASKED_ROWS, cross_attention
from fastjudge.models.adapter import Adapter, _pad
from fastjudge.models.chat import ChatAdapter
from fastjudge.models.features import ImageFeatures


class MllamaFamily(Adapter):
    """Mllama: the text attends to the image through cross-attention layers. A prompt holds one <|image|>
    token; tokens from it on see the image's valid tiles (as MllamaProcessor's cross-attention mask)."""

    vision_modules = ("vision_model", "multi_modal_projector")
    image_token_id: int
    # capabilities (`Adapter`): the shared-prefix decoder (`engine.mllama`), exact packing, FSDP2 sharding, Liger
    shared_decoder = True
    packs = True
    shardable = True
    liger_patch = "apply_liger_kernel_to_mllama"

    def shard_groups(self, vision_trains: bool) -> list[torch.nn.Module]:
        """Each encoder layer (local and global), the rest of the tower and the projector when the vision tower
        trains; then each decoder layer (self- and cross-attention)."""
        inner = self.model.model
        groups: list[torch.nn.Module] = []
        if vision_trains:
            tower = inner.vision_model
            groups += [*tower.transformer.layers, *tower.global_transformer.layers, tower, inner.multi_modal_projector]
        return groups + list(inner.language_model.layers)

    def _pixel_inputs(self, images: list[Image.Image]) -> dict[str, torch.Tensor]:
        """pixel_values (N, 1, tiles, 3, S, S), aspect_ratio_ids (N, 1), aspect_ratio_mask (N, 1, tiles)."""
        raise NotImplementedError

    def encode_images(self, images):
        pixels = self._pixel_inputs(images)
        inner = self.model.model
        states = inner.vision_model(
            pixel_values=pixels["pixel_values"].to(self.device, self.model.dtype),
            aspect_ratio_ids=pixels["aspect_ratio_ids"].to(self.device),
            aspect_ratio_mask=pixels["aspect_ratio_mask"].to(self.device)).last_hidden_state  # (N, 1, tiles, P, Dv)
        states = inner.multi_modal_projector(states)  # (N, 1, tiles, P, H)
        valid_tiles = pixels["aspect_ratio_mask"].sum(dim=(1, 2)).tolist()
        return [ImageFeatures(states[i].flatten(0, 2), (int(valid_tiles[i]),)) for i in range(len(images))]

    def model_inputs(self, rows, features, left):
        tiles = features[0].features.shape[0] // self._patches_per_tile
        states = torch.stack([f.features for f in features])  # (B, tiles * P, H)
        return dict(self._text_inputs(rows, tiles, [f.info[0] for f in features], left),
                    cross_attention_states=states.to(self.device, self.model.dtype))

    def pixel_model_inputs(self, rows, images):
        # the root's forward runs the vision tower and the projector on these (as transformers' own training)
        pixels = self._pixel_inputs(images)
        valid_tiles = pixels["aspect_ratio_mask"].sum(dim=(1, 2)).tolist()
        return dict(self._text_inputs(rows, pixels["pixel_values"].shape[2], valid_tiles, left=False),
                    pixel_values=pixels["pixel_values"].to(self.device, self.model.dtype),
                    aspect_ratio_ids=pixels["aspect_ratio_ids"].to(self.device),
                    aspect_ratio_mask=pixels["aspect_ratio_mask"].to(self.device))

    def packed_training_inputs(self, images, rows, heads, tails):
        # the cross-attention layers read the packed mask as key ranges (`key_ranges`: its 2s), which
        # transformers' dense path cannot: they run through `patch_mllama` (the kernel on CUDA, its reference
        # elsewhere) until `end_training`
        inner = self.model.model
        if getattr(inner, "_fastjudge_cross_attention", None) is None:
            patch_mllama(self.model, masked_rows="hf")
            self._patched_for_packing = True
        # rows[r] lists its examples; each brings its tokens, its labels and its image, which goes in slot j of
        # the row's images (slot j of row r: cross-attention keys [j * tiles * P, (j + 1) * tiles * P))
        flat = [i for row in rows for i in row]
        features = dict(zip(flat, self.image_features([images[i] for i in flat])))
        per_image = features[flat[0]].features.shape[0]  # tiles * P (every image the processor's tile count)
        tiles = per_image // self._patches_per_tile
        slots = max(map(len, rows))
        length = max(sum(len(heads[i]) + len(tails[i]) for i in row) for row in rows)
        ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), length), -100, dtype=torch.long)
        positions = torch.zeros(len(rows), length, dtype=torch.long)
        sequence = torch.zeros(len(rows), length, dtype=torch.long)  # which example of the row a token is of
        cross = torch.zeros(len(rows), length, slots, tiles, dtype=torch.long)  # (R, T, images, tiles)
        states = []
        for r, row in enumerate(rows):
            offset, row_states = 0, []
            for slot, i in enumerate(row):
                tokens = heads[i] + tails[i]
                end = offset + len(tokens)
                ids[r, offset:end] = torch.tensor(tokens)
                labels[r, offset + len(heads[i]):end] = torch.tensor(tails[i])
                positions[r, offset:end] = torch.arange(len(tokens))
                sequence[r, offset:end] = slot
                image_at = tokens.index(self.image_token_id) if self.image_token_id in tokens else len(tokens)
                cross[r, offset:offset + image_at, slot, :] = 2  # before it: every tile of its image, unseen
                cross[r, offset + image_at:end, slot, :features[i].info[0]] = 1  # from its image token on
                row_states.append(features[i].features)
                offset = end
            positions[r, offset:] = torch.arange(length - offset)  # the padding: a sequence of its own
            sequence[r, offset:] = slots
            missing = slots - len(row)
            if missing:
                row_states.append(row_states[0].new_zeros(missing * per_image, row_states[0].shape[-1]))
            states.append(torch.cat(row_states))  # (slots * tiles * P, H)
        # (R, 1, T, T): token t attends to token u <= t of its own example (the padding to its own run)
        causal = torch.ones(length, length, dtype=torch.bool).tril()
        allowed = (sequence[:, :, None] == sequence[:, None, :]) & causal
        inputs = dict(input_ids=ids.to(self.device), position_ids=positions.to(self.device),
                      attention_mask=allowed[:, None].to(self.device), use_cache=False,
                      cross_attention_states=torch.stack(states).to(self.device, self.model.dtype),
                      cross_attention_mask=cross.to(self.device))
        return inputs, labels.to(self.device)

    def end_training(self) -> None:
        super().end_training()
        if getattr(self, "_patched_for_packing", False):  # generation runs as it did before training
            unpatch_mllama(self.model)
            self._patched_for_packing = False

    def _text_inputs(self, rows, tiles: int, valid_tiles: list[int], left: bool) -> dict[str, torch.Tensor]:
        """input_ids and attention_mask (B, T), padded on the left or the right, and the cross-attention mask
        (B, T, 1 image, tiles): 1 from the image token on, for the image's valid tiles."""
        ids = _pad(rows, self.pad_id, left)  # (B, T)
        mask = _pad([[1] * len(row) for row in rows], 0, left)
        after_image = (ids == self.image_token_id).long().cumsum(dim=1) > 0
        cross = torch.zeros(len(rows), ids.shape[1], 1, tiles, dtype=torch.long)
        for i, valid in enumerate(valid_tiles):
            cross[i, :, 0, :int(valid)] = after_image[i, :, None]
        return dict(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                    cross_attention_mask=cross.to(self.device))

    def use_gpu_kernels(self, options: DecodeOptions | None = None) -> None:
        """On CUDA, the cross-attention layers run `fastjudge.kernels.cross_attention` (`patch_mllama`, masked
        rows as transformers), for training and prefill; once per model; off with `gpu_kernels=False`."""
        options = options or self.decode_options
        if self.device.type != "cuda" or not options.gpu_kernels:
            return
        inner = getattr(self.model, "model", self.model)
        if getattr(inner, "_fastjudge_cross_attention", None) is None:
            patch_mllama(self.model, masked_rows="hf")

    @property
    def _patches_per_tile(self) -> int:
        return self.model.model.vision_model.num_patches


class MllamaAdapter(ChatAdapter, MllamaFamily):
    """A local Llama-3.2-Vision checkpoint (MllamaForConditionalGeneration)."""

    def __init__(self, model, tokenizer, image_processor, source=None, chat_template=None):
        super().__init__(model, tokenizer, image_processor, source, chat_template)
        self.image_token_id = model.config.image_token_index

    def _pixel_inputs(self, images):
        batch = self.image_processor(images=[[im] for im in images], return_tensors="pt")
        return {k: batch[k] for k in ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask")}

    def templated_ids(self, text, image):
        # the template writes <|begin_of_text|> itself
        return self.tokenizer.encode(text, add_special_tokens=False)


# ---- transformers' Mllama with the cross-attention kernel


class _PatchState:
    """What the patched layers of one model share: the key ranges of the current forward call."""

    def __init__(self, masked_rows: str, backend: str, patches: int):
        self.masked_rows, self.backend, self.patches = masked_rows, backend, patches
        self.ranges: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self.hook = None  # the model's forward pre-hook (its handle), removed by `unpatch_mllama`


def key_ranges(cross_attention_mask: torch.Tensor, patches: int):
    """From transformers' compact mask (B, T, images, tiles) to (start, end, seen), each (B, T): row t sees keys
    [start, end) of the (images x tiles x patches) keys; seen is True where it sees an image. A 1 marks a tile
    the row sees. A 2 (packed training only: `MllamaFamily.packed_training_inputs`) marks a tile a row that
    sees no image attends to all the same: unpacked, such a row (a token before its image token) attends to
    every key of its one image and its MLP output is zeroed, as transformers does; packed, its keys are those
    of its own image, not those of the row's other examples. None when some row's keys are not one contiguous
    run (several images with padded tiles between them): transformers' dense path must run then."""
    batch, rows = cross_attention_mask.shape[:2]
    flat = cross_attention_mask.reshape(batch, rows, -1)  # (B, T, images * tiles)
    valid = flat > 0
    tiles = valid.shape[-1]
    attends = valid.any(dim=-1)
    seen = (flat == 1).any(dim=-1)
    first = valid.int().argmax(dim=-1)
    last = tiles - 1 - valid.flip(-1).int().argmax(dim=-1)
    contiguous = (valid.sum(dim=-1) == last - first + 1) | ~attends
    if not bool(contiguous.all()):  # one host synchronization per forward call, not per layer
        return None
    start = torch.where(attends, first * patches, torch.zeros_like(first))
    end = torch.where(attends, (last + 1) * patches, torch.zeros_like(last))
    return start.to(torch.int32), end.to(torch.int32), seen


def _current_rows(mask: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """The mask's rows of the tokens this call processes, as transformers takes them: a caller may pass the
    whole mask with a cache (fastjudge's generic decoding; transformers 5.17's generate): rows
    cache_position, else [past, past + tokens)."""
    tokens = next((kwargs[name].shape[1] for name in ("input_ids", "inputs_embeds") if kwargs.get(name) is not None),
                  mask.shape[1])
    if mask.shape[1] == tokens:
        return mask
    position = kwargs.get("cache_position")
    if position is not None:
        return mask[:, position]
    cache = next((kwargs[name] for name in ("cache", "past_key_values") if kwargs.get(name) is not None), None)
    past = int(cache.get_seq_length()) if cache is not None else 0
    return mask[:, past:past + tokens]


def _capture_ranges(state: _PatchState):
    def hook(module, args, kwargs):
        mask = kwargs.get("cross_attention_mask")
        state.ranges = None
        if mask is not None:
            ranges = key_ranges(_current_rows(mask, kwargs), state.patches)
            if ranges is not None:  # transformers builds no dense mask: the patched layers take the ranges
                state.ranges = ranges
                kwargs = dict(kwargs, cross_attention_mask=None)
        return args, kwargs
    return hook


def _patched_cross_layer(layer, state: _PatchState, original):
    """`MllamaCrossAttentionDecoderLayer.forward` with the attention through `cross_attention` (transformers'
    order of operations: norm, attention, gate, norm, MLP zeroed on rows that see no image, gate)."""
    def forward(hidden_states, cross_attention_states=None, cross_attention_mask=None, attention_mask=None,
                full_text_row_masked_out_mask=None, **kwargs):
        if cross_attention_mask is not None:  # a dense mask (the hook passes none on): transformers' path
            return original(hidden_states, cross_attention_states=cross_attention_states,
                            cross_attention_mask=cross_attention_mask, attention_mask=attention_mask,
                            full_text_row_masked_out_mask=full_text_row_masked_out_mask, **kwargs)
        ranges = state.ranges  # this call's (a recomputation in backward must see the same)
        if layer.training and getattr(layer, "gradient_checkpointing", False) and torch.is_grad_enabled():
            # the instance's forward replaces the class's, which is where transformers checkpoints
            return torch.utils.checkpoint.checkpoint(attend, hidden_states, cross_attention_states, kwargs, ranges,
                                                     use_reentrant=False)
        return attend(hidden_states, cross_attention_states, kwargs, ranges)

    def attend(hidden_states, cross_attention_states, kwargs, ranges):
        cache = next((kwargs[name] for name in ("cache", "past_key_values", "past_key_value")
                      if kwargs.get(name) is not None), None)
        attn = layer.cross_attn
        residual = hidden_states
        x = layer.input_layernorm(hidden_states)
        batch, rows, _ = x.shape
        q = attn.q_norm(attn.q_proj(x).view(batch, rows, attn.num_heads, attn.head_dim).transpose(1, 2))
        if cross_attention_states is not None:
            k = attn.k_proj(cross_attention_states).view(batch, -1, attn.num_key_value_heads, attn.head_dim)
            v = attn.v_proj(cross_attention_states).view(batch, -1, attn.num_key_value_heads, attn.head_dim)
            k, v = attn.k_norm(k.transpose(1, 2)), v.transpose(1, 2)
            if cache is not None:
                k, v = cache.update(k, v, attn.layer_idx)
        else:
            k, v = cache.layers[attn.layer_idx].keys, cache.layers[attn.layer_idx].values
        if ranges is None:  # no mask given: every row sees every key, as transformers does
            start = torch.zeros(batch, rows, dtype=torch.int32, device=x.device)
            end, seen = torch.full_like(start, k.shape[2]), None
        else:
            start, end, seen = ranges
            if start.shape != (batch, rows):
                raise RuntimeError(f"patch_mllama: key ranges for {tuple(start.shape)} rows, but the layer has "
                                   f"{(batch, rows)}: a call reached the text model without passing the MllamaModel")
        out = cross_attention(q, k, v, start, end, scale=attn.scaling, masked_rows=state.masked_rows,
                              backend=state.backend)  # (B, Hq, T, D)
        h = residual + layer.cross_attn_attn_gate.tanh() * attn.o_proj(out.transpose(1, 2).reshape(batch, rows, -1))
        x = layer.mlp(layer.post_attention_layernorm(h))
        if seen is not None:
            x = x * seen[..., None].to(x.dtype)
        return h + layer.cross_attn_mlp_gate.tanh() * x
    return forward


def patch_mllama(model, masked_rows: str = "hf", backend: str = "auto"):
    """Swap the attention of every cross-attention layer of a `MllamaForConditionalGeneration` (or its
    `MllamaModel`) for `cross_attention`, in place, for training, prefill and decoding; returns the model.

    A forward pre-hook on the `MllamaModel` turns the compact `cross_attention_mask` (B, T, images, tiles) into
    key ranges and passes no mask on, so transformers builds no dense (B, 1, T, S) mask; when some row's keys
    are not contiguous (several images with padded tiles between them), that call runs transformers' own path.
    masked_rows and backend: as `cross_attention`. Patching twice raises ValueError.
    """
    if masked_rows not in MASKED_ROWS:
        raise ValueError(f"masked_rows: expected one of {MASKED_ROWS}, got {masked_rows!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    inner = getattr(model, "model", model)
    if not (hasattr(inner, "vision_model") and hasattr(inner, "language_model")):
        raise ValueError(f"model: expected a MllamaForConditionalGeneration or MllamaModel, got {type(model).__name__}")
    if getattr(inner, "_fastjudge_cross_attention", None) is not None:
        raise ValueError("model: already patched")
    state = _PatchState(masked_rows, backend, inner.vision_model.num_patches)
    layers = [layer for layer in inner.language_model.layers if hasattr(layer, "cross_attn_attn_gate")]
    for layer in layers:
        layer.forward = _patched_cross_layer(layer, state, layer.forward)
    state.hook = inner.register_forward_pre_hook(_capture_ranges(state), with_kwargs=True)
    inner._fastjudge_cross_attention = state
    return model


def unpatch_mllama(model) -> None:
    """Undo `patch_mllama`: the cross-attention layers run transformers' own forward again."""
    inner = getattr(model, "model", model)
    state = getattr(inner, "_fastjudge_cross_attention", None)
    if state is None:
        return
    for layer in inner.language_model.layers:
        if "forward" in vars(layer):  # the patched instance forward; the class's takes over again
            del layer.forward
    state.hook.remove()
    inner._fastjudge_cross_attention = None
