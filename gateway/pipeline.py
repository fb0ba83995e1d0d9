"""The request pipeline, one list of small stages shared by every inference endpoint:

authenticate → parse → resolve → admit → forward → relay → settle → record.

Authentication runs before parsing so an unauthenticated caller never makes us read a body.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from gateway.admission import Admission, admit, settle
from gateway.context import Attempt, RequestContext
from gateway.errors import (
    GatewayError,
    InvalidRequest,
    ModelNotFound,
    PermissionDenied,
    RequestTooLarge,
)
from gateway.metering import StreamObserver, generated_text, observe_body
from gateway.providers.base import UpstreamResponse
from gateway.routing import RETRYABLE_STATUS, Deployment, parse_retry_after
from gateway.sse import SSEDecoder
from gateway.state import Gateway
from gateway.upstream_errors import (
    TRANSPORT_ERRORS,
    error_type,
    map_transport_error,
    upstream_status_error,
)
from pricing.cost import format_usd
from pricing.usage import Usage

log = logging.getLogger("tallygate")
perf_counter = time.perf_counter

# operation → (the field that must be present, what it must be)
REQUIRED_FIELD = {"chat": "messages", "text_completion": "prompt", "embeddings": "input"}
PASSED_UPSTREAM_HEADERS = ("openai-processing-ms", "openai-version")


async def handle(gw: Gateway, request: Request, operation: str) -> Response:
    ctx = RequestContext(
        request_id=request.headers.get("x-request-id") or gw.new_request_id(),
        method=request.method,
        path=request.url.path,
        operation=operation,
    )
    gw.telemetry.start_request(ctx, request.headers)
    try:
        ctx.principal = gw.keys.authenticate(request.headers)
        await parse(gw, ctx, request)
        plan = resolve(gw, ctx)
        admission = await admit(gw, ctx, plan)
    except GatewayError as exc:
        return fail(gw, ctx, exc)
    except Exception as exc:
        return crash(gw, ctx, exc)
    return await proceed(gw, ctx, plan, admission)


async def proceed(
    gw: Gateway, ctx: RequestContext, plan: list[Deployment], admission: Admission
) -> Response:
    try:
        up, dep = await forward(gw, ctx, plan)
        if up.chunks is not None:
            return stream_response(gw, ctx, up, dep, admission)
        if up.status >= 400:
            return await passthrough_error(gw, ctx, up, dep, admission)
        return await whole_response(gw, ctx, up, dep, admission)
    except GatewayError as exc:
        await settle(gw, ctx, admission, None)
        return fail(gw, ctx, exc)
    except asyncio.CancelledError:
        gw.tasks.spawn(settle(gw, ctx, admission, None))  # give the reservation back
        raise
    except Exception as exc:
        await settle(gw, ctx, admission, None)
        return crash(gw, ctx, exc)


# --- stages ---------------------------------------------------------------------------


async def parse(gw: Gateway, ctx: RequestContext, request: Request) -> None:
    limit = gw.max_body_bytes
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise too_large(gw)
    chunks = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large(gw)
        chunks.append(chunk)
    try:
        body = orjson.loads(b"".join(chunks))
    except orjson.JSONDecodeError:
        raise InvalidRequest(
            "We could not parse the JSON body of your request. The body must be a JSON object."
        ) from None
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("You must provide a model parameter.", param="model")
    field = REQUIRED_FIELD[ctx.operation]
    value = body.get(field)
    if value is None or (field == "messages" and (not isinstance(value, list) or not value)):
        raise InvalidRequest(
            f"'{field}' is a required property and must not be empty.", param=field
        )
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise InvalidRequest(
            f"'stream' must be a boolean, got {type(stream).__name__}.", param="stream"
        )
    ctx.body = body
    ctx.requested_model = model
    ctx.stream = bool(stream) and ctx.operation != "embeddings"


def too_large(gw: Gateway) -> RequestTooLarge:
    return RequestTooLarge(
        f"The request body is larger than the limit of {gw.config.server.max_body_mb} MB."
    )


def resolve(gw: Gateway, ctx: RequestContext) -> list[Deployment]:
    assert ctx.principal is not None and ctx.requested_model is not None
    route = gw.router.get(ctx.requested_model)
    if route is None:
        raise ModelNotFound(
            f"The model `{ctx.requested_model}` does not exist or you do not have access to it.",
            param="model",
        )
    allowed = gw.config.teams[ctx.principal.team].models
    if allowed is not None and ctx.requested_model not in allowed:
        raise PermissionDenied(
            f"Team '{ctx.principal.team}' is not allowed to use model `{ctx.requested_model}`.",
            param="model",
        )
    return gw.router.plan(route)


def upstream_body(
    ctx: RequestContext, gw: Gateway, dep: Deployment, *, inject_usage: bool = True
) -> tuple[dict[str, Any], bool]:
    """The client's body with only `model` rewritten, plus stream usage when not asked for.

    Returns (body, hide_usage): hide_usage means the usage chunk we asked for is not the
    client's to see."""
    assert ctx.body is not None
    body = dict(ctx.body)
    body["model"] = dep.model
    hide_usage = False
    if inject_usage and ctx.stream and ctx.operation != "embeddings":
        options = body.get("stream_options")
        if not (isinstance(options, dict) and options.get("include_usage")):
            body["stream_options"] = {
                **(options if isinstance(options, dict) else {}),
                "include_usage": True,
            }
            hide_usage = True
    if gw.config.redaction.upstream:
        for name in ("messages", "prompt", "input"):
            if name in body:
                body[name], counts = gw.redactor.redact_value(body[name], truncate=False)
                add_counts(ctx, counts)
    return body, hide_usage


def add_counts(ctx: RequestContext, counts: dict[str, int]) -> None:
    for kind, n in counts.items():
        ctx.redactions[kind] = ctx.redactions.get(kind, 0) + n


async def forward(
    gw: Gateway, ctx: RequestContext, plan: list[Deployment]
) -> tuple[UpstreamResponse, Deployment]:
    """Try deployments in order; retry retryable failures with backoff, then fall back.

    Nothing is retried once a response has been accepted (a stream is returned at its
    headers, before its first byte reaches the client)."""
    retries = gw.config.routing.retries
    last_error: GatewayError | None = None
    last_response: tuple[UpstreamResponse, Deployment] | None = None
    for position, dep in enumerate(plan):
        if position:
            gw.telemetry.count("fallback", ctx)
        body, ctx.hide_usage = upstream_body(ctx, gw, dep)
        for retry in range(retries + 1):
            up, exc = await attempt(gw, ctx, dep, body)
            if up is not None and up.status == 400 and rejects_stream_options(ctx, up):
                # A server that does not know stream_options: ask again as the client did
                # (its usage, if any, is then read or counted by us).
                body, ctx.hide_usage = upstream_body(ctx, gw, dep, inject_usage=False)
                up, exc = await attempt(gw, ctx, dep, body)
            if up is not None:
                if up.status not in RETRYABLE_STATUS:
                    if up.status < 400:
                        gw.router.record_success(dep)
                    return up, dep
                last_response = (up, dep)
                last_error = upstream_status_error(up.status, dep.label, len(ctx.attempts))
                retry_after = parse_retry_after(up.headers.get("retry-after"))
            else:
                assert exc is not None
                last_error, last_response, retry_after = (
                    map_transport_error(exc, dep.label),
                    None,
                    None,
                )
            gw.router.record_failure(dep)
            if retry == retries:
                break
            wait = gw.router.backoff_s(retry + 1, retry_after)
            if wait is None:
                break  # Retry-After longer than we are willing to wait: fall back now
            gw.telemetry.count("retry", ctx)
            await asyncio.sleep(wait)
    if last_response is not None and last_response[0].status == 429:
        return last_response  # every deployment is rate limited: the client sees the provider's 429
    assert last_error is not None
    raise last_error


async def attempt(
    gw: Gateway, ctx: RequestContext, dep: Deployment, body: dict[str, Any]
) -> tuple[UpstreamResponse | None, BaseException | None]:
    """One upstream attempt, its span and its timing: (response, None) or (None, error)."""
    provider = gw.providers[dep.provider]
    current = Attempt(
        number=len(ctx.attempts) + 1,
        deployment=dep.label,
        provider=dep.provider,
        provider_kind=provider.kind,
        upstream_model=dep.model,
        server_address=provider.server_address,
        server_port=provider.server_port,
    )
    ctx.attempts.append(current)
    gw.telemetry.start_attempt(ctx, current)
    t0 = perf_counter()
    try:
        with gw.telemetry.use_attempt(current):
            up = await provider.send(
                ctx.operation,
                dep.model,
                body,
                stream=ctx.stream,
                timeout_s=dep.timeout_s,
                request_id=ctx.request_id,
            )
    except TRANSPORT_ERRORS as exc:
        ctx.upstream_wait_s += perf_counter() - t0
        current.error_type = error_type(exc)
        current.ended = perf_counter()
        gw.telemetry.end_attempt(ctx, current)
        return None, exc
    ctx.upstream_wait_s += perf_counter() - t0
    current.status = up.status
    if up.status in RETRYABLE_STATUS or (up.status == 400 and rejects_stream_options(ctx, up)):
        current.error_type = str(up.status)
        current.ended = perf_counter()
        gw.telemetry.end_attempt(ctx, current)
    return up, None


def rejects_stream_options(ctx: RequestContext, up: UpstreamResponse) -> bool:
    """An upstream 400 about the stream_options we added (not the client's own)."""
    return ctx.hide_usage and up.body is not None and b"stream_options" in up.body


# --- responses ------------------------------------------------------------------------


def result_headers(ctx: RequestContext, dep: Deployment | None = None) -> dict[str, str]:
    headers = {"x-request-id": ctx.request_id, **ctx.response_headers}
    if ctx.attempts:
        headers["x-tallygate-attempts"] = str(len(ctx.attempts))
        headers["x-tallygate-deployment"] = dep.label if dep else ctx.attempts[-1].deployment
    return headers


def finish(gw: Gateway, ctx: RequestContext, headers: dict[str, str]) -> None:
    headers["x-tallygate-overhead-ms"] = f"{ctx.overhead_s * 1000:.3f}"
    gw.telemetry.finish_request(ctx)


def fail(gw: Gateway, ctx: RequestContext, exc: GatewayError) -> Response:
    ctx.status = exc.status
    ctx.error_type = exc.code or exc.type
    ctx.error_message = exc.message
    headers = result_headers(ctx)
    finish(gw, ctx, headers)
    return exc.to_response(headers)


def crash(gw: Gateway, ctx: RequestContext, exc: Exception) -> Response:
    log.exception("request %s failed inside the gateway", ctx.request_id)
    return fail(
        gw, ctx, GatewayError(f"The gateway failed to handle the request ({type(exc).__name__}).")
    )


def upstream_headers(up: UpstreamResponse, ctx: RequestContext, dep: Deployment) -> dict[str, str]:
    headers = result_headers(ctx, dep)
    for name in PASSED_UPSTREAM_HEADERS:
        value = up.headers.get(name)
        if value is not None:
            headers[name] = value
    return headers


async def passthrough_error(
    gw: Gateway, ctx: RequestContext, up: UpstreamResponse, dep: Deployment, admission: Admission
) -> Response:
    """An upstream 4xx (or the last 429): the client gets the provider's status and body."""
    await settle(gw, ctx, admission, None)
    ctx.status = up.status
    ctx.error_type = str(up.status)
    ctx.error_message = upstream_message(gw, up.body or b"")
    headers = upstream_headers(up, ctx, dep)
    if "retry-after" in up.headers:
        headers["retry-after"] = up.headers["retry-after"]
    finish(gw, ctx, headers)
    return Response(
        up.body, up.status, headers, media_type=up.headers.get("content-type", "application/json")
    )


def upstream_message(gw: Gateway, body: bytes) -> str:
    """The upstream's error message for our logs, redacted (it may quote the prompt)."""
    try:
        message = str(orjson.loads(body)["error"]["message"])
    except (orjson.JSONDecodeError, KeyError, TypeError):
        message = body[:500].decode("utf-8", "replace")
    return gw.redactor.redact(message)[0]


async def whole_response(
    gw: Gateway, ctx: RequestContext, up: UpstreamResponse, dep: Deployment, admission: Admission
) -> Response:
    ctx.status = up.status
    try:
        data = orjson.loads(up.body or b"")
    except orjson.JSONDecodeError:
        data = None
    if isinstance(data, dict):
        observe_body(ctx, data)
    if ctx.usage is None:
        ctx.usage = estimate_usage(gw, ctx, dep, admission)
    await settle(gw, ctx, admission, dep.label)
    headers = upstream_headers(up, ctx, dep)
    if ctx.cost_nano is not None:
        headers["x-tallygate-cost-usd"] = format_usd(ctx.cost_nano)
    finish(gw, ctx, headers)
    return Response(
        up.body, up.status, headers, media_type=up.headers.get("content-type", "application/json")
    )


def estimate_usage(
    gw: Gateway, ctx: RequestContext, dep: Deployment, admission: Admission
) -> Usage:
    """The upstream reported no usage: count what went in and what came out ourselves."""
    output = 0
    if ctx.operation != "embeddings":
        text = generated_text(ctx)
        output = gw.counter.count_text(dep.model, text).tokens if text else 0
    return Usage(input_tokens=admission.prompt_tokens, output_tokens=output, estimated=True)


def stream_response(
    gw: Gateway, ctx: RequestContext, up: UpstreamResponse, dep: Deployment, admission: Admission
) -> Response:
    ctx.status = 200
    headers = upstream_headers(up, ctx, dep)
    headers["cache-control"] = "no-cache"
    headers["x-tallygate-overhead-ms"] = f"{ctx.overhead_s * 1000:.3f}"
    relay = StreamRelay(gw, ctx, up, dep, admission)
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
    """Relays one upstream stream event by event as it arrives, parsing each event once."""

    def __init__(
        self,
        gw: Gateway,
        ctx: RequestContext,
        up: UpstreamResponse,
        dep: Deployment,
        admission: Admission,
    ) -> None:
        self.gw, self.ctx, self.up, self.dep, self.admission = gw, ctx, up, dep, admission
        self.done = False
        self.closed = False

    def close(self) -> None:
        """Settle and record once, as a tracked task (a disconnect cancels the caller): the
        client going away closes the upstream request and is charged what was streamed."""
        if self.closed:
            return
        self.closed = True
        self.ctx.cancelled = not self.done and self.ctx.error_type is None
        self.gw.tasks.spawn(finish_stream(self.gw, self.ctx, self.up, self.dep, self.admission))

    async def events(self) -> AsyncIterator[bytes]:
        gw, ctx, dep = self.gw, self.ctx, self.dep
        assert self.up.chunks is not None
        decoder = SSEDecoder()
        observer = StreamObserver(ctx)
        hide_usage = ctx.hide_usage
        chunks = self.up.chunks.__aiter__()
        last_sent = 0.0
        try:
            while True:
                t0 = perf_counter()
                try:
                    raw = await chunks.__anext__()
                except StopAsyncIteration:
                    break
                except TRANSPORT_ERRORS as exc:
                    ctx.upstream_wait_s += perf_counter() - t0
                    if ctx.attempt is not None:
                        ctx.attempt.error_type = error_type(exc)
                    err = map_transport_error(exc, dep.label)
                    ctx.error_type = "stream_interrupted"
                    ctx.error_message = err.message
                    # Headers are gone: signal the failure in-band, the way OpenAI does.
                    yield b"data: " + orjson.dumps(err.body()) + b"\n\n"
                    break
                now = perf_counter()
                ctx.upstream_wait_s += now - t0
                out = []
                for event, data in decoder.feed(raw):
                    if data is not None and data != b"[DONE]":
                        try:
                            obj = orjson.loads(data)
                        except orjson.JSONDecodeError:
                            obj = None
                        if isinstance(obj, dict):
                            observer.chunk(obj)
                            if hide_usage and obj.get("usage") and not obj.get("choices"):
                                continue
                    out.append(event)
                if out:
                    if ctx.first_chunk_at is None:
                        ctx.first_chunk_at = now
                    else:
                        gw.telemetry.record_chunk_gap(ctx, now - last_sent)
                    last_sent = now
                    yield b"".join(out) if len(out) > 1 else out[0]
            self.done = True
        finally:
            self.close()


async def finish_stream(
    gw: Gateway, ctx: RequestContext, up: UpstreamResponse, dep: Deployment, admission: Admission
) -> None:
    await up.close()  # for a client that left: closes the upstream connection mid-response
    if ctx.attempt is not None:
        ctx.attempt.ended = perf_counter()
    if ctx.usage is None:  # no usage chunk came (cut off, or an upstream that sends none)
        ctx.usage = estimate_usage(gw, ctx, dep, admission)
    # A stream that broke after its headers keeps status 200; ctx.error_type says why.
    await settle(gw, ctx, admission, dep.label)
    gw.telemetry.end_attempt(ctx, ctx.attempts[-1])
    finish(gw, ctx, {})
