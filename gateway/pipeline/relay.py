"""Streams: relayed event by event as they arrive, settled however the response ends."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
from starlette.responses import Response, StreamingResponse

from gateway.pipeline.admission import Admission, charge, settle
from gateway.pipeline.apis import Api, Observer
from gateway.pipeline.context import RequestContext
from gateway.pipeline.metering import ERROR, USAGE
from gateway.pipeline.responses import (
    OVERHEAD_HEADER,
    UNREADABLE,
    finish,
    overhead_header,
    received_sample,
    upstream_headers,
    upstream_message,
)
from gateway.pipeline.routing import Deployment
from gateway.pipeline.sse import SSEDecoder, is_sse, with_data
from gateway.pipeline.upstream_errors import UPSTREAM_FAILURES, unreadable_response
from gateway.providers.base import UpstreamResponse
from gateway.state import Gateway
from pricing.cost import format_usd

perf_counter = time.perf_counter


def stream_response(
    gw: Gateway, ctx: RequestContext, up: UpstreamResponse, dep: Deployment, admission: Admission,
    api: Api,
) -> Response:  # fmt: skip
    ctx.status = 200
    headers = upstream_headers(up, ctx, dep)
    headers["cache-control"] = "no-cache"
    # sent before the stream is relayed: the overhead so far (its record, at the end of
    # the stream, has the whole request's for the span, the metric and the access line)
    headers[OVERHEAD_HEADER] = overhead_header(ctx.overhead_s * 1000.0)
    relay = StreamRelay(gw, ctx, up, dep, admission, api.observer(ctx))
    return RelayResponse(relay, headers=headers, media_type="text/event-stream")


class RelayResponse(StreamingResponse):
    """A StreamingResponse that settles its stream however the response ends: even when the
    client leaves before the first chunk, when the relay generator never runs its finally."""

    def __init__(self, relay: StreamRelay, **kwargs: Any) -> None:
        super().__init__(relay.events(), **kwargs)
        self.relay = relay

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.relay.close()


class StreamRelay:
    """Relays one upstream stream event by event as it arrives, parsing each event once.
    The observer reads the events of the API's protocol (gateway/pipeline/metering.py)."""

    def __init__(
        self,
        gw: Gateway,
        ctx: RequestContext,
        up: UpstreamResponse,
        dep: Deployment,
        admission: Admission,
        observer: Observer,
    ) -> None:
        self.gw, self.ctx, self.up, self.dep, self.admission = gw, ctx, up, dep, admission
        self.observer = observer
        self.done = False
        self.finishing: asyncio.Task[None] | None = None

    def close(self) -> asyncio.Task[None]:
        """Settle and record once, as a tracked task (a disconnect cancels the caller): the
        client going away closes the upstream request and is charged what was streamed."""
        if self.finishing is None:
            self.ctx.cancelled = not self.done and self.ctx.error_type is None
            self.finishing = self.gw.tasks.spawn(
                finish_stream(self.gw, self.ctx, self.up, self.dep, self.admission)
            )
        return self.finishing

    def with_cost(self, chunk: dict[str, Any], event: bytes) -> bytes:
        """The client's usage event with `usage.cost` (USD) added: what the same usage costs
        on a whole response (x-tallygate-cost-usd), from the same computation."""
        usage = self.observer.usage_of(chunk)
        if not isinstance(usage, dict):
            return event
        cost = charge(self.gw, self.ctx, self.admission, self.dep.label)
        if cost is None:
            return event
        usage["cost"] = float(format_usd(cost))
        return with_data(event, orjson.dumps(chunk))

    async def events(self) -> AsyncIterator[bytes]:
        ctx = self.ctx
        record = ctx.record
        assert self.up.chunks is not None
        decoder = SSEDecoder()
        observer = self.observer
        hide_usage = ctx.hide_usage
        chunks = self.up.chunks.__aiter__()
        last_sent = 0.0
        readable = False  # a JSON event or [DONE] came: this is an OpenAI-format stream
        ended = False
        try:
            while True:
                t0 = perf_counter()
                try:
                    raw = await chunks.__anext__()
                except StopAsyncIteration:
                    if ended or not decoder.tail().strip():
                        break
                    raw, ended = b"\n\n", True  # the last event came without its blank line
                except UPSTREAM_FAILURES as err:  # the stream's transport failed (mapped)
                    ctx.upstream_wait_s += perf_counter() - t0
                    if ctx.attempt is not None:
                        ctx.attempt.error_type = err.kind
                    ctx.error_type = "stream_interrupted"
                    ctx.error_message = err.message
                    # Headers are gone: signal the failure in-band, as the protocol does.
                    yield observer.error_event(err)
                    break
                now = perf_counter()
                ctx.upstream_wait_s += now - t0
                out = []
                bad: tuple[str, bytes] | None = None
                for event, data in decoder.feed(raw):
                    if data is None:
                        if not is_sse(event):
                            bad = ("bytes that are not server-sent events", event)
                            break
                    elif data == b"[DONE]":
                        readable = True
                    else:
                        try:
                            obj = orjson.loads(data)
                        except orjson.JSONDecodeError:
                            obj = None
                        if not isinstance(obj, dict):
                            bad = ("an event whose data is not a JSON object", event)
                            break
                        try:
                            flags = observer.chunk(obj)
                        except UNREADABLE:
                            bad = ("a chunk of an unknown shape", event)
                            break
                        readable = True
                        if flags:
                            if flags & ERROR:
                                self.upstream_reported(obj, data)
                            if flags & USAGE:
                                if hide_usage and not obj.get("choices"):
                                    continue
                                event = self.with_cost(obj, event)
                    out.append(event)
                if out:
                    if ctx.first_chunk_at is None:
                        ctx.first_chunk_at = now
                    else:
                        record.chunk_gap(now - last_sent)
                    last_sent = now
                    yield b"".join(out) if len(out) > 1 else out[0]
                if bad is not None:
                    yield self.unreadable(*bad)
                    break
            if not readable and ctx.error_type is None:
                yield self.unreadable("a stream without any data event", decoder.tail())
            self.done = True
        finally:
            finishing = self.close()
        # Settle and record before the stream's last bytes go out, as a whole response does
        # before it is sent: the client's next request then finds this one's spend settled
        # (not still reserved at its maximum) and does not queue behind its bookkeeping.
        # (Shielded: a client leaving now does not cut the settlement short. Its failure is
        # logged by the task set; the client already has every byte of the stream.)
        with contextlib.suppress(Exception):
            await asyncio.shield(finishing)

    def unreadable(self, what: str, sample: bytes) -> bytes:
        """Ends a stream that is not OpenAI's SSE (an HTML page, text, binary, non-JSON data)
        the way the protocol signals an error after the headers: one in-band error event.
        Recorded as an upstream error; settlement then charges our own count of what was
        relayed."""
        gw, ctx, dep = self.gw, self.ctx, self.dep
        err = unreadable_response(dep.label, f"{what}{content_type_note(self.up)}")
        ctx.error_type = err.code
        ctx.error_message = f"{err.message} Received: {received_sample(gw, sample)}"
        if ctx.attempt is not None:
            ctx.attempt.error_type = "invalid_response"
        return self.observer.error_event(err)

    def upstream_reported(self, obj: dict[str, Any], data: bytes) -> None:
        """An error event from the upstream itself: relayed as it is, and recorded (its
        message redacted: it may quote the prompt)."""
        if self.ctx.error_type is None:
            self.ctx.error_type = "upstream_error"
            text = self.observer.error_text(obj)
            self.ctx.error_message = (
                self.gw.redactor.redact(text)[0] if text else upstream_message(self.gw, data)
            )


def content_type_note(up: UpstreamResponse) -> str:
    kind = up.headers.get("content-type", "")
    return "" if kind.startswith("text/event-stream") else f" (content-type {kind or 'none'!r})"


async def finish_stream(
    gw: Gateway, ctx: RequestContext, up: UpstreamResponse, dep: Deployment, admission: Admission
) -> None:
    await up.close()  # for a client that left: closes the upstream connection mid-response
    if ctx.attempt is not None:
        ctx.attempt.ended = perf_counter()
    # No usage chunk (cut off, or an upstream that sends none): settle counts it ourselves.
    # A stream that broke after its headers keeps status 200; ctx.error_type says why.
    await settle(gw, ctx, admission, dep.label)
    finish(ctx, None)  # ends the attempt's span too, with the outcome its Attempt holds
