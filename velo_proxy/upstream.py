"""The upstream LLM, reached through litellm used as a library.

``Upstream`` resolves the client's model name to a litellm model string, calls it, and turns every
failure into a ``ProxyError`` with the status the client should see: upstream 4xx relayed as is,
upstream 5xx -> 502, unreachable -> 502, timeout -> 504. Responses are cleaned of litellm's
bookkeeping fields so clients get plain OpenAI objects.
"""

from __future__ import annotations

import json
import logging
import re
import zlib
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, AsyncIterator, Iterable

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


# ----- what the upstream itself said ------------------------------------------------------------
# litellm normalises what it parses: a finish_reason that is null or absent comes out as "stop", and a
# stream that simply ends (no finish chunk, no [DONE]) looks like one that completed. Nothing in
# litellm's objects tells the two apart, and the cache must store only answers the upstream said were
# complete. So the proxy reads the upstream's own bytes: for OpenAI-compatible targets it hands
# litellm an HTTP client (``TappedClient``) that tees every response body into a ``RawTap``. This is the
# robust choice: litellm still builds, sends, retries and parses every call (no second HTTP client
# of ours to keep in step with litellm's request shaping), and the tap sees exactly the bytes
# litellm parsed, so it holds whatever litellm's internals do with them (its hidden params and
# logging objects change between versions and carry the normalised value). Anything the tap cannot
# read (an unknown content-encoding, a body that is not JSON) counts as "not said": relayed, never
# cached. The tap of a call is found through a context variable set around the litellm call; the
# client reads it when the request goes out, in the caller's context.
#
# Anthropic targets (``anthropic/...``) go through the same client: litellm's Anthropic handler takes
# our AsyncHTTPHandler, and the tap reads the Messages API's own account (``stop_reason`` in the JSON;
# for a stream, the ``message_delta`` event's ``stop_reason`` and the closing ``message_stop`` event)
# instead of litellm's mapping, which turns any stop reason it does not know (``pause_turn``) into "stop".
_TAP: ContextVar["RawTap | None"] = ContextVar("velo_raw_tap", default=None)
OPENAI_WIRE, ANTHROPIC_WIRE = "openai", "anthropic"
_WIRE_OF_PROVIDER = {"openai": OPENAI_WIRE, "hosted_vllm": OPENAI_WIRE, "anthropic": ANTHROPIC_WIRE}
# Anthropic's stop reasons in OpenAI's words (litellm's own mapping, for the values it knows); any
# other value is relayed as sent and, not being "stop", is never cached.
_ANTHROPIC_FINISH = {"end_turn": "stop", "stop_sequence": "stop", "max_tokens": "length", "tool_use": "tool_calls",
                     "refusal": "content_filter", "compaction": "length"}
# What the proxy reads past the point where litellm stopped reading a stream, at most.
_DRAIN_MAX_BYTES = 64 * 1024

# The request fields of OpenAI's chat completions API (passed to litellm as arguments; see _kwargs).
_OPENAI_CHAT_FIELDS = frozenset({
    "model", "messages", "audio", "frequency_penalty", "function_call", "functions", "logit_bias", "logprobs",
    "max_completion_tokens", "max_tokens", "metadata", "modalities", "n", "parallel_tool_calls", "prediction",
    "presence_penalty", "prompt_cache_key", "reasoning_effort", "response_format", "safety_identifier", "seed",
    "service_tier", "stop", "store", "stream", "stream_options", "temperature", "thinking", "tool_choice", "tools",
    "top_logprobs", "top_p", "user", "verbosity", "web_search_options",
})


class RawTap:
    """The upstream's own account of one call: each choice's ``finish_reason`` as sent (None when
    null or absent) and, for a stream, whether its end marker came (OpenAI: ``[DONE]``; Anthropic:
    ``message_stop``). ``wire`` is the format of the bytes; Anthropic's single answer is choice 0 and
    its stop reason is given in OpenAI's words."""

    def __init__(self, wire: str = OPENAI_WIRE) -> None:
        self.wire = wire
        self.requests = 0  # requests sent (0: litellm failed before sending anything)
        self._reset("")

    def _reset(self, content_type: str, encoding: str = "") -> None:
        self._body: _TeeStream | None = None
        self.sse = content_type.startswith("text/event-stream")
        self.readable = True
        self.done = False
        self._finish: dict[int, str | None] = {}
        self._buffer = bytearray()
        self._parsed = False
        encoding = encoding.strip().lower()
        self._decoder = None
        if encoding == "gzip":
            self._decoder = zlib.decompressobj(16 + zlib.MAX_WBITS)
        elif encoding == "deflate":
            self._decoder = zlib.decompressobj()
        elif encoding not in ("", "identity"):
            self.readable = False  # br, zstd, ...: we asked for gzip/deflate only

    def response(self, headers: httpx.Headers, body: "_TeeStream | None" = None) -> None:
        """A new response (a retry replaces the previous one)."""
        self._reset(headers.get("content-type", ""), headers.get("content-encoding", ""))
        self._body = body

    async def drain(self) -> None:
        """Read what the parser left of a stream's body: litellm's Anthropic stream stops at the
        stop reason, before the ``message_stop`` event that says the stream is complete. Failing to
        read it leaves the stream unfinished (relayed, never cached)."""
        if self._body is None or self.done:
            return
        try:
            await self._body.drain(_DRAIN_MAX_BYTES)
        except Exception as exc:  # noqa: BLE001
            log.info("could not read the rest of the upstream stream: %s", exc)

    def feed(self, data: bytes) -> None:
        if not self.readable:
            return
        if self._decoder is not None:
            try:
                data = self._decoder.decompress(data)
            except zlib.error:
                self.readable = False
                return
        self._buffer += data
        if self.sse:
            *lines, rest = bytes(self._buffer).split(b"\n")
            self._buffer = bytearray(rest)
            for line in lines:
                self._sse_line(line.rstrip(b"\r"))

    def _sse_line(self, line: bytes) -> None:
        if not line.startswith(b"data:"):
            return
        payload = line[5:].strip()
        if payload == b"[DONE]":
            self.done = True
            return
        try:
            event = json.loads(payload)
        except ValueError:
            return
        if not isinstance(event, dict):
            return
        if self.wire == ANTHROPIC_WIRE:
            delta = event.get("delta")
            if event.get("type") == "message_delta" and isinstance(delta, dict) and delta.get("stop_reason"):
                self._finish[0] = _anthropic_finish(delta["stop_reason"])
            elif event.get("type") == "message_stop":
                self.done = True
            return
        choices = event.get("choices")
        for position, choice in enumerate(choices if isinstance(choices, list) else []):
            if isinstance(choice, dict) and choice.get("finish_reason") is not None:
                self._finish[_choice_index(choice, position)] = choice["finish_reason"]

    def finish_reasons(self) -> dict[int, str | None] | None:
        """Choice index -> finish_reason as the upstream sent it (absent = None); None when the
        body could not be read."""
        if not self.readable:
            return None
        if not self.sse and not self._parsed:
            self._parsed = True
            try:
                body = json.loads(bytes(self._buffer))
            except ValueError:
                self.readable = False
                return None
            if self.wire == ANTHROPIC_WIRE:
                if isinstance(body, dict) and body.get("type") == "message":
                    self._finish[0] = _anthropic_finish(body.get("stop_reason"))
                return self._finish
            choices = body.get("choices") if isinstance(body, dict) else None
            for position, choice in enumerate(choices if isinstance(choices, list) else []):
                if isinstance(choice, dict):
                    self._finish[_choice_index(choice, position)] = choice.get("finish_reason")
        return self._finish


def _anthropic_finish(stop_reason: Any) -> str | None:
    if not isinstance(stop_reason, str) or not stop_reason:
        return None
    return _ANTHROPIC_FINISH.get(stop_reason, stop_reason)


def _choice_index(choice: dict[str, Any], position: int) -> int:
    index = choice.get("index", position)
    return index if isinstance(index, int) else position


class _TeeStream(httpx.AsyncByteStream):
    def __init__(self, inner: httpx.AsyncByteStream, tap: RawTap) -> None:
        self._inner = inner
        self._tap = tap
        self._chunks: AsyncIterator[bytes] | None = None  # one iterator of the body, shared with ``drain``

    def _source(self) -> AsyncIterator[bytes]:
        if self._chunks is None:
            self._chunks = self._inner.__aiter__()
        return self._chunks

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._source():
            self._tap.feed(chunk)
            yield chunk

    async def drain(self, max_bytes: int) -> None:
        """Read on where the reader stopped, up to the tap's end marker, the body's end or
        ``max_bytes``. Called only while the reader is not reading (its stream ended)."""
        source, read = self._source(), 0
        while read < max_bytes and not self._tap.done:
            try:
                chunk = await source.__anext__()
            except StopAsyncIteration:
                return
            self._tap.feed(chunk)
            read += len(chunk)

    async def aclose(self) -> None:
        await self._inner.aclose()


class TappedClient(httpx.AsyncClient):
    """An httpx client that shows the current call's ``RawTap`` the body of every response it
    returns. It wraps ``send`` (which both litellm's OpenAI SDK client and its own HTTP handler call)
    rather than a transport, so requests through environment proxies (mounted transports) and
    redirects are tapped as well."""

    async def send(self, request: httpx.Request, *, stream: bool = False, **kwargs: Any) -> httpx.Response:
        tap = _TAP.get()
        if tap is None:
            return await super().send(request, stream=stream, **kwargs)
        tap.requests += 1
        response = await super().send(request, stream=True, **kwargs)
        response.stream = body = _TeeStream(response.stream, tap)  # the raw (still encoded) body
        tap.response(response.headers, body)
        if not stream:
            try:
                await response.aread()
            except BaseException:
                await response.aclose()
                raise
        return response


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
    message = re.sub(r"^litellm\.\w+: ", "", message or "")
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


def _map_error(exc: BaseException, tap: RawTap | None) -> ProxyError:
    """``map_upstream_error``, except that litellm refusing the request before anything was sent
    (its own checks of the input: a 400 in the upstream's place) is the client's error, not a 502."""
    error = map_upstream_error(exc)
    if tap is not None and tap.requests == 0 and error.status == 502:
        log.warning("litellm refused the request before sending it: %s", exc)
        text = str(exc)
        message = text.split(" - ", 1)[-1].strip() if " - " in text else text
        return ProxyError(400, f"The request is not valid for the upstream: {message[:500]}", code="invalid_request")
    return error


class UpstreamStream:
    """The chunks of one upstream stream, relayed as the upstream sent them, and once iterated to
    the end, what the upstream said about that end (``finished``, ``end_marker``)."""

    def __init__(self, first: Any, iterator: Any, model: str, tap: RawTap | None, *, trusted: bool = True) -> None:
        self._first = first
        self._trusted = trusted  # False: an untapped provider litellm's word is not taken for
        self._iterator = iterator
        self._model = model
        self._tap = tap
        self._finish: str | None = None  # choice 0's finish_reason as relayed

    @property
    def end_marker(self) -> bool:
        """Whether to send ``[DONE]``: the upstream ended its stream (or its bytes are not ours to read)."""
        return self._tap is None or not self._tap.readable or self._tap.done

    @property
    def finished(self) -> bool:
        """The upstream itself said the answer is complete: finish_reason "stop" and, when we read
        its bytes, its end marker. Only such a stream may be cached."""
        if self._tap is not None and not (self._tap.readable and self._tap.done):
            return False
        return self._trusted and self._finish == "stop"

    def __aiter__(self) -> AsyncIterator[dict[str, Any]]:
        return self._relay()

    async def _relay(self) -> AsyncIterator[dict[str, Any]]:
        chunk = self._first
        said = self._tap.finish_reasons() if self._tap is not None else None  # live view, filled as bytes pass
        while True:
            data = clean_chunk(chunk.model_dump())
            data["model"] = self._model
            choices = data.get("choices") or []
            if said is not None:
                for position, choice in enumerate(choices):
                    if choice.get("finish_reason") is not None:  # litellm's: maybe made up
                        choice["finish_reason"] = said.get(_choice_index(choice, position))
            for position, choice in enumerate(choices):
                if _choice_index(choice, position) == 0 and choice.get("finish_reason") is not None:
                    self._finish = choice["finish_reason"]
            invented = said is not None and choices and not data.get("usage") and all(
                not c.get("delta") and c.get("finish_reason") is None for c in choices)
            if not invented:  # a closing chunk litellm made up carries nothing once its "stop" is gone
                yield data
            try:
                chunk = await self._iterator.__anext__()
            except StopAsyncIteration:
                if self._tap is not None:
                    await self._tap.drain()
                return
            except Exception as exc:  # noqa: BLE001
                raise map_upstream_error(exc) from exc


@dataclass(frozen=True, slots=True)
class Target:
    """Where one client model name goes."""

    litellm_model: str
    api_base: str | None


class Upstream:
    """Calls the upstream LLM. Created in the app's lifespan; ``aclose`` releases its HTTP client."""

    def __init__(self, *, base_url: str | None, api_key: str | None, model_map: dict[str, str],
                 timeout_s: float, max_retries: int = 0,
                 trusted_finish_providers: Iterable[str] = ()) -> None:
        self.base_url = base_url
        # Providers whose bytes we do not read are cached only when the operator trusts litellm's
        # finish_reason for them (it says "stop" for answers whose upstream never did).
        self.trusted_finish_providers = frozenset(trusted_finish_providers)
        self._warned_untrusted: set[str] = set()
        self._api_key = api_key
        self.model_map = dict(model_map)
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self._http: httpx.AsyncClient | None = None
        self._llm_http: httpx.AsyncClient | None = None  # the tapped client litellm calls through
        self._openai: Any = None  # openai.AsyncOpenAI on _llm_http (litellm's "openai" provider)
        self._handler: Any = None  # litellm AsyncHTTPHandler on _llm_http ("hosted_vllm")

    async def start(self) -> None:
        self._http = httpx.AsyncClient(timeout=self.timeout_s)
        _litellm()  # pay the import at start-up, not on the first request
        import openai
        from litellm.llms.custom_httpx.http_handler import AsyncHTTPHandler

        # only encodings the tap can read (see RawTap)
        self._llm_http = TappedClient(headers={"accept-encoding": "gzip, deflate"}, timeout=self.timeout_s,
                                      follow_redirects=True,
                                      limits=httpx.Limits(max_connections=1000, max_keepalive_connections=100))
        self._openai = openai.AsyncOpenAI(api_key="unset", base_url=self.base_url,
                                          http_client=self._llm_http, max_retries=self.max_retries)
        self._handler = AsyncHTTPHandler(timeout=self.timeout_s)
        await self._handler.client.aclose()  # its own client is replaced by the tapped one
        self._handler.client = self._llm_http

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.aclose()
            self._http = None
        if self._llm_http is not None:
            await self._llm_http.aclose()
            self._llm_http = None

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
        # Only OpenAI request fields become litellm arguments. Every other client field goes to the
        # upstream inside extra_body, so a body can never set litellm's own arguments (api_base,
        # base_url, api_key, extra_headers, mock_response, custom_llm_provider, ...): those would
        # send our upstream key to a host of the client's choosing or put an answer the upstream
        # never gave into the cache.
        kwargs = {k: v for k, v in payload.items() if k in _OPENAI_CHAT_FIELDS}
        extra = {k: v for k, v in payload.items() if k not in _OPENAI_CHAT_FIELDS}
        if extra:
            kwargs["extra_body"] = extra
        kwargs["model"] = target.litellm_model
        if target.api_base:
            kwargs["api_base"] = target.api_base
        # Without a configured key the client's own bearer goes upstream (pure pass-through use).
        key = self._api_key or client_key
        kwargs["api_key"] = key or "no-key"
        kwargs["timeout"] = self.timeout_s
        kwargs["num_retries"] = self.max_retries
        provider = target.litellm_model.split("/", 1)[0]
        if provider == "openai" and self._openai is not None:
            kwargs["client"] = self._openai.with_options(api_key=kwargs["api_key"],
                                                         base_url=target.api_base or self._openai.base_url)
        elif provider in ("hosted_vllm", "anthropic") and self._handler is not None:
            kwargs["client"] = self._handler
        return kwargs

    def _tap(self, target: Target) -> RawTap | None:
        """A tap for targets whose bytes we read (OpenAI-compatible and Anthropic wire formats); None
        for other providers, whose answers are cacheable only if trusted (``_trusts_litellm``)."""
        wire = _WIRE_OF_PROVIDER.get(target.litellm_model.split("/", 1)[0])
        return RawTap(wire) if wire is not None and self._llm_http is not None else None

    def _trusts_litellm(self, target: Target) -> bool:
        """Whether an untapped target's answer may be cached on litellm's word that it finished."""
        provider = target.litellm_model.split("/", 1)[0]
        if provider in self.trusted_finish_providers:
            return True
        if provider not in self._warned_untrusted:
            self._warned_untrusted.add(provider)
            log.warning("answers of provider %r are relayed but never cached: the proxy cannot read its wire "
                        "format to see that an answer finished (set VELO_TRUSTED_FINISH_PROVIDERS=%s to take "
                        "litellm's finish_reason)", provider, provider)
        return False

    async def complete(self, payload: dict[str, Any], *, target: Target | None = None,
                       client_key: str | None = None) -> dict[str, Any]:
        """One non-streaming completion, as a plain OpenAI ``chat.completion`` dict."""
        data, _ = await self.complete_checked(payload, target=target, client_key=client_key)
        return data

    async def complete_checked(self, payload: dict[str, Any], *, target: Target | None = None,
                               client_key: str | None = None) -> tuple[dict[str, Any], bool]:
        """One non-streaming completion, and whether the upstream itself said it finished
        (``finish_reason`` "stop" in its own bytes): only such an answer may be cached. The
        finish reasons the client gets are the upstream's, not litellm's normalised ones.
        ``target``: the model as already resolved for this request (default: resolve it)."""
        target = target or self.resolve(payload["model"])
        litellm = _litellm()
        tap = self._tap(target)
        token = _TAP.set(tap)
        try:
            response = await litellm.acompletion(**self._kwargs(payload, target, client_key))
        except Exception as exc:  # noqa: BLE001 - every upstream failure becomes a ProxyError
            raise _map_error(exc, tap) from exc
        finally:
            _TAP.reset(token)
        data = clean_completion(response.model_dump())
        data["model"] = payload["model"]
        choices = data.get("choices") or []
        if tap is None:
            return data, (bool(choices) and choices[0].get("finish_reason") == "stop"
                          and self._trusts_litellm(target))
        said = tap.finish_reasons()
        if said is None:  # unreadable: relayed as litellm parsed it, never cached
            return data, False
        for position, choice in enumerate(choices):
            choice["finish_reason"] = said.get(_choice_index(choice, position))
        return data, bool(choices) and choices[0].get("finish_reason") == "stop"

    async def stream(self, payload: dict[str, Any], *, target: Target | None = None,
                     client_key: str | None = None) -> "UpstreamStream":
        """Open a stream; errors before the first chunk raise here (so the client gets a status),
        errors after it raise from the returned iterator."""
        target = target or self.resolve(payload["model"])
        litellm = _litellm()
        kwargs = self._kwargs(payload, target, client_key)
        kwargs["stream"] = True
        tap = self._tap(target)
        token = _TAP.set(tap)
        try:
            response = await litellm.acompletion(**kwargs)
            iterator = response.__aiter__()
            first = await iterator.__anext__()
        except StopAsyncIteration:
            raise ProxyError(502, "The upstream stream ended without any chunk.", code="upstream_stream_broken")
        except Exception as exc:  # noqa: BLE001
            raise _map_error(exc, tap) from exc
        finally:
            _TAP.reset(token)
        return UpstreamStream(first, iterator, payload["model"], tap,
                              trusted=tap is not None or self._trusts_litellm(target))

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
