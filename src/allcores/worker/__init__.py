"""Node's worker_threads `Worker`: one long-lived process to exchange messages with."""

from allcores.errors import RemoteTraceback
from allcores.worker.worker import ParentPort, Worker, WorkerProcessError

__all__ = ["ParentPort", "RemoteTraceback", "Worker", "WorkerProcessError"]
