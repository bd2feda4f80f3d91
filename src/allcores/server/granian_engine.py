"""`--engine granian`: an HTTP worker that serves with granian's Rust HTTP core.

::

    run(settings): the app as for uvicorn (uvicorn's Config: proxy headers, ASGI 2,
      WSGI through a2wsgi), metered (metering.py), on uvloop in this thread
      1. lifespan startup (uvicorn's LifespanOn, as engine.py); it fails ─► exit 3
      2. cluster.listen(): the server's listening socket (policy shared or
         reuseport: granian accepts by itself, so the primary cannot hand it
         connections), given to granian's ASGIWorker; granian's Rust threads accept,
         parse and call the app on this loop, which the primary watches as any
         worker's (heartbeat, watchdog, stall stacks)
      3. drain (the primary's DISCONNECT or SIGTERM): granian's WorkerSignal ─► it
         stops accepting, closes idle keep-alive connections, finishes requests in
         flight; the cluster's drain waits for that (within --timeout-graceful)
      4. lifespan shutdown, exit 0

granian has no public API for serving on a socket it did not open, so this uses
the names its own worker processes use (granian 2.8: `ASGIWorker`, `SocketHolder`,
`WorkerSignal`, `_callback_wrapper`, `_new_cbscheduler`); `check()` refuses any other
version with a clear message, since a mismatched call can panic granian's Rust side.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
from typing import Any

from allcores import cluster
from allcores._system import new_event_loop
from allcores.observe.stall import StallReporter
from allcores.server.app import load_app
from allcores.server.engine import LIFESPAN_FAILED, offload_to_shared_pool, uvicorn_config
from allcores.server.metering import Meter, metered
from allcores.server.settings import ServeSettings

__all__ = ["SUPPORTED", "check", "run"]

log = logging.getLogger("allcores.server")

SUPPORTED = "2.8"
"""The granian minor version whose worker API this module calls."""
# --timeout-header 0 (off): granian has no "never", so a day.
_NO_HEADER_TIMEOUT_MS = 24 * 3600 * 1000


def check() -> str | None:
    """None when `--engine granian` can run here, else why not (what to do)."""
    try:
        import granian
    except ImportError:
        return "--engine granian needs granian: pip install 'allcores[granian]'"
    version = str(getattr(granian, "__version__", "?"))
    if not version.startswith(SUPPORTED + "."):
        return (
            f"--engine granian works with granian {SUPPORTED}.x, and {version} is installed: "
            f"pip install 'granian>={SUPPORTED},<2.9' (or drop --engine granian)"
        )
    return None


def run(settings: ServeSettings, loaded: tuple[Any, str] | None = None) -> int:
    app, interface = loaded if loaded is not None else load_app(settings)
    settings.interface = interface
    config = uvicorn_config(settings, app)
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        return runner.run(_serve(settings, config))


async def _serve(settings: ServeSettings, config: Any) -> int:
    from granian._futures import _future_watcher_wrapper, _new_cbscheduler
    from granian._granian import ASGIWorker, SocketHolder, WorkerSignal
    from granian.asgi import _callback_wrapper
    from granian.http import HTTP1Settings

    runtime = cluster.worker
    assert runtime is not None, "allcores.server.granian_engine runs in a cluster worker"
    lifespan = config.lifespan_class(config)
    await lifespan.startup()
    if lifespan.should_exit:
        return LIFESPAN_FAILED
    offload_to_shared_pool(runtime)
    meter = Meter(runtime.row)
    app = metered(config.loaded_app, meter)
    loop = asyncio.get_running_loop()
    host, port = settings.listen_address
    sock = await runtime.listen(host, port, settings.backlog)
    unix = sock.family == socket.AF_UNIX
    if not unix:
        # granian sets it on its own listeners; accepted sockets inherit it.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    # granian owns the fd from here, and closes it when it stops.
    holder = SocketHolder(sock.detach(), unix, settings.backlog)
    access = None
    if settings.access_log:
        from granian.log import DEFAULT_ACCESSLOG_FMT

        access = DEFAULT_ACCESSLOG_FMT
        logging.getLogger("granian.access").handlers = logging.getLogger("uvicorn.error").handlers
    scope_options = {"url_path_prefix": settings.root_path or None}
    callback = _future_watcher_wrapper(
        _callback_wrapper(app, scope_options, lifespan.state, access)
    )
    header_ms = round(settings.timeout_header * 1000) or _NO_HEADER_TIMEOUT_MS
    limits = settings.limit_request_line + settings.limit_request_field_size
    ssl = bool(settings.ssl_certfile)
    worker = ASGIWorker(
        runtime.id,
        (None, holder),
        None,  # granian's metrics pipe: the scoreboard does that job
        1,  # Rust runtime threads, as granian's default
        512,
        1,  # Python threads: 1 for ASGI
        30,
        settings.limit_concurrency or settings.backlog,  # open connections
        "1",
        HTTP1Settings(header_read_timeout=header_ms, max_buffer_size=max(8192, limits)),
        None,
        settings.ws != "none",
        None,
        ssl,
        os.path.abspath(settings.ssl_certfile) if settings.ssl_certfile else None,
        os.path.abspath(settings.ssl_keyfile) if settings.ssl_keyfile else None,
        settings.ssl_keyfile_password,
        "tls1.2",
        None,
        [],
        False,
        (None, None),
    )
    stopped = loop.create_future()
    signal_ = WorkerSignal()

    def settle() -> None:
        if not stopped.done():
            stopped.set_result(None)

    def on_stopped() -> None:  # called from a granian thread
        loop.call_soon_threadsafe(settle)

    signal_.add_cb(on_stopped)

    async def drain() -> None:
        signal_.set()
        await asyncio.shield(stopped)

    runtime.drain_hooks.append(drain)
    finished = asyncio.Event()
    runtime.on("disconnect", finished.set)
    loop.add_signal_handler(signal.SIGTERM, runtime.disconnect)
    stalls = None
    if settings.warn_blocking:
        stalls = StallReporter(runtime.row, settings.warn_blocking, f"worker {runtime.id}")
        stalls.start()
    ticker = loop.create_task(_tick(meter))
    worker.serve_mtr(_new_cbscheduler(loop, callback, impl_asyncio=True), loop, signal_)
    try:
        await finished.wait()
    finally:
        if stalls is not None:
            stalls.stop()
        ticker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await ticker
        if not stopped.done():
            signal_.set()
    meter.flush()
    await lifespan.shutdown()
    if not stopped.done():
        # The drain's time ran out with requests still running on granian's threads:
        # interpreter shutdown under them is not safe.
        log.warning("allcores: worker %d: requests still running at exit", runtime.id)
        os._exit(0)
    return 0


async def _tick(meter: Meter) -> None:
    while True:
        meter.flush()
        await asyncio.sleep(0.1)
