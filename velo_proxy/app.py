"""The FastAPI application: thin routes over the engine. Long-lived clients (upstream, embedder,
store, Redis) are created in the lifespan and closed there; nothing lives at module level."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError

from velo_proxy import __version__
from velo_proxy.admin import admin_router
from velo_proxy.engine import ChatEngine
from velo_proxy.errors import ProxyError, install_error_handlers, validation_error
from velo_proxy.metrics import Metrics
from velo_proxy.middleware import RequestIdMiddleware
from velo_proxy.protocol import (MAX_JSON_DEPTH, ChatCompletionRequest, Feedback, ModelCard, ModelList,
                                 check_chat, check_json)
from velo_proxy.services import Services
from velo_proxy.settings import Settings

log = logging.getLogger("velo_proxy")


@dataclass(frozen=True, slots=True)
class Caller:
    """Who is asking. ``tenant`` scopes the cache; ``client_key`` may be forwarded upstream only when
    the proxy has no keys of its own (pass-through use)."""

    tenant: str
    client_key: str | None


def _bearer(request: Request) -> str | None:
    value = request.headers.get("authorization", "")
    scheme, _, token = value.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _key_id(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:16]


class Authenticator:
    def __init__(self, *, api_keys: list[str], admin_key: str | None) -> None:
        self._keys = [k.encode() for k in api_keys]
        self._admin = admin_key.encode() if admin_key else None

    def caller(self, request: Request) -> Caller:
        token = _bearer(request)
        narrowed = request.headers.get("x-velo-tenant", "").strip()
        if not self._keys:
            return Caller(tenant=narrowed or "default", client_key=token)
        if token is None:
            raise ProxyError(401, "Missing API key: send 'Authorization: Bearer <key>'.", code="missing_api_key")
        encoded = token.encode()
        # compare against every key so timing does not reveal which prefix matched
        matched = [hmac.compare_digest(encoded, k) for k in self._keys]
        if not any(matched):
            raise ProxyError(401, "Invalid API key.", code="invalid_api_key")
        base = f"key:{_key_id(token)}"
        # a client header can only narrow the scope inside its own key
        return Caller(tenant=f"{base}/{narrowed}" if narrowed else base, client_key=None)

    def require_admin(self, request: Request) -> None:
        if self._admin is None:
            raise ProxyError(404, "The admin API is disabled (set VELO_ADMIN_KEY).", code="admin_disabled")
        token = _bearer(request)
        if token is None or not hmac.compare_digest(token.encode(), self._admin):
            raise ProxyError(401, "Invalid admin key.", code="invalid_admin_key")


async def read_json_body(request: Request, *, limit: int, timeout_s: float = 30.0) -> dict[str, Any]:
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
        services = await Services.start(settings=settings, metrics=app.state.metrics)
        app.state.services = services
        app.state.engine = ChatEngine(settings=settings, services=services)
        try:
            yield
        finally:
            await services.aclose()

    app = FastAPI(title="VELO proxy", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.settings = settings
    app.state.metrics = Metrics()
    app.state.auth = Authenticator(
        api_keys=[k.get_secret_value() for k in settings.api_keys],
        admin_key=settings.admin_key.get_secret_value() if settings.admin_key else None,
    )
    install_error_handlers(app)
    app.add_middleware(RequestIdMiddleware)

    @app.post("/v1/chat/completions")
    @app.post("/chat/completions", include_in_schema=False)
    async def chat_completions(request: Request) -> Response:
        caller = app.state.auth.caller(request)
        payload = await read_json_body(request, limit=settings.max_body_bytes,
                                       timeout_s=settings.body_read_timeout_s)
        try:
            chat = ChatCompletionRequest.model_validate(payload)
        except ValidationError as exc:
            raise validation_error(exc) from None
        check_chat(chat)
        return await app.state.engine.handle(chat, payload, caller=caller, request=request)

    @app.post("/v1/feedback")
    async def feedback(request: Request) -> JSONResponse:
        caller = app.state.auth.caller(request)  # feedback only on this tenant's own responses
        payload = await read_json_body(request, limit=settings.max_body_bytes,
                                       timeout_s=settings.body_read_timeout_s)
        try:
            body = Feedback.model_validate(payload)
        except ValidationError as exc:
            raise validation_error(exc) from None
        return JSONResponse(await app.state.engine.feedback(body.id, body.score, tenant=caller.tenant))

    @app.get("/v1/models")
    @app.get("/models", include_in_schema=False)
    async def list_models(request: Request) -> JSONResponse:
        caller = app.state.auth.caller(request)
        upstream = app.state.services.upstream
        if upstream.model_map:
            return JSONResponse(ModelList(data=[ModelCard(id=m) for m in upstream.model_map]).model_dump())
        return JSONResponse(await upstream.list_models(client_key=caller.client_key))

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        checks = await app.state.services.readiness()
        ready = all(ok for ok, _ in checks.values())
        body = {"status": "ready" if ready else "not ready",
                "checks": {name: {"ok": ok, "detail": detail} for name, (ok, detail) in checks.items()}}
        return JSONResponse(body, status_code=200 if ready else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        app.state.services.refresh_gauges()
        return Response(app.state.metrics.render(), media_type="text/plain; version=0.0.4")

    app.include_router(admin_router)
    return app
