"""The decision policy of a running proxy and its life cycle: the policy chosen at start-up
(``VELO_POLICY``: verified, threshold or learned), and for the learned policy the versions published
to the policy directory, swapped in without a restart (hot reload). Requests read ``current`` once
and keep that object, so a swap never changes a request in flight."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from velo_proxy.metrics import Metrics
from velo_proxy.policy import (LearnedPolicy, Policy, PolicyMismatch, ThresholdPolicy, VerifiedPolicy,
                               default_policy_path)
from velo_proxy.policy_dir import PolicyDirectory
from velo_proxy.settings import Settings
from velo_proxy.verifier import VerifyRule, recalibration_applies

log = logging.getLogger("velo_proxy.services")


class PolicyManager:
    def __init__(self, *, settings: Settings, metrics: Metrics, load_errors: dict[str, str] | None = None) -> None:
        self.settings = settings
        self.metrics = metrics
        self.embedder: Any = None  # velo_proxy.embedder.Embedder; None: no semantic tier, no learned policy
        self.verifier: Any = None  # velo_proxy.verifier.PairVerifier; None: no verified hits
        self.load_errors = load_errors if load_errors is not None else {}  # "policy": why the fallback is in use
        self.current: Policy = ThresholdPolicy(threshold=settings.similarity_threshold, top_p=settings.top_p_hits)
        self.rejected_versions: set[str] = set()
        self._watcher: asyncio.Task[Any] | None = None

    def start(self, *, embedder: Any, verifier: Any) -> None:
        """Choose the start-up policy for the loaded embedder and verifier (either may be None); with a
        policy directory, watch it for new versions."""
        self.embedder, self.verifier = embedder, verifier
        settings = self.settings
        if settings.cache_enabled:
            if settings.policy == "verified":
                self.current = self.verified_policy(self.recalibration())
            if self.embedder is not None and settings.policy == "learned":
                self._load_initial_policy()
        self._show_policy()
        if settings.policy_dir is not None and self.embedder is not None and settings.policy in ("learned", "verified"):
            self._watcher = asyncio.create_task(self._watch_policy_dir())

    async def aclose(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()

    # ----- building policies ----------------------------------------------------------------------
    def verify_rule(self) -> VerifyRule | None:
        """The serving rule for the operator's bound, or None without a verifier."""
        return self.verifier.rule(self.settings.max_false_hit_rate) if self.verifier is not None else None

    def recalibration(self) -> dict[str, Any] | None:
        """The verifier recalibration published in the policy directory for the loaded verifier."""
        if self.settings.policy_dir is None or self.verifier is None:
            return None
        record = PolicyDirectory(self.settings.policy_dir).verifier_recalibration()
        if record is None:
            return None
        if not recalibration_applies(record, self.verifier):
            if record["version"] not in self.rejected_versions:
                self.rejected_versions.add(record["version"])
                log.error("verifier recalibration %s is for verifier %s with embedder %s, not %s with %s: ignored",
                          record["version"], record.get("verifier_id"), record.get("embedder_id"),
                          self.verifier.id, self.verifier.embedder_id)
            return None
        return record

    def verified_policy(self, recalibration: dict[str, Any] | None = None) -> VerifiedPolicy:
        """The verified policy; with a published ``recalibration``, its head and thresholds (and its
        version in the policy's name)."""
        if self.verifier is None:
            return VerifiedPolicy(rule=None, version="verified-unavailable", top_p=self.settings.top_p_hits)
        rule = self.verifier.rule(self.settings.max_false_hit_rate, recalibration)
        version = f"verified-{self.verifier.id}" + (f"+{recalibration['version']}" if recalibration else "")
        if rule is not None and rule.threshold == float("inf"):
            log.warning("no verifier threshold is calibrated for a false-hit bound of %g: no semantic hits",
                        self.settings.max_false_hit_rate)
        return VerifiedPolicy(rule=rule, version=version, top_p=self.settings.top_p_hits)

    def load_policy(self, path: Any, *, version: str | None = None) -> LearnedPolicy:
        # the verifier's scores are features of the policy; without a verifier no hit is verified
        # (and with the veto no A is served)
        rule = self.verify_rule() or VerifyRule(cosine_floor=1.01, top_k=0, threshold=float("inf"))
        return LearnedPolicy(path, embedder_id=self.embedder.id, dim=self.embedder.dim,
                             max_false_hit_rate=self.settings.max_false_hit_rate,
                             exploration_rate=self.settings.exploration_rate, version=version, verify_rule=rule,
                             veto=self.settings.verify_learned,
                             verifier_sha256=(self.verifier.metadata.get("source_sha256")
                                              if self.verifier is not None else None))

    def _load_initial_policy(self) -> None:
        """An explicitly configured policy must load (a mismatch stops the proxy with the reason);
        otherwise the newest published version, then the shipped default, then the verified policy."""
        if self.settings.policy_path is not None:
            self.current = self.load_policy(self.settings.policy_path)
            return
        if self.settings.policy_dir is not None:
            pointer = PolicyDirectory(self.settings.policy_dir).current()
            if pointer is not None:
                try:
                    self.current = self.load_policy(pointer["path"], version=pointer["version"])
                    return
                except PolicyMismatch as exc:
                    self.rejected_versions.add(pointer["version"])
                    log.error("published policy %s refused: %s", pointer["version"], exc)
        try:
            self.current = self.load_policy(default_policy_path(self.embedder.id))
        except PolicyMismatch as exc:
            # the fallback holds the operator's bound too: the verified policy, never the unverified threshold
            self.load_errors["policy"] = str(exc)
            self.current = self.verified_policy()
            log.warning("shipped policy not usable (%s); using the verified policy", exc)

    # ----- hot reload -------------------------------------------------------------------------------
    def _show_policy(self) -> None:
        self.metrics.policy_version.clear()
        self.metrics.policy_version.labels(self.current.version).set(1)

    async def _watch_policy_dir(self) -> None:
        directory = PolicyDirectory(self.settings.policy_dir)
        while True:
            await asyncio.sleep(self.settings.policy_reload_s)
            try:
                await self.reload_policy(directory)
            except Exception:  # noqa: BLE001 - the watcher must survive anything
                log.exception("policy reload failed")

    def _swap(self, candidate: Policy) -> None:
        previous, self.current = self.current, candidate
        self.metrics.policy_reloads.inc()
        self._show_policy()
        log.info("policy %s -> %s", previous.version, candidate.version)

    async def reload_policy(self, directory: PolicyDirectory) -> bool:
        """Swap in the published version if it is new and valid (for the verified policy: a new
        recalibration of its verifier); in-flight requests keep the policy object they started with.
        Returns whether the policy changed."""
        if self.settings.policy == "verified":
            record = await asyncio.to_thread(self.recalibration)
            if record is None:
                return False
            candidate = self.verified_policy(record)
            if candidate.version == self.current.version:
                return False
            self._swap(candidate)
            return True
        pointer = await asyncio.to_thread(directory.current)
        if pointer is None or pointer["version"] == self.current.version or pointer["version"] in self.rejected_versions:
            return False
        try:
            candidate = await asyncio.to_thread(lambda: self.load_policy(pointer["path"], version=pointer["version"]))
        except PolicyMismatch as exc:
            self.rejected_versions.add(pointer["version"])
            self.metrics.failures.labels("policy", "rejected").inc()
            log.error("policy %s refused, keeping %s: %s", pointer["version"], self.current.version, exc)
            return False
        self._swap(candidate)
        return True
