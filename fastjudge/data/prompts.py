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


# what follows the reasoning up to the verdict's letter, and the letters as they follow it, in each style
VERDICT_LEAD = {"toy": " verdict : [[", "natural": "\n\n[["}
VERDICT_START = "[["  # both styles open their verdict with it (`judge_target`)
VERDICT_CHOICES = {"toy": (" A", " B"), "natural": ("A", "B")}


def split_at_verdict(text: str) -> tuple[str, str] | None:
    """(the text up to and including the "[[" that opens its verdict, the rest); None when it has no verdict.
    The first "[[": what the judge wrote after its reasoning."""
    start = text.find(VERDICT_START)
    if start < 0:
        return None
    cut = start + len(VERDICT_START)
    return text[:cut], text[cut:]


def verdict_prefix(output: str, style: str = "toy") -> str:
    """A judge output cut just before its verdict's letter: up to its last "[[" (a verdict follows the
    reasoning), or, when it wrote none, the whole output followed by the style's lead-in (the verdict is then
    read where it would have come)."""
    start = output.rfind(VERDICT_START)
    if start >= 0:
        return output[:start + len(VERDICT_START)]
    return output.rstrip() + VERDICT_LEAD[style]


def judge_target(reasoning: str, verdict: str, style: str = "toy") -> str:
    """The judge's output: its reasoning, then the verdict ("A" or "B")."""
    if style == "toy":
        return f"my answer : {reasoning} verdict : [[ {verdict} ]]"
    return f"{reasoning}\n\n[[{verdict}]]"


# The toy judge's reasoning: its own answer to the question, then one check per answer: does that answer say
# what mine says? ("my answer : the answer is 3 . A : no B : yes verdict : [[ B ]]"). Each step is a thing the
# tiny model can compute: answering is perception, a check compares two short texts, and a verdict that follows
# the checks reads two words just before it.
_TOY_CHECKS = re.compile(r"^(?P<own>.*?)\s*A : (?P<a>yes|no) B : (?P<b>yes|no)$")


def toy_reasoning(own: str, a_agrees: bool, b_agrees: bool) -> str:
    """The toy judge's reasoning: its own answer, then whether answer A and answer B agree with it."""
    return f"{own} A : {'yes' if a_agrees else 'no'} B : {'yes' if b_agrees else 'no'}"


def parse_toy_reasoning(reasoning: str) -> tuple[str, bool, bool] | None:
    """(own answer, A agrees, B agrees) from the toy judge's reasoning; None when it is not in that form."""
    found = _TOY_CHECKS.match(reasoning.strip())
    if found is None:
        return None
    return found["own"], found["a"] == "yes", found["b"] == "yes"


_TOY_CHECKS_START = re.compile(r" A : (yes|no) B : (yes|no) verdict : \[\[")  # where the own answer ends


def split_at_checks(text: str) -> tuple[str, str] | None:
    """(the toy judge's output up to the end of its own answer, the rest: its checks and verdict); None when the
    output is not in that form (the natural style has no own-answer part to split at)."""
    found = _TOY_CHECKS_START.search(text) if text.startswith("my answer :") else None
    return (text[:found.start()], text[found.start():]) if found else None


def checks_verdict(reasoning: str) -> str | None:
    """The verdict the toy judge's checks point to: "A" when only A agrees with its own answer, "B" when only B
    does, None otherwise (both, neither, or no checks)."""
    parsed = parse_toy_reasoning(reasoning)
    if parsed is None or parsed[1] == parsed[2]:
        return None
    return "A" if parsed[1] else "B"


def rewrite_prompt(question: str, response: str, style: str = "toy") -> str:
    """Ask the model for a degraded copy of its own response (exactly one factual error)."""
    if style == "toy":
        return f"rewrite this answer with exactly one error : {response}"
    return NATURAL_REWRITE.format(question=question, response=response)


def match_prompt(reference: str, a: str, b: str) -> str:
    """The toy pretraining's text-comparison task (no image content, no preference): which text equals the
    reference?"""
    return f"reference : {reference} text A : {a} text B : {b} which text matches the reference ?"


# The benchmarks' own judge prompts, word for word as their official evaluation code sends them (the protocol
# behind their published numbers). VL-RewardBench: "Answer 1" is the response shown first; its prompt starts
# with a space. Multimodal RewardBench: MT-Bench's pairwise prompt without the tie option.
VLRB_JUDGE = (
    " You are a highly capable multimodal AI assistant tasked with evaluating answers to visual questions. Please "
    "analyze the following image and question, then determine which of the two provided answers is better.\n\n"
    "Question: {question}\n\nAnswer 1: {a}\n\nAnswer 2: {b}\n\n"
    "Please evaluate both answers based on the following criteria:\n"
    "1. Accuracy: How well does the answer align with the visual information in the image?\n"
    "2. Completeness: Does the answer fully address all aspects of the question?\n"
    "3. Clarity: Is the answer easy to understand and well-articulated?\n"
    "4. Relevance: Does the answer directly relate to the question and the image?\n\n"
    "After your evaluation, please:\n"
    "1. Explain your reasoning for each criterion.\n"
    "2. Provide an overall judgment on which answer is better (Answer 1 or Answer 2). For example: Overall "
    "Judgment: Answer X is better.\n\n"
    "Your response should be structured and detailed, demonstrating your understanding of both the visual and "
    "textual elements of the task."
)
MMRB_JUDGE = (
    "Please act as an impartial judge and evaluate the quality of the responses provided by two AI assistants to "
    "the user question displayed below. You should choose the assistant that follows the user's instructions and "
    "answers the user's question better. Your evaluation should consider factors such as the helpfulness, "
    "relevance, accuracy, depth, creativity, and level of detail of their responses. Begin your evaluation by "
    "comparing the two responses and provide a short explanation. Avoid any position biases and ensure that the "
    "order in which the responses were presented does not influence your decision. Do not allow the length of the "
    "responses to influence your evaluation. Do not favor certain names of the assistants. Be as objective as "
    "possible. After providing your explanation, output your final verdict by strictly following this format: "
    "\"[[A]]\" if assistant A is better, \"[[B]]\" if assistant B is better.\n\n"
    "[User Question]\n{question}\n\n[The Start of Assistant A's Answer]\n{a}\n[The End of Assistant A's Answer]"
    "\n\n[The Start of Assistant B's Answer]\n{b}\n[The End of Assistant B's Answer]"
)
BENCHMARK_PROMPTS = {"vlrewardbench": VLRB_JUDGE, "mmrb": MMRB_JUDGE}


def benchmark_prompt(bench: str, question: str, a: str, b: str) -> str:
    """A benchmark's own judge prompt for one pair shown in the order (A, B) (VL-RewardBench: Answer 1, 2)."""
    if bench not in BENCHMARK_PROMPTS:
        raise ValueError(f"prompt: {bench!r} has no prompt of its own (benchmarks with one: "
                         f"{sorted(BENCHMARK_PROMPTS)}); use --prompt ours")
    return BENCHMARK_PROMPTS[bench].format(question=question, a=a, b=b)


# Verdict forms, strongest first:
#   bracketed:  "[[A]]", "[[ B ]]", "[[Answer 2]]"                      (ours, MT-Bench / Multimodal RewardBench)
#   sentence:   "Overall Judgment: Answer 1 is better", "Therefore, Answer 2 is slightly better",
#               "Answer A is the better"                                (VL-RewardBench)
_BRACKETED = re.compile(r"\[\[\s*(?:answer\s*|assistant\s*)?([AB12])\s*\]\]", re.IGNORECASE)
_SENTENCE = re.compile(r"answer\s*([AB12])\s+is\s+(?:the\s+)?(?:slightly\s+|much\s+|clearly\s+)?better",
                       re.IGNORECASE)
# VL-RewardBench's own parser reads the judgment after "Overall Judgment" or "Therefore" when there is one; the
# last such anchor (a criterion sentence may say "therefore" or "overall judgment" earlier)
_CONCLUSIONS = (re.compile(r"overall\s+judg(?:e)?ment", re.IGNORECASE), re.compile(r"therefore", re.IGNORECASE))
_TO_LETTER = {"a": "A", "1": "A", "b": "B", "2": "B"}


def parse_verdict(text: str | None) -> str | None:
    """The verdict in a judge's output: "A", "B", or None (unparsed).

    The verdict statements are the bracketed verdicts and the "Answer X is better" sentences of the conclusion:
    the text after the last "Overall Judgment" (else the last "Therefore"). When there is none, any "Answer X
    is better" sentence counts. Digits 1/2 mean A/B (the response shown first / second); markdown emphasis
    ("**Answer 1** is better") is ignored. Statements that name both A and B give None (both verdicts present),
    as does an output with no verdict at all.
    """
    if not text:
        return None
    text = text.replace("*", "")
    found = {_TO_LETTER[m.lower()] for m in _BRACKETED.findall(text)}
    for anchor in _CONCLUSIONS:
        starts = [m.start() for m in anchor.finditer(text)]
        if starts:
            found |= {_TO_LETTER[m.lower()] for m in _SENTENCE.findall(text[starts[-1]:])}
            break
    if not found:  # no bracket and no conclusion: a plain "Answer X is better" anywhere
        found = {_TO_LETTER[m.lower()] for m in _SENTENCE.findall(text)}
    return found.pop() if len(found) == 1 else None


def judge_reasoning(text: str, style: str = "toy") -> str:
    """The reasoning part of a judge output (everything before the verdict)."""
    if style == "toy":
        body = text.split("verdict :")[0]
        return body.removeprefix("my answer :").strip()
    return _BRACKETED.split(text)[0].strip()
