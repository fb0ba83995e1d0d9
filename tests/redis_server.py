"""A real redis-server on a free loopback port (no persistence), for tests and the bench.

Tests import the ``redis_server`` fixture from here (session-scoped). Without a
``redis-server`` binary the fixture fails with a clear message, because CI installs one;
set ``TALLYGATE_TESTS_NO_REDIS=1`` to skip the Redis tests instead.
"""

from __future__ import annotations

import os
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
    found = shutil.which("redis-server")
    if found:
        return found
    return "/usr/bin/redis-server" if os.access("/usr/bin/redis-server", os.X_OK) else None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """``redis-server --save "" --appendonly no`` in a temp dir; start() waits for PING."""

    def __init__(self, binary: str | None = None) -> None:
        self.binary = binary or redis_server_binary() or "redis-server"
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._dir: tempfile.TemporaryDirectory[str] | None = None
        self._paused = False

    @property
    def url(self) -> str:
        return f"redis://{LOOPBACK}:{self.port}/0"

    def start(self, within: float = 10.0) -> Self:
        self._dir = tempfile.TemporaryDirectory(prefix="tallygate-redis-")
        last_error = ""
        for _ in range(3):  # the free port may be taken between probing and binding
            self.port = _free_port()
            log = Path(self._dir.name) / "redis.log"
            self._proc = subprocess.Popen(
                [self.binary, "--port", str(self.port), "--bind", LOOPBACK,
                 "--save", "", "--appendonly", "no", "--dir", self._dir.name,
                 "--daemonize", "no", "--logfile", str(log)],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            deadline = time.monotonic() + within
            while self._proc.poll() is None and time.monotonic() < deadline:
                if self._answers_ping():
                    return self
                time.sleep(0.02)
            last_error = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            self._kill()
        self._cleanup_dir()
        raise RuntimeError(f"redis-server did not start; its log ends with:\n{last_error}")

    def stop(self) -> None:
        self._kill()
        self._cleanup_dir()

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
        payload = f"*{len(args)}\r\n".encode()
        for arg in args:
            data = arg.encode()
            payload += b"$%d\r\n%s\r\n" % (len(data), data)
        with socket.create_connection((LOOPBACK, self.port), timeout=5) as sock:
            sock.sendall(payload)
            reply = b""
            while not reply.endswith(b"\r\n"):
                chunk = sock.recv(4096)
                if not chunk:
                    break
                reply += chunk
        return reply.split(b"\r\n", 1)[0]

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
