"""Node's `cluster` module for Python.

::

    from allcores import cluster

    if cluster.is_primary:
        for _ in range(allcores.available_cpus()):
            cluster.fork()
        cluster.on("exit", lambda worker, code, signal: print(f"Worker {worker.pid} died"))
        sys.exit(cluster.run())
    else:
        async def main():
            server = await cluster.start_server(handle, port=8000)
            await server.serve_forever()
        asyncio.run(main())

In the primary, events and messages are delivered by the primary's asyncio loop in
the main thread while `cluster.run()` (or ``await cluster.run_async()``) runs. A
script that forks and never calls `run()` still behaves like Node: the primary loop
runs when the script's main module ends (from `atexit`), until every worker is gone.
See docs/cluster.md for the whole API next to Node's.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from allcores.cluster.handle import Worker
from allcores.cluster.listeners import Address, BindError
from allcores.cluster.primary import ClusterError, Primary
from allcores.cluster.settings import POLICIES, ClusterSettings, SettingsError
from allcores.cluster.spawn import ENV_CHANNEL_FD, ENV_PRIMARY_PID, ENV_SCOREBOARD, ENV_WORKER_ID
from allcores.cluster.worker import ClusterServer, StreamHandler, WorkerError, WorkerRuntime

if TYPE_CHECKING:
    from ssl import SSLContext

__all__ = [
    "POLICIES",
    "Address",
    "BindError",
    "ClusterError",
    "ClusterServer",
    "ClusterSettings",
    "SettingsError",
    "Worker",
    "WorkerError",
    "disconnect",
    "fork",
    "is_primary",
    "is_worker",
    "listen",
    "off",
    "on",
    "once",
    "reload",
    "run",
    "run_async",
    "scale",
    "scheduling_policy",
    "settings",
    "setup_primary",
    "start_server",
    "stop",
    "worker",
    "workers",
]

# The role of this process is fixed by how it was started, like Node's NODE_UNIQUE_ID.
is_worker: bool = ENV_WORKER_ID in os.environ
is_primary: bool = not is_worker

worker: WorkerRuntime | None = None
if is_worker:
    worker = WorkerRuntime(
        int(os.environ[ENV_WORKER_ID]),
        int(os.environ[ENV_CHANNEL_FD]),
        os.environ[ENV_SCOREBOARD],
        int(os.environ.get(ENV_PRIMARY_PID, os.getppid())),
    )
    # A worker's own children must not think they are workers too.
    for _name in (ENV_WORKER_ID, ENV_CHANNEL_FD, ENV_SCOREBOARD, ENV_PRIMARY_PID):
        os.environ.pop(_name, None)

_primary: Primary | None = None
settings: ClusterSettings = ClusterSettings()
scheduling_policy: str = settings.scheduling_policy
"""Set before the first `fork()`, as in Node: "balanced", "rr", "shared" or "reuseport"."""


def _the_primary() -> Primary:
    global _primary
    if not is_primary:
        raise ClusterError("this is a worker: only the primary can fork or supervise workers")
    if _primary is None:
        _primary = Primary(settings)
    if scheduling_policy != settings.scheduling_policy:
        settings.update(scheduling_policy=scheduling_policy)
    return _primary


def _the_worker() -> WorkerRuntime:
    if worker is None:
        raise WorkerError(
            "this is the primary: start_server/listen run in workers; "
            "call cluster.fork() here and serve in the `else:` branch"
        )
    return worker


def setup_primary(**changes: Any) -> ClusterSettings:
    """Change the settings used by later forks (Node's ``cluster.setupPrimary``).

    Takes any `ClusterSettings` field: ``exec``, ``args``, ``silent``,
    ``scheduling_policy``, ``respawn``, ``crash_loop_limit``, ``graceful_timeout``, ...
    """
    global scheduling_policy
    settings.update(**changes)
    scheduling_policy = settings.scheduling_policy
    return settings


def fork(env: dict[str, str] | None = None) -> Worker:
    """Start a worker running this program again; returns its `Worker` handle."""
    return _the_primary().fork(env)


def on(event: str, listener: Callable[..., Any]) -> Callable[..., Any]:
    """Listen for a primary event: fork, online, listening, message, disconnect, exit."""
    return _the_primary().on(event, listener)


def once(event: str, listener: Callable[..., Any]) -> Callable[..., Any]:
    return _the_primary().once(event, listener)


def off(event: str, listener: Callable[..., Any]) -> None:
    _the_primary().off(event, listener)


def run() -> int:
    """Run the primary until every worker has exited; returns the exit code."""
    return _the_primary().run()


async def run_async() -> int:
    """`run` for a primary that already runs an event loop."""
    return await _the_primary().run_async()


def reload() -> None:
    """Replace every worker, one at a time, each old one draining only once its
    successor listens; SIGHUP to the primary does the same."""
    _the_primary().reload()


def scale(count: int) -> None:
    """Run *count* workers: start new ones, or drain the newest."""
    _the_primary().scale(count)


def stop() -> None:
    """Stop gracefully, as on SIGTERM: stop accepting, drain the workers, end `run`."""
    _the_primary().stop()


def disconnect(callback: Callable[[], Any] | None = None) -> None:
    """Disconnect every worker; *callback* runs once all of them have exited."""
    _the_primary().disconnect(callback)


async def start_server(
    client_connected_cb: StreamHandler | None = None,
    host: str | None = None,
    port: int = 0,
    *,
    protocol_factory: Callable[[], Any] | None = None,
    backlog: int | None = None,
    limit: int = 2**16,
    ssl: SSLContext | None = None,
) -> ClusterServer:
    """Serve on the cluster's shared port, under every policy.

    Give either an asyncio streams handler ``async def handle(reader, writer)`` or a
    ``protocol_factory`` (for example uvicorn's HTTP protocol). With *ssl*, every
    connection is TLS.
    """
    return await _the_worker().start_server(
        client_connected_cb,
        host,
        port,
        protocol_factory=protocol_factory,
        backlog=backlog,
        limit=limit,
        ssl=ssl,
    )


async def listen(
    host: str | None = None, port: int = 0, backlog: int | None = None
) -> socket.socket:
    """The shared listening socket itself, for any other server library.

    Only under the policies where workers accept (``shared``, ``reuseport``).
    """
    return await _the_worker().listen(host, port, backlog)


def _become_worker(worker_id: int, channel_fd: int, scoreboard: str, parent_pid: int) -> None:
    """In a worker forked from a zygote (`allcores.cluster.forking`): this process was
    a copy of the primary; from here on it is worker *worker_id*, as if it had been
    started with the worker's environment."""
    global is_worker, is_primary, worker, _primary
    is_worker, is_primary, _primary = True, False, None
    worker = WorkerRuntime(worker_id, channel_fd, scoreboard, parent_pid)


def __getattr__(name: str) -> Any:
    if name == "workers":
        return _primary.workers if _primary is not None else {}
    raise AttributeError(f"module 'allcores.cluster' has no attribute {name!r}")
