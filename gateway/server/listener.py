"""The serving loop: uvloop, except that a listening socket accepts a batch per loop turn.

libuv, under uvloop, accepts one connection each time the listening socket polls
readable (libuv 1.45+, PR #3696: "don't accept() connections in a loop"). A busy worker
turns its loop every 10-20 ms, so new connections then enter at 50-100 a second while the
rest wait in the kernel's queue, their requests already sent: on the bench, wrk's 64
connections at c=64 took up to 0.9 s to be accepted and those first requests made the
gateway's p99 (bench/README.md, "The c=64 tail"). Here a listening socket gets a reader of
our own that accepts up to ACCEPT_BATCH connections per turn (as asyncio's own loop does)
and hands each to uvloop as an accepted socket: same transport, same protocol. That costs
~15 µs more CPU per new connection than uvloop's own accept (a Python socket and a Task
each): nothing for clients that keep connections alive, ~1.5 % of a request for those
that reconnect every time.

`tallygate serve` names `new_event_loop` as uvicorn's loop factory. Anything this server
does not cover (TLS, unix sockets, reuse_port, start_serving=False) goes to uvloop's own.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from collections.abc import Callable, Iterable
from typing import Any

import uvloop

log = logging.getLogger("tallygate.http")

# Connections accepted per loop turn and listening socket: a burst of hundreds enters in a
# few turns, and a flood cannot hold one turn for long (each costs a protocol object).
ACCEPT_BATCH = 128
# Out of descriptors or memory: stop accepting this long, serve what is open (asyncio: 1 s).
PAUSE_S = 0.1
WARN_EVERY_S = 60.0  # a listener that keeps failing says so at most this often
_RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})

ProtocolFactory = Callable[[], asyncio.BaseProtocol]


class Loop(uvloop.Loop):
    async def create_server(  # type: ignore[override]
        self,
        protocol_factory: ProtocolFactory,
        host: str | None = None,
        port: int | None = None,
        *,
        family: int = socket.AF_UNSPEC,
        flags: int = socket.AI_PASSIVE,
        sock: socket.socket | None = None,
        backlog: int = 100,
        ssl: Any = None,
        start_serving: bool = True,
        **kwargs: Any,
    ) -> asyncio.AbstractServer:
        if ssl is not None or kwargs.get("reuse_port") or not start_serving or not _tcp(sock):
            # uvloop's stubs type host/port/sock narrower than its create_server accepts
            return await super().create_server(
                protocol_factory, host, port, family=family, flags=flags, sock=sock,  # type: ignore[arg-type]
                backlog=backlog, ssl=ssl, start_serving=start_serving, **kwargs,
            )  # fmt: skip
        sockets = [sock] if sock is not None else await self._bind(host, port, family, flags)
        server = BatchAcceptServer(self, sockets, protocol_factory, backlog)
        server.start()
        return server

    async def _bind(
        self, host: str | None, port: int | None, family: int, flags: int
    ) -> list[socket.socket]:
        """Listening sockets for every address `host` resolves to, as asyncio binds them."""
        infos = await self.getaddrinfo(
            host, port, family=family, type=socket.SOCK_STREAM, flags=flags
        )
        sockets: list[socket.socket] = []
        try:
            for fam, kind, proto, _, address in dict.fromkeys(infos):
                sock = socket.socket(fam, kind, proto)
                sockets.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if fam == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind(address)
        except OSError:
            for sock in sockets:
                sock.close()
            raise
        return sockets


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvicorn's loop factory (`loop="gateway.server.listener:new_event_loop"`)."""
    return Loop()


def _tcp(sock: socket.socket | None) -> bool:
    return sock is None or (
        sock.type == socket.SOCK_STREAM and sock.family in (socket.AF_INET, socket.AF_INET6)
    )


class BatchAcceptServer(asyncio.AbstractServer):
    """Listens on `sockets` (and closes them on close()); accepts up to ACCEPT_BATCH
    connections per readable event. Open connections are the protocol's business:
    close() stops accepting, as asyncio's Server.close() does."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sockets: Iterable[socket.socket],
        protocol_factory: ProtocolFactory,
        backlog: int,
    ) -> None:
        self._loop = loop
        self._sockets = list(sockets)
        self._factory = protocol_factory
        self._backlog = backlog
        self._serving = False
        self._closed = False
        self._handovers: set[asyncio.Task[Any]] = set()  # accepted, not yet a transport
        self._failures = 0  # accept() failures since the last warning
        self._warned_at = -WARN_EVERY_S

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        return tuple(self._sockets)

    def start(self) -> None:
        if self._serving or self._closed:
            return
        for sock in self._sockets:
            sock.setblocking(False)
            sock.listen(self._backlog)
            self._loop.add_reader(sock.fileno(), self._accept, sock)
        self._serving = True

    def _accept(self, sock: socket.socket) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                conn, _ = sock.accept()
            except (BlockingIOError, InterruptedError):
                return  # the queue is empty
            except ConnectionAbortedError:
                continue  # the client left while queued
            except OSError as exc:
                self._pause(sock, exc)
                return
            self._adopt(conn)

    def _adopt(self, conn: socket.socket) -> None:
        conn.setblocking(False)
        task = self._loop.create_task(self._loop.connect_accepted_socket(self._factory, conn))
        self._handovers.add(task)
        task.add_done_callback(self._handed)

    def _handed(self, task: asyncio.Task[Any]) -> None:
        self._handovers.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.warning("could not take an accepted connection: %r", exc)

    def _pause(self, sock: socket.socket, exc: OSError) -> None:
        """Accepting failed (out of descriptors, memory...): stop reading the listening
        socket for PAUSE_S, so the loop does not spin on it, then try again."""
        self._failures += 1
        now = self._loop.time()
        if now - self._warned_at >= WARN_EVERY_S:
            level = logging.WARNING if exc.errno in _RESOURCE_ERRNOS else logging.ERROR
            log.log(
                level,
                "accepting connections failed: %s (%d failures since the last warning;"
                " retrying every %g s)",
                exc,
                self._failures,
                PAUSE_S,
            )
            self._warned_at, self._failures = now, 0
        self._loop.remove_reader(sock.fileno())
        self._loop.call_later(PAUSE_S, self._resume, sock)

    def _resume(self, sock: socket.socket) -> None:
        if self._serving and sock.fileno() != -1:
            self._loop.add_reader(sock.fileno(), self._accept, sock)

    # asyncio.AbstractServer

    def close(self) -> None:
        if self._closed:
            return
        self._closed, self._serving = True, False
        for sock in self._sockets:
            if sock.fileno() != -1:
                self._loop.remove_reader(sock.fileno())
                sock.close()

    async def wait_closed(self) -> None:
        if self._handovers:
            await asyncio.wait(set(self._handovers))

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def is_serving(self) -> bool:
        return self._serving

    async def start_serving(self) -> None:
        self.start()

    async def serve_forever(self) -> None:
        self.start()
        await self._loop.create_future()  # until cancelled, like asyncio's
