"""The program an HTTP worker of `allcores serve` runs: ``python -m allcores.server.worker``.

The primary hands it the resolved settings as JSON in ``ALLCORES_SERVE_SETTINGS``;
nothing is parsed again here, so every worker serves exactly what the primary
validated. An app given to `allcores.serve()` as an object is served by the
user's program run again instead (`allcores.server.serve`).
"""

from __future__ import annotations

import os
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


if __name__ == "__main__":
    # Run as `-m`, this file is `__main__`; the app's module reaches this one as
    # `allcores.server.worker`. One module must hold `serving` for both.
    from allcores.server import worker

    sys.exit(worker.main())
