"""Data: JSONL files with counted skips (`io`), images (`images`), benchmark loaders (`benchmarks`), the benchmarks'
scoring rules (`scoring`), every prompt text the judge reads (`prompts`) and run folders (`runs`)."""

from fastjudge.data.benchmarks import BENCH_FORMATS, load_bench, load_benchmark
from fastjudge.data.images import MAX_DECODE_PIXELS, check_image, load_image, load_images, stage_image, to_rgb
from fastjudge.data.io import (ANSWER_TYPES, KINDS, PromptRecord, Skip, load_candidates, load_judge_pairs, load_pairs,
                               load_predictions, load_prompts, load_traces, read_jsonl, read_records, write_json,
                               write_jsonl, write_records, write_skips)

__all__ = ["ANSWER_TYPES", "BENCH_FORMATS", "KINDS", "MAX_DECODE_PIXELS", "PromptRecord", "Skip", "check_image",
           "load_bench", "load_benchmark", "load_candidates", "load_image", "load_images", "load_judge_pairs",
           "load_pairs", "load_predictions", "load_prompts", "load_traces", "read_jsonl", "read_records",
           "stage_image", "to_rgb", "write_json", "write_jsonl", "write_records", "write_skips"]
