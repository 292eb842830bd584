"""`qkv serve` under load: N concurrent clients on 127.0.0.1, each sending one sentence per request.

For each number of clients, every client sends single sentences (LibreTranslate's POST /translate)
one after the other for --seconds; the table gives the sentences translated per second and the p50
and p99 latency, with batching across requests on (--max-wait-ms, default 10), off (0: no waiting,
though requests that queued during a search share the next) and none (one request at a time, as
LibreTranslate and OpenNMT-py's server decode), each in a server of its own. It also times one request of N sentences for each N clients: one batched search,
the yardstick for the p99 latency at N clients (no request should wait behind more than one batch).

The clients run in this process (asyncio and httpx) and take CPU from the server on a small machine:
the figures are the server's and its clients' together, as on one machine in production.

    pip install -e ".[serve]"
    python benchmarks/serve_load.py runs/demo                    # the demo model, its test sentences
    python benchmarks/serve_load.py runs/de_en --clients 1 8 32 64 --seconds 20 --plot docs/serve_load.png
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


# Batching across requests: "on" waits up to --max-wait-ms for more requests; "off" (--max-wait-ms 0)
# waits for none, though the requests that queued while a search ran still share the next one; "none"
# (--max-batch-tokens 1) decodes one request at a time, as LibreTranslate and OpenNMT-py's server do.
MODES = ("on", "off", "none")


def start_server(
    run_dir: str, max_wait_ms: float, threads: int | None, max_batch_tokens: int = 4096
) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    command = [sys.executable, "-m", "qkv", "serve", run_dir, "--port", str(port),
               "--max-wait-ms", str(max_wait_ms), "--max-batch-tokens", str(max_batch_tokens),
               "--max-queue", "1024"]  # fmt: skip
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


def plot(rows: list[dict], batch_ms: dict[int, float], path: str) -> None:
    """Throughput and latency against clients, batching on and off, with one batched search of as
    many sentences as clients beside the latency."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for label, colour in zip(MODES, ("C0", "C1", "C2"), strict=True):
        mine = [row for row in rows if row["batching"] == label]
        if not mine:
            continue
        clients = [row["clients"] for row in mine]
        left.plot(clients, [row["per_second"] for row in mine], "-o", color=colour,
                  label=f"batching {label}")  # fmt: skip
        right.plot(clients, [row["p50_ms"] for row in mine], "-o", color=colour,
                   label=f"p50, batching {label}")  # fmt: skip
        right.plot(clients, [row["p99_ms"] for row in mine], "--^", color=colour, alpha=0.6,
                   label=f"p99, batching {label}")  # fmt: skip
    sizes = sorted(batch_ms)
    right.plot(sizes, [batch_ms[n] for n in sizes], ":k", label="one search of N sentences")
    for axis in (left, right):
        axis.set_xscale("log", base=2)
        axis.set_xticks(sizes, [str(n) for n in sizes])
        axis.set_xlabel("concurrent clients (one sentence a request)")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    left.set_ylabel("sentences / s")
    right.set_ylabel("latency (ms)")
    right.set_yscale("log")
    fig.suptitle("qkv serve under load")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", metavar="RUN_DIR_OR_CHECKPOINT")
    parser.add_argument("--clients", nargs="+", type=int, default=[1, 8, 32, 64])
    parser.add_argument("--seconds", type=float, default=10.0, help="per cell (default 10)")
    parser.add_argument("--max-wait-ms", type=float, default=10.0)
    parser.add_argument("--src", help="sentences to send (default RUN_DIR/data/test.<source>)")
    parser.add_argument("--threads", type=int, help="torch threads in the server")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES),
                        help="batching across requests: on, off (--max-wait-ms 0), none (one "
                             "request at a time); default all three")  # fmt: skip
    parser.add_argument("--plot", metavar="PNG", help="draw throughput and latency against clients")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON too")
    args = parser.parse_args()

    from qkv.hardware import describe_cpu

    print(describe_cpu())
    rows, batch_ms = [], {}
    settings = {"on": (args.max_wait_ms, 4096), "off": (0.0, 4096), "none": (0.0, 1)}
    for label in args.modes:
        max_wait_ms, max_batch_tokens = settings[label]
        server, url = start_server(args.run_dir, max_wait_ms, args.threads, max_batch_tokens)
        try:
            source, target = pair(url)
            sentences = sentences_for(args.run_dir, source, args.src)
            body = {"source": source, "target": target}
            if not batch_ms:  # the yardstick: one request of N sentences, one batched search
                batch_ms = {n: one_batch_ms(url, body, sentences, n) for n in args.clients}
            for clients in args.clients:
                row = asyncio.run(load(url, body, sentences, clients, args.seconds))
                rows.append({"batching": label, **row})
        finally:
            server.terminate()
            server.wait(timeout=60)

    sizes = ", ".join(f"{n}: {ms:.0f} ms" for n, ms in batch_ms.items())
    print(f"one request of N sentences (one batched search): {sizes}")
    print(
        "| clients | batching | sentences/s | p50 (ms) | p99 (ms) | p99 / one search of N | errors |"
    )
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        n = row["clients"]
        print(f"| {n} | {row['batching']} | {row['per_second']:.1f} | {row['p50_ms']:.0f} | "
              f"{row['p99_ms']:.0f} | {row['p99_ms'] / batch_ms[n]:.2f}x | {row['errors']} |")  # fmt: skip
    on = {row["clients"]: row for row in rows if row["batching"] == "on"}
    if 1 in on:
        for clients, row in on.items():
            if clients > 1:
                print(f"batching on, {clients} clients: {row['per_second'] / on[1]['per_second']:.2f}x "
                      f"one client's throughput; p99 {row['p99_ms'] / batch_ms[clients]:.2f}x "
                      f"one search of {clients} sentences")  # fmt: skip
    if args.plot:
        plot(rows, batch_ms, args.plot)
    if args.json:
        print(json.dumps({"one_batch_ms": batch_ms, "rows": rows}))


if __name__ == "__main__":
    main()
