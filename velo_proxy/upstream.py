"""The upstream LLM, reached through litellm used as a library.

``Upstream`` resolves the client's model name to a litellm model string, calls it, and turns every
failure into a ``ProxyError`` with the status the client should see: upstream 4xx relayed as is,
upstream 5xx -> 502, unreachable -> 502, timeout -> 504. Responses are cleaned of litellm's
bookkeeping fields so clients get plain OpenAI objects.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, AsyncIterator

import httpx

import velo_proxy  # noqa: F401  (sets LITELLM_LOCAL_MODEL_COST_MAP before litellm is imported)
from velo_proxy.errors import ProxyError

log = logging.getLogger("velo_proxy.upstream")

# Fields litellm adds to OpenAI objects; dropped when they carry nothing.
_LITELLM_NOISE = ("provider_specific_fields", "citations", "moderation", "service_tier", "function_call",
                  "tool_calls", "audio", "refusal", "reasoning_content", "thinking_blocks", "annotations")


def _litellm():
    import litellm  # imported lazily: ~5 s, and only the upstream needs it

    litellm.suppress_debug_info = True
    litellm.drop_params = False
    return litellm


def _prune(obj: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in obj.items() if not (k in _LITELLM_NOISE and not v)}


def _drop_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    return value


def clean_completion(data: dict[str, Any]) -> dict[str, Any]:
    data = _prune(data)
    for choice in data.get("choices") or []:
        choice.pop("provider_specific_fields", None)
        if isinstance(choice.get("message"), dict):
            choice["message"] = _prune(choice["message"])
    if isinstance(data.get("usage"), dict):
        data["usage"] = _drop_none(data["usage"])
    return data


def clean_chunk(data: dict[str, Any]) -> dict[str, Any]:
    data = _prune(data)
    choices = data.get("choices") or []
    for choice in choices:
        if isinstance(choice.get("delta"), dict):
            choice["delta"] = {k: v for k, v in _prune(choice["delta"]).items() if v is not None}
    if data.get("usage"):
        data["usage"] = _drop_none(data["usage"])
        # The usage chunk of stream_options.include_usage has no choices in the OpenAI protocol;
        # litellm adds an empty one.
        if all(not c.get("delta") and c.get("finish_reason") is None for c in choices):
            data["choices"] = []
    return data


def map_upstream_error(exc: BaseException) -> ProxyError:
    """Translate a litellm/openai/httpx failure into what the client sees."""
    if isinstance(exc, ProxyError):
        return exc
    name = type(exc).__name__
    status = getattr(exc, "status_code", None)
    text = str(exc)
    if name in ("Timeout", "APITimeoutError") or isinstance(exc, (httpx.TimeoutException, TimeoutError)):
        return ProxyError(504, "The upstream model did not answer in time.", code="upstream_timeout")
    if "Connection error" in text or name in ("APIConnectionError",) or isinstance(exc, httpx.TransportError):
        if name == "MidStreamFallbackError" or "payload is not completed" in text:
            return ProxyError(502, "The upstream stream broke off before it completed.", code="upstream_stream_broken")
        return ProxyError(502, "The upstream model is unreachable.", code="upstream_unreachable")
    if name == "MidStreamFallbackError":
        return ProxyError(502, "The upstream stream broke off before it completed.", code="upstream_stream_broken")
    body = getattr(exc, "body", None)
    upstream_error = body.get("error", body) if isinstance(body, dict) else None
    message = None
    if isinstance(upstream_error, dict):
        message = upstream_error.get("message")
    if not message:
        # litellm prefixes "litellm.XError: OpenAIException - <upstream message>"
        message = text.split(" - ", 1)[-1].strip() if " - " in text else text
    if isinstance(status, int) and 400 <= status < 500:
        return ProxyError(
            status,
            message or f"Upstream rejected the request ({status}).",
            type=(upstream_error or {}).get("type") if isinstance(upstream_error, dict) else None,
            param=(upstream_error or {}).get("param") if isinstance(upstream_error, dict) else None,
            code=(upstream_error or {}).get("code") if isinstance(upstream_error, dict) else None,
        )
    shown = f" ({status})" if isinstance(status, int) else ""
    return ProxyError(502, f"The upstream model failed{shown}: {message[:500]}", code="upstream_error")


@dataclass(frozen=True, slots=True)
class Target:
    """Where one client model name goes."""

    litellm_model: str
    api_base: str | None


class Upstream:
    """Calls the upstream LLM. Created in the app's lifespan; ``aclose`` releases its HTTP client."""

    def __init__(self, *, base_url: str | None, api_key: str | None, model_map: dict[str, str],
                 timeout_s: float, max_retries: int = 0) -> None:
        self.base_url = base_url
        self._api_key = api_key
        self.model_map = dict(model_map)
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self._http: httpx.AsyncClient | None = None

    async def start(self) -> None:
        self._http = httpx.AsyncClient(timeout=self.timeout_s)
        _litellm()  # pay the import at start-up, not on the first request

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    def resolve(self, model: str) -> Target:
        if self.model_map:
            if model not in self.model_map:
                raise ProxyError(404, f"The model '{model}' does not exist on this proxy.", param="model",
                                 code="model_not_found")
            target = self.model_map[model]
            # An explicit provider string stands on its own; base URL only for OpenAI-compatible ones.
            api_base = self.base_url if target.split("/", 1)[0] in ("openai", "hosted_vllm") else None
            return Target(target, api_base)
        if not self.base_url:
            raise ProxyError(503, "No upstream is configured (set VELO_UPSTREAM_BASE_URL).", code="no_upstream")
        return Target(f"openai/{model}", self.base_url)

    def _kwargs(self, payload: dict[str, Any], target: Target, client_key: str | None) -> dict[str, Any]:
        kwargs = dict(payload)
        kwargs["model"] = target.litellm_model
        if target.api_base:
            kwargs["api_base"] = target.api_base
        # Without a configured key the client's own bearer goes upstream (pure pass-through use).
        key = self._api_key or client_key
        kwargs["api_key"] = key or "no-key"
        kwargs["timeout"] = self.timeout_s
        kwargs["num_retries"] = self.max_retries
        return kwargs

    async def complete(self, payload: dict[str, Any], *, client_key: str | None = None) -> dict[str, Any]:
        """One non-streaming completion, as a plain OpenAI ``chat.completion`` dict."""
        target = self.resolve(payload["model"])
        litellm = _litellm()
        try:
            response = await litellm.acompletion(**self._kwargs(payload, target, client_key))
        except Exception as exc:  # noqa: BLE001 - every upstream failure becomes a ProxyError
            raise map_upstream_error(exc) from exc
        data = clean_completion(response.model_dump())
        data["model"] = payload["model"]
        return data

    async def stream(self, payload: dict[str, Any], *, client_key: str | None = None) -> AsyncIterator[dict[str, Any]]:
        """Open a stream; errors before the first chunk raise here (so the client gets a status),
        errors after it raise from the returned iterator."""
        target = self.resolve(payload["model"])
        litellm = _litellm()
        kwargs = self._kwargs(payload, target, client_key)
        kwargs["stream"] = True
        try:
            response = await litellm.acompletion(**kwargs)
            iterator = response.__aiter__()
            first = await iterator.__anext__()
        except StopAsyncIteration:
            raise ProxyError(502, "The upstream stream ended without any chunk.", code="upstream_stream_broken")
        except Exception as exc:  # noqa: BLE001
            raise map_upstream_error(exc) from exc
        return self._relay(first, iterator, payload["model"])

    async def _relay(self, first: Any, iterator: Any, model: str) -> AsyncIterator[dict[str, Any]]:
        chunk = first
        while True:
            data = clean_chunk(chunk.model_dump())
            data["model"] = model
            yield data
            try:
                chunk = await iterator.__anext__()
            except StopAsyncIteration:
                return
            except Exception as exc:  # noqa: BLE001
                raise map_upstream_error(exc) from exc

    async def list_models(self, *, client_key: str | None = None) -> dict[str, Any]:
        """The upstream's /models (used when no model map is configured)."""
        if not self.base_url:
            raise ProxyError(503, "No upstream is configured (set VELO_UPSTREAM_BASE_URL).", code="no_upstream")
        assert self._http is not None, "Upstream.start() was not called"
        key = self._api_key or client_key
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        try:
            response = await self._http.get(f"{self.base_url}/models", headers=headers)
        except Exception as exc:  # noqa: BLE001
            raise map_upstream_error(exc) from exc
        if response.status_code >= 400:
            try:
                body = response.json()
            except ValueError:
                body = None
            message = (body or {}).get("error", {}).get("message") if isinstance(body, dict) else None
            status = response.status_code if response.status_code < 500 else 502
            raise ProxyError(status, message or f"Upstream /models failed ({response.status_code}).")
        return response.json()
