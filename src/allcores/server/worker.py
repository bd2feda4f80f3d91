"""The program an HTTP worker of `allcores serve` runs: ``python -m allcores.server.worker``.

The primary hands it the resolved settings as JSON in ``ALLCORES_SERVE_SETTINGS``;
nothing is parsed again here, so every worker serves exactly what the primary
validated. An app given to `allcores.serve()` as an object is served by the
user's program run again instead (`allcores.server.serve`).
"""

from __future__ import annotations

import json
import os
import socket
import sys
from typing import Any

SETTINGS_ENV = "ALLCORES_SERVE_SETTINGS"

# True once this worker has begun serving: an `allcores.serve(...)` that the app's
# module runs as it is imported (a script with no main guard) must then do nothing.
serving = False


def main(app: Any = None) -> int:
    from allcores import cluster
    from allcores.server.app import AppLoadError
    from allcores.server.engine import run
    from allcores.server.settings import ServeSettings
    from allcores.server.titles import set_title

    global serving
    serving = True
    text = os.environ.pop(SETTINGS_ENV, None)
    if cluster.worker is None or text is None:
        print(
            "allcores.server.worker is started by `allcores serve`, not by hand",
            file=sys.stderr,
        )
        return 2
    settings = ServeSettings.from_json(text, app)
    set_title(f"worker {cluster.worker.id} {settings.app_name}")
    try:
        return run(settings)
    except AppLoadError as exc:
        print(f"allcores: error: {exc}", file=sys.stderr)
        return 1


def run_forked(
    channel: socket.socket,
    worker_id: int,
    row: int,
    zygote_pid: int,
    loaded: tuple[Any, str],
    settings_json: str,
    scoreboard_fd: int,
    scoreboard_rows: int,
) -> int:  # pragma: no cover - runs in a worker forked by --preload's zygote
    """A worker forked from the zygote of `allcores serve --preload`, the app
    already imported (`allcores.cluster.forking`)."""
    from allcores import cluster
    from allcores.server.engine import run
    from allcores.server.settings import ServeSettings
    from allcores.server.titles import set_title

    global serving
    serving = True
    scoreboard = f"{scoreboard_fd}:{scoreboard_rows}:{row}"
    cluster._become_worker(worker_id, channel.detach(), scoreboard, zygote_pid)
    # An app given as an object travels as null in the JSON: it is the loaded one.
    named = json.loads(settings_json)["app"] is not None
    settings = ServeSettings.from_json(settings_json, None if named else loaded[0])
    set_title(f"worker {worker_id} {settings.app_name}")
    return run(settings, loaded)


if __name__ == "__main__":
    # Run as `-m`, this file is `__main__`; the app's module reaches this one as
    # `allcores.server.worker`. One module must hold `serving` for both.
    from allcores.server import worker

    sys.exit(worker.main())
