"""The worker side of a cluster: `cluster.worker` in a worker process.

A worker is this program run again with ``ALLCORES_WORKER_ID`` set. At import of
`allcores.cluster` it attaches to its channel and scoreboard row, arms a
parent-death signal, and tells the primary it is online. The first async call
(`start_server`, `listen`, `on("message")` inside a loop) binds the channel to the
running event loop, which from then on reads it directly and beats the heartbeat.

How a connection reaches the app (`allcores.cluster.messages` has every message)::

    balanced / rr:      primary accept() ─ CONN {key} + fd ─► _on_conn
                        └─ loop.connect_accepted_socket(protocol_factory, sock)
    shared / reuseport: primary's socket ─ fd once ─► loop.create_server(sock=...)
                        └─ this worker's loop accepts

Every connection is counted in the scoreboard row (open, and closed in total): the
primary reads them to pick the least busy worker, without any message.
"""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import logging
import os
import socket
import threading
import types
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any

from allcores._system import die_with_parent
from allcores.cluster import messages
from allcores.cluster.listeners import Address
from allcores.errors import AllcoresError, ChannelError
from allcores.events import EventEmitter
from allcores.ipc.async_channel import AsyncChannel
from allcores.ipc.channel import Channel
from allcores.observe.looplag import LoopMonitor
from allcores.observe.scoreboard import Row, RowState, Scoreboard

if TYPE_CHECKING:
    from ssl import SSLContext

__all__ = ["ClusterServer", "WorkerRuntime"]

ProtocolFactory = Callable[[], asyncio.BaseProtocol]
StreamHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None] | None]


class WorkerError(AllcoresError):
    """A worker-side cluster call failed (listen refused, used outside a worker, ...)."""


class ClusterServer:
    """What `cluster.start_server` returns: an `asyncio.Server` look-alike."""

    def __init__(self, runtime: WorkerRuntime, address: Address, policy: str) -> None:
        self._runtime = runtime
        self.address = address
        self.policy = policy
        self._server: asyncio.Server | None = None
        self._serving = True
        self._closed = asyncio.Event()

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        return tuple(self._server.sockets) if self._server is not None else ()

    def is_serving(self) -> bool:
        return self._serving

    def close(self) -> None:
        """Stop taking new connections; open ones go on."""
        if not self._serving:
            return
        self._serving = False
        if self._server is not None:
            self._server.close()
        self._runtime._server_closed(self)

    def _finish(self) -> None:
        self.close()
        self._closed.set()

    async def wait_closed(self) -> None:
        await self._closed.wait()

    async def serve_forever(self) -> None:
        """Serve until the worker is disconnected (then drained) or the server is closed.

        Returns normally, so ``asyncio.run(main())`` ends and the worker exits 0.
        """
        await self._closed.wait()

    async def __aenter__(self) -> ClusterServer:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._finish()


class WorkerRuntime(EventEmitter):
    """`cluster.worker` inside a worker. Events: ``message(message, handle)``, ``disconnect()``."""

    def __init__(self, worker_id: int, channel_fd: int, scoreboard: str, primary_pid: int) -> None:
        super().__init__()
        self.id = worker_id
        self.exited_after_disconnect = False
        die_with_parent(primary_pid)
        # The primary's watchdog asks a worker whose loop is stuck for its stacks
        # before it kills it (`allcores.cluster.health`).
        faulthandler.register(messages.DUMP_SIGNAL, all_threads=True)
        self._sock = socket.socket(fileno=channel_fd)
        self._blocking = Channel(self._sock)
        fd, rows, row = (int(part) for part in scoreboard.split(":"))
        self._scoreboard = Scoreboard.attach(fd, rows)
        self.row: Row = self._scoreboard.row(row)
        self._channel: AsyncChannel | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._monitor: LoopMonitor | None = None
        self._requests: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._next_request = 0
        self._servers: dict[
            tuple[str, int], tuple[ClusterServer, ProtocolFactory, SSLContext | None]
        ] = {}
        # Every open connection's protocol, with the key of the server it came to.
        self._protocols: dict[asyncio.BaseProtocol, tuple[Any, ...]] = {}
        self._early: dict[tuple[Any, ...], list[int]] = {}
        self._retired: dict[tuple[Any, ...], tuple[ProtocolFactory, SSLContext | None]] = {}
        # Open or closed by the app: a drain ends every one's serve_forever().
        self._every_server: list[ClusterServer] = []
        self._all_closed: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        # The loop holds only weak references to tasks: these keep them until done.
        self._tasks: set[asyncio.Task[Any]] = set()
        self.drain_hooks: list[Callable[[], Awaitable[None]]] = []
        """Awaited by a drain, within its timeout: a server library serving on
        `listen()`'s socket stops accepting and finishes its requests there."""
        self.disconnecting = False
        self.handing_off = False
        """While draining: idle connections may go to another worker (`hand_off`)."""
        self._blocking.send({"t": messages.ONLINE})

    @property
    def process(self) -> types.SimpleNamespace:
        """Node's ``cluster.worker.process``: here only its ``pid``."""
        return types.SimpleNamespace(pid=os.getpid())

    def __repr__(self) -> str:
        return f"<cluster.worker {self.id} pid={os.getpid()}>"

    # -- the channel, bound to the running loop on first async use ------------------

    def _attach(self) -> asyncio.AbstractEventLoop:
        loop = asyncio.get_running_loop()
        if self._loop is None:
            if self._thread is not None:
                raise WorkerError(
                    "cluster.worker.on('message') was first used outside an event loop; "
                    "register handlers inside the loop that serves, before serving"
                )
            self._loop = loop
            self._channel = AsyncChannel(
                self._sock, self._on_message, self._on_close, loop=loop, on_error=_dropped
            )
            self._monitor = LoopMonitor(self.row, loop)
            self._monitor.start()
        elif self._loop is not loop:
            raise WorkerError("a worker serves from one event loop; this is another one")
        return loop

    def on(self, event: str, listener: Callable[..., Any]) -> Callable[..., Any]:
        super().on(event, listener)
        if event == "message" and self._loop is None:
            try:
                self._attach()
            except RuntimeError:
                self._start_reader_thread()
        return listener

    def _start_reader_thread(self) -> None:
        """For a worker with no event loop: messages are read, and listeners called, in a
        daemon thread."""
        if self._thread is not None:
            return

        def read() -> None:
            while True:
                try:
                    obj, fds = self._blocking.recv()
                except ChannelError:
                    os._exit(0)
                self._on_message(obj, fds)

        self._thread = threading.Thread(target=read, name="allcores-worker-channel", daemon=True)
        self._thread.start()

    def send(self, message: Any, handle: socket.socket | int | None = None) -> bool:
        """Send *message* to the primary (its ``message`` event), optionally with a socket."""
        fds = [] if handle is None else [handle if isinstance(handle, int) else handle.fileno()]
        frame = {"t": messages.MSG, "data": message}
        try:
            if self._channel is not None:
                self._channel.send(frame, fds)
            else:
                self._blocking.send(frame, fds)
        except ChannelError:
            return False
        return True

    def _on_close(self, exc: BaseException | None) -> None:
        # The primary closes a channel only once this worker has exited, so EOF means
        # the primary is gone (or we closed it after draining): leave now.
        if not self.disconnecting:
            os._exit(1)

    def _on_message(self, obj: Any, fds: list[int]) -> None:
        kind = messages.kind_of(obj)
        if kind == messages.CONN:
            self._on_conn(tuple(obj["key"]), fds)
        elif kind == messages.LISTENING:
            future = self._requests.pop(obj.get("req", -1), None)
            if future is not None and not future.done():
                future.set_result({**obj, "fds": fds})
            else:
                for fd in fds:
                    os.close(fd)
        elif kind == messages.MSG:
            handle = socket.socket(fileno=fds[0]) if fds else None
            for extra in fds[1:]:
                os.close(extra)
            self.emit("message", obj.get("data"), handle)
        elif kind == messages.DISCONNECT:
            for fd in fds:
                os.close(fd)
            if self._loop is not None:
                timeout = float(obj.get("timeout", 30.0))
                self._start(self._drain(timeout, handoff=bool(obj.get("handoff"))))
            else:
                os._exit(0)
        else:
            for fd in fds:
                os.close(fd)

    # -- serving ------------------------------------------------------------------------

    async def _request_listen(
        self, host: str | None, port: int, backlog: int | None
    ) -> dict[str, Any]:
        loop = self._attach()
        if self.disconnecting:
            return {"stopping": True, "fds": []}
        self._next_request += 1
        req = self._next_request
        future: asyncio.Future[dict[str, Any]] = loop.create_future()
        self._requests[req] = future
        assert self._channel is not None
        self._channel.send(
            {"t": messages.LISTEN, "host": host, "port": port, "backlog": backlog, "req": req}
        )
        reply = await future
        if "error" in reply:
            for fd in reply["fds"]:
                os.close(fd)
            raise WorkerError(
                f"the primary could not listen on {host or '0.0.0.0'}:{port}: {reply['error']}"
            )
        return reply

    async def start_server(
        self,
        client_connected_cb: StreamHandler | None = None,
        host: str | None = None,
        port: int = 0,
        *,
        protocol_factory: ProtocolFactory | None = None,
        backlog: int | None = None,
        limit: int = 2**16,
        ssl: SSLContext | None = None,
    ) -> ClusterServer:
        if (client_connected_cb is None) == (protocol_factory is None):
            raise WorkerError("give start_server either a stream handler or protocol_factory=")
        if protocol_factory is None:
            assert client_connected_cb is not None
            handler = client_connected_cb

            def stream_protocol() -> asyncio.BaseProtocol:
                reader = asyncio.StreamReader(limit=limit)
                return asyncio.StreamReaderProtocol(reader, handler)

            protocol_factory = stream_protocol
        reply = await self._request_listen(host, port, backlog)
        if reply.get("stopping"):
            # Told to stop while it was still booting: a server that is already done,
            # so `await server.serve_forever()` returns and the worker exits 0.
            stopped = ClusterServer(self, Address(host or "0.0.0.0", port, 4), "stopped")
            stopped._finish()
            return stopped
        address = Address(*reply["address"])
        server = ClusterServer(self, address, reply["policy"])
        key = tuple(reply["key"])
        counted = self._counted(protocol_factory, key)
        if reply["fds"]:
            sock = socket.socket(fileno=reply["fds"][0])
            for extra in reply["fds"][1:]:
                os.close(extra)
            loop = asyncio.get_running_loop()
            server._server = await loop.create_server(
                counted, sock=sock, backlog=backlog or 2048, ssl=ssl
            )
        self._register(key, server, counted, ssl)
        self.row.set("state", RowState.READY)
        return server

    async def listen(
        self, host: str | None = None, port: int = 0, backlog: int | None = None
    ) -> socket.socket:
        """The shared listening socket, for another server library (policies shared/reuseport)."""
        reply = await self._request_listen(host, port, backlog)
        if reply.get("stopping"):
            raise WorkerError(
                "this worker is disconnecting (the cluster is stopping); not listening"
            )
        if not reply["fds"]:
            if self._channel is not None:
                self._channel.send({"t": messages.UNLISTEN, "key": reply["key"]})
            raise WorkerError(
                f"cluster.listen() needs a socket the worker accepts on itself, which policy "
                f"{reply['policy']!r} does not give (the primary accepts); use "
                "cluster.start_server(...), or scheduling_policy 'shared' or 'reuseport'"
            )
        return socket.socket(fileno=reply["fds"][0])

    def _counted(self, factory: ProtocolFactory, key: tuple[Any, ...]) -> ProtocolFactory:
        """Wrap *factory* so every connection is counted in this worker's row."""
        row = self.row
        protocols = self._protocols

        def counted() -> asyncio.BaseProtocol:
            protocol = factory()
            made = protocol.connection_made
            lost = protocol.connection_lost

            def connection_made(transport: asyncio.BaseTransport) -> None:
                protocols[protocol] = key
                row.add("connections", 1)
                made(transport)

            def connection_lost(exc: Exception | None) -> None:
                protocols.pop(protocol, None)
                row.add("connections", -1)
                row.add("connections_closed", 1)
                try:
                    lost(exc)
                finally:
                    if not protocols and self._all_closed is not None:
                        self._all_closed.set()

            # Instance attributes shadow the class's methods: cheaper than a proxy
            # object on every data_received, which is the hot path.
            protocol.connection_made = connection_made  # type: ignore[method-assign]
            protocol.connection_lost = connection_lost  # type: ignore[method-assign]
            return protocol

        return counted

    def _on_conn(self, key: tuple[Any, ...], fds: list[int]) -> None:
        for extra in fds[1:]:
            os.close(extra)
        if not fds:
            return
        entry = self._servers.get(key)  # type: ignore[arg-type]
        factory, ssl = entry[1:] if entry is not None else (None, None)
        if factory is None and self.disconnecting and key in self._retired:
            # Sent before the primary knew we were draining: in-flight work, served.
            factory, ssl = self._retired[key]
        if factory is None or self._loop is None:
            if key in self._retired or self.disconnecting:
                # Our server for it is closed: the primary gives it to another worker.
                self._bounce(key, fds[0])
            else:
                # The primary sends connections right after its "listening" reply;
                # they can arrive before start_server() has resumed and registered.
                self._early.setdefault(key, []).append(fds[0])
            return
        sock = socket.socket(fileno=fds[0])
        task = self._start(self._loop.connect_accepted_socket(factory, sock, ssl=ssl))
        task.add_done_callback(self._takeover_done)

    def _start(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """A task on the worker's loop, kept until it is done."""
        assert self._loop is not None
        task = self._loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _bounce(self, key: tuple[Any, ...], fd: int) -> None:
        try:
            if self._channel is None or self._channel.closed:
                raise ChannelError("channel closed")
            self._channel.send({"t": messages.CONN_BACK, "key": list(key)}, [fd])
        except ChannelError:
            pass
        finally:
            os.close(fd)

    def _takeover_done(self, task: asyncio.Task[Any]) -> None:
        if task.cancelled() or task.exception() is None:
            return
        # connection_made never ran: count it closed, or the primary would think this
        # worker one connection busier for ever.
        self.row.add("connections_closed", 1)
        logging.getLogger("allcores.cluster").error(
            "allcores: could not take over a connection", exc_info=task.exception()
        )

    def _register(
        self,
        key: tuple[Any, ...],
        server: ClusterServer,
        factory: ProtocolFactory,
        ssl: SSLContext | None,
    ) -> None:
        self._servers[key] = (server, factory, ssl)  # type: ignore[index]
        self._every_server.append(server)
        for fd in self._early.pop(key, []):
            self._on_conn(key, [fd])

    def _server_closed(self, server: ClusterServer) -> None:
        for key, (registered, factory, ssl) in list(self._servers.items()):
            if registered is server:
                del self._servers[key]
                self._retired[key] = (factory, ssl)
                if self._channel is not None and not self._channel.closed:
                    self._channel.send({"t": messages.UNLISTEN, "key": list(key)})

    # -- disconnect ---------------------------------------------------------------

    def disconnect(self) -> None:
        """Stop taking connections, finish those open, close the channel (Node's
        ``worker.disconnect()`` called in the worker)."""
        if self._loop is None:
            self.exited_after_disconnect = True
            self.disconnecting = True
            with contextlib.suppress(ChannelError):
                self._blocking.send({"t": messages.DISCONNECTING})
                self._blocking.send({"t": messages.BYE})
            self._blocking.close()
            return
        # Its idle connections go to the other workers; if the primary is stopping
        # meanwhile, it closes them.
        self._start(self._drain(30.0, tell_primary=True, handoff=True))

    def hand_off(self, protocol: asyncio.BaseProtocol, transport: asyncio.Transport) -> bool:
        """While draining, give an idle connection to the primary, which passes it to
        another worker; the client sees no close. False when it cannot (the cluster is
        stopping, the connection is not ours, or it is TLS, whose session state
        cannot move with the socket): close it instead.

        Call it only between requests, with nothing read and not yet handled: what
        the client sends next is still in the socket, and goes with it.
        """
        key = self._protocols.get(protocol)
        sock = transport.get_extra_info("socket")
        channel = self._channel
        if not self.handing_off or key is None or sock is None:
            return False
        if transport.get_extra_info("ssl_object") is not None:
            return False  # TLS state lives in this process: the socket alone is no use
        if channel is None or channel.closed or transport.is_closing():
            return False
        fd = os.dup(sock.fileno())
        try:
            channel.send({"t": messages.CONN_BACK, "key": list(key)}, [fd])
        except ChannelError:
            return False
        finally:
            os.close(fd)
        # Our fd goes; the connection lives on in the primary's copy.
        transport.abort()
        return True

    async def _drain(
        self, timeout: float, tell_primary: bool = False, handoff: bool = False
    ) -> None:
        if self.disconnecting:
            return
        self.disconnecting = True
        self.handing_off = handoff
        self.exited_after_disconnect = True
        self.row.set("state", RowState.STOPPING)
        for future in self._requests.values():
            if not future.done():
                future.set_result({"stopping": True, "fds": []})
        self._requests.clear()
        if tell_primary and self._channel is not None:
            self._channel.send({"t": messages.DISCONNECTING})
        servers = [server for server, _factory, _ssl in self._servers.values()]
        for server in servers:
            server.close()
        self._all_closed = asyncio.Event()
        for protocol in list(self._protocols):
            # uvicorn's protocols (and any with the same method) close idle keep-alive
            # connections at once and finish the request in flight; `allcores serve`'s
            # hand idle ones on (`hand_off`) when the cluster goes on.
            shutdown = getattr(protocol, "shutdown", None)
            if callable(shutdown):
                shutdown()
        waits: list[Awaitable[Any]] = [self._all_closed.wait()] if self._protocols else []
        waits += [hook() for hook in self.drain_hooks]
        if waits:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(*waits), timeout)
        for protocol in list(self._protocols):
            transport = getattr(protocol, "transport", None) or getattr(
                protocol, "_transport", None
            )
            if transport is not None:
                transport.abort()
        self.emit("disconnect")
        for server in self._every_server:
            server._finish()
        if self._monitor is not None:
            self._monitor.stop()
        if self._channel is not None:
            self._channel.send({"t": messages.BYE})
            self._channel.close(flush=True)


def _dropped(exc: ChannelError) -> None:
    logging.getLogger("allcores.cluster").error(
        "allcores: a message from the primary was dropped: %s "
        "(is everything it sends importable in workers too?)",
        exc,
    )
