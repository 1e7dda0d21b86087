"""Prometheus metrics, one registry per app (no module-level globals, so several apps can live in one
process, as they do in tests)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    def __init__(self) -> None:
        self._lookups = 0
        self._hits = 0
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("velo_requests", "Chat requests by action taken.", ["action"], registry=r)
        self.errors = Counter("velo_errors", "Error responses by HTTP status.", ["status"], registry=r)
        self.hits = Counter("velo_cache_hits", "Requests answered from the cache (exact or semantic).", registry=r)
        self.lookups = Counter("velo_cache_lookups", "Requests that were looked up in the cache.", registry=r)
        self.hit_ratio = Gauge("velo_cache_hit_ratio", "Cache hits / cache lookups since start.", registry=r)
        self.failures = Counter("velo_component_failures", "Fail-open events by component and reason.",
                                ["component", "reason"], registry=r)
        self.request_latency = Histogram("velo_request_seconds", "Time to the full answer, by action.",
                                         ["action"], buckets=LATENCY_BUCKETS, registry=r)
        self.embed_latency = Histogram("velo_embed_seconds", "Embedding latency.", buckets=LATENCY_BUCKETS, registry=r)
        self.search_latency = Histogram("velo_search_seconds", "Vector search latency.", buckets=LATENCY_BUCKETS, registry=r)
        self.upstream_latency = Histogram("velo_upstream_seconds", "Upstream call latency (to the last byte).",
                                          buckets=LATENCY_BUCKETS, registry=r)
        self.shadow_checks = Counter("velo_shadow_checks", "Shadow verifications of served answers, by result.",
                                     ["result"], registry=r)
        self.verifier_latency = Histogram("velo_verifier_seconds", "Pair verifier latency (one batched call).",
                                          buckets=LATENCY_BUCKETS, registry=r)
        self.verifier_pairs = Counter("velo_verifier_pairs", "Candidate pairs scored by the pair verifier.", registry=r)
        self.verifier_outcomes = Counter(
            "velo_verifier_outcomes", "Verified lookups by outcome: served (a candidate passed), rejected "
            "(candidates, none passed), no_candidate (none above the cosine floor), failed (verifier slow or "
            "down: forwarded), vetoed (the learned policy chose A, the verifier said no).", ["outcome"], registry=r)
        self.store_entries = Gauge("velo_store_entries", "Entries in the semantic store.", registry=r)
        self.policy_reloads = Counter("velo_policy_reloads", "Policy versions swapped in without a restart.", registry=r)
        self.policy_version = Gauge("velo_policy_info", "Policy in use (label carries the version).",
                                    ["version"], registry=r)

    def count_lookup(self, hit: bool) -> None:
        self._lookups += 1
        self.lookups.inc()
        if hit:
            self._hits += 1
            self.hits.inc()
        self.hit_ratio.set(self._hits / self._lookups)

    def render(self) -> bytes:
        return generate_latest(self.registry)
