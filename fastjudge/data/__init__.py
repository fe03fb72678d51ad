"""Data: JSONL and image files with counted skips (`io`), benchmark loaders (`benchmarks`), the benchmarks'
scoring rules (`scoring`) and every prompt text the judge reads (`prompts`)."""

from fastjudge.data.benchmarks import BENCH_FORMATS, load_bench, load_benchmark
from fastjudge.data.io import (ANSWER_TYPES, KINDS, PromptRecord, Skip, check_image, load_candidates, load_image,
                               load_images, load_judge_pairs,
                               load_predictions, load_prompts, read_jsonl, read_records, write_json, write_jsonl,
                               stage_image, to_rgb, write_records, write_skips)

__all__ = ["ANSWER_TYPES", "BENCH_FORMATS", "KINDS", "PromptRecord", "Skip", "check_image", "load_bench",
           "load_benchmark", "load_candidates", "load_image", "load_images", "load_judge_pairs", "load_predictions",
           "load_prompts", "read_jsonl",
           "read_records", "stage_image", "to_rgb", "write_json", "write_jsonl", "write_records", "write_skips"]
