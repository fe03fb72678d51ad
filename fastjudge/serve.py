"""`fastjudge serve`: the judge as a batched HTTP reward server (FastAPI under uvicorn), for RL and best-of-N
pipelines that send it pairs or candidates as they are generated.

    POST /v1/judge  {"pairs": [{"id"?, "image" | "image_path", "question", "response_a", "response_b"}, ...],
                     "both_orders"?: true, "reasoning"?: false}
                    -> {"results": [{"id", "p_a", "verdict", "orders_agree", "p_a_by_order", "reasonings"?}, ...]}
    POST /v1/rank   {"image" | "image_path", "question", "answers": [...]} -> {"order", "scores", "best"}
    GET  /health    -> {"status": "ok", "queue": n}
    GET  /metrics   Prometheus' text format (prometheus-client)

`image` is base64 (a data: URI too); with `--image-root`, `image_path` may name a file under it instead. Requests that arrive within
`max_wait_ms` of each other are joined into one call of the shared-prefix engine (`Judge.compare_many`) of up to
`max_batch_pairs` pairs, the feature cache shared by all; each caller gets its own results in its own order.
Bad requests are answered, never fatal: 400 naming the field (malformed JSON, a missing field, an image that does
not decode or is too large, text over the model's context), 413 (a body over `max_body_mb`), 429 with Retry-After
(the queue is full), 403 (a path outside the image root), 401 (no or a wrong bearer token, compared in constant
time). uvicorn ends on SIGTERM: it stops accepting and finishes the requests in flight, then exits 0.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import concurrent.futures
import hmac
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from fastjudge.data import prompts as prompt_texts
from fastjudge.data.images import MAX_DECODE_PIXELS, decode_image_bytes
from fastjudge.judge import Judge, bradley_terry


@dataclass(frozen=True)
class ServeSettings:
    """The server's limits and batching (`fastjudge serve --help`)."""
    max_wait_ms: float = 10.0  # how long the first request of a batch waits for others to join it
    max_batch_pairs: int = 64  # pairs a batch holds at most (a larger request runs alone)
    max_queue: int = 256  # requests waiting at most; one more is answered 429
    max_body_mb: float = 32.0
    max_pairs: int = 256  # pairs one request may hold (n candidates to rank: n(n-1)/2 pairs)
    image_root: str | None = None  # where image paths may point; None: base64 only
    api_key: str | None = None  # a bearer token every request but /health must carry

    def __post_init__(self):
        for name in ("max_wait_ms", "max_body_mb"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and value == value and 0 <= value < float("inf")):
                raise ValueError(f"{name}: expected a finite number >= 0, got {value}")
        for name in ("max_batch_pairs", "max_queue", "max_pairs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected >= 1, got {getattr(self, name)}")


class Refused(Exception):
    """A request answered with `status` and a one-line `reason` (`kind` counts it in the metrics)."""

    def __init__(self, status: int, reason: str, kind: str, headers: dict | None = None):
        super().__init__(reason)
        self.status, self.reason, self.kind, self.headers = status, reason, kind, headers or {}


@dataclass
class _Work:
    images: list
    questions: list[str]
    answers_a: list[str]
    answers_b: list[str]
    both_orders: bool
    done: asyncio.Future
    size: int = field(init=False)

    def __post_init__(self):
        self.size = len(self.questions)


class Batcher:
    """Joins queued requests into engine calls (module docstring); one engine call at a time, in a thread of its
    own, so that the event loop keeps accepting requests meanwhile."""

    def __init__(self, judge: Judge, settings: ServeSettings, metrics: "Metrics", k: int = 1):
        self.judge, self.settings, self.metrics, self.k = judge, settings, metrics, k
        self.queue: asyncio.Queue[_Work] = asyncio.Queue(maxsize=settings.max_queue)
        self.waiting: list[_Work] = []  # taken from the queue for a batch of the other orders setting
        self.engine = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="fastjudge-engine")

    def depth(self) -> int:
        return self.queue.qsize() + len(self.waiting)

    def submit(self, work: _Work) -> None:
        try:
            self.queue.put_nowait(work)
        except asyncio.QueueFull:
            raise Refused(429, f"the queue is full ({self.settings.max_queue} requests waiting); retry shortly",
                          "overloaded", {"Retry-After": "1"}) from None
        self.metrics.queue.set(self.depth())

    async def next_batch(self) -> tuple[list[_Work], int]:
        """The next engine call's requests and their pairs: the first waiting request, then those set aside
        earlier and those already queued (taken at once: a window that ran out while the event loop answered the
        last batch's callers must not leave them behind), then those that arrive within `max_wait_ms`."""
        loop = asyncio.get_running_loop()
        first = self.waiting.pop(0) if self.waiting else await self.queue.get()
        batch, size, limit = [first], first.size, self.settings.max_batch_pairs
        set_aside, full = [], False
        for work in self.waiting:
            same_kind = work.both_orders == first.both_orders
            if same_kind and not full and size + work.size <= limit:
                batch.append(work)
                size += work.size
            else:
                full = full or same_kind  # the first of its kind that does not fit ends the batch
                set_aside.append(work)
        self.waiting = set_aside
        deadline = loop.time() + self.settings.max_wait_ms / 1000
        while size < limit and not full:
            try:
                work = self.queue.get_nowait()
            except asyncio.QueueEmpty:
                left = deadline - loop.time()
                if left <= 0:
                    break
                try:
                    work = await asyncio.wait_for(self.queue.get(), left)
                except asyncio.TimeoutError:
                    break
            if work.both_orders != first.both_orders or size + work.size > limit:
                self.waiting.append(work)  # the next batch's
                if work.both_orders == first.both_orders:
                    break
                continue
            batch.append(work)
            size += work.size
        return batch, size

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch, size = await self.next_batch()
            first = batch[0]
            self.metrics.queue.set(self.depth())
            self.metrics.batch_pairs.observe(size)
            joined = [sum((getattr(w, name) for w in batch), []) for name in
                      ("images", "questions", "answers_a", "answers_b")]
            try:
                judged = await loop.run_in_executor(self.engine, lambda: self.judge.compare_many(
                    *joined, k=self.k, both_orders=first.both_orders))
            except Exception as exc:  # the engine failed: every caller of the batch gets the error
                for work in batch:
                    if not work.done.done():
                        work.done.set_exception(exc)
                continue
            start = 0
            for work in batch:
                if not work.done.done():
                    work.done.set_result(judged[start:start + work.size])
                start += work.size


class Metrics:
    """The server's Prometheus metrics, in a registry of its own."""

    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter("fastjudge_requests", "requests answered, by endpoint and status",
                                ["endpoint", "status"], registry=self.registry)
        self.errors = Counter("fastjudge_errors", "requests refused or failed, by kind", ["kind"],
                              registry=self.registry)
        self.queue = Gauge("fastjudge_queue_depth", "requests waiting for a batch", registry=self.registry)
        self.batch_pairs = Histogram("fastjudge_batch_pairs", "pairs per engine call", registry=self.registry,
                                     buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512))
        self.latency = Histogram("fastjudge_request_seconds", "request latency, by endpoint", ["endpoint"],
                                 registry=self.registry)


def create_app(judge: Judge, settings: ServeSettings = ServeSettings(), k: int = 1) -> FastAPI:
    """The server's ASGI app around a loaded `judge` (`uvicorn.run(create_app(...))`)."""
    metrics = Metrics()
    state: dict = {}

    async def lifespan(app):
        batcher = Batcher(judge, settings, metrics, k)
        state["batcher"] = batcher
        task = asyncio.create_task(batcher.run())
        yield
        task.cancel()
        batcher.engine.shutdown(wait=True)

    app = FastAPI(title="fastjudge", lifespan=lifespan)
    context = judge.adapter.context_length
    style = judge.adapter.judge_style
    root = Path(settings.image_root).resolve() if settings.image_root else None
    # every two candidates to rank are one pair: n candidates are n(n-1)/2 pairs, at most --max-pairs
    most_candidates = max(n for n in range(2, settings.max_pairs + 2) if n * (n - 1) // 2 <= settings.max_pairs)

    def authorize(request: Request) -> None:
        if settings.api_key is None:
            return
        given = request.headers.get("authorization", "")
        token = given[len("Bearer "):] if given.startswith("Bearer ") else ""
        if not hmac.compare_digest(token.encode(), settings.api_key.encode()):
            raise Refused(401, "missing or wrong bearer token (Authorization: Bearer KEY)", "unauthorized",
                          {"WWW-Authenticate": "Bearer"})

    async def body_of(request: Request) -> dict:
        limit = int(settings.max_body_mb * 2**20)
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise Refused(413, f"the body is {int(declared)} bytes, more than --max-body-mb {settings.max_body_mb}",
                          "too_large")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise Refused(413, f"the body is over --max-body-mb {settings.max_body_mb}", "too_large")
            chunks.append(chunk)
        try:
            body = json.loads(b"".join(chunks))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise Refused(400, f"malformed JSON: {exc}", "bad_request") from None
        if not isinstance(body, dict):
            raise Refused(400, "expected a JSON object", "bad_request")
        return body

    def text(obj: dict, name: str, where: str) -> str:
        value = obj.get(name)
        if not isinstance(value, str) or not value.strip():
            raise Refused(400, f"{where}.{name}: missing or not a non-empty string", "bad_request")
        return value

    def image(obj: dict, where: str):
        value = obj.get("image")
        if "image_path" in obj:
            value = obj["image_path"]
            if root is None:
                raise Refused(400, f"{where}.image_path: this server takes no paths (no --image-root); send "
                              "the image as base64 in image", "bad_request")
            if not isinstance(value, str) or not value:
                raise Refused(400, f"{where}.image_path: expected a path under --image-root", "bad_request")
            path = (root / value).resolve()  # symlinks followed: a link out of the root is outside it
            if not path.is_relative_to(root):
                raise Refused(403, f"{where}.image_path: {value!r} is outside --image-root", "forbidden")
            if not path.is_file():
                raise Refused(400, f"{where}.image_path: no file {value!r} under --image-root", "bad_request")
            data = path.read_bytes()
        elif not isinstance(value, str) or not value:
            raise Refused(400, f"{where}.image: missing (base64; or image_path, a path under --image-root)",
                          "bad_request")
        else:
            try:
                data = base64.b64decode(value.split(",", 1)[1] if value.startswith("data:") else value,
                                        validate=True)
            except (binascii.Error, ValueError, IndexError):
                raise Refused(400, f"{where}.image: not base64", "bad_request") from None
        try:
            return decode_image_bytes(data, MAX_DECODE_PIXELS)
        except ValueError as exc:
            raise Refused(400, f"{where}.image: image too large ({exc})", "bad_request") from None
        except Exception as exc:  # PIL raises many types for bytes that are not an image
            raise Refused(400, f"{where}.image: not an image ({type(exc).__name__})", "bad_request") from None

    def fits(question: str, a: str, b: str, where: str) -> None:
        if context is None:
            return
        tokens = judge.adapter.prompt_tokens(prompt_texts.judge_prompt(question, a, b, style))
        if tokens + judge.judge_tokens > context:
            raise Refused(400, f"{where}: the question and responses take {tokens} tokens; with "
                          f"{judge.judge_tokens} for the judgment that is over the model's context of {context}",
                          "bad_request")

    async def judged(images, questions, a, b, both_orders: bool):
        work = _Work(images, questions, a, b, both_orders, asyncio.get_running_loop().create_future())
        state["batcher"].submit(work)
        return await work.done

    async def answer(endpoint: str, request: Request, handler) -> Response:
        t0 = time.perf_counter()
        try:
            authorize(request)
            result = await handler(await body_of(request))
            status, response = 200, JSONResponse(result)
        except Refused as refused:
            metrics.errors.labels(refused.kind).inc()
            status = refused.status
            response = JSONResponse({"error": refused.reason}, status_code=status, headers=refused.headers)
        except Exception as exc:  # an engine failure: this request fails, the server goes on
            metrics.errors.labels("internal").inc()
            status, response = 500, JSONResponse({"error": f"{type(exc).__name__}: {exc}"}, status_code=500)
        metrics.requests.labels(endpoint, str(status)).inc()
        metrics.latency.labels(endpoint).observe(time.perf_counter() - t0)
        return response

    @app.post("/v1/judge")
    async def judge_pairs(request: Request) -> Response:
        async def handle(body: dict) -> dict:
            pairs = body.get("pairs")
            if not isinstance(pairs, list) or not pairs or len(pairs) > settings.max_pairs:
                raise Refused(400, f"pairs: expected a list of 1 to {settings.max_pairs} pairs", "bad_request")
            both_orders = body.get("both_orders", True)
            if not isinstance(both_orders, bool):
                raise Refused(400, "both_orders: expected true or false", "bad_request")
            images, questions, a, b = [], [], [], []
            for i, pair in enumerate(pairs):
                where = f"pairs[{i}]"
                if not isinstance(pair, dict):
                    raise Refused(400, f"{where}: expected an object", "bad_request")
                questions.append(text(pair, "question", where))
                a.append(text(pair, "response_a", where))
                b.append(text(pair, "response_b", where))
                fits(questions[-1], a[-1], b[-1], where)
                images.append(image(pair, where))
            results = await judged(images, questions, a, b, both_orders)
            show = body.get("reasoning", False) is True
            return {"results": [dict({"id": pair.get("id", i), "p_a": j.p_a, "verdict": j.verdict,
                                      "orders_agree": j.orders_agree, "p_a_by_order": j.p_a_by_order},
                                     **({"reasonings": j.reasonings} if show else {}))
                                for i, (pair, j) in enumerate(zip(pairs, results))]}
        return await answer("judge", request, handle)

    @app.post("/v1/rank")
    async def rank(request: Request) -> Response:
        async def handle(body: dict) -> dict:
            question = text(body, "question", "body")
            answers = body.get("answers")
            if not (isinstance(answers, list) and 2 <= len(answers) <= most_candidates
                    and all(isinstance(x, str) and x.strip() for x in answers)):
                raise Refused(400, f"answers: expected a list of 2 to {most_candidates} non-empty strings (n "
                              f"candidates are n(n-1)/2 pairs, at most --max-pairs {settings.max_pairs})",
                              "bad_request")
            picture = image(body, "body")
            pairs = [(i, j) for i in range(len(answers)) for j in range(i + 1, len(answers))]
            longest = sorted(answers, key=len, reverse=True)
            fits(question, longest[0], longest[1], "answers")
            results = await judged([picture] * len(pairs), [question] * len(pairs), [answers[i] for i, _ in pairs],
                                   [answers[j] for _, j in pairs], True)
            scores = bradley_terry(len(answers), [(i, j, r.p_a) for (i, j), r in zip(pairs, results)])
            order = sorted(range(len(answers)), key=lambda i: (-scores[i], i))
            return {"order": order, "scores": scores, "best": answers[order[0]]}
        return await answer("rank", request, handle)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "queue": state["batcher"].depth() if "batcher" in state else 0}

    @app.get("/metrics")
    async def prometheus(request: Request) -> Response:
        try:
            authorize(request)
        except Refused as refused:
            metrics.errors.labels(refused.kind).inc()
            return JSONResponse({"error": refused.reason}, status_code=401, headers=refused.headers)
        metrics.queue.set(state["batcher"].depth() if "batcher" in state else 0)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app

