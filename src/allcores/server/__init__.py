"""`allcores serve`: any ASGI or WSGI app on every core, supervised.

::

    allcores serve main:app --workers auto
    allcores.serve("main:app", workers=4)      # the same from Python
    allcores.serve(app)                        # an app object: workers run this
                                               # program again, up to this call

Parts: `settings` (every option and its sources), `app` (find the app, speak
ASGI 3 to it), `primary` (the supervising process), `engine` + `protocol` (an HTTP
worker on uvicorn's protocol, with limits, metering and hand-off), `worker` (the
worker's program). docs/serve.md has every option; docs/architecture.md shows where
this sits.
"""

from __future__ import annotations

import sys
from typing import Any

from allcores.server.settings import ServeSettings, ServeSettingsError

__all__ = ["ServeSettings", "ServeSettingsError", "serve"]


def serve(app: Any, **options: Any) -> int:
    """Serve *app* (``"module:attribute"``, or the app itself) on every core.

    In the primary it returns the exit code once the server stops. Where the app is
    an object, each worker runs this program again; there, this call serves and
    the worker exits without returning, like `cluster.fork()`'s workers.
    """
    from allcores import cluster

    if cluster.is_worker:
        from allcores.server import worker

        if worker.serving:
            return 0  # the app's module, imported by this worker, asks again
        sys.exit(worker.main(None if isinstance(app, str) else app))
    from allcores.server.primary import run_primary

    if not isinstance(app, str) and hasattr(sys, "ps1"):
        raise ServeSettingsError(
            "an app object cannot be served from the interactive interpreter: each "
            "worker runs your program again, and there is none; give the app as "
            "'module:attribute' (allcores.serve('main:app'))"
        )
    settings = ServeSettings.load({**options, "app": app})
    return run_primary(settings, rerun_program=not isinstance(app, str))
