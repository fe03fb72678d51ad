"""The shared-cache decoding step of Mllama (`SharedMllamaDecoder`): the prompt's keys and the image's keys stored
once per prompt and read by its n samples, the step captured as a CUDA graph on a GPU. `engine.mllama` runs the
decode loop around it (its docstring gives the design and the shape letters)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastjudge.engine.options import DecodeOptions
from fastjudge.kernels.decode_attention import shared_prefix_decode_attention
from fastjudge.kernels.mllama_cross_attention import cross_attention_decode


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class SharedMllamaDecoder:
    """Decoding steps for B prompts x n samples over a prefilled transformers cache (module docstring)."""

    def __init__(self, model, cache, prompt_mask: torch.Tensor, image_keys_mask: torch.Tensor | None, n: int,
                 max_new_tokens: int, graphs: bool = False, bucket_spans: bool | None = None,
                 options: DecodeOptions = DecodeOptions()):
        """image_keys_mask (B, S): the image keys the new tokens may see (None: all of them). graphs: run the
        steps as CUDA graphs. bucket_spans: read the own keys in the graphs' buckets of spans (default: with
        graphs; on the CPU it lets the tests compare the bucketed reads with the exact ones). options: the
        kernels, SDPA backends and graph buckets (`DecodeOptions`)."""
        text = model.model.language_model
        self.text, self.lm_head, self.n = text, model.lm_head, n
        self.options = options
        config = text.config
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.scale = self.head_dim ** -0.5
        self.cross_layers = set(config.cross_attention_layers)
        self.prompt_mask = prompt_mask.bool()  # (B, T)
        self.prompt_mask_int8 = self.prompt_mask.to(torch.int8)  # the self-attention kernel's
        batch = prompt_mask.shape[0]
        self.prompt_length, self.max_new = prompt_mask.shape[1], max_new_tokens
        self.image: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # cross layer -> (B, Hkv, S, d) x 2
        # self layer -> (B, Hkv, T + max_new * n, d) x 2: the prompt's keys once, then the slots' keys step-major
        self.kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for index, layer in enumerate(cache.layers):
            if index in self.cross_layers:
                # as transformers: a cross layer runs when the cache holds image keys (else it is skipped)
                if getattr(layer, "keys", None) is not None and layer.keys.numel() > 0:
                    self.image[index] = (layer.keys, layer.values)
                continue
            shape = (batch, self.kv_heads, self.prompt_length + max_new_tokens * n, self.head_dim)
            # zeros, not empty: masked entries must not be NaN (SDPA's masked product would carry it)
            keys, values = layer.keys.new_zeros(shape), layer.values.new_zeros(shape)
            keys[:, :, :self.prompt_length], values[:, :, :self.prompt_length] = layer.keys, layer.values
            self.kv[index] = (keys, values)
        image_keys = next((k.shape[2] for k, _ in self.image.values()), 0)
        if image_keys_mask is None:
            image_keys_mask = torch.ones(batch, image_keys, dtype=torch.bool, device=prompt_mask.device)
        # a prompt that sees no image key: transformers attends evenly to all keys and zeroes the layer's MLP
        # output (full_text_row_masked_out_mask); the same here
        self.sees_image = image_keys_mask.any(dim=-1)  # (B,)
        self.image_keys_mask = image_keys_mask | ~self.sees_image[:, None]  # (B, S)
        # on a GPU the cross layers run fastjudge.kernels.cross_attention_decode over each prompt's key range:
        # the n samples of a prompt are query rows of one product over the image's keys, read once for all
        self.key_range = None
        if options.kernel_on(options.cross_attention_kernel, prompt_mask.is_cuda) and image_keys:
            keys = torch.arange(image_keys, device=prompt_mask.device)
            start = torch.where(self.image_keys_mask, keys, image_keys).amin(dim=-1)
            end = torch.where(self.image_keys_mask, keys + 1, 0).amax(dim=-1)
            if bool((self.image_keys_mask.sum(dim=-1) == end - start).all()):  # contiguous: one range each
                self.key_range = (start.to(torch.int32), end.to(torch.int32))  # (B,) x 2
        self.self_attention_kernel = options.kernel_on(options.self_attention_kernel, prompt_mask.is_cuda)
        self.graphs_on = graphs
        self.bucket_spans = graphs if bucket_spans is None else bucket_spans
        # read span -> (graph, its logits (B, n, V)); the graphs share one memory pool (never run at once) and
        # read their inputs from `graph_inputs`, (tokens, positions, index) (B, n) each
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.graph_pool = None
        self.graph_inputs: tuple[torch.Tensor, ...] | None = None

    def read_span(self, span: int) -> int:
        """The own-key steps a step reads for `span` steps written: span itself, or its bucket (graphs)."""
        if not self.bucket_spans:
            return span
        bucket = self.options.graph_first_span
        while bucket < span:
            bucket *= 2
        return min(bucket, self.max_new)

    def worth_shrinking(self, going: int, batch: int) -> bool:
        """Drop the prompts that are done? Always without graphs; with graphs only when at most half of the
        batch is still going (a shrink costs the captures of new graphs)."""
        return not self.graphs_on or 2 * going <= batch

    def keep(self, groups: torch.Tensor) -> None:
        """Keep only these prompts (indices into the current B)."""
        self.prompt_mask = self.prompt_mask[groups]
        self.prompt_mask_int8 = self.prompt_mask_int8[groups]
        self.image_keys_mask = self.image_keys_mask[groups]
        self.sees_image = self.sees_image[groups]
        if self.key_range is not None:
            self.key_range = (self.key_range[0][groups], self.key_range[1][groups])
        self.image = {i: (k[groups], v[groups]) for i, (k, v) in self.image.items()}
        self.kv = {i: (k[groups], v[groups]) for i, (k, v) in self.kv.items()}
        # the graphs read the old tensors: capture again
        self.graphs, self.graph_pool, self.graph_inputs = {}, None, None

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, positions: torch.Tensor, index: torch.Tensor, span: int) -> torch.Tensor:
        """tokens (B, n), their positions (B, n) and own-cache indices (B, n) -> next-token logits (B, n, V).

        Each sample's token is written to the key buffer at column T + index * n + slot and attends to the
        prompt and to its own entries 0..index (a slot that starts a new sample starts again at index 0). The
        own entries are laid out step-major, so `span` (a host int, at least max(index) + 1) bounds the columns
        read, T + read_span(span) * n: no device value is needed on the host, and the same operators run
        every step. With graphs the logits returned are the graph's output, overwritten by the next step.
        """
        span = self.read_span(span)
        if not self.graphs_on:
            return self._step(tokens, positions, index, span)
        if self.graph_inputs is None:
            self.graph_inputs = (tokens.clone(), positions.clone(), index.clone())
        for static, value in zip(self.graph_inputs, (tokens, positions, index)):
            static.copy_(value)
        if span not in self.graphs:
            self.graphs[span] = self._capture(span)
        graph, logits = self.graphs[span]
        graph.replay()
        return logits

    def _capture(self, span: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """Capture the step reading `span` own-key steps, on the current graph inputs. Before the first capture
        of a batch, one eager run on a side stream does the lazy set-ups (Triton compiles, library handles) that
        a capture must not record; it writes the same keys as the replay that follows, so both leave the
        buffers as one step does. Later spans run the same kernels on wider reads: no warm-up (the decode
        kernels leave their span-dependent arguments unspecialized, so no new Triton variant is compiled)."""
        if not self.graphs:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self._step(*self.graph_inputs, span)
            torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.graph_pool):
            logits = self._step(*self.graph_inputs, span)
        self.graph_pool = graph.pool()
        return graph, logits

    def _step(self, tokens: torch.Tensor, positions: torch.Tensor, index: torch.Tensor, span: int) -> torch.Tensor:
        """`step` run eagerly (or captured), reading `span` own-key steps."""
        batch, device = tokens.shape[0], tokens.device
        h = self.text.embed_tokens(tokens)  # (B, n, D)
        cos, sin = self.text.rotary_emb(h, positions)  # (B, n, d)
        cos, sin = cos[:, None], sin[:, None]  # (B, 1, n, d)
        rows = torch.arange(batch, device=device)[:, None].expand(-1, self.n)  # (B, n)
        slots = torch.arange(self.n, device=device)
        column = self.prompt_length + index * self.n + slots  # (B, n) where each slot's token goes
        width = self.prompt_length + span * self.n  # the columns read
        group = self.heads // self.kv_heads
        # with the kernel, what each sample sees comes from prompt_mask and index; SDPA takes a mask (below)
        self_bias = None if self.self_attention_kernel else self._self_bias(index, span, group, h.dtype)
        if self.self_attention_kernel:
            index = index.to(torch.int32)  # once per step, not in every layer
        image_mask = self.image_keys_mask[:, None, None, :]  # (B, 1, 1, S)
        if self.options.step_sdpa_backends is None:
            return self._layers(h, cos, sin, rows, column, index, width, group, self_bias, image_mask)
        from torch.nn.attention import sdpa_kernel
        with sdpa_kernel(list(self.options.step_sdpa_backends)):
            return self._layers(h, cos, sin, rows, column, index, width, group, self_bias, image_mask)

    def _self_bias(self, index: torch.Tensor, span: int, group: int, dtype: torch.dtype) -> torch.Tensor:
        """(B, 1, G * n, width) additive mask of the self layers' SDPA: each sample sees the prompt and its own
        run up to this token (the other slots' runs are masked), one mask for every layer of the step.

        GQA without repeated keys: the G query heads of a K/V head and the n samples are its G * n query rows
        (row j * n + s: head kv * G + j, sample s), so SDPA sees as many heads in q as in k and can use a fused
        kernel (with a mask, it takes enable_gqa only on its slow math path). The mask is in the activations'
        dtype, its rows padded to 16 columns (the kernels' alignment; SDPA would otherwise pad a copy in every
        layer)."""
        batch, device = index.shape[0], index.device
        width = self.prompt_length + span * self.n
        slots = torch.arange(self.n, device=device)
        own = torch.arange(span * self.n, device=device)
        sees_own = ((own % self.n)[None, None, :] == slots[None, :, None]) & \
            ((own // self.n)[None, None, :] <= index[..., None])  # (B, n, span * n)
        sees = torch.cat([self.prompt_mask[:, None, :].expand(-1, self.n, -1), sees_own], dim=-1)  # (B, n, width)
        bias = torch.full((batch, 1, group, self.n, -(-width // 16) * 16), float("-inf"), dtype=dtype,
                          device=device)
        bias[..., :width].masked_fill_(sees[:, None, None], 0.0)
        return bias.view(batch, 1, group * self.n, -1)[..., :width]

    def _layers(self, h, cos, sin, rows, column, index, width, group, self_bias, image_mask) -> torch.Tensor:
        """The layers of `_step`, then the logits (B, n, V)."""
        batch = h.shape[0]
        for layer_index, layer in enumerate(self.text.layers):
            if layer_index in self.cross_layers:
                if layer_index not in self.image:
                    continue  # no image keys cached: transformers skips these layers too
                residual = h
                attn = layer.cross_attn
                x = layer.input_layernorm(h)
                q = attn.q_proj(x).view(batch, self.n, self.heads, self.head_dim).transpose(1, 2)
                q = attn.q_norm(q)
                k, v = self.image[layer_index]
                if self.key_range is not None:
                    out = cross_attention_decode(q, k, v, *self.key_range, scale=self.scale,
                                                 backend="triton")  # (B, Hq, n, d)
                else:  # the n samples are n queries of one row: the image's keys are read once for them all
                    out = F.scaled_dot_product_attention(
                        q.reshape(batch, self.kv_heads, group * self.n, self.head_dim), k, v, attn_mask=image_mask,
                        scale=self.scale).reshape(batch, self.heads, self.n, self.head_dim)
                x = attn.o_proj(out.transpose(1, 2).reshape(batch, self.n, -1))
                h = residual + layer.cross_attn_attn_gate.tanh() * x
                residual = h
                x = layer.mlp(layer.post_attention_layernorm(h)) * self.sees_image[:, None, None].to(h.dtype)
                h = residual + layer.cross_attn_mlp_gate.tanh() * x
                continue
            residual = h
            attn = layer.self_attn
            x = layer.input_layernorm(h)
            q = attn.q_proj(x).view(batch, self.n, self.heads, self.head_dim).transpose(1, 2)  # (B, Hq, n, d)
            k = attn.k_proj(x).view(batch, self.n, self.kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, n, d)
            v = attn.v_proj(x).view(batch, self.n, self.kv_heads, self.head_dim).transpose(1, 2)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            keys, values = self.kv[layer_index]
            keys[rows, :, column] = k.transpose(1, 2)  # (B, n, Hkv, d) at [b, :, column[b, s]]
            values[rows, :, column] = v.transpose(1, 2)
            if self.self_attention_kernel:
                out = shared_prefix_decode_attention(q, keys, values, self.prompt_mask_int8, index, width=width,
                                                     scale=self.scale, backend="triton")  # (B, Hq, n, d)
            else:
                out = F.scaled_dot_product_attention(
                    q.reshape(batch, self.kv_heads, group * self.n, self.head_dim), keys[:, :, :width],
                    values[:, :, :width], attn_mask=self_bias, scale=self.scale,
                ).reshape(batch, self.heads, self.n, self.head_dim)  # (B, Hkv, G * n, d) -> (B, Hq, n, d)
            x = attn.o_proj(out.transpose(1, 2).reshape(batch, self.n, -1))
            h = residual + x
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return self.lm_head(self.text.norm(h))
