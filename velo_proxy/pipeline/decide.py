"""Decide: turn what the lookup found into one ``Choice``: serve the exact copy, serve a semantic
hit (A), augment (C) or forward (B). The policy decides on semantic hits; a policy that fails at run
time fails open (B) like any component."""

from __future__ import annotations

import time

from velo_proxy.metrics import Metrics
from velo_proxy.pipeline.context import Choice, RequestContext
from velo_proxy.pipeline.guard import Guard
from velo_proxy.pipeline.lookup import Found
from velo_proxy.policy import Decision, Policy


class Decide:
    def __init__(self, *, guard: Guard, metrics: Metrics) -> None:
        self.guard = guard
        self.metrics = metrics

    def choose(self, ctx: RequestContext, found: Found) -> Choice:
        if found.exact is not None:
            entry = found.exact.get("entry")
            return Choice("exact", answer=found.exact["answer"], entry=entry, similarity=1.0)
        if found.hits is None or ctx.vector is None:
            return Choice("B")
        policy, hits = ctx.trace.policy, found.hits
        decision = self.guard.run("policy", lambda: policy.decide(ctx.vector, hits, now=time.time(),
                                                                  scores=found.scores))
        if decision is None:
            return Choice("B")
        ctx.trace.decision = decision
        self._count_verification(policy, found, decision)
        best = hits[0].similarity if hits else None
        hit = decision.entry
        if decision.action == "A" and hit is not None:
            return Choice("A", answer=hit.entry.answer, hit=hit, entry=hit.entry.id, similarity=hit.similarity,
                          verifier_score=decision.verifier_score)
        if decision.action == "C" and hit is not None:
            return Choice("C", hit=hit, entry=hit.entry.id, similarity=best, verifier_score=decision.verifier_score)
        return Choice("B", similarity=best, verifier_score=decision.verifier_score)

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
