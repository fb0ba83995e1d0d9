"""The ASGI app: the whole route table in one place, and the lifespan that builds the Gateway.

Every route declares who may call it (route(): PUBLIC, KEY, ADMIN or TRACED); a
GatewayError an endpoint raises is answered in OpenAI's shape by gateway_error."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.config import Config, ConfigError, config_path
from gateway.errors import (
    GatewayError,
    InvalidRequest,
    ModelNotFound,
    PermissionDenied,
)
from gateway.pipeline.apis import CHAT, EMBEDDINGS, MESSAGES, RESPONSES, TEXT_COMPLETION, Api
from gateway.pipeline.count_tokens import count_tokens
from gateway.pipeline.handle import handle
from gateway.pipeline.spend import spend_report
from gateway.server import runtime
from gateway.server.reload import CannotReload, Reloader, bad_key
from gateway.state import Gateway, TelemetryHooks

Endpoint = Callable[[Request], Awaitable[Response]]


SNAPSHOT = "tallygate.gateway"  # the ASGI scope key of the request's Gateway snapshot


def gateway_of(request: Request) -> Gateway:
    """The snapshot the request started on: a config reload meanwhile does not change it."""
    return request.scope[SNAPSHOT]  # type: ignore[no-any-return]


class OnSnapshot:
    """A route's ASGI app, run on the Gateway snapshot current when its request arrives
    (gateway/server/reload.py swaps app.state.gateway): the request reads that snapshot to its end,
    a stream's last byte included, and is counted in its `in_flight` meanwhile, so a reload
    closes a replaced provider only when no request uses it."""

    __slots__ = ("app",)

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        gw = scope[SNAPSHOT] = scope["app"].state.gateway
        gw.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            gw.in_flight -= 1


def inference(api: Api) -> Endpoint:
    async def endpoint(request: Request) -> Response:
        return await handle(gateway_of(request), request, api)

    return endpoint


# The inference routes by exact path, served by GatewayApp without the Starlette router and
# middleware layers (ASGI wrappers that cost each request ~6 µs and do nothing for a handler
# that never raises). The route table below declares the same paths for any other caller.
INFERENCE_PREFIXES = ("/v1", "")
MESSAGES_PREFIXES = ("/v1", "", "/v1/v1")  # /v1/v1: see routes()


def inference_paths() -> dict[str, Api]:
    paths = {}
    for prefix in INFERENCE_PREFIXES:
        for api, tail in (
            (CHAT, "/chat/completions"),
            (TEXT_COMPLETION, "/completions"),
            (EMBEDDINGS, "/embeddings"),
            (RESPONSES, "/responses"),
        ):
            paths[prefix + tail] = api
    for prefix in MESSAGES_PREFIXES:
        paths[prefix + "/messages"] = MESSAGES
    return paths


class GatewayApp(Starlette):
    """Starlette, with POSTs to an inference path handed straight to the pipeline."""

    inference: dict[str, Api]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and not scope.get("root_path"):
            api = self.inference.get(scope["path"])
            if api is not None:
                scope["app"] = self
                gw = scope[SNAPSHOT] = self.state.gateway  # as OnSnapshot does
                gw.in_flight += 1
                try:
                    response = await handle(gw, Request(scope, receive, send), api)
                    await response(scope, receive, send)
                finally:
                    gw.in_flight -= 1
                return
        await super().__call__(scope, receive, send)


# Who may call a route: every route in the table says which (see route()).
PUBLIC = "public"  # probes and the Prometheus scrape
KEY = "key"  # any team key: request.state.principal is the caller
ADMIN = "admin"  # an admin team's key
TRACED = "traced"  # a key, checked by the pipeline as its first stage, so that a refusal
# is traced, counted and logged like any other failed request


def route(path: str, endpoint: Endpoint, method: str, access: str) -> Route:
    """A route of the table; its endpoint wrapped in the key check its `access` needs."""
    if access in (KEY, ADMIN):
        endpoint = authenticated(endpoint, admin=access == ADMIN)
    elif access not in (PUBLIC, TRACED):
        raise ValueError(f"unknown access {access!r} for {path}")
    return Route(path, endpoint, methods=[method])


def authenticated(endpoint: Endpoint, *, admin: bool = False) -> Endpoint:
    """Raises AuthenticationFailed / PermissionDenied (answered by gateway_error)."""

    async def wrapped(request: Request) -> Response:
        principal = gateway_of(request).keys.authenticate(request.headers)
        if admin and not principal.admin:
            raise PermissionDenied("This endpoint needs an admin key.", code="admin_required")
        request.state.principal = principal
        return await endpoint(request)

    return wrapped


def model_object(gw: Gateway, alias: str) -> dict[str, object]:
    return {"id": alias, "object": "model", "created": int(gw.started_at), "owned_by": "tallygate"}


def may_use(gw: Gateway, request: Request, alias: str) -> bool:
    allowed = gw.config.teams[request.state.principal.team].models
    return alias in gw.config.models and (allowed is None or alias in allowed)


async def list_models(request: Request) -> Response:
    gw = gateway_of(request)
    data = [model_object(gw, m) for m in gw.config.models if may_use(gw, request, m)]
    return JSONResponse({"object": "list", "data": data})


async def retrieve_model(request: Request) -> Response:
    """One alias, as in the list; 404 model_not_found for an alias the team may not use,
    as for one that does not exist (which aliases exist is not the caller's to learn)."""
    gw = gateway_of(request)
    alias = request.path_params["model"]
    if not may_use(gw, request, alias):
        raise ModelNotFound(
            f"The model `{alias}` does not exist or you do not have access to it.", param="model"
        )
    return JSONResponse(model_object(gw, alias))


async def counting(request: Request) -> Response:
    return await count_tokens(gateway_of(request), request)


async def admin_spend(request: Request) -> Response:
    gw = gateway_of(request)
    team = request.query_params.get("team")
    return JSONResponse({"object": "list", "data": await spend_report(gw.config, gw.store, team)})


async def admin_reload(request: Request) -> Response:
    """Re-read the config file; every worker of this `tallygate serve` reloads too."""
    reloader: Reloader = request.app.state.reloader
    try:
        done = await reloader.reload("POST /admin/reload")
    except ConfigError as exc:
        raise InvalidRequest(
            f"{exc}\nThe config was not reloaded: the old config keeps serving.",
            param=bad_key(exc),
            code="invalid_config",
        ) from None
    except CannotReload as exc:
        error = InvalidRequest(exc.message, code=exc.code)
        if exc.code == "shutting_down":
            error.status, error.type = 503, "service_unavailable"
        raise error from None
    reloader.tell_other_workers()
    body = {"reloaded": True, "generation": done.generation, "restart_needed": done.restart_needed}
    return JSONResponse(body)


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    gw = gateway_of(request)
    store_ok = False
    try:
        store_ok = await gw.store.ping()
    except Exception:
        store_ok = False
    tokenizer = gw.warming is None or gw.warming.done()
    ready = gw.ready and store_ok and tokenizer
    body = {
        "status": "ready" if ready else "not ready",
        "config": gw.ready,
        "store": store_ok,
        "tokenizer": tokenizer,
    }
    return JSONResponse(body, status_code=200 if ready else 503)


async def metrics(request: Request) -> Response:
    exposition = gateway_of(request).telemetry.metrics_text()
    if exposition is None:  # telemetry.prometheus: false
        return await not_found(request, HTTPException(404))
    body, content_type = exposition
    return Response(body, media_type=content_type)


def routes() -> list[Route]:
    """The route table: path, endpoint, method, and who may call it."""
    table = [route(path, inference(api), "POST", TRACED) for path, api in inference_paths().items()]
    for prefix in INFERENCE_PREFIXES:
        table += [
            route(f"{prefix}/models", list_models, "GET", KEY),
            # :path, so an alias with a slash in it ("org/model") is one id
            route(f"{prefix}/models/{{model:path}}", retrieve_model, "GET", KEY),
        ]
    # Anthropic's Messages API; /v1/v1: the anthropic SDK appends /v1/messages to a base URL
    # that already ends in /v1 (the one OpenAI clients are given)
    for prefix in MESSAGES_PREFIXES:
        table.append(route(f"{prefix}/messages/count_tokens", counting, "POST", TRACED))
    table += [
        route("/admin/spend", admin_spend, "GET", ADMIN),
        route("/admin/reload", admin_reload, "POST", ADMIN),
        route("/healthz", healthz, "GET", PUBLIC),
        route("/readyz", readyz, "GET", PUBLIC),
        route("/metrics", metrics, "GET", PUBLIC),
    ]
    return table


async def gateway_error(request: Request, exc: Exception) -> Response:
    """A GatewayError raised by an endpoint outside the pipeline, in OpenAI's shape."""
    assert isinstance(exc, GatewayError)
    return exc.to_response()


async def not_found(request: Request, exc: Exception) -> Response:
    status = exc.status_code if isinstance(exc, HTTPException) else 404
    if status == 405:
        message, code = (
            f"Method {request.method} is not allowed on {request.url.path}.",
            "method_not_allowed",
        )
    else:
        message, code = f"Unknown path {request.url.path}.", "not_found"
    error = InvalidRequest(message, code=code)
    error.status = status
    return error.to_response()


async def server_error(request: Request, exc: Exception) -> Response:
    return GatewayError("The gateway failed to handle the request.").to_response()


async def freeze_when_warm(gw: Gateway) -> None:
    if gw.warming is not None:
        await asyncio.wait([gw.warming])
    runtime.freeze_startup_heap()


def create_app(
    config: Config,
    hooks: TelemetryHooks | None = None,
    *,
    serving: bool = False,
    source: str | Path | None = None,
) -> Starlette:
    """The app. `serving`: this process exists to serve it (`tallygate serve`), so the
    interpreter's garbage collector is tuned for it (gateway/server/runtime.py) and SIGHUP reloads
    the config. `source`: the config file a reload re-reads; serving, it defaults to the
    one `config` was loaded from ($TALLYGATE_CONFIG, else ./config.yaml)."""
    if source is None and serving:
        source = config_path()
    path = Path(source).resolve() if source is not None else None

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if serving:
            runtime.tune_gc()
        gw = await Gateway.start(config, hooks)
        gw.started_at = time.time()
        app.state.gateway = gw
        app.state.reloader = reloader = await Reloader.for_app(app.state, path)
        if serving:
            gw.tasks.spawn(freeze_when_warm(gw))
            on_sighup(reloader)
        try:
            yield
        finally:
            if serving:
                ignore_sighup()
            await reloader.close()  # the current snapshot, then what replaced ones left open

    app = GatewayApp(
        routes=routes(),
        lifespan=lifespan,
        exception_handlers={
            GatewayError: gateway_error,
            HTTPException: not_found,
            Exception: server_error,
        },
    )
    for route in app.routes:
        if isinstance(route, Route):
            route.app = OnSnapshot(route.app)
    app.inference = inference_paths()
    return app


def on_sighup(reloader: Reloader) -> None:
    """SIGHUP reloads the config (the default action would end the process)."""
    try:
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, reloader.on_sighup)
    except (NotImplementedError, RuntimeError, ValueError):  # no signals here (Windows, a thread)
        pass


def ignore_sighup() -> None:
    """While shutting down: no reload, and not ended by SIGHUP's default action either."""
    with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
        asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
