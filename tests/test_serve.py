"""`fastjudge serve`, started on a free loopback port and spoken to over real HTTP: the same p_a as `fastjudge
judge` on the same pairs, requests joined into batches, every bad request answered with its status and a one-line
reason, a full queue answered 429, and a SIGTERM during a request lets it finish before the server exits 0."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from fastjudge import cli, data
from fastjudge.data.images import encode_image
from fastjudge.judge import Judge
from fastjudge.serve import Batcher, Metrics, ServeSettings, _Work
from fastjudge.toy import files as toy_files

KEY = "test-key-123"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, *flags: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen([sys.executable, "-m", "fastjudge", "serve", "--port", str(self.port),
                                         "--judge-tokens", "24", *flags], stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                urllib.request.urlopen(self.url + "/health", timeout=1)
                return
            except OSError:
                assert self.process.poll() is None, self.process.stderr.read()[-3000:]
                time.sleep(0.2)
        raise AssertionError("the server did not start")

    def post(self, path: str, body, key: str | None = KEY, raw: bytes | None = None) -> tuple[int, dict, object]:
        headers = {"Content-Type": "application/json"}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        request = urllib.request.Request(self.url + path, data=raw if raw is not None else json.dumps(body).encode(),
                                         headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=300) as response:
                return response.status, json.loads(response.read()), response.headers
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read()), error.headers

    def declare(self, path: str, length: int) -> tuple[int, dict]:
        """A request whose headers announce a body of `length` bytes, none of which is sent: the answer."""
        import http.client
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        connection.putrequest("POST", path)
        for name, value in (("Content-Type", "application/json"), ("Content-Length", str(length)),
                            ("Authorization", f"Bearer {KEY}")):
            connection.putheader(name, value)
        connection.endheaders()
        response = connection.getresponse()
        return response.status, json.loads(response.read())

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=120)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    folder = tmp_path_factory.mktemp("serve")
    bench = toy_files.write_toy_benchmark(folder / "benchmark", per_category=2)
    pairs_file, candidates = toy_files.write_judge_examples(bench, folder / "judge")
    pairs = [dict(p, image=str((pairs_file.parent / p["image"]).resolve()))
             for p in data.read_jsonl(pairs_file)]
    return folder, pairs_file, pairs


@pytest.fixture(scope="module")
def server(world):
    folder, _, _ = world
    running = Server("--api-key", KEY, "--image-root", str(folder), "--max-wait-ms", "200", "--max-body-mb", "2")
    yield running
    running.stop()


def as_request(pair: dict) -> dict:
    return {"id": pair["id"], "image": encode_image(Image.open(pair["image"])), "question": pair["question"],
            "response_a": pair["response_a"], "response_b": pair["response_b"]}


def test_p_a_equals_fastjudge_judge_and_concurrent_requests_share_batches(server, world, tmp_path, capsys):
    _, pairs_file, pairs = world
    assert cli.main(["judge", "--pairs", str(pairs_file), "--out", str(tmp_path / "offline"),
                     "--judge-tokens", "24"]) == 0
    capsys.readouterr()
    offline = {row["id"]: row for row in data.read_jsonl(tmp_path / "offline" / "judgments.jsonl")}
    chunks = [pairs[i::3] for i in range(3)]
    with concurrent.futures.ThreadPoolExecutor(3) as pool:  # three callers at once: one batch or more
        answers = list(pool.map(lambda chunk: server.post("/v1/judge", {"pairs": [as_request(p) for p in chunk],
                                                                        "reasoning": True}), chunks))
    for chunk, (status, body, _) in zip(chunks, answers):
        assert status == 200, body
        assert [r["id"] for r in body["results"]] == [p["id"] for p in chunk]  # each caller's own order
        for result in body["results"]:
            expected = offline[result["id"]]
            assert result["p_a"] == pytest.approx(expected["p_a"], abs=1e-5)
            assert result["verdict"] == expected["verdict"] and result["reasonings"] == expected["reasonings"]
    metrics = urllib.request.urlopen(urllib.request.Request(server.url + "/metrics",
                                                            headers={"Authorization": f"Bearer {KEY}"})).read()
    batches = [line for line in metrics.decode().splitlines() if line.startswith("fastjudge_batch_pairs_count")]
    assert batches and float(batches[0].split()[-1]) < 3  # the three requests did not each run alone


def test_rank_and_a_path_under_the_image_root(server, world):
    folder, pairs_file, pairs = world
    relative = str(Path(pairs[0]["image"]).relative_to(folder))
    status, body, _ = server.post("/v1/rank", {"image_path": relative, "question": pairs[0]["question"],
                                               "answers": [pairs[0]["response_a"], pairs[0]["response_b"], "no ."]})
    assert status == 200, body
    local = Judge.load(None, judge_tokens=24).rank(Image.open(pairs[0]["image"]).convert("RGB"), pairs[0]["question"],
                                                   [pairs[0]["response_a"], pairs[0]["response_b"], "no ."])
    assert body["order"] == local[0] and body["scores"] == pytest.approx(local[1], abs=1e-5)


def test_every_bad_request_gets_its_status_and_a_one_line_reason(server, world, tmp_path):
    folder, _, pairs = world
    good = as_request(pairs[0])
    outside = tmp_path / "outside.png"
    Image.new("RGB", (8, 8)).save(outside)
    (folder / "link.png").symlink_to(outside)
    huge = Image.new("RGB", (7000, 7000))  # 49 M pixels: over the decode budget (a small PNG, one colour)
    cases = [
        ("malformed JSON", None, b"{not json", KEY, 400, "malformed JSON"),
        ("no pairs", {"pairs": []}, None, KEY, 400, "pairs: expected a list"),
        ("missing field", {"pairs": [dict(good, question=None)]}, None, KEY, 400, "pairs[0].question"),
        ("not base64", {"pairs": [dict(good, image="@@@not base64@@@")]}, None, KEY, 400, "pairs[0].image: not base64"),
        ("not an image", {"pairs": [dict(good, image="aGVsbG8=")]}, None, KEY, 400, "pairs[0].image: not an image"),
        ("too many pixels", {"pairs": [dict(good, image=encode_image(huge))]}, None, KEY, 400, "image too large"),
        ("over the context", {"pairs": [dict(good, response_a="red " * 600)]}, None, KEY, 400, "over the model's"),
        ("dot-dot path", {"pairs": [dict(good, image_path="../outside.png")]}, None, KEY, 403, "outside --image-root"),
        ("absolute path", {"pairs": [dict(good, image_path=str(outside))]}, None, KEY, 403, "outside --image-root"),
        ("symlink out", {"pairs": [dict(good, image_path="link.png")]}, None, KEY, 403, "outside --image-root"),
        ("no token", {"pairs": [good]}, None, None, 401, "bearer token"),
        ("wrong token", {"pairs": [good]}, None, "wrong-key", 401, "bearer token"),
    ]
    for name, body, raw, key, status, reason in cases:
        got, answer, headers = server.post("/v1/judge", body, key=key, raw=raw)
        assert got == status and reason in answer["error"] and "\n" not in answer["error"], (name, got, answer)
    # /v1/rank counts pairs: 24 candidates are 276 pairs, over --max-pairs 256 (23 are 253: the most it takes)
    rank = {"image": good["image"], "question": good["question"], "answers": [f"answer {i}" for i in range(24)]}
    got, answer, _ = server.post("/v1/rank", rank)
    assert got == 400 and "2 to 23 non-empty strings" in answer["error"], answer
    status, answer = server.declare("/v1/judge", 3 << 20)  # over --max-body-mb 2, refused before it is read
    assert status == 413 and "max-body-mb" in answer["error"]
    assert server.post("/v1/judge", {"pairs": [good]})[0] == 200  # the server goes on
    assert server.process.poll() is None


def test_a_full_queue_is_answered_429_with_retry_after(world):
    _, _, pairs = world
    running = Server("--max-queue", "1", "--max-wait-ms", "0", "--batch-rows", "8")
    try:
        big = {"pairs": [as_request(p) for p in pairs] * 4}
        small = {"pairs": [as_request(pairs[0])]}
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            first = pool.submit(running.post, "/v1/judge", big, None)
            time.sleep(1.0)  # the engine busy with the first; the next waits in the queue, the one after is refused
            rest = [pool.submit(running.post, "/v1/judge", small, None) for _ in range(3)]
            statuses = [f.result()[0] for f in rest]
            assert first.result()[0] == 200
        refused = [f.result() for f in rest if f.result()[0] == 429]
        assert refused and all(r[2].get("Retry-After") == "1" and "queue is full" in r[1]["error"] for r in refused)
        assert 200 in statuses
    finally:
        assert running.stop() == 0


def test_sigterm_lets_the_request_in_flight_finish_then_exits_0(world):
    _, _, pairs = world
    running = Server("--max-wait-ms", "0")
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        answer = pool.submit(running.post, "/v1/judge", {"pairs": [as_request(p) for p in pairs] * 4}, None)
        time.sleep(1.0)
        running.process.send_signal(signal.SIGTERM)
        status, body, _ = answer.result()
    assert status == 200 and len(body["results"]) == 4 * len(pairs)
    assert running.process.wait(timeout=120) == 0


def test_remote_judge_matches_the_local_one(server, world):
    _, _, pairs = world
    remote = Judge.remote(server.url, api_key=KEY)
    images = [Image.open(p["image"]).convert("RGB") for p in pairs[:3]]
    args = (images, [p["question"] for p in pairs[:3]], [p["response_a"] for p in pairs[:3]],
            [p["response_b"] for p in pairs[:3]])
    local = Judge.load(None, judge_tokens=24).compare_many(*args)
    assert [j.p_a for j in remote.compare_many(*args)] == pytest.approx([j.p_a for j in local], abs=1e-5)
    with pytest.raises(ValueError, match="401"):
        Judge.remote(server.url).compare(images[0], "q ?", "a .", "b .")


def test_a_batch_takes_every_request_already_queued_even_with_no_window_left():
    """Requests queued while the engine was busy join the next call at once, in their order, up to
    --max-batch-pairs; one that does not fit, or asks for the other orders setting, waits for the next call."""

    async def batches() -> list[list[tuple[str, bool]]]:
        batcher = Batcher(None, ServeSettings(max_wait_ms=0, max_batch_pairs=6), Metrics())
        loop = asyncio.get_running_loop()
        for name, size, both in (("a", 1, True), ("b", 2, True), ("c", 1, False), ("d", 1, True), ("e", 3, True),
                                 ("f", 1, True), ("g", 2, False)):
            batcher.submit(_Work([None] * size, [name] * size, [""] * size, [""] * size, both, loop.create_future()))
        taken = []
        while batcher.depth():
            batch, size = await batcher.next_batch()
            assert size == sum(w.size for w in batch) <= 6
            taken.append([(w.questions[0], w.both_orders) for w in batch])
        batcher.engine.shutdown()
        return taken

    assert asyncio.run(batches()) == [[("a", True), ("b", True), ("d", True)],  # e (3 pairs) would make 7
                                      [("c", False), ("g", False)],
                                      [("e", True), ("f", True)]]
