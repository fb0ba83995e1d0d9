"""Hostile clients against `python -m gateway serve`, over raw sockets: huge and slow heads,
deep JSON, odd encodings and methods, smuggling-shaped framing, connection floods. Each test
ends with a normal request that still succeeds while the attack runs or right after it."""

from __future__ import annotations

import contextlib
import gzip
import json
import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.fake_upstream import FakeUpstream
from tests.gateway_harness import serve_command
from tests.servers import LOOPBACK, ProcessServer, free_port, run_process_server, wait_until

KEY = "sk-hostile-0000"
MB = 1024 * 1024
CHAT = b'{"model":"demo","messages":[{"role":"user","content":"still here"}]}'


def gateway_config(upstream: FakeUpstream, db: Path, **server: Any) -> dict[str, Any]:
    return {
        "server": server,
        "providers": {
            "demo": {"kind": "mock"},
            "up": {"kind": "openai", "base_url": upstream.base_url, "api_key": "sk-up"},
        },
        "models": {
            "demo": [{"provider": "demo", "model": "gpt-4o-mini"}],
            "up": [{"provider": "up", "model": "gpt-4o-mini"}],
        },
        "teams": {"t": {"keys": [{"name": "k", "key": KEY}]}},
        "store": {"backend": "local", "path": str(db)},
        "telemetry": {"exporter": "none"},
    }


@contextlib.contextmanager
def serving(
    tmp: Path, upstream: FakeUpstream, *args: str, **server: Any
) -> Iterator[ProcessServer]:
    config = tmp / "config.yaml"
    config.write_text(json.dumps(gateway_config(upstream, tmp / "t.db", **server)))
    port = free_port()
    with run_process_server(serve_command(config, port, *args), port, cwd=tmp) as proc:
        yield proc
    assert "Traceback" not in proc.stderr, proc.stderr


@pytest.fixture(scope="module")
def gw(
    tmp_path_factory: pytest.TempPathFactory, _fake_upstream_server: FakeUpstream
) -> Iterator[ProcessServer]:
    """Default limits, but heads must come within 1 s."""
    tmp = tmp_path_factory.mktemp("gw")
    with serving(tmp, _fake_upstream_server, header_timeout_s=1) as proc:
        yield proc


@pytest.fixture(scope="module")
def patient(
    tmp_path_factory: pytest.TempPathFactory, _fake_upstream_server: FakeUpstream
) -> Iterator[ProcessServer]:
    """50 connections at most; heads may take 300 s, so only the cap refuses a flood."""
    tmp = tmp_path_factory.mktemp("patient")
    with serving(tmp, _fake_upstream_server, max_connections=50, header_timeout_s=300) as proc:
        yield proc


# ---- clients --------------------------------------------------------------------------


def still_serves(server: ProcessServer, content: str = "still here") -> None:
    """The normal request every test ends with: the real SDK, a generous timeout."""
    with openai.OpenAI(
        base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=10
    ) as client:
        reply = client.chat.completions.create(
            model="demo", messages=[{"role": "user", "content": content}]
        )
    assert reply.choices[0].message.content == content


def request(
    body: bytes = CHAT,
    *,
    method: bytes = b"POST",
    path: bytes = b"/v1/chat/completions",
    version: bytes = b"HTTP/1.1",
    headers: bytes = b"",
) -> bytes:
    return (
        b"%s %s %s\r\nhost: gw\r\nauthorization: Bearer %s\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\n%s\r\n%s"
        % (method, path, version, KEY.encode(), len(body), headers, body)
    )


def connect(server: ProcessServer, timeout: float = 10) -> socket.socket:
    sock = socket.create_connection((LOOPBACK, server.port), timeout=timeout)
    sock.settimeout(timeout)
    return sock


class Reader:
    """Responses read off one socket (Content-Length framed, as the gateway's answers are)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""

    def fill(self) -> bool:
        data = self.sock.recv(65536)
        self.buffer += data
        return bool(data)

    def response(self) -> tuple[int, dict[str, str], bytes]:
        while b"\r\n\r\n" not in self.buffer:
            assert self.fill(), f"closed before a response: {self.buffer!r}"
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        headers = dict(line.lower().split(": ", 1) for line in lines[1:])
        size = int(headers.get("content-length", "0"))
        while len(self.buffer) < size:
            assert self.fill(), "closed inside a body"
        body, self.buffer = self.buffer[:size], self.buffer[size:]
        return int(lines[0].split()[1]), headers, body

    def closed(self) -> bool:
        """True once the server has closed (EOF or reset) with nothing more to read."""
        try:
            return not self.fill()
        except ConnectionResetError:
            return True


def exchange(server: ProcessServer, data: bytes) -> tuple[int, dict[str, str], Any]:
    with connect(server) as sock:
        sock.sendall(data)
        status, headers, body = Reader(sock).response()
    return status, headers, json.loads(body) if body else None


def assert_error(answer: tuple[int, dict[str, str], Any], status: int, code: str | None) -> None:
    got, headers, body = answer
    assert got == status, body
    assert headers["content-type"] == "application/json"
    assert body["error"]["type"] == "invalid_request_error"
    assert body["error"]["code"] == code
    assert set(body["error"]) == {"message", "type", "param", "code"}


def vm_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def open_fds(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


# ---- headers --------------------------------------------------------------------------


def send_huge_header(server: ProcessServer, size: int) -> tuple[int, bytes]:
    """Start a request whose one header is `size` bytes; stop when the gateway hangs up.
    Returns the bytes sent and whatever answer could still be read."""
    sent, answer = 0, b""
    chunk = b"a" * 65536
    with connect(server) as sock:
        try:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nhost: gw\r\nx-big: ")
            while sent < size:
                sock.sendall(chunk)
                sent += len(chunk)
            answer = sock.recv(4096)
        except OSError:
            with contextlib.suppress(OSError):
                answer = sock.recv(4096)
    return sent, answer


def test_64_mb_headers_are_cut_off_early_memory_stays_bounded_and_others_are_served(
    gw: ProcessServer,
) -> None:
    still_serves(gw)
    baseline = vm_rss_mb(gw.proc.pid)
    peak = [baseline]
    results: list[tuple[int, bytes]] = []
    done = threading.Event()

    def attacker() -> None:
        for _ in range(4):
            results.append(send_huge_header(gw, 64 * MB))

    def sample() -> None:
        while not done.wait(0.02):
            peak[0] = max(peak[0], vm_rss_mb(gw.proc.pid))

    threads = [threading.Thread(target=attacker) for _ in range(6)]
    sampler = threading.Thread(target=sample)
    for t in [*threads, sampler]:
        t.start()
    served = 0
    while any(t.is_alive() for t in threads):  # normal requests while the attack runs
        still_serves(gw, f"served during the attack {served}")
        served += 1
    for t in threads:
        t.join()
    done.set()
    sampler.join()

    assert served >= 1 and len(results) == 24
    for sent, answer in results:
        assert sent < 16 * MB  # hung up on well before 64 MB
        assert answer == b"" or answer.startswith(b"HTTP/1.1 431 "), answer[:100]
    # on main, 6 such requests took RSS from 147 to 632 MB
    assert peak[0] - baseline < 32, (baseline, peak[0])
    still_serves(gw)


def many_headers(total: int) -> bytes:
    """Header lines of 1 KB each (name, ": ", value, CRLF) adding up to `total` bytes."""
    line = 1024
    count, rest = divmod(total, line)
    lines = [b"x-pad-%04d: %s\r\n" % (i, b"v" * (line - 14)) for i in range(count)]
    if rest:
        lines.append(b"x-rest: %s\r\n" % (b"v" * (rest - 10)))
    out = b"".join(lines)
    assert len(out) == total
    return out


def test_a_head_just_under_the_limit_is_served_and_just_over_gets_431(gw: ProcessServer) -> None:
    # our own request line and headers take about 150 bytes of the 64 KB
    status, _, body = exchange(gw, request(headers=many_headers(63 * 1024)))
    assert status == 200 and body["choices"][0]["message"]["content"] == "still here"
    assert_error(
        exchange(gw, request(headers=many_headers(64 * 1024))), 431, "request_header_too_large"
    )
    one_big = b"x-big: %s\r\n" % (b"v" * 70_000)
    assert_error(exchange(gw, request(headers=one_big)), 431, "request_header_too_large")
    long_url = b"/v1/chat/completions?q=" + b"u" * 70_000
    assert_error(exchange(gw, request(path=long_url)), 431, "request_header_too_large")
    still_serves(gw)


def test_a_huge_header_arriving_slowly_is_refused_without_waiting_for_its_end(
    gw: ProcessServer,
) -> None:
    with connect(gw) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nhost: gw\r\nx-big: ")
        sent = 0
        # 64 KB at a time, each read apart: the gateway answers once past the limit
        while not select.select([sock], [], [], 0.2)[0]:
            sock.sendall(b"a" * 65536)
            sent += 1
        assert sent < 10
        status, headers, body = Reader(sock).response()
        assert status == 431 and headers["connection"] == "close"
        assert json.loads(body)["error"]["code"] == "request_header_too_large"
    still_serves(gw)


# ---- slow heads -----------------------------------------------------------------------


def test_a_trickled_head_is_closed_after_header_timeout(gw: ProcessServer) -> None:
    head = b"POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\nx-pad: " + b"p" * 600
    outcome: dict[str, Any] = {}

    def trickle() -> None:  # the whole head would take 30 s at this pace
        with connect(gw) as sock:
            reader = Reader(sock)
            sent = 0
            while sent < len(head):
                readable, _, _ = select.select([sock], [], [], 0.05)
                if readable:
                    break
                try:
                    sock.sendall(head[sent : sent + 1])
                except OSError:
                    break
                sent += 1
            outcome["sent"] = sent
            try:
                reader.fill()
                outcome["answer"] = reader.buffer
            except OSError:
                outcome["answer"] = b""

    t = threading.Thread(target=trickle)
    t.start()
    still_serves(gw, "served while a head trickles in")
    t.join(30)
    assert outcome["sent"] < len(head)  # closed long before the head was complete
    assert outcome["answer"] == b"" or outcome["answer"].startswith(b"HTTP/1.1 408 ")
    still_serves(gw)


def test_a_stalled_head_gets_408_and_a_silent_connection_is_closed(gw: ProcessServer) -> None:
    with connect(gw) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\n")
        reader = Reader(sock)
        status, headers, body = reader.response()
        assert status == 408 and headers["connection"] == "close"
        assert json.loads(body)["error"]["code"] == "request_timeout"
        assert reader.closed()
    with connect(gw) as sock:
        assert Reader(sock).closed()  # never sent a byte: closed, nothing said
    still_serves(gw)


# ---- connection floods ----------------------------------------------------------------


def open_flood(server: ProcessServer, count: int) -> list[socket.socket]:
    """`count` connections opened at once (non-blocking connects, as a flood comes)."""
    flood = []
    for _ in range(count):
        sock = socket.socket()
        sock.setblocking(False)
        sock.connect_ex((LOOPBACK, server.port))
        flood.append(sock)
    poller = select.poll()
    for sock in flood:
        poller.register(sock, select.POLLOUT)
    connecting = {sock.fileno() for sock in flood}
    deadline = time.monotonic() + 30
    while connecting and time.monotonic() < deadline:
        for fd, _ in poller.poll(1000):
            poller.unregister(fd)
            connecting.discard(fd)
    assert not connecting, f"{len(connecting)} connections never completed"
    for sock in flood:
        sock.setblocking(True)
    return flood


def answered(flood: list[socket.socket], quiet_s: float = 3.0) -> list[bytes]:
    """What the gateway sent on each connection it closed: poll until `quiet_s` pass with
    no more, then return one answer (b"" = closed silently) per closed connection."""
    poller = select.poll()
    by_fd = {sock.fileno(): sock for sock in flood}
    for fd in by_fd:
        poller.register(fd, select.POLLIN)
    answers = []
    while events := poller.poll(quiet_s * 1000):
        for fd, _ in events:
            poller.unregister(fd)
            try:
                answers.append(by_fd[fd].recv(4096))
            except ConnectionResetError:
                answers.append(b"")
    return answers


def test_connections_past_the_cap_are_refused_at_once_and_fds_stay_bounded(
    patient: ProcessServer,
) -> None:
    still_serves(patient)
    pid = patient.proc.pid
    wait_until(lambda: open_fds(pid) < 100, within=10, what="the readiness probes to close")
    before = open_fds(pid)
    flood = open_flood(patient, 300)
    try:
        # a refused connection is answered (503) or closed without a word, without
        # having sent anything; the ones held stay open (heads may take 300 s here)
        answers = answered(flood)
        held = len(flood) - len(answers)
        assert 40 <= held <= 50, held
        assert all(a == b"" or a.startswith(b"HTTP/1.1 503 ") for a in answers)
        assert any(a.startswith(b"HTTP/1.1 503 ") for a in answers)
        assert open_fds(pid) <= before + 50 + 10
        # while the cap is full, a new client is refused too, not queued
        with connect(patient) as sock:
            reader = Reader(sock)
            with contextlib.suppress(ConnectionResetError):
                reader.fill()
            assert reader.buffer == b"" or reader.buffer.startswith(b"HTTP/1.1 503 ")
    finally:
        for sock in flood:
            sock.close()
    wait_until(lambda: open_fds(pid) <= before + 5, within=10, what="the flood to be released")
    still_serves(patient)


def test_a_flood_of_heads_that_never_come_is_shed_while_it_lasts(gw: ProcessServer) -> None:
    pid = gw.proc.pid
    wait_until(lambda: open_fds(pid) < 100, within=10, what="earlier connections to close")
    before = open_fds(pid)
    flood = open_flood(gw, 200)
    try:
        # the attacker holds every socket; the gateway drops them after header_timeout_s
        wait_until(lambda: open_fds(pid) <= before + 5, within=15, what="the idle flood to go")
        still_serves(gw, "served while the flood is held open")
    finally:
        for sock in flood:
            sock.close()


# ---- bodies ---------------------------------------------------------------------------


def nested(depth: int, field: str = "metadata", model: str = "demo") -> bytes:
    """A chat body with a `field` whose value nests `depth - 1` arrays (the body is level 1)."""
    inner = b"[" * (depth - 1) + b"]" * (depth - 1)
    head = b'{"model":"%s","messages":[{"role":"user","content":"deep"}],"%s":' % (
        model.encode(),
        field.encode(),
    )
    return head + inner + b"}"


@pytest.mark.parametrize("depth", [65, 500, 1000, 100_000])
def test_json_nested_past_the_limit_gets_400(gw: ProcessServer, depth: int) -> None:
    answer = exchange(gw, request(nested(depth)))
    assert_error(answer, 400, None)
    if depth <= 1000:  # deeper still, the JSON parser itself gives up first
        assert "server.max_json_depth (64)" in answer[2]["error"]["message"]
    chain = b'{"a":' * (depth - 1) + b"1" + b"}" * (depth - 1)
    objects = b'{"model":"demo","messages":[{"role":"user","content":"deep"}],"x":%s}' % chain
    assert_error(exchange(gw, request(objects)), 400, None)
    still_serves(gw)


def test_json_at_the_limit_is_served_counted_and_forwarded_intact(
    gw: ProcessServer, fake_upstream: FakeUpstream
) -> None:
    status, _, body = exchange(gw, request(nested(64, model="up")))
    assert status == 200, body
    sent = fake_upstream.requests[-1].json
    assert sent["metadata"] == json.loads(nested(64))["metadata"]
    # 64 levels through the parts the token counter walks: tools' schemas, content parts
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(55):
        schema = {"type": "array", "items": schema}
    tools = [{"type": "function", "function": {"name": "f", "parameters": schema}}]
    parts: list[Any] = [{"type": "text", "text": "deep parts"}]
    for _ in range(29):  # 2 levels each: 63 in all
        parts = [{"type": "tool_result", "content": parts}]
    opaque = {"type": "custom", "x": json.loads(b"[" * 59 + b"]" * 59)}  # down to level 64
    parts.append(opaque)
    for body_obj in (
        {"model": "up", "messages": [{"role": "user", "content": "t"}], "tools": tools},
        {"model": "demo", "messages": [{"role": "user", "content": parts}]},
    ):
        status, _, answer = exchange(gw, request(json.dumps(body_obj).encode()))
        assert status == 200, answer
    still_serves(gw)


def test_bodies_in_other_encodings_get_400_never_500(gw: ProcessServer) -> None:
    bad_utf8 = b'{"model":"demo","messages":[{"role":"user","content":"\xff\xfe"}]}'
    utf16 = CHAT.decode().encode("utf-16")
    gzipped = gzip.compress(CHAT)
    for body, extra in (
        (bad_utf8, b""),
        (utf16, b""),
        (gzipped, b"content-encoding: gzip\r\n"),
        (b"\x00" * 64, b""),
        (b"", b""),
    ):
        assert_error(exchange(gw, request(body, headers=extra)), 400, None)
    # the content type is not checked: a JSON body is read as JSON whatever it is labelled
    text_plain = request().replace(b"application/json", b"text/plain")
    assert exchange(gw, text_plain)[0] == 200
    # header bytes outside ASCII are carried, not decoded; a bad key is still a bad key
    assert exchange(gw, request(headers=b"x-note: caf\xe9 \xff\r\n"))[0] == 200
    bad_key = request().replace(KEY.encode(), b"sk-\xff\xfe")
    assert exchange(gw, bad_key)[0] == 401
    status, _, _ = exchange(gw, request(path=b"/v1/chat/%ff%fe"))
    assert status == 404
    still_serves(gw)


# ---- methods and framing ---------------------------------------------------------------


@pytest.mark.parametrize("method", [b"PUT", b"DELETE", b"TRACE", b"PATCH", b"OPTIONS", b"GET"])
def test_other_methods_get_405_in_openai_shape(gw: ProcessServer, method: bytes) -> None:
    assert_error(exchange(gw, request(method=method)), 405, "method_not_allowed")
    still_serves(gw)


def test_http_1_0_is_answered_and_closed(gw: ProcessServer) -> None:
    with connect(gw) as sock:
        sock.sendall(request(version=b"HTTP/1.0"))
        reader = Reader(sock)
        status, _, body = reader.response()
        assert status == 200 and json.loads(body)["choices"][0]["message"]["content"]
        assert reader.closed()
    still_serves(gw)


def test_pipelined_requests_are_answered_in_order(gw: ProcessServer) -> None:
    words = ["one", "two", "three"]
    bodies = [
        b'{"model":"demo","messages":[{"role":"user","content":"%s"}]}' % w.encode() for w in words
    ]
    with connect(gw) as sock:
        sock.sendall(b"".join(request(b) for b in bodies))
        reader = Reader(sock)
        replies = [reader.response() for _ in words]
    assert [s for s, _, _ in replies] == [200, 200, 200]
    assert [json.loads(b)["choices"][0]["message"]["content"] for _, _, b in replies] == words
    still_serves(gw)


@pytest.mark.parametrize(
    "framing",
    [
        b"content-length: 5\r\n",  # a second, different Content-Length
        b"transfer-encoding: chunked\r\n",  # both framings at once
        b"x-null: a\x00b\r\n",  # a NUL inside a header value
        b"bad header: x\r\n",  # a space inside a header name
    ],
)
def test_ambiguous_framing_is_refused_by_the_parser(gw: ProcessServer, framing: bytes) -> None:
    with connect(gw) as sock:
        sock.sendall(request(headers=framing))
        reader = Reader(sock)
        status, headers, _ = reader.response()
        assert status == 400 and headers["connection"] == "close"
        assert reader.closed()
    still_serves(gw)


def test_a_chunked_body_is_read(gw: ProcessServer) -> None:
    head = request(b"").replace(b"content-length: 0\r\n", b"transfer-encoding: chunked\r\n")
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in (CHAT[:10], CHAT[10:]))
    with connect(gw) as sock:
        sock.sendall(head + chunks + b"0\r\n\r\n")
        status, _, body = Reader(sock).response()
    assert status == 200 and json.loads(body)["choices"][0]["message"]["content"] == "still here"
    still_serves(gw)


# ---- several workers ------------------------------------------------------------------


def test_each_worker_applies_the_configured_limits(
    tmp_path: Path, _fake_upstream_server: FakeUpstream
) -> None:
    limits = {"max_json_depth": 128, "max_header_kb": 8}
    with serving(tmp_path, _fake_upstream_server, "--workers", "2", **limits) as proc:
        # a new connection each time: both workers answer some
        for _ in range(6):
            assert_error(
                exchange(proc, request(headers=many_headers(9 * 1024))),
                431,
                "request_header_too_large",
            )
            assert exchange(proc, request(headers=many_headers(7 * 1024)))[0] == 200
        # the highest allowed depth survives re-encoding for the upstream
        status, _, body = exchange(proc, request(nested(128, model="up")))
        assert status == 200, body
        answer = exchange(proc, request(nested(129, model="up")))
        assert_error(answer, 400, None)
        assert "(128)" in answer[2]["error"]["message"]
        still_serves(proc)


# ---- the pieces, directly ---------------------------------------------------------------


def test_json_depth_counts_objects_and_arrays_alike_and_stops_at_the_limit() -> None:
    from gateway.errors import InvalidRequest
    from gateway.server.limits import check_json_depth

    for shallow in ("text", 3, None, [], {}, {"a": [1, {"b": "c"}]}):
        check_json_depth(shallow, 3)
    mixed: Any = "leaf"
    for level in range(10):
        mixed = [mixed] if level % 2 else {"k": mixed, "s": "x"}
    check_json_depth(mixed, 10)
    with pytest.raises(InvalidRequest) as info:
        check_json_depth(mixed, 9)
    assert "server.max_json_depth (9)" in info.value.message and info.value.param is None
    wide = {"messages": [{"role": "user", "content": [{"type": "text"}]}] * 1000}
    check_json_depth(wide, 5)
    with pytest.raises(InvalidRequest):
        check_json_depth(wide, 4)


def test_the_connection_cap_fits_under_the_open_file_limit() -> None:
    # in a child process: it lowers its own hard limit, which cannot be raised back
    script = (
        "import resource, sys\n"
        "from gateway.server.limits import fit_to_fd_limit\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (1000, 3000))\n"
        "raised = fit_to_fd_limit(2000, 500)\n"
        "soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]\n"
        "lowered = fit_to_fd_limit(10000, 500)\n"
        "print(raised, soft, lowered)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    # soft limit raised to fit 2000 + 500; with the hard limit at 3000, 10000 cannot fit
    assert done.stdout.split() == ["2000", "2500", "2500"]
    assert "server.max_connections lowered from 10000 to 2500" in done.stderr
