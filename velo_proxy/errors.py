"""One error type and one envelope: every failure leaves the proxy as
``{"error": {"message", "type", "param", "code"}}`` with the right HTTP status, never a bare 500."""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from velo_proxy.state import find_state

log = logging.getLogger("velo_proxy")

_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    502: "upstream_error",
    503: "service_unavailable",
    504: "upstream_timeout",
}


class ProxyError(Exception):
    """An error answered to the client in the OpenAI envelope."""

    def __init__(self, status: int, message: str, *, type: str | None = None, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or _TYPE_BY_STATUS.get(status, "server_error" if status >= 500 else "invalid_request_error")
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def error_event(error: ProxyError) -> bytes:
    """An SSE event the OpenAI SDKs turn into an exception (used when a stream breaks mid-way)."""
    return b"data: " + json.dumps(error.body()).encode() + b"\n\n"


def _validation_param(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc if p not in ("body",)]
    return ".".join(parts) or "body"


def validation_error(exc: Any) -> ProxyError:
    """The first pydantic error, with the offending field named the way OpenAI names it."""
    errors = exc.errors() if hasattr(exc, "errors") else []
    if not errors:
        return ProxyError(400, "Invalid request body.")
    first = errors[0]
    param = _validation_param(tuple(first.get("loc", ())))
    msg = first.get("msg", "invalid value")
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return ProxyError(400, f"Invalid value for '{param}': {msg}{more}", param=param, code="invalid_value")


class EnvelopeMiddleware:
    """The last line of defence: an exception no handler answered becomes a 500 in the envelope and
    the connection stays usable. (Starlette's own catch-all answers too, but then re-raises, and
    uvicorn drops the connection without ``Connection: close``: the client's next request on its
    pooled connection fails.) Once the headers are out, the body is ended cleanly instead, with an
    error event first for a stream."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = {"started": False, "ended": False, "sse": False}

        async def tracking_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                state["started"] = True
                state["sse"] = any(k.lower() == b"content-type" and v.startswith(b"text/event-stream")
                                   for k, v in message.get("headers", []))
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                state["ended"] = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:  # noqa: BLE001 - answered below, never re-raised
            log.error("unhandled error: %s", type(exc).__name__, exc_info=exc)
            app_state = find_state(scope.get("app"))
            if app_state is not None:
                app_state.metrics.errors.labels("500").inc()
            error = ProxyError(500, "Internal proxy error.", type="server_error")
            if not state["started"]:
                await error.response()(scope, receive, send)
            elif not state["ended"]:
                body = error_event(error) if state["sse"] else b""
                await send({"type": "http.response.body", "body": body, "more_body": False})


def install_error_handlers(app: FastAPI) -> None:
    def _count(request: Request, status: int) -> None:
        state = find_state(request.app)
        if state is not None:
            state.metrics.errors.labels(str(status)).inc()

    @app.exception_handler(ProxyError)
    async def _proxy_error(request: Request, exc: ProxyError) -> JSONResponse:
        _count(request, exc.status)
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        _count(request, 400)
        return validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        _count(request, exc.status_code)
        message = exc.detail if isinstance(exc.detail, str) else "HTTP error"
        if exc.status_code == 404:
            message = "Unknown endpoint."
        elif exc.status_code == 405:
            message = "Method not allowed for this endpoint."
        return ProxyError(exc.status_code, message).response()

    # innermost of the middlewares added after this call (e.g. the request id still gets added)
    app.add_middleware(EnvelopeMiddleware)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        _count(request, 500)
        # A bug of ours: log it, answer in the envelope (never an HTML page or a bare 500 body).
        log.exception("unhandled error: %s", type(exc).__name__)
        return ProxyError(500, "Internal proxy error.", type="server_error").response()
