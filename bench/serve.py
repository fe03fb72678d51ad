"""`fastjudge serve` under load: the toy judge on loopback, C concurrent clients each sending R requests of P pairs,
with dynamic batching and with it off (`--max-batch-pairs 1`: each request alone), in one run: --rounds rounds,
each the two servers one after the other, and the speedup the median of the rounds' (a shared machine's speed
drifts between runs by more than a round's two servers differ in their conditions).

    python bench/serve.py                      # 32 clients x 20 requests x 4 pairs, 5 rounds
    python bench/serve.py --clients 8 --requests 5 --rounds 1

Starts each server on a free loopback port, waits for /health, sends a bounded number of requests, reads
/metrics, and stops the server (SIGTERM). Prints a table, then one JSON line; --out also writes it to a file.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _env import report  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load(flags: list[str], bodies: list[bytes], clients: int) -> dict:
    """Start a server with `flags`, send `bodies` from `clients` threads, stop it; the figures."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "fastjudge", "serve", "--port", str(port), *flags],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(url + "/health", timeout=1)
                break
            except OSError:
                time.sleep(0.2)

        def send(body: bytes) -> tuple[int, float]:
            t0 = time.perf_counter()
            request = urllib.request.Request(url + "/v1/judge", data=body, headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=600) as response:
                    response.read()
                    return response.status, time.perf_counter() - t0
            except urllib.error.HTTPError as error:
                return error.code, time.perf_counter() - t0

        t0 = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(clients) as pool:
            answers = list(pool.map(send, bodies))
        seconds = time.perf_counter() - t0
        metrics = urllib.request.urlopen(url + "/metrics").read().decode()
    finally:
        server.send_signal(signal.SIGTERM)
        code = server.wait(timeout=120)
    batches = next(float(line.split()[-1]) for line in metrics.splitlines()
                   if line.startswith("fastjudge_batch_pairs_count"))
    latencies = sorted(t for _, t in answers)
    return {"requests": len(answers), "errors": sum(status != 200 for status, _ in answers),
            "seconds": round(seconds, 2), "requests_per_s": round(len(answers) / seconds, 2),
            "engine_calls": int(batches), "latency_p50_s": round(latencies[len(latencies) // 2], 3),
            "latency_p95_s": round(latencies[int(len(latencies) * 0.95)], 3), "server_exit": code}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=20, help="requests per client")
    parser.add_argument("--pairs", type=int, default=4, help="pairs per request")
    parser.add_argument("--max-wait-ms", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=5, help="rounds of the two servers; the median speedup")
    parser.add_argument("--device", default="cpu", help="where the servers' judge runs (cuda: bench/gpu.sh)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    from fastjudge.data.images import encode_image
    from fastjudge.toy import files as toy_files
    with tempfile.TemporaryDirectory() as tmp:
        bench = toy_files.write_toy_benchmark(Path(tmp) / "benchmark", per_category=8)
        pairs_file, _ = toy_files.write_judge_examples(bench, Path(tmp) / "judge")
        pairs = [json.loads(line) for line in pairs_file.read_text().splitlines()]
        from PIL import Image
        encoded = {p["image"]: encode_image(Image.open(pairs_file.parent / p["image"])) for p in pairs}
    bodies = []
    for i in range(args.clients * args.requests):
        chosen = [pairs[(i * args.pairs + j) % len(pairs)] for j in range(args.pairs)]
        bodies.append(json.dumps({"pairs": [{"id": p["id"], "image": encoded[p["image"]], "question": p["question"],
                                             "response_a": p["response_a"], "response_b": p["response_b"]}
                                            for p in chosen]}).encode())
    common = ["--max-wait-ms", str(args.max_wait_ms), "--max-queue", str(args.clients * args.requests),
              "--device", args.device]
    rounds = []
    print(f"{'round':>5} {'server':>22} {'requests':>9} {'errors':>7} {'req/s':>8} {'engine calls':>13} {'p50 s':>7} "
          f"{'p95 s':>7}", flush=True)
    for number in range(1, args.rounds + 1):
        batched = load(common + ["--max-batch-pairs", "64"], bodies, args.clients)
        alone = load(common + ["--max-batch-pairs", "1"], bodies, args.clients)
        rounds.append({"batched": batched, "one_request_a_call": alone,
                       "speedup": round(batched["requests_per_s"] / alone["requests_per_s"], 2)})
        for name, row in (("batched (64 pairs)", batched), ("--max-batch-pairs 1", alone)):
            print(f"{number:>5} {name:>22} {row['requests']:>9} {row['errors']:>7} {row['requests_per_s']:>8} "
                  f"{row['engine_calls']:>13} {row['latency_p50_s']:>7} {row['latency_p95_s']:>7}", flush=True)
        print(f"round {number}: speedup {rounds[-1]['speedup']}x", flush=True)
    speedups = sorted(r["speedup"] for r in rounds)
    result = {"bench": "serve", "device": args.device, "clients": args.clients, "requests_per_client": args.requests, "pairs": args.pairs,
              "rounds": rounds, "speedups": [r["speedup"] for r in rounds],
              "speedup": speedups[len(speedups) // 2],
              "errors": sum(r[server]["errors"] for r in rounds for server in ("batched", "one_request_a_call"))}
    print(f"speedup, the median of {len(rounds)} rounds: {result['speedup']}x (each: {result['speedups']}); "
          f"errors {result['errors']}")
    report(result, args.out)


if __name__ == "__main__":
    main()
