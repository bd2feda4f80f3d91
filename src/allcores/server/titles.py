"""Process titles, as gunicorn sets them: ``ps`` and ``top`` then show
``allcores: primary main:app`` and ``allcores: worker 2 main:app``, so ``kill``
finds the right pid."""

from __future__ import annotations

__all__ = ["set_title"]


def set_title(role: str) -> None:
    try:
        from setproctitle import setproctitle
    except ImportError:  # pragma: no cover - setproctitle is a dependency
        return
    setproctitle(f"allcores: {role}")
