"""`SamplingParams`: how one generation call samples, one frozen object validated once (in the spirit of vLLM's).
No torch here: the configuration builds these without loading it."""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass


@dataclass(frozen=True)
class SamplingParams:
    """How one generation call samples, validated once here (a ValueError naming the field): every stage holds
    the parameters of each of its generation calls as one of these, and `Adapter.generate` takes it.

    n: completions per prompt; max_new_tokens: at most this many new tokens each; temperature 0 is greedy (then
    n must be 1); top_k (0 = off), top_p (1 = off), min_p (0 = off): the filters of `sample_logits`, in its
    order; seed: the call's seed (each batch is seeded by it and its place in the call); stop: a completion ends
    just before the first of these strings it writes."""
    n: int = 1
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int = 0
    stop: tuple[str, ...] = ()

    def __post_init__(self):
        for name in ("n", "max_new_tokens", "top_k", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise ValueError(f"{name}: expected an integer, got {value!r}")
        if self.n < 1:
            raise ValueError(f"n: expected >= 1, got {self.n}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens: expected >= 1, got {self.max_new_tokens}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature: expected a finite number >= 0, got {self.temperature}")
        if self.temperature == 0 and self.n > 1:
            raise ValueError("n: greedy decoding (temperature 0) gives one completion per prompt; use n=1")
        if self.top_k < 0:
            raise ValueError(f"top_k: expected >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p: expected in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p < 1:
            raise ValueError(f"min_p: expected in [0, 1), got {self.min_p}")
        if self.stop is None:
            object.__setattr__(self, "stop", ())
        if isinstance(self.stop, str) or not all(isinstance(s, str) for s in self.stop):
            raise ValueError(f"stop: expected a sequence of strings, got {self.stop!r}")
        object.__setattr__(self, "stop", tuple(s for s in self.stop if s))

    def replace(self, **changes) -> "SamplingParams":
        """A copy with `changes`, validated again."""
        return dataclasses.replace(self, **changes)
