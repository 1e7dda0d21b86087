"""The exact tier: answers keyed by the exact request (scope, question, answer-shaping parameters),
looked up before anything is embedded. Redis when configured (shared by the proxies of a node or a
cluster), an in-process LRU otherwise. Failures raise; the engine fails open around them."""

from __future__ import annotations

import abc
import json
import time
from collections import OrderedDict
from typing import Any

PREFIX = "velo:exact:"


def _glob_escape(text: str) -> str:
    """``text`` as a literal in a Redis glob pattern (SCAN MATCH, KEYS)."""
    return "".join("\\" + ch if ch in "*?[]\\" else ch for ch in text)


class ExactTier(abc.ABC):
    name: str

    @abc.abstractmethod
    async def get(self, scope: str, key: str) -> dict[str, Any] | None: ...

    @abc.abstractmethod
    async def set(self, scope: str, key: str, value: dict[str, Any], *, ttl_s: float) -> None: ...

    @abc.abstractmethod
    async def delete(self, scope: str, key: str) -> None: ...

    @abc.abstractmethod
    async def purge_scope(self, scope: str) -> int: ...

    async def ping(self) -> bool:
        return True

    async def aclose(self) -> None:  # noqa: B027
        pass


class LocalExactTier(ExactTier):
    """Bounded LRU with expiry, in this process."""

    name = "local"

    def __init__(self, *, max_entries: int) -> None:
        self.max_entries = max_entries
        self._items: OrderedDict[tuple[str, str], tuple[float, dict[str, Any]]] = OrderedDict()

    async def get(self, scope: str, key: str) -> dict[str, Any] | None:
        item = self._items.get((scope, key))
        if item is None:
            return None
        expires_at, value = item
        if expires_at <= time.time():
            del self._items[(scope, key)]
            return None
        self._items.move_to_end((scope, key))
        return value

    async def set(self, scope: str, key: str, value: dict[str, Any], *, ttl_s: float) -> None:
        if self.max_entries <= 0:
            return
        self._items[(scope, key)] = (time.time() + ttl_s, value)
        self._items.move_to_end((scope, key))
        while len(self._items) > self.max_entries:
            self._items.popitem(last=False)

    async def delete(self, scope: str, key: str) -> None:
        self._items.pop((scope, key), None)

    async def purge_scope(self, scope: str) -> int:
        doomed = [k for k in self._items if k[0] == scope]
        for k in doomed:
            del self._items[k]
        return len(doomed)

    def __len__(self) -> int:
        return len(self._items)


class RedisExactTier(ExactTier):
    """Exact tier in Redis: ``velo:exact:<scope>:<key>`` -> JSON, with a TTL."""

    name = "redis"

    def __init__(self, client: Any) -> None:  # a redis.asyncio.Redis
        self.client = client

    async def get(self, scope: str, key: str) -> dict[str, Any] | None:
        raw = await self.client.get(f"{PREFIX}{scope}:{key}")
        return json.loads(raw) if raw else None

    async def set(self, scope: str, key: str, value: dict[str, Any], *, ttl_s: float) -> None:
        await self.client.set(f"{PREFIX}{scope}:{key}", json.dumps(value, ensure_ascii=False), px=int(ttl_s * 1000))

    async def delete(self, scope: str, key: str) -> None:
        await self.client.delete(f"{PREFIX}{scope}:{key}")

    async def purge_scope(self, scope: str) -> int:
        """Delete the copies of exactly ``scope``: the scope id is matched literally (glob characters
        escaped), and a key of a longer scope that merely starts with ``<scope>:`` is left alone."""
        prefix = f"{PREFIX}{scope}:"
        doomed = []
        async for found in self.client.scan_iter(match=f"{_glob_escape(prefix)}*", count=500):
            name = found.decode() if isinstance(found, bytes) else found
            if name.startswith(prefix) and ":" not in name[len(prefix):]:  # exact keys are hex digests
                doomed.append(name)
        removed = 0
        for i in range(0, len(doomed), 500):
            removed += int(await self.client.delete(*doomed[i:i + 500]))
        return removed

    async def ping(self) -> bool:
        return bool(await self.client.ping())
