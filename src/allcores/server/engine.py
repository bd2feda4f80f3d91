"""One HTTP worker of `allcores serve`: uvicorn's protocol on the cluster's connections.

::

    python -m allcores.server.worker (or the user's program, run again)
      run(settings): load the app (app.py) ─► uvicorn.Config ─► uvloop
        1. lifespan startup (uvicorn's LifespanOn): it fails ─► exit 3, its message
           logged; the primary's crash-loop rule then ends the server non-zero
        2. cluster.start_server(ServingProtocol, protocol.py): the primary now routes
           connections here (balanced / rr), or this loop accepts (shared /
           reuseport); listening means ready, which a reload waits for
           `offload` goes to the server's shared pool (shared_pool/client.py)
        3. serve until the primary says DISCONNECT (or SIGTERM): drain (protocol.py);
           meanwhile a thread logs the stack of any stall past warn_blocking
           (allcores.observe.stall), and the primary's watchdog kills a loop
           stuck past timeout_hung (allcores.cluster.health)
        4. lifespan shutdown, exit 0

uvicorn's `Config` does what it does for `uvicorn` itself (protocol classes, TLS
context, proxy headers, logging); uvicorn's `Server`, which binds and accepts, is
replaced by the cluster.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import os
import signal
import time
from email.utils import formatdate
from typing import Any

import uvicorn
import uvicorn.config
from uvicorn.server import ServerState

from allcores import cluster
from allcores._system import new_event_loop
from allcores.cluster.worker import WorkerRuntime
from allcores.observe.stall import StallReporter
from allcores.pool.offload import set_offload_runner
from allcores.server.app import load_app
from allcores.server.limits import RepeatFilter, sweep
from allcores.server.metering import Meter, metered
from allcores.server.protocol import serving_protocol
from allcores.server.settings import ServeSettings
from allcores.server.shared_pool.client import ADDRESS_ENV, SharedPoolClient

__all__ = ["LIFESPAN_FAILED", "logging_config", "run"]

log = logging.getLogger("allcores.server")

# uvicorn's own exit code for a failed startup.
LIFESPAN_FAILED = 3


def logging_config(settings: ServeSettings) -> dict[str, Any]:
    """uvicorn's logging set-up, with allcores' own messages in the same format."""
    config = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    config["loggers"]["allcores"] = {"handlers": ["default"], "level": "INFO", "propagate": False}
    config["loggers"]["allcores"]["level"] = settings.log_level.upper().replace("TRACE", "DEBUG")
    return config


def uvicorn_config(settings: ServeSettings, app: Any) -> uvicorn.Config:
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        http=settings.http,
        ws="none" if settings.interface == "wsgi" else settings.ws,
        lifespan="off" if settings.interface == "wsgi" else settings.lifespan,  # type: ignore[arg-type]
        interface="asgi3",
        log_config=logging_config(settings),
        log_level=settings.log_level,
        access_log=settings.access_log,
        proxy_headers=settings.proxy_headers,
        forwarded_allow_ips=settings.forwarded_allow_ips,
        root_path=settings.root_path,
        limit_concurrency=settings.limit_concurrency,
        backlog=settings.backlog,
        timeout_keep_alive=settings.timeout_keep_alive,  # type: ignore[arg-type]
        ssl_certfile=settings.ssl_certfile,
        ssl_keyfile=settings.ssl_keyfile,
        ssl_keyfile_password=settings.ssl_keyfile_password,
        h11_max_incomplete_event_size=settings.limit_request_line
        + settings.limit_request_field_size * settings.limit_request_fields,
    )
    config.load()
    # Bad requests by the thousand must not write the log by the thousand.
    logging.getLogger("uvicorn.error").addFilter(RepeatFilter())
    return config


def offload_to_shared_pool(runtime: WorkerRuntime) -> None:
    """`offload` in this worker goes to the server's shared pool, if it has one."""
    address = os.environ.get(ADDRESS_ENV)
    if address:  # an abstract socket's name: NUL first
        set_offload_runner(SharedPoolClient("\0" + address, runtime.row))


def run(settings: ServeSettings, loaded: tuple[Any, str] | None = None) -> int:
    """Serve in this worker until drained; the exit code. *loaded*: the app, already
    imported by the primary (--preload), and its interface."""
    if settings.engine == "granian":
        from allcores.server import granian_engine

        return granian_engine.run(settings, loaded)
    app, interface = loaded if loaded is not None else load_app(settings)
    settings.interface = interface
    runtime = cluster.worker
    assert runtime is not None, "allcores.server.engine runs in a cluster worker"
    config = uvicorn_config(settings, app)
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        return runner.run(_serve(settings, config))


async def _serve(settings: ServeSettings, config: uvicorn.Config) -> int:
    runtime = cluster.worker
    assert runtime is not None, "allcores.server.engine runs in a cluster worker"
    lifespan = config.lifespan_class(config)
    await lifespan.startup()
    if lifespan.should_exit:
        return LIFESPAN_FAILED
    state = ServerState()
    meter = Meter(runtime.row)
    protocol_class: Any = serving_protocol(config.http_protocol_class, settings, runtime, meter)
    if protocol_class is None:  # h11: uvicorn's protocol as it is, metered around the app
        protocol_class = config.http_protocol_class
        config.loaded_app = metered(config.loaded_app, meter)

    def protocol() -> asyncio.Protocol:
        made: asyncio.Protocol = protocol_class(
            config=config, server_state=state, app_state=lifespan.state
        )
        return made

    offload_to_shared_pool(runtime)
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, runtime.disconnect)
    ticker = loop.create_task(_tick(config, state, meter, settings.timeout_header))
    stalls = None
    if settings.warn_blocking:
        stalls = StallReporter(runtime.row, settings.warn_blocking, f"worker {runtime.id}")
        stalls.start()
    try:
        host, port = settings.listen_address
        server = await cluster.start_server(
            protocol_factory=protocol,
            host=host,
            port=port,
            backlog=settings.backlog,
            ssl=config.ssl,
        )
        await server.serve_forever()
    except BaseException:
        await lifespan.shutdown()  # the app's own clean-up runs even so
        raise
    finally:
        if stalls is not None:
            stalls.stop()
        ticker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await ticker
    meter.flush()
    # Requests still running when the drain's time ran out were aborted with their
    # connections; their tasks end at their next await.
    for task in list(state.tasks):
        task.cancel()
    await lifespan.shutdown()
    return 0


async def _tick(
    config: uvicorn.Config, state: ServerState, meter: Meter, timeout_header: float
) -> None:
    """Every tenth of a second: the request counts into the scoreboard row; every
    second: the Date header, as uvicorn's server does, and the requests whose head is
    late (limits.py)."""
    ticks = 0
    while True:
        meter.flush()
        if ticks % 10 == 0:
            date = [(b"date", formatdate(time.time(), usegmt=True).encode())]
            state.default_headers = (date if config.date_header else []) + config.encoded_headers
            if timeout_header:
                sweep(state.connections, timeout_header)
        ticks += 1
        await asyncio.sleep(0.1)
