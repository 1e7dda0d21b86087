"""Cache stores: one contract (``base``), an embedded default and a Qdrant back-end."""

from __future__ import annotations

from typing import TYPE_CHECKING

from velo_proxy.store.base import KIND_ANSWER, KIND_QUESTION, CacheEntry, CacheStore, EvictionReport, Hit

if TYPE_CHECKING:
    from velo_proxy.settings import Settings

__all__ = ["KIND_ANSWER", "KIND_QUESTION", "CacheEntry", "CacheStore", "EvictionReport", "Hit", "open_store"]


def open_store(settings: "Settings", *, dim: int, embedder_id: str | None = None) -> CacheStore:
    """The configured back-end: Qdrant when ``settings.qdrant_url`` is set, else the embedded store
    under ``settings.data_dir / "store"``. ``embedder_id`` is recorded with the vectors; a store built by
    another embedder is refused."""
    if settings.qdrant_url:
        from velo_proxy.store.qdrant import QdrantStore

        key = settings.qdrant_api_key.get_secret_value() if settings.qdrant_api_key is not None else None
        return QdrantStore(settings.qdrant_url, dim=dim, collection=settings.qdrant_collection, api_key=key,
                           embedder_id=embedder_id)
    from velo_proxy.store.embedded import EmbeddedStore

    return EmbeddedStore(settings.data_dir / "store", dim=dim, embedder_id=embedder_id)
