"""Answer normalization and majority voting: the rules, the vote semantics, C++ == Python reference."""

from __future__ import annotations

import dataclasses
import gc
import random

import pytest

from fastjudge import _C
from fastjudge.core.voting import Vote, majority_vote, majority_vote_reference, normalize_answer

NORMALIZE = {"python": normalize_answer, "c++": _C.normalize_answer}
VOTE = {"python": majority_vote_reference, "c++": majority_vote}


def as_tuples(votes: list[Vote]) -> list[tuple]:
    """Vote fields with dict order made visible (dict equality ignores order; the contract does not)."""
    return [(v.winner, list(v.counts.items()), list(v.indices.items())) for v in votes]


# (text, expected normalized answer), one group per rule in the fastjudge.core.voting docstring.
NORMALIZATION_TABLE = [
    # white space: stripped, internal runs collapsed (ASCII white space only)
    ("  Paris  ", "paris"),
    ("new\t\n york", "new york"),
    ("a  b   c", "a b c"),
    ("\u00a0paris", "\u00a0paris"),  # no-break space is not ASCII white space
    # ASCII-only lowercasing
    ("PARIS", "paris"),
    ("ÉCOLE", "École"),
    ("ΣΟΦΙΑ", "ΣΟΦΙΑ"),
    ("İstanbul", "İstanbul"),
    # trailing punctuation, all of it; internal punctuation stays
    ("paris.", "paris"),
    ("paris?!", "paris"),
    ("yes;:,", "yes"),
    ("e.g. this", "e.g. this"),
    ("!hello", "!hello"),
    # quotes: one matching pair at a time, only when the inside holds no quote of that pair
    ('"paris"', "paris"),
    ("'paris'", "paris"),
    ("\u201cparis\u201d", "paris"),
    ("\u2018paris\u2019", "paris"),
    ('"a" or "b"', '"a" or "b"'),
    ('"paris', '"paris'),
    ("don't", "don't"),
    ("\u201dparis\u201c", "\u201dparis\u201c"),  # reversed curly quotes are not a pair
    # brackets: only when the first bracket closes at the end
    ("(paris)", "paris"),
    ("[paris]", "paris"),
    ("{paris}", "paris"),
    ("((paris))", "paris"),
    ("(a) or (b)", "(a) or (b)"),
    ("(paris", "(paris"),
    ("f(x)", "f(x)"),
    ("(paris]", "(paris]"),
    # the stripping rules interleave until stable
    ('("Paris.")', "paris"),
    ("[ 'Paris' ]!", "paris"),
    ('"(B)."', "b"),
    (" ( 42 ) . ", "42"),
    # nothing left -> None
    ("", None),
    ("   ", None),
    ("...", None),
    ("()", None),
    ('""', None),
    ("( . )", None),
    # numbers
    ("2", "2"),
    ("2.0", "2"),
    ("02", "2"),
    ("+2", "2"),
    ("2.", "2"),
    ("(2)", "2"),
    ("1,000", "1000"),
    ("1000", "1000"),
    ("1,000,000", "1000000"),
    ("1,000.50", "1000.5"),
    ("2.50", "2.5"),
    ("-3", "-3"),
    ("-0", "0"),
    ("-0.000", "0"),
    ("0.0", "0"),
    ("00", "0"),
    (".5", "0.5"),
    ("-.5", "-0.5"),
    ("-0.5", "-0.5"),
    ("12345678901234567890.10", "12345678901234567890.1"),  # no float rounding
    ("1,00", "1,00"),  # badly grouped: text
    ("1234,567", "1234,567"),
    ("- 3", "- 3"),
    ("+-3", "+-3"),
    ("3 apples", "3 apples"),
    ("1e3", "1e3"),
    ("\u0663", "\u0663"),  # ARABIC-INDIC DIGIT THREE is not an ASCII digit
    # number words zero..twenty
    ("zero", "0"),
    ("two", "2"),
    ("Two.", "2"),
    ("eleven", "11"),
    ("twenty", "20"),
    ("twenty-one", "twenty-one"),
    ("twos", "twos"),
    # option letters
    ("(B)", "b"),
    ("B.", "b"),
    ("B)", "b"),
    ("b", "b"),
    ("[B]", "b"),
    ("Option B", "b"),
    ("option (b)", "b"),
    ("OPTION  B.", "b"),
    ("option b)", "b"),
    ("B:", "b"),
    ('"B"', "b"),
    ("F", "f"),
    ("option 3", "option 3"),
    ("option", "option"),
    ("options b", "options b"),
    ("(b) 42", "(b) 42"),
    ("bb)", "bb)"),
]


@pytest.mark.parametrize("impl", NORMALIZE)
@pytest.mark.parametrize(("text", "expected"), NORMALIZATION_TABLE)
def test_normalization_table(impl: str, text: str, expected: str | None) -> None:
    assert NORMALIZE[impl](text) == expected


@pytest.mark.parametrize("impl", NORMALIZE)
def test_normalize_rejects_non_str(impl: str) -> None:
    with pytest.raises(TypeError, match="text must be str, got int"):
        NORMALIZE[impl](3)


@pytest.mark.parametrize("impl", VOTE)
def test_vote_counts_indices_and_winner(impl: str) -> None:
    votes = VOTE[impl]([["2", "two", "3", None, "(B)", "2.0"], ["b", "B."]])
    assert as_tuples(votes) == [
        ("2", [("2", 3), ("3", 1), ("b", 1)], [("2", [0, 1, 5]), ("3", [2]), ("b", [4])]),
        ("b", [("b", 2)], [("b", [0, 1])]),  # indices restart at 0 for each prompt
    ]
    assert all(isinstance(v, Vote) for v in votes)


@pytest.mark.parametrize("impl", VOTE)
def test_vote_tie_has_no_winner(impl: str) -> None:
    votes = VOTE[impl]([["a", "b"], ["a", "a", "b", "b", "c"], ["a", "a", "a", "b", "b", "c", "c"]])
    assert [v.winner for v in votes] == [None, None, "a"]  # a tie below the top count does not matter
    assert votes[1].counts == {"a": 2, "b": 2, "c": 1}


@pytest.mark.parametrize("impl", VOTE)
def test_vote_min_votes(impl: str) -> None:
    answers = [["a", "a", "b"]]
    assert VOTE[impl](answers, min_votes=2)[0].winner == "a"
    below = VOTE[impl](answers, min_votes=3)[0]
    assert below.winner is None
    assert below.counts == {"a": 2, "b": 1}  # counts are reported even without a winner
    assert VOTE[impl](answers, min_votes=10**30)[0].winner is None


@pytest.mark.parametrize("impl", VOTE)
def test_vote_ignores_none_and_empty_answers(impl: str) -> None:
    (vote,) = VOTE[impl]([[None, "...", "x", "  ", None, "X!"]])
    assert vote == Vote("x", {"x": 2}, {"x": [2, 5]})


@pytest.mark.parametrize("impl", VOTE)
def test_vote_empty_and_all_none_prompts(impl: str) -> None:
    assert VOTE[impl]([]) == []
    assert VOTE[impl]([[], [None, None], ()]) == [Vote(None, {}, {})] * 3


@pytest.mark.parametrize("impl", VOTE)
def test_vote_accepts_tuples(impl: str) -> None:
    assert VOTE[impl]((("a", "A", None),))[0] == Vote("a", {"a": 2}, {"a": [0, 1]})


def test_vote_is_frozen_and_winner_is_a_key() -> None:
    vote = majority_vote([["7", "seven", "8"]])[0]
    with pytest.raises(dataclasses.FrozenInstanceError):
        vote.winner = "8"  # type: ignore[misc]
    assert vote.winner in vote.counts


BAD_ARGUMENTS = [
    ((None,), {}, TypeError, "answers must be a list of lists of str or None, got NoneType"),
    (("abc",), {}, TypeError, "answers must be a list of lists of str or None, got str"),
    (([["a"], "b"],), {}, TypeError, "answers[1] must be a list of str or None, got str"),
    (([["a", 3]],), {}, TypeError, "answers[0][1] must be str or None, got int"),
    (([["a"], [None, b"x"]],), {}, TypeError, "answers[1][1] must be str or None, got bytes"),
    (([["a"]],), {"min_votes": 0}, ValueError, "min_votes must be >= 1, got 0"),
    (([["a"]],), {"min_votes": -(10**30)}, ValueError, f"min_votes must be >= 1, got {-(10**30)}"),
    (([["a"]],), {"min_votes": 1.5}, TypeError, "min_votes must be an int, got float"),
]


@pytest.mark.parametrize("impl", VOTE)
@pytest.mark.parametrize(("args", "kwargs", "error", "message"), BAD_ARGUMENTS)
def test_argument_errors(impl: str, args: tuple, kwargs: dict, error: type, message: str) -> None:
    with pytest.raises(error) as info:
        VOTE[impl](*args, **kwargs)
    assert str(info.value) == message  # both implementations give the same message


def test_error_in_a_late_chunk_stops_the_workers() -> None:
    answers = [["a", "b", "a"]] * 9000
    answers = answers + [["a", 7]]  # the bad entry sits in the last of several chunks
    with pytest.raises(TypeError, match=r"answers\[9000\]\[1\] must be str or None, got int"):
        _C.majority_vote(answers, 1, num_threads=4)
    assert len(majority_vote(answers[:-1])) == 9000  # still usable afterwards


@pytest.mark.parametrize("enabled", [True, False])
def test_gc_state_is_restored(enabled: bool) -> None:
    was = gc.isenabled()
    try:
        gc.enable() if enabled else gc.disable()
        majority_vote([["a", "b", "a"]] * 5000)
        assert gc.isenabled() == enabled
    finally:
        gc.enable() if was else gc.disable()


# Random answers built from fragments that exercise every rule, plus noise characters.
FRAGMENTS = [
    "a", "B", "c", "E", "f", "option ", "Option ", "(", ")", "[", "]", "{", "}", '"', "'",
    "\u201c", "\u201d", "\u2018", "\u2019", ".", ",", ";", ":", "!", "?", " ", "  ", "\t", "\n",
    "0", "1", "2", "5", "00", "10", "1,000", "2.50", "-", "+", ".", "two", "Twenty", "zero", "seven",
    "paris", "New York", "É", "ß", "İ", "\u00a0", "\u0663", "\ud800", "x",
]


def random_answer(rng: random.Random) -> str | None:
    if rng.random() < 0.1:
        return None
    return "".join(rng.choice(FRAGMENTS) for _ in range(rng.choice([1, 1, 2, 2, 3, 4, 6])))


def random_batch(rng: random.Random, num_prompts: int) -> list[list[str | None]]:
    batch = []
    for _ in range(num_prompts):
        # A small pool per prompt so that answers repeat and votes have real winners and ties.
        pool = [random_answer(rng) for _ in range(rng.randint(1, 6))]
        n = rng.randint(0, 20)
        batch.append([rng.choice(pool) if rng.random() < 0.8 else random_answer(rng) for _ in range(n)])
    return batch


@pytest.fixture
def seed() -> int:
    seed = random.randrange(2**32)
    print(f"random seed: {seed}")  # shown with the failure report; rerun with random.Random(seed)
    return seed


def test_normalize_cpp_matches_python_on_random_text(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(20_000):
        text = random_answer(rng) or ""
        assert _C.normalize_answer(text) == normalize_answer(text), f"seed={seed} text={text!r}"


@pytest.mark.parametrize("min_votes", [1, 2, 3])
def test_vote_cpp_matches_python_on_random_batches(seed: int, min_votes: int) -> None:
    rng = random.Random(seed + min_votes)
    answers = random_batch(rng, 3000)
    expected = as_tuples(majority_vote_reference(answers, min_votes))
    assert sum(winner is not None for winner, _, _ in expected) > 100  # the data has real winners
    assert as_tuples(majority_vote(answers, min_votes)) == expected, f"seed={seed}"


@pytest.mark.parametrize("num_threads", [1, 2, 3, 16])
def test_vote_same_result_for_any_thread_count(seed: int, num_threads: int) -> None:
    answers = random_batch(random.Random(seed), 4000)  # ~40k answers: several chunks
    expected = as_tuples(majority_vote_reference(answers, 2))
    got = _C.majority_vote(answers, 2, num_threads=num_threads, vote_type=Vote)
    assert as_tuples(got) == expected, f"seed={seed}"


def test_raw_cpp_result_is_tuples() -> None:
    assert _C.majority_vote([["a", "a", "b"]]) == [("a", {"a": 2, "b": 1}, {"a": [0, 1], "b": [2]})]


@pytest.mark.parametrize("vote_type", [int, 3])
def test_raw_cpp_rejects_odd_vote_types(vote_type: object) -> None:
    with pytest.raises(TypeError, match="vote_type must be a plain class"):
        _C.majority_vote([["a"]], vote_type=vote_type)


@pytest.mark.parametrize("impl", VOTE)
def test_first_error_in_row_major_order(impl: str) -> None:
    with pytest.raises(TypeError) as info:
        VOTE[impl]([["a", 3], "not a list"])
    assert str(info.value) == "answers[0][1] must be str or None, got int"


def test_vote_many_distinct_answers_per_prompt(seed: int) -> None:
    rng = random.Random(seed)
    # Hundreds of distinct keys in one prompt: past the C++ key table's initial size.
    numbers = [str(rng.randint(0, 400)) for _ in range(3000)]
    texts = [f"answer {i}" for i in range(500)] + ["answer 7"]
    answers = [numbers, texts]
    expected = as_tuples(majority_vote_reference(answers))
    assert len(expected[0][1]) > 300
    assert expected[1][0] == "answer 7"
    assert as_tuples(majority_vote(answers)) == expected, f"seed={seed}"
