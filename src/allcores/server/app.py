"""Finding the user's app and speaking to it in ASGI 3, whatever it is.

::

    "main:app" ── import (app_dir first on sys.path) ──► the object
        --factory: call it, the result is the app
    interface auto: async __call__ → ASGI 3; (environ, start_response) → WSGI;
                    one argument → ASGI 2
    WSGI (Flask, Django's wsgi.py) ──► a2wsgi, its calls on a bounded thread pool
    ASGI 2 ──► uvicorn's ASGI2Middleware

The engine only ever sees an ASGI 3 callable.
"""

from __future__ import annotations

import importlib.util
import inspect
import sys
from pathlib import Path
from typing import Any

from allcores.errors import AllcoresError
from allcores.server.settings import ServeSettings

__all__ = ["AppLoadError", "check_findable", "detect_interface", "load_app"]


class AppLoadError(AllcoresError):
    """The app named on the command line cannot be found or used."""


def _use_app_dir(settings: ServeSettings) -> None:
    app_dir = str(Path(settings.app_dir).resolve())
    if app_dir not in sys.path:
        sys.path.insert(0, app_dir)


def check_findable(settings: ServeSettings) -> None:
    """In the primary, before any worker starts: is the app's top-level module there?

    Only looked up, not imported (importing is the workers' job, and may be slow or
    have side effects), so a typo fails in milliseconds, not after a crash loop.
    """
    if not isinstance(settings.app, str):
        return
    _use_app_dir(settings)
    module = settings.app.partition(":")[0]
    top = module.split(".")[0]
    try:
        found = importlib.util.find_spec(top) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise AppLoadError(
            f"cannot find module {top!r} for app {settings.app!r} in {settings.app_dir!r} "
            "or on sys.path; run allcores from the folder that holds it, or give --app-dir"
        )


def load_app(settings: ServeSettings) -> tuple[Any, str]:
    """The app as an ASGI 3 callable, and the interface it was found to speak."""
    app = settings.app
    if isinstance(app, str):
        _use_app_dir(settings)
        app = _import(app)
    if settings.factory:
        app = app()
    interface = settings.interface
    if interface == "auto":
        interface = detect_interface(app)
    if interface == "wsgi":
        try:
            from a2wsgi import WSGIMiddleware
        except ImportError as exc:  # pragma: no cover - a2wsgi is a dependency
            raise AppLoadError("serving a WSGI app needs a2wsgi: pip install a2wsgi") from exc
        return WSGIMiddleware(app, workers=settings.wsgi_threads), interface
    if interface == "asgi2":
        from uvicorn.middleware.asgi2 import ASGI2Middleware

        return ASGI2Middleware(app), interface
    return app, interface


def _import(name: str) -> Any:
    module_name, _, attribute = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name and not module_name.startswith(f"{exc.name}."):
            raise  # the app's module was found; something it imports was not
        raise AppLoadError(f"cannot import module {module_name!r} (app {name!r})") from None
    found: Any = module
    for part in attribute.split("."):
        try:
            found = getattr(found, part)
        except AttributeError:
            raise AppLoadError(
                f"module {module_name!r} has no attribute {attribute!r} (app {name!r})"
            ) from None
    return found


def detect_interface(app: Any) -> str:
    """``"asgi3"``, ``"asgi2"`` or ``"wsgi"``, from how *app* is called."""
    if inspect.isclass(app):
        # An ASGI 2 app is a class: built with the scope, then awaited.
        return "asgi2"
    call = app if inspect.isroutine(app) else getattr(app, "__call__", None)  # noqa: B004
    if call is None:
        raise AppLoadError(f"{app!r} is not callable: it is no ASGI or WSGI app")
    if inspect.iscoroutinefunction(call):
        return "asgi3"
    try:
        parameters = [
            p
            for p in inspect.signature(call).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
    except (TypeError, ValueError):
        return "asgi3"
    if len(parameters) == 2:
        return "wsgi"
    if len(parameters) == 1:
        return "asgi2"
    return "asgi3"
