"""Final answers: what a sampled response answers, and the number words every answer table shares.

`extract_answer` finds the final answer in a response; `fastjudge.core.voting.normalize_answer` puts it in
canonical form for the vote; `fastjudge.engine.vote` reads answers token by token on the device by the same
number words.
"""

from __future__ import annotations

import re

# "zero".."twenty" -> "0".."20", shared by extraction, the vote's normalization and the device vote
NUMBER_WORDS = {word: str(value) for value, word in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty".split())}

# a span ends at a sentence end (". " or "." at the end), a newline or the end of the text
_ANSWER_IS = re.compile(r"answer is\s*:?\s*(.+?)\s*(?:\.\s|\.?\s*$|\n)", re.IGNORECASE)
_ANSWER_LINE = re.compile(r"(?:final answer|answer)\s*:\s*(.+?)\s*(?:\.\s|\.?\s*$|\n)", re.IGNORECASE)
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}()")
_NUMBER = re.compile(r"[-+]?\d[\d,]*(?:\.\d+)?|\b(?:" + "|".join(NUMBER_WORDS) + r")\b", re.IGNORECASE)
_OPTION = re.compile(r"\(\s*([A-Ea-e])\s*\)|\b([A-E])[.)]|^\s*([A-Ea-e])\s*$")


def extract_answer(text: str, answer_type: str = "short") -> str | None:
    """The final answer in a response, or None when there is none.

    Looks for "\\boxed{X}", "answer is X", "Answer: X" (the last one in the text wins; X ends at a sentence
    end or a newline); then, by answer_type, takes the
    number ("number") or option letter ("option") inside that span, or the last one in the whole text.
    The vote normalizes what this returns ("( b )" and "B." count as the same answer).
    """
    span, at = None, -1
    for pattern in (_BOXED, _ANSWER_LINE, _ANSWER_IS):
        for match in pattern.finditer(text):
            if match.start() > at:
                span, at = match.group(1).strip(), match.start()
    if answer_type == "number":
        numbers = _NUMBER.findall(span if span is not None else text)
        if not numbers:
            return None
        return numbers[0] if span is not None else numbers[-1]
    if answer_type == "option":
        options = _OPTION.findall(span if span is not None else text)
        letters = ["".join(groups) for groups in options]
        if not letters:
            return None
        return letters[0] if span is not None else letters[-1]
    return span or None
