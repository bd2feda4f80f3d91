"""The shared pool's round trip from a request handler, against a pool local to the
worker. A standalone script:

    .venv-3.11/bin/python benchmarks/bench_offload.py [--rounds 5]

Each round starts `allcores serve apps/offload_rt.py` with one worker, once with
``--pool auto`` (offload goes to the server's shared pool, one process per CPU) and
once with ``--pool 0`` (offload makes the worker its own default pool, one process per
CPU, as outside `serve`), in turn, and asks each for 2,000 offloads of a tiny
function one by one (c=1) and 8 at a time (c=8). It prints the microseconds per call
of each, and the ratio shared/local (the issue's goal: at most 1.5 one by one).
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

APPS = Path(__file__).resolve().parent / "apps"
CLI = str(Path(sys.executable).parent / "allcores")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def ask(port: int, path: str, limit: float = 60.0) -> str:
    end = time.monotonic() + limit
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=60) as answer:
                return answer.read().decode()
        except OSError:
            if time.monotonic() > end:
                raise
            time.sleep(0.05)


def measure(shared: bool) -> dict[str, float]:
    port = free_port()
    env = {**os.environ, "ALLCORES_POOL": "auto" if shared else "0"}
    server = subprocess.Popen(
        [CLI, "serve", "offload_rt:app", "--workers", "1", "--port", str(port), "--no-access-log"],
        cwd=APPS,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        ask(port, "/rt?n=200")  # up, and every process forked
        return {f"c={c}": float(ask(port, f"/rt?n=2000&c={c}")) for c in (1, 8)}
    finally:
        server.terminate()
        server.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    runs: dict[str, dict[str, list[float]]] = {"shared": {}, "local": {}}
    for _ in range(args.rounds):
        for kind in ("shared", "local"):
            for key, value in measure(kind == "shared").items():
                runs[kind].setdefault(key, []).append(value)
    print(f"offload round trip from a handler, µs per call ({args.rounds} rounds, median)")
    for key in runs["shared"]:
        shared, local = runs["shared"][key], runs["local"][key]
        spread = f"({min(shared):.1f}-{max(shared):.1f})"
        print(
            f"  {key}: shared {statistics.median(shared):7.1f} {spread}"
            f"   local {statistics.median(local):7.1f} ({min(local):.1f}-{max(local):.1f})"
            f"   ratio {statistics.median(shared) / statistics.median(local):.2f}"
        )


if __name__ == "__main__":
    main()
