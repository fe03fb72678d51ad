"""What a recipe costs in GPU-hours, stage by stage, with fastjudge and with the stack a user would otherwise
assemble (transformers `generate` in its fastest measured setting, eager or static cache with `torch.compile`; a
transformers fine-tuning loop with Liger's fused loss).

The work of each stage follows from the recipe (`Recipe`: prompt count, samples, token lengths, kept fraction,
iterations, epochs); the time from measured rates (`Rates`, a JSON file that `bench/paper_scale.py` writes, or
that `seed_rates` builds from committed bench results that measured the same thing). GPU-hours = work / rate,
with the rate per GPU: data-parallel stages are assumed to scale linearly with the GPU count (named in the
output). A stage without a measured rate is reported as such, never filled in with a guess.

    fastjudge cost                       # the paper's recipe, the newest rates file under bench/results/
    fastjudge cost --rates FILE --set prompts=20000,epochs=3 --out cost.json
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path

# ---- the recipe

PAPER = "paper"  # the source of a number the paper (arXiv 2512.05145) publishes


@dataclass(frozen=True)
class Recipe:
    """One self-training run. Each field's source is in `SOURCES`: the paper, or an assumption and why."""
    prompts: int = 100_000  # (image, instruction) prompts synthesized from in each iteration
    closed_fraction: float = 0.5  # share of closed-ended prompts (number, option, short answer)
    n_samples: int = 16  # samples per closed prompt
    prompt_tokens: int = 100  # instruction text (the image is one token: Mllama attends to it by cross-attention)
    closed_answer_tokens: int = 200  # one closed sample: short reasoning, then the answer
    open_answer_tokens: int = 300  # one open answer (caption, long answer)
    rewrite_tokens: int = 300  # the deliberately degraded copy of an open answer
    closed_pair_fraction: float = 0.6  # closed prompts whose majority (5+ votes) has a rival answer: one pair each
    judge_template_tokens: int = 150  # the judge prompt's own words around the question and the two answers
    judge_reasoning_tokens: int = 300  # reasoning, then the verdict
    kept_fraction: float = 0.4  # pairs whose two verdicts (both orders) match the synthetic preference
    iterations: int = 4
    epochs: int = 5  # fine-tuning epochs per iteration, full fine-tuning
    eval_items: int = 1_250 + 5_211  # VL-RewardBench + Multimodal RewardBench, judged once per evaluation
    gpus: int = 8

    def check(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not math.isfinite(value):
                raise ValueError(f"recipe: {f.name}: expected a finite number, got {value}")
            if f.name.endswith("fraction"):
                if not 0 <= value <= 1:
                    raise ValueError(f"recipe: {f.name}: expected in [0, 1], got {value}")
            elif value < (1 if f.name in ("n_samples", "iterations", "epochs", "gpus") else 0):
                raise ValueError(f"recipe: {f.name}: expected a non-negative count, got {value}")


SOURCES = {
    "prompts": "paper: about 100k prompts; assumed: the whole pool synthesized from in every iteration",
    "closed_fraction": "assumed: the paper mixes closed and open prompts without a published split",
    "n_samples": PAPER + ": N = 16 (T 0.6, top-k 50, top-p 0.9)",
    "prompt_tokens": "assumed: a VQA or captioning instruction",
    "closed_answer_tokens": "assumed: a short chain of thought ending in the answer",
    "open_answer_tokens": "assumed: a detailed caption or long answer",
    "rewrite_tokens": "assumed: as long as the answer it degrades",
    "closed_pair_fraction": "assumed: the paper does not publish how many closed prompts yield a pair",
    "judge_template_tokens": "assumed: the judge prompt's instructions",
    "judge_reasoning_tokens": "assumed: about 300 tokens of reasoning a judgment",
    "kept_fraction": "assumed: the paper does not publish its keep rate",
    "iterations": PAPER + ": 4 iterations",
    "epochs": PAPER + ": 5 epochs of full fine-tuning per iteration",
    "eval_items": "VL-RewardBench 1,250 items (its data.jsonl) + Multimodal RewardBench 5,211 (its paper)",
    "gpus": PAPER + ": 8 GPUs, FSDP",
}


def parse_settings(text: str) -> dict[str, float]:
    """"prompts=20000,epochs=3" -> {"prompts": 20000, "epochs": 3}, each name a Recipe field."""
    known = {f.name: f.type for f in fields(Recipe)}
    out: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or name not in known:
            raise ValueError(f"--set: expected name=value with a name among {sorted(known)}, got {part!r}")
        try:
            out[name] = (int if known[name] in ("int", int) else float)(value)
        except ValueError:
            raise ValueError(f"--set: {name}: not a number: {value!r}") from None
    return out


# ---- the work of each stage

STAGES = ("image encoding", "synth closed", "synth open + rewrite", "filter judging", "fine-tuning", "evaluation")
UNITS = {"image encoding": "images", "synth closed": "generated tokens", "synth open + rewrite": "generated tokens",
         "filter judging": "generated tokens", "fine-tuning": "trained tokens", "evaluation": "generated tokens"}


def work(recipe: Recipe) -> dict[str, dict[str, float]]:
    """Per stage, the whole run's work for each stack: {"ours": amount, "baseline": amount} in the stage's unit
    (UNITS). The two differ only for image encoding, which counts the encodings outside the other stages' rates:
    fastjudge encodes an image once per set of vision weights (the feature cache; the tower is frozen by
    default), and its generation rates are measured with the features cached; transformers encodes the pixels
    inside every generate call and forward, so its encodings are in its measured rates and its row is 0."""
    r = recipe
    closed = r.prompts * r.closed_fraction
    open_ = r.prompts - closed
    pairs = open_ + closed * r.closed_pair_fraction
    traces = 2 * pairs * r.kept_fraction  # each kept pair trains in both orders
    answer = (open_ * r.open_answer_tokens + closed * r.closed_answer_tokens) / max(1.0, r.prompts)
    judge_prompt = r.judge_template_tokens + r.prompt_tokens + 2 * answer
    evaluations = r.iterations + 1  # the base, then each iteration's judge
    per_run = {
        "synth closed": closed * r.n_samples * r.closed_answer_tokens * r.iterations,
        "synth open + rewrite": open_ * (r.open_answer_tokens + r.rewrite_tokens) * r.iterations,
        "filter judging": 2 * pairs * r.judge_reasoning_tokens * r.iterations,
        "fine-tuning": traces * (judge_prompt + r.judge_reasoning_tokens) * r.epochs * r.iterations,
        "evaluation": r.eval_items * r.judge_reasoning_tokens * evaluations,
    }
    out = {stage: {"ours": amount, "baseline": amount} for stage, amount in per_run.items()}
    out["image encoding"] = {"ours": r.prompts + r.eval_items, "baseline": 0.0}  # see above
    return {stage: out[stage] for stage in STAGES}


# ---- rates


@dataclass
class Rates:
    """Measured rates per GPU, per stage and stack: {stage: {"ours"|"baseline": {"per_s", "source", "setting"}}},
    with the card, versions and date of the measurement. The baseline is the fastest transformers setting measured
    for the stage (its `setting`: "eager", or "static cache + torch.compile"), so that every ratio is against
    the best a user of transformers would get."""
    card: str
    date: str
    stages: dict[str, dict[str, dict]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    path: str | None = None

    @classmethod
    def load(cls, path: Path | str) -> "Rates":
        try:
            data = json.loads(Path(path).read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not a rates file: line {e.lineno}: {e.msg}") from e
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a JSON object with card, date and stages")
        for key in ("card", "date", "stages"):
            if key not in data:
                raise ValueError(f"{path}: expected a field {key!r} in a rates file")
        for stage, stacks in data["stages"].items():
            if stage not in STAGES:
                raise ValueError(f"{path}: stages: unknown stage {stage!r} (expected one of {STAGES})")
            for stack, rate in stacks.items():
                if stack not in ("ours", "baseline") or not isinstance(rate, dict) \
                        or not isinstance(rate.get("per_s"), (int, float)) \
                        or not math.isfinite(rate["per_s"]) or rate["per_s"] <= 0 or not rate.get("source") \
                        or not isinstance(rate.get("setting", ""), str):
                    raise ValueError(f"{path}: stages.{stage}.{stack}: expected {{per_s > 0 and finite, source, "
                                     f"setting (optional, a name)}}, got {rate}")
        notes = list(data.get("notes", []))
        if data.get("partial"):  # bench/paper_scale.py rewrites its file after each stage until it ends
            notes.append("partial: the measuring run was cut short; only the stages it reached are in this file")
        return cls(card=data["card"], date=data["date"], stages=data["stages"], notes=notes, path=str(path))

    def per_s(self, stage: str, stack: str) -> float | None:
        rate = self.stages.get(stage, {}).get(stack)
        return None if rate is None else float(rate["per_s"])


def newest_rates(folder: Path | str) -> Path | None:
    """The newest rates file (`rates-*.json`, by its date, then its name) in `folder`, None if there is none."""
    found = []
    for path in Path(folder).glob("rates-*.json"):
        found.append((Rates.load(path).date, path.name, path))  # a damaged file is an error naming it
    return max(found)[2] if found else None


def seed_rates(sampler_result: Path | str) -> dict:
    """A rates file's content from committed bench results that measured a stage as the cost model counts it:
    `bench/sampler.py` at 11B shapes (closed sampling at n 16: ours against transformers' generate with
    num_return_sequences, the faster of eager and static cache + torch.compile where both were timed). Every
    other stage stays unmeasured."""
    sampler = json.loads(Path(sampler_result).read_text())
    if sampler.get("bench") != "sampler" or sampler.get("preset") != "llama-3.2-11b":
        raise ValueError(f"{sampler_result}: expected a bench/sampler.py result at the llama-3.2-11b preset")
    row = next((r for r in sampler["results"] if r.get("n") == 16), None)
    if row is None:
        raise ValueError(f"{sampler_result}: no result at n 16")
    env = sampler.get("environment", {})
    where = (f"{Path(sampler_result).name}: {sampler['prompts']} prompts of {sampler['prompt_tokens']} tokens, "
             f"{sampler['new_tokens']} new tokens each, n 16")
    return {
        "card": env.get("gpu", "unknown"), "date": env.get("date", "unknown"),
        "versions": {k: env[k] for k in ("torch", "python") if k in env} | env.get("versions", {}),
        "stages": {"synth closed": {
            "ours": {"per_s": row["ours_tok_s"], "source": f"measured, {where}: fastjudge's sampler"},
            "baseline": _fastest_transformers(row, where)}},
        "notes": [f"seeded from {Path(sampler_result).name} (bench/sampler.py); the other stages were not measured"],
    }


def _fastest_transformers(row: dict, where: str) -> dict:
    """The faster transformers setting of one bench/sampler.py row: eager, or static cache + torch.compile when
    it was timed (its greedy tokens checked equal to eager's by the bench) and is faster."""
    eager = {"per_s": row["transformers_tok_s"], "setting": "eager",
             "source": f"measured, {where}: transformers generate(num_return_sequences=16), dynamic cache, eager"}
    compiled = row.get("transformers_static_compile_tok_s")
    if compiled is None or compiled <= eager["per_s"]:
        return eager
    return {"per_s": compiled, "setting": "static cache + torch.compile",
            "source": f"measured, {where}: transformers generate(num_return_sequences=16), static cache with "
                      f"torch.compile (the faster setting; eager {eager['per_s']:,.1f}/s)"}


# ---- the table


def estimate(recipe: Recipe, rates: Rates) -> dict:
    """GPU-hours per stage and stack (None where the rate is not measured), ratios, and totals over the stages
    measured for both stacks."""
    recipe.check()
    rows = []
    for stage, amounts in work(recipe).items():
        row = {"stage": stage, "unit": UNITS[stage], "work_ours": amounts["ours"], "work_baseline": amounts["baseline"]}
        row["baseline_setting"] = rates.stages.get(stage, {}).get("baseline", {}).get("setting")
        for stack in ("ours", "baseline"):
            per_s = rates.per_s(stage, stack)
            row[f"{stack}_per_s"] = per_s
            if amounts[stack] == 0:  # nothing of this stage outside the stack's other rates
                row[f"{stack}_gpu_hours"] = 0.0
            else:
                row[f"{stack}_gpu_hours"] = None if per_s is None else amounts[stack] / per_s / 3600
            row[f"{stack}_source"] = rates.stages.get(stage, {}).get(stack, {}).get("source")
        row["measured"] = row["ours_gpu_hours"] is not None and row["baseline_gpu_hours"] is not None
        row["ratio"] = row["baseline_gpu_hours"] / row["ours_gpu_hours"] \
            if row["measured"] and row["ours_gpu_hours"] and row["baseline_gpu_hours"] else None
        rows.append(row)
    measured = [r for r in rows if r["measured"]]
    ours = sum(r["ours_gpu_hours"] for r in measured)
    baseline = sum(r["baseline_gpu_hours"] for r in measured)
    return {"recipe": dataclasses.asdict(recipe), "recipe_sources": SOURCES, "rates": rates.path,
            "card": rates.card, "rates_date": rates.date, "rates_notes": rates.notes, "stages": rows,
            "measured_stages": [r["stage"] for r in measured],
            "missing_stages": [r["stage"] for r in rows if not r["measured"]],
            "total_measured_ours_gpu_hours": ours, "total_measured_baseline_gpu_hours": baseline,
            "total_measured_ratio": baseline / ours if ours else None,
            "wall_clock_hours_measured_ours": ours / recipe.gpus,
            "assumption": "GPU-hours = work / rate per GPU: every stage assumed to scale linearly over the GPUs"}


def table(result: dict) -> str:
    """The estimate as text: the table, the totals, then every number's source."""
    def hours(value):
        return "not measured" if value is None else f"{value:,.1f}"

    lines = [f"rates: {result['rates']} ({result['card']}, {result['rates_date']})",
             *(f"  note: {note}" for note in result["rates_notes"]),
             f"{'stage':<22}{'work':>22}{'ours GPU-h':>14}{'baseline GPU-h':>16}{'ratio':>8}"]
    for r in result["stages"]:
        work_text = f"{r['work_ours']:.3g} {r['unit'].split()[-1]}"
        if r["work_ours"] != r["work_baseline"]:
            work_text = f"{r['work_ours']:.3g}/{r['work_baseline']:.3g} {r['unit'].split()[-1]}"
        ratio_text = "" if r["ratio"] is None else f"{r['ratio']:.2f}x"
        ours_text, baseline_text = ("in its rates" if r[f"work_{stack}"] == 0 else hours(r[f"{stack}_gpu_hours"])
                                    for stack in ("ours", "baseline"))
        lines.append(f"{r['stage']:<22}{work_text:>22}{ours_text:>14}{baseline_text:>16}{ratio_text:>8}")
    ratio = result["total_measured_ratio"]
    ratio_text = "" if ratio is None else f"{ratio:.2f}x"
    lines.append(f"{'total (measured rows)':<22}{'':>22}{hours(result['total_measured_ours_gpu_hours']):>14}"
                 f"{hours(result['total_measured_baseline_gpu_hours']):>16}{ratio_text:>8}")
    if result["missing_stages"]:
        lines.append("not measured yet (no rate in the rates file): " + ", ".join(result["missing_stages"]))
    if any(r["work_baseline"] == 0 for r in result["stages"]):
        lines.append("in its rates: transformers encodes the pixels inside every generate call and forward, so its "
                     "encodings are in its measured rates")
    lines.append(result["assumption"])
    lines.append("rates:")
    for r in result["stages"]:
        for stack in ("ours", "baseline"):
            if r[f"{stack}_source"]:
                name = stack if stack == "ours" or not r["baseline_setting"] else f"baseline ({r['baseline_setting']})"
                lines.append(f"  {r['stage']}, {name}: {r[f'{stack}_per_s']:,.1f} {r['unit']}/s "
                             f"({r[f'{stack}_source']})")
    lines.append("recipe:")
    for name, value in result["recipe"].items():
        lines.append(f"  {name} = {value}: {result['recipe_sources'][name]}")
    return "\n".join(lines)
