"""FakeUpstream: a scripted OpenAI-compatible provider on loopback, our double of the outside world.

Unscripted, it answers like OpenAI (chat echoes the last user message, usage is counted in
whitespace-separated words). `enqueue(...)` scripts the next responses: `Reply`, `Stream`,
`Hang`, `Close`. It records every request and counts clients that left mid-response.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import struct
import threading
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Self

from tests.servers import ServerThread

CREATED = 1_700_000_000  # the `created` timestamp of every default object
CHAT_PROMPT_OVERHEAD = 7  # chat prompt_tokens = words in all messages + this
EMBEDDING_DIMS = 8

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


# ---- script steps ---------------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    """One plain HTTP response, sent after `delay_s`.

    `json` is sent as application/json, or `body` as is (text/plain unless `headers` say
    otherwise). With neither: an OpenAI error body if status >= 400, else the default
    answer for the request with this status and extra headers (`Reply(delay_s=2)` = slow).
    """

    status: int = 200
    json: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0
    body: bytes | str | None = None


@dataclass(frozen=True)
class Stream:
    """An SSE response: each chunk (dict -> `data: <json>\\n\\n`, str -> written verbatim),
    `delay_s` between chunks, then a `choices: []` chunk carrying `usage` if given, then
    `data: [DONE]` if `done`. `drop_after=N`: close the connection right after N chunks
    (no usage, no [DONE]; the client sees an incomplete chunked body). `gate`: each chunk
    after the first waits for one `FakeUpstream.release()`; usage and [DONE] are not gated.
    """

    chunks: Sequence[dict[str, Any] | str]
    delay_s: float = 0.0
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    usage: dict[str, Any] | None = None
    drop_after: int | None = None
    gate: bool = False
    done: bool = True


@dataclass(frozen=True)
class Hang:
    """Read the request, send nothing for `seconds` (ends early if the client leaves, which
    counts in `disconnects`), then give the default answer."""

    seconds: float


@dataclass(frozen=True)
class Close:
    """Drop the connection without sending any response."""


Step = Reply | Stream | Hang | Close


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    query: str
    headers: dict[str, str]  # lowercase names; a repeated header keeps its last value
    body: bytes
    json: Any  # the parsed body; None if empty or not JSON


# ---- OpenAI-shaped builders -----------------------------------------------------------


def error_json(
    message: str, *, type: str = "server_error", code: str | None = None
) -> dict[str, Any]:
    """An OpenAI error body."""
    return {"error": {"message": message, "type": type, "param": None, "code": code}}


def error_reply(status: int, message: str | None = None, *, code: str | None = None) -> Reply:
    """A Reply with an OpenAI error body; type server_error for 5xx, else invalid_request_error."""
    kind = "server_error" if status >= 500 else "invalid_request_error"
    return Reply(
        status, error_json(message or f"fake upstream: HTTP {status}", type=kind, code=code)
    )


def _obj(kind: str, id: str, model: Any, choices: list[Any], **extra: Any) -> dict[str, Any]:
    return dict(id=id, object=kind, created=CREATED, model=model, choices=choices, **extra)


def chat_chunk(
    content: str | None = None,
    *,
    role: str | None = None,
    finish_reason: str | None = None,
    model: str = "fake-model",
    id: str = "chatcmpl-fake",
    **delta: Any,
) -> dict[str, Any]:
    """A chat.completion.chunk; extra keywords go into the delta (e.g. tool_calls=[...])."""
    delta = {**({"role": role} if role else {}), **delta}
    if content is not None:
        delta["content"] = content
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
    return _obj("chat.completion.chunk", id, model, [choice])


def chat_stream(
    text: str,
    *,
    model: str = "fake-model",
    id: str = "chatcmpl-fake",
    finish_reason: str = "stop",
    **stream: Any,
) -> Stream:
    """A Stream of a chat answer as OpenAI sends it: a role chunk, one chunk per word
    (joined they give `text`'s words), a finish chunk. `stream` = other Stream fields."""
    pieces = [w if i == 0 else " " + w for i, w in enumerate(text.split())]
    chunks = [chat_chunk("", role="assistant", model=model, id=id)]
    chunks += [chat_chunk(piece, model=model, id=id) for piece in pieces]
    chunks.append(chat_chunk(finish_reason=finish_reason, model=model, id=id))
    return Stream(chunks, **stream)


def usage_json(prompt_tokens: int, completion_tokens: int = 0) -> dict[str, int]:
    total = prompt_tokens + completion_tokens
    return dict(
        prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, total_tokens=total
    )


def count_words(value: Any) -> int:
    """Words in a string, a content-parts list, or a token list (one per token)."""
    if isinstance(value, str):
        return len(value.split())
    if isinstance(value, dict):
        return count_words(value.get("text", ""))
    if isinstance(value, list):
        return sum(1 if isinstance(item, int) else count_words(item) for item in value)
    return 0


def fake_embedding(item: Any) -> list[float]:
    """The deterministic vector the fake returns for one input (string or token list).
    Multiples of 1/128, so they survive base64 float32 encoding exactly."""
    digest = hashlib.sha256(json.dumps(item).encode()).digest()
    return [(b - 128) / 128 for b in digest[:EMBEDDING_DIMS]]


def _text(content: Any) -> str:
    if isinstance(content, list):
        return " ".join(p.get("text", "") for p in content if isinstance(p, dict))
    return content if isinstance(content, str) else ""


def _include_usage(body: dict[str, Any]) -> bool:
    options = body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


def _answer_words(text: str, body: dict[str, Any]) -> tuple[list[str], str]:
    """The words of `text`, cut to max_(completion_)tokens; and the finish reason."""
    words, limit = text.split(), body.get("max_completion_tokens") or body.get("max_tokens")
    if isinstance(limit, int) and len(words) > limit:
        return words[:limit], "length"
    return words, "stop"


def chat_answer(body: dict[str, Any], number: int = 1) -> Reply | Stream:
    """The default answer to a chat completion request: the last user message echoed."""
    messages = [m for m in body.get("messages") or [] if isinstance(m, dict)]
    user = [m for m in messages if m.get("role") == "user"]
    words, finish = _answer_words(_text(user[-1].get("content")) if user else "", body)
    prompt = sum(count_words(m.get("content")) for m in messages) + CHAT_PROMPT_OVERHEAD
    n = body.get("n") if isinstance(body.get("n"), int) and body["n"] > 0 else 1
    model, id = body.get("model"), f"chatcmpl-fake-{number}"
    usage = usage_json(prompt, len(words) * n)  # as OpenAI: every choice is billed
    if not body.get("stream"):
        message = {"role": "assistant", "content": " ".join(words), "refusal": None}
        choices = [
            {"index": i, "message": message, "logprobs": None, "finish_reason": finish}
            for i in range(n)
        ]
        return Reply(json=_obj("chat.completion", id, model, choices, usage=usage))
    stream = chat_stream(" ".join(words), model=model, id=id, finish_reason=finish)
    if n > 1:
        stream = replace(stream, chunks=[
            {**c, "choices": [{**c["choices"][0], "index": i}]}
            for c in stream.chunks for i in range(n)
        ])  # fmt: skip
    if not _include_usage(body):
        return stream
    for chunk in stream.chunks:  # as OpenAI does when usage is requested
        chunk["usage"] = None  # type: ignore[index]
    return replace(stream, usage=usage)


def completion_answer(body: dict[str, Any], number: int = 1) -> Reply | Stream:
    """The default answer to a legacy completion request: the prompt echoed."""
    prompt = body.get("prompt")
    texts = [prompt] if isinstance(prompt, str) else prompt if isinstance(prompt, list) else []
    words, finish = _answer_words(" ".join(t for t in texts if isinstance(t, str)), body)
    usage = usage_json(count_words(prompt), len(words))
    model, id = body.get("model"), f"cmpl-fake-{number}"

    def obj(text: str, finish_reason: str | None, **extra: Any) -> dict[str, Any]:
        choice = {"text": text, "index": 0, "logprobs": None, "finish_reason": finish_reason}
        return _obj("text_completion", id, model, [choice], **extra)

    if not body.get("stream"):
        return Reply(json=obj(" ".join(words), finish, usage=usage))
    chunks = [obj(w if i == 0 else " " + w, None) for i, w in enumerate(words)]
    chunks.append(obj("", finish))
    return Stream(chunks, usage=usage if _include_usage(body) else None)


def embeddings_answer(body: dict[str, Any]) -> Reply:
    """The default answer to an embeddings request: `fake_embedding` per input."""
    raw = body.get("input")
    tokens = isinstance(raw, list) and all(isinstance(t, int) for t in raw)
    items = [raw] if isinstance(raw, str) or tokens else raw if isinstance(raw, list) else []
    b64 = body.get("encoding_format") == "base64"

    def vector(item: Any) -> list[float] | str:
        values = fake_embedding(item)
        return (
            base64.b64encode(struct.pack(f"<{len(values)}f", *values)).decode() if b64 else values
        )

    data = [
        {"object": "embedding", "index": i, "embedding": vector(x)} for i, x in enumerate(items)
    ]
    usage = {"prompt_tokens": count_words(raw), "total_tokens": count_words(raw)}
    return Reply(json={"object": "list", "data": data, "model": body.get("model"), "usage": usage})


# ---- the ASGI app ---------------------------------------------------------------------


class FakeUpstream:
    """The ASGI app. Thread-safe to script and read from the test's thread."""

    def __init__(
        self,
        *,
        models: Sequence[str] = ("fake-model",),
        answer: Callable[[RecordedRequest, int], Reply | Stream | None] | None = None,
    ) -> None:
        self.models = tuple(models)
        # answers a request the script has no step for (None: the default answer below)
        self.answer = answer
        self.requests: list[RecordedRequest] = []
        self.disconnects = 0  # responses whose client left before the end
        self.sent_chunks = 0  # Stream chunks sent (not counting usage / [DONE])
        self._lock = threading.Lock()
        self._queue: deque[Step] = deque()
        self._path_queues: dict[str, deque[Step]] = {}
        self._generation = 0  # bumped by reset(): late events of an old test count nowhere
        self._number = 0
        self._permits = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._gate_event: asyncio.Event | None = None
        self._server: ServerThread | None = None

    # -- lifecycle and scripting (test side)

    def start(self) -> Self:
        self._server = ServerThread(self).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("FakeUpstream not started")
        return self._server.url

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    def enqueue(self, *steps: Step) -> None:
        """Script the next responses, whatever their path."""
        self._push(steps)

    def enqueue_for(self, path: str, *steps: Step) -> None:
        """Script the next responses to `path` exactly (e.g. "/v1/chat/completions");
        they are used before the steps of `enqueue`."""
        self._push(steps, path)

    @property
    def pending(self) -> int:
        """Scripted steps not yet consumed."""
        with self._lock:
            return len(self._queue) + sum(len(q) for q in self._path_queues.values())

    def release(self, n: int = 1) -> None:
        """Let `n` more gated chunks go out (callable from any thread)."""
        with self._lock:
            self._permits += n
            loop, event = self._loop, self._gate_event
        if loop is not None and event is not None:
            loop.call_soon_threadsafe(event.set)

    def reset(self) -> None:
        with self._lock:
            self._generation += 1
            self.requests.clear()
            self.disconnects = self.sent_chunks = self._permits = self._number = 0
            self._queue.clear()
            self._path_queues.clear()
            self.answer = None

    def _push(self, steps: Sequence[Step], path: str | None = None) -> None:
        for step in steps:
            if not isinstance(step, Reply | Stream | Hang | Close):
                raise TypeError(f"not a script step: {step!r}")
        with self._lock:
            queue = self._queue if path is None else self._path_queues.setdefault(path, deque())
            queue.extend(steps)

    def _bump(self, ex: _Exchange, counter: str) -> None:
        with self._lock:
            if ex.generation == self._generation:
                setattr(self, counter, getattr(self, counter) + 1)

    # -- serving (server side)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                await send({"type": message["type"] + ".complete"})
                if message["type"] == "lifespan.shutdown":
                    return
        if scope["type"] != "http":
            return
        loop = asyncio.get_running_loop()
        with self._lock:
            if self._loop is not loop:
                self._loop, self._gate_event = loop, asyncio.Event()
        request = await _read_request(scope, receive)
        if request is None:
            return
        with self._lock:
            self.requests.append(request)
            queue = self._path_queues.get(request.path)
            step = queue.popleft() if queue else self._queue.popleft() if self._queue else None
            self._number += 1
            exchange = _Exchange(request, self._number, self._generation, receive, send)
        await self._perform(step, exchange)

    async def _perform(self, step: Step | None, ex: _Exchange) -> None:
        if isinstance(step, Close):
            _transport(ex.send).close()
            await _until_disconnect(ex.receive)  # so uvicorn sees the close, not a missing reply
            return
        wait = step.seconds if isinstance(step, Hang) else getattr(step, "delay_s", 0)
        if isinstance(step, Hang | Reply) and wait > 0 and await _left_within(ex.receive, wait):
            self._bump(ex, "disconnects")
            return
        if step is None or isinstance(step, Hang):
            step = self._default(ex)
        elif isinstance(step, Reply) and step.json is None and step.body is None:
            if step.status >= 400:
                step = replace(error_reply(step.status), headers=step.headers)
            else:
                default = self._default(ex)
                headers = {**default.headers, **step.headers}
                step = replace(default, status=step.status, headers=headers)
        if isinstance(step, Stream):
            await self._stream(step, ex)
        else:
            await _send_reply(step, ex.send)  # type: ignore[arg-type]

    def _default(self, ex: _Exchange) -> Reply | Stream:
        if self.answer is not None and (step := self.answer(ex.request, ex.number)) is not None:
            return step
        method, path, body = ex.request.method, ex.request.path, ex.request.json
        if method == "GET" and path.endswith("/models"):
            models = [
                {"id": m, "object": "model", "created": CREATED, "owned_by": "fake"}
                for m in self.models
            ]
            return Reply(json={"object": "list", "data": models})
        if method != "POST" or not path.endswith(("/completions", "/embeddings")):
            return error_reply(404, f"fake upstream: no route {method} {path}", code="not_found")
        if not isinstance(body, dict):
            return error_reply(400, "fake upstream: body is not a JSON object")
        if path.endswith("/chat/completions"):
            return chat_answer(body, ex.number)
        if path.endswith("/completions"):
            return completion_answer(body, ex.number)
        return embeddings_answer(body)

    async def _stream(self, step: Stream, ex: _Exchange) -> None:
        headers = {"content-type": "text/event-stream", "cache-control": "no-cache", **step.headers}
        start = {"type": "http.response.start", "status": step.status}
        await ex.send({**start, "headers": _encode_headers(headers)})
        writer = asyncio.create_task(self._write_events(step, ex))
        watcher = asyncio.create_task(_until_disconnect(ex.receive))
        try:
            done, _ = await asyncio.wait({writer, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if writer in done and ex.dropped:
                await watcher  # let uvicorn see the closed connection before we return
            elif writer not in done and ex.ending:
                await writer  # uvicorn signals a completed response as a disconnect
        finally:
            writer.cancel()
            watcher.cancel()
            await asyncio.gather(writer, watcher, return_exceptions=True)
        if writer.cancelled() or isinstance(writer.exception(), OSError):
            self._bump(ex, "disconnects")
        elif (error := writer.exception()) is not None:
            raise error

    async def _write_events(self, step: Stream, ex: _Exchange) -> None:
        async def emit(data: bytes, more: bool = True) -> None:
            await ex.send({"type": "http.response.body", "body": data, "more_body": more})

        for i, chunk in enumerate(step.chunks[: step.drop_after]):
            if i and step.gate:
                await self._gate()
            if i and step.delay_s:
                await asyncio.sleep(step.delay_s)
            # counted before the write: a client that has read chunk n always sees >= n
            self._bump(ex, "sent_chunks")
            await emit(chunk.encode() if isinstance(chunk, str) else _sse(chunk))
        if step.drop_after is not None:
            ex.dropped = True
            _transport(ex.send).close()
            return
        if step.usage is not None:
            await emit(_sse(_usage_chunk(step.chunks, step.usage)))
        if step.done:
            await emit(b"data: [DONE]\n\n")
        ex.ending = True
        await emit(b"", more=False)

    async def _gate(self) -> None:
        assert self._gate_event is not None  # set in __call__
        while True:
            self._gate_event.clear()  # before the check: a release() after it sets it again
            with self._lock:
                if self._permits:
                    self._permits -= 1
                    return
            await self._gate_event.wait()


@dataclass
class _Exchange:
    """One request being answered."""

    request: RecordedRequest
    number: int  # requests since reset(), from 1: the N of default ids like chatcmpl-fake-N
    generation: int
    receive: Receive
    send: Send
    ending: bool = False  # the final (empty) body message is being sent
    dropped: bool = False  # we closed the connection on purpose (drop_after)


# ---- ASGI plumbing --------------------------------------------------------------------


async def _read_request(scope: Scope, receive: Receive) -> RecordedRequest | None:
    parts = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        parts.append(message.get("body", b""))
        if not message.get("more_body"):
            break
    body = b"".join(parts)
    try:
        parsed = json.loads(body) if body else None
    except ValueError:
        parsed = None
    headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
    query = scope["query_string"].decode("latin-1")
    return RecordedRequest(scope["method"], scope["path"], query, headers, body, parsed)


async def _send_reply(step: Reply, send: Send) -> None:
    if step.body is not None:
        payload = step.body.encode() if isinstance(step.body, str) else step.body
        headers = {"content-type": "text/plain; charset=utf-8"}
    else:
        payload, headers = json.dumps(step.json).encode(), {"content-type": "application/json"}
    headers = {**headers, **step.headers, "content-length": str(len(payload))}
    start = {
        "type": "http.response.start",
        "status": step.status,
        "headers": _encode_headers(headers),
    }
    await send(start)
    await send({"type": "http.response.body", "body": payload, "more_body": False})


def _encode_headers(headers: dict[str, str]) -> list[tuple[bytes, bytes]]:
    merged = {k.lower(): v for k, v in headers.items()}
    return [(k.encode("latin-1"), v.encode("latin-1")) for k, v in merged.items()]


def _sse(chunk: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n"


def _usage_chunk(chunks: Sequence[dict[str, Any] | str], usage: dict[str, Any]) -> dict[str, Any]:
    last: dict[str, Any] = next((c for c in reversed(chunks) if isinstance(c, dict)), {})
    kind = last.get("object", "chat.completion.chunk")
    return _obj(kind, last.get("id", "chatcmpl-fake"), last.get("model"), [], usage=usage)


async def _until_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _left_within(receive: Receive, seconds: float) -> bool:
    try:
        await asyncio.wait_for(_until_disconnect(receive), seconds)
    except TimeoutError:
        return False
    return True


def _transport(send: Send) -> asyncio.BaseTransport:
    """The connection under a uvicorn send(): the only way to drop it without a 500."""
    transport = getattr(getattr(send, "__self__", None), "transport", None)
    if not isinstance(transport, asyncio.BaseTransport):
        raise RuntimeError("Close / drop_after need uvicorn (its send() knows the transport)")
    return transport
