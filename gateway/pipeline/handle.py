"""The request pipeline, one list of small stages shared by every inference endpoint:

authenticate → parse → resolve → admit → forward → relay → settle → record.

Authentication runs before parsing so an unauthenticated caller never makes us read a body.
What differs between endpoints (required field, stream usage, observers, error shapes) comes
from the request's Api (gateway/pipeline/apis.py), handed to the stages that need it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive

from gateway.errors import (
    GatewayError,
    InvalidRequest,
    ModelNotFound,
    PermissionDenied,
    RequestTooLarge,
)
from gateway.pipeline.admission import Admission, admit, settle
from gateway.pipeline.apis import APIS, Api
from gateway.pipeline.context import RequestContext
from gateway.pipeline.forwarding import NO_HEADERS, forward
from gateway.pipeline.relay import stream_response
from gateway.pipeline.request_ids import incoming_request_id
from gateway.pipeline.responses import client_closed, crash, fail, passthrough_error, whole_response
from gateway.pipeline.routing import Deployment
from gateway.providers.base import BASE_OPERATIONS, UpstreamResponse, operations
from gateway.server.limits import check_json_depth, serving_protocol
from gateway.state import Gateway

# API name → the body field it cannot do without
REQUIRED_FIELD = {api.name: api.required for api in APIS.values()}


def start(gw: Gateway, request: Request, api: Api) -> RequestContext:
    """The request's context, its id checked (replaced when invalid), its SERVER span started."""
    request_id, id_headers = incoming_request_id(request.headers, gw.redactor, gw.new_request_id)
    ctx = RequestContext(
        request_id=request_id,
        method=request.scope["method"],
        path=request.scope["path"],  # not request.url: that parses the whole URL
        operation=api.operation,
        response_headers=id_headers,
    )
    gw.telemetry.start_request(ctx, request.headers)  # ctx.record from here on
    return ctx


async def handle(gw: Gateway, request: Request, api: Api) -> Response:
    ctx = start(gw, request, api)
    try:
        ctx.principal = gw.keys.authenticate(request.headers)
        await parse(gw, ctx, request, api)
        plan = resolve(gw, ctx, api)
        admission = await admit(gw, ctx, plan, api)
    except GatewayError as exc:
        return fail(gw, ctx, exc, api)
    except ClientLeft:
        return client_closed(gw, ctx)
    except Exception as exc:
        return crash(gw, ctx, exc, api)
    headers = client_headers(request, api)
    return await proceed(gw, ctx, plan, admission, request.receive, api, headers)


def client_headers(request: Request, api: Api) -> Mapping[str, str]:
    """The client's headers its API forwards upstream (anthropic-version, anthropic-beta)."""
    if not api.client_headers:
        return NO_HEADERS
    get = request.headers.get
    return {name: value for name in api.client_headers if (value := get(name)) is not None}


async def proceed(
    gw: Gateway,
    ctx: RequestContext,
    plan: list[Deployment],
    admission: Admission,
    receive: Receive,
    api: Api,
    headers: Mapping[str, str] = NO_HEADERS,
) -> Response:
    try:
        up, dep = await forward_watched(gw, ctx, plan, receive, api, headers)
        if up.chunks is not None:
            return stream_response(gw, ctx, up, dep, admission, api)
        if up.status >= 400:
            return await passthrough_error(gw, ctx, up, dep, admission)
        return await whole_response(gw, ctx, up, dep, admission, api)
    except GatewayError as exc:
        await settle(gw, ctx, admission, None)
        return fail(gw, ctx, exc, api)
    except ClientLeft:
        await settle_left(gw, ctx, admission)
        return client_closed(gw, ctx)
    except asyncio.CancelledError:
        gw.tasks.spawn(settle(gw, ctx, admission, None))  # give the reservation back
        raise
    except Exception as exc:
        await settle(gw, ctx, admission, None)
        return crash(gw, ctx, exc, api)


# --- a client that leaves ---------------------------------------------------------------


class ClientLeft(Exception):
    """The client closed its connection before its response."""


# A request answered sooner than this never starts a watcher task: the common fast answer
# costs one timer, and a client that left earlier is still seen when the watcher starts.
WATCH_AFTER_S = 0.05


class DisconnectWatch:
    """Cancels the request's task when its client disconnects (uvicorn's receive() returns
    http.disconnect once the body has been read): the upstream call in flight is cancelled,
    which closes its connection, rather than running to its end for nobody."""

    __slots__ = ("left", "receive", "task", "watcher")

    def __init__(self, task: asyncio.Task[object], receive: Receive) -> None:
        self.task, self.receive = task, receive
        self.watcher: asyncio.Task[None] | None = None
        self.left = False

    def start(self) -> None:
        self.watcher = asyncio.get_running_loop().create_task(self.watch())

    async def watch(self) -> None:
        try:
            while (await self.receive())["type"] != "http.disconnect":
                pass
        except Exception:  # a server whose receive() fails: nothing to watch
            return
        self.left = True
        self.task.cancel()

    def stop(self) -> None:
        if self.watcher is not None:
            self.watcher.cancel()


class Departure:
    """The callback tallygate's HTTP protocol calls when a request's connection drops."""

    __slots__ = ("left", "task")

    def __init__(self, task: asyncio.Task[object]) -> None:
        self.task = task
        self.left = False

    def __call__(self) -> None:
        self.left = True
        self.task.cancel()


async def forward_watched(
    gw: Gateway, ctx: RequestContext, plan: list[Deployment], receive: Receive, api: Api,
    headers: Mapping[str, str] = NO_HEADERS,
) -> tuple[UpstreamResponse, Deployment]:  # fmt: skip
    """forward(), cancelled if the client leaves meanwhile: then raises ClientLeft. Served
    by tallygate's protocol, its connection_lost says so; under another server a watcher
    task reads receive() (started only for a request not answered within WATCH_AFTER_S)."""
    protocol = serving_protocol(receive)
    if protocol is None:
        return await forward_polled(gw, ctx, plan, receive, api, headers)
    if receive.__self__.disconnected:  # type: ignore[attr-defined]  # left before we got here
        raise ClientLeft
    task = asyncio.current_task()
    assert task is not None
    departure = protocol.on_disconnect = Departure(task)
    try:
        result = await forward(gw, ctx, plan, api, headers)
    except asyncio.CancelledError:
        # Ours only if the connection dropped and nobody else cancelled too (e.g. a shutdown).
        if not departure.left or task.uncancel() > 0:
            raise
        raise ClientLeft from None
    finally:
        protocol.on_disconnect = None
    if departure.left:  # something inside forward swallowed our cancellation: undo its count
        task.uncancel()
    return result


async def forward_polled(
    gw: Gateway, ctx: RequestContext, plan: list[Deployment], receive: Receive, api: Api,
    headers: Mapping[str, str] = NO_HEADERS,
) -> tuple[UpstreamResponse, Deployment]:  # fmt: skip
    """forward_watched() under a server other than tallygate's."""
    task = asyncio.current_task()
    assert task is not None
    watch = DisconnectWatch(task, receive)
    timer = asyncio.get_running_loop().call_later(WATCH_AFTER_S, watch.start)
    try:
        result = await forward(gw, ctx, plan, api, headers)
    except asyncio.CancelledError:
        # Ours only if the watcher cancelled and nobody else did too (e.g. a shutdown).
        if not watch.left or task.uncancel() > 0:
            raise
        raise ClientLeft from None
    finally:
        timer.cancel()
        watch.stop()
    if watch.left:  # something inside forward swallowed our cancellation: undo its count
        task.uncancel()
    return result


async def settle_left(gw: Gateway, ctx: RequestContext, admission: Admission) -> None:
    """A client that left while an upstream attempt was in flight is charged our own count,
    marked estimated: the admitted prompt (the upstream had read it), no output; a model that
    reasons out of sight its output cap, as when no usage comes back (it may have billed
    thinking before the cancel, and leaving must not be a way around the budget)."""
    attempt = ctx.attempt
    if attempt is None or attempt.ended is not None:  # between attempts: nothing in flight
        await settle(gw, ctx, admission, None)
        return
    attempt.ended = time.perf_counter()
    ctx.upstream_wait_s += attempt.ended - attempt.started  # attempt() never got to add it
    attempt.error_type = "cancelled"
    if attempt.record is not None:  # its span ends now
        attempt.record.end()
    ctx.usage = None
    await settle(gw, ctx, admission, attempt.deployment)


# --- stages ---------------------------------------------------------------------------


async def parse(gw: Gateway, ctx: RequestContext, request: Request, api: Api | None = None) -> None:
    """The body, read once and checked: 400/413 on bad input. `api` defaults to the one
    named ctx.operation (they coincide but for the Responses API)."""
    api = api or APIS[ctx.operation]
    limit = gw.max_body_bytes
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise too_large(gw)
    raw = await read_body(request.receive, limit)
    if raw is None:
        raise too_large(gw)
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise InvalidRequest(
            "We could not parse the JSON body of your request. The body must be a JSON object."
        ) from None
    depth = gw.config.server.max_json_depth
    if raw.count(b"[") + raw.count(b"{") > depth:  # else it cannot nest that deep: no walk
        check_json_depth(body, depth)  # before anything walks it
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("You must provide a model parameter.", param="model")
    field = api.required
    value = body.get(field)
    if value is None or (api.required_list and (not isinstance(value, list) or not value)):
        raise InvalidRequest(
            f"'{field}' is a required property and must not be empty.", param=field
        )
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise InvalidRequest(
            f"'stream' must be a boolean, got {type(stream).__name__}.", param="stream"
        )
    if api.check is not None:
        api.check(body)
    ctx.body = body
    ctx.requested_model = model
    ctx.stream = bool(stream) and api.streams


async def read_body(receive: Receive, limit: int) -> bytes | None:
    """The request body from the ASGI messages (no async generator, as Request.stream()
    has, on the hot path); None past `limit` bytes; ClientLeft if the client goes."""
    chunks = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":  # http.disconnect
            raise ClientLeft
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def too_large(gw: Gateway) -> RequestTooLarge:
    return RequestTooLarge(
        f"The request body is larger than the limit of {gw.config.server.max_body_mb} MB."
    )


def resolve(gw: Gateway, ctx: RequestContext, api: Api) -> list[Deployment]:
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
    plan = gw.router.plan(route)
    if api.name in BASE_OPERATIONS:  # every provider serves these
        return plan
    served = [dep for dep in plan if api.name in operations(gw.providers[dep.provider])]
    if not served:
        raise InvalidRequest(
            f"The model `{ctx.requested_model}` has no deployment that serves {ctx.path} "
            f"(its providers: {', '.join(sorted({d.provider for d in plan}))}).",
            param="model",
        )
    return served
