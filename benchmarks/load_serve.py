"""Load test of ``attnlab serve``: many clients at once, mixing the API's calls.

Starts the server as a user would (``attnlab serve --port 0``, a subprocess bound to
127.0.0.1), then ``--clients`` threads each loop for ``--seconds``, picking at random:
``GET /api/models``, ``POST /api/attend`` (a short or a long text, any layer and head,
with or without thumbnails; or a new text every time, shuffled words, which the server's
cache cannot answer), ``POST /api/compare``, and ``POST /api/explain`` (rollout)
polled until done. Every answer must be 200/202 (or the job ``done``); anything else is
an error. The server's memory (VmRSS) is sampled every second; the growth after warm-up
is the largest sample of the last third minus the first sample after ``--warmup``.

Prints JSON lines: one per call kind (count, p50/p95/max ms), then a summary with the
error count, the requests per second and the memory figures. The anchor is the server's
own ``GET /api/health`` latency under the same load (what a call costs with no model work).

python benchmarks/load_serve.py                      # 20 clients, 60 s
python benchmarks/load_serve.py --smoke              # 3 clients, 6 s, for CI
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from attnlab.cli._args import float_in, int_in, parse_smoke, script_parser

SHORT = [
    "The cat sat on the mat because it was warm.",
    "Attention lets a model look back at every word it has read.",
    "She gave him the book that he had asked for last week.",
    "Rain fell all night, and by morning the river had risen.",
]
LONG = " ".join(
    "Transformers compute attention between every pair of tokens, and the explorer shows "
    "which of them each head looks at, layer by layer, for texts of any length."
    for _ in range(15)
)  # 482 tokens, 2,390 characters


def start_server(extra: list[str]) -> tuple[subprocess.Popen[str], int]:
    """``attnlab serve --port 0``; its process and the port it printed."""
    cmd = [sys.executable, "-m", "attnlab.cli", "serve", "--port", "0", *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()  # "attnlab serve: http://127.0.0.1:PORT/ ..."
    if "http://" not in line:
        proc.kill()
        raise SystemExit(f"server did not start: {line}{proc.stderr.read() if proc.stderr else ''}")
    port = int(line.split("http://", 1)[1].split("/", 1)[0].rsplit(":", 1)[1])
    return proc, port


class Client:
    """One keep-alive HTTP connection to the server."""

    def __init__(self, port: int) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
        self.conn.connect()
        self.conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # no Nagle delay

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body)
        headers = {} if body is None else {"content-type": "application/json"}
        self.conn.request(method, path, body=data, headers=headers)
        r = self.conn.getresponse()
        return r.status, json.loads(r.read() or b"null")


def one_call(client: Client, rng: random.Random) -> tuple[str, bool]:
    """One random call (a job is polled to its end); (kind, ok)."""
    kind = rng.choices(
        ["models", "attend", "attend_long", "attend_new", "compare", "explain", "health"],
        weights=[1, 4, 2, 2, 2, 1, 1],
    )[0]
    if kind in ("models", "health"):
        status, _ = client.call("GET", f"/api/{kind}")
        return kind, status == 200
    if kind.startswith("attend"):
        text = LONG if kind == "attend_long" else rng.choice(SHORT)
        if kind == "attend_new":
            words = rng.choice(SHORT).split()
            text = " ".join(rng.sample(words, len(words)))
        body = {
            "text": text,
            "layer": rng.randrange(6),
            "head": rng.randrange(12),
            "thumbs": rng.random() < 0.3,
            "top_k": 16,
        }
        status, _ = client.call("POST", "/api/attend", body)
        return kind, status == 200
    if kind == "compare":
        a, b = rng.sample(SHORT, 2)
        body = {
            "a": {"text": a},
            "b": {"text": b},
            "layer": rng.randrange(6),
            "head": rng.randrange(12),
        }
        status, _ = client.call("POST", "/api/compare", body)
        return kind, status == 200
    status, job = client.call(
        "POST", "/api/explain", {"text": rng.choice(SHORT), "method": "rollout"}
    )
    if status != 202:
        return kind, False
    while True:
        status, state = client.call("GET", f"/api/jobs/{job['job']}")
        if status != 200 or state["state"] not in ("queued", "running"):
            return kind, status == 200 and state["state"] == "done"
        time.sleep(0.05)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run(args: argparse.Namespace) -> dict[str, Any]:
    proc, port = start_server(args.serve_args)
    try:
        Client(port).call("POST", "/api/attend", {"text": SHORT[0]})  # load the model
        times: dict[str, list[float]] = defaultdict(list)
        errors: list[str] = []
        memory: list[tuple[float, float]] = []
        t_end = time.monotonic() + args.seconds
        t0 = time.monotonic()

        def client_loop(seed: int) -> None:
            rng, client = random.Random(seed), Client(port)
            while time.monotonic() < t_end:
                start = time.perf_counter()
                try:
                    kind, ok = one_call(client, rng)
                    error = None if ok else kind
                except Exception as e:  # a dropped connection is an error too, counted once
                    kind, error = "exception", f"{type(e).__name__}: {e}"
                    client = Client(port)
                times[kind].append(1000 * (time.perf_counter() - start))
                if error is not None:
                    errors.append(error)

        threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(args.clients)]
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            memory.append((time.monotonic() - t0, rss_mb(proc.pid)))
            time.sleep(1.0)
        for t in threads:
            t.join()
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    return summarize(args, times, errors, memory)


def _p95(ms: list[float]) -> float:
    """The 95th percentile of ``ms``, within them ("inclusive": the default method
    extrapolates past the largest, a p95 of 170.7 ms beside a max of 148.8 ms of 16 calls)."""
    return statistics.quantiles(ms, n=20, method="inclusive")[18]


def summarize(
    args: argparse.Namespace,
    times: dict[str, list[float]],
    errors: list[str],
    memory: list[tuple[float, float]],
) -> dict[str, Any]:
    cap = torch.backends.cpu.get_cpu_capability()
    for kind, ms in sorted(times.items()):
        p95 = _p95(ms) if len(ms) > 1 else ms[0]
        print(
            json.dumps(
                {
                    "call": kind,
                    "count": len(ms),
                    "p50_ms": round(statistics.median(ms), 1),
                    "p95_ms": round(p95, 1),
                    "max_ms": round(max(ms), 1),
                    "cpu": cap,
                }
            )
        )
    after = [m for t, m in memory if t >= args.warmup]
    tail = after[len(after) * 2 // 3 :] or after
    all_ms = [x for ms in times.values() for x in ms]
    summary = {
        "summary": "load",
        "clients": args.clients,
        "seconds": args.seconds,
        "cpu": cap,
        "threads": torch.get_num_threads(),
        "requests": len(all_ms),
        "errors": len(errors),
        "first_errors": errors[:3],
        "rps": round(len(all_ms) / args.seconds, 1),
        "p50_ms": round(statistics.median(all_ms), 1) if all_ms else None,
        "p95_ms": round(_p95(all_ms), 1) if len(all_ms) > 1 else None,
        "rss_after_warmup_mb": round(after[0], 1) if after else None,
        "rss_end_mb": round(memory[-1][1], 1) if memory else None,
        "rss_growth_mb": round(max(tail) - after[0], 1) if after else None,
    }
    print(json.dumps(summary))
    return summary


def main(argv: list[str] | None = None) -> int:
    p = script_parser(__doc__)
    p.add_argument("--clients", type=int_in(1), default=20)
    p.add_argument("--seconds", type=float_in(0.0, open_low=True), default=60.0)
    p.add_argument(
        "--warmup", type=float_in(0.0), default=15.0, help="seconds before memory counts"
    )
    p.add_argument("--smoke", action="store_true", help="3 clients, 6 s (CI)")
    p.add_argument("serve_args", nargs="*", help="passed to attnlab serve (after --)")
    args = parse_smoke(p, argv, {"clients": 3, "seconds": 6.0, "warmup": 2.0})
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    summary = run(args)
    return 1 if summary["errors"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
