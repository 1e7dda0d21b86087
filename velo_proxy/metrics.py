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
        self.same_question_hits = Counter(
            "velo_same_question_hits", "Semantic hits whose cached question is the request's own (same text up "
            "to case and spacing, other parameters): served without the verifier or a policy decision.",
            registry=r)
        # the learning loop (velo_proxy.judging, velo_proxy.live_guard)
        self.judge_calls = Counter(
            "velo_judge_calls", "Judgements by judge, kind (shadow: a served hit; near_miss: a forwarded close "
            "candidate) and outcome (correct, wrong, unclear, failed, over_budget).", ["judge", "kind", "outcome"],
            registry=r)
        self.judge_tokens = Counter("velo_judge_tokens", "Upstream tokens spent on judging (fresh answers of "
                                    "shadow checks, LLM judge prompts).", ["judge"], registry=r)
        self.live_judged = Gauge("velo_live_judged_hits", "Judged served hits in the guard's window.", ["policy"],
                                 registry=r)
        self.live_false_hit_rate = Gauge("velo_live_false_hit_rate", "Share of judged served hits that were wrong "
                                         "(guard's window).", ["policy"], registry=r)
        self.live_false_hit_upper = Gauge("velo_live_false_hit_upper", "One-sided 95 % upper bound (Wilson) of the "
                                          "live false-hit rate.", ["policy"], registry=r)
        self.guard_floor = Gauge("velo_guard_floor", "Extra score a semantic hit needs (-Inf: none; above 1: "
                                 "semantic serving stopped).", ["policy"], registry=r)
        self.guard_changes = Counter("velo_guard_changes", "Serving-floor changes by direction (tighten, relax) "
                                     "and level (policy, scope).", ["direction", "level"], registry=r)
        self.guard_blocked = Counter("velo_guard_blocked", "Semantic hits the policy chose and the guard's floor "
                                     "forwarded instead.", registry=r)
        self.cross_language = Counter("velo_cross_language", "Semantic hits the policy chose whose cached question "
                                      "is in another language, by what was done instead (augment, forward, serve).",
                                      ["action"], registry=r)
        self.promotions = Counter("velo_promotions", "Judged near misses promoted to aliases of the cached "
                                  "answer.", registry=r)
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
