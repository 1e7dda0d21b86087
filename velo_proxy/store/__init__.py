"""Cache stores: one contract (``base``), an embedded default and a Qdrant back-end."""

from velo_proxy.store.base import KIND_ANSWER, KIND_QUESTION, CacheEntry, CacheStore, EvictionReport, Hit

__all__ = ["KIND_ANSWER", "KIND_QUESTION", "CacheEntry", "CacheStore", "EvictionReport", "Hit"]
