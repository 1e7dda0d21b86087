"""The FastAPI application: thin routes over the engine. Long-lived clients (upstream, embedder,
store, Redis) are created in the lifespan and closed there; nothing lives at module level."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError

from velo_proxy import __version__
from velo_proxy.admin import admin_router
from velo_proxy.auth import Authenticator
from velo_proxy.engine import ChatEngine
from velo_proxy.errors import ProxyError, install_error_handlers, validation_error
from velo_proxy.metrics import Metrics
from velo_proxy.middleware import RequestIdMiddleware
from velo_proxy.protocol import (MAX_JSON_DEPTH, ChatCompletionRequest, Feedback, ModelCard, ModelList,
                                 check_chat, check_json)
from velo_proxy.services import Services
from velo_proxy.settings import Settings
from velo_proxy.state import AppState, app_state

log = logging.getLogger("velo_proxy")


async def read_json_body(request: Request, *, limit: int, timeout_s: float) -> dict[str, Any]:
    """The request body as a JSON object, refusing oversized bodies before reading them whole and
    bodies that do not arrive within ``timeout_s`` (a Content-Length longer than what is sent)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ProxyError(413, f"Request body too large ({declared} bytes; limit {limit}).", code="body_too_large")
    body = bytearray()
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                body += chunk
                if len(body) > limit:
                    raise ProxyError(413, f"Request body too large (limit {limit} bytes).", code="body_too_large")
    except TimeoutError:
        # the rest of the body may still arrive: this connection's framing is lost, so close it
        raise ProxyError(408, f"The request body did not arrive within {timeout_s:g} s "
                         f"(received {len(body)} of {declared or 'unknown'} bytes).", code="body_timeout",
                         headers={"connection": "close"}) from None
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise ProxyError(400, "We could not parse the JSON body of your request: it is not valid JSON.",
                         code="invalid_json") from None
    except RecursionError:
        raise ProxyError(400, f"The JSON body is nested deeper than {MAX_JSON_DEPTH} levels.",
                         code="nesting_too_deep") from None
    if not isinstance(data, dict):
        raise ProxyError(400, "The request body must be a JSON object.", code="invalid_json")
    check_json(data)
    return data


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        metrics = Metrics()
        services = await Services.start(settings=settings, metrics=metrics)
        app.state.velo = AppState(
            settings=settings, metrics=metrics, services=services,
            auth=Authenticator(api_keys=[k.get_secret_value() for k in settings.api_keys],
                               admin_key=settings.admin_key.get_secret_value() if settings.admin_key else None),
            engine=ChatEngine(settings=settings, services=services))
        if settings.gc_freeze:
            # what start-up built (litellm, the models, the stores: ~400k objects) lives as long as the
            # process; a full collection scanning it all stalled every request for 100-200 ms about
            # once a second under load (docs/benchmarks.md, speed). Frozen, it is never scanned.
            gc.collect()
            gc.freeze()
        try:
            yield
        finally:
            if settings.gc_freeze:
                gc.unfreeze()  # collectable again once the app is gone (several apps share a test process)
            await services.aclose()
            # FastAPI keeps every endpoint function (and through its closure this app) in module-level caches
            # (fastapi.dependencies.models, up to 4,096 entries): let go of what the lifespan built, or a
            # stopped app would keep its models resident
            del app.state.velo

    app = FastAPI(title="VELO proxy", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None)
    install_error_handlers(app)
    app.add_middleware(RequestIdMiddleware)

    async def read_body(request: Request) -> dict[str, Any]:
        return await read_json_body(request, limit=settings.max_body_bytes, timeout_s=settings.body_read_timeout_s)

    @app.post("/v1/chat/completions")
    @app.post("/chat/completions", include_in_schema=False)
    async def chat_completions(request: Request) -> Response:
        state = app_state(app)
        caller = state.auth.caller(request)
        payload = await read_body(request)
        try:
            chat = ChatCompletionRequest.model_validate(payload)
        except ValidationError as exc:
            raise validation_error(exc) from None
        check_chat(chat)
        ctx = state.engine.context(chat, payload, caller=caller, request_id=request.state.request_id,
                                   headers=request.headers)
        return await state.engine.handle(ctx)

    @app.post("/v1/feedback")
    async def feedback(request: Request) -> JSONResponse:
        state = app_state(app)
        caller = state.auth.caller(request)  # feedback only on this tenant's own responses
        payload = await read_body(request)
        try:
            body = Feedback.model_validate(payload)
        except ValidationError as exc:
            raise validation_error(exc) from None
        return JSONResponse(await state.engine.feedback(body.id, body.score, tenant=caller.tenant))

    @app.get("/v1/models")
    @app.get("/models", include_in_schema=False)
    async def list_models(request: Request) -> JSONResponse:
        state = app_state(app)
        caller = state.auth.caller(request)
        upstream = state.services.upstream
        if upstream.model_map:
            return JSONResponse(ModelList(data=[ModelCard(id=m) for m in upstream.model_map]).model_dump())
        return JSONResponse(await upstream.list_models(client_key=caller.client_key))

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        checks = await app_state(app).services.readiness()
        ready = all(ok for ok, _ in checks.values())
        body = {"status": "ready" if ready else "not ready",
                "checks": {name: {"ok": ok, "detail": detail} for name, (ok, detail) in checks.items()}}
        return JSONResponse(body, status_code=200 if ready else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        state = app_state(app)
        state.services.refresh_gauges()
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4")

    app.include_router(admin_router)
    return app
