"""The family interface: what a model family provides, and the one object the stages hold.

An adapter owns a model, its tokenizer and image preprocessing. A family (one module each: `toy.ToyAdapter`, our
shapes-world Mllama with a word-level tokenizer; `mllama.MllamaAdapter`, Llama-3.2-Vision; `qwen2_vl.QwenVLAdapter`,
Qwen2-VL and Qwen2.5-VL; real checkpoints go through their own chat template, `chat.ChatAdapter`) provides:
- hooks: `preprocessing`, `encode_images`, `prompt_ids`, `templated_ids`, `target_ids`, `model_inputs`,
  `packed_training_inputs`, `pixel_model_inputs`, `prompt_tokens`, `decode`, `token_pieces`, `save`, `load`;
- capability fields that the services read instead of asking which model it is: `shared_decoder` (the engine's
  shared-prefix Mllama decoder, slot refills, early stop on the device vote), `packs` (exact packed training),
  `shardable` and `shard_groups` (FSDP2), `liger_patch` (Liger's patch function), `vision_modules`, `judge_style`.

The services do the rest, each in its own module, behind this class's methods: generation
(`models.generation`: `generate`, `choice_probabilities`), training (`models.training`: `sft_backward`,
`begin_training`, `end_training`), sharding (`models.sharding`), the image-feature cache (`models.features`).
A new family is one module and one line in `models.FAMILIES` (docs/architecture.md).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from PIL import Image

from fastjudge.core.sampling_params import SamplingParams
from fastjudge.engine.options import DecodeOptions
from fastjudge.engine.vote import SpanTables
from fastjudge.kernels.linear_cross_entropy import fused_linear_cross_entropy
from fastjudge.models import features as feature_cache, generation, sharding, training
from fastjudge.models.features import FeatureCache, ImageFeatures
from fastjudge.models.partial import BatchStore


class Adapter:
    """The family interface (module docstring): hooks a family overrides, capability fields it sets, and the
    services' entry points."""

    model: torch.nn.Module
    judge_style: str = "natural"
    vision_modules: tuple[str, ...] = ()  # name fragments of the parameters that "text" training freezes
    # capabilities: what the services may do with this family (module docstring)
    shared_decoder: bool = False
    packs: bool = False
    shardable: bool = False
    liger_patch: str | None = None  # the name of liger_kernel.transformers' patch function for this family
    eos_ids: set[int]
    pad_id: int
    # image features reused across calls (None: every call encodes its images); `load_adapter` gives one
    feature_cache: FeatureCache | None = None
    _decode_options: DecodeOptions | None = None
    # (rank, size) in a torchrun job: generation split by batches across the ranks (`generate`); None: alone
    shard: tuple[int, int] | None = None
    # finished generation batches written to / read from disk (a stage resumed midway); None: kept in memory only
    batch_store: BatchStore | None = None
    # state the services keep on the adapter: (rank, size) while the model is sharded for training (FSDP2); where
    # a sharded model computes (with CPU offloading its parameters live in CPU memory, but its inputs, labels and
    # the collectives' tensors, NCCL: CUDA only, belong on the GPU); the vision fingerprint; peft's model
    _sharded: tuple[int, int] | None = None
    _compute_device: torch.device | None = None
    _vision_fingerprint: str | None = None
    _peft = None

    @property
    def decode_options(self) -> DecodeOptions:
        """How generation decodes (shared Mllama decoder, kernels, CUDA graphs); `generate(options=...)`
        overrides it for a call. Default: `DecodeOptions.from_environment()` (FASTJUDGE_GPU_KERNELS=0,
        FASTJUDGE_CUDA_GRAPHS=0 honoured), read when first needed."""
        if self._decode_options is None:
            self._decode_options = DecodeOptions.from_environment()
        return self._decode_options

    @decode_options.setter
    def decode_options(self, options: DecodeOptions) -> None:
        self._decode_options = options

    @property
    def device(self) -> torch.device:
        """Where the model computes: its parameters' device, or the GPU a sharded model was on before its
        parameters were offloaded to CPU memory."""
        if self._compute_device is not None:
            return self._compute_device
        return next(self.model.parameters()).device

    # ---- images

    def is_vision(self, name: str) -> bool:
        return any(fragment in name for fragment in self.vision_modules)


    def weights_digest(self) -> str:
        """sha256 over the model class and each parameter's name, dtype, shape, sum and norm (float64):
        it tells two sets of weights apart (any training step or another checkpoint changes it) at the cost of
        two reductions per tensor on the model's device, not a copy of the weights to the host."""
        h = hashlib.sha256(type(self.model).__name__.encode())
        sums = []
        for name, p in self.model.named_parameters():
            h.update(f"{name}\0{p.dtype}\0{tuple(p.shape)}\0".encode())
            values = p.detach()  # reduced in float64 on the fly, never copied whole (an 11B embedding is 4 GB)
            sums.append(torch.stack([values.sum(dtype=torch.float64),
                                     torch.linalg.vector_norm(values, dtype=torch.float64)]))
        if sums:
            h.update(torch.stack(sums).cpu().numpy().tobytes())  # (parameters, 2) float64
        return h.hexdigest()

    def vision_trains(self) -> bool:
        """Whether image features need gradients now (then they are computed live, not cached)."""
        return torch.is_grad_enabled() and any(p.requires_grad for name, p in self.model.named_parameters()
                                               if self.is_vision(name))


    def vision_fingerprint(self) -> str:
        """sha256 over the image preprocessing and the vision tower's parameters (`features.vision_fingerprint`)."""
        return feature_cache.vision_fingerprint(self)

    def image_features(self, images: list[Image.Image]) -> list[ImageFeatures]:
        """Features of each image, from the feature cache when the vision tower is frozen (`features.image_features`)."""
        return feature_cache.image_features(self, images)

    # ---- generation (`models.generation`)

    def generate(self, images: list[Image.Image], prompts: list[str], params: SamplingParams | None = None, *,
                 batch_rows: int = 256, batch_tokens: int | None = None, progress=None, slots: int | None = None,
                 early_stop: float = 0.0, min_votes: int = 1, prefixes: list[str] | None = None,
                 options: DecodeOptions | None = None, templated: bool | None = None, reader=None,
                 **sampling) -> list[list[str]]:
        """params.n completions for each (image, prompt), sampled as `params` says (`generation.generate`). The
        sampling values may instead be given one by one (`sampling`: n, max_new_tokens, temperature, top_k, top_p,
        min_p, seed, stop), which makes the `SamplingParams`."""
        if params is None:
            params = SamplingParams(**sampling)
        elif sampling:
            raise ValueError(f"{', '.join(sampling)}: given beside params; put them in the SamplingParams")
        return generation.generate(self, images, prompts, params, batch_rows=batch_rows, batch_tokens=batch_tokens,
                                   progress=progress, slots=slots, early_stop=early_stop, min_votes=min_votes,
                                   prefixes=prefixes, options=options, templated=templated, reader=reader)

    def choice_probabilities(self, images: list[Image.Image], prompts: list[str], prefixes: list[str],
                             choices: tuple[str, ...], batch_rows: int = 32) -> list[list[float]]:
        """The probability of each of `choices` as what each answer says next (`generation.choice_probabilities`)."""
        return generation.choice_probabilities(self, images, prompts, prefixes, choices, batch_rows)

    @property
    def context_length(self) -> int | None:
        """The positions the language model takes (its config's max_position_embeddings), None if it names none."""
        config = self.model.config
        return getattr(getattr(config, "text_config", config), "max_position_embeddings", None)

    def check_lengths(self, rows: list[list[int]], first: int = 0) -> None:
        """The engine's last line of defence: a ValueError naming prompts[first + i] when row i is longer than the
        model's context. Inputs that came through `fastjudge.gate` never meet it."""
        context = self.context_length
        for i, row in enumerate(rows):
            if context is not None and len(row) > context:
                raise ValueError(f"prompts[{first + i}]: {len(row)} tokens, more than the model's context of "
                                 f"{context}; the input gate (fastjudge.gate) skips such inputs")

    def target_tokens(self, target: str) -> int:
        """Tokens of an answer as fine-tuning trains it (its end-of-turn token included)."""
        return len(self.target_ids(target))

    def prompt_tokens(self, prompt: str) -> int:
        """Tokens of a prompt as the model reads it, up to where the answer starts (an image counts as its one
        image token: Qwen's expansion to the image's patches comes on top)."""
        raise NotImplementedError

    def prefix_ids(self, prefix: str) -> list[int]:
        """Token ids of the start of an answer (the target's ids without its end-of-turn token)."""
        return self.target_ids(prefix)[:-1]

    def head_ids(self, prompt: str, feature, given: str = "") -> list[int]:
        """A training example's ids before its target: the prompt's, then those of a given answer start."""
        return self.prompt_ids(prompt, feature) + (self.prefix_ids(given) if given else [])

    def join_prefix(self, prefix: str, completion: str) -> str:
        """A given answer start and the model's continuation of it, as one text."""
        return prefix + completion

    def use_gpu_kernels(self, options: DecodeOptions | None = None) -> None:
        """Swap in fastjudge's GPU kernels for training and prefill where the family has them (Mllama's
        cross-attention); nothing by default."""

    @property
    def refills(self) -> bool:
        """Whether generation with the adapter's own options can refill slots and stop early on the device vote
        (the shared Mllama decoder)."""
        return self.refills_with(self.decode_options)

    def refills_with(self, options: DecodeOptions) -> bool:
        """Whether generation with `options` can refill slots and stop early (the family's shared decoder, on)."""
        return self.shared_decoder and options.shared_mllama

    def span_tables(self) -> SpanTables:
        """The answer-span tables of this tokenizer and model (`fastjudge.engine.vote`), built once."""
        if getattr(self, "_span_tables", None) is None:
            vocab = self.model.get_output_embeddings().out_features
            self._span_tables = SpanTables.build(self.token_pieces(), vocab, device=self.device)
        return self._span_tables

    def token_pieces(self) -> list[str]:
        """The text of each token id as it reads after another token."""
        raise NotImplementedError


    # ---- training

    def training_inputs(self, images, prompts, targets, given=None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Inputs with right padding, and labels (B, T): -100 except on the target and its end-of-turn (a
        `given` answer start, between the prompt and the target, carries no loss). A vision tower sharded for
        training gets pixels, to run inside the root's forward (FSDP2 gathers a sharded group only there);
        otherwise the inputs hold the image features (cached or computed live)."""
        pixels_in = bool(self._sharded) and self.vision_trains()
        features = [None] * len(images) if pixels_in else self.image_features(images)
        given = given or [""] * len(prompts)
        rows, label_rows = [], []
        for prompt, start, target, feature in zip(prompts, given, targets, features):
            head, tail = self.head_ids(prompt, feature, start), self.target_ids(target)
            rows.append(head + tail)
            label_rows.append([-100] * len(head) + tail)
        inputs = self.pixel_model_inputs(rows, images) if pixels_in else \
            self.model_inputs(rows, features, left=False)
        return inputs, _pad(label_rows, -100, left=False).to(self.device)

    def pixel_model_inputs(self, rows: list[list[int]], images: list[Image.Image]) -> dict[str, torch.Tensor]:
        """Right-padded inputs holding the images' pixels, for a forward that runs the vision tower itself
        (families whose training can shard their vision tower)."""
        raise NotImplementedError

    def sft_loss(self, images: list[Image.Image], prompts: list[str], targets: list[str],
                 reduction: str = "mean", given: list[str] | None = None) -> torch.Tensor:
        """Cross-entropy over target tokens (the assistant turn, its end-of-turn token included): their mean,
        or with reduction="sum" their sum; `given`: as in `sft_backward`."""
        return self.target_loss(*self.training_inputs(images, prompts, targets, given), reduction=reduction)

    def target_loss(self, inputs: dict[str, torch.Tensor], labels: torch.Tensor, reduction: str) -> torch.Tensor:
        """Cross-entropy of the labelled tokens, each predicted from the position before it. The output layer
        runs on those positions only: (B, T, V) logits over a 128k-152k vocabulary would not fit."""
        if self._sharded:  # through the root's forward, which gathers its parameters (embeddings, norm, head)
            hidden = self.model(**inputs, logits_to_keep=1, output_hidden_states=True).hidden_states[-1]
        else:
            hidden = self.model.model(**inputs).last_hidden_state  # (B, T, H)
        targets = labels[:, 1:]
        keep = targets != -100  # (B, T - 1)
        head = self.model.get_output_embeddings()
        if hidden.dtype == torch.float64:  # a float64 model (the tests' references): the plain product
            logits = torch.nn.functional.linear(hidden[:, :-1][keep], head.weight, head.bias)
            return torch.nn.functional.cross_entropy(logits, targets[keep], reduction=reduction)
        # the fused loss: Triton on CUDA, the chunked torch reference on the CPU; rows are already kept ones
        return fused_linear_cross_entropy(hidden[:, :-1][keep], head.weight, targets[keep], bias=head.bias,
                                          reduction=reduction, drop_ignored=False)


    def sft_backward(self, images: list[Image.Image], prompts: list[str], targets: list[str],
                     micro_batches: int = 3, pack: bool = False, given: list[str] | None = None) -> float:
        """Backward of the batch's mean target-token loss in `micro_batches` passes (`training.sft_backward`)."""
        return training.sft_backward(self, images, prompts, targets, micro_batches, pack, given)

    def packed_training_inputs(self, images: list[Image.Image], rows: list[list[int]], heads: dict[int, list[int]],
                               tails: dict[int, list[int]]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Inputs and labels (R, T) of examples packed into rows (rows[r]: the examples of row r, in order):
        each example attends causally to itself only, at positions from 0, and sees only its own image (families
        whose `packs` is True)."""
        raise NotImplementedError

    def shard_groups(self, vision_trains: bool) -> list[torch.nn.Module]:
        """The modules FSDP2 shards as groups of their own, innermost first (families whose `shardable` is True)."""
        raise NotImplementedError

    def shard_for_training(self, job: tuple[int, int], cpu_offload: bool = False,
                           activation_checkpointing: bool = False) -> None:
        """FSDP2 for a torchrun job of job[1] ranks (`sharding.shard_for_training`)."""
        sharding.shard_for_training(self, job, cpu_offload, activation_checkpointing)

    def begin_training(self, train: str = "text", *, lora_rank: int = 16,
                       lora_alpha: float = 32.0) -> list[torch.nn.Parameter]:
        """Choose what fine-tuning updates and return those parameters (`training.begin_training`)."""
        return training.begin_training(self, train, lora_rank=lora_rank, lora_alpha=lora_alpha)

    def end_training(self) -> None:
        """Merge LoRA adapters back, freeze everything (`training.end_training`)."""
        training.end_training(self)

    # ---- family hooks

    def preprocessing(self) -> str:
        """What turns an image into pixels (part of the cache key)."""
        raise NotImplementedError

    def encode_images(self, images: list[Image.Image]) -> list[ImageFeatures]:
        raise NotImplementedError

    def prompt_ids(self, prompt: str, image: ImageFeatures) -> list[int]:
        """Token ids of a user prompt (its text) with its image, up to where the answer starts."""
        raise NotImplementedError

    def templated_ids(self, text: str, image: ImageFeatures) -> list[int]:
        """Token ids of a prompt already through the chat template (families with one)."""
        raise NotImplementedError

    def check_prompt(self, index: int, prompt: str, templated: bool) -> None:
        """ValueError naming prompts[index] when it is not of the form asked for (raw user text, or with
        templated=True text through the chat template); this family has no chat template: raw text only."""
        if templated:
            raise ValueError(f"templated: {type(self).__name__} has no chat template; pass the prompts' text")

    def target_ids(self, target: str) -> list[int]:
        raise NotImplementedError

    def model_inputs(self, rows: list[list[int]], features: list[ImageFeatures], left: bool) -> dict:
        raise NotImplementedError

    def decode(self, tokens: list[int]) -> str:
        raise NotImplementedError

    def decode_raw(self, tokens: list[int]) -> str:
        """The text of tokens, white space kept (stop strings may be white space)."""
        return self.decode(tokens)

    def save(self, path: Path) -> None:
        raise NotImplementedError


def _pad(rows: list[list[int]], value: int, left: bool) -> torch.Tensor:
    """(B, T) int64: each row padded with `value` to the longest row, on the left or on the right."""
    length = max(map(len, rows))
    out = torch.full((len(rows), length), value, dtype=torch.long)
    for i, row in enumerate(rows):
        start = length - len(row) if left else 0
        out[i, start:start + len(row)] = torch.tensor(row, dtype=torch.long)
    return out
