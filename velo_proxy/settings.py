"""All proxy configuration, in one pydantic-settings class.

Every field reads from an environment variable named ``VELO_<FIELD>`` (case-insensitive), or from
the matching ``velo-proxy serve`` flag. List and dict fields take JSON (``VELO_MODEL_MAP='{"a": "b"}'``);
``VELO_API_KEYS`` also takes a comma-separated list.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


def default_home() -> Path:
    """Where the proxy keeps models and data unless told otherwise (XDG data dir)."""
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "velo-proxy"


DEFAULT_EMBEDDER_NAME = "all-MiniLM-L6-v2"
ENGLISH_VERIFIER_NAME = "pair-verifier"
E5_VERIFIER_NAME = "e5-pair-verifier"
#: The verifier whose scores the shipped LRS policy was trained on (its hit features): the learned policy
#: loads it by default and refuses another one (policy metadata ``velo_verifier_sha256``).
LEARNED_VERIFIER_NAME = E5_VERIFIER_NAME
#: The verifier that serves by default: the only one whose calibration holds a bound on QQP-shaped streams once
#: the label audit of its own hits is counted (docs/verifier.md, "What the calibration says").
DEFAULT_VERIFIER_NAME = E5_VERIFIER_NAME
#: all-MiniLM-L6-v2 with int8 weight matmuls: ~2.7x faster per question, another embedder id (its vectors differ)
MINILM_INT8_EMBEDDER_NAME = "all-MiniLM-L6-v2-int8"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="VELO_", extra="ignore", populate_by_name=True)

    # --- server -----------------------------------------------------------------------------
    host: str = Field("127.0.0.1", description="Address to listen on.")
    port: int = Field(8080, ge=1, le=65535, description="Port to listen on.")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="Log level.")
    max_body_bytes: int = Field(
        4 * 1024 * 1024, ge=1024, description="Largest request body accepted; larger bodies get 413."
    )
    body_read_timeout_s: float = Field(
        30.0, gt=0, description="Deadline for reading a request body; a body not in by then gets 408 (connection closed)."
    )

    # --- upstream ---------------------------------------------------------------------------
    upstream_base_url: str | None = Field(
        None, description="Base URL of the OpenAI-compatible upstream, e.g. http://vllm:8000/v1."
    )
    upstream_api_key: SecretStr | None = Field(
        None, description="API key sent to the upstream. Never echoed in responses or logs."
    )
    model_map: dict[str, str] = Field(
        default_factory=dict,
        description=(
            "Client model name -> litellm model string (e.g. {\"qwen\": \"hosted_vllm/Qwen/Qwen2.5-14B\"}). "
            "Empty: every model is forwarded as openai/<name> to the upstream base URL. "
            "When set, models not in the map get 404."
        ),
    )
    trusted_finish_providers: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description=(
            "litellm providers (the part of a model_map target before '/', e.g. 'gemini,bedrock') whose "
            "finish_reason is taken as litellm reports it. The proxy reads the upstream's own bytes for "
            "openai, hosted_vllm and anthropic targets; answers of any other provider are relayed but never "
            "cached unless listed here, because litellm reports 'stop' for answers whose upstream never said so."
        ),
    )
    upstream_timeout_s: float = Field(120.0, gt=0, description="Timeout of one upstream call, seconds.")
    upstream_max_retries: int = Field(0, ge=0, description="Retries of a failed upstream call by litellm.")

    # --- auth -------------------------------------------------------------------------------
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list,
        description="Proxy API keys clients must send as 'Authorization: Bearer'. Empty: no auth.",
    )
    admin_key: SecretStr | None = Field(
        None, description="Key for the /admin endpoints ('Authorization: Bearer'). Unset: admin API off."
    )

    # --- storage ----------------------------------------------------------------------------
    data_dir: Path = Field(default_factory=lambda: default_home() / "data", description="Embedded store directory.")
    qdrant_url: str | None = Field(None, description="Qdrant server URL; set to use Qdrant instead of the embedded store (':memory:' for tests).")
    qdrant_api_key: SecretStr | None = Field(None, description="Qdrant API key.")
    qdrant_collection: str = Field("velo_cache", description="Qdrant collection name.")
    redis_url: str | None = Field(None, description="Redis URL for the exact tier and the experience stream. Unset: in-process exact tier, experience off.")

    # --- cache behaviour --------------------------------------------------------------------
    cache_enabled: bool = Field(True, description="Master switch: false makes the proxy a plain pass-through.")
    cache_max_temperature: float = Field(
        1.0, ge=0, description="Requests with a higher temperature (unset counts as OpenAI's default, 1.0) are neither looked up nor stored."
    )
    cache_tools: bool = Field(False, description="Cache requests that carry tools or tool results.")
    cache_ttl_s: float = Field(7 * 24 * 3600, gt=0, description="Lifetime of a cache entry, seconds.")
    cache_max_entries: int = Field(
        200_000, ge=1, description="Size cap of each scope in the semantic store (entries): past it a scope's own "
        "lowest-valued entries go first, so one tenant filling its scope never pushes out another's. The store's total "
        "is bounded by TTL and the below-mean rule.")
    eviction_interval: int = Field(
        1000, ge=1, description="Every this many requests (the paper's xi), drop entries whose cache value is below the mean."
    )
    eviction_grace_s: float = Field(
        24 * 3600, ge=0, description="Entries younger than this are exempt from the below-mean rule, seconds."
    )
    gc_freeze: bool = Field(
        True, description="Move everything built at start-up out of Python's garbage collector's reach "
        "(gc.freeze): full collections then scan only what requests allocate, instead of stalling every request "
        "for 100-200 ms about once a second under load.")
    exact_cache_size: int = Field(10_000, ge=0, description="Entries of the in-process exact tier (LRU).")
    similarity_threshold: float = Field(
        0.95, ge=-1, le=1, description="Static-threshold policy: serve a hit at or above this cosine similarity."
    )
    top_p_hits: int = Field(5, ge=1, le=64, description="Hits fetched per request (the policy's P).")

    # --- pair verifier ----------------------------------------------------------------------
    verifier: Literal["pair-verifier", "e5-pair-verifier"] | None = Field(
        None, description="Which exported pair verifier to load from the models directory: 'e5-pair-verifier' "
        "(multilingual-e5-small based, calibrated for every embedder, the one the shipped LRS policies were "
        "trained on; the default with every policy) or 'pair-verifier' (English, all-MiniLM-L6-v2 based, faster; its "
        "calibration holds no bound, so as the verified policy's verifier it serves no semantic hit, and the "
        "learned policy refuses it). verifier_dir overrides it.")
    verifier_dir: Path = Field(
        default_factory=lambda: default_home() / "models" / DEFAULT_VERIFIER_NAME,
        description="Directory with the pair verifier (model.onnx + tokenizer.json + velo_verifier.json, written by "
        "'velo-proxy models export'); default: <models directory>/<verifier>.",
    )
    verifier_threads: int = Field(1, ge=1, description="onnxruntime intra-op threads for the pair verifier.")
    verifier_timeout_ms: float = Field(
        300.0, gt=0, description="Deadline of one verifier call; past it, no semantic hit (the request goes upstream).")
    # Measured (python benchmarks/verifier_batching.py: 3-pair verifications, one machine, alternating):
    # batches of 24 pairs cost more per request than one request's 3 (70 vs 46 ms per request at 32
    # concurrent callers, p50 1.34 s vs 0.74 s): padding to the longest pair outweighs the per-call cost
    # saved. So the default batches no more than one top-3 request; raise it only after measuring.
    verifier_batch_max: int = Field(
        3, ge=1, description="Largest micro-batch of concurrent verifications, in (question, candidate) pairs "
        "per onnxruntime call (3: one request's top-3; larger batches measured slower, docs/proxy.md).")
    verifier_batch_wait_ms: float = Field(
        0.0, ge=0, description="How long a verifier micro-batch waits for company, ms (under load batches form "
        "anyway: callers queue while a batch runs).")
    verify_learned: bool = Field(
        True, description="The learned policy's A decisions must also pass the verifier's threshold for the "
        "bound (a hit it rejects is forwarded); the verifier's scores are the policy's features either way.")

    # --- embedder ---------------------------------------------------------------------------
    embedder: Literal["all-MiniLM-L6-v2", "all-MiniLM-L6-v2-int8", "multilingual-e5-small"] = Field(
        DEFAULT_EMBEDDER_NAME, description="Which exported embedder to load from the models directory "
        "('velo-proxy models export [--embedder all-MiniLM-L6-v2-int8|multilingual-e5-small]'): all-MiniLM-L6-v2 "
        "(English), its int8 quantisation (faster; a separate cache, and the learned policy needs the fp32 one) "
        "or multilingual-e5-small; embedder_dir overrides it.")
    embedder_dir: Path = Field(
        default_factory=lambda: default_home() / "models" / DEFAULT_EMBEDDER_NAME,
        description="Directory with model.onnx + tokenizer.json (written by 'velo-proxy models export'); "
        "default: <models directory>/<embedder>.",
    )
    embedder_url: str | None = Field(
        None, description="Remote OpenAI-compatible /v1/embeddings base URL; overrides embedder_dir."
    )
    embedder_model: str = Field(DEFAULT_EMBEDDER_NAME, description="Model name sent to a remote embedder.")
    embedder_api_key: SecretStr | None = Field(None, description="API key of a remote embedder.")
    embedder_threads: int = Field(1, ge=1, description="onnxruntime intra-op threads for the embedder.")
    embed_batch_max: int = Field(32, ge=1, description="Largest micro-batch of concurrent embedding calls.")
    embed_batch_wait_ms: float = Field(
        0.0, ge=0, description="How long a micro-batch waits for company, ms (under load batches form anyway)."
    )
    embed_timeout_ms: float = Field(500.0, gt=0, description="Deadline of one embedding call; past it, go upstream.")
    search_timeout_ms: float = Field(200.0, gt=0, description="Deadline of one vector search; past it, go upstream.")

    # --- fail open: deadlines and circuit breaker of the cache's components -------------------
    store_write_timeout_ms: float = Field(
        1000.0, gt=0, description="Deadline of one store write in the background (a new entry, a use count, the "
        "eviction of an entry that failed its shadow check).")
    eviction_timeout_s: float = Field(30.0, gt=0, description="Deadline of one background eviction pass, seconds.")
    redis_timeout_ms: float = Field(
        250.0, gt=0, description="Socket timeout (connect and read) of every Redis call, and the deadline of the "
        "readiness ping.")
    exact_timeout_ms: float = Field(
        500.0, gt=0, description="Deadline of one exact-tier read or write (with Redis: two socket timeouts); past "
        "it, the request goes on without the exact tier.")
    experience_timeout_ms: float = Field(
        500.0, gt=0, description="Deadline of one append (decision or reward) to the experience stream.")
    breaker_threshold: int = Field(
        3, ge=1, description="Consecutive failures of a component (embedder, store, verifier, exact tier, "
        "experience, policy) that open its circuit breaker: one bad request does not switch the cache off.")
    breaker_cooldown_s: float = Field(
        5.0, gt=0, description="How long an open circuit breaker skips its component instead of paying its "
        "deadline again, seconds.")
    shutdown_drain_s: float = Field(
        5.0, ge=0, description="At shutdown, how long background work (stores, shadow checks, experience) may "
        "still finish, seconds.")

    # --- policy -----------------------------------------------------------------------------
    # verified by default: a semantic hit is served only when the pair verifier, calibrated on
    # stream-shaped data, stands behind it at the operator's false-hit bound (docs/benchmarks.md).
    policy: Literal["verified", "threshold", "learned"] = Field(
        "verified", description="Decision policy: 'verified' (pair verifier, calibrated for max_false_hit_rate), "
        "'threshold' (plain cosine similarity, unverified) or 'learned' (the ONNX LRS actor, its hits verified)."
    )
    policy_path: Path | None = Field(None, description="ONNX LRS policy; unset: the one the package ships for the configured embedder.")
    cross_language: Literal["augment", "forward", "serve"] = Field(
        "augment", description="A semantic hit whose cached question is in another language than the request "
        "(velo_proxy.language: script, then function words): 'augment' forwards with the cached Q&A as context "
        "(action C, so the answer comes in the user's language), 'forward' sends it upstream as is, 'serve' "
        "serves the cached answer anyway.")
    policy_dir: Path | None = Field(None, description="Directory the retrain job publishes to; watched for new versions.")
    max_false_hit_rate: float = Field(
        0.02, gt=0, lt=1, description="Operator's bound on wrong cache hits (delta): picks the verifier's and the "
        "learned policy's calibrated thresholds.")
    policy_reload_s: float = Field(10.0, gt=0, description="How often the policy directory is checked for a new version, seconds.")
    exploration_rate: float = Field(0.0, ge=0, le=1, description="Share of decisions sampled for exploration.")
    shadow_rate: float = Field(
        0.05, ge=0, le=1, description="Share of semantic hits served that are judged after the response (shadow "
        "check): the live false-hit estimate.")
    shadow_fail_below: float = Field(
        0.7, ge=-1, le=1, description="The verifier judge calls a hit wrong when the fresh and the cached answer "
        "agree less than this (cosine); a wrong hit's entry is evicted."
    )

    # --- the learning loop: judging, the live false-hit estimate, its guard, promotion ------------
    judge: Literal["verifier", "llm"] = Field(
        "verifier", description="Who judges whether a cached answer answers a new question (shadow checks, "
        "near-miss reviews): 'verifier' (the pair verifier over the two questions, plus the agreement of the "
        "fresh and the cached answer) or 'llm' (a yes/no prompt to judge_model through the upstream).")
    judge_model: str | None = Field(
        None, description="Client model name the LLM judge asks (resolved like any request's model; required "
        "when judge='llm').")
    judge_budget_per_min: float = Field(
        60.0, ge=0, description="Most judge calls (shadow checks and near-miss reviews together) per minute; "
        "beyond it a judgement is skipped and counted, so the loop cannot cost more than it saves.")
    near_miss_review_rate: float = Field(
        0.0, ge=0, le=1, description="Share of near misses (forwarded although a candidate was at least "
        "near_miss_floor similar) judged off the request path; approved ones are promoted.")
    near_miss_floor: float = Field(
        0.8, ge=-1, le=1, description="Cosine similarity of the best candidate from which a forwarded request "
        "counts as a near miss.")
    promote_near_misses: bool = Field(
        True, description="An approved near miss becomes an alias: its question is stored with the judged cached "
        "answer (the same request is then served that answer).")
    live_guard: bool = Field(
        True, description="Tighten serving when the judged false-hit rate's 95 % upper bound exceeds "
        "max_false_hit_rate (and relax when it is back under).")
    guard_window: int = Field(1000, ge=10, description="Judgements (per policy version and scope) the guard reads.")
    guard_max_age_s: float = Field(
        7 * 86400.0, gt=0, description="Judgements older than this no longer count for the guard, seconds.")
    guard_min_scope_judgements: int = Field(
        30, ge=1, description="A scope (tenant) gets a guard of its own once it has this many judgements.")
    labels_max_len: int = Field(
        100_000, ge=100, description="Bound on the stored judged pairs (Redis stream length or JSONL lines).")
    augment_max_tokens: int = Field(400, ge=16, description="Token budget of the cached answer inserted by action C.")
    feedback_window: int = Field(10_000, ge=0, description="Recent responses remembered for POST /v1/feedback.")
    agent_id: str = Field(default_factory=socket.gethostname, description="Edge agent id (experience stream name).")
    experience_max_len: int = Field(
        20_000, ge=1, description="Bound on each agent's experience stream (a decision is ~10 KB with MiniLM)."
    )

    @field_validator("api_keys", "trusted_finish_providers", mode="before")
    @classmethod
    def _split_list(cls, value: Any) -> Any:
        """A JSON list or a comma-separated string (the handier form in an env var)."""
        if isinstance(value, str):
            value = value.strip()
            if value.startswith("["):
                import json

                return json.loads(value)
            return [k.strip() for k in value.split(",") if k.strip()]
        return value

    @model_validator(mode="after")
    def _embedder_dir_from_name(self) -> "Settings":
        if "embedder_dir" not in self.model_fields_set:
            self.embedder_dir = default_home() / "models" / self.embedder
        if self.verifier is None:
            # a learned policy reads the scores of the verifier it was trained with (it refuses another one)
            self.verifier = LEARNED_VERIFIER_NAME if self.policy == "learned" else DEFAULT_VERIFIER_NAME
        if "verifier_dir" not in self.model_fields_set:
            self.verifier_dir = default_home() / "models" / self.verifier
        return self

    @model_validator(mode="after")
    def _judge_needs_a_model(self) -> "Settings":
        if self.judge == "llm" and not self.judge_model:
            raise ValueError("VELO_JUDGE=llm needs VELO_JUDGE_MODEL (the client model name the judge asks)")
        return self

    @field_validator("upstream_base_url")
    @classmethod
    def _strip_slash(cls, value: str | None) -> str | None:
        return value.rstrip("/") if value else value
