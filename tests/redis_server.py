"""A real redis-server on a free loopback port (no persistence), for tests and the bench;
and a real 3-master Redis Cluster of them (``RedisCluster``).

Tests import the ``redis_server`` and ``redis_cluster`` fixtures from here (session-scoped).
Without a ``redis-server`` (or, for the cluster, ``redis-cli``) binary the fixtures fail
with a clear message, because CI installs them; set ``TALLYGATE_TESTS_NO_REDIS=1`` to skip
the Redis tests instead.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Self

import pytest

LOOPBACK = "127.0.0.1"
SKIP_ENV = "TALLYGATE_TESTS_NO_REDIS"


def redis_server_binary() -> str | None:
    return _binary("redis-server")


def redis_cli_binary() -> str | None:
    return _binary("redis-cli")


def _binary(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    return f"/usr/bin/{name}" if os.access(f"/usr/bin/{name}", os.X_OK) else None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """``redis-server --save "" --appendonly no`` in a temp dir; start() waits for PING.

    ``extra``: more redis-server arguments (the cluster's); ``port``: a fixed port instead
    of a free one (the cluster's, whose bus port is port + 10000).
    """

    def __init__(
        self, binary: str | None = None, *, extra: tuple[str, ...] = (), port: int = 0
    ) -> None:
        self.binary = binary or redis_server_binary() or "redis-server"
        self.port = port
        self._fixed_port = port
        self._extra = extra
        self._proc: subprocess.Popen[bytes] | None = None
        self._dir: tempfile.TemporaryDirectory[str] | None = None
        self._paused = False

    @property
    def url(self) -> str:
        return f"redis://{LOOPBACK}:{self.port}/0"

    @property
    def dir(self) -> Path:
        assert self._dir is not None, "not started"
        return Path(self._dir.name)

    def start(self, within: float = 10.0) -> Self:
        self._dir = tempfile.TemporaryDirectory(prefix="tallygate-redis-")
        last_error = ""
        for _ in range(1 if self._fixed_port else 3):  # a free port may be taken meanwhile
            last_error = self._spawn(self._fixed_port or _free_port(), within)
            if not last_error:
                return self
        self._cleanup_dir()
        raise RuntimeError(f"redis-server did not start; its log ends with:\n{last_error}")

    def restart(self, *, keep_data: bool) -> None:
        """down() then up(): clients' connections to the old process are dead."""
        self.down(keep_data=keep_data)
        self.up()

    def down(self, *, keep_data: bool) -> None:
        """Stop the process, keeping its port and directory for up(). keep_data: SAVE
        first, so up() loads the data back (a restart with persistence); else up() starts
        empty (a restart without)."""
        if keep_data and self.command("SAVE") != b"+OK":
            raise RuntimeError("SAVE failed")
        self._kill()
        if not keep_data:
            (self.dir / "dump.rdb").unlink(missing_ok=True)

    def up(self, within: float = 10.0) -> None:
        """Start again on the same port and directory after down()."""
        last_error = self._spawn(self.port, within)
        if last_error:
            raise RuntimeError(f"redis-server did not restart; its log ends with:\n{last_error}")

    def stop(self) -> None:
        self._kill()
        self._cleanup_dir()

    def _spawn(self, port: int, within: float) -> str:
        """Start redis-server on ``port``; "" once it answers PING, else its log's end."""
        self.port = port
        log = self.dir / "redis.log"
        self._proc = subprocess.Popen(
            [self.binary, "--port", str(port), "--bind", LOOPBACK,
             "--save", "", "--appendonly", "no", "--dir", str(self.dir),
             "--daemonize", "no", "--logfile", str(log), *self._extra],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + within
        while self._proc.poll() is None and time.monotonic() < deadline:
            if self._answers_ping():
                return ""
            time.sleep(0.02)
        self._kill()
        return (log.read_text(errors="replace")[-2000:] if log.exists() else "") or "no log"

    def pause(self) -> None:
        """SIGSTOP: the port still accepts connections but nothing answers (a hung server)."""
        if self._proc is not None:
            self._proc.send_signal(signal.SIGSTOP)
            self._paused = True

    def resume(self) -> None:
        if self._proc is not None and self._paused:
            self._proc.send_signal(signal.SIGCONT)
            self._paused = False

    def command(self, *args: str) -> bytes:
        """Send one command over a raw socket; return the first line of the reply."""
        return self._exchange(args)

    def _exchange(self, args: tuple[str, ...], whole_bulk: bool = False) -> bytes:
        payload = f"*{len(args)}\r\n".encode()
        for arg in args:
            data = arg.encode()
            payload += b"$%d\r\n%s\r\n" % (len(data), data)
        with socket.create_connection((LOOPBACK, self.port), timeout=5) as sock:
            sock.sendall(payload)
            reply = b""
            while b"\r\n" not in reply or (whole_bulk and not _bulk_complete(reply)):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                reply += chunk
        head, _, body = reply.partition(b"\r\n")
        if whole_bulk and head.startswith(b"$") and head != b"$-1":
            return body[: int(head[1:])]
        return head

    def reply(self, *args: str) -> bytes:
        """Send one command; return a bulk string reply whole (e.g. CLUSTER INFO), any other
        reply's first line."""
        return self._exchange(args, whole_bulk=True)

    def flushall(self) -> None:
        if self.command("FLUSHALL") != b"+OK":
            raise RuntimeError("FLUSHALL failed")

    def _answers_ping(self) -> bool:
        try:
            return self.command("PING") == b"+PONG"
        except OSError:
            return False

    def _kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if self._paused:
            proc.send_signal(signal.SIGCONT)
            self._paused = False
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def _cleanup_dir(self) -> None:
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _bulk_complete(reply: bytes) -> bool:
    """Whether a reply that has its first line holds all of it (a bulk string's body too)."""
    head, _, body = reply.partition(b"\r\n")
    if not head.startswith(b"$") or head == b"$-1":
        return True
    return len(body) >= int(head[1:]) + 2


def _free_cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free too."""
    while True:
        port = random.randrange(20000, 45000)
        try:
            for candidate in (port, port + 10000):
                with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                    sock.bind((LOOPBACK, candidate))
        except OSError:
            continue
        return port


class RedisCluster:
    """A real Redis Cluster: three masters (``cluster-enabled yes``, no persistence, each in
    its temp dir with its ``nodes.conf``), joined by ``redis-cli --cluster create
    --cluster-replicas 0``; start() waits until every node says ``cluster_state:ok``."""

    MASTERS = 3

    def __init__(self, binary: str | None = None, cli: str | None = None) -> None:
        self.binary = binary or redis_server_binary() or "redis-server"
        self.cli = cli or redis_cli_binary() or "redis-cli"
        self.nodes: list[RedisServer] = []

    @property
    def url(self) -> str:
        """One node's URL: the cluster client finds the others."""
        return self.nodes[0].url

    def start(self, within: float = 60.0) -> Self:
        last_error: Exception | None = None
        for _ in range(3):  # a probed port may be taken meanwhile
            try:
                self._start_nodes()
                self._create(within)
                return self
            except (RuntimeError, subprocess.SubprocessError) as exc:
                last_error = exc
                self.stop()
        raise RuntimeError(f"the Redis Cluster did not start: {last_error}")

    def restart_node(self, index: int, *, keep_data: bool, within: float = 30.0) -> None:
        """Restart one master on its port (it keeps its slots: nodes.conf stays); wait for
        the cluster to be ok again."""
        self.nodes[index].restart(keep_data=keep_data)
        self._wait_ok(within)

    def flushall(self) -> None:
        for node in self.nodes:
            node.flushall()

    def stop(self) -> None:
        nodes, self.nodes = self.nodes, []
        for node in nodes:
            node.stop()

    def _start_nodes(self) -> None:
        extra = ("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                 "--cluster-node-timeout", "5000")  # fmt: skip
        for _ in range(self.MASTERS):
            node = RedisServer(self.binary, extra=extra, port=_free_cluster_port())
            self.nodes.append(node.start())

    def _create(self, within: float) -> None:
        addresses = [f"{LOOPBACK}:{node.port}" for node in self.nodes]
        done = subprocess.run(
            [self.cli, "--cluster", "create", *addresses,
             "--cluster-replicas", "0", "--cluster-yes"],
            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=within,
        )  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed:\n{done.stdout}{done.stderr}")
        self._wait_ok(within)

    def _wait_ok(self, within: float) -> None:
        deadline = time.monotonic() + within
        while not all(b"cluster_state:ok" in n.reply("CLUSTER", "INFO") for n in self.nodes):
            if time.monotonic() > deadline:
                raise RuntimeError(f"cluster_state is not ok after {within}s")
            time.sleep(0.05)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def require_redis_server() -> str:
    """The redis-server binary; skips when TALLYGATE_TESTS_NO_REDIS=1, else fails without one."""
    if os.environ.get(SKIP_ENV) == "1":
        pytest.skip(f"{SKIP_ENV}=1: Redis store tests skipped")
    binary = redis_server_binary()
    if binary is None:
        pytest.fail(
            "redis-server is not installed, so the Redis store tests cannot run. Install it "
            f"(apt-get install redis-server) or set {SKIP_ENV}=1 to skip them.",
            pytrace=False,
        )
    return binary


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One redis-server for the test session; tests flush it themselves."""
    with RedisServer(require_redis_server()) as server:
        yield server


def require_redis_cli() -> str:
    """redis-cli (it creates the cluster); skips or fails like require_redis_server."""
    require_redis_server()
    cli = redis_cli_binary()
    if cli is None:
        pytest.fail(
            "redis-cli is not installed, so the Redis Cluster tests cannot run. Install it "
            f"(apt-get install redis-tools) or set {SKIP_ENV}=1 to skip them.",
            pytrace=False,
        )
    return cli


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisCluster]:
    """One 3-master Redis Cluster for the test session; tests flush it themselves."""
    cli = require_redis_cli()
    with RedisCluster(require_redis_server(), cli) as cluster:
        yield cluster
