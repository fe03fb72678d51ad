"""What the host does at its looks during decoding (every `sync_every` steps): the stop strings of the samples
still going, checked on their tokens brought from the device."""

from __future__ import annotations

from typing import Callable

import torch


def stop_requests(stop: Callable[[list[int]], bool], host_tokens: dict[tuple[int, int], list[int]],
                   pending: list[tuple[torch.Tensor, ...]], groups: torch.Tensor, alive: torch.Tensor,
                   sample: torch.Tensor) -> torch.Tensor:
    """Bring the tokens of the steps since the last look to the host and check the stop strings of the samples
    still going; returns (B', S) bool: the slots whose sample ends at the next step (its later tokens are cut
    from the text by the caller)."""
    prompt, sample_of, token, write = (torch.stack(part).cpu() for part in zip(*pending))  # (steps, B', S) each
    for p, q, t in zip(prompt[write].tolist(), sample_of[write].tolist(), token[write].tolist()):
        host_tokens.setdefault((p, q), []).append(t)
    requests = torch.zeros(alive.shape, dtype=torch.bool)
    groups, sample = groups.cpu(), sample.cpu()
    for (b, s) in torch.nonzero(alive.cpu()).tolist():
        key = (int(groups[b]), int(sample[b, s]))
        if key in host_tokens and stop(host_tokens[key]):
            requests[b, s] = True
    return requests.to(alive.device)
