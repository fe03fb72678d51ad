"""fastjudge: train a VLM judge that improves itself with no human preference labels.

Stages (one module each, one `run` entry point): `synth` (preference pairs), `filter` (the judge keeps the
pairs it gets right in both orders), `train` (fine-tuning on the kept traces), `evaluate` (pairwise benchmarks
scored with VL-RewardBench's rules); `loop` repeats them. `fastjudge.sampler` holds the vote; `fastjudge.toy`
and `fastjudge.world` the embedded default (the shapes world and its small Mllama).
"""

__version__ = "0.1.0"
