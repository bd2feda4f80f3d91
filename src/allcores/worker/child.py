"""The worker process side of `allcores.Worker`: its entry point and `ParentPort`.

::

    Worker(target) ── fork ──► _worker_main(sock, spec, parent): resolve target,
                               target(parent_port, data); errors go back as frames
    worker.post_message ─────► ParentPort "message" listeners
    ParentPort.post_message ─► Worker "message" listeners

Also what both sides share: the target spec, message encoding, `WorkerProcessError`.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import pickle
import re
import signal
import socket
import sys
import threading
import traceback
from collections.abc import Callable, Sequence
from typing import Any, Literal

import cloudpickle

from allcores._system import die_with_parent, release_forkserver
from allcores.errors import AllcoresError, ChannelClosed, ChannelError
from allcores.ipc.channel import Channel
from allcores.shm.segment import fd_transfer, received_fds

__all__ = ["ParentPort", "WorkerProcessError"]

log = logging.getLogger("allcores.worker")

Listener = Callable[..., Any]
Target = Callable[["ParentPort", Any], Any]
Event = Literal["message", "error", "exit", "online"]
_PORT_EVENTS = ("message",)
_TARGET_PATH = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


class WorkerProcessError(AllcoresError):
    """A Worker could not start, could not send a message, or exited before answering.

    ``exit_code`` is the worker's exit code when the error is about its exit.
    """

    def __init__(self, message: str, *, exit_code: int | None = None) -> None:
        super().__init__(message)
        self.exit_code = exit_code


# ── encoding ────────────────────────────────────────────────────────────────────


def _encode(obj: Any, what: str) -> tuple[bytes, list[int]]:
    """Pickle *obj*; return the payload and duplicates of the fds it refers to.

    The duplicates belong to the frame (closed once it is sent), so the caller may
    close its SharedArray right after posting it.
    """
    try:
        with fd_transfer() as fds:
            payload = pickle.dumps(obj, protocol=5)
    except Exception as exc:
        raise WorkerProcessError(
            f"{what} cannot be pickled ({exc!r}); send plain data (numbers, strings, "
            "lists, dicts, dataclasses) and put large buffers in an allcores.SharedArray"
        ) from exc
    return payload, [os.dup(fd) for fd in fds]


def _decode(payload: bytes | bytearray, fds: list[int]) -> Any:
    try:
        with received_fds(fds):
            return pickle.loads(payload)
    finally:
        _close_fds(fds)


def _close_fds(fds: Sequence[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def _target_spec(target: str | Target) -> tuple[str, str | bytes]:
    """How the worker finds its function: an import path, or a pickle of it.

    Functions defined in ``__main__``, lambdas and closures are pickled by value with
    cloudpickle, so they work whatever the start method; others by reference.
    """
    if isinstance(target, str):
        if not _TARGET_PATH.match(target):
            raise WorkerProcessError(
                f"target {target!r} is not 'package.module:function'; pass that form "
                "or the function itself"
            )
        return "import", target
    if not callable(target):
        raise WorkerProcessError(f"target must be a function or 'module:function', got {target!r}")
    by_value = getattr(target, "__module__", None) == "__main__" or "<" in getattr(
        target, "__qualname__", "<"
    )
    try:
        if not by_value:
            return "pickle", pickle.dumps(target, protocol=5)
    except Exception:
        pass
    try:
        return "pickle", cloudpickle.dumps(target, protocol=5)
    except Exception as exc:
        raise WorkerProcessError(
            f"target {target!r} cannot be pickled ({exc!r}); define it at module level "
            "and pass it or its 'module:function' path"
        ) from exc


def _resolve_target(spec: tuple[str, str | bytes]) -> Target:
    kind, value = spec
    if kind == "import":
        assert isinstance(value, str)
        module_name, _, attr_path = value.partition(":")
        obj: Any = importlib.import_module(module_name)
        for attr in attr_path.split("."):
            obj = getattr(obj, attr)
        target: Target = obj
        return target
    assert isinstance(value, bytes)
    loaded: Target = pickle.loads(value)
    return loaded


# ── worker side ─────────────────────────────────────────────────────────────────


class ParentPort:
    """The worker's end: Node's ``parentPort``, passed to the target as its first argument.

    `post_message` may be called from any thread of the worker; `receive` from one
    thread at a time.
    """

    def __init__(self, channel: Channel) -> None:
        self._channel = channel
        self._send_lock = threading.Lock()
        self._listeners: list[tuple[Listener, bool]] = []
        self._closed = False

    def post_message(self, obj: Any) -> None:
        """Send *obj* to the parent's "message" listeners (a pickled copy; shared memory shared)."""
        self._send(("message", obj), "the message")

    def receive(self, timeout: float | None = None) -> Any:
        """Block until the parent posts a message and return it.

        Raises TimeoutError after *timeout* seconds, and ChannelClosed when the parent
        has gone away (the worker is being shut down).
        """
        payload, fds = self._channel.recv_bytes(timeout)
        _kind, obj = _decode(payload, fds)
        return obj

    def on(self, event: Literal["message"], listener: Listener | None = None) -> Listener:
        """Call *listener(msg)* for each message once the target has returned.

        As in Node, a port with message listeners keeps the worker alive: after the
        target returns, the worker serves messages until `close()` or the parent
        goes away. Returns *listener*; without one, returns a decorator.
        """
        return self._add_listener(event, listener, once=False)

    def once(self, event: Literal["message"], listener: Listener | None = None) -> Listener:
        return self._add_listener(event, listener, once=True)

    def _add_listener(self, event: str, listener: Listener | None, *, once: bool) -> Listener:
        self._check_event(event)
        if listener is None:
            return lambda fn: self._add_listener(event, fn, once=once)
        self._listeners.append((listener, once))
        return listener

    def off(self, event: Literal["message"], listener: Listener) -> None:
        self._check_event(event)
        for i, (registered, _once) in enumerate(self._listeners):
            if registered is listener:
                del self._listeners[i]
                return

    def close(self) -> None:
        """Stop serving messages; the worker exits once its current listener returns."""
        self._closed = True

    @staticmethod
    def _check_event(event: str) -> None:
        if event not in _PORT_EVENTS:
            raise WorkerProcessError(f"parent_port has no {event!r} event; it has: 'message'")

    def _send(self, frame: tuple[Any, ...], what: str) -> None:
        payload, fds = _encode(frame, what)
        try:
            with self._send_lock:
                self._channel.send_bytes(payload, fds)
        finally:
            _close_fds(fds)

    def _serve_listeners(self) -> None:
        while self._listeners and not self._closed:
            try:
                message = self.receive()
            except ChannelClosed:
                return
            for entry in list(self._listeners):
                listener, once = entry
                if once and entry in self._listeners:
                    self._listeners.remove(entry)
                listener(message)


def _reset_signals() -> None:
    # A forked worker inherits the parent's Python signal handlers and asyncio's
    # wakeup fd, which would write our signals into the parent's loop. SIGINT is
    # ignored: Ctrl-C reaches the whole process group, the parent decides, and the
    # worker follows it out through PDEATHSIG.
    signal.set_wakeup_fd(-1)
    for signum in signal.valid_signals():
        with contextlib.suppress(OSError, ValueError, TypeError):
            if callable(signal.getsignal(signum)):
                signal.signal(signum, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _worker_main(sock: socket.socket, spec: tuple[str, str | bytes], parent: int) -> None:
    """The worker process's entry point (run by multiprocessing's bootstrap)."""
    die_with_parent(parent)
    _reset_signals()
    release_forkserver()
    channel = Channel(sock, raw=True)
    try:
        payload, fds = channel.recv_bytes()
    except ChannelError:
        return  # the parent went away before we started
    port = ParentPort(channel)
    try:
        _kind, worker_data = _decode(payload, fds)
        port._send(("online",), "online")
        target = _resolve_target(spec)
        target(port, worker_data)
        port._serve_listeners()
    except SystemExit:
        raise
    except BaseException as exc:
        _report_error(port, exc)
        sys.exit(1)
    finally:
        channel.close()


def _report_error(port: ParentPort, exc: BaseException) -> None:
    text = "".join(traceback.format_exception(exc))
    try:
        blob: bytes | None = pickle.dumps(exc, protocol=5)
    except Exception:
        blob = None
    try:
        port._send(("error", blob, type(exc).__qualname__, str(exc), text), "the error")
    except AllcoresError:
        sys.stderr.write(f"allcores worker {os.getpid()} failed and its parent is gone:\n{text}")


# ── parent side ─────────────────────────────────────────────────────────────────
