"""Use a judge: compare two answers to a question about an image, with the probability that A is better, and
rank N answers.

    from fastjudge import Judge
    judge = Judge.load("runs/demo/iter_2/checkpoint")          # or Judge.load(None): the shipped toy base
    j = judge.compare(image, "How many circles?", "two", "three")
    j.p_a, j.verdict, j.orders_agree, j.reasonings
    order, scores = judge.rank(image, "Describe the image.", answers)

`p_a` comes from the model itself: the judge writes its reasoning (greedy, or k samples at a temperature),
then at the verdict's position the probability of the "A" token against the "B" token is read from the
logits (`Adapter.choice_probabilities`), no further sampling. With `both_orders` (the default) the pair is
also shown as (b, a) and that order's probability of "B" counts for a; `p_a` is the mean over orders and
samples. A verdict that flips with the order is the position bias VL-RewardBench's analyses measure:
`orders_agree` is False for it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from PIL import Image

from fastjudge.core.sampling_params import SamplingParams
from fastjudge.data.images import encode_image
from fastjudge.data import prompts as prompt_texts
from fastjudge.models import Adapter, generation, load_adapter


@dataclass
class Judgment:
    p_a: float  # the probability that answer a is better, from the verdict logits (mean over orders, samples)
    verdict: str  # "A" (a is better), "B", or "tie" (p_a exactly 0.5)
    reasonings: list[str] = field(default_factory=list)  # the judge's outputs: order (a, b) first, then (b, a)
    orders_agree: bool | None = None  # the verdicts of the two orders name the same answer (None: one order)
    p_a_by_order: list[float] = field(default_factory=list)  # p_a in order (a, b), then in (b, a) mapped back


class Judge:
    """A judge checkpoint behind a small API; `adapter` is the model (`fastjudge.models.Adapter`)."""

    def __init__(self, adapter: Adapter, judge_tokens: int = 512, temperature: float = 0.6, top_k: int = 50,
                 top_p: float = 0.9, batch_rows: int = 32, seed: int = 0):
        self.adapter = adapter
        self.judge_tokens, self.temperature, self.top_k, self.top_p = judge_tokens, temperature, top_k, top_p
        self.batch_rows, self.seed = batch_rows, seed

    @staticmethod
    def remote(url: str, api_key: str | None = None, timeout_s: float = 600.0) -> "RemoteJudge":
        """A judge served by `fastjudge serve` at `url`, with the same `compare`, `compare_many` and `rank`."""
        return RemoteJudge(url, api_key, timeout_s)

    @classmethod
    def load(cls, path: str | None, device: str = "cpu", dtype=None, **options) -> "Judge":
        """The judge at `path` (a checkpoint folder; None: the shipped toy base)."""
        import torch
        from fastjudge.models import FeatureCache
        adapter = load_adapter(path, device=device, dtype=dtype or torch.float32,
                               feature_cache=FeatureCache(max_bytes=4 << 30))
        return cls(adapter, **options)

    def compare(self, image: Image.Image, question: str, a: str, b: str, k: int = 1,
                both_orders: bool = True) -> Judgment:
        """One pair: whether answer a or b is better."""
        return self.compare_many([image], [question], [a], [b], k=k, both_orders=both_orders)[0]

    def compare_many(self, images: list[Image.Image], questions: list[str], answers_a: list[str],
                     answers_b: list[str], k: int = 1, both_orders: bool = True, progress=None) -> list[Judgment]:
        """Pairs in one batch: every (pair, order) prompt generates its k reasonings through the shared-prefix
        engine (each image encoded once for both orders and all samples: the feature cache), then one forward
        pass per reasoning reads the verdict's probabilities."""
        if not len(images) == len(questions) == len(answers_a) == len(answers_b):
            raise ValueError("images, questions, answers_a, answers_b: expected the same length")
        if k < 1:
            raise ValueError(f"k: expected >= 1, got {k}")
        style = self.adapter.judge_style
        orders = [(False,), (False, True)][both_orders]
        shown, prompts = [], []
        for i, (question, a, b) in enumerate(zip(questions, answers_a, answers_b)):
            for swapped in orders:
                shown.append((i, swapped))
                prompts.append(prompt_texts.judge_prompt(question, *((b, a) if swapped else (a, b)), style))
        pictures = [images[i] for i, _ in shown]
        # one reasoning is greedy; k of them are sampled
        sampling = {} if k == 1 else dict(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p)
        params = SamplingParams(n=k, max_new_tokens=self.judge_tokens, seed=self.seed, stop=("]]",), **sampling)
        outputs, p_first = generation.judgments(self.adapter, pictures, prompts, params, batch_rows=self.batch_rows,
                                                progress=progress)
        per_pair: list[dict] = [{"p": [], "texts": []} for _ in images]
        for row, (texts, probabilities) in enumerate(zip(outputs, p_first)):
            i, swapped = shown[row]
            for text, p in zip(texts, probabilities):
                per_pair[i]["p"].append((swapped, 1.0 - p if swapped else p))
                per_pair[i]["texts"].append(text)
        judgments = []
        for entry in per_pair:
            by_order = [sum(p for s, p in entry["p"] if s == swapped) / k for swapped in orders]
            p_a = sum(by_order) / len(by_order)
            agree = None if len(by_order) == 1 else (by_order[0] > 0.5) == (by_order[1] > 0.5)
            judgments.append(Judgment(p_a=p_a, verdict="A" if p_a > 0.5 else "B" if p_a < 0.5 else "tie",
                                      reasonings=entry["texts"], orders_agree=agree, p_a_by_order=by_order))
        return judgments

    def rank(self, image: Image.Image, question: str, answers: list[str], k: int = 1) -> tuple[list[int], list[float]]:
        """The answers ordered best first, by a Bradley-Terry fit on the p_a of every pair (both orders);
        returns (indices best first, each answer's strength, summing to 1)."""
        if len(answers) < 2:
            return list(range(len(answers))), [1.0] * len(answers)
        pairs = [(i, j) for i in range(len(answers)) for j in range(i + 1, len(answers))]
        judged = self.compare_many([image] * len(pairs), [question] * len(pairs), [answers[i] for i, _ in pairs],
                                   [answers[j] for _, j in pairs], k=k)
        scores = bradley_terry(len(answers), [(i, j, jd.p_a) for (i, j), jd in zip(pairs, judged)])
        return sorted(range(len(answers)), key=lambda i: (-scores[i], i)), scores


class RemoteJudge:
    """`Judge.remote(URL)`: a `fastjudge serve` server behind `Judge`'s methods (stdlib HTTP, no dependency). A
    refusal from the server (400, 401, 403, 413, 429) is a ValueError carrying its status and reason."""

    def __init__(self, url: str, api_key: str | None = None, timeout_s: float = 600.0):
        self.url, self.api_key, self.timeout_s = url.rstrip("/"), api_key, timeout_s

    def _post(self, path: str, body: dict) -> dict:
        import json
        import urllib.error
        import urllib.request
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url + path, data=json.dumps(body).encode(), headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as error:
            reason = error.read().decode(errors="replace")
            raise ValueError(f"{self.url}{path}: {error.code} {reason}") from None

    def compare(self, image: Image.Image, question: str, a: str, b: str, k: int = 1,
                both_orders: bool = True) -> Judgment:
        return self.compare_many([image], [question], [a], [b], k=k, both_orders=both_orders)[0]

    def compare_many(self, images: list[Image.Image], questions: list[str], answers_a: list[str],
                     answers_b: list[str], k: int = 1, both_orders: bool = True, progress=None) -> list[Judgment]:
        """As `Judge.compare_many`; k is the server's (`fastjudge serve --k`)."""
        encoded: dict[int, str] = {}
        pairs = [{"image": encoded.setdefault(id(im), encode_image(im)), "question": q, "response_a": a,
                  "response_b": b} for im, q, a, b in zip(images, questions, answers_a, answers_b)]
        results = self._post("/v1/judge", {"pairs": pairs, "both_orders": both_orders, "reasoning": True})["results"]
        if progress:
            progress(len(pairs) * (2 if both_orders else 1))
        return [Judgment(p_a=r["p_a"], verdict=r["verdict"], reasonings=r.get("reasonings", []),
                         orders_agree=r["orders_agree"], p_a_by_order=r["p_a_by_order"]) for r in results]

    def rank(self, image: Image.Image, question: str, answers: list[str], k: int = 1) -> tuple[list[int], list[float]]:
        result = self._post("/v1/rank", {"image": encode_image(image), "question": question, "answers": answers})
        return result["order"], result["scores"]


def reward_function(url: str, api_key: str | None = None):
    """A reward for RL trainers that take callables (TRL's `reward_funcs`): `reward(prompts, completions, image,
    reference, **kwargs) -> list[float]`, each completion's probability of being better than its prompt's reference
    answer (p_a, both orders), from a `fastjudge serve` judge. `image` and `reference` are the dataset's columns
    of those names (PIL images, strings), which TRL passes as keyword arguments."""
    judge = RemoteJudge(url, api_key)

    def reward(prompts: list, completions: list, image: list, reference: list, **kwargs) -> list[float]:
        texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]  # plain or conversational
        questions = [p if isinstance(p, str) else p[-1]["content"] for p in prompts]
        questions = [q if isinstance(q, str) else " ".join(part.get("text", "") for part in q) for q in questions]
        return [j.p_a for j in judge.compare_many(list(image), questions, texts, list(reference))]

    return reward


def bradley_terry(count: int, outcomes: list[tuple[int, int, float]], iterations: int = 500,
                  tolerance: float = 1e-10) -> list[float]:
    """Strengths s (summing to 1) of `count` items from soft pairwise outcomes (i, j, p): i beat j with weight p
    and j beat i with weight 1 - p. The minorization-maximization updates (Hunter 2004): s_i <- W_i / sum_j
    n_ij / (s_i + s_j). The fit is regularized: every pair that met gets one pseudo-game, half won by each side,
    however many outcomes it has, so that an item that never wins keeps a positive strength and the strengths
    stay finite. An item in no outcome has no strength to fit: a ValueError."""
    wins = [0.0] * count
    games: dict[tuple[int, int], float] = {}
    for i, j, p in outcomes:
        if not 0.0 <= p <= 1.0 or i == j or not (0 <= i < count and 0 <= j < count):
            raise ValueError(f"outcome ({i}, {j}, {p}): expected two of {count} items and a probability")
        wins[i] += p
        wins[j] += 1.0 - p
        key = (min(i, j), max(i, j))
        games[key] = games.get(key, 0.0) + 1.0
    for a, b in games:  # the pseudo-game of each pair
        wins[a] += 0.5
        wins[b] += 0.5
        games[(a, b)] += 1.0
    unplayed = sorted(set(range(count)) - {i for pair in games for i in pair})
    if count > 1 and unplayed:
        raise ValueError(f"items {unplayed}: in no outcome, so no strength can be fitted")
    strength = [1.0 / count] * count
    for _ in range(iterations):
        new = []
        for i in range(count):
            denominator = sum(n / (strength[i] + strength[j if a == i else a])
                              for (a, j), n in games.items() if i in (a, j))
            new.append(wins[i] / denominator if denominator else strength[i])
        total = sum(new)
        new = [x / total for x in new]
        change = max(abs(x - y) for x, y in zip(new, strength))
        strength = new
        if change < tolerance:
            break
    assert all(math.isfinite(x) for x in strength)
    return strength
