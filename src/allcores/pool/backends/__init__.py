"""Where pool workers run. One module per backend, behind `base.Backend`."""

from allcores.pool.backends.base import Backend, BackendWorker, Capabilities, WorkerExit

__all__ = ["Backend", "BackendWorker", "Capabilities", "WorkerExit"]
