"""deploy/k8s: the manifests validate against the Kubernetes JSON schemas, offline.

The schemas come from the `kubernetes-validate` wheel (dev extra), which bundles them
per Kubernetes release; strict mode refuses unknown fields (a misspelt `readinessProbe`
key fails). Beyond the schema: the pieces reference each other correctly (selectors,
ports, the HPA's target, the env names the service reads).
"""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="dev extra kubernetes-validate not installed")

K8S = Path(__file__).resolve().parents[2] / "deploy" / "k8s"
# The oldest Kubernetes release still in wide use and the newest the wheel knows.
VERSIONS = ["1.28.0", kubernetes_validate.latest_version()]


def _documents() -> list[tuple[str, dict]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                docs.append((path.name, doc))
    return docs


def _by_kind() -> dict[str, dict]:
    """The first document of each kind, in file order (configmap.yaml's before cronjob-cycle.yaml's)."""
    kinds: dict[str, dict] = {}
    for _, doc in _documents():
        kinds.setdefault(doc["kind"], doc)
    return kinds


@pytest.mark.parametrize("version", VERSIONS)
def test_every_manifest_passes_the_strict_schema(version):
    checked = 0
    for name, doc in _documents():
        if doc["kind"] == "Kustomization":  # a kustomize file, not an API object
            continue
        kubernetes_validate.validate(doc, version, strict=True)
        checked += 1
    assert checked >= 6


def test_a_broken_manifest_is_refused():
    """The check is real: a misspelt field and a wrong type both fail."""
    dep = _by_kind()["Deployment"]
    container = dep["spec"]["template"]["spec"]["containers"][0]
    container["readinessProbe"]["httpGett"] = container["readinessProbe"].pop("httpGet")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(dep, VERSIONS[-1], strict=True)
    hpa = _by_kind()["HorizontalPodAutoscaler"]
    hpa["spec"]["minReplicas"] = "three"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(hpa, VERSIONS[-1], strict=True)


def test_the_pieces_fit_together():
    kinds = _by_kind()
    dep, svc, hpa, pdb = kinds["Deployment"], kinds["Service"], kinds["HorizontalPodAutoscaler"], \
        kinds["PodDisruptionBudget"]
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    for selector in (dep["spec"]["selector"]["matchLabels"], svc["spec"]["selector"],
                     pdb["spec"]["selector"]["matchLabels"]):
        assert selector.items() <= pod_labels.items()
    container = dep["spec"]["template"]["spec"]["containers"][0]
    port = container["ports"][0]
    assert port["containerPort"] == int(container["command"][container["command"].index("--port") + 1])
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert svc["spec"]["ports"][0]["targetPort"] == port["name"]
    grpc = container["ports"][1]          # the Open Inference Protocol's gRPC port (service/oip)
    assert grpc["containerPort"] == int(container["command"][container["command"].index("--grpc-port") + 1])
    assert svc["spec"]["ports"][1]["targetPort"] == grpc["name"] == "grpc"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", dep["metadata"]["name"])
    assert {m["type"] for m in hpa["spec"]["metrics"]} >= {"Resource"}
    assert hpa["spec"]["minReplicas"] >= 2, "a PodDisruptionBudget needs more than one pod to mean anything"
    refs = {r.get("configMapRef", r.get("secretRef"))["name"] for r in container["envFrom"]}
    assert refs == {kinds["ConfigMap"]["metadata"]["name"], kinds["Secret"]["metadata"]["name"]}


def test_the_configmap_sets_only_settings_the_service_reads():
    pytest.importorskip("pydantic_settings")
    from service.settings import Settings
    known = {f"MVKE_{name.upper()}" for name in Settings.model_fields}
    data = _by_kind()["ConfigMap"]["data"]
    assert set(data) <= known, f"unknown settings: {sorted(set(data) - known)}"
    Settings.model_validate({k[len("MVKE_"):].lower(): v for k, v in data.items()})   # values parse
    assert "REDIS_URL" in _by_kind()["Secret"]["stringData"]


def test_kustomization_lists_every_manifest_but_the_example_secret():
    kustomization = _by_kind()["Kustomization"]
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml", "secret.example.yaml"}
    assert set(kustomization["resources"]) == files


def test_the_cycle_cronjob_runs_one_day_with_the_shipped_policy():
    """The CronJob never overlaps itself, runs `mvke cycle` with options the real parser accepts,
    mounts the policy ConfigMap where --policy points, and that policy is the documented default."""
    import shlex

    from mvke.cli import build_parser
    from mvke.training.gate import load_policy, parse_policy
    docs = {(doc["kind"], doc["metadata"]["name"]): doc for _, doc in _documents() if "metadata" in doc}
    cron = docs[("CronJob", "mvke-cycle")]
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    argv = shlex.split(container["args"][0].replace('"$(date -u -d yesterday +%F)"', "2026-01-04"))
    assert argv[:3] == ["exec", "mvke", "cycle"]
    a = build_parser().parse_args(argv[2:])
    assert a.day == "2026-01-04" and a.warm_start and a.window == 3
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    policy_volume = next(n for n, v in volumes.items() if "configMap" in v)
    assert a.policy.startswith(mounts[policy_volume] + "/") and a.data.startswith(mounts["data"])
    cm = docs[("ConfigMap", volumes[policy_volume]["configMap"]["name"])]
    assert parse_policy(yaml.safe_load(cm["data"][Path(a.policy).name])) == load_policy(None)
    assert docs[("PersistentVolumeClaim", volumes["data"]["persistentVolumeClaim"]["claimName"])]
    assert {r["secretRef"]["name"] for r in container["envFrom"]} == {"mvke-redis"}
    ramp = docs[("CronJob", "mvke-ramp")]
    assert ramp["spec"]["concurrencyPolicy"] == "Forbid"
    ramp_pod = ramp["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    r = build_parser().parse_args(ramp_pod["containers"][0]["command"][1:])
    ramp_mounts = {m["name"]: m["mountPath"] for m in ramp_pod["containers"][0]["volumeMounts"]}
    assert r.auto and r.policy == f"{ramp_mounts['policy']}/policy.yaml"
    assert {v["name"]: v for v in ramp_pod["volumes"]}["policy"]["configMap"]["name"] == cm["metadata"]["name"]
