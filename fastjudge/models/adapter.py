"""The adapter base: the one small interface that synth, filter, train and eval use.

An adapter owns a model, its tokenizer and image preprocessing:
- `generate(images, prompts, n=..., ...) -> list[list[str]]`: n completions per (image, prompt);
- `sft_loss(images, prompts, targets)` / `sft_backward(...)`: cross-entropy on the assistant tokens only
  (the target and its end-of-turn token);
- `begin_training(train)` / `end_training()`: what fine-tuning updates ("text": vision tower frozen, the
  default; "all"; "lora": LoRA adapters on the language model through peft, merged back at the end);
- `save(path)`: a checkpoint that plain transformers loads (`AutoModelForImageTextToText`, `AutoTokenizer`,
  `AutoImageProcessor`).

Families (one module each): `toy.ToyAdapter` (our shapes-world Mllama, word-level tokenizer),
`mllama.MllamaAdapter` (Llama-3.2-Vision), `qwen2_vl.QwenVLAdapter` (Qwen2-VL and Qwen2.5-VL); real checkpoints
go through their own chat template (`chat.ChatAdapter`). Image features come from the adapter's
`feature_cache` (`features.FeatureCache`).
"""

from __future__ import annotations

import hashlib
import inspect
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from PIL import Image

from fastjudge.engine.decoding import decode_groups
from fastjudge.engine.options import DecodeOptions
from fastjudge.engine.vote import EarlyStop, SpanTables
from fastjudge.kernels.linear_cross_entropy import fused_linear_cross_entropy
from fastjudge.models.features import VISION_BATCH, VISION_BATCH_CPU, FeatureCache, ImageFeatures, chunks, image_hash
from fastjudge.models.partial import BatchStore

Progress = Callable[[int], None]
TRAIN_MODES = ("text", "all", "lora")
# LoRA goes on the language model's projections only (vision modules have projections of the same names)
LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


class Adapter:
    """Shared driver code. A family provides `_preprocess`, `_encode_images`, `_prompt_ids`, `_target_ids`,
    `_model_inputs`, `decode` and `save`, and names its vision modules in `vision_modules`."""

    model: torch.nn.Module
    judge_style: str = "natural"
    vision_modules: tuple[str, ...] = ()  # name fragments of the parameters that "text" training freezes
    eos_ids: set[int]
    pad_id: int
    # image features reused across calls (None: every call encodes its images); `load_adapter` gives one
    feature_cache: FeatureCache | None = None
    _decode_options: DecodeOptions | None = None
    # (rank, size) in a torchrun job: generation split by batches across the ranks (`generate`); None: alone
    shard: tuple[int, int] | None = None
    # finished generation batches written to / read from disk (a stage resumed midway); None: kept in memory only
    batch_store: BatchStore | None = None
    _sharded: tuple[int, int] | None = None  # (rank, size) while the model is sharded for training (FSDP2)
    # where a sharded model computes: with CPU offloading its parameters live in CPU memory, but its inputs,
    # labels and the collectives' tensors (NCCL: CUDA only) belong on the GPU
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

    def _is_vision(self, name: str) -> bool:
        return any(fragment in name for fragment in self.vision_modules)

    def vision_fingerprint(self) -> str:
        """sha256 over the image preprocessing and the vision tower's parameter names and bytes; computed once
        per set of weights."""
        if self._vision_fingerprint is None:
            h = hashlib.sha256(type(self.model).__name__.encode())
            h.update(self._preprocessing().encode())
            for name, p in self.model.named_parameters():
                if self._is_vision(name):
                    h.update(name.encode())
                    h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
            self._vision_fingerprint = h.hexdigest()
        return self._vision_fingerprint

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

    def _vision_trains(self) -> bool:
        """Whether image features need gradients now (then they are computed live, not cached)."""
        return torch.is_grad_enabled() and any(p.requires_grad for name, p in self.model.named_parameters()
                                               if self._is_vision(name))

    def image_features(self, images: list[Image.Image]) -> list[ImageFeatures]:
        """Features of each image: from the cache when the vision tower is frozen (misses encoded in batches of
        VISION_BATCH, VISION_BATCH_CPU on the CPU), computed with gradients when it trains."""
        if self._vision_trains() or self.feature_cache is None or self.feature_cache.max_bytes <= 0:
            return self._encode_images(images)
        fingerprint = self.vision_fingerprint()
        keys = [(image_hash(im), fingerprint) for im in images]
        found: dict[tuple[str, str], ImageFeatures] = {}
        missing: dict[tuple[str, str], Image.Image] = {}
        for key, image in zip(keys, images):
            if key in found or key in missing:
                continue
            entry = self.feature_cache.get(key)
            if entry is None:
                missing[key] = image
            else:
                found[key] = entry
        todo = list(missing.items())
        training = self.model.training
        self.model.eval()  # cached features must not depend on the mode (dropout) they were computed in
        per_batch = VISION_BATCH if self.device.type == "cuda" else VISION_BATCH_CPU
        for start, stop in chunks(len(todo), per_batch):
            with torch.no_grad():
                encoded = self._encode_images([image for _, image in todo[start:stop]])
            for (key, _), entry in zip(todo[start:stop], encoded):
                # a copy: a view would keep the whole batch's features alive
                entry = ImageFeatures(entry.features.to("cpu", copy=True), entry.info)
                found[key] = entry
                self.feature_cache.put(key, entry)
        self.model.train(training)
        return [found[key] for key in keys]

    # ---- generation

    @torch.no_grad()
    def generate(self, images: list[Image.Image], prompts: list[str], *, n: int = 1, max_new_tokens: int = 64,
                 temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0, seed: int = 0,
                 stop: list[str] | None = None, batch_rows: int = 256, batch_tokens: int | None = None,
                 progress: Progress | None = None, slots: int | None = None, early_stop: float = 0.0,
                 min_votes: int = 1, prefixes: list[str] | None = None,
                 options: DecodeOptions | None = None, templated: bool | None = None) -> list[list[str]]:
        """n completions for each (image, prompt); temperature 0 is greedy (then n must be 1).

        With `prefixes`, the answer of prompt i starts with prefixes[i] (given, not generated) and each
        completion returned is that prefix followed by what the model wrote after it (`join_prefix`).

        With `early_stop` > 0 (closed-ended prompts; needs `refills`), each prompt decodes `slots` samples at
        a time, a slot starting the next sample when one ends, and stops once its majority is settled on the
        device (`fastjudge.engine.vote.DeviceVote` with `min_votes` and confidence `early_stop`): a prompt then gets
        between 1 and n completions. The host vote (`fastjudge.core.voting.majority_vote`) stays the final word.

        Prompts are the user's text, which goes through the chat template with the image before it; with
        `templated=True` they are texts already through the template, as transformers' processor takes them
        (`processor.apply_chat_template(messages, add_generation_prompt=True)`: headers and the image token
        written). With `templated` True or False, text of the other form is refused with a ValueError naming
        the prompt (`check_prompt`); None (the stages' calls, whose prompts embed model outputs and benchmark
        responses verbatim) is raw text, unchecked.

        `options` (default: the adapter's `decode_options`) chooses how decoding runs: the shared Mllama decoder
        or the generic one, kernels, CUDA graphs (`fastjudge.engine.options.DecodeOptions`).

        With `shard` set to (rank, size) (`core.dist.World.shard`, a torchrun job), this rank generates every
        size-th batch of prompts, and the ranks exchange their completions: every rank returns them all, the
        same as one process would (each batch is seeded by its place in the list, never by the rank). Every
        rank of the job must call generate with the same arguments. With `batch_store` set
        (`fastjudge.models.partial.BatchStore`), each finished batch of prompts is written to disk by the rank
        that made it, and a batch found there (an earlier, interrupted call) is read instead of generated.

        Each prompt and its image are encoded and prefilled once and shared by its n samples (`decode`).
        A completion ends at an end-of-turn token or just before the first of the `stop` strings it writes.
        Prompts are batched so that decoding holds at most `batch_rows` rows (prompts x n) and, with
        `batch_tokens`, at most that many token positions (rows x (longest prompt + max_new_tokens)), a batch
        holding at least one prompt. Each batch is seeded from (seed, batch index), so a run is reproducible
        for fixed batch_rows and batch_tokens.
        """
        if len(images) != len(prompts):
            raise ValueError(f"images and prompts: expected the same length, got {len(images)} and {len(prompts)}")
        if prefixes is not None and len(prefixes) != len(prompts):
            raise ValueError(f"prefixes: expected one per prompt ({len(prompts)}), got {len(prefixes)}")
        if n < 1:
            raise ValueError(f"n: expected >= 1, got {n}")
        if temperature < 0:
            raise ValueError(f"temperature: expected >= 0, got {temperature}")
        if temperature == 0 and n > 1:
            raise ValueError("n: greedy decoding (temperature 0) gives one completion per prompt; use n=1")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p: expected in (0, 1], got {top_p}")
        if top_k < 0:
            raise ValueError(f"top_k: expected >= 0 (0 = off), got {top_k}")
        if not 0 <= min_p < 1:
            raise ValueError(f"min_p: expected in [0, 1), got {min_p}")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens: expected >= 1, got {max_new_tokens}")
        if batch_tokens is not None and batch_tokens < 1:
            raise ValueError(f"batch_tokens: expected >= 1 or None, got {batch_tokens}")
        if slots is not None and not 1 <= slots <= n:
            raise ValueError(f"slots: expected in [1, n={n}] or None, got {slots}")
        if not 0 <= early_stop <= 1:
            raise ValueError(f"early_stop: expected a confidence in [0, 1] (0 = off), got {early_stop}")
        options = options or self.decode_options
        if (early_stop > 0 or slots is not None) and not self.refills_with(options):
            raise ValueError(f"early_stop, slots: {type(self).__name__} decodes without the shared Mllama decoder")
        if not 1 <= min_votes <= n:
            raise ValueError(f"min_votes: expected in [1, n={n}], got {min_votes}")
        stopping = None
        if early_stop > 0:
            stopping = EarlyStop(self.span_tables(), confidence=early_stop, min_votes=min_votes)
        for i, (image, prompt) in enumerate(zip(images, prompts)):
            if not isinstance(prompt, str) or not prompt.strip():
                raise ValueError(f"prompts[{i}]: expected a non-empty string, got {prompt!r}")
            if templated is not None:
                self.check_prompt(i, prompt, templated)
            if not isinstance(image, Image.Image):
                raise ValueError(f"images[{i}]: expected a PIL image, got {type(image).__name__}")
        stops = [s for s in (stop or []) if s]
        # a stop string of L characters spans at most L tokens that each write a character; byte pieces and
        # special tokens write none, hence the margin (a late detection only costs steps: `_cut` finds it)
        # plus the steps between two looks from the host (the decoder checks stops every sync_every steps, 8 by
        # default on a GPU; a larger sync_every only costs steps)
        window = 4 * max(map(len, stops), default=0) + 16

        def stopped(tokens: list[int]) -> bool:
            tail = self.decode_raw(tokens[-window:])
            return any(s in tail for s in stops)

        self.model.eval()
        self.use_gpu_kernels(options)
        per_batch = max(1, batch_rows // (slots or n))
        stored = None
        if self.batch_store is not None:
            # everything that decides the completions besides the prompts and images: the weights, where they
            # run, how decoding runs, and the sampling settings
            stored = self.batch_store.call(images, prompts, prefixes, dict(
                weights=self.weights_digest(), device=self.device.type, options=repr(options),
                family=type(self).__name__, n=n, max_new_tokens=max_new_tokens, temperature=temperature,
                top_k=top_k, top_p=top_p, min_p=min_p,
                seed=seed, stop=stops, batch_rows=batch_rows, batch_tokens=batch_tokens, slots=slots,
                early_stop=early_stop, min_votes=min_votes, templated=templated))
        mine: list[tuple[int, list[list[str]]]] = []  # (chunk, its completions) of this rank's chunks
        for chunk, (start, end) in enumerate(chunks(len(prompts), per_batch)):
            if not self._computes(chunk):
                continue  # another rank's chunk
            done = stored.load(chunk, end - start) if stored is not None else None
            if done is not None:
                mine.append((chunk, done))
                if progress:
                    progress(end - start)
                continue
            out: list[list[str]] = []
            features = self.image_features(images[start:end])
            encode = self._templated_ids if templated else self._prompt_ids
            rows = [encode(p, f) for p, f in zip(prompts[start:end], features)]
            if prefixes is not None:
                rows = [row + self._prefix_ids(x) for row, x in zip(rows, prefixes[start:end])]
            for part, (first, last) in enumerate(_token_budget(rows, slots or n, max_new_tokens, batch_tokens)):
                inputs = self._model_inputs(rows[first:last], features[first:last], left=True)
                # keyed by the batch's place in the whole list (chunk, part of it), never by the rank: any
                # number of processes draws what one draws
                generator = torch.Generator(device=self.device).manual_seed(
                    seed * 1_000_003 + chunk + (part << 32))
                groups = decode_groups(self.model, inputs, max_new_tokens=max_new_tokens, eos_ids=self.eos_ids,
                                       n=n, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                                       generator=generator, stop=stopped if stops else None, slots=slots,
                                       early_stop=stopping, options=options)
                texts = [[_cut(self.decode(row), stops) for row in group] for group in groups]
                if prefixes is not None:
                    texts = [[self.join_prefix(x, t) for t in group]
                             for x, group in zip(prefixes[start + first:start + last], texts)]
                out.extend(texts)
                if progress:
                    progress(last - first)
            if stored is not None:
                stored.save(chunk, out)
            mine.append((chunk, out))
        # every rank returns every completion: the stages after generation run whole on each rank
        return self._all_chunks(mine)

    def _computes(self, chunk: int) -> bool:
        """Whether this process computes batch `chunk` of a call: every batch alone, every size-th in a torchrun
        job (`shard`)."""
        return self.shard is None or chunk % self.shard[1] == self.shard[0]

    def _all_chunks(self, mine: list[tuple[int, list]]) -> list:
        """Every batch's results of a call, in order, from this process's (chunk, results) pairs; in a torchrun
        job the ranks exchange theirs, so that every rank returns them all."""
        if self.shard is not None:
            gathered: list = [None] * self.shard[1]
            dist.all_gather_object(gathered, mine)
            mine = [pair for rank in gathered for pair in rank]
        return [result for _, part in sorted(mine, key=lambda pair: pair[0]) for result in part]

    @torch.no_grad()
    def choice_probabilities(self, images: list[Image.Image], prompts: list[str], prefixes: list[str],
                             choices: tuple[str, ...], batch_rows: int = 32) -> list[list[float]]:
        """For each (image, prompt, answer start), the probability of each of `choices` as what the answer says
        next, read from the logits (no sampling): the softmax over the logits of each choice's first token after
        the longest token run the choices share, so renormalized over the choices. A choice whose tokens are
        those of another (nothing tells them apart) is a ValueError. With `shard` set (a torchrun job), each
        rank reads every size-th batch and every rank returns them all, as `generate` does."""
        if not len(images) == len(prompts) == len(prefixes):
            raise ValueError(f"images, prompts, prefixes: expected the same length, got {len(images)}, "
                             f"{len(prompts)} and {len(prefixes)}")
        self.model.eval()
        self.use_gpu_kernels()
        features = self.image_features(images)
        rows, candidates = [], []
        for i, (prompt, prefix, feature) in enumerate(zip(prompts, prefixes, features)):
            ids = [self._prefix_ids(prefix + choice) for choice in choices]
            shared = 0
            while all(len(x) > shared for x in ids) and len({x[shared] for x in ids}) == 1:
                shared += 1
            if any(len(x) <= shared for x in ids) or len({x[shared] for x in ids}) < len(choices):
                raise ValueError(f"prefixes[{i}]: the choices {choices} give no distinct next tokens after it")
            rows.append(self._prompt_ids(prompt, feature) + ids[0][:shared])
            candidates.append([x[shared] for x in ids])
        mine: list[tuple[int, list[list[float]]]] = []  # (chunk, its probabilities) of this rank's chunks
        for chunk, (start, end) in enumerate(chunks(len(rows), max(1, batch_rows))):
            if not self._computes(chunk):
                continue
            inputs = self._model_inputs(rows[start:end], features[start:end], left=True)
            logits = self.model(**inputs, logits_to_keep=1).logits[:, -1].float()  # (B, V): the next token's
            picked = logits.gather(1, torch.tensor(candidates[start:end], device=logits.device))  # (B, choices)
            mine.append((chunk, torch.softmax(picked, dim=-1).tolist()))
        return self._all_chunks(mine)

    @property
    def context_length(self) -> int | None:
        """The positions the language model takes (its config's max_position_embeddings), None if it names none."""
        config = self.model.config
        return getattr(getattr(config, "text_config", config), "max_position_embeddings", None)

    def prompt_tokens(self, prompt: str) -> int:
        """Tokens of a prompt as the model reads it, up to where the answer starts (an image counts as its one
        image token: Qwen's expansion to the image's patches comes on top)."""
        raise NotImplementedError

    def _prefix_ids(self, prefix: str) -> list[int]:
        """Token ids of the start of an answer (the target's ids without its end-of-turn token)."""
        return self._target_ids(prefix)[:-1]

    def _head_ids(self, prompt: str, feature, given: str = "") -> list[int]:
        """A training example's ids before its target: the prompt's, then those of a given answer start."""
        return self._prompt_ids(prompt, feature) + (self._prefix_ids(given) if given else [])

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
        """Whether generation with `options` can refill slots and stop early (Mllama, shared decoder on)."""
        return getattr(self.model.config, "model_type", None) == "mllama" and options.shared_mllama

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

    def _training_inputs(self, images, prompts, targets, given=None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Inputs with right padding, and labels (B, T): -100 except on the target and its end-of-turn (a
        `given` answer start, between the prompt and the target, carries no loss). A vision tower sharded for
        training gets pixels, to run inside the root's forward (FSDP2 gathers a sharded group only there);
        otherwise the inputs hold the image features (cached or computed live)."""
        pixels_in = bool(self._sharded) and self._vision_trains()
        features = [None] * len(images) if pixels_in else self.image_features(images)
        given = given or [""] * len(prompts)
        rows, label_rows = [], []
        for prompt, start, target, feature in zip(prompts, given, targets, features):
            head, tail = self._head_ids(prompt, feature, start), self._target_ids(target)
            rows.append(head + tail)
            label_rows.append([-100] * len(head) + tail)
        inputs = self._pixel_model_inputs(rows, images) if pixels_in else \
            self._model_inputs(rows, features, left=False)
        return inputs, _pad(label_rows, -100, left=False).to(self.device)

    def _pixel_model_inputs(self, rows: list[list[int]], images: list[Image.Image]) -> dict[str, torch.Tensor]:
        """Right-padded inputs holding the images' pixels, for a forward that runs the vision tower itself
        (families whose training can shard their vision tower)."""
        raise NotImplementedError

    def sft_loss(self, images: list[Image.Image], prompts: list[str], targets: list[str],
                 reduction: str = "mean", given: list[str] | None = None) -> torch.Tensor:
        """Cross-entropy over target tokens (the assistant turn, its end-of-turn token included): their mean,
        or with reduction="sum" their sum; `given`: as in `sft_backward`."""
        return self._loss(*self._training_inputs(images, prompts, targets, given), reduction=reduction)

    def _loss(self, inputs: dict[str, torch.Tensor], labels: torch.Tensor, reduction: str) -> torch.Tensor:
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
        """Backward of the batch's mean target-token loss, run as `micro_batches` forward passes; returns the
        loss. `given` (optional, one text per example, "" for none): the start of each answer, read by the model
        between its prompt and its target but not trained (no loss), as `generate`'s `prefixes` are given.

        Unpacked, each example is a row of its own and the passes go over examples sorted by length, each pass
        padded only to its own longest example (in the toy mixture one batch holds 30- and 170-token examples: a
        single padded pass wastes most of its work). With `pack` (families where `packs` is True), examples are
        packed several to a row, up to the batch's longest example (`pack_rows`), each attending only to itself
        and to its own image (`_packed_training_inputs`); the passes go over the rows. The loss and the
        gradients are those of the unpacked batch (tested against it in float64).

        Sharded for training (`shard_for_training`, a torchrun job of S ranks): rank r takes examples r, r + S,
        ... of the batch, in exactly `micro_batches` passes (a pass with no example of its own runs one at weight
        0: every rank must run as many as the others); the token count is summed over the ranks, and the loss
        scaled by S, as FSDP averages the ranks' gradients. With the vision tower training (`--train all`) the
        batch is not packed: sharded, the tower takes its pixels through the root's forward, one image a row, and
        one process runs the same rows."""
        indices = list(range(len(prompts)))
        given = given or [""] * len(prompts)
        job = self._sharded
        if job:
            indices = indices[job[0]::job[1]]
        # a training vision tower is not packed: sharded, it takes its pixels through the root's forward one
        # image a row; alone, it runs the same unpacked rows, so that any number of processes trains alike
        packing = pack and self.packs and not self._vision_trains()
        if packing:
            heads = {i: self._head_ids(prompts[i], None, given[i]) for i in [*indices, 0]}  # the image token, not its
            tails = {i: self._target_ids(targets[i]) for i in [*indices, 0]}  # features: no image needed here
            lengths = [len(heads[i]) + len(tails[i]) for i in indices]
            rows = [[indices[k] for k in row] for row in pack_rows(lengths, max(lengths, default=1))]
            size = max(1, -(-len(rows) // max(1, micro_batches)))
            groups = [rows[k:k + size] for k in range(0, len(rows), size)]
            count = sum(len(tails[i]) for i in indices)
        else:
            order = sorted(indices, key=lambda i: len(prompts[i]) + len(given[i]) + len(targets[i]))
            size = max(1, -(-len(order) // max(1, micro_batches)))
            groups = [order[k:k + size] for k in range(0, len(order), size)]
            # the target tokens (each target's ids, its end-of-turn included), counted before any pass: a
            # pass's inputs are prepared just before it, so a training vision tower holds one pass's activations
            count = sum(len(self._target_ids(targets[i])) for i in indices)
        if job:
            groups += [[] for _ in range(micro_batches - len(groups))]
        tokens, scale = count, 1
        if job:
            counts = torch.tensor([float(count)], device=self.device)  # NCCL reduces CUDA tensors only
            dist.all_reduce(counts)
            tokens, scale = int(counts.item()), job[1]
        total = 0.0
        for group in groups:
            weight = 1.0 if group else 0.0
            if packing:
                inputs, labels = self._packed_training_inputs(images, group or [[0]], heads, tails)
            else:
                group = group or [0]
                inputs, labels = self._training_inputs([images[i] for i in group], [prompts[i] for i in group],
                                                       [targets[i] for i in group], [given[i] for i in group])
            loss_sum = self._loss(inputs, labels, reduction="sum") * weight
            (loss_sum * scale / tokens).backward()
            total += loss_sum.item()
        if job:
            summed = torch.tensor([total], device=self.device)
            dist.all_reduce(summed)
            total = summed.item()
        return total / tokens

    @property
    def packs(self) -> bool:
        """Whether `sft_backward(pack=True)` packs (the family builds packed inputs)."""
        return False

    def _packed_training_inputs(self, images: list[Image.Image], rows: list[list[int]], heads: dict[int, list[int]],
                                tails: dict[int, list[int]]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Inputs and labels (R, T) of examples packed into rows (rows[r]: the examples of row r, in order):
        each example attends causally to itself only, at positions from 0, and sees only its own image."""
        raise NotImplementedError

    def shard_for_training(self, job: tuple[int, int], cpu_offload: bool = False,
                           activation_checkpointing: bool = False) -> None:
        """FSDP2 (`fully_shard`) for a torchrun job of job[1] ranks, after `begin_training`: each decoder layer
        (self- and cross-attention) its own shard group, the rest of the language model the root's (kept gathered
        from its forward to its backward: the fused loss reads the head's weight after the forward). A frozen
        vision tower ("text", "lora") stays whole on every rank, its features cached before the first step
        (`image_features`); a training one ("all") is sharded too: each of its encoder layers (local and global)
        a group, the rest of the tower one, the projector one; the images then go through the root's forward as
        pixels, since FSDP2 gathers its groups only there). With `cpu_offload` the parameters, gradients and
        optimizer state live in CPU memory and `device` stays the GPU the model was on. Parameters in float32
        (the optimizer's copies); on a GPU bf16 compute and fp32 gradient reduction; `activation_checkpointing`:
        each decoder layer's activations recomputed in the backward pass (transformers' own checkpointing, inside
        the shard groups). Mllama and the toy only (Qwen's input embeddings are made outside its forward)."""
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard
        if getattr(self.model.config, "model_type", None) != "mllama":
            raise ValueError(f"train: sharded fine-tuning supports Mllama models, not {type(self).__name__}")
        cuda = self.device.type == "cuda"
        self._compute_device = self.device
        mesh = init_device_mesh("cuda" if cuda else "cpu", (job[1],))
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if cuda \
            else MixedPrecisionPolicy()
        offload = CPUOffloadPolicy() if cpu_offload else OffloadPolicy()

        def shard(module: torch.nn.Module, **kwargs) -> None:
            fully_shard(module, mesh=mesh, mp_policy=policy, offload_policy=offload, **kwargs)

        vision_trains = self._vision_trains()
        self.model.float()
        if activation_checkpointing:
            # transformers 5.25 renamed gradient_checkpointing_enable (an alias until v6)
            enable = getattr(self.model, "activation_checkpointing_enable", None) or \
                self.model.gradient_checkpointing_enable
            enable()
        inner = self.model.model
        frozen: set[torch.nn.Parameter] = set()
        if vision_trains:
            tower = inner.vision_model
            for layer in [*tower.transformer.layers, *tower.global_transformer.layers]:
                shard(layer)
            shard(tower)
            shard(inner.multi_modal_projector)
        else:
            frozen = {p for name, p in self.model.named_parameters() if self._is_vision(name)}
        for layer in inner.language_model.layers:
            shard(layer)
        shard(self.model, reshard_after_forward=False, ignored_params=frozen or None)
        self._sharded = job

    def begin_training(self, train: str = "text", *, lora_rank: int = 16,
                       lora_alpha: float = 32.0) -> list[torch.nn.Parameter]:
        """Choose what fine-tuning updates and return those parameters: "text" freezes the vision tower (the
        default), "all" trains everything, "lora" adds LoRA adapters to the language model's projections
        (peft) and freezes the rest; `end_training` merges them back."""
        if train not in TRAIN_MODES:
            raise ValueError(f"train: expected one of {TRAIN_MODES}, got {train!r}")
        if self.device.type == "cuda":
            apply_liger_kernels(self.model)
            self.use_gpu_kernels()
        if train == "lora":
            try:
                from peft import LoraConfig, get_peft_model
            except ImportError:
                raise ValueError("train: 'lora' needs peft (pip install peft)") from None
            config = LoraConfig(r=lora_rank, lora_alpha=lora_alpha, lora_dropout=0.0, target_modules=LORA_TARGETS)
            # peft injects the adapters into self.model's own modules: self.model stays the model to call
            self._peft = get_peft_model(self.model, config)
            return [p for p in self.model.parameters() if p.requires_grad]
        params = []
        for name, p in self.model.named_parameters():
            frozen = train == "text" and self._is_vision(name)
            p.requires_grad_(not frozen)
            if not frozen:
                params.append(p)
        if train == "all":
            self._vision_fingerprint = None  # the vision weights will change
        return params

    def end_training(self) -> None:
        """Merge LoRA adapters into the weights (a plain checkpoint again); forget a stale vision fingerprint. A
        model sharded for training is left unmerged: its gathered weights go into a fresh copy instead."""
        if self._peft is not None and not self._sharded:
            self.model = self._peft.merge_and_unload()
            self._peft = None
        self._vision_fingerprint = None
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.model.eval()

    # ---- family hooks

    def _preprocessing(self) -> str:
        """What turns an image into pixels (part of the cache key)."""
        raise NotImplementedError

    def _encode_images(self, images: list[Image.Image]) -> list[ImageFeatures]:
        raise NotImplementedError

    def _prompt_ids(self, prompt: str, image: ImageFeatures) -> list[int]:
        """Token ids of a user prompt (its text) with its image, up to where the answer starts."""
        raise NotImplementedError

    def _templated_ids(self, text: str, image: ImageFeatures) -> list[int]:
        """Token ids of a prompt already through the chat template (families with one)."""
        raise NotImplementedError

    def check_prompt(self, index: int, prompt: str, templated: bool) -> None:
        """ValueError naming prompts[index] when it is not of the form asked for (raw user text, or with
        templated=True text through the chat template); this family has no chat template: raw text only."""
        if templated:
            raise ValueError(f"templated: {type(self).__name__} has no chat template; pass the prompts' text")

    def _target_ids(self, target: str) -> list[int]:
        raise NotImplementedError

    def _model_inputs(self, rows: list[list[int]], features: list[ImageFeatures], left: bool) -> dict:
        raise NotImplementedError

    def decode(self, tokens: list[int]) -> str:
        raise NotImplementedError

    def decode_raw(self, tokens: list[int]) -> str:
        """The text of tokens, white space kept (stop strings may be white space)."""
        return self.decode(tokens)

    def save(self, path: Path) -> None:
        raise NotImplementedError


LIGER_PATCHES = {"mllama": "apply_liger_kernel_to_mllama", "qwen2_vl": "apply_liger_kernel_to_qwen2_vl",
                 "qwen2_5_vl": "apply_liger_kernel_to_qwen2_5_vl"}


def apply_liger_kernels(model) -> bool:
    """liger-kernel's RMSNorm, SwiGLU and RoPE on this model's text model, in place, once; its
    fused loss off (fastjudge's own is used, and Liger's breaks on `MllamaForConditionalGeneration` in
    transformers 5.x). Returns whether the model is patched; without liger-kernel installed, warns and leaves
    the model as it is. Liger also swaps the family's RMSNorm and MLP classes and its rotary function
    module-wide (later models of the family in this process get them too; on CUDA they serve inference as
    well)."""
    done = getattr(model, "_fastjudge_liger", None)
    if done is not None:
        return done
    model._fastjudge_liger = False  # tried: a failure warns once
    name = LIGER_PATCHES.get(getattr(model.config, "model_type", None))
    if name is None:
        return False
    try:
        import liger_kernel.transformers as liger
    except ImportError:
        import warnings
        warnings.warn("liger-kernel is not installed: training runs without its RMSNorm/SwiGLU/RoPE kernels")
        return False
    patch = getattr(liger, name)
    options = dict(rope=True, rms_norm=True, swiglu=True, fused_linear_cross_entropy=False, cross_entropy=False)
    if "layer_norm" in inspect.signature(patch).parameters:
        options["layer_norm"] = False  # the vision tower's LayerNorm: not asked for, and not tested here
    try:
        patch(model=model, **options)
    except ImportError as error:  # liger 0.8.5's Qwen2-VL patch imports a class transformers 5.x lacks
        import warnings
        warnings.warn(f"liger-kernel's {name} failed ({error}): training runs without its kernels")
        return False
    model._fastjudge_liger = True
    return True


def _token_budget(rows: list[list[int]], n: int, max_new_tokens: int, budget: int | None):
    """(first, last) spans of consecutive prompts whose decoding holds at most `budget` token positions:
    prompts x n x (longest prompt + max_new_tokens), at least one prompt per span."""
    if budget is None:
        yield 0, len(rows)
        return
    first, longest = 0, 0
    for i, row in enumerate(rows):
        longest_with = max(longest, len(row))
        if i > first and (i - first + 1) * n * (longest_with + max_new_tokens) > budget:
            yield first, i
            first, longest_with = i, len(row)
        longest = longest_with
    yield first, len(rows)


def _cut(text: str, stops: list[str]) -> str:
    """`text` up to the first occurrence of any stop string."""
    cut = min((text.find(s) for s in stops if s in text), default=len(text))
    return text[:cut]


def pack_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """Examples (by index into `lengths`) packed into rows of at most `capacity` tokens, first fit in order of
    decreasing length (ties by index); an example longer than `capacity` gets a row of its own. Rows come out in
    the order they were opened, each listing its examples in the order they were placed."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(capacity - lengths[i])
    return rows


def _pad(rows: list[list[int]], value: int, left: bool) -> torch.Tensor:
    """(B, T) int64: each row padded with `value` to the longest row, on the left or on the right."""
    length = max(map(len, rows))
    out = torch.full((len(rows), length), value, dtype=torch.long)
    for i, row in enumerate(rows):
        start = length - len(row) if left else 0
        out[i, start:start + len(row)] = torch.tensor(row, dtype=torch.long)
    return out
