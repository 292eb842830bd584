"""`qkv serve` under load: N concurrent clients on 127.0.0.1, each sending one sentence per request.

For each number of clients, every client sends single sentences (LibreTranslate's POST /translate)
one after the other for --seconds; the table gives the sentences translated per second and the p50
and p99 latency, with batching across requests on (--max-wait-ms, default 10) and off (0), each in
a server of its own. It also times one request of as many sentences as the most clients: one batched
search, the yardstick for the p99 latency (no request should wait behind more than one batch).

The clients run in this process (asyncio and httpx) and take CPU from the server on a small machine:
the figures are the server's and its clients' together, as on one machine in production.

    pip install -e ".[serve]"
    python benchmarks/serve_load.py runs/demo                    # the demo model, its test sentences
    python benchmarks/serve_load.py runs/de_en --clients 1 8 32 64 --seconds 20
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(
    run_dir: str, max_wait_ms: float, threads: int | None
) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    command = [sys.executable, "-m", "qkv", "serve", run_dir, "--port", str(port),
               "--max-wait-ms", str(max_wait_ms), "--max-queue", "1024"]  # fmt: skip
    server = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return server, url
        except httpx.TransportError:
            time.sleep(0.2)
    server.kill()
    raise SystemExit(f"the server did not start: {server.stderr.read().decode()[-2000:]}")


def pair(url: str) -> tuple[str, str]:
    model = httpx.get(f"{url}/health").json()["models"][0]
    return model["source"], model["target"]


def sentences_for(run_dir: str, source: str, given: str | None) -> list[str]:
    """--src, else the run's own test sentences (RUN_DIR/data/test.<source>)."""
    from qkv.text import read_lines

    path = Path(given) if given else Path(run_dir) / "data" / f"test.{source}"
    lines = [line for line in read_lines(path) if line.strip()]
    if not lines:
        raise SystemExit(f"{path}: no sentences")
    return lines


async def load(url: str, body: dict, sentences: list[str], clients: int, seconds: float) -> dict:
    latencies: list[float] = []
    errors = 0
    stop = time.perf_counter() + seconds

    async def client(number: int, http: httpx.AsyncClient) -> None:
        nonlocal errors
        i = number
        while time.perf_counter() < stop:
            started = time.perf_counter()
            try:
                answer = await http.post(
                    "/translate", json={**body, "q": sentences[i % len(sentences)]}
                )
                ok = answer.status_code == 200
            except httpx.HTTPError:
                ok = False
            if ok:
                latencies.append(time.perf_counter() - started)
            else:
                errors += 1
            i += clients

    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http:
        started = time.perf_counter()
        await asyncio.gather(*(client(n, http) for n in range(clients)))
        elapsed = time.perf_counter() - started
    latencies.sort()

    def percentile(p: float) -> float:
        return latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1e3 if latencies else 0

    return {
        "clients": clients,
        "per_second": len(latencies) / elapsed,
        "p50_ms": percentile(0.50),
        "p99_ms": percentile(0.99),
        "errors": errors,
    }


def one_batch_ms(url: str, body: dict, sentences: list[str], size: int, repeats: int = 5) -> float:
    batch = [sentences[i % len(sentences)] for i in range(size)]
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        httpx.post(f"{url}/translate", json={**body, "q": batch}, timeout=300).raise_for_status()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", metavar="RUN_DIR_OR_CHECKPOINT")
    parser.add_argument("--clients", nargs="+", type=int, default=[1, 8, 32, 64])
    parser.add_argument("--seconds", type=float, default=10.0, help="per cell (default 10)")
    parser.add_argument("--max-wait-ms", type=float, default=10.0)
    parser.add_argument("--src", help="sentences to send (default RUN_DIR/data/test.<source>)")
    parser.add_argument("--threads", type=int, help="torch threads in the server")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON too")
    args = parser.parse_args()

    from qkv.hardware import describe_cpu

    print(describe_cpu())
    rows = []
    for label, wait in (("on", args.max_wait_ms), ("off", 0.0)):
        server, url = start_server(args.run_dir, wait, args.threads)
        try:
            source, target = pair(url)
            sentences = sentences_for(args.run_dir, source, args.src)
            body = {"source": source, "target": target}
            if label == "on":
                batch_ms = one_batch_ms(url, body, sentences, max(args.clients))
            for clients in args.clients:
                row = asyncio.run(load(url, body, sentences, clients, args.seconds))
                rows.append({"batching": label, **row})
        finally:
            server.terminate()
            server.wait(timeout=60)

    print(f"one request of {max(args.clients)} sentences (one batched search): {batch_ms:.0f} ms")
    print("| clients | batching | sentences/s | p50 (ms) | p99 (ms) | errors |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['clients']} | {row['batching']} | {row['per_second']:.1f} | "
              f"{row['p50_ms']:.0f} | {row['p99_ms']:.0f} | {row['errors']} |")  # fmt: skip
    on = {row["clients"]: row for row in rows if row["batching"] == "on"}
    if 1 in on:
        for clients, row in on.items():
            if clients > 1:
                print(f"batching on, {clients} clients: {row['per_second'] / on[1]['per_second']:.2f}x "
                      f"one client's throughput; p99 {row['p99_ms'] / batch_ms:.2f}x one batch")  # fmt: skip
    if args.json:
        print(json.dumps({"one_batch_ms": batch_ms, "rows": rows}))


if __name__ == "__main__":
    main()
