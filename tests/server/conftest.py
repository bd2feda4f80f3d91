"""Fixtures for `allcores serve` end to end: a real server on a free port, real
clients, and every process stopped by its pid, even when a test fails."""

from __future__ import annotations

import http.client
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import Processes, free_port

APPS = Path(__file__).resolve().parent / "apps"
ALLCORES = str(Path(sys.executable).parent / "allcores")


def get(port: int, path: str = "/", timeout: float = 10.0) -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read().decode(errors="replace")
    finally:
        conn.close()


class Server:
    """One `allcores serve` (or Python program) run, with its output collected."""

    def __init__(self, proc: subprocess.Popen[bytes], port: int, processes: Processes) -> None:
        self.proc = proc
        self.port = port
        self.processes = processes
        self.stderr: list[str] = []
        self.stdout: list[str] = []
        for stream, lines in ((proc.stderr, self.stderr), (proc.stdout, self.stdout)):
            threading.Thread(target=self._read, args=(stream, lines), daemon=True).start()

    @staticmethod
    def _read(stream: object, lines: list[str]) -> None:
        for line in stream:  # type: ignore[attr-defined]
            lines.append(line.decode(errors="replace"))

    @property
    def output(self) -> str:
        return "".join(self.stderr)

    def wait_for_output(self, text: str, count: int = 1, timeout: float = 30.0) -> str:
        deadline = time.monotonic() + timeout
        while (seen := self.output).count(text) < count:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"{count}x {text!r} not on stderr: {seen[-3000:]}")
            time.sleep(0.05)
        return seen

    def wait_ready(self, workers: int, timeout: float = 30.0) -> set[int]:
        """Until *workers* different pids have answered ``/`` (the first word)."""
        pids: set[int] = set()
        deadline = time.monotonic() + timeout
        while len(pids) < workers:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"{workers} workers not serving; stderr: {self.output}")
            try:
                status, body = get(self.port, timeout=2.0)
            except OSError:
                time.sleep(0.05)
                continue
            if status == 200:
                pids.add(int(body.split()[0]))
        self.processes.remember_children(self.proc)
        return pids

    def wait_exit(self, timeout: float = 30.0) -> int:
        return self.proc.wait(timeout)


@pytest.fixture
def serve(processes: Processes) -> Iterator[Callable[..., Server]]:
    def start(
        *args: str, env: dict[str, str] | None = None, cwd: Path = APPS, program: bool = False
    ) -> Server:
        """``allcores serve ARGS --port P``, or with *program* ``python ARGS`` (the
        port in APP_PORT)."""
        port = free_port()
        child_env = {**os.environ, "APP_PORT": str(port), **(env or {})}
        command = (
            [sys.executable, *args] if program else [ALLCORES, "serve", *args, "--port", str(port)]
        )
        proc = processes.start(
            command,
            cwd=cwd,
            env=child_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        return Server(proc, port, processes)

    yield start
