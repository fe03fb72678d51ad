"""Judge prompt texts and the verdict parser."""

from __future__ import annotations

import pytest

from fastjudge.data import prompts
from fastjudge.data.prompts import JUDGE_STYLES, judge_prompt, judge_reasoning, judge_target, parse_verdict

VERDICTS = [
    # bracketed, with spaces, "answer" inside, any case, digits 1/2
    ("[[A]]", "A"),
    ("[[B]]", "B"),
    ("[[ B ]]", "B"),
    ("[[answer a]]", "A"),
    ("[[Answer B]]", "B"),
    ("[[1]]", "A"),
    ("[[ 2 ]]", "B"),
    ("the red circle is at top left , so [[b]]", "B"),
    ("my answer : a large red circle at top left . verdict : [[ A ]]", "A"),
    # sentences
    ("Overall Judgment: Answer 1 is better", "A"),
    ("overall judgment : answer 2 is better", "B"),
    ("Answer B is better.", "B"),
    ("answer 2 is better", "B"),
    ("After comparing, Answer A is the better one.", "A"),
    ("Answer A is better than answer B.", "A"),
    # both letters in the winning form -> unparsed
    ("[[A]] ... on second thought [[B]]", None),
    ("[[1]] or [[B]]", None),
    ("Answer A is better. No wait, Answer B is better.", None),
    # the same verdict twice is still one verdict
    ("[[A]] and again [[ answer 1 ]]", "A"),
    # brackets win over a contradicting sentence, whichever comes first
    ("Answer A is better in style, but [[B]]", "B"),
    ("[[B]]. Some would say answer 1 is better.", "B"),
    # no verdict
    ("both answers describe the image", None),
    ("A", None),
    ("B", None),
    ("[[C]]", None),
    ("[A]", None),
    ("answer A is not better", None),
    ("", None),
    (None, None),
]


@pytest.mark.parametrize("text, expected", VERDICTS)
def test_parse_verdict(text, expected):
    assert parse_verdict(text) == expected


@pytest.mark.parametrize("style", JUDGE_STYLES)
def test_judge_prompt_holds_question_then_a_then_b(style):
    question, a, b = "how many objects are there ?", "the answer is 3 .", "the answer is 5 ."
    text = judge_prompt(question, a, b, style)
    qa, pa, pb = text.find(question), text.find(a), text.find(b)
    assert -1 < qa < pa < pb
    swapped = judge_prompt(question, b, a, style)
    assert -1 < swapped.find(b) < swapped.find(a)
    assert text != swapped


def test_judge_prompt_toy_words_only():
    # The toy prompt must stay inside the toy tokenizer's words: the shapes-world words plus the judge's.
    from fastjudge.toy import model as toy
    text = judge_prompt("what colour is the object at top ?", "the answer is red .", "the answer is blue .", "toy")
    assert set(text.split()) <= set(toy.VOCAB)


def test_natural_prompt_asks_for_bracketed_verdict():
    text = judge_prompt("q", "first answer", "second answer", "natural")
    assert "[[A]]" in text and "[[B]]" in text
    assert text.index("first answer") < text.index("[The End of Answer A]") < text.index("second answer")


@pytest.mark.parametrize("style", ["fancy", "", "Toy"])
def test_judge_prompt_unknown_style(style):
    with pytest.raises(ValueError, match="style") as info:
        judge_prompt("q", "a", "b", style)
    assert repr(style) in str(info.value)


@pytest.mark.parametrize("style", JUDGE_STYLES)
@pytest.mark.parametrize("verdict", ["A", "B"])
def test_judge_target_round_trips_through_parse_verdict(style, verdict):
    reasoning = "a large red circle at top left , a small blue square at center ."
    assert parse_verdict(judge_target(reasoning, verdict, style)) == verdict


@pytest.mark.parametrize("style", JUDGE_STYLES)
def test_judge_target_verdict_beats_sentences_in_reasoning(style):
    # The reasoning may mention a sentence verdict; the bracketed one the target ends with decides.
    assert parse_verdict(judge_target("answer b is better at first sight", "A", style)) == "A"


@pytest.mark.parametrize("reasoning", [
    "the answer is 3 .",
    "a large red circle at top left , a small blue square at center .",
    "yes",
])
@pytest.mark.parametrize("style", JUDGE_STYLES)
def test_judge_reasoning_extracts_reasoning(style, reasoning):
    for verdict in "AB":
        assert judge_reasoning(judge_target(reasoning, verdict, style), style) == reasoning


def test_toy_target_shape():
    assert judge_target("the answer is 2 .", "B", "toy") == "my answer : the answer is 2 . verdict : [[ B ]]"
    reasoning = prompts.toy_reasoning("the answer is 2 .", False, True)
    assert judge_target(reasoning, "B", "toy") == "my answer : the answer is 2 . A : no B : yes verdict : [[ B ]]"


@pytest.mark.parametrize("own", ["the answer is 2 .", "a small red circle at top left , a large blue square at center ."])
@pytest.mark.parametrize("a_agrees", [True, False])
@pytest.mark.parametrize("b_agrees", [True, False])
def test_toy_checks_round_trip_and_point_to_a_verdict(own, a_agrees, b_agrees):
    target = judge_target(prompts.toy_reasoning(own, a_agrees, b_agrees), "A", "toy")
    assert prompts.parse_toy_reasoning(judge_reasoning(target, "toy")) == (own, a_agrees, b_agrees)
    expected = None if a_agrees == b_agrees else ("A" if a_agrees else "B")
    assert prompts.checks_verdict(judge_reasoning(target, "toy")) == expected


@pytest.mark.parametrize("reasoning", ["the answer is 2 .", "the answer is 2 . A : maybe B : no", "A : yes", ""])
def test_reasoning_without_both_checks_points_nowhere(reasoning):
    assert prompts.checks_verdict(reasoning) is None


def test_rewrite_and_match_prompts_carry_their_inputs():
    assert prompts.rewrite_prompt("q", "the answer is 4 .", "toy").endswith(": the answer is 4 .")
    natural = prompts.rewrite_prompt("how many ?", "Four.", "natural")
    assert "how many ?" in natural and "Four." in natural
    text = prompts.match_prompt("ref words", "first", "second")
    assert text.index("ref words") < text.index("first") < text.index("second")
