"""Forwarding: the upstream body, one attempt at a time, retries with backoff, fallbacks."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Mapping
from typing import Any

from gateway.errors import (
    GatewayError,
)
from gateway.pipeline.admission import OUTPUT_CAP_FIELDS
from gateway.pipeline.apis import Api
from gateway.pipeline.context import Attempt, RequestContext
from gateway.pipeline.routing import RETRYABLE_STATUS, Deployment, parse_retry_after
from gateway.pipeline.upstream_errors import UPSTREAM_FAILURES, mapped, upstream_status_error
from gateway.providers.base import UpstreamResponse
from gateway.state import Gateway

perf_counter = time.perf_counter


# the fields that carry a prompt, in any API's body (the Responses API: input, instructions;
# the Messages API: system)
PROMPT_FIELDS = ("messages", "prompt", "input", "instructions", "system")
NO_HEADERS: Mapping[str, str] = {}


def outgoing(gw: Gateway, ctx: RequestContext) -> dict[str, Any]:
    """The client's body as it may leave the gateway: with redaction.upstream, its prompt
    fields masked (once per request, whatever the number of attempts)."""
    assert ctx.body is not None
    if not gw.config.redaction.upstream:
        return ctx.body
    body = dict(ctx.body)
    for name in PROMPT_FIELDS:
        if name in body:
            body[name], counts = gw.redactor.redact_value(body[name], truncate=False)
            for kind, n in counts.items():
                ctx.redactions[kind] = ctx.redactions.get(kind, 0) + n
    return body


def upstream_body(
    ctx: RequestContext, base: dict[str, Any], dep: Deployment, *, inject_usage: bool
) -> tuple[dict[str, Any], bool]:
    """`base` with only `model` rewritten, plus stream usage when the client did not ask
    (`inject_usage`: the API's streams carry usage only when asked), and the team's output
    cap where it applies (admission decided it per deployment).

    Returns (body, hide_usage): hide_usage means the usage chunk we asked for is not the
    client's to see."""
    body = dict(base)
    body["model"] = dep.model
    cap = ctx.upstream_caps.get(dep.label)
    if cap is not None:
        body[cap[0]] = cap[1]
        for name in OUTPUT_CAP_FIELDS:  # every other cap the client sent, lowered to it
            if name != cap[0] and isinstance(body.get(name), int) and body[name] > cap[1]:
                body[name] = cap[1]
    hide_usage = False
    if inject_usage and ctx.stream:
        options = body.get("stream_options")
        if not (isinstance(options, dict) and options.get("include_usage")):
            body["stream_options"] = {
                **(options if isinstance(options, dict) else {}),
                "include_usage": True,
            }
            hide_usage = True
    return body, hide_usage


async def forward(
    gw: Gateway, ctx: RequestContext, plan: list[Deployment], api: Api,
    client_headers: Mapping[str, str] = NO_HEADERS,
) -> tuple[UpstreamResponse, Deployment]:  # fmt: skip
    """Try deployments in order; retry retryable failures with backoff, then fall back.
    `client_headers`: the client's headers the API forwards (api.client_headers).

    Nothing is retried once a response has been accepted (a stream is returned at its
    headers, before its first byte reaches the client)."""
    retries = gw.config.routing.retries
    last_error: GatewayError | None = None
    last_response: tuple[UpstreamResponse, Deployment] | None = None
    base = outgoing(gw, ctx)
    for position, dep in enumerate(plan):
        if position:
            ctx.record.count("fallback")
        body, ctx.hide_usage = upstream_body(ctx, base, dep, inject_usage=api.stream_usage)
        for retry in range(retries + 1):
            try:
                up = await attempt(gw, ctx, dep, body, api, client_headers)
                if up.status == 400 and rejects_stream_options(ctx, up):
                    # A server that does not know stream_options: ask again as the client
                    # did (its usage, if any, is then read or counted by us).
                    fail_current(ctx, "400")
                    body, ctx.hide_usage = upstream_body(ctx, base, dep, inject_usage=False)
                    up = await attempt(gw, ctx, dep, body, api, client_headers)
            except UPSTREAM_FAILURES as err:
                last_error, last_response, retry_after = err, None, None
            else:
                if up.status not in RETRYABLE_STATUS:
                    if up.status < 400:
                        gw.router.record_success(dep)
                    return up, dep
                last_response = (up, dep)
                last_error = upstream_status_error(up.status, dep.label, len(ctx.attempts))
                retry_after = parse_retry_after(up.headers.get("retry-after"))
            gw.router.record_failure(dep)
            if retry == retries:
                break
            wait = gw.router.backoff_s(retry + 1, retry_after)
            if wait is None:
                break  # Retry-After longer than we are willing to wait: fall back now
            ctx.record.count("retry")
            await asyncio.sleep(wait)
    if last_response is not None and last_response[0].status == 429:
        return last_response  # every deployment is rate limited: the client sees the provider's 429
    assert last_error is not None
    raise last_error


async def attempt(
    gw: Gateway, ctx: RequestContext, dep: Deployment, body: dict[str, Any], api: Api,
    client_headers: Mapping[str, str] = NO_HEADERS,
) -> UpstreamResponse:  # fmt: skip
    """One upstream attempt, its span and its timing: the response (a retryable status
    ends the attempt as failed), or UpstreamError / UpstreamTimeout when the upstream could
    not be reached or read (gateway.pipeline.upstream_errors.mapped). The provider maps the API's
    name to its path; an API with an adapter (`api.send`) sends through it instead
    (gateway/pipeline/ingress.py)."""
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
    record = ctx.record.attempt(current)
    t0 = perf_counter()
    try:
        headers = {"x-request-id": ctx.request_id, **record.trace_headers()}
        send: Awaitable[UpstreamResponse]
        with record.current():
            if api.send is None:
                send = provider.send(
                    api.name, dep.model, body, stream=ctx.stream, timeout_s=dep.timeout_s,
                    headers=headers,
                )  # fmt: skip
            else:
                send = api.send(
                    provider, dep.model, body, stream=ctx.stream, timeout_s=dep.timeout_s,
                    headers=headers, client_headers=client_headers,
                )  # fmt: skip
            up = await mapped(send, dep.label)
    except UPSTREAM_FAILURES as err:
        ctx.upstream_wait_s += perf_counter() - t0
        record.fail(err.kind)
        raise
    ctx.upstream_wait_s += perf_counter() - t0
    current.status = up.status
    if up.status in RETRYABLE_STATUS:
        record.fail(str(up.status))
    return up


def fail_current(ctx: RequestContext, error_type: str) -> None:
    """The current attempt failed with `error_type`: recorded, its span ended now."""
    current = ctx.attempt
    assert current is not None  # attempt() made it
    current.error_type, current.ended = error_type, perf_counter()
    if current.record is not None:
        current.record.end()


def rejects_stream_options(ctx: RequestContext, up: UpstreamResponse) -> bool:
    """An upstream 400 about the stream_options we added (not the client's own)."""
    return ctx.hide_usage and up.body is not None and b"stream_options" in up.body
