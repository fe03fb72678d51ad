"""How generation decodes: one options object, passed down from the call that wants it.

`Adapter.generate(..., options=DecodeOptions(...))` (or an adapter's `decode_options`) reaches
`engine.decoding.decode_groups` and the shared Mllama decoder; nothing is switched by module state. The
defaults are what the project measured as best: the shared-prefix Mllama decoder, the cross-attention kernel and
CUDA graphs on a GPU, SDPA for the decoding step's self-attention (the self-attention kernel stays off until it
is timed faster on a GPU).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class DecodeOptions:
    # Mllama decodes with its prompt's cache shared by the n samples (`engine.mllama`); False: the generic
    # decoder (the cache repeated per sample), kept as the reference and used by the other families
    shared_mllama: bool = True
    # fastjudge's GPU kernels at all (patch_mllama for training and prefill, and the decoder's kernels below);
    # False turns every one of them off
    gpu_kernels: bool = True
    # the decoder's cross layers through fastjudge.kernels.cross_attention_decode: None = on a GPU; True =
    # always (the Triton interpreter on the CPU, for tests); False = never (SDPA)
    cross_attention_kernel: bool | None = None
    # the decoder's self-attention through fastjudge.kernels.shared_prefix_decode_attention: False = SDPA (the
    # default until the kernel is timed faster on a GPU); None = on a GPU; True = always
    self_attention_kernel: bool | None = False
    # the SDPA backends of a decoding step's attention layers (e.g. [SDPBackend.EFFICIENT_ATTENTION]); None:
    # torch's choice (bench/sampler.py --self-attention compares them)
    step_sdpa_backends: tuple | None = None
    # the decoding step as a CUDA graph: None = on a GPU; False = never; True = asked for (needs a GPU)
    cuda_graphs: bool | None = None
    # with graphs, the own-key columns read are bucketed in spans of graph_first_span, twice that, ... steps
    # (one graph each): a decoding run of m tokens captures about log2(m / graph_first_span) + 1 graphs
    graph_first_span: int = 16
    # decoding steps between two looks from the host (None: 1 on the CPU, 8 on a GPU)
    sync_every: int | None = None

    def __post_init__(self):
        if self.graph_first_span < 1:
            raise ValueError(f"graph_first_span: expected >= 1, got {self.graph_first_span}")
        if self.sync_every is not None and self.sync_every < 1:
            raise ValueError(f"sync_every: expected >= 1 or None, got {self.sync_every}")

    def with_(self, **changes) -> "DecodeOptions":
        """A copy with these fields changed."""
        return replace(self, **changes)

    def kernel_on(self, choice: bool | None, on_cuda: bool) -> bool:
        """Whether a kernel whose field says `choice` runs: never with gpu_kernels off, else as asked, or on a
        GPU when not asked."""
        if not self.gpu_kernels:
            return False
        return on_cuda if choice is None else bool(choice)

    @classmethod
    def from_environment(cls, **fields) -> "DecodeOptions":
        """Options with the command line's environment switches applied: FASTJUDGE_GPU_KERNELS=0 (no GPU
        kernels), FASTJUDGE_CUDA_GRAPHS=0 (eager decoding steps). The only place that reads them."""
        if os.environ.get("FASTJUDGE_GPU_KERNELS") == "0":
            fields.setdefault("gpu_kernels", False)
        if os.environ.get("FASTJUDGE_CUDA_GRAPHS") == "0":
            fields.setdefault("cuda_graphs", False)
        return cls(**fields)
