"""The ASGI app: the whole route table in one place, and the lifespan that builds the Gateway.

Auth applies to every route except the explicit PUBLIC allow-list."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway import runtime
from gateway.apis import CHAT, EMBEDDINGS, RESPONSES, TEXT_COMPLETION, Api
from gateway.config import Config
from gateway.errors import GatewayError, ModelNotFound, PermissionDenied, error_response
from gateway.pipeline import handle
from gateway.spend import spend_report
from gateway.state import Gateway, TelemetryHooks

Endpoint = Callable[[Request], Awaitable[Response]]


def gateway_of(request: Request) -> Gateway:
    return request.app.state.gateway  # type: ignore[no-any-return]


def inference(api: Api) -> Endpoint:
    async def endpoint(request: Request) -> Response:
        return await handle(gateway_of(request), request, api)

    return endpoint


def authenticated(endpoint: Endpoint, *, admin: bool = False) -> Endpoint:
    async def wrapped(request: Request) -> Response:
        gw = gateway_of(request)
        try:
            principal = gw.keys.authenticate(request.headers)
            if admin and not principal.admin:
                raise PermissionDenied("This endpoint needs an admin key.", code="admin_required")
        except GatewayError as exc:
            return exc.to_response()
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
        return ModelNotFound(
            f"The model `{alias}` does not exist or you do not have access to it.", param="model"
        ).to_response()
    return JSONResponse(model_object(gw, alias))


async def admin_spend(request: Request) -> Response:
    gw = gateway_of(request)
    team = request.query_params.get("team")
    return JSONResponse({"object": "list", "data": await spend_report(gw.config, gw.store, team)})


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
    table: list[Route] = []
    for prefix in ("/v1", ""):
        table += [
            Route(f"{prefix}/chat/completions", inference(CHAT), methods=["POST"]),
            Route(f"{prefix}/completions", inference(TEXT_COMPLETION), methods=["POST"]),
            Route(f"{prefix}/embeddings", inference(EMBEDDINGS), methods=["POST"]),
            Route(f"{prefix}/responses", inference(RESPONSES), methods=["POST"]),
            Route(f"{prefix}/models", authenticated(list_models), methods=["GET"]),
            # :path, so an alias with a slash in it ("org/model") is one id
            Route(
                f"{prefix}/models/{{model:path}}", authenticated(retrieve_model), methods=["GET"]
            ),
        ]
    table += [
        Route("/admin/spend", authenticated(admin_spend, admin=True), methods=["GET"]),
        # PUBLIC: probes and the Prometheus scrape.
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ]
    return table


async def not_found(request: Request, exc: Exception) -> Response:
    status = exc.status_code if isinstance(exc, HTTPException) else 404
    if status == 405:
        message, code = (
            f"Method {request.method} is not allowed on {request.url.path}.",
            "method_not_allowed",
        )
    else:
        message, code = f"Unknown path {request.url.path}.", "not_found"
    body = {
        "error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}
    }
    return error_response(status, body)


async def server_error(request: Request, exc: Exception) -> Response:
    return GatewayError("The gateway failed to handle the request.").to_response()


async def freeze_when_warm(gw: Gateway) -> None:
    if gw.warming is not None:
        await asyncio.wait([gw.warming])
    runtime.freeze_startup_heap()


def create_app(
    config: Config, hooks: TelemetryHooks | None = None, *, serving: bool = False
) -> Starlette:
    """The app. `serving`: this process exists to serve it (`tallygate serve`), so the
    interpreter's garbage collector is tuned for it (gateway/runtime.py)."""

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if serving:
            runtime.tune_gc()
        gw = await Gateway.start(config, hooks)
        gw.started_at = time.time()
        app.state.gateway = gw
        if serving:
            gw.tasks.spawn(freeze_when_warm(gw))
        try:
            yield
        finally:
            await gw.close()

    return Starlette(
        routes=routes(),
        lifespan=lifespan,
        exception_handlers={HTTPException: not_found, Exception: server_error},
    )
