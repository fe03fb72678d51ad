"""The loop's configuration: one flat dataclass that validates itself; a run writes it as config.json.

Each stage takes only its own small options (`synth_options()`, `filter_options()`, `train_options()`,
`eval_options()`), so a stage runs without the loop's configuration."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from typing import TYPE_CHECKING

from fastjudge.core.sampling_params import SamplingParams
from fastjudge.data.io import write_json
from fastjudge.data.runs import run_files

if TYPE_CHECKING:
    from fastjudge.stages.evaluate import EvalOptions
    from fastjudge.stages.filter import FilterOptions
    from fastjudge.stages.synth import SynthOptions
    from fastjudge.stages.train import TrainOptions

# The stages' options are imported where they are built, not here: the stages import torch and transformers,
# which the command line need not load to parse its flags or to run `fastjudge score`.


# the settings that may change when a run resumes (`fastjudge iterate --resume --override ...`): how long it goes
# on and where and how fast it runs, never what it computes
# what `--ablation` can take away (`fastjudge.ablations`)
ABLATIONS = ("none", "no-filter", "shuffled-labels", "oracle-votes")

def option(default, help: str):
    """A LoopConfig field with its help text: the one definition from which `fastjudge`'s flags, config.json and the
    resume check are derived (`help_of`)."""
    return field(default=default, metadata={"help": help})


def help_of(name: str) -> str:
    """The help text of LoopConfig's field `name`."""
    return {f.name: f.metadata["help"] for f in fields(LoopConfig)}[name]


RESUMABLE = ("iterations", "min_gain", "patience", "device", "batch_rows", "batch_tokens", "feature_cache_gb",
             "dist_timeout_s", "log_to")


@dataclass
class LoopConfig:
    out: str = option("runs/demo", "output folder of the run")
    model: str | None = option(None, "local checkpoint folder (a toy one, Llama-3.2-Vision, Qwen2-VL or Qwen2.5-VL); "
                                     "default: the shipped toy base model")
    prompts: str | None = option(None, "prompt pool: JSONL (schema: README, \"Your own prompts\") or parquet (a file, "
                                       "a folder of shards, a glob; LLaVA-OneVision-Data's schema by default); "
                                       "default: a shapes-world pool drawn from --seed")
    prompt_columns: str | None = option(None, "a parquet pool's columns as name=column,... over id, image, "
                                              "instruction, answer, kind (default: LLaVA-OneVision-Data's id, image, "
                                              "conversations; docs/inputs.md)")
    sample: int | None = option(None, "draw this many prompts uniformly from the pool (seeded by --seed) instead of "
                                      "taking it whole")
    seed: int = option(0, "random seed; a CPU run with the same seed is reproducible")
    device: str = option("cpu", "torch device for the model (cpu, cuda)")
    dtype: str | None = option(None, "model dtype: float32, bfloat16, float16 (default: float32 for the toy and on "
                                     "the CPU, bfloat16 for a real model on a GPU)")
    feature_cache_gb: float = option(16.0, "GiB of vision features kept in memory while the vision tower is frozen (0 "
                                           "= off)")
    max_image_pixels: int = option(4096 * 4096, "a prompt image with more pixels is downscaled to this many (its copy "
                                                "in the run folder; counted in the summary)")
    max_prompt_tokens: int | None = option(None, "a prompt whose instruction has more tokens is skipped and counted "
                                                 "(default: what leaves the model's context room for the answer and "
                                                 "its degrading rewrite)")
    dist_timeout_s: float = option(1800.0, "under torchrun: seconds a rank waits for the others at a collective "
                                           "before the job fails")
    iterations: int = option(3, "maximum number of iterations")
    min_gain: float = option(0.01, "stop when overall accuracy rises by less than this from one iteration to the "
                                   "next, --patience times in a row")
    patience: int | None = option(None, "how many iterations in a row must gain less than --min-gain to stop "
                                        "(default: 2 for the toy, 1 for a real model)")
    # synth
    prompts_per_iteration: int = option(1000, "prompts synthesized into pairs per iteration")
    closed_fraction: float = option(0.5, "share of closed-ended prompts in the generated shapes-world pool")
    n_samples: int = option(16, "answers sampled per closed-ended prompt")
    temperature: float = option(0.6, "sampling temperature for closed-ended answers")
    top_k: int = option(50, "top-k for sampling (0 = off)")
    top_p: float = option(0.9, "top-p (nucleus) for sampling")
    min_votes: int = option(5, "votes the majority answer needs to make a pair")
    # adaptive early stop for closed prompts: stop a prompt's sampling once its majority's confidence
    # (core.voting.majority_confidence) reaches `early_stop`; 0 = always n_samples. Mllama decodes `round_size`
    # samples at a time per prompt, a slot starting the next sample when one ends, voting on the device
    # (engine.vote); other families sample in rounds of `round_size`, voting on the host between rounds
    early_stop: float = option(0.0, "stop sampling a closed prompt once its majority is this sure (Beta criterion; 0 "
                                    "= off, e.g. 0.95)")
    round_size: int = option(4, "with --early-stop: samples decoded at once per prompt (Mllama), or per round (others)")
    corrupter: str = option("model", "who degrades open-ended answers: the model ('model') or the rule-based "
                                     "corrupter ('rules')")
    rewrite_temperature: float = option(0.6, "sampling temperature of the model's degraded rewrite")
    answer_tokens: int | None = option(None, "maximum new tokens per answer (default: 64 for the toy, 512 for a real "
                                             "model)")
    synth_model: str = option("base", "which model writes the pairs: the base model ('base') or the latest judge "
                                      "('judge')")
    # filter and eval
    judge_tokens: int | None = option(None, "maximum new tokens per judgment, reasoning and verdict (default: 80 "
                                            "for the toy, 1024 for a real model)")
    # the filter samples judgments: a greedy judge with a position bias would keep no pair at all
    filter_temperature: float = option(1.0, "sampling temperature of the judge's judgments in the filter (with "
                                            "--filter-reasoning greedy, of the verdict alone)")
    filter_reasoning: str = option("sampled", "the filter's judgments: all of it 'sampled' (reasoning and verdict), "
                                              "or 'greedy' reasoning with the verdict sampled after it")
    filter_samples: int | None = option(None, "judgments per pair and order in the filter; a pair is kept when one of "
                                              "them agrees with its preference in each order (default: 8 for the toy, "
                                              "1 for a real model)")
    filter_traces: int = option(1, "at most this many agreeing judgments of each order of a kept pair become training "
                                   "traces")
    batch_rows: int | None = option(None, "sequences per generation batch (default: 256 for the toy, 32 for a real "
                                          "model)")
    # 11B: each sample's row holds a copy of its prompt's cache, about 210 MB of cross-attention keys and
    # values
    batch_tokens: int | None = option(None, "at most this many token positions (rows x (longest prompt + new tokens)) "
                                            "per generation batch (default: no cap)")
    # train
    epochs: int = option(3, "fine-tuning epochs over the kept traces")
    lr: float | None = option(None, "fine-tuning peak learning rate (default: 2e-4 for the toy; a real model 1e-5, or "
                                          "1e-4 with --train lora)")
    batch_size: int = option(32, "fine-tuning batch size")
    micro_batches: int = option(2, "forward passes per fine-tuning step (examples sorted by length pad less)")
    train_loss: str | None = option(None, "what fine-tuning trains of each kept trace: 'trace' (reasoning and "
                                              "verdict), 'verdict' (the reasoning read, not trained) or 'checks' (the "
                                              "toy judge's checks and verdict, its own answer read, not trained); "
                                              "default: checks for the toy, trace for a real model")
    pack: bool = option(True, "fine-tuning packs several examples to a row, each attending only to itself and its own "
                              "image (Mllama and the toy; exact: the loss and gradients of the unpacked batch)")
    train: str = option("text", "what fine-tuning updates: 'text' (vision tower frozen), 'all', or 'lora' (peft LoRA "
                                "on the language model, merged into the checkpoint)")
    lora_rank: int = option(16, "LoRA rank (with --train lora)")
    lora_alpha: float = option(32.0, "LoRA alpha (with --train lora)")
    cpu_offload: bool = option(False, "under torchrun, sharded fine-tuning (every --train mode): parameters, "
                                      "gradients and optimizer state in CPU memory")
    activation_checkpointing: bool = option(False, "under torchrun, sharded fine-tuning: each decoder layer's "
                                                   "activations recomputed in the backward pass")
    train_state_every: int = option(100, "under torchrun, sharded fine-tuning: steps between two saves of the model, "
                                         "optimizer and step (torch.distributed.checkpoint), from which a killed job "
                                         "resumes (0: none)")
    # eval
    bench: str = option("toy", "benchmark format: toy (our held-out shapes-world benchmark), vlrewardbench, mmrb")
    bench_data: str | None = option(None, "the benchmark file (VL-RewardBench JSONL or its Hub parquet, images "
                                          "embedded; Multimodal RewardBench JSON); default: the toy one")
    toy_bench_per_category: int = option(100, "items per category of the toy benchmark (when there is no "
                                              "--bench-data)")
    images: str | None = option(None, "folder that the benchmark's image paths are relative to (default: the data "
                                      "file's folder)")
    prompt: str = option("ours", "judge prompt in eval: 'ours' (what the loop trains on) or 'benchmark' (the "
                                 "benchmark's own)")
    unparsed: str = option("wrong", "mmrb: an unparsed verdict counts as 'wrong', or 'random' (the official seeded "
                                    "guess)")
    k: int = option(1, "judge samples per benchmark item (1 = greedy)")
    eval_temperature: float = option(0.6, "sampling temperature of the judge when k > 1")
    log_to: str | None = option(None, "also write training curves: 'tensorboard' (event files in DIR/tensorboard: the "
                                      "fine-tuning loss per step, accuracy and rates per iteration; needs the "
                                      "tensorboard package)")
    ablation: str = option("none", "take a piece of the loop away to see what it does: 'no-filter' (train on every "
                                   "pair's first judgments, whatever their verdicts), 'shuffled-labels' (swap good "
                                   "and bad in a random half of the pairs), 'oracle-votes' (closed pairs labelled by "
                                   "the scene's true answer, not the majority; toy preset)")
    resume: bool = option(False, "continue a stopped run in --out from its last completed stage")

    def __post_init__(self):
        if self.model is not None and not (Path(self.model) / "config.json").is_file():
            raise ValueError(f"model: no checkpoint (config.json) at {self.model!r}")
        # defaults that differ between the toy (short canonical texts, 2M parameters) and a real VLM
        toy = self.model is None or (Path(self.model) / "fastjudge_toy.json").is_file()
        for name, toy_value, real_value in (("answer_tokens", 64, 512), ("judge_tokens", 80, 1024),
                                            ("lr", 2e-4, 1e-4 if self.train == "lora" else 1e-5),
                                            ("batch_rows", 256, 32), ("filter_samples", 8, 1), ("patience", 2, 1),
                                            ("train_loss", "checks", "trace")):
            if getattr(self, name) is None:
                setattr(self, name, toy_value if toy else real_value)
        # a number that is not finite (inf, nan: a flag or a config.json can carry either) is refused by name
        # before any range check, which nan would pass (every comparison with nan is False)
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{f.name}: expected a finite number, got {value}")
        positive = ("iterations", "patience", "prompts_per_iteration", "n_samples", "min_votes", "answer_tokens",
                    "judge_tokens", "batch_rows", "filter_samples", "filter_traces", "epochs", "batch_size", "micro_batches", "k", "lora_rank",
                    "round_size", "toy_bench_per_category", "max_image_pixels")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected >= 1, got {getattr(self, name)}")
        if self.sample is not None and self.sample < 1:
            raise ValueError(f"sample: expected >= 1, got {self.sample}")
        if self.prompt_columns is not None:
            from fastjudge.data.parquet import Columns
            Columns.parse(self.prompt_columns)  # a ValueError naming the bad part
        if self.temperature == 0 and self.n_samples > 1:
            raise ValueError(f"temperature: 0 is greedy and gives one answer, but n_samples is {self.n_samples}")
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ValueError(f"device: expected 'cpu' or 'cuda[:N]', got {self.device!r}")
        if self.device.startswith("cuda"):
            import torch
            if not torch.cuda.is_available():
                raise ValueError(f"device: {self.device!r} asked for, but torch sees no CUDA device")
        if self.min_votes > self.n_samples:
            raise ValueError(f"min_votes: expected <= n_samples ({self.n_samples}), got {self.min_votes}")
        if not 0 <= self.closed_fraction <= 1:
            raise ValueError(f"closed_fraction: expected in [0, 1], got {self.closed_fraction}")
        for name in ("temperature", "rewrite_temperature", "filter_temperature", "eval_temperature"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: expected >= 0, got {getattr(self, name)}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p: expected in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k: expected >= 0 (0 = off), got {self.top_k}")
        if self.lr <= 0:
            raise ValueError(f"lr: expected > 0, got {self.lr}")
        choices = {"corrupter": ("model", "rules"), "filter_reasoning": ("greedy", "sampled"),
                   "train_loss": ("trace", "verdict", "checks"), "log_to": (None, "tensorboard"),
                   "synth_model": ("base", "judge"), "train": ("text", "all", "lora"),
                   "bench": ("toy", "vlrewardbench", "mmrb"), "prompt": ("ours", "benchmark"),
                   "unparsed": ("wrong", "random"), "ablation": ABLATIONS,
                   "dtype": (None, "float32", "bfloat16", "float16")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}: expected one of {allowed}, got {getattr(self, name)!r}")
        if self.prompts is not None:
            from fastjudge.data.parquet import is_parquet, parquet_files
            if is_parquet(self.prompts):
                parquet_files(self.prompts, "prompts")  # a ValueError when it names no parquet file
            elif not Path(self.prompts).is_file():
                raise ValueError(f"prompts: file not found: {self.prompts!r}")
        if self.bench_data is not None and not Path(self.bench_data).is_file():
            raise ValueError(f"bench_data: file not found: {self.bench_data!r}")
        if self.bench != "toy" and self.bench_data is None:
            raise ValueError(f"bench_data: --bench {self.bench} needs its file (--bench-data / --data)")
        if self.prompt == "benchmark" and self.bench == "toy":
            raise ValueError("prompt: the toy benchmark has no prompt of its own; use --prompt ours")
        if self.prompt == "benchmark" and toy:
            raise ValueError("prompt: the toy model reads only its own prompt; use --prompt ours")
        if self.ablation == "oracle-votes" and not (toy and self.prompts is None and self.bench_data is None):
            raise ValueError("ablation: 'oracle-votes' needs the scenes' true answers: the toy preset only "
                             "(no --prompts, no --bench-data)")
        if not 0 <= self.early_stop < 1:
            raise ValueError(f"early_stop: expected a confidence in [0, 1) (0 = off), got {self.early_stop}")
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < 1:
            raise ValueError(f"max_prompt_tokens: expected >= 1 or None, got {self.max_prompt_tokens}")
        if self.train_state_every < 0:
            raise ValueError(f"train_state_every: expected >= 0, got {self.train_state_every}")
        if self.dist_timeout_s <= 0:
            raise ValueError(f"dist_timeout_s: expected > 0, got {self.dist_timeout_s}")
        if self.feature_cache_gb < 0:
            raise ValueError(f"feature_cache_gb: expected >= 0, got {self.feature_cache_gb}")

    def synth_options(self) -> SynthOptions:
        from fastjudge.stages.synth import SynthOptions
        from fastjudge.toy.world import rewrite_with_error
        # "rules": the shapes world's rule-based corrupter (toy texts only)
        corrupter = rewrite_with_error if self.corrupter == "rules" else None
        filters = dict(max_new_tokens=self.answer_tokens, top_k=self.top_k, top_p=self.top_p)
        return SynthOptions(answer=SamplingParams(max_new_tokens=self.answer_tokens),
                            rewrite=SamplingParams(temperature=self.rewrite_temperature, **filters),
                            samples=SamplingParams(n=self.n_samples, temperature=self.temperature, **filters),
                            min_votes=self.min_votes, early_stop=self.early_stop, round_size=self.round_size,
                            batch_rows=self.batch_rows, batch_tokens=self.batch_tokens, corrupter=corrupter)

    def filter_options(self) -> FilterOptions:
        from fastjudge.stages.filter import FilterOptions
        judgment = SamplingParams(n=self.filter_samples, max_new_tokens=self.judge_tokens,
                                  temperature=self.filter_temperature, top_k=self.top_k, top_p=self.top_p)
        return FilterOptions(judgment=judgment, reasoning=self.filter_reasoning, traces_per_order=self.filter_traces, batch_rows=self.batch_rows,
                             batch_tokens=self.batch_tokens, keep_all=self.ablation == "no-filter")

    def train_options(self) -> TrainOptions:
        from fastjudge.stages.train import TrainOptions
        return TrainOptions(lr=self.lr, epochs=self.epochs, batch_size=self.batch_size,
                            micro_batches=self.micro_batches, pack=self.pack, train=self.train,
                            lora_rank=self.lora_rank,
                            lora_alpha=self.lora_alpha, cpu_offload=self.cpu_offload,
                            activation_checkpointing=self.activation_checkpointing,
                            state_every=self.train_state_every, loss_on=self.train_loss)

    def eval_options(self) -> EvalOptions:
        from fastjudge.stages.evaluate import EvalOptions
        # one judgment per item is greedy; k of them are sampled
        judgment = SamplingParams(max_new_tokens=self.judge_tokens) if self.k == 1 else SamplingParams(
            max_new_tokens=self.judge_tokens, temperature=self.eval_temperature, top_k=self.top_k, top_p=self.top_p)
        return EvalOptions(bench=self.bench, prompt=self.prompt, unparsed=self.unparsed, k=self.k, judgment=judgment,
                           batch_rows=self.batch_rows, batch_tokens=self.batch_tokens)

    def save(self, path: Path | str) -> None:
        write_json(path, asdict(self))

    @classmethod
    def load(cls, path: Path | str) -> "LoopConfig":
        data = json.loads(Path(path).read_text())
        # a run written before these settings existed: one judgment per order, the whole trace trained (before
        # train_loss), and the toy's old default loss (train_loss None then meant the verdict alone)
        data.setdefault("filter_samples", 1)
        data.setdefault("patience", 1)
        data.setdefault("train_loss", "trace")
        if data["train_loss"] is None:
            toy = data.get("model") is None or (Path(data["model"]) / "fastjudge_toy.json").is_file()
            data["train_loss"] = "verdict" if toy else "trace"
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


# what may change when a run resumes, with --override: how far it goes and where and in what batches it runs
# (batch_rows and batch_tokens re-seed the sampling of the stages still to run)
_PATHS = ("model", "prompts", "bench_data", "images")


def resolved(cfg: LoopConfig, out: Path, given: set[str] | None, overrides: tuple[str, ...],
             main: bool = True) -> LoopConfig:
    """The configuration a run goes on with: `cfg` for a new run, the saved out/config.json on --resume. A setting
    in `given` (the flags the command line gave; None: every field of `cfg`) that differs from the saved one is a
    ValueError naming each, except those of RESUMABLE that `overrides` names. Paths are made absolute, so that a
    resume works from anywhere."""
    unknown = [name for name in overrides if name not in RESUMABLE]
    if unknown:
        raise ValueError(f"override: {', '.join(unknown)} cannot change on --resume (only {', '.join(RESUMABLE)})")
    for name in _PATHS:
        if getattr(cfg, name) is not None:
            setattr(cfg, name, str(Path(getattr(cfg, name)).resolve()))
    # a folder that holds nothing but what a failed start leaves (the skips that explain it) is not a run
    if [p for p in run_files(out) if p.name != "skipped.jsonl"] and not cfg.resume:
        raise ValueError(f"out: {out} already holds a run; pass --resume to continue it or choose another --out")
    if not (cfg.resume and (out / "config.json").exists()):
        return cfg
    saved = LoopConfig.load(out / "config.json")
    names = set(given) if given is not None else {f for f in vars(cfg)}
    changed = sorted(name for name in names - {"resume", "out"} if getattr(cfg, name) != getattr(saved, name))
    refused = [name for name in changed if name not in overrides]
    if refused:
        said = "; ".join(f"--{name.replace('_', '-')} {getattr(cfg, name)!r} (the run has "
                         f"{getattr(saved, name)!r})" for name in refused)
        hint = [name for name in refused if name in RESUMABLE]
        raise ValueError(f"resume: {out / 'config.json'} was run with other settings: {said}. "
                         + (f"To change {', '.join(hint)}, pass --override {','.join(hint)}; " if hint else "")
                         + "to run other settings, choose another --out")
    for name in changed:
        setattr(saved, name, getattr(cfg, name))
    saved.out = cfg.out  # where the run is now (it may have been moved)
    if main:
        print(f"--resume: continuing {out / 'config.json'}"
              + (f" with {', '.join(f'{n} {getattr(saved, n)!r}' for n in changed)} changed" if changed else ""))
    return saved


