"""fastjudge: train a VLM judge that improves itself with no human preference labels.

Layers, lower never importing higher: `fastjudge.kernels` (Triton ops) and `_C` (C++); `core` (sampling,
answers, the vote); `data` (files, benchmarks, scoring, prompt texts); `engine` (decoding); `models` (one
adapter per family); `stages` (synth, filter, train, evaluate) and `sampler` (the drop-in `generate`); `toy`
(the embedded shapes world and its small Mllama); `judge` (`Judge`: use a trained judge) and `cost` (the cost
model); then `config`, `loop` and `cli` on top.
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    # `fastjudge.Judge` without importing torch and transformers for `import fastjudge` itself
    if name == "Judge":
        from fastjudge.judge import Judge
        return Judge
    raise AttributeError(f"module 'fastjudge' has no attribute {name!r}")
