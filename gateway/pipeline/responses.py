"""Responses: a whole upstream answer or error relayed to the client, settled and recorded."""

from __future__ import annotations

import logging

import orjson
from starlette.responses import Response

from gateway.errors import GatewayError
from gateway.pipeline.admission import Admission, settle
from gateway.pipeline.apis import Api
from gateway.pipeline.context import RequestContext
from gateway.pipeline.routing import Deployment
from gateway.pipeline.upstream_errors import unreadable_response
from gateway.providers.base import UpstreamResponse
from gateway.state import Gateway
from pricing.cost import format_usd

log = logging.getLogger("tallygate")
# the provider's own ids and timings, which its support asks for (request-id: Anthropic's)
PASSED_UPSTREAM_HEADERS = ("openai-processing-ms", "openai-version", "request-id")
# what reading an upstream JSON object of the wrong shape raises (a string where a list is)
UNREADABLE = (AttributeError, TypeError, ValueError, KeyError)
SAMPLE_BYTES = 200  # of an unreadable response, quoted (redacted) in the log
OVERHEAD_HEADER = "x-tallygate-overhead-ms"


def result_headers(ctx: RequestContext, dep: Deployment | None = None) -> dict[str, str]:
    headers = {"x-request-id": ctx.request_id, **ctx.response_headers}
    attempt = ctx.attempt
    if attempt is not None:
        headers["x-tallygate-attempts"] = str(len(ctx.attempts))
        headers["x-tallygate-deployment"] = dep.label if dep else attempt.deployment
    return headers


def overhead_header(ms: float) -> str:
    return f"{ms:.3f}"


def finish(ctx: RequestContext, headers: dict[str, str] | None) -> None:
    """Records the request (its spans, metrics and access line). `headers`, of a response
    not sent yet, get the overhead the record fixed: the span's, the metric's and the
    line's figure (a stream, whose headers have left, passes None)."""
    record = ctx.record
    record.finish()
    if headers is not None:
        headers[OVERHEAD_HEADER] = overhead_header(record.overhead_ms)


def fail(
    gw: Gateway, ctx: RequestContext, exc: GatewayError, api: Api, detail: str | None = None
) -> Response:
    """The error response in the API's error shape, recorded. `detail`: more for the log
    than the client sees."""
    ctx.status = exc.status
    ctx.error_type = exc.code or exc.type
    ctx.error_message = exc.message if detail is None else f"{exc.message} {detail}"
    headers = result_headers(ctx)
    finish(ctx, headers)
    return api.error_response(exc, headers)


def client_closed(gw: Gateway, ctx: RequestContext) -> Response:
    """The client left before its response: recorded as 499 (nginx's "client closed
    request"); the response goes nowhere."""
    ctx.status = 499
    ctx.cancelled = True
    ctx.error_type = "client_closed_request"
    ctx.error_message = "The client closed the connection before the response was sent."
    headers = result_headers(ctx)
    finish(ctx, headers)
    return Response(status_code=499, headers=headers)


def crash(gw: Gateway, ctx: RequestContext, exc: Exception, api: Api) -> Response:
    log.exception("request %s failed inside the gateway", ctx.request_id)
    error = GatewayError(f"The gateway failed to handle the request ({type(exc).__name__}).")
    return fail(gw, ctx, error, api)


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
    finish(ctx, headers)
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
    gw: Gateway, ctx: RequestContext, up: UpstreamResponse, dep: Deployment, admission: Admission,
    api: Api,
) -> Response:  # fmt: skip
    body = up.body or b""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        data = None
    if not isinstance(data, dict):
        return await unreadable(
            gw, ctx, up, dep, admission, api, "a body that is not a JSON object"
        )
    try:
        api.observe_body(ctx, data)
    except UNREADABLE:
        return await unreadable(gw, ctx, up, dep, admission, api, "a JSON body of an unknown shape")
    ctx.status = up.status
    await settle(gw, ctx, admission, dep.label)
    headers = upstream_headers(up, ctx, dep)
    if ctx.cost_nano is not None:
        headers["x-tallygate-cost-usd"] = format_usd(ctx.cost_nano)
    finish(ctx, headers)
    return Response(
        up.body, up.status, headers, media_type=up.headers.get("content-type", "application/json")
    )


async def unreadable(
    gw: Gateway, ctx: RequestContext, up: UpstreamResponse, dep: Deployment, admission: Admission,
    api: Api, what: str,
) -> Response:  # fmt: skip
    """A success status with a body the client's SDK could not parse either (an HTML page
    from a proxy, text): 502 upstream_error. The upstream may have done the work, so the
    request is charged our own count, as a response without usage is."""
    kind = up.headers.get("content-type") or "none"
    err = unreadable_response(dep.label, f"{what} (HTTP {up.status}, content-type {kind!r})")
    if ctx.attempt is not None:
        ctx.attempt.error_type = "invalid_response"
    await settle(gw, ctx, admission, dep.label)
    return fail(gw, ctx, err, api, f"Received: {received_sample(gw, up.body or b'')}")


def received_sample(gw: Gateway, sample: bytes) -> str:
    """The start of what an upstream sent, for the log: redacted (it may quote the prompt)."""
    text = sample.strip()[:SAMPLE_BYTES].decode("utf-8", "replace")
    return repr(gw.redactor.redact(text)[0])
