"""Admin API (``Authorization: Bearer $VELO_ADMIN_KEY``): cache stats, inspect or delete an entry,
purge a scope. Disabled (404) when no admin key is configured."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request

from velo_proxy.errors import ProxyError
from velo_proxy.services import Services
from velo_proxy.state import app_state

admin_router = APIRouter(prefix="/admin")


def _store(request: Request) -> Services:
    state = app_state(request.app)
    state.auth.require_admin(request)
    services = state.services
    if services.store is None:
        raise ProxyError(503, "The semantic store is not available.", code="store_unavailable")
    return services


@admin_router.get("/stats")
async def stats(request: Request) -> dict[str, Any]:
    services = _store(request)
    store_stats = await asyncio.to_thread(services.store.stats)
    return {"store": store_stats, "exact_tier": services.exact.name, "policy": services.policies.current.version,
            "pending_tasks": len(services.background), "load_errors": services.load_errors,
            "live_guard": services.live_guard.stats() if services.live_guard is not None else None,
            "labels": services.labels.name if services.labels is not None else None}


@admin_router.get("/entries/{entry_id}")
async def get_entry(entry_id: str, request: Request) -> dict[str, Any]:
    services = _store(request)
    entry = await asyncio.to_thread(services.store.get, entry_id)
    if entry is None:
        raise ProxyError(404, f"No cache entry '{entry_id}'.", code="entry_not_found")
    return {"id": entry.id, "scope": entry.scope, "kind": entry.kind, "question": entry.question,
            "answer": entry.answer, "model": entry.model, "created_at": entry.created_at,
            "expires_at": entry.expires_at, "use_count": entry.use_count, "cache_value": entry.cache_value}


@admin_router.delete("/entries/{entry_id}")
async def delete_entry(entry_id: str, request: Request) -> dict[str, Any]:
    services = _store(request)
    if not await asyncio.to_thread(services.store.delete, entry_id):
        raise ProxyError(404, f"No cache entry '{entry_id}'.", code="entry_not_found")
    # exact-tier copies of this entry are checked against the store on every hit, so they go stale too
    return {"id": entry_id, "deleted": True}


@admin_router.delete("/scopes/{scope}")
async def purge_scope(scope: str, request: Request) -> dict[str, Any]:
    services = _store(request)
    removed = await asyncio.to_thread(services.store.purge_scope, scope)
    exact_removed = 0
    try:
        exact_removed = await services.exact.purge_scope(scope)
    except Exception as exc:  # noqa: BLE001 - Redis down: its copies are checked against the store anyway
        services.metrics.failures.labels("exact", type(exc).__name__).inc()
    return {"scope": scope, "deleted": removed, "exact_deleted": exact_removed}
