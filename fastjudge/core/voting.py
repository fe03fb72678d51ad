"""Majority voting over sampled final answers, for closed-ended questions.

For each prompt we sample N answers, parse each into a final-answer string (None when parsing
failed), normalize the strings so that "2", "2.0" and "two" count as one answer, and take a
majority vote. `majority_vote` runs in C++ (fastjudge._C); `majority_vote_reference` is the
pure-Python oracle it must match exactly (same winners, counts, indices and dict order).

Normalization rules (`normalize_answer`; csrc/vote.cpp implements the same ones):
  1. Lowercase ASCII letters A-Z only. Other letters ("É", "Σ") are left alone, so C++ (bytes) and
     Python agree; `str.lower` would change them.
  2. Collapse each run of ASCII white space (space, \\t, \\n, \\r, \\v, \\f) into one space.
  3. Repeat until nothing changes:
     - strip surrounding white space;
     - strip trailing punctuation . , ; : ! ? (all of it);
     - strip one pair of surrounding quotes: "..." '...' “...” ‘...’, only when the inside holds
       neither quote character ('"a" or "b"' stays);
     - strip one pair of surrounding brackets () [] {}, only when the first bracket closes at the
       last character ("(a) or (b)" stays).
  4. Empty -> None (the answer is ignored).
  5. Option letters: a single letter, "x)", or "option " + one of those (stripped again as in 3)
     -> the letter: "(B)", "B.", "B)", "b", "[B]", "Option B", "option (b)" -> "b". Any letter
     a-z counts (benchmarks have more than five options); a plain single-letter answer already is
     its own canonical form. Rules 5-7 apply to the whole text only: "(b) 42" stays as it is.
  6. Number words zero..twenty -> digits: "two" -> "2".
  7. Numbers [+-]?(digits | d,ddd,ddd)?(.digits)? -> canonical: no "+", no thousands commas, no
     leading zeros, no trailing fractional zeros, no "." without a fraction, "-0" -> "0":
     "2", "2.0", "02", "+2" -> "2"; "1,000" -> "1000"; "2.50" -> "2.5"; ".5" -> "0.5"; "-3" -> "-3".
     Badly grouped commas ("1,00") are not a number and stay text.
  8. Anything else: the text after steps 1-3.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Sequence

from fastjudge.core.answers import NUMBER_WORDS

__all__ = ["Vote", "majority_vote", "majority_vote_reference", "normalize_answer"]


@dataclass(frozen=True)
class Vote:
    """The vote of one prompt.

    winner: the normalized answer with the most votes; None when the top count is below
        min_votes, tied between two or more answers, or there were no answers.
    counts: normalized answer -> number of samples, in order of first appearance.
    indices: normalized answer -> ascending sample positions within the prompt's list.
    """

    winner: str | None
    counts: dict[str, int]
    indices: dict[str, list[int]]


_ASCII_LOWER = {c: c + 32 for c in range(ord("A"), ord("Z") + 1)}
_SPACE = " \t\n\r\v\f"
_SPACE_RUN = re.compile("[ \t\n\r\v\f]+")
_TRAILING_PUNCT = ".,;:!?"
_QUOTES = (('"', '"'), ("'", "'"), ("\u201c", "\u201d"), ("\u2018", "\u2019"))
_BRACKETS = {"(": ")", "[": "]", "{": "}"}
# [0-9], not \d: \d also matches non-ASCII digits, which C++ does not treat as digits.
_NUMBER = re.compile(r"([+-]?)([0-9]{1,3}(?:,[0-9]{3})+|[0-9]+)?(?:\.([0-9]+))?")


def _strip_bracket_pair(s: str) -> str:
    if len(s) < 2 or s[0] not in _BRACKETS:
        return s
    open_b, close_b = s[0], _BRACKETS[s[0]]
    if s[-1] != close_b:
        return s
    depth = 0
    for c in s[:-1]:
        if c == open_b:
            depth += 1
        elif c == close_b:
            depth -= 1
            if depth == 0:
                return s  # the first bracket closed before the end
    return s[1:-1] if depth == 1 else s


def _strip_all(s: str) -> str:
    while True:
        before = len(s)
        s = s.strip(_SPACE).rstrip(_TRAILING_PUNCT)
        for open_q, close_q in _QUOTES:
            if len(s) >= 2 and s[0] == open_q and s[-1] == close_q:
                inner = s[1:-1]
                if open_q not in inner and close_q not in inner:
                    s = inner
                    break
        s = _strip_bracket_pair(s)
        if len(s) == before:  # the rules only shorten, so equal length means nothing changed
            return s


def _option_letter(s: str) -> str | None:
    if len(s) == 1 and "a" <= s <= "z":
        return s
    if len(s) == 2 and "a" <= s[0] <= "z" and s[1] == ")":
        return s[0]
    return None


def _canonical_number(s: str) -> str | None:
    match = _NUMBER.fullmatch(s)
    if match is None:
        return None
    sign, whole, frac = match.groups()
    if whole is None and frac is None:
        return None
    whole = (whole or "").replace(",", "").lstrip("0") or "0"
    frac = (frac or "").rstrip("0")
    number = f"{whole}.{frac}" if frac else whole
    return "-" + number if sign == "-" and number != "0" else number


def normalize_answer(text: str) -> str | None:
    """Canonical form of one final answer (rules in the module docstring).

    Args:
        text: the parsed final answer.
    Returns:
        The normalized answer, or None when nothing is left (e.g. "", " . ", "()").
    Raises:
        TypeError: text is not a str.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be str, got {type(text).__name__}")
    s = _strip_all(_SPACE_RUN.sub(" ", text.translate(_ASCII_LOWER)))
    if not s:
        return None
    letter = _option_letter(s)
    if letter is not None:
        return letter
    if s.startswith("option "):
        letter = _option_letter(_strip_all(s[len("option ") :]))
        if letter is not None:
            return letter
    word = NUMBER_WORDS.get(s)
    if word is not None:
        return word
    number = _canonical_number(s)
    return number if number is not None else s


def _check_min_votes(min_votes: int) -> None:
    if not isinstance(min_votes, int):
        raise TypeError(f"min_votes must be an int, got {type(min_votes).__name__}")
    if min_votes < 1:
        raise ValueError(f"min_votes must be >= 1, got {min_votes}")


def _winner(counts: dict[str, int], min_votes: int) -> str | None:
    winner, top, tied = None, 0, False
    for key, count in counts.items():
        if count > top:
            winner, top, tied = key, count, False
        elif count == top:
            tied = True
    return None if tied or top < min_votes else winner


def majority_vote_reference(answers: Sequence[Sequence[str | None]], min_votes: int = 1) -> list[Vote]:
    """Pure-Python majority vote: the oracle and baseline for `majority_vote`.

    Args:
        answers: (B, N_b) a list (or tuple) per prompt of parsed answers, str or None; None
            (unparsed) answers and answers that normalize to nothing are ignored.
        min_votes: the fewest votes a winner needs.
    Returns:
        (B,) one Vote per prompt.
    Raises:
        TypeError: answers is not a list of lists of str or None (the message names the index),
            or min_votes is not an int.
        ValueError: min_votes < 1.
    """
    _check_min_votes(min_votes)
    if not isinstance(answers, (list, tuple)):
        raise TypeError(f"answers must be a list of lists of str or None, got {type(answers).__name__}")
    votes = []
    for b, row in enumerate(answers):
        if not isinstance(row, (list, tuple)):
            raise TypeError(f"answers[{b}] must be a list of str or None, got {type(row).__name__}")
        counts: dict[str, int] = {}
        indices: dict[str, list[int]] = {}
        for j, text in enumerate(row):
            if text is None:
                continue
            if not isinstance(text, str):
                raise TypeError(f"answers[{b}][{j}] must be str or None, got {type(text).__name__}")
            key = normalize_answer(text)
            if key is None:
                continue
            if key in counts:
                counts[key] += 1
                indices[key].append(j)
            else:
                counts[key] = 1
                indices[key] = [j]
        votes.append(Vote(_winner(counts, min_votes), counts, indices))
    return votes


def majority_vote(answers: Sequence[Sequence[str | None]], min_votes: int = 1) -> list[Vote]:
    """Majority vote in C++ (fastjudge._C); returns exactly what `majority_vote_reference` returns.

    Large batches are voted on one thread per core (at most 8) while this thread reads the answers
    and builds the results; the GIL is released while it waits for or does the voting itself.

    Args:
        answers: (B, N_b) a list (or tuple) per prompt of parsed answers, str or None.
        min_votes: the fewest votes a winner needs.
    Returns:
        (B,) one Vote per prompt.
    Raises:
        TypeError, ValueError: as `majority_vote_reference`, with the same messages.
    """
    from fastjudge import _C  # imported here so the pure-Python parts work without the build

    _check_min_votes(min_votes)
    return _C.majority_vote(answers, min_votes, vote_type=Vote)


def majority_confidence(counts: dict[str, int] | list[int]) -> float:
    """How sure the current leader is the majority answer: Adaptive-Consistency's Beta criterion.

    With v1 votes for the leading answer and v2 for the runner-up (0 if none), the posterior of their shares
    under a uniform prior gives P(p1 > p2) = 1 - I_0.5(v1 + 1, v2 + 1), and for integer arguments the
    regularized incomplete beta is a binomial tail: I_0.5(a, b) = sum_{j=a}^{a+b-1} C(a+b-1, j) / 2^(a+b-1).
    No votes: 0.5.
    """
    values = sorted(counts.values() if isinstance(counts, dict) else counts, reverse=True)
    v1 = values[0] if values else 0
    v2 = values[1] if len(values) > 1 else 0
    a, b = v1 + 1, v2 + 1
    total = a + b - 1
    tail = sum(math.comb(total, j) for j in range(a, total + 1)) / 2 ** total
    return 1.0 - tail


def sampling_settled(counts: dict[str, int], drawn: int, n_samples: int, min_votes: int, confidence: float) -> bool:
    """Whether a prompt may stop sampling after `drawn` of `n_samples` samples: its leader has the votes a
    winner needs (min_votes) and `majority_confidence` >= confidence; or no answer can reach min_votes any more
    (the prompt cannot make a pair)."""
    leader = max(counts.values(), default=0)
    if leader + (n_samples - drawn) < min_votes:
        return True
    return leader >= min_votes and majority_confidence(counts) >= confidence
