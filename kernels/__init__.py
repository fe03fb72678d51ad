"""fastjudge.kernels: Triton kernels, each beside a plain-PyTorch reference.

Installed from the repository's `kernels/` folder as `fastjudge.kernels` (a top-level `kernels` module would
clash with the PyPI package of that name). Importing this package imports no Triton: each kernel compiles on
first use, so the CPU driver never needs it.

- `fused_linear_cross_entropy` (linear_cross_entropy.py): the fine-tuning loss without the (N, V) logits.
- `cross_attention`, `cross_attention_decode`, `patch_mllama` (mllama_cross_attention.py): Mllama's vision
  cross-attention over key ranges; decoding with the n samples of an image over its keys read once.
- `shared_prefix_decode_attention` (decode_attention.py): a decoding step's self-attention, n samples over
  their shared prompt's keys and their own, one split-K kernel.
- sampling.py: token sampling without a sort (used through `fastjudge.sampling.sample_logits`).
"""

from fastjudge.kernels.decode_attention import (shared_prefix_decode_attention,
                                                shared_prefix_decode_attention_reference)
from fastjudge.kernels.mllama_cross_attention import (cross_attention, cross_attention_decode,
                                                      cross_attention_reference, patch_mllama)
from fastjudge.kernels.linear_cross_entropy import (fused_linear_cross_entropy,
                                                    fused_linear_cross_entropy_reference)

__all__ = ["cross_attention", "cross_attention_decode", "cross_attention_reference", "fused_linear_cross_entropy",
           "fused_linear_cross_entropy_reference", "patch_mllama", "shared_prefix_decode_attention",
           "shared_prefix_decode_attention_reference"]
