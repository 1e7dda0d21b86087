"""Pure ASGI middleware (no BaseHTTPMiddleware: it buffers and breaks streaming)."""

from __future__ import annotations

import re
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

_VALID_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


class RequestIdMiddleware:
    """Every response carries ``x-velo-request-id``, an id the proxy minted for this request, and
    ``x-request-id``: the client's when it sent a sane one (echoed for tracing), else the minted one.

    Routes see the minted id as ``request.state.request_id``; it is the id of the request in the
    experience stream and a key for POST /v1/feedback. A client's own id is only an echo
    (``request.state.client_request_id``): two clients may send the same one, so nothing is keyed
    by it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = None
        for name, value in scope.get("headers", ()):
            if name == b"x-request-id":
                given = value.decode("latin-1")
                break
        minted = f"req-{uuid.uuid4().hex}"
        client_id = given if given and _VALID_ID.match(given) else None
        state = scope.setdefault("state", {})
        state["request_id"] = minted
        state["client_request_id"] = client_id
        extra = [(b"x-request-id", (client_id or minted).encode()), (b"x-velo-request-id", minted.encode())]

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [h for h in message.get("headers", [])
                           if h[0].lower() not in (b"x-request-id", b"x-velo-request-id")]
                headers.extend(extra)
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, send_with_id)
