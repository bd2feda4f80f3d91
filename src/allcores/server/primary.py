"""The primary of `allcores serve`: settings in, a supervised cluster of HTTP workers out.

::

    allcores serve main:app  /  allcores.serve(app)
      ServeSettings (settings.py) ─► check the app's module is there (app.py)
      cluster primary: policy, respawn on, watchdog and recycling limits, and each
        worker told what to run: `python -m allcores.server.worker` with the
        settings as JSON (an app given as an object: this program run again)
      the shared CPU pool's socket (shared_pool/), before any fork, so that every
      worker inherits where it is
      on the primary's loop: the control socket (allcores.control), the admin
      endpoint if asked for (admin.py), the pool's processes, then N workers
      ─► supervise until SIGTERM / SIGINT / `allcores stop`; SIGHUP or `allcores
        reload` replaces one worker at a time (allcores.cluster.rolling); exit code
        0 after a clean stop, 1 after a crash loop (an import error, a failed
        lifespan startup); the pool's processes are killed once the workers are gone
"""

from __future__ import annotations

import asyncio
import gc
import logging
import logging.config
import sys
import time
from pathlib import Path
from typing import Any

from allcores._system import available_cpus, new_event_loop
from allcores.cluster.forking import ForkLauncher
from allcores.cluster.listeners import BindError
from allcores.cluster.primary import Primary
from allcores.cluster.settings import ClusterSettings
from allcores.control.client import ControlError, default_path
from allcores.control.server import ControlServer
from allcores.server.admin import AdminServer
from allcores.server.app import AppLoadError, check_findable, load_app
from allcores.server.engine import logging_config
from allcores.server.settings import ServeSettings, admin_address
from allcores.server.shared_pool.owner import SharedPool
from allcores.server.shared_pool.process import run_forked as run_pool_forked
from allcores.server.status import StatusBuilder
from allcores.server.titles import set_title
from allcores.server.worker import SETTINGS_ENV, run_forked

__all__ = ["run_primary"]

log = logging.getLogger("allcores.server")


def run_primary(settings: ServeSettings, *, rerun_program: bool = False) -> int:
    """Serve until stopped; the primary's exit code. *rerun_program*: workers run
    this program again (the app is an object in it) instead of the worker module."""
    logging.config.dictConfig(logging_config(settings))
    try:
        check_findable(settings)
    except AppLoadError as exc:
        log.error("allcores: %s", exc)
        return 1
    if settings.engine == "granian":
        from allcores.server.granian_engine import check

        problem = check()
        if problem is not None:
            log.error("allcores: %s", problem)
            return 1
    set_title(f"primary {settings.app_name}")
    cluster_settings = ClusterSettings(
        exec=None if rerun_program else sys.executable,
        args=None if rerun_program else ["-m", "allcores.server.worker"],
        scheduling_policy=settings.policy,  # type: ignore[arg-type]
        respawn=True,
        # A worker that dies is replaced at once (a new pid within ~30 ms); the delay
        # doubles only while its replacements keep dying within boot_period.
        respawn_delay=0.02,
        graceful_timeout=settings.timeout_graceful,
        timeout_hung=settings.timeout_hung,
        max_requests=settings.max_requests,
        max_requests_jitter=settings.max_requests_jitter,
        max_rss_mb=settings.max_rss,
        max_lifetime=settings.max_lifetime,
        env={SETTINGS_ENV: settings.to_json()},
    )
    primary = Primary(cluster_settings)
    try:
        # Bound before any worker starts: a taken port fails at once, with who holds
        # it, and --port 0 gets its number for the workers and the log.
        bound = primary.bind(*settings.listen_address, settings.backlog)
    except BindError as exc:
        log.error("allcores: %s", exc.strerror or exc)
        return 1
    if not settings.uds:
        settings.port = bound.port
    primary.settings.env[SETTINGS_ENV] = settings.to_json()
    pool = None
    size = available_cpus() if settings.pool == "auto" else int(settings.pool)
    if size:
        try:
            pool = SharedPool(
                size, settings.pool_queue, settings.pool_nice, settings.app_name, settings.app_dir
            )
        except OSError as exc:
            log.error("allcores: cannot make the shared pool's socket: %s", exc)
            return 1
    try:
        if settings.preload and not _preload(settings, primary, pool):
            return 1
        with asyncio.Runner(loop_factory=new_event_loop) as runner:
            return runner.run(_serve(settings, primary, pool))
    finally:
        if pool is not None:
            pool.close()


def _preload(settings: ServeSettings, primary: Primary, pool: SharedPool | None) -> bool:
    """Import the app here, once, and fork every worker from a zygote that holds it."""
    try:
        loaded = load_app(settings)
    except AppLoadError as exc:
        log.error("allcores: %s", exc)
        return False
    except BaseException:
        log.exception("allcores: the app failed to load (--preload imports it here)")
        return False
    board = primary.scoreboard
    # What the app made so far stays put: the collector no longer writes to those
    # objects' headers, so the workers' copies of those pages stay shared.
    gc.collect()
    gc.freeze()
    # The zygote keeps the title it is forked with; the primary takes its own back.
    set_title(f"zygote {settings.app_name}")
    try:
        args = (loaded, settings.to_json(), board.fd, board.rows)
        others = {"pool": (run_pool_forked, pool.fork_args())} if pool is not None else None
        primary.launcher = ForkLauncher(run_forked, args, others)
    finally:
        set_title(f"primary {settings.app_name}")
    return True


async def _serve(settings: ServeSettings, primary: Primary, pool: SharedPool | None) -> int:
    status = StatusBuilder(primary, settings.app_name, time.monotonic(), pool)
    control_path = (
        Path(settings.control)
        if settings.control
        else default_path(settings.listen_address[0] if settings.uds else settings.port)
    )
    control = ControlServer(control_path, _handlers(primary, status))
    admin = None
    try:
        await control.start()
        if settings.admin:
            admin = AdminServer(admin_address(settings.admin), primary, status.build, pool)
            await admin.start()
            log.info("allcores: admin endpoint on http://%s:%d/metrics", *admin.address)
    except (ControlError, OSError) as exc:
        log.error("allcores: %s", exc)
        control.close()
        return 1
    workers = available_cpus() if settings.workers == "auto" else int(settings.workers)
    log.info(
        "allcores: serving %s on %s with %d worker(s), policy %s, %s; "
        "control socket %s (SIGHUP reloads, Ctrl-C stops)",
        settings.app_name,
        settings.url,
        workers,
        settings.policy,
        f"a shared pool of {pool.size} process(es)" if pool else "no shared pool",
        control_path,
    )
    try:
        if pool is not None:
            pool.start(asyncio.get_running_loop(), primary.launcher)
        for _ in range(workers):
            primary.fork()
        return await primary.run_async()
    finally:
        if pool is not None:
            pool.close()  # the workers are gone: no task has anyone waiting on it
        control.close()
        if admin is not None:
            admin.close()


def _handlers(primary: Primary, status: StatusBuilder) -> dict[str, Any]:
    def reload(_command: dict[str, Any]) -> dict[str, Any]:
        primary.reload()
        return {"reloading": len(primary.serving())}

    def scale(command: dict[str, Any]) -> dict[str, Any]:
        wanted = str(command.get("workers", ""))
        current = len(primary.serving())
        try:
            count = current + int(wanted) if wanted[:1] in "+-" else int(wanted)
        except ValueError:
            raise ValueError(f"scale takes N, +N or -N workers, not {wanted!r}") from None
        if count < 1:
            raise ValueError(f"cannot scale to {count} workers; to stop, use `allcores stop`")
        primary.scale(count)
        return {"workers": count, "was": current}

    def stop(_command: dict[str, Any]) -> dict[str, Any]:
        primary.stop()
        return {"stopping": True}

    return {
        "status": lambda _command: status.build(),
        "reload": reload,
        "scale": scale,
        "stop": stop,
    }
