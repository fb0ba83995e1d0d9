"""Real servers on loopback for tests: an ASGI app under uvicorn in a thread, or a subprocess."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import IO, Any, Self

import httpx
import uvicorn

LOOPBACK = "127.0.0.1"


def free_port(host: str = LOOPBACK) -> int:
    """A port that was free a moment ago (for subprocesses; in-process servers bind port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def wait_until(predicate: Callable[[], bool], *, within: float = 5.0, what: str = "") -> None:
    """Poll `predicate` until true; AssertionError after `within` seconds."""
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what or predicate}")
        time.sleep(0.01)


async def async_wait_until(
    predicate: Callable[[], bool], *, within: float = 5.0, what: str = ""
) -> None:
    """`wait_until` for async tests: yields to the loop while polling."""
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what or predicate}")
        await asyncio.sleep(0.01)


class ServerThread:
    """An ASGI app served by a real uvicorn.Server on its own event loop in a daemon thread.

    The listening socket is bound before the thread starts (port 0 = ephemeral), so there
    is no port race. Use as a context manager, or call start() / stop(). On stop, requests
    still running after 2 s (`timeout_graceful_shutdown`) are cancelled; the thread is
    joined, with `force_exit` after `shutdown_timeout`. Extra keyword arguments go to
    uvicorn.Config. `loop` is the server's event loop once started.
    """

    def __init__(
        self,
        app: Callable[..., Awaitable[None]],
        *,
        host: str = LOOPBACK,
        port: int = 0,
        startup_timeout: float = 10.0,
        shutdown_timeout: float = 5.0,
        **config: Any,
    ) -> None:
        options: dict[str, Any] = {
            "loop": "asyncio",
            "lifespan": "on",
            "log_level": "warning",
            "access_log": False,
            "timeout_graceful_shutdown": 2.0,  # then uvicorn cancels in-flight requests
        }
        options.update(config)
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, **options))
        self.host = host
        self.loop: asyncio.AbstractEventLoop | None = None
        self._requested_port = port
        self._startup_timeout = startup_timeout
        self._shutdown_timeout = shutdown_timeout
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    @property
    def port(self) -> int:
        if self._sock is None:
            raise RuntimeError("server not started")
        return int(self._sock.getsockname()[1])

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> Self:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self._requested_port))
        sock.listen(128)
        sock.set_inheritable(True)
        self._sock = sock
        self._thread = threading.Thread(target=self._run, name=f"uvicorn:{self.port}", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + self._startup_timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"server failed to start: {self._error!r}") from self._error
            time.sleep(0.005)
        return self

    def _run(self) -> None:
        try:
            with asyncio.Runner(loop_factory=self.server.config.get_loop_factory()) as runner:
                runner.run(self._serve())
        except BaseException as exc:  # reported by start() / stop()
            self._error = exc

    async def _serve(self) -> None:
        self.loop = asyncio.get_running_loop()
        assert self._sock is not None
        await self.server.serve(sockets=[self._sock])

    def stop(self) -> None:
        """Ask uvicorn to exit, force it after `shutdown_timeout`, join the thread."""
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(self._shutdown_timeout)
            if self._thread.is_alive():
                self.server.force_exit = True
                self._thread.join(self._shutdown_timeout)
            if self._thread.is_alive():
                raise RuntimeError(f"server thread {self._thread.name} did not exit")
            self._thread = None
        if self._sock is not None:
            self._sock.close()  # uvicorn closes it too; closing twice is harmless

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


@contextlib.contextmanager
def run_server(
    app: Callable[..., Awaitable[None]], *, host: str = LOOPBACK, port: int = 0, **config: Any
) -> Iterator[ServerThread]:
    """`with run_server(app) as server:` -> a started ServerThread (`server.url`)."""
    with ServerThread(app, host=host, port=port, **config) as server:
        yield server


@dataclass
class ProcessServer:
    """A running subprocess server; `stdout` / `stderr` are filled in when it has exited."""

    proc: subprocess.Popen[bytes]
    port: int
    url: str
    stdout: str = ""
    stderr: str = ""
    returncode: int | None = None
    _files: list[IO[bytes]] = field(default_factory=list, repr=False)


def _read(file: IO[bytes]) -> str:
    file.flush()
    file.seek(0)
    return file.read().decode(errors="replace")


@contextlib.contextmanager
def run_process_server(
    cmd: list[str],
    port: int,
    env: Mapping[str, str] | None = None,
    ready_url: str | None = None,
    *,
    timeout: float = 20.0,
    cwd: str | os.PathLike[str] | None = None,
) -> Iterator[ProcessServer]:
    """Start `cmd`, poll `ready_url` (default `http://127.0.0.1:{port}/healthz`) until 200.

    `env` is laid over os.environ. On exit: SIGTERM, then SIGKILL after 10 s; the yielded
    ProcessServer then holds `stdout`, `stderr` and `returncode`.
    """
    url = f"http://{LOOPBACK}:{port}"
    ready_url = ready_url or f"{url}/healthz"
    out, err = tempfile.TemporaryFile(), tempfile.TemporaryFile()
    proc = subprocess.Popen(
        cmd,
        stdout=out,
        stderr=err,
        stdin=subprocess.DEVNULL,
        cwd=cwd,
        env={**os.environ, **(env or {})},
    )
    server = ProcessServer(proc=proc, port=port, url=url, _files=[out, err])
    try:
        _wait_ready(server, ready_url, timeout)
        yield server
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        server.returncode = proc.returncode
        server.stdout, server.stderr = _read(out), _read(err)
        out.close()
        err.close()


def _wait_ready(server: ProcessServer, ready_url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last = "no attempt"
    with httpx.Client(timeout=1.0) as client:
        while time.monotonic() < deadline:
            if server.proc.poll() is not None:
                raise RuntimeError(
                    f"{server.proc.args} exited with {server.proc.returncode} before ready;"
                    f" stderr:\n{_read(server._files[1])}"
                )
            try:
                response = client.get(ready_url)
                if response.status_code == 200:
                    return
                last = f"HTTP {response.status_code}"
            except httpx.TransportError as exc:
                last = repr(exc)
            time.sleep(0.05)
    raise RuntimeError(
        f"{server.proc.args} not ready at {ready_url} after {timeout}s ({last});"
        f" stderr:\n{_read(server._files[1])}"
    )
