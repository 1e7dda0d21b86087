"""Who is asking: proxy API keys map to tenants (the cache scope's first part); the admin key opens
the admin API."""

from __future__ import annotations

import hashlib
import hmac

from fastapi import Request

from velo_proxy.errors import ProxyError
from velo_proxy.pipeline.context import Caller


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
