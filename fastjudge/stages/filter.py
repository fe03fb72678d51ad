"""Stage 2, filter: the current judge judges each synthetic pair in both orders; keep agreeing pairs.

For each pair the judge sees (good, bad) as (A, B) and (bad, good) as (A, B) and writes `FilterOptions.judgment.n`
judgments in each order, each its reasoning and a verdict. A pair is kept when at least one judgment in each order
picks the synthetic preference (A, then B): a rejection-sampling filter, which gives a pair whose item is hard
for the judge more than one chance to show a right judgment. A kept pair gives the same number of training traces
in each order (`select_traces`), the judge's own agreeing judgments, so the kept set is balanced by construction.

How the judgments are drawn (`FilterOptions.reasoning`):
- "sampled" (default, the paper's recipe): the whole judgment, reasoning and verdict, is sampled at
  `FilterOptions.judgment`'s temperature; fine-tuning then trains the reasoning of the judgments that agreed with the
  synthetic preference as well as their verdicts.
- "greedy": the reasoning is the judge's greedy reasoning and only the verdict is sampled after it. The judge is
  then trained on reasoning it would write anyway (with `--train-loss verdict`, on the verdict alone).
The verdict has to be sampled: a greedy judge with a position bias would say A in both orders and keep nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tqdm import tqdm

from fastjudge.core.sampling_params import SamplingParams
from fastjudge.data import prompts as prompt_texts
from fastjudge.data.images import load_images
from fastjudge.models import Adapter


@dataclass(frozen=True)
class FilterOptions:
    """How the judge judges the pairs (the loop's `LoopConfig.filter_options()`)."""
    # the judgments: n per pair and order (k of the rejection-sampling filter), each up to max_new_tokens; the
    # sampling of the whole judgment (with reasoning="greedy", of the verdict after greedy reasoning)
    judgment: SamplingParams = SamplingParams(n=1, max_new_tokens=1024, temperature=1.0, top_k=50, top_p=0.9)
    reasoning: str = "sampled"  # "sampled" or "greedy" (module docstring)
    traces_per_order: int = 1  # at most this many agreeing judgments of each order become traces
    batch_rows: int = 32
    batch_tokens: int | None = None
    keep_all: bool = False  # the "no-filter" ablation: every pair gives traces, its first judgments in each order


@dataclass
class FilterResult:
    judgments: list[dict]  # one per judgment: k per pair and order, each with its "sample" index
    traces: list[dict]  # SFT examples: {"image", "prompt", "target", "pair", "verdict"}
    stats: dict[str, int] = field(default_factory=dict)


def select_traces(good_first: list[bool], bad_first: list[bool], per_order: int) -> tuple[list[int], list[int]]:
    """The keep rule. good_first[i] / bad_first[i]: whether judgment i of the pair shown good-first / bad-first
    picked the synthetic preference. Returns the indices of the judgments that become traces in each order: the
    first m agreeing ones of each, m = min(agreeing good-first, agreeing bad-first, per_order), so a kept pair
    (m > 0) gives as many A verdicts as B verdicts; ([], []) when the pair is dropped."""
    agree_first = [i for i, ok in enumerate(good_first) if ok]
    agree_second = [i for i, ok in enumerate(bad_first) if ok]
    m = min(len(agree_first), len(agree_second), per_order)
    return agree_first[:m], agree_second[:m]


def run(judge: Adapter, pairs: list[dict], options: FilterOptions, seed: int) -> FilterResult:
    """Judge each pair in both orders, `options.judgment.n` times each, and keep it by `select_traces`. Stats count
    the pairs kept, those with an agreeing judgment in one order only, in neither, and unparsed judgments."""
    style = judge.judge_style
    images, judge_prompts, expected = [], [], []
    for pair, image in zip(pairs, load_images([pair["image"] for pair in pairs])):
        for a, b, verdict in ((pair["good"], pair["bad"], "A"), (pair["bad"], pair["good"], "B")):
            images.append(image)
            judge_prompts.append(prompt_texts.judge_prompt(pair["instruction"], a, b, style))
            expected.append(verdict)
    outputs = judge_pairs(judge, images, judge_prompts, options, seed)  # (2 x pairs) lists of k judgments
    judgments, traces = [], []
    stats = {"pairs": len(pairs), "kept": 0, "one_order": 0, "neither": 0, "unparsed_calls": 0}
    for i, pair in enumerate(pairs):
        agrees, verdicts = [], []  # per order, per sample
        for j in (2 * i, 2 * i + 1):
            order = "good_first" if expected[j] == "A" else "bad_first"
            agrees.append([])
            verdicts.append([])
            for s, output in enumerate(outputs[j]):
                verdict = prompt_texts.parse_verdict(output)
                stats["unparsed_calls"] += verdict is None
                agrees[-1].append(verdict == expected[j])
                verdicts[-1].append(verdict)
                judgments.append({"pair": i, "id": pair["id"], "order": order, "sample": s, "output": output,
                                  "verdict": verdict, "expected": expected[j]})
        # the "no-filter" ablation: as many traces as a kept pair gives, the first judgments whatever their verdicts
        if options.keep_all:
            chosen = select_traces([True] * len(outputs[2 * i]), [True] * len(outputs[2 * i + 1]),
                                   options.traces_per_order)
        else:
            chosen = select_traces(agrees[0], agrees[1], options.traces_per_order)
        if chosen[0] and chosen[1]:
            stats["kept"] += 1
            for order, (j, samples) in enumerate(zip((2 * i, 2 * i + 1), chosen)):
                for s in samples:
                    traces.append({"image": pair["image"], "prompt": judge_prompts[j], "target": outputs[j][s],
                                   "pair": i, "verdict": verdicts[order][s]})
        elif any(agrees[0]) or any(agrees[1]):
            stats["one_order"] += 1
        else:
            stats["neither"] += 1
    return FilterResult(judgments, traces, stats)


VERDICT_TOKENS = 8  # "[[ A ]]" and its end of turn, with room to spare


def judge_pairs(judge: Adapter, images: list, judge_prompts: list[str], options: FilterOptions,
                seed: int) -> list[list[str]]:
    """`options.judgment.n` judgments per prompt, drawn as `options.reasoning` says (see the module's docstring)."""
    k = options.judgment.n
    batching = dict(batch_rows=options.batch_rows, batch_tokens=options.batch_tokens)
    if options.reasoning == "sampled":
        with tqdm(total=len(judge_prompts), desc="filter", unit="prompt") as bar:
            return judge.generate(images, judge_prompts, options.judgment.replace(seed=seed), progress=bar.update,
                                  **batching)
    with tqdm(total=len(judge_prompts), desc="filter: reasoning", unit="judgment") as bar:
        greedy = [c[0] for c in judge.generate(images, judge_prompts, SamplingParams(
            max_new_tokens=options.judgment.max_new_tokens, seed=seed), progress=bar.update, **batching)]
    # the verdict is sampled after the greedy reasoning; an output without a verdict stays as it is (unparsed)
    splits = [prompt_texts.split_at_verdict(text) for text in greedy]
    open_verdict = [i for i, split in enumerate(splits) if split is not None]
    prefixes = [splits[i][0] for i in open_verdict]
    with tqdm(total=len(open_verdict), desc="filter: verdict", unit="judgment") as bar:
        verdicts = judge.generate([images[i] for i in open_verdict], [judge_prompts[i] for i in open_verdict],
                                  options.judgment.replace(max_new_tokens=VERDICT_TOKENS, seed=seed + 1),
                                  prefixes=prefixes, progress=bar.update, **batching)
    outputs = [[text] * k for text in greedy]
    for i, texts in zip(open_verdict, verdicts):
        outputs[i] = list(texts)
    return outputs
