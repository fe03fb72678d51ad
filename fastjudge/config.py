"""The loop's configuration: one flat dataclass that validates itself; a run writes it as config.json.

Each stage takes only its own small options (`synth_options()`, `filter_options()`, `train_options()`,
`eval_options()`), so a stage runs without the loop's configuration."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from typing import TYPE_CHECKING

from fastjudge.data.io import write_json

if TYPE_CHECKING:
    from fastjudge.stages.evaluate import EvalOptions
    from fastjudge.stages.filter import FilterOptions
    from fastjudge.stages.synth import SynthOptions
    from fastjudge.stages.train import TrainOptions

# The stages' options are imported where they are built, not here: the stages import torch and transformers,
# which the command line need not load to parse its flags or to run `fastjudge score`.


# the settings that may change when a run resumes (`fastjudge iterate --resume --override ...`): how long it goes
# on and where and how fast it runs, never what it computes
RESUMABLE = ("iterations", "min_gain", "patience", "device", "batch_rows", "batch_tokens", "feature_cache_gb",
             "dist_timeout_s")


@dataclass
class LoopConfig:
    out: str = "runs/demo"
    model: str | None = None  # None: the toy preset (shipped base model, shapes world)
    prompts: str | None = None  # None: a shapes-world prompt pool generated from `seed`
    seed: int = 0
    device: str = "cpu"
    dtype: str | None = None  # None: float32 for the toy and on the CPU, bfloat16 for a real model on a GPU
    feature_cache_gb: float = 16.0  # vision features kept in memory (CPU) while the vision tower is frozen
    # input limits: a prompt image over max_image_pixels is downscaled to it (its copy in the run folder); a
    # prompt whose instruction has more tokens than max_prompt_tokens is a counted skip (None: the model's
    # context less answer_tokens)
    max_image_pixels: int = 4096 * 4096
    max_prompt_tokens: int | None = None
    # a torchrun job: how long a collective waits for the other ranks before the job fails (a dead or stuck rank)
    dist_timeout_s: float = 1800.0
    iterations: int = 3
    min_gain: float = 0.01  # stop when overall accuracy rises by less than this ...
    patience: int | None = None  # ... this many iterations in a row (None: 2 for the toy, 1 for a real model)
    # synth
    prompts_per_iteration: int = 1000
    closed_fraction: float = 0.5  # toy prompt pool only
    n_samples: int = 16
    temperature: float = 0.6
    top_k: int = 50
    top_p: float = 0.9
    min_votes: int = 5
    # adaptive early stop for closed prompts: stop a prompt's sampling once its majority's confidence
    # (core.voting.majority_confidence) reaches `early_stop`; 0 = always n_samples. Mllama decodes `round_size`
    # samples at a time per prompt, a slot starting the next sample when one ends, voting on the device
    # (engine.vote); other families sample in rounds of `round_size`, voting on the host between rounds
    early_stop: float = 0.0
    round_size: int = 4
    corrupter: str = "model"  # "model": the model rewrites its answer with one error; "rules": rule-based
    rewrite_temperature: float = 0.6
    answer_tokens: int | None = None  # None: 64 for the toy, 512 for a real model
    synth_model: str = "base"  # "base": the base model writes pairs every iteration; "judge": the latest judge
    # filter and eval
    judge_tokens: int | None = None  # None: 80 for the toy, 1024 for a real model
    # the filter samples judgments: a greedy judge with a position bias would keep no pair at all
    filter_temperature: float = 1.0
    # "sampled": whole judgments sampled at filter_temperature (the paper's recipe); "greedy": greedy reasoning,
    # then the verdict sampled
    filter_reasoning: str = "sampled"
    filter_samples: int | None = None  # judgments per pair and order; None: 8 for the toy, 1 for a real model
    filter_traces: int = 1  # at most this many agreeing judgments of each order become traces
    batch_rows: int | None = None  # None: 256 for the toy, 32 for a real model (11B: each sample's row holds a
    # copy of its prompt's cache, about 210 MB of cross-attention keys and values)
    batch_tokens: int | None = None  # cap on rows x (longest prompt + new tokens) per generation batch
    # train
    epochs: int = 3
    lr: float | None = None  # None: 2e-4 for the toy; a real model 1e-5, or 1e-4 with train="lora"
    batch_size: int = 32
    micro_batches: int = 2  # forward passes per step, over examples sorted by length
    # what fine-tuning trains of each kept trace: "trace" (reasoning and verdict, the paper's recipe) or "verdict"
    # (the reasoning read, not trained)
    train_loss: str = "trace"
    pack: bool = True  # several examples to a row in fine-tuning (exact: Mllama and the toy)
    train: str = "text"  # "text": vision tower frozen; "all"; "lora": LoRA adapters (peft), merged after training
    lora_rank: int = 16
    lora_alpha: float = 32.0
    cpu_offload: bool = False  # under torchrun, sharded fine-tuning: its state in CPU memory
    activation_checkpointing: bool = False  # under torchrun, sharded fine-tuning: recompute layer activations
    train_state_every: int = 100  # under torchrun, sharded fine-tuning: steps between saves of its state (0: none)
    # eval
    bench: str = "toy"  # benchmark format: "toy" (held-out shapes world), "vlrewardbench", "mmrb"
    bench_data: str | None = None  # the benchmark file; None: the toy benchmark (generated once, fixed seed)
    toy_bench_per_category: int = 100  # items per category of the toy benchmark
    images: str | None = None
    prompt: str = "ours"  # judge prompt in eval: "ours" (what the loop trains on) or "benchmark" (its own)
    unparsed: str = "wrong"  # mmrb: an unparsed verdict is "wrong" or the official seeded "random" guess
    k: int = 1
    eval_temperature: float = 0.6  # used when k > 1; k == 1 is greedy
    # the mechanism, shown by taking a piece away (toy preset): "no-filter" trains on every pair's first judgments
    # in each order, whatever their verdicts;
    # "shuffled-labels" swaps good and bad in a random half of the pairs; "oracle-votes" makes each closed pair's
    # good answer the scene's true answer instead of the majority's (the paper's majority-vs-oracle comparison)
    ablation: str = "none"
    resume: bool = False

    def __post_init__(self):
        if self.model is not None and not (Path(self.model) / "config.json").is_file():
            raise ValueError(f"model: no checkpoint (config.json) at {self.model!r}")
        # defaults that differ between the toy (short canonical texts, 2M parameters) and a real VLM
        toy = self.model is None or (Path(self.model) / "fastjudge_toy.json").is_file()
        for name, toy_value, real_value in (("answer_tokens", 64, 512), ("judge_tokens", 80, 1024),
                                            ("lr", 2e-4, 1e-4 if self.train == "lora" else 1e-5),
                                            ("batch_rows", 256, 32), ("filter_samples", 8, 1), ("patience", 2, 1)):
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
                   "train_loss": ("trace", "verdict"),
                   "synth_model": ("base", "judge"), "train": ("text", "all", "lora"),
                   "bench": ("toy", "vlrewardbench", "mmrb"), "prompt": ("ours", "benchmark"),
                   "unparsed": ("wrong", "random"), "ablation": ("none", "no-filter", "shuffled-labels", "oracle-votes"),
                   "dtype": (None, "float32", "bfloat16", "float16")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}: expected one of {allowed}, got {getattr(self, name)!r}")
        if self.prompts is not None and not Path(self.prompts).is_file():
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
        return SynthOptions(n_samples=self.n_samples, temperature=self.temperature, top_k=self.top_k,
                            top_p=self.top_p, min_votes=self.min_votes, early_stop=self.early_stop,
                            round_size=self.round_size, answer_tokens=self.answer_tokens,
                            rewrite_temperature=self.rewrite_temperature, batch_rows=self.batch_rows,
                            batch_tokens=self.batch_tokens, corrupter=corrupter)

    def filter_options(self) -> FilterOptions:
        from fastjudge.stages.filter import FilterOptions
        return FilterOptions(judge_tokens=self.judge_tokens, temperature=self.filter_temperature, top_k=self.top_k,
                             top_p=self.top_p, reasoning=self.filter_reasoning, samples=self.filter_samples,
                             traces_per_order=self.filter_traces, batch_rows=self.batch_rows,
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
        return EvalOptions(bench=self.bench, prompt=self.prompt, unparsed=self.unparsed, k=self.k,
                           temperature=self.eval_temperature, top_k=self.top_k, top_p=self.top_p,
                           judge_tokens=self.judge_tokens, batch_rows=self.batch_rows,
                           batch_tokens=self.batch_tokens)

    def save(self, path: Path | str) -> None:
        write_json(path, asdict(self))

    @classmethod
    def load(cls, path: Path | str) -> "LoopConfig":
        data = json.loads(Path(path).read_text())
        # a run written before these settings existed: one judgment per order, and the toy's old default loss
        data.setdefault("filter_samples", 1)
        data.setdefault("patience", 1)
        if "train_loss" in data and data["train_loss"] is None:
            toy = data.get("model") is None or (Path(data["model"]) / "fastjudge_toy.json").is_file()
            data["train_loss"] = "verdict" if toy else "trace"
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})
