"""allcores: use every core from Python.

- `allcores.cluster`: Node's cluster module: a primary forks workers that serve on
  one shared port, and supervises them.
- `allcores.Pool` / `allcores.offload`: Node's worker_threads and Piscina: CPU-bound
  work leaves the event loop for a pool of worker processes.
- `allcores.SharedArray`: Node's SharedArrayBuffer.
"""

from __future__ import annotations

from allcores import cluster
from allcores._system import available_cpus
from allcores.errors import AllcoresError

__all__ = ["AllcoresError", "available_cpus", "cluster"]
__version__ = "0.1.0"
