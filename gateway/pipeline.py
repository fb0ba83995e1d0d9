"""The request pipeline, one list of small stages shared by every inference endpoint:

authenticate → parse → resolve → admit → forward → relay → settle → record.

Authentication runs before parsing so an unauthenticated caller never makes us read a body.
"""

from __future__ import annotations

import asyncio

import orjson
from starlette.requests import Request
from starlette.responses import Response

from gateway.admission import Admission, admit, settle
from gateway.context import RequestContext
from gateway.errors import (
    GatewayError,
    InvalidRequest,
    ModelNotFound,
    PermissionDenied,
    RequestTooLarge,
)
from gateway.forwarding import forward
from gateway.relay import stream_response
from gateway.request_ids import incoming_request_id
from gateway.responses import crash, fail, passthrough_error, whole_response
from gateway.routing import Deployment
from gateway.state import Gateway

# operation → the body field it cannot do without
REQUIRED_FIELD = {"chat": "messages", "text_completion": "prompt", "embeddings": "input"}


async def handle(gw: Gateway, request: Request, operation: str) -> Response:
    request_id, id_headers = incoming_request_id(request.headers, gw.redactor, gw.new_request_id)
    ctx = RequestContext(
        request_id=request_id,
        method=request.method,
        path=request.url.path,
        operation=operation,
        response_headers=id_headers,
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
