"""Prompt texts the loop writes, and the one verdict parser that reads every judge format.

Two styles of judge prompt: "toy" (the shapes-world words the toy tokenizer knows) and "natural" (plain English
for a real VLM). Both ask for reasoning first and a verdict `[[A]]` or `[[B]]` last.
"""

from __future__ import annotations

import re

JUDGE_STYLES = ("toy", "natural")

NATURAL_JUDGE = (
    "Please act as an impartial judge and evaluate the two answers to the user's question about the image "
    "shown above. First answer the question yourself from the image, then compare both answers with the image "
    "and explain which one is more accurate and helpful. Do not let the order, length or style of the answers "
    "influence you. After your explanation, output your final verdict strictly in this format: \"[[A]]\" if "
    "answer A is better, \"[[B]]\" if answer B is better.\n\n"
    "[User Question]\n{question}\n\n[The Start of Answer A]\n{a}\n[The End of Answer A]\n\n"
    "[The Start of Answer B]\n{b}\n[The End of Answer B]"
)
NATURAL_REWRITE = (
    "Here is an answer to the question \"{question}\" about the image:\n\n{response}\n\n"
    "Rewrite this answer so that it contains exactly one factual error about the image (a wrong colour, count, "
    "position or attribute, or an object that is not there) and is otherwise identical. Output only the "
    "rewritten answer."
)


def judge_prompt(question: str, a: str, b: str, style: str = "toy") -> str:
    """The judge's prompt for one pair shown in the order (A, B)."""
    if style == "toy":
        return f"judge : question : {question} answer A : {a} answer B : {b} which answer is better ?"
    if style == "natural":
        return NATURAL_JUDGE.format(question=question, a=a, b=b)
    raise ValueError(f"judge style: expected one of {JUDGE_STYLES}, got {style!r}")


def judge_target(reasoning: str, verdict: str, style: str = "toy") -> str:
    """The judge's output: its reasoning, then the verdict ("A" or "B")."""
    if style == "toy":
        return f"my answer : {reasoning} verdict : [[ {verdict} ]]"
    return f"{reasoning}\n\n[[{verdict}]]"


def rewrite_prompt(question: str, response: str, style: str = "toy") -> str:
    """Ask the model for a degraded copy of its own response (exactly one factual error)."""
    if style == "toy":
        return f"rewrite this answer with exactly one error : {response}"
    return NATURAL_REWRITE.format(question=question, response=response)


def match_prompt(reference: str, a: str, b: str) -> str:
    """The toy pretraining's text-comparison task (no image content, no preference): which text equals the
    reference?"""
    return f"reference : {reference} text A : {a} text B : {b} which text matches the reference ?"


# "[[A]]", "[[ B ]]", "Overall Judgment: Answer 1 is better", "Answer A is better", "[[answer a]]".
_BRACKETED = re.compile(r"\[\[\s*(?:answer\s*)?([AB12])\s*\]\]", re.IGNORECASE)
_JUDGMENT = re.compile(r"(?:overall\s+judgment\s*:\s*)?answer\s*([AB12])\s+is\s+(?:the\s+)?better", re.IGNORECASE)
_TO_LETTER = {"a": "A", "1": "A", "b": "B", "2": "B"}


def parse_verdict(text: str | None) -> str | None:
    """The verdict in a judge's output: "A", "B", or None.

    Bracketed verdicts ([[A]], [[B]], with spaces or "answer" inside) take precedence over sentences
    ("Answer 1 is better", "Overall Judgment: Answer B is better"); digits 1/2 mean A/B. When both A and B are
    given in the winning form, or none is, the output is unparsed (None).
    """
    if not text:
        return None
    for pattern in (_BRACKETED, _JUDGMENT):
        found = {_TO_LETTER[m.lower()] for m in pattern.findall(text)}
        if len(found) == 1:
            return found.pop()
        if len(found) > 1:
            return None
    return None


def judge_reasoning(text: str, style: str = "toy") -> str:
    """The reasoning part of a judge output (everything before the verdict)."""
    if style == "toy":
        body = text.split("verdict :")[0]
        return body.removeprefix("my answer :").strip()
    return _BRACKETED.split(text)[0].strip()
