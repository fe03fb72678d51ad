"""Benchmark: C++ majority_vote against the pure-Python reference.

Builds B prompts x N sampled answers with a fixed seed (numbers as digits, words and with commas,
option letters in several forms, short text with case/punctuation noise, some None), checks that
both implementations agree, and times each (median of --repeats runs after a warm-up). Building
the Python result (dicts, lists, Vote objects) is part of the measured time; freeing it afterwards
is not (the result is the same objects for both, so it would add the same few ms to each). The
garbage collector stays on, as in normal use.

    python bench/vote.py --prompts 10000 --n 16 --repeats 5
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import statistics
import time
from typing import Callable

from fastjudge import _C
from fastjudge.core.voting import Vote, majority_vote, majority_vote_reference

_WORDS = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen twenty"
).split()
_TEXT = ["Paris", "the Eiffel Tower", "red", "a cat", "New York City", "photosynthesis", "left", "yes", "no",
         "blue whale"]


def _number_form(rng: random.Random, value: int) -> str:
    forms = [str(value), f"{value}.0", f"{value}.", f" {value} ", f"+{value}", f"0{value}", f"{value:,}",
             f"({value})"]
    if 0 <= value <= 20:
        forms += [_WORDS[value], _WORDS[value].capitalize()]
    return rng.choice(forms)


def _letter_form(rng: random.Random, letter: str) -> str:
    forms = [letter, letter.lower(), f"({letter})", f"{letter}.", f"{letter})", f"[{letter}]", f"Option {letter}",
             f'"{letter}"']
    return rng.choice(forms)


def _text_form(rng: random.Random, text: str) -> str:
    text = rng.choice([text, text.lower(), text.upper(), text.title()])
    return rng.choice([text, f"{text}.", f" {text}!", f'"{text}"', f"{text} ", text.replace(" ", "  ")])


def make_answers(num_prompts: int, n: int, seed: int = 0) -> list[list[str | None]]:
    """(B, N) sampled answers: each prompt has a likely answer plus a few distractors."""
    rng = random.Random(seed)
    answers = []
    for _ in range(num_prompts):
        kind = rng.random()
        if kind < 0.4:
            truth = rng.choice([rng.randint(0, 20), rng.randint(0, 5000)])
            options = [truth, truth + 1, truth * 2, max(0, truth - 1)]
            form = _number_form
        elif kind < 0.75:
            options = rng.sample("ABCDE", 4)
            form = _letter_form
        else:
            options = rng.sample(_TEXT, 4)
            form = _text_form
        row: list[str | None] = []
        for _ in range(n):
            if rng.random() < 0.05:
                row.append(None)  # unparsed answer
            else:
                # The first option is the most likely one, so most prompts have a clear winner.
                row.append(form(rng, rng.choices(options, weights=[6, 2, 1, 1])[0]))
        answers.append(row)
    return answers


def _time_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append((time.perf_counter() - start) * 1e3)
        del result  # freed outside the timed region
    return statistics.median(times)


def _as_tuples(votes: list[Vote]) -> list[tuple]:
    # Dict equality ignores order; the contract includes the order of first appearance.
    return [(v.winner, list(v.counts.items()), list(v.indices.items())) for v in votes]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=10_000, help="number of prompts B")
    parser.add_argument("--n", type=int, default=16, help="sampled answers per prompt N")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per implementation (the median is reported)")
    parser.add_argument("--min-votes", type=int, default=2, help="min_votes passed to both implementations")
    parser.add_argument("--seed", type=int, default=0, help="seed for the generated answers")
    parser.add_argument("--out", default=None, help="also write the result with its environment to this JSON file")
    args = parser.parse_args()

    answers = make_answers(args.prompts, args.n, args.seed)
    expected = majority_vote_reference(answers, args.min_votes)
    got = majority_vote(answers, args.min_votes)
    if _as_tuples(got) != _as_tuples(expected):
        raise SystemExit("C++ majority_vote disagrees with majority_vote_reference")
    winners = sum(v.winner is not None for v in expected)
    del expected, got  # live objects make the garbage collector slower; time without them

    python_ms = _time_ms(lambda: majority_vote_reference(answers, args.min_votes), args.repeats)
    # For reference only: part of the Python time is the garbage collector, which the C++ path
    # pauses while it builds its result.
    gc.disable()
    python_nogc_ms = _time_ms(lambda: majority_vote_reference(answers, args.min_votes), args.repeats)
    gc.enable()
    cpp_1t_ms = _time_ms(
        lambda: _C.majority_vote(answers, args.min_votes, num_threads=1, vote_type=Vote), args.repeats
    )
    cpp_ms = _time_ms(lambda: majority_vote(answers, args.min_votes), args.repeats)
    speedup = python_ms / cpp_ms

    print(f"prompts={args.prompts} n={args.n} min_votes={args.min_votes} prompts_with_winner={winners} "
          f"cpus={os.cpu_count()} results identical")
    print(f"{'implementation':<26}{'ms':>10}{'speedup':>10}")
    print(f"{'python reference':<26}{python_ms:>10.2f}{1.0:>9.1f}x")
    print(f"{'python reference, gc off':<26}{python_nogc_ms:>10.2f}{python_ms / python_nogc_ms:>9.1f}x")
    print(f"{'c++ (_C), 1 thread':<26}{cpp_1t_ms:>10.2f}{python_ms / cpp_1t_ms:>9.1f}x")
    print(f"{'c++ (_C), majority_vote':<26}{cpp_ms:>10.2f}{speedup:>9.1f}x")
    result = {
        "bench": "vote", "prompts": args.prompts, "n": args.n,
        "python_ms": round(python_ms, 3), "cpp_ms": round(cpp_ms, 3), "speedup": round(speedup, 1),
        "python_gc_off_ms": round(python_nogc_ms, 3), "cpp_1thread_ms": round(cpp_1t_ms, 3),
    }
    if args.out:
        from _env import save
        save(args.out, result)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
