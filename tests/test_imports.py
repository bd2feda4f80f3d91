"""`import allcores` loads only what every user needs: the pool, the cluster, shared
memory and the CLI (and typing, asyncio, ctypes under them) wait for first use."""

from __future__ import annotations

import json
import subprocess
import sys

# What only some users need. A module the interpreter had loaded before `import
# allcores` (a site hook may import typing) is not counted against it.
DEFERRED = {
    "allcores.pool",
    "allcores.cluster",
    "allcores.shm",
    "allcores.server",
    "allcores.cli",
    "allcores._system",
    "asyncio",
    "ctypes",
    "typing",
}

_SCRIPT = """
import json, sys
before = set(sys.modules)
import allcores
print(json.dumps(sorted(set(sys.modules) - before)))
"""


def _loaded_by(script: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    return set(json.loads(out.stdout))


def test_import_allcores_defers_what_only_some_users_need() -> None:
    assert _loaded_by(_SCRIPT) & DEFERRED == set()


def test_the_deferred_names_are_there_on_first_use() -> None:
    script = _SCRIPT.replace(
        "import allcores\n",
        "import allcores\nallcores.available_cpus(); allcores.Pool; allcores.SharedArray\n",
    )
    assert {"allcores._system", "allcores.pool", "allcores.shm"} <= _loaded_by(script)
