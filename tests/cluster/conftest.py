"""Drive tests/cluster/cluster_app.py: start it, read its event lines, talk HTTP to it."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import queue
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Processes, free_port

APP = Path(__file__).with_name("cluster_app.py")


def http_get(port: int, path: str = "/", timeout: float = 10.0) -> str:
    """GET over a fresh connection; returns the body."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        assert response.status == 200, response.status
        return response.read().decode()
    finally:
        conn.close()


class ClusterRun:
    def __init__(self, proc: subprocess.Popen[bytes], port: int, processes: Processes) -> None:
        self.proc = proc
        self.port = port
        self.processes = processes
        self.events: list[dict[str, Any]] = []
        self.stderr: list[str] = []
        self._new: queue.Queue[None] = queue.Queue()
        threading.Thread(target=self._read_stdout, daemon=True).start()
        threading.Thread(target=self._read_stderr, daemon=True).start()

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                self.events.append(json.loads(line))
            except ValueError:
                continue
            self._new.put(None)

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr.append(line.decode(errors="replace"))

    def find(self, event: str, **match: Any) -> list[dict[str, Any]]:
        return [
            e
            for e in list(self.events)
            if e.get("event") == event and all(e.get(k) == v for k, v in match.items())
        ]

    def wait_for(
        self, event: str, count: int = 1, timeout: float = 30.0, **match: Any
    ) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while True:
            found = self.find(event, **match)
            if len(found) >= count:
                return found
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(
                    f"no {count}x {event} {match} within {timeout} s; events: {self.events}; "
                    f"stderr: {''.join(self.stderr)[-2000:]}"
                )
            with contextlib.suppress(queue.Empty):
                self._new.get(timeout=min(left, 0.2))

    def wait_for_stderr(self, text: str, timeout: float = 30.0) -> str:
        """Everything on stderr so far, once *text* is part of it."""
        deadline = time.monotonic() + timeout
        while text not in (seen := "".join(self.stderr)):
            if time.monotonic() > deadline:
                raise AssertionError(f"{text!r} not on stderr within {timeout} s: {seen[-2000:]}")
            time.sleep(0.05)
        return seen

    def worker_pids(self) -> set[int]:
        self.processes.remember_children(self.proc)
        alive = {e["pid"] for e in self.find("listening")} - {e["pid"] for e in self.find("exit")}
        return alive

    def wait_exit(self, timeout: float = 20.0) -> int:
        return self.proc.wait(timeout)


@pytest.fixture
def start_cluster(processes: Processes) -> Iterator[Callable[..., ClusterRun]]:
    def start(workers: int = 2, wait_listening: bool = True, **env: str) -> ClusterRun:
        port = free_port()
        child_env = dict(os.environ)
        child_env.update({"APP_PORT": str(port), "APP_WORKERS": str(workers)})
        child_env.update(env)
        proc = processes.python(
            str(APP),
            env=child_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        run = ClusterRun(proc, port, processes)
        if wait_listening:
            run.wait_for("listening", count=workers)
            processes.remember_children(proc)
        return run

    yield start
