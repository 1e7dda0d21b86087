"""Learning-loop benchmark: does the live guard notice wrong hits and tighten serving, and what does it cost?

    python benchmarks/learning_loop.py                     # full run, rewrites the learning-loop section of docs/benchmarks.md
    python benchmarks/learning_loop.py --tiny --no-doc --json /tmp/ll.json   # smoke size

A stream-shaped QQP dev workload (built as ``benchmarks/quality.py`` builds it: duplicate pairs joined
transitively into clusters, a random permutation of the distinct texts, the first arrival of a cluster
a negative, near misses interleaved; texts the shipped policy and the pair verifier train or calibrate
on left out; datasets directory ``--data-dir`` / ``VELO_DATASETS_DIR``, default ``../shared/data``) is
replayed, one request after the other, through the real proxy (``velo_proxy.app.create_app``, uvicorn
in a thread) with the learning loop on: shadow checks of served hits, near-miss reviews, promotion,
the live false-hit estimate and the guard's serving floor. QQP dev pairs are sampled (seed 0) until
the stream holds ``--requests`` distinct texts, so every cluster keeps its members (a prefix of the
whole 50k-text stream would hold almost no second arrivals).

The upstream is the fake one (``velo_proxy.devtools.fake_upstream``), in-process too: model
``fake-meaning`` answers every question of a cluster with that cluster's answer ("Answer <cluster>: "
plus a few words unique to it), model ``fake-judge`` is an oracle LLM judge (it says yes exactly when
the candidate answer is the question's cluster's answer), so by default the run isolates the guard's
behaviour from the judge's errors. ``--judge verifier`` uses the proxy's other judge (pair verifier +
agreement of the fresh and the cached answer's embeddings; here the answers are synthetic, so that leg
measures little). The proxy starts from a deliberately loose policy (default: cosine threshold 0.8).

Truth: the benchmark knows every text's cluster. A request served from the cache (A or exact) is a
false hit when the served answer belongs to another cluster than the request (read from the answer,
"Answer <cluster>:", and cross-checked with the cluster of the entry served: ``x-velo-entry`` of the
request that stored it). Hit rate = correct hits / positives (requests whose cluster arrived before),
false-hit rate (FHR) = false hits / hits, as in the quality benchmark.

After every ``--window`` requests the benchmark waits until the proxy's background work is done
(``pending_tasks == 0`` in ``/admin/stats``) and samples ``/admin/stats`` (the live estimate, the floor)
and ``/metrics`` (judge calls and tokens, promotions, guard changes, requests the guard held back).
Every judgement is read back from the proxy's label store at the end, and every change of the floor
is taken from the guard's own log records, both placed on the request axis.
"""

from __future__ import annotations

import argparse
import bisect
import json
import logging
import os
import random
import re
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # litellm: no network fetch at import

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from common import CACHE_DIR, DOCS, IMG, md_table  # noqa: E402
from quality import Workload, _from_pairs, _read_jsonl, write_section  # noqa: E402

SECTION = "learning-loop"
IMAGE = "bench-learning-loop.png"
ADMIN_KEY = "bench-admin-key"
UPSTREAM_KEY = "sk-bench-upstream"
MODEL = "fake-meaning"
ANSWER_RE = re.compile(r"Answer (\d+):")
#: syllables of the per-cluster words: enough for answers that differ in more than their number
_SYLLABLES = ("ba", "ko", "ri", "te", "mu", "sa", "lo", "vi", "ne", "du", "pa", "zo", "ki", "me", "ru", "go")


@dataclass
class LoopConfig:
    """One run of the benchmark (the command line, typed)."""

    requests: int = 6000
    """Distinct texts in the stream (QQP dev pairs are sampled until there are this many); 0: every held-out pair."""
    window: int = 250
    """Requests per sample of /admin/stats and /metrics (and per row of the table)."""
    policy: str = "threshold"
    """The proxy's starting policy: 'threshold' (cosine) or 'verified' (pair verifier)."""
    threshold: float = 0.8
    """Cosine threshold of the threshold policy (deliberately loose)."""
    max_false_hit_rate: float | None = None
    """The operator's bound delta; None: the proxy's default (0.02) for threshold, 0.1 for verified (its only calibrated bound)."""
    shadow_rate: float = 0.2
    """Share of served semantic hits the proxy judges (shadow checks)."""
    near_miss_review_rate: float = 0.2
    """Share of near misses (forwarded with a candidate above near_miss_floor) the proxy judges."""
    near_miss_floor: float = 0.8
    """Similarity from which a forwarded request counts as a near miss."""
    judge: str = "llm"
    """'llm' (a yes/no prompt to judge_model through the upstream) or 'verifier'."""
    judge_model: str = "fake-judge"
    """Model the LLM judge asks (the fake upstream's oracle judge by default)."""
    judge_budget_per_min: float = 100_000.0
    """Judge calls per minute: large, so the budget never decides what is judged here."""
    guard_window: int = 1000
    """Judgements the guard reads (VELO_GUARD_WINDOW; the proxy's default)."""
    live_guard: bool = True
    """False: judge and report, but never raise the floor (the baseline without the guard)."""
    seed: int = 0
    """Seed of the pair sample, the stream order and the proxy's sampling of checks and reviews."""
    tiny: bool = False
    """Smoke size (tests/data slices): the tiny training spec's texts left out, not the full one's."""
    settle_timeout_s: float = 120.0
    """Longest wait for the proxy's background work at the end of a window."""

    @property
    def delta(self) -> float:
        if self.max_false_hit_rate is not None:
            return self.max_false_hit_rate
        return 0.1 if self.policy == "verified" else 0.02


# ----- workload ------------------------------------------------------------------------------------------


def held_out_exclusions(tiny: bool) -> set[str]:
    """Texts the shipped policy trains on and the pair verifier trains or is calibrated on (as the quality
    benchmark leaves them out). On the tiny slices only the tiny spec's training texts: the full specs would
    take every row of them."""
    from policy.data import DataSpec, training_texts

    if tiny:
        return training_texts(DataSpec.tiny())
    from policy.verifier_data import verifier_texts

    return training_texts() | verifier_texts()


def build_workload(requests: int, *, seed: int = 0, exclude: set[str] = frozenset()) -> Workload:
    """QQP dev pairs without an excluded text, shuffled (``seed``) and taken until their distinct texts number
    ``requests`` (0: all of them), as one stream-shaped workload (``quality._from_pairs``)."""
    data = common.require_data()
    rows = [r for r in _read_jsonl(data / "pairs" / "qqp-dev.jsonl")
            if r["q1"].strip() and r["q2"].strip() and r["q1"].strip() not in exclude and r["q2"].strip() not in exclude]
    total = len(rows)
    random.Random(seed).shuffle(rows)
    if requests > 0:
        texts: set[str] = set()
        for k, r in enumerate(rows):
            texts.update((r["q1"].strip(), r["q2"].strip()))
            if len(texts) >= requests:
                rows = rows[:k + 1]
                break
    w = _from_pairs("qqp", f"QQP dev, {len(rows):,} of the {total:,} pairs without a text the policy or the "
                    f"verifier trained on (sample seed {seed})", rows, seed)
    if requests > 0 and w.n > requests:  # the last pair may bring one text too many: the stream's last one goes
        n = requests
        w.texts, w.cluster, w.lang = w.texts[:n], w.cluster[:n], w.lang[:n]
        w.pairs = [p for p in w.pairs if p[0] < n and p[1] < n]
    return w


def cluster_answer(cluster: int) -> str:
    """The fake upstream's answer to every question of ``cluster``: its number and a few words of its own
    (built from the number, so no two clusters share them)."""
    words, x = [], cluster + 1
    for k in range(4):
        syl, x = [], x * 7 + k + 3  # mixes the digits: neighbouring clusters get unrelated-looking words
        y = x
        for _ in range(3):
            syl.append(_SYLLABLES[y % len(_SYLLABLES)])
            y //= len(_SYLLABLES)
        words.append("".join(syl))
    return f"Answer {cluster}: " + " ".join(words) + "."


# ----- the run ----------------------------------------------------------------------------------------------


class _GuardLog(logging.Handler):
    """Keeps the live guard's floor changes (``velo_proxy.guard`` log records) with their time."""

    def __init__(self) -> None:
        super().__init__(level=logging.INFO)
        self.events: list[dict[str, Any]] = []

    def emit(self, record: logging.LogRecord) -> None:
        args = record.args if isinstance(record.args, tuple) else ()
        if record.msg.startswith("guard ") and len(args) >= 9:
            direction, policy, scope, old, new, judged, wrong, upper, bound = args[:9]
            self.events.append({"t": record.created, "direction": direction, "level": "scope" if scope else "policy",
                                "old": old, "new": new, "judged_at_floor": judged, "wrong_at_floor": wrong,
                                "upper_at_floor": round(float(upper), 6)})
        else:
            self.events.append({"t": record.created, "message": record.getMessage()})


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {'name{label="v",...}': value} for the learning loop's series."""
    from prometheus_client.parser import text_string_to_metric_families

    keep = ("velo_judge_calls", "velo_judge_tokens", "velo_guard_blocked", "velo_promotions", "velo_guard_changes",
            "velo_requests", "velo_shadow_checks", "velo_component_failures")
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        if not fam.name.startswith(keep):
            continue
        for s in fam.samples:
            if s.name.endswith("_created"):
                continue
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = float(s.value)
    return out


def metric_sum(m: dict[str, float], name: str, **labels: str) -> float:
    """Sum of the series of ``name`` whose labels include ``labels``."""
    total = 0.0
    for key, v in m.items():
        base, _, rest = key.partition("{")
        if base != name:
            continue
        if all(f'{k}="{val}"' in rest for k, val in labels.items()):
            total += v
    return total


def _settle(client: Any, timeout_s: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        stats = client.get("/admin/stats", headers={"authorization": f"Bearer {ADMIN_KEY}"}).json()
        if stats["pending_tasks"] == 0 or time.monotonic() > deadline:
            return stats
        time.sleep(0.02)


def run_loop(cfg: LoopConfig, w: Workload, workdir: Path, *, progress: bool = True) -> dict[str, Any]:
    """Replay ``w`` through a real proxy with the learning loop on; per-request records, per-window samples,
    the judgements and the floor changes."""
    import httpx

    from velo_proxy.app import create_app
    from velo_proxy.devtools.fake_upstream import create_fake_upstream
    from velo_proxy.devtools.server import ServerThread
    from velo_proxy.settings import Settings

    answers = {int(c): cluster_answer(int(c)) for c in np.unique(w.cluster)}
    upstream_app = create_fake_upstream(api_key=UPSTREAM_KEY)
    upstream_app.state.meanings = {t: answers[int(c)] for t, c in zip(w.texts, w.cluster.tolist())}
    settings = Settings(
        upstream_base_url="http://placeholder/v1", upstream_api_key=UPSTREAM_KEY, admin_key=ADMIN_KEY,
        data_dir=workdir / "data", policy=cfg.policy, similarity_threshold=cfg.threshold,
        max_false_hit_rate=cfg.delta, shadow_rate=cfg.shadow_rate, near_miss_review_rate=cfg.near_miss_review_rate,
        near_miss_floor=cfg.near_miss_floor, judge=cfg.judge,
        judge_model=cfg.judge_model if cfg.judge == "llm" else None, judge_budget_per_min=cfg.judge_budget_per_min,
        live_guard=cfg.live_guard, guard_window=cfg.guard_window, exploration_rate=0.0,
        # mechanics, not speed: on a busy 2-core machine an embedding or verifier call past its default deadline
        # would turn a hit into a forward (fail open) and blur what the loop did
        embed_timeout_ms=10_000, verifier_timeout_ms=10_000, search_timeout_ms=10_000,
        store_write_timeout_ms=10_000)
    guard_log = _GuardLog()
    glog = logging.getLogger("velo_proxy.guard")
    glog.addHandler(guard_log)
    old_level = glog.level
    glog.setLevel(logging.INFO)
    glog.propagate = False  # every floor change is a warning: kept here, not printed thousands of times
    up = ServerThread(upstream_app).start()
    proxy = None
    records: list[dict[str, Any]] = []
    windows: list[dict[str, Any]] = []
    done_at: list[float] = []  # wall time each request's response was complete
    request_ids: dict[str, int] = {}
    entry_index: dict[str, int] = {}  # entry id -> stream index of the request whose answer it stores
    pos = w.positives_mask()
    t0 = time.time()
    try:
        settings = settings.model_copy(update={"upstream_base_url": f"{up.url}/v1"})
        proxy = ServerThread(create_app(settings)).start()
        # the proxy samples its checks with an unseeded Random: seed it, so a rerun samples the same requests
        learning = proxy.app.state.velo.engine.after.learning
        if not hasattr(learning, "_rng"):
            print("warning: the learning loop has no _rng to seed: its sampling is not reproducible", file=sys.stderr)
        learning._rng = random.Random(cfg.seed)
        current = proxy.app.state.velo.services.policies.current
        version = current.version
        # the policy's own bar on the guard's score: a floor below it changes nothing that is served
        policy_bar = (current.verify_rule.threshold if current.verify_rule is not None
                      else getattr(current, "threshold", None))
        # the verifier judge's pair leg needs the pair verifier, which the proxy loads for verifying policies only
        verifier_loaded = proxy.app.state.velo.services.verifier is not None
        with httpx.Client(base_url=proxy.url, timeout=120) as client:
            for i, text in enumerate(w.texts):
                body = {"model": MODEL, "messages": [{"role": "user", "content": text}], "temperature": 0}
                r = client.post("/v1/chat/completions", json=body)
                done_at.append(time.time())
                if r.status_code != 200:
                    records.append({"i": i, "action": "error", "status": r.status_code})
                    continue
                action = r.headers.get("x-velo-action", "")
                entry = r.headers.get("x-velo-entry") or None
                request_ids[r.headers.get("x-velo-request-id", "")] = i
                content = r.json()["choices"][0]["message"]["content"] or ""
                m = ANSWER_RE.search(content)
                answered = int(m.group(1)) if m else -1
                sim = r.headers.get("x-velo-similarity")
                rec: dict[str, Any] = {"i": i, "action": action, "cluster": int(w.cluster[i]), "positive": bool(pos[i]),
                                       "answer_cluster": answered, "entry": entry, "similarity": float(sim) if sim else None}
                if action in ("A", "exact"):
                    j = entry_index.get(entry or "")
                    rec["source"] = j
                    rec["entry_cluster"] = int(w.cluster[j]) if j is not None else None
                    rec["correct"] = answered == int(w.cluster[i])
                elif entry:  # B / C: the id the new answer is stored under
                    entry_index[entry] = i
                records.append(rec)
                if (i + 1) % cfg.window == 0 or i + 1 == w.n:
                    stats = _settle(client, cfg.settle_timeout_s)
                    metrics = parse_metrics(client.get("/metrics").text)
                    windows.append(_window_row(records, windows, stats, metrics, version, w, t0, upstream_app))
                    if progress:
                        wr = windows[-1]
                        print(f"  {i + 1:>6}/{w.n}: hits {wr['hits']:>3} (false {wr['false']:>3}), live "
                              f"{_pct(wr['live_rate'])} (upper {_pct(wr['live_upper'])}), floor {wr['floor']}, "
                              f"judge calls {wr['judge_calls']:.0f}, {time.time() - t0:.0f} s", file=sys.stderr,
                              flush=True)
        labels_path = settings.data_dir / "judged" / "labels.jsonl"
        labels = [json.loads(line) for line in labels_path.read_text().splitlines()] if labels_path.exists() else []
    finally:
        if proxy is not None:
            proxy.stop()
        up.stop()
        glog.removeHandler(guard_log)
        glog.setLevel(old_level)
        glog.propagate = True
    seconds = time.time() - t0

    def at(ts: float) -> int:
        """Requests complete at wall time ``ts``: where an event of the proxy lies on the request axis."""
        return bisect.bisect_right(done_at, ts)

    cluster_of = {t: int(c) for t, c in zip(w.texts, w.cluster.tolist())}
    judged = []
    for lb in labels:
        q, cq = lb["question"], lb["cached_question"]
        truth = cluster_of.get(q) is not None and cluster_of.get(q) == cluster_of.get(cq)
        judged.append({"kind": lb["kind"], "correct": lb["correct"], "truth": truth, "score": lb["served_score"],
                       "cached_cluster": cluster_of.get(cq),
                       "similarity": lb["similarity"], "promoted": lb.get("promoted", False),
                       "request": request_ids.get(lb.get("request_id", "")), "known_at": at(lb["ts"]),
                       "tokens": lb.get("tokens", 0), "t": lb["ts"]})
    floor_events = []
    for ev in guard_log.events:
        floor_events.append({**{k: v for k, v in ev.items() if k != "t"}, "at": at(ev["t"])})
    return {"records": records, "windows": windows, "judgements": judged, "floor_events": floor_events,
            "policy_version": version, "policy_bar": policy_bar, "verifier_loaded": verifier_loaded,
            "seconds": round(seconds, 1)}


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f} %"


def _window_row(records: list[dict[str, Any]], windows: list[dict[str, Any]], stats: dict[str, Any],
                metrics: dict[str, float], version: str, w: Workload, t0: float, upstream_app: Any) -> dict[str, Any]:
    start = windows[-1]["end"] if windows else 0
    rows = records[start:]
    hits = [r for r in rows if r["action"] in ("A", "exact")]
    correct = sum(1 for r in hits if r["correct"])
    positives = sum(1 for r in rows if r.get("positive"))
    g = ((stats.get("live_guard") or {}).get("policies") or {}).get(version) or {}
    live = g.get("live") or {}
    judge = metric_sum(metrics, "velo_judge_calls_total")
    over = metric_sum(metrics, "velo_judge_calls_total", outcome="over_budget")
    # the fake upstream's request log: chat answers (B, C, verifier-judge fresh answers) and judge prompts
    reqs = upstream_app.state.requests
    by_model: dict[str, int] = {}
    for q in reqs:
        name = str(q["body"].get("model"))
        by_model[name] = by_model.get(name, 0) + 1
    reqs.clear()  # counted: do not keep every body of the run in memory
    prev = windows[-1]["upstream_by_model"] if windows else {}
    cum = {k: prev.get(k, 0) + by_model.get(k, 0) for k in set(prev) | set(by_model)}
    return {
        "start": start, "end": len(records), "requests": len(rows), "positives": positives,
        "hits": len(hits), "exact": sum(1 for r in hits if r["action"] == "exact"), "correct": correct,
        "false": len(hits) - correct, "errors": sum(1 for r in rows if r["action"] == "error"),
        "hit_rate": correct / positives if positives else None,
        "served_share": len(hits) / len(rows) if rows else None,
        "fhr": (len(hits) - correct) / len(hits) if hits else None,
        "live_judged": live.get("judged", 0), "live_wrong": live.get("wrong", 0), "live_rate": live.get("rate"),
        "live_upper": live.get("upper_95"), "floor": g.get("floor"), "judgements": g.get("judgements", 0),
        "at_floor": g.get("at_floor"), "judge_calls": judge - over, "judge_over_budget": over,
        "judge_calls_shadow": metric_sum(metrics, "velo_judge_calls_total", kind="shadow") -
        metric_sum(metrics, "velo_judge_calls_total", kind="shadow", outcome="over_budget"),
        "judge_calls_near_miss": metric_sum(metrics, "velo_judge_calls_total", kind="near_miss") -
        metric_sum(metrics, "velo_judge_calls_total", kind="near_miss", outcome="over_budget"),
        "judge_unclear_or_failed": metric_sum(metrics, "velo_judge_calls_total", outcome="unclear") +
        metric_sum(metrics, "velo_judge_calls_total", outcome="failed"),
        "judge_tokens": metric_sum(metrics, "velo_judge_tokens_total"),
        "promotions": metric_sum(metrics, "velo_promotions_total"),
        "guard_blocked": metric_sum(metrics, "velo_guard_blocked_total"),
        "guard_tighten": metric_sum(metrics, "velo_guard_changes_total", direction="tighten", level="policy"),
        "guard_relax": metric_sum(metrics, "velo_guard_changes_total", direction="relax", level="policy"),
        "component_failures": metric_sum(metrics, "velo_component_failures_total"),
        "entries": (stats.get("store") or {}).get("entries"), "upstream_by_model": cum,
        "seconds": round(time.time() - t0, 1),
    }


# ----- analysis ------------------------------------------------------------------------------------------


def _span(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    hits = [r for r in records if r["action"] in ("A", "exact")]
    correct = sum(1 for r in hits if r["correct"])
    positives = sum(1 for r in records if r.get("positive"))
    return {"requests": len(records), "positives": positives, "hits": len(hits), "correct": correct,
            "false": len(hits) - correct, "hit_rate": correct / positives if positives else None,
            "fhr": (len(hits) - correct) / len(hits) if hits else None}


def analyse(run: dict[str, Any], cfg: LoopConfig, w: Workload) -> dict[str, Any]:
    """The reading's numbers: reaction of the guard, cost of the loop, hit rate and FHR before and after."""
    recs, wins, judged, events = run["records"], run["windows"], run["judgements"], run["floor_events"]
    delta = cfg.delta
    n = len(recs)
    out: dict[str, Any] = {"delta": delta, "overall": _span(recs)}
    pol_events = [e for e in events if e.get("level") == "policy"]
    tight = [e for e in pol_events if e["direction"] == "tighten"]
    bar = run.get("policy_bar")

    def binds(floor: Any) -> bool:
        """Whether a floor is above the policy's own bar (only then does it change what is served)."""
        return floor == "off" or (isinstance(floor, (int, float)) and (bar is None or floor > bar))

    out["policy_bar"] = bar
    wrong = [j for j in judged if not j["correct"]]
    first_wrong = wrong[0] if wrong else None
    out["first_wrong_judgement"] = first_wrong and {k: first_wrong[k] for k in ("kind", "request", "known_at", "score")}
    wrong_hit = next((j for j in judged if j["kind"] == "shadow" and not j["correct"]), None)
    out["first_wrong_shadow"] = wrong_hit and {k: wrong_hit[k] for k in ("request", "known_at", "score")}
    first_hit_wrong = next((r for r in recs if r["action"] in ("A", "exact") and not r["correct"]), None)
    out["first_false_hit_request"] = first_hit_wrong["i"] if first_hit_wrong else None
    # a near-miss review judged wrong can raise the floor too: for a verifying policy mostly in the range of
    # scores the policy itself never serves (below its threshold), where the floor changes nothing
    out["rises_below_bar"] = sum(1 for e in tight if not binds(e["new"]))
    rise = next((e for e in tight if binds(e["new"])), None)
    if tight:
        out["first_floor_rise"] = {"at": tight[0]["at"], "new": tight[0]["new"]}
    if rise is not None:
        out["first_binding_rise"] = {"at": rise["at"], "new": rise["new"]}
        if wrong_hit is not None:
            out["reaction"] = {
                # requests the proxy answered between serving the first hit judged wrong and the floor going up
                "requests_wrong_hit_to_rise": rise["at"] - (wrong_hit["request"] or 0),
                "requests_judgement_to_rise": rise["at"] - wrong_hit["known_at"],
                "judged_hits_to_rise": sum(1 for j in judged if j["kind"] == "shadow" and wrong_hit["t"] <= j["t"]
                                           and j["known_at"] <= rise["at"])}
    # the first window (with hits) whose true FHR is within delta, once the guard had a wrong hit to act on
    start = wrong_hit["known_at"] if wrong_hit else (out["first_false_hit_request"] or 0)
    under = [wr for wr in wins if wr["start"] >= start and wr["hits"] and wr["fhr"] <= delta]
    out["first_window_under_delta"] = under[0]["end"] if under else None
    if under:
        later = [wr for wr in wins if wr["end"] > under[0]["end"] and wr["hits"]]
        out["later_windows_over_delta"] = sum(1 for wr in later if wr["fhr"] > delta)
        out["later_windows_with_hits"] = len(later)
        out["hits_until_under_delta"] = sum(1 for r in recs[:under[0]["start"]] if r["action"] in ("A", "exact"))
        out["false_until_under_delta"] = sum(1 for r in recs[:under[0]["start"]]
                                             if r["action"] in ("A", "exact") and not r["correct"])
    out["windows_without_hits"] = sum(1 for wr in wins if not wr["hits"])
    # hit rate and FHR before the first floor that binds, after it, and over the last quarter of the run
    rise_at = rise["at"] if rise is not None else n
    out["before_rise"] = _span(recs[:rise_at])
    out["after_rise"] = _span(recs[rise_at:])
    tail = max(cfg.window, (n // 4) // cfg.window * cfg.window)
    out["last"] = {"from": n - tail, **_span(recs[n - tail:])}
    last = wins[-1] if wins else {}
    judge_calls = last.get("judge_calls", 0.0)
    out["cost"] = {
        "judge_calls": judge_calls, "judge_calls_shadow": last.get("judge_calls_shadow", 0.0),
        "judge_calls_near_miss": last.get("judge_calls_near_miss", 0.0),
        "over_budget": last.get("judge_over_budget", 0.0), "unclear_or_failed": last.get("judge_unclear_or_failed", 0.0),
        "judge_tokens": last.get("judge_tokens", 0.0),
        "judge_calls_per_1000": 1000 * judge_calls / n if n else None,
        "judge_tokens_per_1000": 1000 * last.get("judge_tokens", 0.0) / n if n else None,
        "upstream_by_model": last.get("upstream_by_model", {}),
        "hits_per_judge_call": out["overall"]["hits"] / judge_calls if judge_calls else None,
    }
    # what the judge said against the benchmark's truth (the oracle judge: all of them agree)
    agree = sum(1 for j in judged if j["correct"] == j["truth"])
    out["judge_vs_truth"] = {"judgements": len(judged), "agree": agree,
                             "judged_wrong_truly_right": sum(1 for j in judged if not j["correct"] and j["truth"]),
                             "judged_right_truly_wrong": sum(1 for j in judged if j["correct"] and not j["truth"])}
    out["judgements"] = {k: sum(1 for j in judged if j["kind"] == k) for k in ("shadow", "near_miss")}
    out["judged_wrong"] = {k: sum(1 for j in judged if j["kind"] == k and not j["correct"]) for k in ("shadow", "near_miss")}
    out["promoted"] = sum(1 for j in judged if j["promoted"])
    out["floor_changes"] = {"tighten": len(tight), "relax": sum(1 for e in pol_events if e["direction"] == "relax"),
                            "final": wins[-1]["floor"] if wins else None,
                            "max": max((e["new"] for e in pol_events if isinstance(e["new"], (int, float))), default=None),
                            "off": sum(1 for e in pol_events if e["new"] == "off")}
    # the served answer's cluster against the cluster of the entry that was served (x-velo-entry): they differ
    # only for promoted aliases (an alias holds the judged candidate's answer under the new question's id)
    served = [r for r in recs if r["action"] in ("A", "exact")]
    out["entry_checks"] = {
        "served": len(served),
        "entry_unknown": sum(1 for r in served if r.get("entry_cluster") is None),
        "answer_cluster_differs_from_entry": sum(1 for r in served if r.get("entry_cluster") is not None
                                                 and r["entry_cluster"] != r["answer_cluster"]),
        "false_on_labelled_non_duplicate": sum(1 for r in served if not r["correct"] and r.get("source") is not None
                                               and w.labelled_negative(r["i"], r["source"])),
    }
    out["actions"] = {a: sum(1 for r in recs if r["action"] == a) for a in ("exact", "A", "B", "C", "error")}
    # promoted aliases (the entry of the judged request) that were later served
    aliases = {recs[j["request"]]["entry"] for j in judged if j["promoted"] and j["request"] is not None
               and recs[j["request"]].get("entry")}
    out["aliases_served"] = sum(1 for r in served if r.get("entry") in aliases)
    out["shadow_share"] = out["judgements"]["shadow"] / len(served) if served else None
    last_w = wins[-1] if wins else {}
    out["live_end"] = {"judged": last_w.get("live_judged"), "wrong": last_w.get("live_wrong"),
                       "rate": last_w.get("live_rate"), "upper": last_w.get("live_upper"),
                       "at_floor": last_w.get("at_floor")}
    return out


# ----- report --------------------------------------------------------------------------------------------


def plot(result: dict[str, Any], img_dir: Path) -> str | None:
    """The four panels over the request axis; None (and a message) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        print(f"plot skipped: matplotlib not importable ({exc}); `pip install matplotlib`", file=sys.stderr)
        return None
    img_dir.mkdir(parents=True, exist_ok=True)
    wins, delta = result["windows"], result["analysis"]["delta"]
    x = [wr["end"] for wr in wins]
    mid = [(wr["start"] + wr["end"]) / 2 for wr in wins]
    fig, axes = plt.subplots(4, 1, figsize=(9, 11), sharex=True)
    ax = axes[0]
    ax.plot(mid, [100 * (wr["hit_rate"] or 0) for wr in wins], marker=".", label="hit rate (correct hits / positives)")
    ax.plot(mid, [100 * (wr["served_share"] or 0) for wr in wins], marker=".", lw=0.8, alpha=0.7,
            label="served share (hits / requests)")
    ax.set_ylabel("% per window")
    ax.set_title(f"{result['config']['policy']} policy"
                 + (f" {result['config']['threshold']:g}" if result["config"]["policy"] == "threshold" else "")
                 + f", {result['config']['judge']} judge, δ = {100 * delta:g} %, window {result['config']['window']}",
                 fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    ax = axes[1]
    fx = [m for m, wr in zip(mid, wins) if wr["hits"]]
    ax.plot(fx, [100 * wr["fhr"] for wr in wins if wr["hits"]], marker=".", color="C3",
            label="true FHR per window (other-cluster hits / hits)")
    ax.plot(x, [100 * wr["live_rate"] if wr["live_rate"] is not None else np.nan for wr in wins], color="C0",
            label="live estimate (guard window)")
    ax.plot(x, [100 * wr["live_upper"] if wr["live_upper"] is not None else np.nan for wr in wins], color="C0", ls="--",
            label="its 95 % upper bound")
    ax.axhline(100 * delta, color="k", lw=1, ls=":", label=f"δ = {100 * delta:g} %")
    ax.set_ylabel("false-hit rate (%)")
    ax.set_ylim(0, 101)
    ax.legend(fontsize=8, loc="upper right")
    ax.grid(alpha=0.3)
    ax = axes[2]
    # the floor as the guard set it (its log), "off" drawn at 1.0
    ev = [e for e in result["floor_events"] if e.get("level") == "policy"]
    xs, ys, cur = [0], [np.nan], np.nan
    for e in ev:
        xs.append(e["at"])
        ys.append(cur)
        cur = np.nan if e["new"] is None else (1.0 if e["new"] == "off" else float(e["new"]))
        xs.append(e["at"])
        ys.append(cur)
    xs.append(result["analysis"]["overall"]["requests"])
    ys.append(cur)
    ax.plot(xs, ys, color="C2", label="guard's serving floor (none: gap)")
    if result["config"]["policy"] == "threshold":
        ax.axhline(result["config"]["threshold"], color="grey", lw=1, ls=":", label="policy threshold")
    ax.set_ylabel("score floor")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    ax = axes[3]
    ax.plot(x, [wr["judge_calls"] for wr in wins], label="judge calls (cumulative)")
    ax.plot(x, [wr["judge_calls_shadow"] for wr in wins], lw=0.8, label="of them shadow checks")
    ax.plot(x, [wr["judge_calls_near_miss"] for wr in wins], lw=0.8, label="of them near-miss reviews")
    ax.plot(x, [wr["promotions"] for wr in wins], lw=0.8, ls="--", label="promotions (cumulative)")
    ax.set_ylabel("count")
    ax.set_xlabel("requests")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = img_dir / IMAGE
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path.name


def _f(x: float | None, digits: int = 1) -> str:
    return "–" if x is None else f"{100 * x:.{digits}f} %"


def _n(k: int | float, noun: str) -> str:
    return f"{k:,} {noun}" + ("" if k == 1 else "s")


def _at_floor(est: dict[str, Any] | None) -> str:
    return "–" if not est else f"{est['judged']} ({est['wrong']})"


def _floor(v: Any) -> str:
    return "none" if v is None else (str(v) if isinstance(v, str) else f"{v:.4f}")


def markdown(result: dict[str, Any], command: str, image: str | None) -> str:
    m, cfg, a = result["machine"], result["config"], result["analysis"]
    c, wl = a["cost"], result["workload"]
    lines: list[str] = []
    lines.append(f"Measured {m['utc']} UTC on {m['cpu']}, {m['cores']} cores, {m['mem_mb']:,} MB RAM, load average "
                 f"{m['load_avg']} at the start (git {m['git'] or '?'}"
                 + (f", with uncommitted changes to {len(m['modified_files'])} tracked files, listed in the JSON"
                    if m.get("modified_files") else "") + f"). Run time {result['seconds']:.0f} s "
                 f"({result['run_seconds']:.0f} s replaying {a['overall']['requests']:,} requests). Command:\n\n"
                 f"```bash\n{command}\n```\n")
    judge = (f"LLM judge `{cfg['judge_model']}`" + (" (the fake upstream's oracle: yes exactly when the candidate "
             "is the question's cluster's answer)" if cfg["judge_model"] == "fake-judge" else "")
             if cfg["judge"] == "llm" else "verifier judge (" + ("pair verifier + " if result["verifier_loaded"] else
             "answer agreement only: the proxy loads the pair verifier for verifying policies only, so its pair leg is "
             "missing here; ") + "the answers are synthetic, so the agreement leg compares the embeddings of "
             "made-up strings)")
    pol = (f"`threshold` at cosine {cfg['threshold']:g}" if cfg["policy"] == "threshold" else f"`{cfg['policy']}`")
    lines.append(f"**Setup.** Workload: {wl['description']}: {wl['requests']:,} requests, {wl['positives']:,} "
                 f"positives, {wl['clusters']:,} clusters. Proxy policy {pol} (version `{result['policy_version']}`), "
                 f"δ = {100 * a['delta']:g} %, shadow rate {cfg['shadow_rate']:g}, near-miss review rate "
                 f"{cfg['near_miss_review_rate']:g} (floor {cfg['near_miss_floor']:g}), {judge}, judge budget "
                 f"{cfg['judge_budget_per_min']:,.0f}/min, guard window {cfg['guard_window']:,} judgements, live guard "
                 f"{'on' if cfg['live_guard'] else '**off**'}. Requests one at a time; after every {cfg['window']} the "
                 "benchmark waits for the proxy's background work and samples `/admin/stats` and `/metrics`.\n")
    rows = []
    for wr in result["windows"]:
        rows.append([f"{wr['start']:,}–{wr['end']:,}", wr["positives"], f"{wr['correct']} / {wr['false']}",
                     _f(wr["hit_rate"]), _f(wr["fhr"]),
                     f"{_f(wr['live_rate'])} / {_f(wr['live_upper'])} ({wr['live_judged']})", _floor(wr["floor"]),
                     _at_floor(wr.get("at_floor")),
                     f"{wr['judge_calls']:.0f}", f"{wr['judge_tokens']:.0f}", f"{wr['guard_blocked']:.0f}",
                     f"{wr['promotions']:.0f}"])
    lines.append("**Windows** (hit rate = correct hits / positives of the window; true FHR = other-cluster hits / "
                 "hits of the window; live estimate = the guard's judged served hits in its window of "
                 f"{cfg['guard_window']:,} judgements, rate / 95 % upper bound (judged); floor = the guard's extra "
                 "score bar at the window's end, and the judgements in its window at or above it (shadow checks and "
                 "near-miss reviews; of them judged wrong); judge calls, tokens, held back (hits the policy chose and the floor "
                 "forwarded) and promotions are cumulative)\n")
    lines.append(md_table(["requests", "positives", "correct / false hits", "hit rate", "true FHR",
                           "live estimate / upper (judged)", "floor", "judged ≥ floor (wrong)", "judge calls", "judge tokens", "held back",
                           "promoted"], rows))
    lines.append("")
    o = a["overall"]
    lines.append(f"**Whole run:** {o['hits']:,} hits ({o['correct']:,} correct, {o['false']:,} false) of "
                 f"{o['requests']:,} requests; hit rate {_f(o['hit_rate'])}, true FHR {_f(o['fhr'])}; actions "
                 + ", ".join(f"{k} {v:,}" for k, v in a["actions"].items() if v) + f". "
                 f"{a['judgements']['shadow']:,} shadow checks ({_f(a['shadow_share'])} of the hits, at a shadow rate "
                 f"of {cfg['shadow_rate']:g}; {a['judged_wrong']['shadow']:,} judged wrong), "
                 f"{a['judgements']['near_miss']:,} near-miss reviews ({a['judged_wrong']['near_miss']:,} judged "
                 f"wrong, {a['promoted']:,} promoted; {a['aliases_served']:,} hits were later served from a promoted "
                 "alias). The judge agreed with the clusters on "
                 f"{a['judge_vs_truth']['agree']:,} of {a['judge_vs_truth']['judgements']:,} judgements "
                 f"({a['judge_vs_truth']['judged_wrong_truly_right']:,} called wrong that were right, "
                 f"{a['judge_vs_truth']['judged_right_truly_wrong']:,} called right that were wrong). Floor changes: "
                 f"{a['floor_changes']['tighten']:,} up, {a['floor_changes']['relax']:,} down"
                 + (f", {a['floor_changes']['off']:,} to 'off'" if a["floor_changes"]["off"] else "")
                 + f"; final floor {_floor(a['floor_changes']['final'])}. Of the false hits, "
                 f"{a['entry_checks']['false_on_labelled_non_duplicate']:,} fell on a pair QQP labels \"not duplicate\" "
                 "(the rest: other clusters with no label between them, some of which are duplicates QQP's clusters "
                 "miss; the oracle judge counts them wrong too, so judge and truth agree).\n")
    lines.append("**Reading.**\n")
    lines.extend(f"- {s}" for s in reading(result))
    lines.append("")
    if image:
        lines.append(f"![learning loop](img/{image})\n")
    else:
        lines.append("(No plot: matplotlib was not importable when this ran.)\n")
    return "\n".join(lines)


def reading(result: dict[str, Any]) -> list[str]:
    """The short reading, every number from ``result``."""
    a, cfg = result["analysis"], result["config"]
    c, delta = a["cost"], a["delta"]
    out = []
    fw, fs, rise, react = (a.get("first_wrong_judgement"), a.get("first_wrong_shadow"), a.get("first_binding_rise"),
                           a.get("reaction"))
    bar = a.get("policy_bar")
    if fw is None:
        out.append("No judgement came back wrong: the guard never had a reason to raise the floor.")
    elif not cfg["live_guard"]:
        out.append(f"The first wrong judgement ({fw['kind']}, of request {fw['request']:,}) came back after request "
                   f"{fw['known_at']:,}; the guard was off, so nothing changed.")
    elif fs is None:
        out.append(f"No served hit was judged wrong (the first wrong judgement was a {fw['kind']} review of request "
                   f"{fw['request']:,}); the floor never rose above the policy's own bar"
                   + (f" ({bar:.4f})" if bar is not None else "") + ".")
    elif rise is None:
        out.append(f"The first hit judged wrong was served at request {fs['request']:,} (score {fs['score']:.4f}); "
                   "the floor never rose above the policy's own bar.")
    else:
        out.append(f"**Reaction.** The first false hit was served at request {a['first_false_hit_request']:,}; the "
                   f"first hit judged wrong was served at request {fs['request']:,} (score {fs['score']:.4f}) and its "
                   f"judgement was back after request {fs['known_at']:,} "
                   f"({_n(fs['known_at'] - a['first_false_hit_request'], 'request')} after the first false hit: the "
                   "shadow checks sample hits at random). The floor rose above the policy's own bar"
                   + (f" ({bar:.4f})" if bar is not None else "") + f" after request {rise['at']:,} "
                   f"(to {_floor(rise['new'])}), "
                   + ("on that judgement itself" if react["requests_judgement_to_rise"] == 0 and
                      react["judged_hits_to_rise"] <= 1 else
                      f"{_n(react['requests_judgement_to_rise'], 'request')} and "
                      f"{_n(react['judged_hits_to_rise'], 'judged hit')} after it")
                   + f": {_n(react['requests_wrong_hit_to_rise'], 'request')} after the wrong hit itself was served "
                   "(the judgement runs in the background while the next request is answered).")
    if a.get("rises_below_bar"):
        out.append(f"{_n(a['rises_below_bar'], 'rise')} of the floor stayed below the policy's own bar"
                   + (f" ({bar:.4f})" if bar is not None else "") + ": near-miss reviews judged wrong, of candidates "
                   "the policy had rejected itself; they count as guard tightenings but change nothing that is served.")
    fu = a.get("first_window_under_delta")
    if fu is not None:
        out.append(f"The true FHR of a window first fell to δ = {100 * delta:g} % or below in the window ending at "
                   f"request {fu:,}, after {a['hits_until_under_delta']:,} hits of which {a['false_until_under_delta']:,} "
                   f"false; of the {a['later_windows_with_hits']} later windows with hits, "
                   f"{a['later_windows_over_delta']} were above δ again"
                   + (f" ({_n(a['windows_without_hits'], 'window')} of the run served nothing at all)"
                      if a["windows_without_hits"] else "") + ".")
    elif fw is not None:
        out.append(f"No window's true FHR fell to δ = {100 * delta:g} % or below during the run.")
    fc = a["floor_changes"]
    if fc["tighten"]:
        out.append(f"The floor moved up {_n(fc['tighten'], 'time')} and down {_n(fc['relax'], 'time')}, to "
                   f"{_floor(fc['final'])} at the end.")
    le, o = a["live_end"], a["overall"]
    if le["judged"]:
        out.append(f"**Live estimate against the truth.** At the end the live estimate read {_f(le['rate'])} (95 % "
                   f"upper bound {_f(le['upper'])}) over the {le['judged']:,} served hits judged in the guard's "
                   f"window; the true FHR was {_f(o['fhr'])} over the whole run and {_f(a['last']['fhr'])} over the "
                   f"last {a['last']['requests']:,} requests. The estimate pools every judged hit in the window, "
                   "those served before the floor rose included. At or above the final floor the guard's window held "
                   + (f"{_n(le['at_floor']['judged'], 'judgement')}, {le['at_floor']['wrong']:,} of them wrong."
                      if le.get("at_floor") else "no judgement."))
    b, af, la = a["before_rise"], a["after_rise"], a["last"]
    out.append(f"**Hit rate before/after.** Before the floor first rose above the policy's bar ({b['requests']:,} "
               "requests): hit rate "
               f"{_f(b['hit_rate'])}, true FHR {_f(b['fhr'])} ({b['hits']:,} hits). After it "
               f"({af['requests']:,} requests): hit rate {_f(af['hit_rate'])}, true FHR {_f(af['fhr'])} "
               f"({af['hits']:,} hits). Last {la['requests']:,} requests: hit rate {_f(la['hit_rate'])}, true FHR "
               f"{_f(la['fhr'])} ({la['hits']:,} hits, {la['false']:,} false).")
    ups = c["upstream_by_model"]
    out.append(f"**Cost.** {c['judge_calls']:,.0f} judge calls ({c['judge_calls_shadow']:,.0f} shadow checks, "
               f"{c['judge_calls_near_miss']:,.0f} near-miss reviews; {c['over_budget']:,.0f} over budget, "
               f"{c['unclear_or_failed']:,.0f} unclear or failed): {c['judge_calls_per_1000']:.1f} per 1,000 requests, "
               f"{c['judge_tokens']:,.0f} judge tokens = {c['judge_tokens_per_1000']:.0f} per 1,000 requests (the fake "
               "upstream's accounting: 10 prompt tokens flat plus the answer's words"
               + (f"; the judge prompts here average {c['prompt_chars_mean']:,.0f} characters, roughly "
                  f"{c['prompt_chars_mean'] / 4:,.0f} tokens of a real tokenizer"
                  if cfg["judge"] == "llm" and c.get("prompt_chars_mean") else
                  "; the verifier judge's tokens are the fresh upstream answers of shadow checks"
                  if cfg["judge"] == "verifier" else "")
               + "). Upstream calls by model: "
               + ", ".join(f"{k} {v:,}" for k, v in sorted(ups.items())) + f", against {a['overall']['hits']:,} "
               "requests answered from the cache.")
    if a["promoted"]:
        nm = c["judge_calls_near_miss"]
        out.append(f"**Near-miss reviews and promotion.** {nm:,.0f} of the {c['judge_calls']:,.0f} judge calls "
                   f"({_f(nm / c['judge_calls'] if c['judge_calls'] else None)}) reviewed near misses; "
                   f"{a['promoted']:,} were approved and promoted to aliases, and later in the run "
                   f"{_n(a['aliases_served'], 'hit')} {'was' if a['aliases_served'] == 1 else 'were'} served from one "
                   "of them (an alias answers a verbatim repeat "
                   "of its question from the exact tier, which this stream never sends, or a later paraphrase whose "
                   "score reaches the floor).")
    return out


# ----- main ----------------------------------------------------------------------------------------------


def evaluate(cfg: LoopConfig, *, progress: bool = True) -> dict[str, Any]:
    common.require_data()  # a missing datasets directory is a message naming the setting, not a traceback
    t_start = time.time()
    machine = common.machine_info()
    machine["modified_files"] = _modified_files()  # uncommitted changes the run saw (git describes HEAD only)
    w = build_workload(cfg.requests, seed=cfg.seed, exclude=held_out_exclusions(cfg.tiny))
    pos = w.positives_mask()
    print(f"[learning loop] {w.n} requests, {int(pos.sum())} positives, {len(np.unique(w.cluster))} clusters",
          file=sys.stderr, flush=True)
    workdir = Path(tempfile.mkdtemp(prefix="velo-learning-"))
    try:
        run = run_loop(cfg, w, workdir, progress=progress)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    result: dict[str, Any] = {
        "machine": machine, "config": asdict(cfg),
        "workload": {"description": w.description, "requests": w.n, "positives": int(pos.sum()),
                     "clusters": int(len(np.unique(w.cluster)))},
        **run,
    }
    result["config"]["delta"] = cfg.delta
    result["run_seconds"] = run["seconds"]
    result["analysis"] = analyse(run, cfg, w)
    from velo_proxy.judging import judge_prompt

    # what a real judge prompt would weigh (the fake upstream bills 10 prompt tokens whatever it gets)
    sizes = [sum(len(p["content"]) for p in judge_prompt(w.texts[j["request"]], cluster_answer(j["cached_cluster"])))
             for j in run["judgements"] if j["request"] is not None and j["cached_cluster"] is not None]
    result["analysis"]["cost"]["prompt_chars_mean"] = round(float(np.mean(sizes)), 1) if sizes else None
    result["seconds"] = round(time.time() - t_start, 1)
    return result


def _modified_files() -> list[str]:
    import subprocess

    try:
        out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=common.REPO,
                             capture_output=True, text=True, timeout=5).stdout
    except Exception:  # noqa: BLE001
        return []
    return [line[3:] for line in out.splitlines() if line.strip()]


def config_from_args(args: argparse.Namespace) -> LoopConfig:
    cfg = LoopConfig(**{k: getattr(args, k) for k in LoopConfig.__dataclass_fields__ if hasattr(args, k)})
    if args.tiny:
        cfg.requests, cfg.window = min(cfg.requests, 300) if cfg.requests else 300, min(cfg.window, 50)
    return cfg


def main(argv: list[str] | None = None) -> int:
    d = LoopConfig()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=d.requests, help="distinct texts in the stream (0: all held-out pairs)")
    ap.add_argument("--window", type=int, default=d.window, help="requests per sample (and per table row)")
    ap.add_argument("--policy", choices=("threshold", "verified"), default=d.policy)
    ap.add_argument("--threshold", type=float, default=d.threshold, help="cosine threshold of the threshold policy")
    ap.add_argument("--max-false-hit-rate", type=float, default=d.max_false_hit_rate,
                    help="delta (default: 0.02 for threshold, 0.1 for verified)")
    ap.add_argument("--shadow-rate", type=float, default=d.shadow_rate)
    ap.add_argument("--near-miss-review-rate", type=float, default=d.near_miss_review_rate)
    ap.add_argument("--near-miss-floor", type=float, default=d.near_miss_floor)
    ap.add_argument("--judge", choices=("llm", "verifier"), default=d.judge)
    ap.add_argument("--judge-model", default=d.judge_model)
    ap.add_argument("--judge-budget-per-min", type=float, default=d.judge_budget_per_min)
    ap.add_argument("--guard-window", type=int, default=d.guard_window)
    ap.add_argument("--no-live-guard", dest="live_guard", action="store_false", help="judge, but never raise the floor")
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--tiny", action="store_true", help="smoke size: 300 requests, windows of 50")
    ap.add_argument("--data-dir", type=Path, default=None,
                    help="datasets directory (default: env VELO_DATASETS_DIR, else ../shared/data)")
    ap.add_argument("--json", type=Path, default=CACHE_DIR / "learning_loop.json")
    ap.add_argument("--doc", type=Path, default=DOCS / "benchmarks.md")
    ap.add_argument("--img-dir", type=Path, default=IMG)
    ap.add_argument("--no-doc", dest="write_doc", action="store_false")
    ap.add_argument("--from-json", type=Path, default=None,
                    help="write the doc section and plot from the results of an earlier run, instead of running")
    args = ap.parse_args(argv)
    common.set_data_dir(args.data_dir)
    if args.from_json is not None:
        result = json.loads(args.from_json.read_text())
        command = result["command"]  # the doc names the command that measured, not the one that re-rendered
    else:
        cfg = config_from_args(args)
        command = ("python benchmarks/learning_loop.py " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
        result = evaluate(cfg)
        result["command"] = command
        common.write_json(args.json, result)
        print(f"results: {args.json}", file=sys.stderr)
    if args.write_doc:
        image = plot(result, args.img_dir)
        write_section(args.doc, SECTION, markdown(result, command, image))
        print(f"doc: {args.doc}", file=sys.stderr)
    else:
        print(markdown(result, command, None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
