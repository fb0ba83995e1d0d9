"""gateway/server/listener.py: the serving loop accepts every queued connection in one loop turn.

libuv (under uvloop) accepts one connection per turn of a loop; a busy gateway turns its
loop every 10-20 ms, so a burst of new connections used to wait in the kernel's queue
for up to a second (bench/README.md, "The c=64 tail"). Real sockets on loopback, a real
uvicorn, the gateway's own HTTP protocol.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
import uvicorn
import uvloop

from gateway.server.limits import HttpLimits, LimitedHttpToolsProtocol
from gateway.server.listener import ACCEPT_BATCH, BatchAcceptServer, Loop
from tests.servers import LOOPBACK, ServerThread, wait_until

LOOP = "gateway.server.listener:new_event_loop"


class Echo(asyncio.Protocol):
    """Answers each read with b"ok"; records the loop turn it was connected in."""

    def __init__(self, turns: list[int], made: list[int], all_made: asyncio.Event | None = None):
        self.turns, self.made, self.all_made = turns, made, all_made

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.made.append(self.turns[0])
        if self.all_made is not None:
            self.all_made.set()

    def data_received(self, data: bytes) -> None:
        self.transport.write(b"ok")  # type: ignore[attr-defined]


def connect_all(port: int, n: int) -> list[socket.socket]:
    """n connections, each with a request sent; the kernel completes them unaccepted."""
    socks = [socket.create_connection((LOOPBACK, port), timeout=10) for _ in range(n)]
    for sock in socks:
        sock.sendall(b"x")
    return socks


def burst_turns(n: int) -> tuple[int, list[int]]:
    """Queue n connections while the loop is blocked, then let it run: how many loop turns
    it took to connect them all, and the answers they got."""

    async def main() -> tuple[int, list[int]]:
        loop = asyncio.get_running_loop()
        turns: list[int] = [0]
        made: list[int] = []
        connected = asyncio.Event()  # set by each connection; checked until all are in

        def tick() -> None:  # counts the loop's turns: call_soon runs it once per turn
            turns[0] += 1
            loop.call_soon(tick)

        server = await loop.create_server(
            lambda: Echo(turns, made, connected), LOOPBACK, 0, backlog=512
        )
        port = server.sockets[0].getsockname()[1]
        queued = threading.Event()
        socks: list[socket.socket] = []

        def clients() -> None:
            socks.extend(connect_all(port, n))
            queued.set()

        threading.Thread(target=clients, daemon=True).start()
        queued.wait(30)  # blocks the loop: every connection waits in the accept queue
        loop.call_soon(tick)
        while len(made) < n:
            connected.clear()
            await asyncio.wait_for(connected.wait(), 30)
        answers = [len(await loop.run_in_executor(None, s.recv, 2)) for s in socks]
        for s in socks:
            s.close()
        server.close()
        return len(set(made)), answers

    loop = Loop()
    try:
        return loop.run_until_complete(main())
    finally:
        loop.close()


def test_a_burst_of_queued_connections_is_connected_in_one_loop_turn() -> None:
    turns, answers = burst_turns(64)
    assert turns == 1
    assert answers == [2] * 64


def test_a_burst_larger_than_a_batch_takes_a_turn_per_batch() -> None:
    turns, answers = burst_turns(ACCEPT_BATCH + 10)
    assert turns == 2  # a flood cannot hold one turn for more than ACCEPT_BATCH accepts
    assert answers == [2] * (ACCEPT_BATCH + 10)


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": scope["path"].encode()})


def gateway_protocol() -> Any:
    limits = HttpLimits(max_header_bytes=16384, header_timeout_s=10.0, max_connections=1000)
    return LimitedHttpToolsProtocol.factory(limits)


def get_all(url: str, n: int) -> list[tuple[int, str]]:
    """n requests at once, each on its own connection."""

    async def main() -> list[tuple[int, str]]:
        limits = httpx.Limits(max_connections=n, max_keepalive_connections=0)
        async with httpx.AsyncClient(limits=limits, timeout=10) as client:
            replies = await asyncio.gather(*(client.get(f"{url}/r{i}") for i in range(n)))
        return [(r.status_code, r.text) for r in replies]

    return asyncio.run(main())


def test_uvicorn_with_a_given_socket_serves_through_the_batch_listener() -> None:
    # the path of `tallygate serve` with several workers: uvicorn hands each the socket
    with ServerThread(app, loop=LOOP, http=gateway_protocol()) as server:
        assert isinstance(server.server.servers[0], BatchAcceptServer)
        replies = get_all(server.url, 40)
    assert replies == [(200, f"/r{i}") for i in range(40)]


@contextmanager
def uvicorn_on_host_and_port() -> Iterator[tuple[uvicorn.Server, int]]:
    """uvicorn binding host and port itself: the path of `tallygate serve`, one worker."""
    config = uvicorn.Config(
        app, host=LOOPBACK, port=0, loop=LOOP, http=gateway_protocol(), log_level="warning"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started, what="uvicorn started")
        yield server, server.servers[0].sockets[0].getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(10)
    assert not thread.is_alive()


def test_uvicorn_binding_host_and_port_serves_through_the_batch_listener_and_closes_it() -> None:
    with uvicorn_on_host_and_port() as (server, port):
        listener = server.servers[0]
        assert isinstance(listener, BatchAcceptServer)
        replies = get_all(f"http://{LOOPBACK}:{port}", 40)
    assert replies == [(200, f"/r{i}") for i in range(40)]
    assert not listener.is_serving()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((LOOPBACK, port), timeout=5)


def test_close_stops_accepting_and_leaves_open_connections_alone() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: Echo([0], []), LOOPBACK, 0)
        port = server.sockets[0].getsockname()[1]
        (kept,) = await loop.run_in_executor(None, connect_all, port, 1)
        assert await loop.run_in_executor(None, kept.recv, 2) == b"ok"
        server.close()
        await server.wait_closed()
        assert not server.is_serving()
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((LOOPBACK, port), timeout=5)
        kept.sendall(b"again")
        assert await loop.run_in_executor(None, kept.recv, 2) == b"ok"
        kept.close()

    loop = Loop()
    try:
        loop.run_until_complete(main())
    finally:
        loop.close()


def test_what_the_batch_listener_does_not_cover_goes_to_uvloops_own_server(tmp_path: Any) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        shared = await loop.create_server(lambda: Echo([0], []), LOOPBACK, 0, reuse_port=True)
        unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        unix.bind(str(tmp_path / "s"))
        on_unix = await loop.create_server(lambda: Echo([0], []), sock=unix)
        for server in (shared, on_unix):
            assert not isinstance(server, BatchAcceptServer)
        port = shared.sockets[0].getsockname()[1]
        (client,) = await loop.run_in_executor(None, connect_all, port, 1)
        assert await loop.run_in_executor(None, client.recv, 2) == b"ok"
        client.close()
        for server in (shared, on_unix):
            server.close()

    loop = Loop()
    try:
        loop.run_until_complete(main())
    finally:
        loop.close()
    assert issubclass(Loop, uvloop.Loop)


# A server in its own process with few file descriptors left: accept() fails with EMFILE.
FD_STARVED_SERVER = """
import asyncio, logging, os, resource, sys
from gateway.server.listener import Loop
logging.basicConfig(level=logging.WARNING, stream=sys.stderr)

class Echo(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport = transport
    def data_received(self, data):
        self.transport.write(b"ok")

async def main():
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Echo, "127.0.0.1", 0, backlog=64)
    open_fds = len(os.listdir("/proc/self/fd"))
    resource.setrlimit(resource.RLIMIT_NOFILE, (open_fds + 4, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    print(server.sockets[0].getsockname()[1], flush=True)
    await asyncio.sleep(60)

loop = Loop()
loop.run_until_complete(main())
"""


def test_out_of_descriptors_it_pauses_accepting_serves_what_is_open_and_recovers() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", FD_STARVED_SERVER],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        socks = connect_all(port, 10)  # more than the server has descriptors for
        for s in socks:
            s.settimeout(0.3)

        def answered() -> list[socket.socket]:
            got = []
            for s in socks:
                try:
                    if s.recv(2) == b"ok":
                        got.append(s)
                except TimeoutError:
                    pass
            return got

        first = answered()
        assert 0 < len(first) < 10  # some served; the rest wait in the queue
        for s in first:  # frees the server's descriptors as it sees them close
            s.close()
            socks.remove(s)
        left = len(socks)
        deadline = time.monotonic() + 20
        done: list[socket.socket] = []
        while len(done) < left and time.monotonic() < deadline:
            for s in answered():
                done.append(s)
                s.close()
                socks.remove(s)
        assert len(done) == left  # accepting resumed once descriptors were free
        assert proc.poll() is None  # and the server never stopped
    finally:
        proc.kill()
        _, err = proc.communicate(timeout=10)
    assert "(1 failures since the last warning; retrying every 0.1 s)" in err
    assert err.count("accepting connections failed") == 1  # at most once a minute
    assert "Too many open files" in err
