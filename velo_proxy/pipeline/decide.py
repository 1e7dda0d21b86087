"""Decide: turn what the lookup found into one ``Choice``: serve the exact copy, serve a semantic
hit (A), augment (C) or forward (B). The policy decides on semantic hits; a policy that fails at run
time fails open (B) like any component. The live guard (``velo_proxy.live_guard``) has the last word
on A: a hit whose score is below its floor is forwarded. A hit whose question is the request's own
(the same text in the same scope, asked with other parameters) is served without a decision: it is
as sure as the exact tier. A hit cached in another language than the
request's is augmented (C) or forwarded, never served as is (``VELO_CROSS_LANGUAGE``). A forwarded
request with a close candidate is marked as a near miss, for the off-path review."""

from __future__ import annotations

import dataclasses
import time

from velo_proxy.language import different_languages
from velo_proxy.live_guard import LiveGuard
from velo_proxy.metrics import Metrics
from velo_proxy.pipeline.context import Choice, NearMiss, RequestContext, guard_score
from velo_proxy.pipeline.guard import Guard
from velo_proxy.pipeline.lookup import Found
from velo_proxy.policy import Decision, Policy


class Decide:
    def __init__(self, *, guard: Guard, metrics: Metrics, live_guard: LiveGuard | None = None,
                 near_miss_floor: float = float("inf"), cross_language: str = "augment") -> None:
        self.guard = guard
        self.cross_language = cross_language
        self.metrics = metrics
        self.live_guard = live_guard
        self.near_miss_floor = near_miss_floor

    def choose(self, ctx: RequestContext, found: Found) -> Choice:
        choice = self._choose(ctx, found)
        if choice.action == "B" and found.hits and ctx.vector is not None:
            ctx.near_miss = self._near_miss(ctx, found)
        return choice

    def _near_miss(self, ctx: RequestContext, found: Found) -> NearMiss | None:
        hits = found.hits or []
        if not hits or hits[0].similarity < self.near_miss_floor:
            return None
        index, score = 0, None
        if found.scores:
            index = max(found.scores, key=lambda i: found.scores[i])
            score = found.scores[index]
            rule = ctx.trace.policy.verify_rule
            if rule is not None:  # in the units the policy serves on (a recalibrated head, if any)
                score = rule.adjusted(score, hits[index].similarity)
        served = guard_score(ctx.trace.policy, hits[index], score)
        return NearMiss(hits[index], score, hits[index].similarity if served is None else served)

    def _held_back(self, ctx: RequestContext, decision: Decision) -> bool:
        """Whether the live guard forwards an A the policy chose."""
        if self.live_guard is None or decision.entry is None or ctx.key is None:
            return False
        floor = self.live_guard.floor(ctx.trace.policy.version, ctx.key.scope)
        score = guard_score(ctx.trace.policy, decision.entry, decision.verifier_score)
        if score is not None and score >= floor:
            return False
        self.metrics.guard_blocked.inc()
        return True

    def _choose(self, ctx: RequestContext, found: Found) -> Choice:
        if found.exact is not None:
            entry = found.exact.get("entry")
            via = found.exact.get("via") or {}  # the copy of a semantic hit says what it was served on
            return Choice("exact", answer=found.exact["answer"], entry=entry, similarity=via.get("similarity", 1.0),
                          verifier_score=via.get("verifier_score"))
        if found.hits is None or ctx.vector is None:
            return Choice("B")
        if found.same_question is not None:
            hit = found.hits[found.same_question]
            self.metrics.same_question_hits.inc()
            return Choice("A", answer=hit.entry.answer, hit=hit, entry=hit.entry.id, similarity=hit.similarity,
                          same_question=True)
        policy, hits = ctx.trace.policy, found.hits
        question = ctx.key.question if ctx.key is not None else None
        decision = self.guard.run("policy", lambda: policy.decide(ctx.vector, hits, now=time.time(),
                                                                  scores=found.scores, request_text=question))
        if decision is None:
            return Choice("B")
        self._count_verification(policy, found, decision)
        if decision.action == "A" and self._held_back(ctx, decision):
            # logged as what happened: the policy was overruled, the request forwarded
            decision = dataclasses.replace(decision, action="B", entry=None, vetoed=True)
        if decision.action == "A" and decision.entry is not None and self.cross_language != "serve":
            decision = self._across_languages(ctx, decision)
        ctx.trace.decision = decision
        best = hits[0].similarity if hits else None
        hit = decision.entry
        if decision.action == "A" and hit is not None:
            return Choice("A", answer=hit.entry.answer, hit=hit, entry=hit.entry.id, similarity=hit.similarity,
                          verifier_score=decision.verifier_score)
        if decision.action == "C" and hit is not None:
            return Choice("C", hit=hit, entry=hit.entry.id, similarity=best, verifier_score=decision.verifier_score)
        return Choice("B", similarity=best, verifier_score=decision.verifier_score)

    def _across_languages(self, ctx: RequestContext, decision: Decision) -> Decision:
        """The same question cached in another language is not its answer as is: the user asked in their
        own language. Augment with the cached Q&A (C) or forward (B), as configured."""
        if ctx.key is None or not different_languages(ctx.key.question, decision.entry.entry.question):
            return decision
        self.metrics.cross_language.labels(self.cross_language).inc()
        if self.cross_language == "augment":
            return dataclasses.replace(decision, action="C", vetoed=True)
        return dataclasses.replace(decision, action="B", entry=None, vetoed=True)

    def _count_verification(self, policy: Policy, found: Found, decision: Decision) -> None:
        if policy.verify_rule is None or not found.hits:
            return
        if found.scores is None:
            outcome = "failed"
        elif not found.scores:
            outcome = "no_candidate"
        elif decision.vetoed:
            outcome = "vetoed"
        else:
            outcome = "served" if decision.action == "A" else "rejected"
        self.metrics.verifier_outcomes.labels(outcome).inc()
