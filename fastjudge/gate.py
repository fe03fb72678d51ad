"""The input gate: every command's inputs pass here before anything reaches a model.

`iterate` and each single-stage command (synth, filter, train, eval, judge, rank) read their files through one
`Gate(out)`:
- files are read with counted skips (`fastjudge.data`): a bad line names its file, line and field;
- images are checked within a pixel budget from their header before they are decoded (`data.images.MAX_DECODE_PIXELS`;
  a larger JPEG decodes at a reduced scale) and a prompt pool's images are staged inside the run folder, RGB and at
  most `max_image_pixels` pixels (`stage_prompt_images`);
- once the model is loaded, every text that will reach it is measured in its tokens (`Gate.fit`): a row whose
  prompt, with the tokens the model will write after it, would not fit the model's context is a counted skip.

Every skip goes to out/skipped.jsonl (the file, line and reason of each), and the count is said on stderr. The
engine refuses a prompt longer than the context (`Adapter.check_lengths`): the last line of defence, never met by
a run whose inputs came through here.
"""

from __future__ import annotations

import dataclasses
import random
import sys
from pathlib import Path
from typing import Callable, Sequence

from fastjudge import data
from fastjudge.data import parquet
from fastjudge.core.dist import World
from fastjudge.data import prompts as prompt_texts
from fastjudge.models import Adapter

Row = object  # a prompt record, a pair, a trace or a benchmark item


class Gate:
    """The inputs of one command writing to `out`: what was skipped, and why, goes to out/skipped.jsonl."""

    def __init__(self, out: Path | str, world: World = World(), skipped_name: str = "skipped.jsonl"):
        """out: the folder that gets `skipped_name`, the counted skips (and, for a prompt pool, the staged images);
        world: in a torchrun job, rank 0 writes."""
        self.out, self.world = Path(out), world
        self.path = self.out / skipped_name
        self.skips: list[data.Skip] = []
        self.row_lines: dict[str, list[int]] = {}  # file -> the line of each row read from it here, in order

    # ---- files

    def prompts(self, path: Path | str, max_image_pixels: int, columns: str | None = None, sample: int | None = None,
                seed: int = 0) -> list[data.PromptRecord]:
        """A prompt pool's usable records, their images staged in the run folder: JSONL (`stage_prompt_images`) or
        parquet (`data.parquet`, images extracted under their content's hash; `columns`: the column mapping).
        With `sample`, that many prompts drawn uniformly from the pool (seeded), in the pool's order."""
        if parquet.is_parquet(path):
            records, skips, counts = parquet.load_prompts(path, parquet.Columns.parse(columns), self.out / "images",
                                                          max_image_pixels, sample, seed)
            records = self._usable(records, skips, path, "prompt rows", "prompts", "prompt")
            if self.world.main:
                data.write_json(self.out / "inputs.json", {"images": counts, "max_image_pixels": max_image_pixels})
            return records
        if columns:
            raise ValueError(f"prompt_columns: {path} is JSONL, whose fields are fixed (README); the columns are for "
                             "parquet")
        records = self._usable(*data.load_prompts(path), path, "prompt lines", "prompts", "prompt")
        if sample is not None and sample < len(records):
            keep = sorted(random.Random(seed).sample(range(len(records)), sample))
            records = [records[i] for i in keep]
        return stage_prompt_images(records, self.out, max_image_pixels, write=self.world.main)

    def bench(self, fmt: str, path: Path | str, images: Path | str | None) -> tuple[list[dict], list[dict]]:
        """The benchmark items the judge can run on, and the items the score counts (those too whose image is
        missing or was skipped here: they count as unpredicted, as `fastjudge score` counts them). A parquet
        benchmark's images are extracted to out/bench-images."""
        items, skips = data.load_bench(fmt, path, images, extract_to=self.out / "bench-images")
        items = self._usable(items, skips, path, "benchmark entries", "data", "item")
        self.row_lines[str(path)] = [item["line"] for item in items]
        return items, data.load_bench(fmt, path, images, check_images=False)[0]

    def pairs(self, path: Path | str) -> list[dict]:
        """A pairs file's usable pairs (`fastjudge filter`)."""
        return self._usable(*data.load_pairs(path, self._lines(path)), path, "pair lines", "--pairs", "pair")

    def traces(self, path: Path | str) -> list[dict]:
        """An SFT file's usable traces (`fastjudge train`)."""
        return self._usable(*data.load_traces(path, self._lines(path)), path, "trace lines", "--sft", "trace")

    def judge_pairs(self, path: Path | str, images: Path | str | None) -> list[dict]:
        """A `fastjudge judge` pairs file's usable pairs."""
        return self._usable(*data.load_judge_pairs(path, images, self._lines(path)), path, "pair lines", "--pairs",
                            "pair")

    def candidates(self, path: Path | str, images: Path | str | None) -> list[dict]:
        """A `fastjudge rank` candidates file's usable lines."""
        return self._usable(*data.load_candidates(path, images, self._lines(path)), path, "candidate lines",
                            "--candidates", "line")

    def _usable(self, rows: list, skips: list[data.Skip], path: Path | str, what: str, flag: str, noun: str) -> list:
        """`rows`, with `skips` counted; a ValueError naming `flag` and `path` when none is usable."""
        self.skip(skips, what)
        if not rows:
            raise ValueError(f"{flag}: no usable {noun} in {path} (see {self.path})")
        return rows

    def _lines(self, path: Path | str) -> list[int]:
        """A fresh list to hold the line of each row read from `path`, in order (what a skip decided later names)."""
        self.row_lines[str(path)] = []
        return self.row_lines[str(path)]

    # ---- token limits (the model loaded)

    def fit(self, adapter: Adapter, rows: Sequence[Row], tokens_of: Callable[[Row], int], new_tokens: int,
            where: Callable[[int, Row], tuple[str, int]], field: str, limit: int | None = None) -> list:
        """The rows whose longest prompt (`tokens_of(row)` tokens) leaves `new_tokens` of the model's context for
        what it writes; the others are counted skips naming `field`. `limit` (a user's --max-prompt-tokens)
        replaces the context's bound. Raises when no row is left."""
        if limit is None:
            context = adapter.context_length
            if context is None:
                return list(rows)
            limit = context - new_tokens
        kept, skips = [], []
        for i, row in enumerate(rows):
            tokens = tokens_of(row)
            if tokens > limit:
                file, line = where(i, row)
                skips.append(data.Skip(file, line, f"field {field!r}: {tokens} tokens, more than the {limit} a "
                                       f"prompt may have ({adapter.context_length} of context, {new_tokens} for "
                                       "the answer)"))
            else:
                kept.append(row)
        self.skip(skips, f"rows longer than {limit} tokens")
        if rows and not kept:
            raise ValueError(f"every input is longer than the {limit} tokens the model takes (see {self.path})")
        return kept

    def fit_prompts(self, adapter: Adapter, records: list[data.PromptRecord], answer_tokens: int,
                    max_prompt_tokens: int | None = None) -> list[data.PromptRecord]:
        """Synthesis: the instruction with the answer, and the degrading rewrite, which reads the instruction
        and an answer of up to `answer_tokens` and writes as many again."""
        def tokens(record: data.PromptRecord) -> int:
            answer = adapter.prompt_tokens(record.instruction)
            rewrite = adapter.prompt_tokens(prompt_texts.rewrite_prompt(record.instruction, "x", adapter.judge_style))
            return max(answer, rewrite + answer_tokens)
        return self.fit(adapter, records, tokens if max_prompt_tokens is None else
                        (lambda r: adapter.prompt_tokens(r.instruction)), answer_tokens,
                        lambda i, r: (r.source, r.line), "instruction", max_prompt_tokens)

    def fit_pairs(self, adapter: Adapter, pairs: list[dict], judge_tokens: int, source: Path | str) -> list[dict]:
        """The filter: each pair's judge prompt (instruction and both responses) with a judgment after it."""
        return self.fit(adapter, pairs, lambda p: adapter.prompt_tokens(prompt_texts.judge_prompt(
            p["instruction"], p["good"], p["bad"], adapter.judge_style)), judge_tokens,
            self._row_line(source), "good, bad")

    def fit_traces(self, adapter: Adapter, traces: list[dict], source: Path | str) -> list[dict]:
        """Fine-tuning: each trace's prompt and target together."""
        return self.fit(adapter, traces, lambda t: adapter.prompt_tokens(t["prompt"]) + adapter.target_tokens(
            t["target"]), 0, self._row_line(source), "prompt, target")

    def fit_judged(self, adapter: Adapter, items: list[dict], judge_tokens: int,
                   prompt_of: Callable[[dict, str, str], str], answers: Callable[[dict], list[str]],
                   source: Path | str, field: str) -> list[dict]:
        """Eval, judge, rank: each item's judge prompt on its two longest answers, with a judgment after it."""
        def tokens(item: dict) -> int:
            a, b = sorted(answers(item), key=len, reverse=True)[:2]
            return adapter.prompt_tokens(prompt_of(item, a, b))
        return self.fit(adapter, items, tokens, judge_tokens, self._row_line(source), field)

    def _row_line(self, source: Path | str) -> Callable[[int, Row], tuple[str, int]]:
        """(file, line) of row i of `source`: as this gate read it, or line i + 1 of a run's own file."""
        lines = self.row_lines.get(str(source))
        return lambda i, row: (str(source), lines[i] if lines else i + 1)

    # ---- the record

    def skip(self, skips: list[data.Skip], what: str) -> None:
        """Add counted skips to out/skipped.jsonl (rank 0 writes) and say how many on stderr."""
        if not skips:
            if not self.skips and self.world.main:
                data.write_skips(self.path, [])  # a rerun's file names this run's skips only
            return
        self.skips.extend(skips)
        if self.world.main:
            data.write_skips(self.path, self.skips)
            print(f"skipped {len(skips)} {what}: see {self.path}", file=sys.stderr)


def stage_prompt_images(records: list[data.PromptRecord], out: Path, max_pixels: int,
                        write: bool = True) -> list[data.PromptRecord]:
    """The records with their images inside the run folder: an image outside it gets a copy under out/images/
    (hard-linked, or converted to RGB and downscaled to `max_pixels`), so that the run can be moved; images
    already inside (the toy pool's) are taken as they are. What was done is counted in out/inputs.json and said
    when an image was changed."""
    counts: dict[str, int] = {}
    staged: dict[str, str] = {}
    out = out.resolve()
    for record in records:
        source = Path(record.image)
        if record.image in staged or source.is_relative_to(out):
            continue
        target, action = data.stage_image(source, out / "images", max_pixels)
        staged[record.image] = str(target)
        counts[action] = counts.get(action, 0) + 1
    if write:  # rank 0 of a job; the others find its copies ("reused")
        data.write_json(out / "inputs.json", {"images": counts, "max_image_pixels": max_pixels})
    changed = {action: n for action, n in counts.items() if action in ("converted", "downscaled")}
    if changed and write:
        print(f"prompt images: {', '.join(f'{n} {action}' for action, n in changed.items())} "
              f"(RGB, at most {max_pixels} pixels; copies under {out / 'images'})", file=sys.stderr)
    return [dataclasses.replace(r, image=staged.get(r.image, r.image)) for r in records]
