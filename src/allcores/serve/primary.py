"""The primary of `allcores serve`: settings in, a supervised cluster of HTTP workers out.

::

    allcores serve main:app  /  allcores.serve(app)
      ServeSettings (settings.py) ─► check the app's module is there (app.py)
      cluster primary: policy, respawn on, graceful timeout, and each worker told
        what to run: `python -m allcores.serve.worker` with the settings as JSON
        (an app given as an object: this program run again, up to serve())
      fork N workers ─► cluster.run(): supervise until SIGTERM / SIGINT; SIGHUP
        reloads one worker at a time (`allcores.cluster.rolling`); exit code 0
        after a clean stop, 1 after a crash loop (an import error, a failed
        lifespan startup)
"""

from __future__ import annotations

import logging
import logging.config
import sys

from allcores import cluster
from allcores._system import available_cpus
from allcores.serve.app import AppLoadError, check_findable
from allcores.serve.engine import logging_config
from allcores.serve.settings import ServeSettings
from allcores.serve.titles import set_title
from allcores.serve.worker import SETTINGS_ENV

__all__ = ["run_primary"]

log = logging.getLogger("allcores.serve")


def run_primary(settings: ServeSettings, *, rerun_program: bool = False) -> int:
    """Serve until stopped; the primary's exit code. *rerun_program*: workers run
    this program again (the app is an object in it) instead of the worker module."""
    logging.config.dictConfig(logging_config(settings))
    try:
        check_findable(settings)
    except AppLoadError as exc:
        log.error("allcores: %s", exc)
        return 1
    workers = available_cpus() if settings.workers == "auto" else int(settings.workers)
    set_title(f"primary {settings.app_name}")
    cluster.setup_primary(
        exec=None if rerun_program else sys.executable,
        args=None if rerun_program else ["-m", "allcores.serve.worker"],
        scheduling_policy=settings.policy,
        respawn=True,
        graceful_timeout=settings.timeout_graceful,
        timeout_hung=settings.timeout_hung,
        max_requests=settings.max_requests,
        max_requests_jitter=settings.max_requests_jitter,
        max_rss_mb=settings.max_rss,
        max_lifetime=settings.max_lifetime,
        env={SETTINGS_ENV: settings.to_json()},
    )
    scheme = "https" if settings.ssl_certfile else "http"
    log.info(
        "allcores: serving %s on %s://%s:%d with %d worker(s), policy %s "
        "(SIGHUP reloads, Ctrl-C stops)",
        settings.app_name,
        scheme,
        settings.host,
        settings.port,
        workers,
        settings.policy,
    )
    for _ in range(workers):
        cluster.fork()
    return cluster.run()
