"""fastjudge.kernels: Triton kernels, each beside a plain-PyTorch reference.

Installed from the repository's `kernels/` folder as `fastjudge.kernels` (a top-level `kernels` module would
clash with the PyPI package of that name). The fused linear cross-entropy and the Mllama cross-attention
kernels land here; this package imports no Triton until a kernel is used, so the CPU driver never needs it.
"""

__all__: list[str] = []
