"""Sampling utilities: voting now, the batched sampler later."""

from fastjudge.voting import Vote, majority_vote, majority_vote_reference, normalize_answer

__all__ = ["Vote", "majority_vote", "majority_vote_reference", "normalize_answer"]
