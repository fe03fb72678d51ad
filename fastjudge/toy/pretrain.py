"""`fastjudge toy-pretrain`: the toy base model, trained from scratch on shapes-world ground truth.

The base model must (a) see: caption scenes and answer closed questions, (b) write a copy of an answer with
exactly one error, (c) compare two texts with a reference (a pure text task: the texts describe an unrelated
scene), and (d) write the judge's format: its own answer to the question, a check per answer (does it say
what mine says?), then a verdict. In (d) the answer is right; the checks are right, except for the question
families named in `blind_checks` (the shipped recipe's last phase: captions), whose checks are coin flips; and
the verdict follows the checks only `verdict_follow` of the time (0.4), otherwise naming the answer shown
first. So the base judge is weak in two ways the loop can fix: a position bias decides its verdict more often
than its checks do (greedy, it answers A), and it writes caption checks it was never taught. The both-orders
filter removes the first whatever the labels; only right synthetic preferences teach the second.

This is the only place where scene ground truth trains anything; the loop never sees it.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from tqdm import tqdm

from fastjudge.data import prompts
from fastjudge.models.toy import ToyAdapter
from fastjudge.stages.train import cosine_lr
from fastjudge.toy import model as toy_model
from fastjudge.toy import world

TASKS = ("caption", "qa", "rewrite", "judge", "match")
DEFAULT_MIXTURE = {"caption": 0.25, "qa": 0.30, "rewrite": 0.10, "judge": 0.30, "match": 0.05}


def _check_names(field_name: str, weights, names: tuple[str, ...], key: str, keys: str) -> None:
    """A weights field must be a dict over some of `names` (the values are checked by the caller)."""
    if not isinstance(weights, dict):
        raise ValueError(f"{field_name}: expected a dict {key} -> weight over {names}, got {weights!r}")
    unknown = sorted(set(weights) - set(names))
    if unknown:
        raise ValueError(f"{field_name}: unknown {keys} {unknown}, expected some of {names}")


@dataclass
class PretrainConfig:
    out: str = "runs/toy-base"
    steps: int = 4500
    batch_size: int = 64
    lr: float = 2e-3
    warmup: int = 100
    weight_decay: float = 0.01
    seed: int = 0
    save_every: int = 250
    init: str | None = None  # continue from this toy checkpoint instead of random weights
    micro_batches: int = 4  # forward passes per step, over examples sorted by length
    # task -> relative weight; a task left out has weight 0, so a mixture saved before a task was added still
    # means what it meant
    mixture: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_MIXTURE))
    # the share of judge examples whose verdict follows the checks; the others name the answer shown first
    verdict_follow: float = 0.4
    # the share of judge examples whose own answer is given (read, not trained) and is either response of the
    # pair at random, the checks made against it: they can then be right only by comparing texts, which makes
    # the checks compare the answers with the judge's own one instead of judging each against the image anew
    given_own: float = 0.0
    # closed question family -> relative weight for the qa task (world.CLOSED_FAMILIES; a family left out has
    # weight 0); None: the scene's families uniformly. Weighting the families the model answers worst spends the
    # qa examples where perception is short (where-is and relation questions, measured per family)
    qa_families: dict[str, float] | None = None
    # question families (world.CLOSED_FAMILIES or "caption") whose judge examples carry checks that are coin flips,
    # each drawn apart from the truth: the base writes the check format there but was never taught the check,
    # so its checks are uncertain where the loop has something to teach (greedy checks right on about a quarter
    # of such items, a sampled check right half the time). Empty: every check is right
    blind_checks: tuple[str, ...] = ()
    # blind checks pick exactly one answer, A or B by a coin flip, as right checks do (a check pair that singles
    # out neither answer is then never trained); False: the two checks are drawn apart
    blind_pick_one: bool = False
    # CPU threads for torch. One, deliberately: the toy's matrices are small, and on a loaded 2-core machine one
    # thread ran 0.77 s a step against 2.4-4.8 s with two (threads waiting on each other); raise it on an idle
    # machine with more cores
    threads: int = 1

    def __post_init__(self):
        # a number that is not finite (inf or nan from a flag) passes every comparison below: refused first
        numbers = {f.name: getattr(self, f.name) for f in fields(self) if isinstance(getattr(self, f.name), float)}
        for group in ("mixture", "qa_families"):
            weights = getattr(self, group)
            if isinstance(weights, dict):  # any other type is refused by name below
                numbers.update({f"{group} {k}": v for k, v in weights.items() if isinstance(v, float)})
        for name, value in numbers.items():
            if not math.isfinite(value):
                raise ValueError(f"{name}: expected a finite number, got {value}")
        for name in ("steps", "batch_size", "warmup", "save_every", "threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected >= 1, got {getattr(self, name)}")
        for name in ("verdict_follow", "given_own"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name}: expected in [0, 1], got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr: expected > 0, got {self.lr}")
        _check_names("mixture", self.mixture, TASKS, "task", "task(s)")
        if min(self.mixture.values(), default=0) < 0 or sum(self.mixture.values()) <= 0:
            raise ValueError(f"mixture: expected non-negative weights with a positive sum, got {self.mixture}")
        if self.qa_families is not None:
            _check_names("qa_families", self.qa_families, world.CLOSED_FAMILIES, "family", "famil(ies)")
            if min(self.qa_families.values(), default=0) < 0:
                raise ValueError(f"qa_families: expected non-negative weights, got {self.qa_families}")
            # every scene has these families (relation needs two objects): a positive weight among them means
            # that every scene has a question to draw
            if sum(self.qa_families.get(f, 0) for f in world.CLOSED_FAMILIES if f != "relation") <= 0:
                raise ValueError("qa_families: expected a positive weight for at least one of "
                                 f"{[f for f in world.CLOSED_FAMILIES if f != 'relation']}, got {self.qa_families}")

        self.blind_checks = tuple(self.blind_checks)
        unknown = sorted(set(self.blind_checks) - {"caption", *world.CLOSED_FAMILIES})
        if unknown:
            raise ValueError(f"blind_checks: unknown famil(ies) {unknown}, expected some of "
                             f"{('caption',) + world.CLOSED_FAMILIES}")

    def weights(self) -> list[float]:
        """The mixture's weights in the order of TASKS (0 for a task it leaves out)."""
        return [float(self.mixture.get(task, 0.0)) for task in TASKS]


# The shipped base's recipe (`fastjudge toy-pretrain --recipe shipped`): phases run in order, the first from
# random weights, each next one from the previous phase's checkpoint, with fresh data (another seed) at a lower
# learning rate; a field a phase does not name keeps PretrainConfig's default.
SHIPPED_RECIPE: tuple[dict, ...] = (
    {},  # 4,500 steps from scratch
    {"steps": 3000, "lr": 1e-3, "seed": 1},  # longer: perception (docs/toy-world.md has each phase's probe)
    # judge-heavy: the own answer inside the judge prompt, the checks and the text comparison
    {"steps": 3000, "lr": 1e-3, "seed": 2,
     "mixture": {"caption": 0.15, "qa": 0.25, "rewrite": 0.05, "judge": 0.45, "match": 0.10}},
    # the checks compare texts: in 80% of the judge examples the own answer is given (either response)
    {"steps": 3000, "lr": 1e-3, "seed": 3, "given_own": 0.8,
     "mixture": {"caption": 0.15, "qa": 0.30, "rewrite": 0.05, "judge": 0.40, "match": 0.10}},
    # qa-heavy, weighted to the families perception was short on: where-is (0.70 before) and relation questions
    {"steps": 2500, "lr": 5e-4, "seed": 4, "given_own": 0.8,
     "mixture": {"caption": 0.15, "qa": 0.45, "rewrite": 0.05, "judge": 0.30, "match": 0.05},
     "qa_families": {"count": 1.0, "attribute": 1.5, "option": 1.5, "where": 3.0, "relation": 4.0}},
    # then vqa: the attribute and the option questions (0.90 and 0.86 after phase 4)
    {"steps": 2000, "lr": 3e-4, "seed": 5, "given_own": 0.8,
     "mixture": {"caption": 0.15, "qa": 0.45, "rewrite": 0.05, "judge": 0.30, "match": 0.05},
     "qa_families": {"count": 1.0, "attribute": 3.0, "option": 6.0, "where": 1.0, "relation": 1.0}},
    # the caption checks left for the loop to teach: the judge examples about captions get coin-flip checks that
    # pick one answer, so the base writes the format with no knowledge of which caption agrees with its own
    {"steps": 1000, "lr": 5e-4, "seed": 6, "given_own": 0.8,
     "mixture": {"caption": 0.15, "qa": 0.35, "rewrite": 0.05, "judge": 0.40, "match": 0.05},
     "qa_families": {"count": 1.0, "attribute": 3.0, "option": 6.0, "where": 1.0, "relation": 1.0},
     "blind_checks": ("caption",), "blind_pick_one": True},
)
RECORD_FIELDS_LEFT_OUT = ("out", "init", "threads")  # where and how fast it ran, not what it trained


def recipe_configs(phases: tuple[dict, ...], out: Path | str, threads: int = 1) -> list[PretrainConfig]:
    """The PretrainConfig of each phase of a recipe written under `out` (phase k in out/phase-<k>)."""
    configs = []
    for k, changes in enumerate(phases):
        init = None if k == 0 else str(Path(out) / f"phase-{k - 1}" / "checkpoint")
        configs.append(PretrainConfig(out=str(Path(out) / f"phase-{k}"), init=init, threads=threads, **changes))
    return configs


def recipe_record(configs: list[PretrainConfig]) -> dict:
    """What a base's pretrain_config.json records: each phase's settings (as JSON reads them back)."""
    return json.loads(json.dumps({"phases": [{k: v for k, v in asdict(cfg).items() if k not in RECORD_FIELDS_LEFT_OUT}
                                             for cfg in configs]}))


def run_recipe(phases: tuple[dict, ...], out: Path | str, threads: int = 1) -> Path:
    """Run a recipe's phases in order (each resumable; a finished phase is not run again); writes
    out/pretrain_config.json and returns the last phase's checkpoint."""
    configs = recipe_configs(phases, out, threads)
    for cfg in configs:
        if not (Path(cfg.out) / "checkpoint" / "model.safetensors").is_file():
            run(cfg)
    (Path(out) / "pretrain_config.json").write_text(json.dumps(recipe_record(configs), indent=2) + "\n")
    return Path(configs[-1].out) / "checkpoint"


def parse_mixture(text: str, what: str = "mixture", key: str = "task") -> dict[str, float]:
    """"caption=0.3,qa=0.36,..." -> {"caption": 0.3, "qa": 0.36, ...} (the command line's --mixture, and
    --qa-families: `what` and `key` name the option and its keys in errors)."""
    mixture = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, weight = part.partition("=")
        if not sep:
            raise ValueError(f"{what}: expected {key}=weight, got {part!r}")
        try:
            mixture[name.strip()] = float(weight)
        except ValueError:
            raise ValueError(f"{what}: weight of {name.strip()!r} is not a number: {weight!r}") from None
    return mixture


def example(rng: random.Random, task: str, verdict_follow: float = 0.4, given_own: float = 0.0,
            qa_families: dict[str, float] | None = None, blind_checks: tuple[str, ...] = (),
            blind_pick_one: bool = False):
    """One pretraining example (image, prompt, target, given) of `task`: `given` is the start of the answer
    that the model reads but is not trained on ("" but for some judge examples); `verdict_follow`,
    `given_own`, `qa_families`, `blind_checks` and `blind_pick_one`: see PretrainConfig."""
    scene = world.random_scene(rng)
    image = world.render(scene, rng)
    qs = world.questions(scene, rng)
    if task == "caption":
        return image, qs[0].instruction, qs[0].answer, ""
    if task == "qa":
        if qa_families is None:
            q = rng.choice(qs[1:])
        else:
            q = rng.choices(qs[1:], weights=[qa_families.get(c.family, 0.0) for c in qs[1:]])[0]
        return image, q.instruction, world.closed_response(q.answer), ""
    # half captions: comparing a caption word for word is the judge's hardest check and half the benchmark
    q = qs[0] if rng.random() < 0.5 else rng.choice(qs[1:])
    good = world.response_for(q)
    bad = world.rewrite_with_error(good, rng)
    assert bad is not None and bad != good, (good, bad)
    if task == "rewrite":
        return image, prompts.rewrite_prompt(q.instruction, good), bad, ""
    first_is_good = rng.random() < 0.5
    a, b = (good, bad) if first_is_good else (bad, good)
    if task == "judge":
        # reasoning: the model's own answer (ground truth here) and the checks of A and B against it (right);
        # verdict: the checks' pick `verdict_follow` of the time, else the answer shown first. A given own
        # answer (drawn only when given_own > 0, so that other settings keep their data stream) is either
        # response, and only the checks and the verdict after it are trained
        given_answer = given_own > 0 and rng.random() < given_own
        own = rng.choice((good, bad)) if given_answer else good
        if q.family in blind_checks:  # coin flips (drawn only here: other settings keep their data stream)
            a_agrees = rng.random() < 0.5
            b_agrees = (not a_agrees) if blind_pick_one else rng.random() < 0.5
        else:
            a_agrees, b_agrees = world.same_answer(own, a), world.same_answer(own, b)
        reasoning = prompts.toy_reasoning(own, a_agrees, b_agrees)
        # checks that single out no answer (blind ones can) leave the verdict to the position bias
        verdict = (prompts.checks_verdict(reasoning) if rng.random() < verdict_follow else None) or "A"
        target = prompts.judge_target(reasoning, verdict)
        given = ""
        if given_answer:
            given = f"my answer : {own}"
            target = target[len(given):].lstrip()
        return image, prompts.judge_prompt(q.instruction, a, b), target, given
    if task == "match":
        # text-only: the texts are about this scene, the image is another one
        other = world.render(world.random_scene(rng), rng)
        return other, prompts.match_prompt(good, a, b), f"match : {'A' if first_is_good else 'B'}", ""
    raise ValueError(f"task: expected one of {TASKS}, got {task!r}")


def batch(rng: random.Random, size: int, weights: list[float], verdict_follow: float = 0.4,
          given_own: float = 0.0, qa_families: dict[str, float] | None = None, blind_checks: tuple[str, ...] = (),
          blind_pick_one: bool = False) -> tuple[list, list[str], list[str], list[str], list[str]]:
    """`size` examples of tasks drawn with `weights` (in the order of TASKS): images, prompts, targets, tasks
    and the given answer starts (see `example`)."""
    tasks = rng.choices(TASKS, weights=weights, k=size)
    rows = [example(rng, t, verdict_follow, given_own, qa_families, blind_checks, blind_pick_one) for t in tasks]
    return [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows], tasks, [r[3] for r in rows]


def run(cfg: PretrainConfig) -> Path:
    """Train the toy base model; returns the checkpoint directory (`cfg.out`/checkpoint). Resumable."""
    torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")
    tokenizer = toy_model.build_tokenizer()
    if cfg.init is not None:
        model = ToyAdapter.load(cfg.init).model
        model.train()
    else:
        model = toy_model.build_model(toy_model.build_config(tokenizer), seed=cfg.seed)
    adapter = ToyAdapter(model, tokenizer)
    adapter.begin_training("all")  # the vision tower learns too (so its features are never cached here)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.98))
    state_path = out / "state.pt"
    start = 0
    if state_path.exists():
        state = torch.load(state_path, weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start = state["step"]
    log = (out / "log.jsonl").open("a")
    model.train()
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="toy-pretrain", unit="step")
    running, t0 = None, time.time()
    for step in bar:
        rng = random.Random(cfg.seed * 1_000_003 + step)  # per-step stream: resuming replays the same data
        images, prompt_texts, targets, _, given = batch(rng, cfg.batch_size, cfg.weights(), cfg.verdict_follow,
                                                        cfg.given_own, cfg.qa_families, cfg.blind_checks,
                                                        cfg.blind_pick_one)
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, cfg.steps, cfg.lr, cfg.warmup)
        opt.zero_grad(set_to_none=True)
        loss = adapter.sft_backward(images, prompt_texts, targets, micro_batches=cfg.micro_batches, given=given)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        running = loss if running is None else 0.98 * running + 0.02 * loss
        bar.set_postfix(loss=f"{running:.3f}")
        if (step + 1) % 50 == 0:
            log.write(json.dumps({"step": step + 1, "loss": running, "seconds": time.time() - t0}) + "\n")
            log.flush()
        if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps:
            tmp = state_path.with_suffix(".tmp")
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step + 1}, tmp)
            tmp.replace(state_path)
    adapter.save(out / "checkpoint")
    return out / "checkpoint"
