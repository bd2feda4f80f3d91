"""Start a server under test, watch its process tree, and stop exactly what we started.

Every server is our direct child. Its descendants (workers) are found through psutil
and remembered, so that stopping it can confirm each of them is gone and kill, by PID,
any that outlived a graceful stop. Nothing is ever stopped by name.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psutil

# A server that has not answered in 30 s is broken, not slow: uvicorn --workers 2 answers
# in about 1 s here, and allcores' primary must fork its workers first.
READY_TIMEOUT_S = 30.0
# SIGTERM is a graceful stop; 10 s is far above what a hello-world server needs to drain.
STOP_TIMEOUT_S = 10.0
# How often readiness and process counts are polled while waiting.
POLL_S = 0.05


def free_port() -> int:
    """A port on 127.0.0.1 that nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Server:
    name: str
    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path
    # Every descendant ever seen, kept as psutil objects: they refuse to signal a PID
    # that has since been reused by an unrelated process.
    known: dict[int, psutil.Process] = field(default_factory=dict)

    def tree(self) -> list[psutil.Process]:
        """The server process and all its live descendants."""
        try:
            top = psutil.Process(self.proc.pid)
            members = [top, *top.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []
        for member in members:
            self.known.setdefault(member.pid, member)
        return members

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


def start_server(
    name: str,
    argv: Sequence[str],
    env: dict[str, str],
    port: int,
    log_path: Path,
    cwd: Path,
    expected_workers: int,
    ready_path: str = "/",
) -> Server:
    """Start ``argv`` and wait until it answers HTTP and has its workers.

    Raises RuntimeError (after stopping it) when it does not come up in time.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = log_path.open("wb")
    proc = subprocess.Popen(
        list(argv), env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
    )
    log.close()
    server = Server(name=name, proc=proc, port=port, log_path=log_path)
    deadline = time.monotonic() + READY_TIMEOUT_S
    url = f"http://127.0.0.1:{port}{ready_path}"
    answered = False
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        if not answered:
            answered = _answers(url)
        if answered and len(worker_processes(server)) >= expected_workers:
            return server
        time.sleep(POLL_S)
    stop_server(server)
    raise RuntimeError(
        f"{name} did not come up on port {port} within {READY_TIMEOUT_S:.0f} s "
        f"(exit code {proc.returncode}); log tail:\n{server.log_tail()}"
    )


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1.0) as response:
            return bool(response.status == 200)
    except OSError:
        return False


# Helper processes multiprocessing may start beside the workers; they serve nothing.
_HELPERS = ("resource_tracker", "semaphore_tracker", "forkserver")
# allcores serve's shared CPU pool (titled "allcores: pool K"): it runs offloaded tasks,
# serves no HTTP, and a rolling reload keeps it, so it is not a worker either.
_POOL_TITLE = "allcores: pool "


def worker_processes(server: Server) -> list[psutil.Process]:
    """The server's descendants except multiprocessing's helpers and a shared CPU pool.

    Not every worker holds the listening socket (allcores' balanced and rr workers only
    receive accepted connections), so a worker is recognised by being a descendant.
    """
    workers = []
    for proc in server.tree()[1:]:
        with contextlib.suppress(psutil.Error):
            cmdline = " ".join(proc.cmdline())
            helper = any(name in cmdline for name in _HELPERS)
            if not helper and not cmdline.startswith(_POOL_TITLE):
                workers.append(proc)
    return workers


def tree_cpu_seconds(procs: list[psutil.Process]) -> float:
    """User + system CPU seconds used so far by these processes (those still alive)."""
    total = 0.0
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            times = proc.cpu_times()
            total += times.user + times.system
    return total


def connections_per_pid(server: Server) -> dict[int, int]:
    """ESTABLISHED TCP connections on the server port, per process of its tree.

    The same method for every server: psutil reads each process's fds, so a connection is
    counted under whichever process holds its socket (a worker, or a primary that kept a
    copy).
    """
    counts: dict[int, int] = {}
    for proc in server.tree():
        with contextlib.suppress(psutil.Error):
            n = sum(
                1
                for conn in proc.net_connections(kind="tcp")
                if conn.status == psutil.CONN_ESTABLISHED
                and conn.laddr
                and conn.laddr.port == server.port
            )
            if n:
                counts[proc.pid] = n
    return counts


def stop_server(server: Server) -> list[int]:
    """SIGTERM the server, wait, then SIGKILL by PID whatever of its tree survived.

    Returns the PIDs that had to be killed (a graceful stop returns []).
    """
    server.tree()
    killed: list[int] = []
    if server.proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            server.proc.send_signal(signal.SIGTERM)
        try:
            server.proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                server.proc.kill()
            killed.append(server.proc.pid)
            server.proc.wait(timeout=STOP_TIMEOUT_S)
    descendants = [p for pid, p in server.known.items() if pid != server.proc.pid]
    for proc in _survivors(descendants):
        with contextlib.suppress(psutil.Error):
            proc.kill()
        killed.append(proc.pid)
    return killed


def _survivors(procs: list[psutil.Process]) -> Iterator[psutil.Process]:
    """Processes still alive after a grace period; only the ones we recorded ourselves."""
    deadline = time.monotonic() + STOP_TIMEOUT_S
    remaining = list(procs)
    while remaining and time.monotonic() < deadline:
        remaining = [p for p in remaining if _alive(p)]
        if remaining:
            time.sleep(POLL_S)
    yield from remaining


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
