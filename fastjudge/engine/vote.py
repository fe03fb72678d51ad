"""Final answers found and voted on where the tokens are: fixed-shape state updated once per decoding step.

The sampler uses this for closed-ended prompts to stop drawing samples once a prompt's majority is settled,
without copying tokens to the host each step. It is a token-level approximation of the host pipeline
(`core.answers.extract_answer`, then `core.voting.normalize_answer`, then the C++ vote), which stays the final
word on which answer wins and which samples make the pair.

What is found (per sample):
- a marker: "answer is", "answer:" or "answer :" (case-insensitive, white space collapsed), matched across token
  boundaries by an Aho-Corasick automaton over the characters of each token; the last marker wins, as on the
  host;
- the span after it ends at a newline, at a "." followed by white space, or at the end of the sample;
- the span's identity: a hash of its text, lowercased, with white space, brackets, quotes and ;:!? left out,
  a token that is a whole number word ("three", " Two") read as its digits; the hash is over characters, so it
  does not depend on how the tokenizer split the span. So "( B )", "(b)" and "b" agree, and "2" and " two"
  agree where " two" is one token; "2.50" and "2.5", "option b" and "b", "3 squares" and "3" do not (the
  host's normalization, knowing the answer type, says they do). No marker, or an empty span: no answer (as
  the host's None).

Shapes: R rows (samples being decoded), V vocabulary, S automaton states, B prompts, N samples per prompt.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fastjudge.core.answers import NUMBER_WORDS
from fastjudge.core.voting import majority_confidence

MARKERS = ("answer is", "answer:", "answer :")
_DROPPED = set(" \t\r\v\f;:!?()[]{}\"'\u201c\u201d\u2018\u2019")  # not part of an answer's identity
_BASE = 1_000_003  # polynomial hash over characters, wrapping modulo 2^64
_MASK = (1 << 64) - 1


def _piece(text: str) -> str:
    """A token's contribution to its span's identity: lowercased, white space, brackets, quotes and ;:!? left
    out; a whole number word becomes its digits."""
    word = text.strip().lower()
    if word in NUMBER_WORDS:
        return NUMBER_WORDS[word]
    return "".join(c for c in word if c not in _DROPPED)


def _poly(text: str) -> tuple[int, int]:
    """(hash, base^len) of text, modulo 2^64: the span hash of a concatenation composes as h * base^len + hash,
    so it does not depend on where the tokenizer split the text."""
    h, power = 0, 1
    for c in text:
        h = (h * _BASE + ord(c) + 1) & _MASK
        power = (power * _BASE) & _MASK
    return h, power


def _signed(values: list[int]) -> np.ndarray:
    return np.array(values, dtype=np.uint64).astype(np.int64)


def _automaton(markers: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """Aho-Corasick DFA over the markers' characters: (goto (S, A) int32, accepting (S,) bool, alphabet char ->
    column); column A - 1 is every other character."""
    alphabet = {c: i for i, c in enumerate(sorted(set("".join(markers))))}
    other = len(alphabet)
    children: list[dict[int, int]] = [{}]
    accepting = [False]
    for marker in markers:
        state = 0
        for c in marker:
            column = alphabet[c]
            if column not in children[state]:
                children.append({})
                accepting.append(False)
                children[state][column] = len(children) - 1
            state = children[state][column]
        accepting[state] = True
    goto = np.zeros((len(children), other + 1), dtype=np.int32)
    fail = [0] * len(children)
    order = []
    queue = list(children[0].values())
    for column, child in children[0].items():
        goto[0, column] = child
    while queue:  # breadth first: a state's failure link is complete before its children's
        state = queue.pop(0)
        order.append(state)
        accepting[state] = accepting[state] or accepting[fail[state]]
        for column in range(other + 1):
            child = children[state].get(column)
            if child is None:
                goto[state, column] = goto[fail[state], column]
            else:
                fail[child] = goto[fail[state], column]
                goto[state, column] = child
                queue.append(child)
    return goto, np.array(accepting), alphabet


@dataclass
class SpanTables:
    """Per-token tables (on the decoding device) that drive `SpanTracker`."""

    transition: torch.Tensor  # (S, V) int64: automaton state after reading the token from each state
    accepts: torch.Tensor  # (S, V) bool: a marker ends inside the token
    piece_hash: torch.Tensor  # (V,) int64: `_poly` hash of the token's `_piece` (its text before a newline,
    piece_power: torch.Tensor  # (V,) int64    a final "." left out), and base^length
    content: torch.Tensor  # (V,) bool: the piece is not empty
    newline: torch.Tensor  # (V,) bool: the token holds a newline (it ends a span)
    dot_end: torch.Tensor  # (V,) bool: the token's text before any newline ends in "." (it ends the span when
    #                      white space follows, else the "." joins the span)
    space_start: torch.Tensor  # (V,) bool: the token starts with white space

    @classmethod
    def build(cls, pieces: list[str], vocab_size: int | None = None, device: torch.device | str = "cpu",
              markers: tuple[str, ...] = MARKERS) -> "SpanTables":
        """pieces: the text of each token id as it reads after another token (a word-level tokenizer's word
        with its leading space). vocab_size: the model's output size, when larger than the tokenizer's (ids
        past the pieces have no text)."""
        vocab = max(vocab_size or 0, len(pieces))
        pieces = list(pieces) + [""] * (vocab - len(pieces))
        goto, accepting, alphabet = _automaton(markers)
        other = goto.shape[1] - 1
        lowered = [" ".join(p.lower().split()) if p.strip() else (" " if p else "") for p in pieces]
        # keep a leading/trailing space: it separates words across tokens
        lowered = [(" " if p[:1].isspace() and low.strip() else "") + low + (" " if p[-1:].isspace() and low.strip()
                   else "") for p, low in zip(pieces, lowered)]
        longest = max(map(len, lowered), default=0) or 1
        codes = np.full((vocab, longest), -1, dtype=np.int32)
        for i, text in enumerate(lowered):
            codes[i, :len(text)] = [alphabet.get(c, other) for c in text]
        states = goto.shape[0]
        transition = np.zeros((states, vocab), dtype=np.int64)
        accepts = np.zeros((states, vocab), dtype=bool)
        for start in range(states):  # run every token from every state, one character column at a time
            current = np.full(vocab, start, dtype=np.int64)
            hit = np.zeros(vocab, dtype=bool)
            for j in range(longest):
                column = codes[:, j]
                valid = column >= 0
                after = goto[current, np.where(valid, column, 0)]
                current = np.where(valid, after, current)
                hit |= valid & accepting[current]
            transition[start], accepts[start] = current, hit
        heads = [p.split("\n", 1)[0] for p in pieces]

        def tensor(values, dtype):
            return torch.as_tensor(np.asarray(values), dtype=dtype, device=device)

        dot_end = [h.rstrip().endswith(".") for h in heads]
        pieces_text = [_piece(h.rstrip()[:-1] if dot else h) for h, dot in zip(heads, dot_end)]
        polys = [_poly(p) for p in pieces_text]
        return cls(transition=tensor(transition, torch.long), accepts=tensor(accepts, torch.bool),
                   piece_hash=tensor(_signed([h for h, _ in polys]), torch.long),
                   piece_power=tensor(_signed([p for _, p in polys]), torch.long),
                   content=tensor([bool(p) for p in pieces_text], torch.bool), newline=tensor(["\n" in p for p in pieces], torch.bool),
                   dot_end=tensor(dot_end, torch.bool),
                   space_start=tensor([p[:1].isspace() for p in pieces], torch.bool))


class SpanTracker:
    """The answer span of R samples, updated one token per sample per step with fixed shapes (no host sync)."""

    def __init__(self, tables: SpanTables, rows: int):
        self.tables = tables
        device = tables.content.device
        self.state = torch.zeros(rows, dtype=torch.long, device=device)  # automaton state
        self.open = torch.zeros(rows, dtype=torch.bool, device=device)  # a span is being read
        self.dot = torch.zeros(rows, dtype=torch.bool, device=device)  # the last span token ended in "."
        self.hash = torch.zeros(rows, dtype=torch.long, device=device)
        self.pieces = torch.zeros(rows, dtype=torch.long, device=device)  # content tokens in the span

    def reset(self, rows: torch.Tensor) -> None:
        """Start over on the rows where `rows` (R,) bool is set (a slot that begins a new sample)."""
        for name in ("state", "open", "dot", "hash", "pieces"):
            value = getattr(self, name)
            setattr(self, name, torch.where(rows, torch.zeros_like(value), value))

    def select(self, index: torch.Tensor) -> None:
        """Keep these rows (indices into the current R)."""
        for name in ("state", "open", "dot", "hash", "pieces"):
            setattr(self, name, getattr(self, name)[index])

    def update(self, token: torch.Tensor, write: torch.Tensor) -> None:
        """token (R,) the sampled token; write (R,) bool: it joins its sample's text (not EOS, sample alive)."""
        t = self.tables
        token = token.clamp(0, t.content.shape[0] - 1)
        reading = write & self.open
        ends = reading & self.dot & (t.space_start[token] | t.newline[token])  # ". " closes the span
        reading = reading & ~ends
        # a "." that did not end the span is part of it ("2" "." "5")
        self.hash = torch.where(reading & self.dot, self.hash * _BASE + (ord(".") + 1), self.hash)
        added = reading & t.content[token]
        self.hash = torch.where(added, self.hash * t.piece_power[token] + t.piece_hash[token], self.hash)
        self.pieces = self.pieces + added.long()
        self.dot = torch.where(reading, t.dot_end[token], self.dot)
        # a newline closes a span that has content (the host's "answer:\n 3" reads on to the next line)
        self.open = self.open & ~ends & ~(reading & t.newline[token] & (self.pieces > 0))
        marker = write & t.accepts[self.state, token]  # a marker ends in this token: a new span starts after it
        self.open = self.open | marker
        self.hash = torch.where(marker, torch.zeros_like(self.hash), self.hash)
        self.pieces = torch.where(marker, torch.zeros_like(self.pieces), self.pieces)
        self.dot = self.dot & ~marker
        self.state = torch.where(write, t.transition[self.state, token], self.state)

    def answer(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(found (R,) bool, hash (R,) int64): whether the sample has an answer so far, and its identity."""
        return self.pieces > 0, self.hash


class DeviceVote:
    """The votes of B prompts with up to N samples each, and whether each prompt's majority is settled
    (`core.voting.sampling_settled`'s rule on the first k samples started that have all ended: a leader with
    min_votes votes whose `majority_confidence` reaches `confidence`, or no answer able to reach min_votes any
    more), computed with fixed shapes."""

    def __init__(self, prompts: int, n: int, min_votes: int, confidence: float, device):
        self.n, self.min_votes, self.confidence = n, min_votes, confidence
        self.hash = torch.zeros(prompts, n + 1, dtype=torch.long, device=device)  # column n: a dump for no-ops
        self.found = torch.zeros(prompts, n + 1, dtype=torch.bool, device=device)
        self.recorded = torch.zeros(prompts, n + 1, dtype=torch.bool, device=device)
        # majority_confidence(v1, v2) for every pair of counts, looked up on the device
        table = [[majority_confidence([v1, v2]) for v2 in range(n + 1)] for v1 in range(n + 1)]
        self.table = torch.tensor(table, dtype=torch.float64, device=device)

    def record(self, prompt: torch.Tensor, sample: torch.Tensor, ended: torch.Tensor, found: torch.Tensor,
               hash_: torch.Tensor) -> None:
        """Store the answers of the samples that ended this step. All (R,): prompt index (into the B of the
        constructor), sample index in [0, N), ended bool, found bool, hash int64."""
        column = torch.where(ended, sample, torch.full_like(sample, self.n))
        self.hash[prompt, column] = hash_
        self.found[prompt, column] = found
        self.recorded[prompt, column] = ended | self.recorded[prompt, column]

    def drawn(self, prompt: torch.Tensor) -> torch.Tensor:
        """(P,) for prompts (P,) indices: how many samples, counted in the order they were started, have all
        ended (samples 0..k-1). Only these vote: counting samples in the order they end would favour the
        answers of short samples, which end first."""
        return self.recorded[prompt, :self.n].long().cumprod(dim=1).sum(dim=1)

    def counts(self, prompt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For prompts (P,) indices: (leader votes v1 (P,), runner-up votes v2 (P,), samples drawn (P,)), over
        the samples `drawn` counts."""
        hash_ = self.hash[prompt, :self.n]  # (P, N)
        drawn = self.drawn(prompt)
        first = torch.arange(self.n, device=hash_.device) < drawn[:, None]  # (P, N)
        valid = self.found[prompt, :self.n] & first
        same = (hash_[:, :, None] == hash_[:, None, :]) & valid[:, :, None] & valid[:, None, :]  # (P, N, N)
        votes = same.sum(-1)  # (P, N): the votes of each sample's answer
        v1, leader = votes.max(dim=-1)
        leader_hash = hash_.gather(1, leader[:, None])
        v2 = torch.where(valid & (hash_ != leader_hash), votes, torch.zeros_like(votes)).max(dim=-1).values
        return v1, v2, drawn

    def settled(self, prompt: torch.Tensor) -> torch.Tensor:
        """(P,) bool for prompts (P,) indices."""
        v1, v2, drawn = self.counts(prompt)
        sure = (v1 >= self.min_votes) & (self.table[v1, v2] >= self.confidence)
        return sure | (v1 + (self.n - drawn) < self.min_votes)


@dataclass
class EarlyStop:
    """Stop drawing a prompt's samples once its vote is settled (`DeviceVote`). The decoder leaves the vote of
    its last call in `last_vote`, for inspection."""

    tables: SpanTables
    confidence: float
    min_votes: int
    last_vote: DeviceVote | None = None
