"""Type stub for the compiled core (csrc/bindings.cpp). Use it through fastjudge.core.voting."""

from typing import Any, Sequence

def normalize_answer(text: str) -> str | None:
    """Canonical form of one answer, or None when nothing is left (rules: fastjudge.core.voting)."""

def majority_vote(
    answers: Sequence[Sequence[str | None]],
    min_votes: int = 1,
    *,
    num_threads: int = 0,
    vote_type: type | None = None,
) -> list[Any]:
    """Majority vote over (B, N_b) answers, one result per prompt.

    Each result is a (winner, counts, indices) tuple, or a vote_type instance when vote_type is
    given: a frozen dataclass with those three fields (fastjudge.core.voting.Vote), built the way its
    generated __init__ would (object.__setattr__ per field). num_threads counts the calling thread;
    <= 0 means one per core, at most 8. The GIL is released while this thread votes or waits.
    Raises TypeError / ValueError naming `answers` (with the index) or `min_votes`.
    """

def sample_logits(
    logits: Any,
    uniforms: Any,
    *,
    temperature: float,
    top_k: int,
    top_p: float,
    min_p: float,
    num_threads: int = 0,
) -> Any:
    """One token per row of float32 logits (B, V) (numpy), by inverse CDF at uniforms (B,) float64 over the
    kept tokens in index order; returns int64 (B,). Use it through fastjudge.core.sampling.sample_logits."""
