"""POST /v1/messages/count_tokens: the input tokens a Messages request would use.

Authenticated, parsed, routed and allowed like the message itself, then answered by the
model's first Anthropic deployment (its answer relayed as it came) or, when the model has
none or it fails, counted here and marked `x-tallygate-tokens-estimated: true`. Nothing is
reserved or charged, and rate limits do not apply: counting costs nothing upstream (Claude
Code counts before most turns). Recorded like any request: a span, an access-log line.
"""

from __future__ import annotations

from collections.abc import Mapping

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from gateway.errors import GatewayError
from gateway.pipeline.apis import COUNT_TOKENS
from gateway.pipeline.context import RequestContext
from gateway.pipeline.forwarding import attempt, outgoing
from gateway.pipeline.handle import ClientLeft, client_headers, parse, resolve, start
from gateway.pipeline.ingress import speaks_messages
from gateway.pipeline.responses import (
    client_closed,
    crash,
    fail,
    finish,
    result_headers,
    upstream_headers,
    upstream_message,
)
from gateway.pipeline.routing import Deployment
from gateway.pipeline.upstream_errors import UPSTREAM_FAILURES
from gateway.state import Gateway
from gateway.translate.anthropic_common import TranslationError
from gateway.translate.anthropic_ingress import chat_request

ESTIMATED_HEADER = "x-tallygate-tokens-estimated"


async def count_tokens(gw: Gateway, request: Request) -> Response:
    api = COUNT_TOKENS
    ctx = start(gw, request, api)
    try:
        ctx.principal = gw.keys.authenticate(request.headers)
        await parse(gw, ctx, request, api)
        plan = resolve(gw, ctx, api)
        answer = await forwarded(gw, ctx, plan, client_headers(request, api))
        return answer if answer is not None else await counted(gw, ctx, plan)
    except GatewayError as exc:
        return fail(gw, ctx, exc, api)
    except ClientLeft:
        return client_closed(gw, ctx)
    except Exception as exc:
        return crash(gw, ctx, exc, api)


async def forwarded(
    gw: Gateway, ctx: RequestContext, plan: list[Deployment], headers: Mapping[str, str]
) -> Response | None:
    """The first Anthropic deployment's answer, as it came; None when the model has no
    such deployment, or it could not answer (unreachable, 5xx, 429)."""
    dep = next((d for d in plan if speaks_messages(gw.providers[d.provider])), None)
    if dep is None:
        return None
    body = dict(outgoing(gw, ctx))
    body["model"] = dep.model
    try:
        up = await attempt(gw, ctx, dep, body, COUNT_TOKENS, headers)
    except UPSTREAM_FAILURES:
        return None
    if up.status >= 500 or up.status == 429:
        return None
    ctx.status = up.status
    if up.status >= 400:
        ctx.error_type = str(up.status)
        ctx.error_message = upstream_message(gw, up.body or b"")
    out = upstream_headers(up, ctx, dep)
    finish(ctx, out)
    kind = up.headers.get("content-type", "application/json")
    return Response(up.body, up.status, out, media_type=kind)


async def counted(gw: Gateway, ctx: RequestContext, plan: list[Deployment]) -> Response:
    """Our own count, with the first deployment's tokenizer, of the request as an
    OpenAI-compatible deployment would get it (tools by OpenAI's formula); of the body as
    it is when it cannot be translated (server tools)."""
    assert ctx.body is not None
    try:
        body = chat_request(ctx.body)
    except TranslationError:
        body = ctx.body
    count = await gw.counter.count_request("chat", plan[0].model, body)
    ctx.status = 200
    headers = result_headers(ctx)
    headers[ESTIMATED_HEADER] = "true"
    finish(ctx, headers)
    return JSONResponse({"input_tokens": count.tokens}, headers=headers)
