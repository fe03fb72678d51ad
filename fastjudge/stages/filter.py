"""Stage 2, filter: the current judge judges each synthetic pair in both orders; keep agreeing pairs.

For each pair the judge sees (good, bad) as (A, B) and (bad, good) as (A, B), writes its reasoning and a
verdict. A pair is kept only when both verdicts pick the synthetic preference (A, then B). Each kept pair gives
two training traces (the judge's own outputs), one with verdict A and one with verdict B, so the kept set is
balanced by construction.

How the judgments are drawn (`FilterOptions.reasoning`):
- "greedy" (default): the reasoning is the judge's greedy reasoning and only the verdict is sampled, at
  `FilterOptions.temperature`, after it. The judge is then trained on reasoning it would write anyway: sampled
  reasoning is noisier than greedy reasoning, and training on it wears down what the judge checks (measured on
  the toy: the count checks' accuracy fell from 0.73 to 0.56 over three iterations with sampled reasoning).
- "sampled": the whole judgment is sampled at `FilterOptions.temperature`.
The verdict has to be sampled: a greedy judge with a position bias would say A in both orders and keep nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tqdm import tqdm

from fastjudge.data import prompts as prompt_texts
from fastjudge.data.io import load_images
from fastjudge.models import Adapter


@dataclass(frozen=True)
class FilterOptions:
    """How the judge judges the pairs (the loop's `LoopConfig.filter_options()`)."""
    judge_tokens: int = 1024  # new tokens per judgment
    temperature: float = 1.0  # the verdict's (and with reasoning="sampled", the whole judgment's)
    top_k: int = 50
    top_p: float = 0.9
    reasoning: str = "greedy"  # "greedy" or "sampled" (module docstring)
    batch_rows: int = 32
    batch_tokens: int | None = None
    keep_all: bool = False  # the "no-filter" ablation: every judgment becomes a trace, kept or not


@dataclass
class FilterResult:
    judgments: list[dict]  # one per judge call
    traces: list[dict]  # SFT examples: {"image", "prompt", "target", "pair", "verdict"}
    stats: dict[str, int] = field(default_factory=dict)


def run(judge: Adapter, pairs: list[dict], options: FilterOptions, seed: int) -> FilterResult:
    style = judge.judge_style
    images, judge_prompts, expected = [], [], []
    for pair, image in zip(pairs, load_images([pair["image"] for pair in pairs])):
        for a, b, verdict in ((pair["good"], pair["bad"], "A"), (pair["bad"], pair["good"], "B")):
            images.append(image)
            judge_prompts.append(prompt_texts.judge_prompt(pair["instruction"], a, b, style))
            expected.append(verdict)
    outputs = judge_pairs(judge, images, judge_prompts, options, seed)
    judgments, traces = [], []
    stats = {"pairs": len(pairs), "kept": 0, "one_order": 0, "neither": 0, "unparsed_calls": 0}
    for i, pair in enumerate(pairs):
        calls = []
        for j in (2 * i, 2 * i + 1):
            verdict = prompt_texts.parse_verdict(outputs[j])
            stats["unparsed_calls"] += verdict is None
            calls.append(verdict == expected[j])
            judgments.append({"pair": i, "id": pair["id"], "order": "good_first" if expected[j] == "A" else "bad_first",
                              "output": outputs[j], "verdict": verdict, "expected": expected[j]})
        # the "no-filter" ablation keeps every judgment, whatever its verdict; a kept pair's verdicts are the
        # expected ones
        if options.keep_all or all(calls):
            stats["kept"] += 1
            for j in (2 * i, 2 * i + 1):
                traces.append({"image": pair["image"], "prompt": judge_prompts[j], "target": outputs[j],
                               "pair": i, "verdict": judgments[j]["verdict"]})
        elif any(calls):
            stats["one_order"] += 1
        else:
            stats["neither"] += 1
    return FilterResult(judgments, traces, stats)


VERDICT_TOKENS = 8  # "[[ A ]]" and its end of turn, with room to spare


def judge_pairs(judge: Adapter, images: list, judge_prompts: list[str], options: FilterOptions, seed: int) -> list[str]:
    """One judgment per prompt, drawn as `options.reasoning` says (see the module's docstring)."""
    sample = dict(temperature=options.temperature, top_k=options.top_k, top_p=options.top_p,
                  batch_rows=options.batch_rows, batch_tokens=options.batch_tokens, seed=seed)
    if options.reasoning == "sampled":
        with tqdm(total=len(judge_prompts), desc="filter", unit="judgment") as bar:
            return [c[0] for c in judge.generate(images, judge_prompts, max_new_tokens=options.judge_tokens,
                                                 progress=bar.update, **sample)]
    with tqdm(total=len(judge_prompts), desc="filter: reasoning", unit="judgment") as bar:
        greedy = [c[0] for c in judge.generate(images, judge_prompts, max_new_tokens=options.judge_tokens,
                                               temperature=0.0, batch_rows=options.batch_rows,
                                               batch_tokens=options.batch_tokens, seed=seed, progress=bar.update)]
    # the verdict is sampled after the greedy reasoning; an output without a verdict stays as it is (unparsed)
    splits = [prompt_texts.split_at_verdict(text) for text in greedy]
    open_verdict = [i for i, split in enumerate(splits) if split is not None]
    prefixes = [splits[i][0] for i in open_verdict]
    with tqdm(total=len(open_verdict), desc="filter: verdict", unit="judgment") as bar:
        verdicts = judge.generate([images[i] for i in open_verdict], [judge_prompts[i] for i in open_verdict],
                                  max_new_tokens=VERDICT_TOKENS, prefixes=prefixes, progress=bar.update,
                                  **sample | {"seed": seed + 1})
    outputs = list(greedy)
    for i, (text,) in zip(open_verdict, verdicts):
        outputs[i] = text
    return outputs
