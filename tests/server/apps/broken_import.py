"""An app whose module fails as it is imported, as a typo in a config would."""

from __future__ import annotations

SETTINGS: dict[str, str] = {}
DATABASE_URL = SETTINGS["DATABASE_URL"]  # KeyError at import
