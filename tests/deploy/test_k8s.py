"""Kubernetes manifests (``deploy/k8s/``): every overlay renders, validates against the Kubernetes schemas, and
agrees with the settings it configures.

Rendering: kustomize. Validation: kubeconform with ``-strict`` (no field outside the schema, no duplicate key),
offline: the schemas are the JSON schemas the PyPI package kubernetes-validate ships (dev extra), copied so that
kubeconform can load them from files (their ``$ref`` to ``/api/_definitions.json`` resolves against an https
``$id``; the copy points it at the sibling file instead, nothing else changes). Custom resources (Strimzi, MinIO
Tenant, ServiceMonitor) have no schema there: kubeconform skips exactly those kinds, by group/version/kind, and
the tests below check what they refer to (topics and partitions, users and secrets, selected Services).

Both tools come from ``bash deploy/local/services.sh install k8s-tools`` (part of ``install all``, which ``make test``
runs) and are looked up where it builds them (``$TERRADAPT_CACHE/go/bin``, default ``~/.cache/terradapt``), then on
PATH; a missing tool fails the tests with that command.

The settings check runs each worker container's settings the way the worker does: the rendered ConfigMap's TOML
through ``stream.config.load_settings`` with the container's environment (Secret references stand in as
placeholders), so an unknown key or variable, a metrics port the probes do not use, or a secret path that is not
mounted fails here rather than in a crash-looping pod. The crop workers (``components/crops``) are checked the same
way in the builds that use that component, except for TorchServe, which they do not use.
"""

from __future__ import annotations

import functools
import importlib.resources
import ipaddress
import json
import os
import re
import shutil
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any, NamedTuple
from urllib.parse import urlsplit

import pytest
import yaml

from stream.config import Settings, load_settings
from stream.topics import Topics

pytestmark = pytest.mark.services

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
INSTALL = "bash deploy/local/services.sh install k8s-tools"
#: every kustomization that can be applied: the base and each overlay (all of them are rendered and validated)
BUILDS = ["base", *sorted(f"overlays/{p.name}" for p in (K8S / "overlays").iterdir() if p.is_dir())]
#: custom resources: no schema in kubernetes-validate, so kubeconform skips them (and only them)
CUSTOM_RESOURCES = {
    "monitoring.coreos.com/v1/ServiceMonitor",
    "kafka.strimzi.io/v1/Kafka",
    "kafka.strimzi.io/v1/KafkaNodePool",
    "kafka.strimzi.io/v1/KafkaTopic",
    "kafka.strimzi.io/v1/KafkaUser",
    "minio.min.io/v2/Tenant",
}
#: the oldest Kubernetes release the manifests are validated against (the newest: the newest the package ships)
OLDEST_KUBERNETES = "1.30.0"
#: faust tables of the stream worker and of the crop worker (stream/kafka/worker.py): each has a changelog topic
TABLES = ("monitors", "accuracy")


class Worker(NamedTuple):
    """A worker Deployment ``terradapt-<component>``: what it runs and what it needs."""

    args: list[str]
    group: str  #: its consumer group is ``<stream.app_id>-<group>`` (a faust app's id for a stream worker)
    stream: bool  #: a faust stream worker: replicas bounded by the partitions, a PodDisruptionBudget
    torchserve: bool  #: predicts through TorchServe (its URLs, key file and model store on the shared volume)


#: every worker, by its app.kubernetes.io/component label
WORKERS = {
    "stream-worker": Worker(["worker"], "worker", stream=True, torchserve=True),
    "adapt-worker": Worker(["adapt-worker"], "adapt", stream=False, torchserve=True),
    "crops-worker": Worker(["crops", "worker"], "crops-worker", stream=True, torchserve=False),
    "crops-adapt-worker": Worker(["crops", "adapt-worker"], "crops-adapt", stream=False, torchserve=False),
}
#: the workers components/crops adds (in the builds that use it only)
CROP_WORKERS = ("crops-worker", "crops-adapt-worker")
#: writable paths a container's environment names (the root file system is read-only)
WRITABLE_ENV = ("HOME", "TEMP", "TMPDIR", "LOG_LOCATION", "METRICS_LOCATION")
SECRET_PLACEHOLDER = "from-a-secret"

Doc = dict[str, Any]


# -- tools, rendering, schemas ---------------------------------------------------------------------------------
@functools.cache
def tool(name: str) -> str:
    cache = Path(os.environ.get("TERRADAPT_CACHE") or Path.home() / ".cache" / "terradapt")
    built = cache / "go" / "bin" / name
    found = str(built) if os.access(built, os.X_OK) else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} not found in {built.parent} nor on PATH: run `{INSTALL}` (make test does)")
    return found


@functools.cache
def render(build: str) -> str:
    done = subprocess.run(
        [tool("kustomize"), "build", str(K8S / build)], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, f"kustomize build {build}:\n{done.stderr}"
    return done.stdout


def docs(build: str) -> list[Doc]:
    return [d for d in yaml.safe_load_all(render(build)) if d]


def kubernetes_versions() -> list[str]:
    from kubernetes_validate.utils import latest_version

    return sorted({OLDEST_KUBERNETES, latest_version()})


@pytest.fixture(scope="session")
def schemas(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """kubernetes-validate's strict schemas, one folder per Kubernetes version, loadable by kubeconform."""
    root = tmp_path_factory.mktemp("kubernetes-json-schema")
    package = importlib.resources.files("kubernetes_validate") / "kubernetes-json-schema"
    for version in kubernetes_versions():
        name = f"v{version}-local-strict"
        source = Path(str(package / name))
        assert source.is_dir(), f"kubernetes-validate ships no {name}"
        (root / name).mkdir()
        for path in source.glob("*.json"):
            # refs inside _definitions.json point at itself; a kind's refs at its sibling _definitions.json
            target = "#" if path.name == "_definitions.json" else "_definitions.json#"
            schema = json.loads(path.read_text())
            schema.pop("$id", None)  # the https id the absolute refs resolve against
            schema = _local_refs(schema, target)
            (root / name / path.name).write_text(json.dumps(schema))
    return root


def _local_refs(node: Any, target: str) -> Any:
    """The schema with its ``/api/_definitions.json#`` references pointing at ``target``."""
    if isinstance(node, dict):
        return {
            k: v.replace("/api/_definitions.json#", target, 1)
            if k == "$ref" and isinstance(v, str)
            else _local_refs(v, target)
            for k, v in node.items()
        }
    if isinstance(node, list):
        return [_local_refs(v, target) for v in node]
    return node


def kubeconform(manifests: list[Path], schemas: Path, version: str) -> tuple[int, list[dict[str, Any]]]:
    """Validate the files strictly against the local schemas: (exit code, the report of every resource)."""
    location = str(schemas) + "/{{ .NormalizedKubernetesVersion }}-local{{ .StrictSuffix }}/"
    location += "{{ .ResourceKind }}{{ .KindSuffix }}.json"
    done = subprocess.run(
        [
            tool("kubeconform"),
            "-strict",
            "-summary",
            "-verbose",
            "-output",
            "json",
            "-kubernetes-version",
            version,
            "-schema-location",
            location,
            "-skip",
            ",".join(sorted(CUSTOM_RESOURCES)),
            *map(str, manifests),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    try:
        resources: list[dict[str, Any]] = json.loads(done.stdout)["resources"]
    except (json.JSONDecodeError, KeyError):
        pytest.fail(f"kubeconform printed no JSON report (exit {done.returncode}):\n{done.stdout}\n{done.stderr}")
    return done.returncode, resources


@pytest.fixture(scope="session")
def validated(schemas: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """kubeconform's report of every resource, per (build, Kubernetes version): one run per version, every build."""
    folder = tmp_path_factory.mktemp("rendered")
    files = {}
    for build in BUILDS:
        files[build] = folder / (build.replace("/", "-") + ".yaml")
        files[build].write_text(render(build))
    out: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for version in kubernetes_versions():
        _, resources = kubeconform(list(files.values()), schemas, version)
        for build, path in files.items():
            out[build, version] = [r for r in resources if r["filename"] == str(path)]
    return out


# -- helpers over rendered resources ----------------------------------------------------------------------------
def find(items: list[Doc], kind: str, name: str | None = None) -> list[Doc]:
    return [d for d in items if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def one(items: list[Doc], kind: str, name: str) -> Doc:
    found = find(items, kind, name)
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def containers(items: list[Doc]) -> Iterator[tuple[Doc, Doc]]:
    """(deployment, container) for every container, init containers included."""
    for dep in find(items, "Deployment"):
        spec = dep["spec"]["template"]["spec"]
        for c in [*spec.get("initContainers", []), *spec["containers"]]:
            yield dep, c


def worker(items: list[Doc], component: str) -> tuple[Doc, Doc]:
    dep = one(items, "Deployment", f"terradapt-{component}")
    (container,) = dep["spec"]["template"]["spec"]["containers"]
    return dep, container


def volume(dep: Doc, name: str) -> Doc:
    found: list[Doc] = [v for v in dep["spec"]["template"]["spec"]["volumes"] if v["name"] == name]
    assert len(found) == 1, f"{dep['metadata']['name']}: volume {name}"
    return found[0]


def mount_of(dep: Doc, container: Doc, path: str) -> tuple[Doc, Doc]:
    """The (volumeMount, volume) holding ``path`` in the container (deepest mount wins)."""
    mounts = [m for m in container.get("volumeMounts", []) if PurePosixPath(path).is_relative_to(m["mountPath"])]
    assert mounts, f"{dep['metadata']['name']}/{container['name']}: {path} is on no mounted volume"
    mount = max(mounts, key=lambda m: len(m["mountPath"]))
    return mount, volume(dep, mount["name"])


def env_of(container: Doc) -> dict[str, str]:
    """The container's environment; a Secret reference reads as a placeholder."""
    out = {}
    for e in container.get("env", []):
        if "value" in e:
            out[e["name"]] = e["value"]
        else:
            assert set(e["valueFrom"]) == {"secretKeyRef"}, e
            out[e["name"]] = SECRET_PLACEHOLDER
    return out


def settings_of(items: list[Doc], dep: Doc, container: Doc, monkeypatch: pytest.MonkeyPatch, tmp: Path) -> Settings:
    """The settings the container's worker loads: its ConfigMap's TOML through load_settings, with its env."""
    env = env_of(container)
    config_path = env.pop("TERRADAPT_CONFIG")
    mount, vol = mount_of(dep, container, config_path)
    assert "configMap" in vol, f"TERRADAPT_CONFIG={config_path} is not on a ConfigMap volume"
    key = str(PurePosixPath(config_path).relative_to(mount["mountPath"]))
    data = one(items, "ConfigMap", vol["configMap"]["name"])["data"]
    assert key in data, f"ConfigMap {vol['configMap']['name']} has no key {key} (TERRADAPT_CONFIG)"
    toml = tmp / f"{dep['metadata']['name']}.toml"
    toml.write_text(data[key])
    for name in list(os.environ):
        if name.startswith("TERRADAPT_"):
            monkeypatch.delenv(name)
    for name, value in env.items():
        if name.startswith("TERRADAPT_"):
            monkeypatch.setenv(name, value)
    return load_settings(toml)


def namespace(items: list[Doc]) -> str:
    (ns,) = find(items, "Namespace")
    return str(ns["metadata"]["name"])


def quantity(value: str | int) -> float:
    """A Kubernetes quantity as a number (the suffixes these manifests use)."""
    units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9}
    match = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(value))
    assert match and match.group(2) in ("", *units), f"unexpected quantity {value!r}"
    return float(match.group(1)) * units.get(match.group(2), 1)


def with_component(component: str) -> list[str]:
    """The builds whose kustomization uses ``components/<component>``."""
    out = []
    for build in BUILDS:
        kustomization = yaml.safe_load((K8S / build / "kustomization.yaml").read_text())
        if any(Path(c).name == component for c in kustomization.get("components", [])):
            out.append(build)
    return out


def workers_of(build: str) -> list[str]:
    """The worker components a build runs: the base's two, and the crop workers where it uses components/crops."""
    crops = build in with_component("crops")
    return [w for w in WORKERS if crops or w not in CROP_WORKERS]


# -- the layout --------------------------------------------------------------------------------------------------
def test_every_component_has_an_overlay():
    components = {p.name for p in (K8S / "components").iterdir() if p.is_dir()}
    assert components >= {"gpu", "strimzi", "minio-operator", "prometheus-operator", "crops"}
    for component in components:
        assert f"overlays/{component}" in with_component(component), f"components/{component} has no overlay"


# -- schema validation -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("version", kubernetes_versions())
@pytest.mark.parametrize("build", BUILDS)
def test_kubeconform_strict(build: str, version: str, validated: dict[tuple[str, str], list[dict[str, Any]]]):
    resources = validated[build, version]
    problems = [r for r in resources if r["status"] not in ("statusValid", "statusSkipped")]
    assert not problems, json.dumps(problems, indent=1)
    assert len(resources) == len(docs(build)), "kubeconform did not see every rendered resource"
    for r in resources:
        gvk = f"{r['version']}/{r['kind']}"
        expected = "statusSkipped" if gvk in CUSTOM_RESOURCES else "statusValid"
        assert r["status"] == expected, f"{gvk} {r['name']}: {r['status']}"


def test_kubeconform_rejects_what_the_schema_does_not_allow(schemas: Path, tmp_path: Path):
    """The copied schemas resolve their references: a typo deep in a pod template and a wrong type are caught."""
    deployment = next(d for d in docs("base") if d["kind"] == "Deployment")
    typo = json.loads(json.dumps(deployment))
    typo["spec"]["template"]["spec"]["containers"][0]["imagePulPolicy"] = "Always"
    wrong_type = json.loads(json.dumps(deployment))
    wrong_type["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "metrics"
    for bad, message in ((typo, "imagePulPolicy"), (wrong_type, "containerPort")):
        manifest = tmp_path / "bad.yaml"
        manifest.write_text(yaml.safe_dump(bad))
        code, (result,) = kubeconform([manifest], schemas, OLDEST_KUBERNETES)
        assert code != 0 and result["status"] == "statusInvalid", result
        assert message in result["msg"], result["msg"]


# -- secrets -------------------------------------------------------------------------------------------------------
SECRET_NAME = re.compile(r"PASSWORD|SECRET|ACCESS_KEY|TOKEN|CREDENTIAL", re.IGNORECASE)


@pytest.mark.parametrize("build", BUILDS)
def test_no_secret_value_in_the_manifests(build: str):
    items = docs(build)
    for secret in find(items, "Secret"):
        assert not secret.get("data") and not secret.get("stringData"), f"Secret {secret['metadata']['name']}"
    for dep, c in containers(items):
        for e in c.get("env", []):
            if SECRET_NAME.search(e["name"]) and not e["name"].endswith("_FILE"):
                assert "secretKeyRef" in e.get("valueFrom", {}), f"{dep['metadata']['name']}: {e['name']} is a literal"
    for cm in find(items, "ConfigMap"):
        for key, text in cm.get("data", {}).items():
            if key.endswith(".toml"):
                settings = tomllib.loads(text)
                assert "password" not in settings.get("kafka", {}), f"{key}: kafka.password"
                assert not {"access_key", "secret_key"} & set(settings.get("s3", {})), f"{key}: S3 keys"


def test_readme_tells_how_to_create_every_secret():
    """Every Secret the manifests reference by name is named in deploy/k8s/README.md."""
    readme = (K8S / "README.md").read_text()
    referenced = set()
    for build in BUILDS:
        items = docs(build)
        for dep in find(items, "Deployment"):
            spec = dep["spec"]["template"]["spec"]
            referenced |= {v["secret"]["secretName"] for v in spec["volumes"] if "secret" in v}
            for c in spec["containers"]:
                referenced |= {e["valueFrom"]["secretKeyRef"]["name"] for e in c.get("env", []) if "valueFrom" in e}
        referenced |= {t["spec"]["configuration"]["name"] for t in find(items, "Tenant")}
    assert referenced
    missing = sorted(name for name in referenced if f"`{name}`" not in readme)
    assert not missing, f"deploy/k8s/README.md does not name these Secrets: {missing}"


# -- containers ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("build", BUILDS)
def test_containers_have_resources_probes_and_run_locked_down(build: str):
    items = docs(build)
    workloads = {d["kind"] for d in items} & {"StatefulSet", "DaemonSet", "Job", "CronJob", "Pod", "ReplicaSet"}
    assert not workloads, f"only Deployments are checked here: extend the test for {workloads}"
    deployments = find(items, "Deployment")
    assert {d["metadata"]["name"] for d in deployments} >= {
        "terradapt-stream-worker",
        "terradapt-adapt-worker",
        "terradapt-torchserve",
    }
    for dep in deployments:
        name = dep["metadata"]["name"]
        pod = dep["spec"]["template"]["spec"]
        assert pod["automountServiceAccountToken"] is False, name
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["runAsUser"] != 0, name
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", name
    # one image, one tag: components/crops writes the base's tag in its Deployments
    assert len({c["image"] for _, c in containers(items)}) == 1, {
        d["metadata"]["name"]: c["image"] for d, c in containers(items)
    }
    for dep, c in containers(items):
        where = f"{dep['metadata']['name']}/{c['name']}"
        assert c["image"].startswith("terradapt:"), f"{where}: {c['image']} (one image name for kustomize images:)"
        resources = c["resources"]
        for res in ("cpu", "memory"):
            request, limit = resources["requests"][res], resources["limits"][res]
            assert quantity(request) <= quantity(limit), f"{where}: {res} request {request} > limit {limit}"
        assert "livenessProbe" in c and "readinessProbe" in c, f"{where}: probes"
        sc = c["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False, where
        assert sc["readOnlyRootFilesystem"] is True, where
        assert sc["capabilities"]["drop"] == ["ALL"], where
        # with a read-only root file system, everything the process writes must be on a writable volume
        env = env_of(c)
        for path in [c["workingDir"], *(env[k] for k in WRITABLE_ENV if k in env)]:
            mount, _ = mount_of(dep, c, path)
            assert not mount.get("readOnly"), f"{where}: {path} is on a read-only mount"


# -- settings ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("build", BUILDS)
def test_workers_settings_load_and_match_the_manifests(build: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    items = docs(build)
    ns = namespace(items)
    components = workers_of(build)
    # the crop workers exactly where components/crops is used
    assert {d["metadata"]["name"] for d in find(items, "Deployment")} == {
        *(f"terradapt-{component}" for component in components),
        "terradapt-torchserve",
    }
    for component in components:
        spec = WORKERS[component]
        dep, c = worker(items, component)
        assert c["args"] == spec.args
        assert dep["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"] == component
        settings = settings_of(items, dep, c, monkeypatch, tmp_path)
        where = f"{build}: {component}"
        # /metrics: served where the probes and Prometheus look for it
        (port,) = [p for p in c["ports"] if p["name"] == "metrics"]
        assert settings.metrics.port == port["containerPort"] != 0, where
        assert not ipaddress.ip_address(settings.metrics.addr).is_loopback, f"{where}: probes cannot reach loopback"
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            assert c[probe]["httpGet"] == {"path": "/metrics", "port": "metrics"}, f"{where}: {probe}"
        (service,) = [
            s
            for s in find(items, "Service")
            if s["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"] and s["spec"].get("clusterIP") == "None"
        ]
        assert [p["targetPort"] for p in service["spec"]["ports"]] == ["metrics"], where
        # Kafka: SASL password and CA from mounted Secrets, the partitions bounding the stream workers
        kafka = settings.kafka
        assert kafka.security_protocol == "SASL_SSL" and kafka.username, where
        for path, key in ((kafka.password_file, "password"), (kafka.ca_file, "ca.crt")):
            assert path is not None, where
            mount, vol = mount_of(dep, c, str(path))
            assert mount.get("readOnly") and "secret" in vol, f"{where}: {path} not on a read-only Secret volume"
            assert [i["path"] for i in vol["secret"]["items"]] == [key] == [path.name], where
        if spec.stream:
            assert dep["spec"]["replicas"] <= kafka.partitions, f"{where}: idle replicas beyond the partitions"
            (budget,) = [
                b
                for b in find(items, "PodDisruptionBudget")
                if b["spec"]["selector"]["matchLabels"] == dep["spec"]["selector"]["matchLabels"]
            ]
            assert budget["spec"]["maxUnavailable"] == 1, f"{where}: one replica away at a time"
        # S3: keys from a Secret, an in-cluster endpoint in this namespace
        assert settings.s3.access_key is not None and settings.s3.secret_key is not None, where
        assert settings.s3.access_key.get_secret_value() == SECRET_PLACEHOLDER, where
        host = settings.s3.endpoint.rsplit(":", 1)[0]
        if host.endswith(".svc"):
            assert host.split(".")[-2] == ns, f"{where}: {settings.s3.endpoint} is not in namespace {ns}"
        if settings.s3.ca_file is not None:
            mount_of(dep, c, str(settings.s3.ca_file))
        if not spec.torchserve:
            # the crop workers predict in process: no shared volume (TorchServe's settings are not read)
            claims = [v for v in dep["spec"]["template"]["spec"]["volumes"] if "persistentVolumeClaim" in v]
            assert not claims, f"{where}: {claims}"
            continue
        # TorchServe: through its Service, tokens and archives on the shared volume
        assert settings.runtime.predictor == "torchserve", where
        ts = settings.torchserve
        assert ts.key_file is not None and ts.model_store is not None, where
        for path in (ts.key_file, ts.model_store):
            mount, vol = mount_of(dep, c, str(path))
            assert vol["persistentVolumeClaim"]["claimName"] == "terradapt-torchserve", f"{where}: {path}"
            assert not mount.get("readOnly"), f"{where}: {path} must be writable (archives, re-registration)"
        service_ports = {p["port"] for p in one(items, "Service", "terradapt-torchserve")["spec"]["ports"]}
        for url in (ts.inference_url, ts.management_url, ts.metrics_url):
            parts = urlsplit(url)
            assert parts.hostname == "terradapt-torchserve" and parts.port in service_ports, f"{where}: {url}"


@pytest.mark.parametrize("build", BUILDS)
def test_torchserve_keeps_token_auth_and_shares_its_paths(build: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    items = docs(build)
    settings = settings_of(items, *worker(items, "stream-worker"), monkeypatch, tmp_path)
    ts_settings = settings.torchserve
    dep = one(items, "Deployment", "terradapt-torchserve")
    assert dep["spec"]["replicas"] == 1 and dep["spec"]["strategy"]["type"] == "Recreate"
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    command = " ".join(c["command"])
    assert "--disable-token-auth" not in command
    # config.properties, from its ConfigMap volume
    config_arg = re.search(r"--ts-config (\S+)", command)
    assert config_arg is not None
    mount, vol = mount_of(dep, c, config_arg.group(1))
    key = str(PurePosixPath(config_arg.group(1)).relative_to(mount["mountPath"]))
    text = one(items, "ConfigMap", vol["configMap"]["name"])["data"][key]
    props = dict(line.split("=", 1) for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#"))
    assert props["disable_token_authorization"] == "false"
    assert props["model_store"] == str(ts_settings.model_store)
    assert props["allowed_urls"] == f"file://{ts_settings.model_store}/.*"
    assert f"--model-store {ts_settings.model_store}" in command
    # the key file TorchServe writes to its working directory is the one the workers read
    assert ts_settings.key_file is not None
    assert PurePosixPath(c["workingDir"]) / "key_file.json" == PurePosixPath(ts_settings.key_file)
    assert str(ts_settings.key_file) in " ".join(c["readinessProbe"]["exec"]["command"])
    mount, vol = mount_of(dep, c, c["workingDir"])
    assert vol["persistentVolumeClaim"]["claimName"] == "terradapt-torchserve" and not mount.get("readOnly")
    # ports: config.properties, container, Service and the workers' URLs agree
    container_ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    service = {p["name"]: p for p in one(items, "Service", "terradapt-torchserve")["spec"]["ports"]}
    for api, url in (
        ("inference", ts_settings.inference_url),
        ("management", ts_settings.management_url),
        ("metrics", ts_settings.metrics_url),
    ):
        address = urlsplit(props[f"{api}_address"])
        assert address.port == container_ports[api], api
        assert service[api]["targetPort"] == api and service[api]["port"] == urlsplit(url).port, api
    # the handler's object store (URI requests) is the workers' one
    env = env_of(c)
    assert env["TERRADAPT_S3__ENDPOINT"] == settings.s3.endpoint
    assert env["TERRADAPT_S3__SECURE"] == str(settings.s3.secure).lower()
    assert env.get("TERRADAPT_S3__CA_FILE") == (str(settings.s3.ca_file) if settings.s3.ca_file else None)
    assert env["TERRADAPT_S3__ACCESS_KEY"] == env["TERRADAPT_S3__SECRET_KEY"] == SECRET_PLACEHOLDER
    # only the workers reach inference and management
    (policy,) = find(items, "NetworkPolicy", "terradapt-torchserve")
    assert policy["spec"]["podSelector"]["matchLabels"] == dep["spec"]["selector"]["matchLabels"]
    for rule in policy["spec"]["ingress"]:
        ports = {p["port"] for p in rule["ports"]}
        if ports & {container_ports["inference"], container_ports["management"]}:
            assert rule.get("from"), f"inference/management open to every pod: {rule}"


# -- components ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("build", with_component("gpu"))
def test_gpu_component_gives_the_adaptation_worker_a_gpu(build: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    items = docs(build)
    dep, c = worker(items, "adapt-worker")
    assert str(c["resources"]["limits"]["nvidia.com/gpu"]) == "1"
    pod = dep["spec"]["template"]["spec"]
    assert pod["nodeSelector"]
    assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    assert dep["spec"]["strategy"]["rollingUpdate"]["maxSurge"] == 0, "a rollout would need a spare GPU"
    settings = settings_of(items, dep, c, monkeypatch, tmp_path)
    assert settings.adaptation.device == "cuda" and settings.runtime.device == "cuda"
    # the other workers (the crop workers too, where present) and TorchServe stay off the GPU nodes
    others = [f"terradapt-{w}" for w in workers_of(build) if w != "adapt-worker"]
    for other in [*others, "terradapt-torchserve"]:
        (oc,) = one(items, "Deployment", other)["spec"]["template"]["spec"]["containers"]
        assert "nvidia.com/gpu" not in oc["resources"]["limits"], other


def test_base_adaptation_worker_needs_no_gpu():
    _, c = worker(docs("base"), "adapt-worker")
    assert "nvidia.com/gpu" not in c["resources"]["limits"]


@pytest.mark.parametrize("build", with_component("strimzi"))
def test_strimzi_component_matches_the_settings(build: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    items = docs(build)
    ns = namespace(items)
    (cluster,) = find(items, "Kafka")
    name = cluster["metadata"]["name"]
    for kind in ("KafkaNodePool", "KafkaTopic", "KafkaUser"):
        for d in find(items, kind):
            assert d["metadata"]["labels"]["strimzi.io/cluster"] == name, f"{kind} {d['metadata']['name']}"
    # the label README.md's first apply selects (Kafka and its topics up before any worker creates a topic)
    for d in items:
        if d["apiVersion"].startswith("kafka.strimzi.io/"):
            assert d["metadata"]["labels"]["app.kubernetes.io/component"] == "kafka", d["metadata"]["name"]
    for component in workers_of(build):
        dep, c = worker(items, component)
        settings = settings_of(items, dep, c, monkeypatch, tmp_path)
        kafka = settings.kafka
        # topics: every terradapt topic and changelog, with kafka.partitions partitions
        topics = {t["metadata"]["name"]: t["spec"] for t in find(items, "KafkaTopic")}
        apps = ("worker", "crops-worker")  # the stream worker's and the crop worker's faust apps
        changelogs = {f"{settings.stream.app_id}-{app}-{table}-changelog" for app in apps for table in TABLES}
        assert set(topics) == set(Topics.with_prefix(kafka.topic_prefix).all()) | changelogs
        for topic, spec in topics.items():
            assert spec["partitions"] == kafka.partitions, f"{topic}: {spec['partitions']} != kafka.partitions"
        for changelog in changelogs:
            assert topics[changelog]["config"]["cleanup.policy"] == "compact", changelog
        # the SCRAM user, its operator-made Secret, the cluster CA Secret, the TLS + SCRAM listener
        (user,) = find(items, "KafkaUser")
        assert user["metadata"]["name"] == kafka.username
        assert user["spec"]["authentication"]["type"] == "scram-sha-512" == kafka.sasl_mechanism.lower()
        assert volume(dep, "kafka-password")["secret"]["secretName"] == kafka.username
        assert volume(dep, "kafka-ca")["secret"]["secretName"] == f"{name}-cluster-ca-cert"
        (listener,) = [li for li in cluster["spec"]["kafka"]["listeners"] if li.get("authentication", {}).get("type")]
        assert listener["tls"] is True and kafka.security_protocol == "SASL_SSL"
        assert kafka.bootstrap == f"{name}-kafka-bootstrap.{ns}.svc:{listener['port']}"
        # the user's ACLs: every declared topic, and the consumer group of every worker (crop workers included:
        # the topics are declared whether or not components/crops is used)
        for topic in topics:
            assert acl_allows(user, "topic", topic) >= {"Read", "Write", "Describe", "Create"}, f"ACL: topic {topic}"
        for w in WORKERS.values():
            group = f"{settings.stream.app_id}-{w.group}"
            assert acl_allows(user, "group", group) >= {"Read", "Describe"}, f"ACL: group {group}"


def acl_allows(user: Doc, kind: str, name: str) -> set[str]:
    """The operations the KafkaUser's simple-authorization ACLs allow on the resource (literal or prefix)."""
    allowed: set[str] = set()
    for acl in user["spec"]["authorization"]["acls"]:
        resource = acl["resource"]
        if resource["type"] != kind or acl.get("type", "allow") != "allow":
            continue
        pattern = resource.get("patternType", "literal")
        assert pattern in ("literal", "prefix"), resource
        if name.startswith(resource["name"]) if pattern == "prefix" else resource["name"] in (name, "*"):
            allowed |= set(acl["operations"])
    return allowed


@pytest.mark.parametrize("build", with_component("minio-operator"))
def test_minio_component_matches_the_settings(build: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    items = docs(build)
    ns = namespace(items)
    (tenant,) = find(items, "Tenant")
    assert tenant["spec"]["requestAutoCert"] is True
    assert tenant["metadata"]["labels"]["app.kubernetes.io/component"] == "object-storage"  # README's first apply
    assert tenant["spec"]["configuration"]["name"] == "terradapt-minio-config"
    users = {u["name"] for u in tenant["spec"]["users"]}
    for component in workers_of(build):
        dep, c = worker(items, component)
        s3 = settings_of(items, dep, c, monkeypatch, tmp_path).s3
        assert {b["name"] for b in tenant["spec"]["buckets"]} >= {
            s3.bucket_acquisitions,
            s3.bucket_predictions,
            s3.bucket_models,
        }
        assert s3.endpoint == f"minio.{ns}.svc:443" and s3.secure and s3.ca_file is not None
        # the keys of the user Secret the Tenant reads (one Secret per user in spec.users)
        refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in c["env"] if "valueFrom" in e}
        access, secret = refs["TERRADAPT_S3__ACCESS_KEY"], refs["TERRADAPT_S3__SECRET_KEY"]
        assert access["name"] == secret["name"] and access["name"] in users
        assert (access["key"], secret["key"]) == ("CONSOLE_ACCESS_KEY", "CONSOLE_SECRET_KEY")


def selects(selector: Doc, labels: dict[str, str]) -> bool:
    """A label selector (matchLabels + In expressions) matches ``labels``."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        assert expr["operator"] == "In", expr
        if labels.get(expr["key"]) not in expr["values"]:
            return False
    return True


@pytest.mark.parametrize("build", with_component("prometheus-operator"))
def test_service_monitors_select_the_metrics_services(build: str):
    items = docs(build)
    services = find(items, "Service")
    scraped = {}
    for monitor in find(items, "ServiceMonitor"):
        selected = [s for s in services if selects(monitor["spec"]["selector"], s["metadata"]["labels"])]
        assert selected, f"ServiceMonitor {monitor['metadata']['name']} selects no Service"
        for endpoint in monitor["spec"]["endpoints"]:
            assert endpoint["path"] == "/metrics"
            for s in selected:
                assert endpoint["port"] in {p["name"] for p in s["spec"]["ports"]}, s["metadata"]["name"]
                scraped[s["metadata"]["name"]] = monitor
    workers = {f"terradapt-{w}-metrics": w for w in workers_of(build)}  # the crop workers' where present
    assert set(scraped) == {*workers, "terradapt-torchserve"}
    # the alert rules and the dashboard select job="terradapt" (deploy/prometheus/alerts.yml) and the runner label
    for name, component in workers.items():
        service, monitor = one(items, "Service", name), scraped[name]
        assert service["metadata"]["labels"][monitor["spec"]["jobLabel"]] == "terradapt"
        (endpoint,) = monitor["spec"]["endpoints"]
        runner = relabel(endpoint["relabelings"], service_meta(service, "metrics"), prometheus_operator=True)
        assert runner is not None and runner.get("runner") == component, name
    assert 'job="terradapt"' in (ROOT / "deploy" / "prometheus" / "alerts.yml").read_text()


def relabel(rules: list[Doc], labels: dict[str, str], *, prometheus_operator: bool = False) -> dict[str, str] | None:
    """Prometheus relabelling (keep and replace with the default regex/replacement), enough for scrape-configs.yml.

    ``prometheus_operator``: the ServiceMonitor spelling (``sourceLabels``, ``targetLabel``).
    """
    source, target = ("sourceLabels", "targetLabel") if prometheus_operator else ("source_labels", "target_label")
    labels = dict(labels)
    for rule in rules:
        value = ";".join(labels.get(s, "") for s in rule[source])
        action = rule.get("action", "replace")
        if action == "keep":
            if not re.fullmatch(rule["regex"], value):
                return None
        elif action == "replace":
            assert rule.get("regex", "(.*)") == "(.*)" and "replacement" not in rule, rule
            labels[rule[target]] = value
        else:
            raise AssertionError(f"action {action} not simulated here")
    return labels


def service_meta(service: Doc, port: str) -> dict[str, str]:
    """The discovery labels of a Service's endpoint port (role endpoints), those the relabelling here reads."""
    meta = {
        "__meta_kubernetes_service_label_" + re.sub(r"[^a-zA-Z0-9_]", "_", k): v
        for k, v in service["metadata"]["labels"].items()
    }
    meta["__meta_kubernetes_endpoint_port_name"] = port
    meta["__meta_kubernetes_pod_name"] = "pod-0"
    return meta


@pytest.mark.parametrize("build", ["base", *with_component("crops")])
def test_plain_prometheus_scrape_config_finds_the_metrics_endpoints(build: str):
    """deploy/k8s/prometheus/scrape-configs.yml keeps exactly the metrics ports of the Services (the base's, and the
    crop workers' in the builds with components/crops).

    Debian's promtool is built without Kubernetes service discovery, so the jobs are checked by applying their
    relabelling to the discovery labels of the rendered Services.
    """
    config = yaml.safe_load((K8S / "prometheus" / "scrape-configs.yml").read_text())
    items = docs(build)
    ns = namespace(items)
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    kept: dict[str, set[tuple[str, str]]] = {name: set() for name in jobs}
    for job_name, job in jobs.items():
        (sd,) = job["kubernetes_sd_configs"]
        assert sd["role"] == "endpoints" and sd["namespaces"]["names"] == [ns]
        for service in find(items, "Service"):
            for port in service["spec"]["ports"]:
                target = relabel(job["relabel_configs"], service_meta(service, port["name"]))
                if target is not None:
                    kept[job_name].add((service["metadata"]["name"], target.get("runner", "")))
    assert kept == {
        "terradapt": {(f"terradapt-{w}-metrics", w) for w in workers_of(build)},
        "torchserve": {("terradapt-torchserve", "")},
    }


@pytest.mark.parametrize("build", BUILDS)
def test_every_resource_lands_in_the_namespace(build: str):
    items = docs(build)
    ns = namespace(items)
    for d in items:
        if d["kind"] != "Namespace":
            assert d["metadata"].get("namespace") == ns, f"{d['kind']} {d['metadata']['name']}"
