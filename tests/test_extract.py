"""Final-answer extraction from sampled responses (fastjudge.core.answers.extract_answer)."""

from __future__ import annotations

import pytest

from fastjudge.core.answers import extract_answer
from fastjudge.core.voting import normalize_answer

CASES = [
    # (text, answer_type, expected)
    ("the answer is 3 .", "number", "3"),
    ("\\boxed{12}", "number", "12"),
    ("so the total is \\boxed{12} objects", "number", "12"),
    ("Answer: two", "number", "two"),
    ("there are 4 circles and 2 squares", "number", "2"),  # no span: the last number in the text
    ("I count 3 objects , the answer is 5 .", "number", "5"),  # the span wins over earlier numbers
    ("no digits here", "number", None),
    ("( c )", "option", "c"),
    ("I pick ( a ), no wait, ( b )", "option", "b"),  # no span: the last option
    ("the answer is top left .", "short", "top left"),
    ("the answer is yes .", "short", "yes"),
    ("Final answer: blue", "short", "blue"),
    ("a large red circle at top left .", "short", None),
    ("I think 3", "short", None),
    ("", "short", None),
]


@pytest.mark.parametrize("text, answer_type, expected", CASES)
def test_extract_answer(text, answer_type, expected):
    assert extract_answer(text, answer_type) == expected


def test_option_answer_is_its_letter():
    got = extract_answer("The answer is: (B).", "option")
    assert got in ("B", "b")  # the letter, in the case it was written or lowered
    assert normalize_answer(got) == normalize_answer("b") == "b"


def test_default_answer_type_is_short():
    assert extract_answer("the answer is red .") == "red"
    assert extract_answer("I think 3") is None


@pytest.mark.parametrize("answer_type", ["number", "option", "short"])
def test_extracted_answers_vote_together(answer_type):
    # Different wordings of one final answer normalize to the same vote.
    texts = {"number": ["the answer is 3 .", "Answer: three", "\\boxed{3}", "there are 3"],
             "option": ["the answer is ( b ) .", "The answer is: (B).", "Answer: B.", "( b )"],
             "short": ["the answer is red .", "Answer: Red", "the answer is red"]}[answer_type]
    normalized = {normalize_answer(extract_answer(text, answer_type)) for text in texts}
    assert len(normalized) == 1, normalized


def test_span_ends_at_the_sentence_and_the_last_match_wins():
    assert extract_answer("The answer is red. The circle at top left is red.", "short") == "red"
    assert extract_answer("Answer: 2 red and 3 blue, so the answer is 5", "number") == "5"
    assert extract_answer("the answer is 2.5 .", "number") == "2.5"
    assert extract_answer("answer is blue\nbut the answer is green", "short") == "green"
