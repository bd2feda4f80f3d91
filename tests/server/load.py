"""A small, bounded HTTP load for the serve tests: keep-alive clients that count
what failed, as wrk would (a connection closed under a request counts)."""

from __future__ import annotations

import http.client
import threading
import time


class Load:
    """*connections* threads sending ``GET /`` on keep-alive connections (with
    *fresh*, a new connection for each request) until `stop()` or *seconds*."""

    def __init__(
        self, port: int, connections: int = 8, seconds: float = 60.0, *, fresh: bool = False
    ) -> None:
        self.port = port
        self.fresh = fresh
        self.ok = 0
        self.failures: list[str] = []
        self.pids: set[int] = set()
        self._deadline = time.monotonic() + seconds
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run) for _ in range(connections)]
        for thread in self._threads:
            thread.start()

    def _run(self) -> None:
        conn: http.client.HTTPConnection | None = None
        while not self._stop.is_set() and time.monotonic() < self._deadline:
            try:
                if conn is None:
                    conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
                conn.request("GET", "/")
                response = conn.getresponse()
                body = response.read()
                with self._lock:
                    if response.status == 200:
                        self.ok += 1
                        self.pids.add(int(body.split()[0]))
                    else:
                        self.failures.append(f"status {response.status}")
                if self.fresh or response.getheader("connection", "").lower() == "close":
                    conn.close()
                    conn = None
            except (OSError, http.client.HTTPException) as exc:
                with self._lock:
                    self.failures.append(repr(exc))
                if conn is not None:
                    conn.close()
                conn = None
        if conn is not None:
            conn.close()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)
