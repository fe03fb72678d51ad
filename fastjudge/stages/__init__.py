"""The loop's four stages, one module each, each with its own small options dataclass and one `run`:
`synth` (preference pairs), `filter` (the judge keeps the pairs it gets right in both orders), `train`
(fine-tuning on the kept traces), `evaluate` (pairwise benchmarks scored with their own rules)."""
