"""The learning loop's work after a response, off the request's critical path:

- shadow check: a sampled share (``VELO_SHADOW_RATE``) of served semantic hits is judged; a wrong
  one's entry is evicted, and the verdict is the decision's reward and the entry's outcome;
- near-miss review: a sampled share (``VELO_NEAR_MISS_REVIEW_RATE``) of requests forwarded although a
  candidate was close is judged against the answer the request just got; an approved one is
  promoted: the new question's entry becomes an alias holding the judged cached answer, so the same
  request is served that answer next time;
- every verdict is a labelled pair in the label store and a judgement of the live guard.

Judge calls are paid from one budget; over it, a judgement is skipped and counted.
"""

from __future__ import annotations

import logging
import random
import time
from typing import Any

import numpy as np

from velo_proxy.errors import ProxyError
from velo_proxy.judging import (JudgeBudget, Label, LLMJudge, Verdict, VerifierJudge, completion_text,
                                completion_tokens, satisfaction)
from velo_proxy.metrics import Metrics
from velo_proxy.pipeline.components import CacheComponents
from velo_proxy.pipeline.context import NearMiss, RequestContext, guard_score
from velo_proxy.services import Services
from velo_proxy.settings import Settings
from velo_proxy.store.base import CacheEntry, Hit

log = logging.getLogger("velo_proxy.learning")


class LearningLoop:
    def __init__(self, *, components: CacheComponents, services: Services, settings: Settings,
                 metrics: Metrics, rng: random.Random | None = None) -> None:
        self.components = components
        self.services = services
        self.settings = settings
        self.metrics = metrics
        self._rng = rng or random.Random()
        self.budget = JudgeBudget(per_min=settings.judge_budget_per_min)
        if settings.judge == "llm":
            assert settings.judge_model is not None  # Settings checks it
            self.judge: VerifierJudge | LLMJudge = LLMJudge(complete=self._ask_judge, model=settings.judge_model)
            try:
                services.upstream.resolve(settings.judge_model)
            except ProxyError as err:  # the proxy still serves; every judgement fails and is counted
                log.error("the LLM judge's model %r cannot be reached: %s", settings.judge_model, err.message)
        else:
            verify = self.components.verify if services.verifier is not None else None
            self.judge = VerifierJudge(embed=self.components.embed, verify=verify,
                                       agree_at_least=settings.shadow_fail_below)

    async def _ask_judge(self, payload: dict[str, Any]) -> dict[str, Any]:
        upstream = self.services.upstream
        return await upstream.complete(payload, target=upstream.resolve(payload["model"]))

    # ----- sampling, from the request path --------------------------------------------------------
    def after_hit(self, ctx: RequestContext) -> None:
        """A served semantic hit: shadow-check a sampled share."""
        rate = self.settings.shadow_rate
        if rate > 0 and self._rng.random() < rate:
            self.services.spawn(self.shadow_check(ctx))

    def wants_review(self, ctx: RequestContext) -> bool:
        rate = self.settings.near_miss_review_rate
        return ctx.near_miss is not None and rate > 0 and self._rng.random() < rate

    # ----- judging ------------------------------------------------------------------------------
    async def _judge(self, *, ctx: RequestContext, kind: str, hit: Hit, verifier_score: float | None,
                     served_score: float, fresh_answer: str | None) -> tuple[Label, Verdict] | None:
        judge = self.judge
        if not self.budget.try_spend():
            self.metrics.judge_calls.labels(judge.name, kind, "over_budget").inc()
            return None
        tokens = 0
        if fresh_answer is None and judge.needs_fresh_answer:
            try:
                fresh = await self.services.upstream.complete({**ctx.payload, "stream": False}, target=ctx.target,
                                                              client_key=ctx.caller.client_key)
            except ProxyError as err:
                self.metrics.failures.labels("shadow", f"upstream_{err.status}").inc()
                self.metrics.judge_calls.labels(judge.name, kind, "failed").inc()
                return None
            fresh_answer, tokens = completion_text(fresh), completion_tokens(fresh)
        verdict = await judge.judge(question=ctx.key.question if ctx.key else "", cached_question=hit.entry.question,
                                    cached_answer=str(hit.entry.answer["message"].get("content") or ""),
                                    fresh_answer=fresh_answer, tokens=tokens)
        if verdict.tokens:
            self.metrics.judge_tokens.labels(judge.name).inc(verdict.tokens)
        if verdict.correct is None:
            self.metrics.judge_calls.labels(judge.name, kind, "unclear" if verdict.reason == "unclear"
                                            else "failed").inc()
            return None
        self.metrics.judge_calls.labels(judge.name, kind, "correct" if verdict.correct else "wrong").inc()
        assert ctx.key is not None
        label = Label(kind=kind, judge=judge.name, correct=bool(verdict.correct), question=ctx.key.question,
                      cached_question=hit.entry.question, entry=hit.entry.id, scope=ctx.key.scope,
                      policy=ctx.trace.policy.version, similarity=float(hit.similarity),
                      verifier_score=verifier_score, served_score=float(served_score),
                      request_id=ctx.trace.request_id, agreement=verdict.agreement,
                      judge_verifier=verdict.judge_verifier,
                      judge_model=getattr(judge, "model", None), tokens=verdict.tokens,
                      embedder=self.services.embedder.id)
        return label, verdict

    async def _keep(self, label: Label) -> None:
        self.services.live_guard.observe(label)
        try:
            await self.services.labels.append(label)
        except Exception as exc:  # noqa: BLE001 - the loop is an optimisation: the request is long answered
            self.metrics.failures.labels("labels", type(exc).__name__).inc()
            log.warning("could not store a judged pair: %s", exc)

    async def shadow_check(self, ctx: RequestContext) -> None:
        """Judge a served hit; a wrong one's entry is evicted. The verdict is the decision's reward
        and an outcome of the entry's cache value (Eq. 5)."""
        choice = ctx.trace.choice
        hit = choice.hit
        if hit is None or ctx.key is None:
            return
        score = guard_score(ctx.trace.policy, hit, choice.verifier_score)
        judged = await self._judge(ctx=ctx, kind="shadow", hit=hit, verifier_score=choice.verifier_score,
                                   served_score=hit.similarity if score is None else score, fresh_answer=None)
        if judged is None:
            return
        label, verdict = judged
        self.metrics.shadow_checks.labels("pass" if label.correct else "fail").inc()
        await self._keep(label)
        # outcome on [0, 1]: the answers' agreement when measured, else the verdict itself
        outcome = max(0.0, verdict.agreement) if verdict.agreement is not None else float(label.correct)
        await self.components.record_use(hit.entry.id, outcome=outcome)
        if not label.correct:
            log.info("shadow check: entry %s judged wrong for a new question (%s judge): evicted", hit.entry.id,
                     label.judge)
            await self.components.delete(hit.entry.id)
        q = satisfaction(verdict.agreement) if verdict.agreement is not None else 2.0 * (float(label.correct) - 1.0)
        await self.components.log_reward(ctx.trace.request_id, source="shadow", q=q, score=outcome)

    async def review_near_miss(self, ctx: RequestContext, answer: dict[str, Any], stored_id: str | None) -> None:
        """Judge the close candidate of a forwarded request against the answer it got; promote an
        approved one (its stored entry becomes an alias holding the candidate's answer)."""
        near: NearMiss | None = ctx.near_miss
        if near is None or ctx.key is None:
            return
        fresh = str(answer["message"].get("content") or "")
        judged = await self._judge(ctx=ctx, kind="near_miss", hit=near.hit, verifier_score=near.verifier_score,
                                   served_score=near.served_score, fresh_answer=fresh)
        if judged is None:
            return
        label, _ = judged
        if label.correct and self.settings.promote_near_misses and stored_id is not None and ctx.vector is not None:
            label.promoted = await self._promote(ctx, near.hit, stored_id)
        await self._keep(label)

    async def _promote(self, ctx: RequestContext, candidate: Hit, entry_id: str) -> bool:
        key = ctx.key
        assert key is not None and ctx.vector is not None
        root = candidate.entry.answer.get("alias_of") or candidate.entry.id
        answer = {**candidate.entry.answer, "alias_of": root}
        now = time.time()
        alias = CacheEntry(scope=key.scope, vector=np.asarray(ctx.vector, dtype=np.float32), question=key.question,
                           answer=answer, model=ctx.chat.model, expires_at=now + self.settings.cache_ttl_s,
                           created_at=now, cache_value=candidate.entry.cache_value, id=entry_id)
        if not await self.components.add(alias):
            return False
        await self.components.exact_set(key, entry_id, answer, ttl_s=self.settings.cache_ttl_s)
        self.metrics.promotions.inc()
        log.info("near miss promoted: entry %s is now an alias of %s", entry_id, root)
        return True
