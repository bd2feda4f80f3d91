"""The admin endpoint (``--admin HOST:PORT``): the whole server seen from the primary.

::

    GET /metrics ─► Prometheus text (metrics.py: read from the scoreboard)
    GET /status  ─► the JSON of `allcores status --json` (status.py)
    GET /healthz ─► 200 while the primary's loop answers
    GET /readyz  ─► 200 while a worker serves, else 503

It runs on the primary's own loop, apart from the app's port, and is off unless
asked for. HTTP is parsed by h11 (a uvicorn dependency); a handful of GETs did not
justify a second server stack, nor uvicorn's `Server`, which would take over the
primary's signals.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable
from http import HTTPStatus
from typing import Any

import h11
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from allcores.cluster.primary import Primary
from allcores.server.metrics import registry_for
from allcores.server.shared_pool.owner import SharedPool

__all__ = ["AdminServer"]

# A request head bigger than this is refused: the endpoint serves four GETs.
_MAX_HEAD = 16 * 1024
# A client that sends nothing for this long is dropped.
_IDLE = 10.0


class AdminServer:
    def __init__(
        self,
        address: tuple[str, int],
        primary: Primary,
        status: Callable[[], dict[str, Any]],
        pool: SharedPool | None = None,
    ) -> None:
        self.address = address
        self._primary = primary
        self._status = status
        self._registry = registry_for(primary, pool)
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        host, port = self.address
        self._server = await asyncio.start_server(self._serve, host, port)

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None

    def _respond(self, target: str) -> tuple[int, str, bytes]:
        path = target.split("?", 1)[0]
        if path == "/metrics":
            return 200, CONTENT_TYPE_LATEST, generate_latest(self._registry)
        if path == "/status":
            return 200, "application/json", json.dumps(self._status()).encode()
        if path == "/healthz":
            return 200, "text/plain", b"ok\n"
        if path == "/readyz":
            serving = len(self._primary.serving(listening=True))
            if serving and not self._primary.stopping:
                return 200, "text/plain", f"ready: {serving} worker(s) serving\n".encode()
            return 503, "text/plain", b"not ready: no worker serving\n"
        return 404, "text/plain", b"not found: try /metrics, /status, /healthz or /readyz\n"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=_MAX_HEAD)
        try:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = await asyncio.wait_for(reader.read(65536), _IDLE)
                    conn.receive_data(data)
                    continue
                if isinstance(event, h11.Request):
                    target = event.target.decode("ascii", "replace")
                    if event.method not in (b"GET", b"HEAD"):
                        status, kind, body = 405, "text/plain", b"only GET\n"
                    else:
                        status, kind, body = self._respond(target)
                    headers = [("content-type", kind), ("content-length", str(len(body)))]
                    reason = HTTPStatus(status).phrase.encode()
                    response = h11.Response(status_code=status, headers=headers, reason=reason)
                    writer.write(conn.send(response))
                    if event.method != b"HEAD":
                        writer.write(conn.send(h11.Data(data=body)))
                    writer.write(conn.send(h11.EndOfMessage()))
                    await writer.drain()
                elif isinstance(event, h11.EndOfMessage):
                    if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
                        conn.start_next_cycle()
                elif isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                    break
        except h11.RemoteProtocolError as exc:
            with contextlib.suppress(Exception):
                response = h11.Response(
                    status_code=exc.error_status_hint, headers=[("content-length", "0")]
                )
                writer.write(conn.send(response))
                writer.write(conn.send(h11.EndOfMessage()))
        except (TimeoutError, ConnectionError, OSError):
            pass
        finally:
            writer.close()
