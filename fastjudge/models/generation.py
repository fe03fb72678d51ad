"""The generation service: batched sampling of an adapter's model (`generate`) and the verdict probabilities
read from its logits (`choice_probabilities`). A family provides the hooks (`Adapter.prompt_ids`,
`Adapter.model_inputs`, `Adapter.decode`, ...); everything else lives here: checks, batching under a row and
token budget, the split of batches between the ranks of a torchrun job, the batch store of an interrupted
stage, stop strings, and answer prefixes. Decoding itself is the engine's (`fastjudge.engine.decoding`)."""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
from PIL import Image

from fastjudge.core.sampling_params import SamplingParams
from fastjudge.data import prompts as prompt_texts
from fastjudge.engine.decoding import ChoiceCapture, decode_groups
from fastjudge.engine.options import DecodeOptions
from fastjudge.engine.vote import EarlyStop
from fastjudge.models.features import chunks

Progress = Callable[[int], None]


@torch.no_grad()
def generate(adapter, images: list[Image.Image], prompts: list[str], params: SamplingParams, *,
             batch_rows: int = 256, batch_tokens: int | None = None, progress: Progress | None = None,
             slots: int | None = None, early_stop: float = 0.0, min_votes: int = 1,
             prefixes: list[str] | None = None, options: DecodeOptions | None = None,
             templated: bool | None = None, reader: "VerdictReader | None" = None) -> list[list[str]]:
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

    With `reader` (a `VerdictReader`), the shared Mllama decoder keeps the logits of the reader's tokens at every
    step, and the reader reads each completion's verdict probabilities from them: `reader.values`, per prompt
    and completion, a list of probabilities or None where they could not be read so (a batch read back from
    the store, the generic decoder, a completion that wrote no verdict where the reader expects it).
    """
    if len(images) != len(prompts):
        raise ValueError(f"images and prompts: expected the same length, got {len(images)} and {len(prompts)}")
    if prefixes is not None and len(prefixes) != len(prompts):
        raise ValueError(f"prefixes: expected one per prompt ({len(prompts)}), got {len(prefixes)}")
    if batch_tokens is not None and batch_tokens < 1:
        raise ValueError(f"batch_tokens: expected >= 1 or None, got {batch_tokens}")
    n = params.n
    if slots is not None and not 1 <= slots <= n:
        raise ValueError(f"slots: expected in [1, n={n}] or None, got {slots}")
    if not 0 <= early_stop <= 1:
        raise ValueError(f"early_stop: expected a confidence in [0, 1] (0 = off), got {early_stop}")
    options = options or adapter.decode_options
    if (early_stop > 0 or slots is not None) and not adapter.refills_with(options):
        raise ValueError(f"early_stop, slots: {type(adapter).__name__} decodes without the shared Mllama decoder")
    if not 1 <= min_votes <= n:
        raise ValueError(f"min_votes: expected in [1, n={n}], got {min_votes}")
    stopping = None
    if early_stop > 0:
        stopping = EarlyStop(adapter.span_tables(), confidence=early_stop, min_votes=min_votes)
    for i, (image, prompt) in enumerate(zip(images, prompts)):
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"prompts[{i}]: expected a non-empty string, got {prompt!r}")
        if templated is not None:
            adapter.check_prompt(i, prompt, templated)
        if not isinstance(image, Image.Image):
            raise ValueError(f"images[{i}]: expected a PIL image, got {type(image).__name__}")
    stops = list(params.stop)
    # a stop string of L characters spans at most L tokens that each write a character; byte pieces and
    # special tokens write none, hence the margin (a late detection only costs steps: `_cut` finds it)
    # plus the steps between two looks from the host (the decoder checks stops every sync_every steps, 8 by
    # default on a GPU; a larger sync_every only costs steps)
    window = 4 * max(map(len, stops), default=0) + 16

    # a stop string is completed by a token that writes its last character: only a window holding such a token
    # (or one whose text alone is empty or a partial character, which may complete one) is decoded and searched
    last_characters = {s[-1] for s in stops if s}
    may_end: dict[int, bool] = {}

    def ends_maybe(token: int) -> bool:
        if token not in may_end:
            piece = adapter.decode_raw([token])
            may_end[token] = not piece or "\ufffd" in piece or any(c in piece for c in last_characters)
        return may_end[token]

    def stopped(tokens: list[int]) -> bool:
        if not any(ends_maybe(t) for t in tokens[-window:]):
            return False
        tail = adapter.decode_raw(tokens[-window:])
        return any(s in tail for s in stops)

    adapter.model.eval()
    adapter.use_gpu_kernels(options)
    per_batch = max(1, batch_rows // (slots or n))
    stored = None
    if adapter.batch_store is not None:
        # everything that decides the completions besides the prompts and images: the weights, where they
        # run, how decoding runs, and the sampling settings
        stored = adapter.batch_store.call(images, prompts, prefixes, dict(
            weights=adapter.weights_digest(), device=adapter.device.type, options=repr(options),
            family=type(adapter).__name__, n=n, max_new_tokens=params.max_new_tokens,
            temperature=params.temperature, top_k=params.top_k, top_p=params.top_p, min_p=params.min_p,
            seed=params.seed, stop=stops, batch_rows=batch_rows, batch_tokens=batch_tokens, slots=slots,
            early_stop=early_stop, min_votes=min_votes, templated=templated,
            **({"verdicts": True} if reader is not None and reader.ids is not None else {})))
    reading = reader is not None and reader.ids is not None and prefixes is None
    choice_ids = torch.tensor(reader.ids, device=adapter.device) if reading else None  # (C,): what decoding keeps
    # (chunk, its completions, or with a reader (completions, probabilities) per prompt) of this rank's chunks
    mine: list[tuple[int, list]] = []
    for chunk, (start, end) in enumerate(chunks(len(prompts), per_batch)):
        if not computes(adapter, chunk):
            continue  # another rank's chunk
        record = stored.load_record(chunk, end - start) if stored is not None else None
        if record is not None:
            done = record["completions"]
            if reading:  # the verdicts read when the batch was made, stored with it; else a forward pass reads them
                verdicts = record["verdicts"] or [[None] * len(texts) for texts in done]
                done = list(zip(done, verdicts))
            mine.append((chunk, done))
            if progress:
                progress(end - start)
            continue
        out: list[list[str]] = []
        read: list[list] = []  # with a reader: per prompt, each completion's probabilities (or None)
        features = adapter.image_features(images[start:end])
        encode = adapter.templated_ids if templated else adapter.prompt_ids
        rows = [encode(p, f) for p, f in zip(prompts[start:end], features)]
        if prefixes is not None:
            rows = [row + adapter.prefix_ids(x) for row, x in zip(rows, prefixes[start:end])]
        adapter.check_lengths(rows, start)
        for part, (first, last) in enumerate(_token_budget(rows, slots or n, params.max_new_tokens, batch_tokens)):
            inputs = adapter.model_inputs(rows[first:last], features[first:last], left=True)
            # keyed by the batch's place in the whole list (chunk, part of it), never by the rank: any
            # number of processes draws what one draws
            generator = torch.Generator(device=adapter.device).manual_seed(
                params.seed * 1_000_003 + chunk + (part << 32))
            capture = ChoiceCapture(choice_ids) if reading else None
            groups = decode_groups(adapter.model, inputs, max_new_tokens=params.max_new_tokens,
                                   eos_ids=adapter.eos_ids, n=n, temperature=params.temperature, top_k=params.top_k,
                                   top_p=params.top_p, min_p=params.min_p, generator=generator,
                                   stop=stopped if stops else None, slots=slots, early_stop=stopping,
                                   options=options, shared=adapter.refills_with(options), capture=capture)
            texts = [[_cut(adapter.decode(row), stops) for row in group] for group in groups]
            if reading:
                logits = capture.values or [[None] * len(group) for group in groups]
                read.extend([reader.read(text, row, seen) for text, row, seen in zip(*triple)]
                            for triple in zip(texts, groups, logits))
            if prefixes is not None:
                texts = [[adapter.join_prefix(x, t) for t in group]
                         for x, group in zip(prefixes[start + first:start + last], texts)]
            out.extend(texts)
            if progress:
                progress(last - first)
        if stored is not None:
            stored.save(chunk, out, read if reading else None)
        mine.append((chunk, list(zip(out, read)) if reading else out))
    # every rank returns every completion: the stages after generation run whole on each rank
    results = all_chunks(adapter, mine)
    if not reading:
        return results
    reader.values = [probabilities for _, probabilities in results]
    return [texts for texts, _ in results]

def computes(adapter, chunk: int) -> bool:
    """Whether this process computes batch `chunk` of a call: every batch alone, every size-th in a torchrun
    job (`shard`)."""
    return adapter.shard is None or chunk % adapter.shard[1] == adapter.shard[0]

def all_chunks(adapter, mine: list[tuple[int, list]]) -> list:
    """Every batch's results of a call, in order, from this process's (chunk, results) pairs; in a torchrun
    job the ranks exchange theirs, so that every rank returns them all."""
    if adapter.shard is not None:
        gathered: list = [None] * adapter.shard[1]
        dist.all_gather_object(gathered, mine)
        mine = [pair for rank in gathered for pair in rank]
    return [result for _, part in sorted(mine, key=lambda pair: pair[0]) for result in part]

def choice_split(adapter, prefix: str, choices: tuple[str, ...]) -> tuple[list[int], list[int] | None]:
    """The tokens of `prefix` followed by any of `choices` up to where the choices part (the tokens they
    share), and each choice's next token there; None for the latter where the choices give no distinct next
    tokens (one's tokens are those of another)."""
    ids = [adapter.prefix_ids(prefix + choice) for choice in choices]
    shared = 0
    while all(len(x) > shared for x in ids) and len({x[shared] for x in ids}) == 1:
        shared += 1
    if any(len(x) <= shared for x in ids) or len({x[shared] for x in ids}) < len(choices):
        return ids[0][:shared], None
    return ids[0][:shared], [x[shared] for x in ids]


@torch.no_grad()
def choice_probabilities(adapter, images: list[Image.Image], prompts: list[str], prefixes: list[str],
                         choices: tuple[str, ...], batch_rows: int = 32) -> list[list[float]]:
    """For each (image, prompt, answer start), the probability of each of `choices` as what the answer says
    next, read from the logits (no sampling): the softmax over the logits of each choice's first token after
    the longest token run the choices share, so renormalized over the choices. A choice whose tokens are
    those of another (nothing tells them apart) is a ValueError. With `shard` set (a torchrun job), each
    rank reads every size-th batch and every rank returns them all, as `generate` does."""
    if not len(images) == len(prompts) == len(prefixes):
        raise ValueError(f"images, prompts, prefixes: expected the same length, got {len(images)}, "
                         f"{len(prompts)} and {len(prefixes)}")
    adapter.model.eval()
    adapter.use_gpu_kernels()
    features = adapter.image_features(images)
    rows, candidates = [], []
    for i, (prompt, prefix, feature) in enumerate(zip(prompts, prefixes, features)):
        start, next_ids = choice_split(adapter, prefix, choices)
        if next_ids is None:
            raise ValueError(f"prefixes[{i}]: the choices {choices} give no distinct next tokens after it")
        rows.append(adapter.prompt_ids(prompt, feature) + start)
        candidates.append(next_ids)
    adapter.check_lengths(rows)
    mine: list[tuple[int, list[list[float]]]] = []  # (chunk, its probabilities) of this rank's chunks
    for chunk, (start, end) in enumerate(chunks(len(rows), max(1, batch_rows))):
        if not computes(adapter, chunk):
            continue
        inputs = adapter.model_inputs(rows[start:end], features[start:end], left=True)
        logits = adapter.model(**inputs, logits_to_keep=1).logits[:, -1].float()  # (B, V): the next token's
        picked = logits.gather(1, torch.tensor(candidates[start:end], device=logits.device))  # (B, choices)
        mine.append((chunk, torch.softmax(picked, dim=-1).tolist()))
    return all_chunks(adapter, mine)



class VerdictReader:
    """Reads a judgment's verdict probabilities from the logits its own decoding drew the verdict from, instead
    of a second forward pass over the prompt and reasoning (`choice_probabilities`): where the completion's
    tokens start with exactly the tokens `choice_probabilities` would feed (the text up to its verdict's "[[",
    `data.prompts.verdict_prefix`), the logits at the next step are those it would read, and the probability of
    each choice is their softmax over the choices' tokens. `ids`: the choices' tokens after a verdict's lead-in,
    the ones the decoder keeps; a completion whose choices tokenize otherwise, or that wrote no verdict, is
    left to `choice_probabilities` (None)."""

    def __init__(self, adapter, choices: tuple[str, ...]):
        self.adapter, self.choices, self.style = adapter, choices, adapter.judge_style
        # None where the choices give no distinct tokens after a lead-in: nothing is read then
        self.ids = choice_split(adapter, prompt_texts.verdict_prefix("the reasoning", self.style), choices)[1]
        self.values: list[list[list[float] | None]] | None = None

    def read(self, text: str, tokens: list[int], logits: torch.Tensor | None) -> list[float] | None:
        """The choices' probabilities of one completion (its text, generated tokens and their captured logits,
        (len(tokens), C)); None where they cannot be read from them."""
        if logits is None or prompt_texts.VERDICT_START not in text:
            return None
        start, ids = choice_split(self.adapter, prompt_texts.verdict_prefix(text, self.style), self.choices)
        if ids != self.ids or len(tokens) <= len(start) or tokens[:len(start)] != start:
            return None
        return torch.softmax(logits[len(start)], dim=-1).tolist()


def judgments(adapter, images: list[Image.Image], prompts: list[str], params: SamplingParams, *,
              batch_rows: int = 32, batch_tokens: int | None = None, progress: Progress | None = None,
              probabilities: bool = True) -> tuple[list[list[str]], list[list[float]] | None]:
    """A judge's judgments, the reasoning and then the verdict: `params.n` texts per (image, judge prompt), and for
    each the probability of the answer shown first, read from the logits where the verdict's letter comes
    (`choice_probabilities` after `data.prompts.verdict_prefix`, over the judge style's two letters); None with
    `probabilities` False (a prompt that does not ask for the verdict in that form). Where the decoding itself
    drew the verdict after exactly those tokens, the probabilities are read from its logits (`VerdictReader`),
    and only the other judgments take the second forward pass."""
    style = adapter.judge_style
    reader = VerdictReader(adapter, prompt_texts.VERDICT_CHOICES[style]) if probabilities else None
    outputs = adapter.generate(images, prompts, params, batch_rows=batch_rows, batch_tokens=batch_tokens,
                               progress=progress, reader=reader)
    if not probabilities:
        return outputs, None
    values = reader.values or [[None] * len(texts) for texts in outputs]
    left = [(row, i, text) for row, texts in enumerate(outputs) for i, text in enumerate(texts)
            if values[row][i] is None]
    if left:
        read = adapter.choice_probabilities([images[row] for row, _, _ in left], [prompts[row] for row, _, _ in left],
                                            [prompt_texts.verdict_prefix(text, style) for _, _, text in left],
                                            prompt_texts.VERDICT_CHOICES[style], batch_rows=batch_rows)
        for (row, i, _), p in zip(left, read):
            values[row][i] = p
    return outputs, [[p[0] for p in row] for row in values]


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

