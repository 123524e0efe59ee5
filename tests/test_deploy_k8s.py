"""deploy/k8s, checked without a cluster and without a download.

The overlays are rendered by a real kustomize (``kubectl kustomize``: kustomize v5) and every
object is validated against pinned schemas: Kubernetes 1.32's strict JSON schemas (the
``kubernetes-validate`` package carries them; strict = unknown fields are errors, as
``kubectl apply`` makes them) and, for KEDA's ScaledObject and TriggerAuthentication, the
openAPIV3Schema of KEDA v2.17.3's CRDs vendored in ``tests/schemas`` (made strict the same way).
Then what the schemas cannot know: every environment variable a process is given is one it
reads and the settings it gets are valid; ports and probes match the settings and the routes;
the queue contract (stream names, Redis address, password, database) is the same for the
processes and for KEDA's scaler; grace periods cover the drains; only the service's own pods
(and KEDA's scaler) reach Redis; and the Redis the manifest starts behaves as the manifest's
comments say, run here from the rendered command line.
"""

from __future__ import annotations

import asyncio
import copy
import json
import math
import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate
import pytest
import redis
import yaml

from jobqueue.consumer import Consumer
from jobqueue.protocol import CONSUMER_GROUP, Job, Keys
from service.settings import ApiSettings
from worker.settings import WorkerSettings

REPO = Path(__file__).resolve().parent.parent
K8S = REPO / "deploy/k8s"
OVERLAYS = ("cpu", "gpu")
KUBERNETES_VERSION = "1.32.0"
KEDA_SCHEMAS = REPO / "tests/schemas/keda-v2.17.3"
# Variables a container is given that no settings class reads: only the one the kubelet
# expands into REDIS_URL (and, for Redis itself, its own).
HELPER_VARS = {"REDIS_PASSWORD"}
# The redis-streams scaler's metadata keys in KEDA v2.17.3 (pkg/scalers/redis_streams_scaler.go
# and the connection fields of redis_scaler.go). An unknown key is ignored by KEDA, so a typo
# (``streamlength``) would silently leave the default target of 5: checked here instead.
REDIS_STREAMS_METADATA = {
    "stream", "consumerGroup", "pendingEntriesCount", "streamLength", "lagCount",
    "activationLagCount", "databaseIndex", "enableTLS", "unsafeSsl", "address", "addresses",
    "host", "hosts", "port", "ports", "username", "usernameFromEnv", "passwordFromEnv",
    "addressFromEnv", "hostFromEnv", "portFromEnv",
}  # fmt: skip
FAKE_PASSWORD = "0123456789abcdef" * 4  # what `openssl rand -hex 32` gives: URL-safe


# ---------------------------------------------------------------------------------- render


def kubectl() -> str:
    """The renderer: $KUBECTL, else the one scripts/setup.sh puts into .venv when the machine
    has none (or too old a one), else kubectl on PATH. Its kustomize must be v5."""
    for candidate in (os.environ.get("KUBECTL"), str(REPO / ".venv/bin/kubectl")):
        if candidate and os.access(candidate, os.X_OK):
            binary = candidate
            break
    else:
        found = shutil.which("kubectl")
        assert found, "kubectl is required to render deploy/k8s (scripts/setup.sh installs it)"
        binary = found
    out = subprocess.run(
        [binary, "version", "--client", "-o", "json"],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    kustomize = json.loads(out.stdout).get("kustomizeVersion", "")
    assert kustomize.startswith("v5."), f"{binary}: kustomize {kustomize!r}, need v5 (setup.sh)"
    return binary


def render(path: Path) -> list[dict[str, Any]]:
    result = subprocess.run(
        [kubectl(), "kustomize", str(path)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "Warning" not in result.stderr, result.stderr  # no deprecated kustomize fields
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    return {overlay: render(K8S / overlay) for overlay in OVERLAYS}


def find(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    matches = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(matches) == 1, f"{kind}/{name}: {len(matches)} objects"
    return matches[0]


def config_map(docs: list[dict[str, Any]], name: str) -> dict[str, str]:
    """A ConfigMap by its name as referenced, or as generated (kustomize appends a hash of
    the content to a generated name, and rewrites the references)."""
    maps = [
        d
        for d in docs
        if d["kind"] == "ConfigMap"
        and re.fullmatch(rf"{re.escape(name)}(-[a-z0-9]{{10}})?", d["metadata"]["name"])
    ]
    assert len(maps) == 1, name
    return dict(maps[0].get("data", {}))


def pod_spec(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    return find(docs, kind, name)["spec"]["template"]["spec"]


def container(spec: dict[str, Any], name: str) -> dict[str, Any]:
    (match,) = [c for c in spec["containers"] if c["name"] == name]
    return match


def container_env(docs: list[dict[str, Any]], spec: dict[str, Any], name: str) -> dict[str, str]:
    """The environment the kubelet gives container ``name``: envFrom ConfigMaps, then env, with
    ``$(VAR)`` references expanded and Secrets standing in as FAKE_PASSWORD."""
    c = container(spec, name)
    env: dict[str, str] = {}
    for source in c.get("envFrom", []):
        env.update(config_map(docs, source["configMapRef"]["name"]))
    for var in c.get("env", []):
        if "value" in var:
            env[var["name"]] = re.sub(
                r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m[1], m[0]), var["value"]
            )
        else:
            assert "secretKeyRef" in var["valueFrom"], var
            env[var["name"]] = FAKE_PASSWORD
    return env


def settings_from(env: dict[str, str], cls: type[Any], monkeypatch: pytest.MonkeyPatch) -> Any:
    """``cls`` as the process builds it in the pod: from this environment and nothing else."""
    for field in cls.model_fields:
        monkeypatch.delenv(field.upper(), raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return cls(_env_file=None)


# ------------------------------------------------------------------------------- schemas


def keda_schema(plural: str) -> dict[str, Any]:
    crd = next(d for d in yaml.safe_load_all((KEDA_SCHEMAS / f"{plural}.yaml").read_text()) if d)
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1alpha1"]
    return strict(version["schema"]["openAPIV3Schema"])


def strict(schema: Any) -> Any:
    """A CRD's structural schema as JSON Schema that rejects unknown fields, as the API server
    does for ``kubectl apply`` (field validation Strict); int-or-string spelt out."""
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: strict(value) for key, value in schema.items()}
    if out.pop("x-kubernetes-int-or-string", False):
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


KEDA_KINDS = {"ScaledObject": "scaledobjects", "TriggerAuthentication": "triggerauthentications"}


def validate(doc: dict[str, Any]) -> None:
    """Raises on an object that the pinned schemas refuse or do not know."""
    if doc["apiVersion"].startswith("keda.sh/"):
        assert doc["apiVersion"] == "keda.sh/v1alpha1", doc["apiVersion"]
        jsonschema.Draft4Validator(keda_schema(KEDA_KINDS[doc["kind"]])).validate(doc)
    else:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_renderer_and_validators_are_real(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """Misspelt fields fail: in a Deployment (Kubernetes schema) and in a ScaledObject (KEDA's),
    and a wrong type in a probe."""
    docs = rendered["cpu"]
    deployment = copy.deepcopy(find(docs, "Deployment", "imgsvc-api"))
    api = deployment["spec"]["template"]["spec"]["containers"][0]
    api["readinesProbe"] = api.pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError, match="readinesProbe"):
        validate(deployment)
    deployment = copy.deepcopy(find(docs, "Deployment", "imgsvc-api"))
    deployment["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["periodSeconds"] = "x"
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(deployment)
    scaled = copy.deepcopy(find(docs, "ScaledObject", "imgsvc-worker"))
    scaled["spec"]["minReplicas"] = scaled["spec"].pop("minReplicaCount")
    with pytest.raises(jsonschema.ValidationError, match="minReplicas"):
        validate(scaled)
    # the base alone renders too, but it is not meant to be applied: its workers have no size
    assert render(K8S / "base")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_validates(rendered: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    docs = rendered[overlay]
    kinds = {d["kind"] for d in docs}
    assert {
        "Namespace", "ConfigMap", "Service", "StatefulSet", "Deployment",
        "HorizontalPodAutoscaler", "PodDisruptionBudget", "NetworkPolicy", "ScaledObject",
        "TriggerAuthentication",
    } <= kinds  # fmt: skip
    for doc in docs:
        validate(doc)
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == "imgsvc", doc["metadata"]
    # no Service for the workers: nothing connects to them
    services = [d for d in docs if d["kind"] == "Service"]
    assert {s["metadata"]["name"] for s in services} == {"imgsvc-api", "imgsvc-redis"}


# ------------------------------------------------------------------- processes and probes


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_environment_is_what_the_settings_read(
    rendered: dict[str, list[dict[str, Any]]], overlay: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    docs = rendered[overlay]
    api_spec = pod_spec(docs, "Deployment", "imgsvc-api")
    worker_spec = pod_spec(docs, "Deployment", "imgsvc-worker")
    api_env = container_env(docs, api_spec, "api")
    worker_env = container_env(docs, worker_spec, "worker")
    for cls, env in ((ApiSettings, api_env), (WorkerSettings, worker_env)):
        fields = {name.upper() for name in cls.model_fields}
        unknown = set(env) - fields - HELPER_VARS
        assert not unknown, f"{cls.__name__} reads no {sorted(unknown)}"
        # what a container cannot run on the defaults of `make run` is set explicitly
        for required in ("REDIS_URL", "QUEUE_PREFIX", "MODEL_ZOO_DIR", "LOG_FORMAT"):
            assert required in env, (cls.__name__, required)
    # the settings both sides share are equal on both sides (jobqueue/settings.py)
    for field in ApiSettings.__mro__[1].model_fields:  # QueueSettings
        key = field.upper()
        assert api_env.get(key) == worker_env.get(key), key
    api = settings_from(api_env, ApiSettings, monkeypatch)
    worker = settings_from(worker_env, WorkerSettings, monkeypatch)
    assert api.host == "0.0.0.0" and worker.metrics_host == "0.0.0.0"
    assert api.auth_required and api.metrics_access == "admin"
    # the password came from the Secret through the URL, and the URL names the Redis Service
    url = urlsplit(api.redis_url)
    redis_service = find(docs, "Service", "imgsvc-redis")
    assert url.hostname == redis_service["metadata"]["name"]
    assert url.port == redis_service["spec"]["ports"][0]["port"]
    assert url.password == FAKE_PASSWORD and url.path == "/0"
    for spec, name in ((api_spec, "api"), (worker_spec, "worker")):
        refs = {
            v["name"]: v["valueFrom"]["secretKeyRef"]
            for v in container(spec, name)["env"]
            if "valueFrom" in v
        }
        assert refs == {"REDIS_PASSWORD": {"name": "imgsvc-redis", "key": "password"}}
    # devices: the overlay decides
    if overlay == "gpu":
        assert worker.device == "cuda"
    else:
        assert worker.device == "cpu"
        cores = container(worker_spec, "worker")["resources"]["requests"]["cpu"]
        assert worker.torch_threads == int(cores)  # torch's threads = the cores it is given


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ports_and_probes_match_the_settings_and_routes(
    rendered: dict[str, list[dict[str, Any]]], overlay: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from service.app import router

    routes = {getattr(route, "path", "") for route in router.routes}
    docs = rendered[overlay]
    api_spec = pod_spec(docs, "Deployment", "imgsvc-api")
    api_container = container(api_spec, "api")
    api = settings_from(container_env(docs, api_spec, "api"), ApiSettings, monkeypatch)
    ports = {p["name"]: p["containerPort"] for p in api_container["ports"]}
    assert ports == {"http": api.port}
    assert api_container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert api_container["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert api_container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert {"/healthz", "/readyz"} <= routes
    service = find(docs, "Service", "imgsvc-api")
    assert service["spec"]["ports"][0]["targetPort"] == "http"

    worker_spec = pod_spec(docs, "Deployment", "imgsvc-worker")
    worker_container = container(worker_spec, "worker")
    worker = settings_from(container_env(docs, worker_spec, "worker"), WorkerSettings, monkeypatch)
    ports = {p["name"]: p["containerPort"] for p in worker_container["ports"]}
    assert ports == {"metrics": worker.metrics_port} and worker.metrics_port > 0
    assert worker_container["readinessProbe"]["httpGet"] == {"path": "/metrics", "port": "metrics"}
    annotations = find(docs, "Deployment", "imgsvc-worker")["spec"]["template"]["metadata"][
        "annotations"
    ]
    assert int(annotations["prometheus.io/port"]) == worker.metrics_port
    # a liveness probe would kill a worker in the middle of a long forward pass
    assert "livenessProbe" not in worker_container


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_grace_periods_cover_the_drains(
    rendered: dict[str, list[dict[str, Any]]], overlay: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    docs = rendered[overlay]
    api_spec = pod_spec(docs, "Deployment", "imgsvc-api")
    api = settings_from(container_env(docs, api_spec, "api"), ApiSettings, monkeypatch)
    # API: the preStop sleep, then uvicorn's graceful shutdown, which waits up to
    # REQUEST_TIMEOUT_S + 5 s for requests in flight (service/server.py)
    sleep = container(api_spec, "api")["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert api_spec["terminationGracePeriodSeconds"] >= sleep + api.request_timeout_s + 5
    # Worker: a batch in flight runs at most until its jobs' deadlines (then each is stopped
    # at its next forward pass): the longest is an async job's, plus one last pass and the store
    worker_spec = pod_spec(docs, "Deployment", "imgsvc-worker")
    longest = max(api.async_job_timeout_s, api.request_timeout_s)
    assert worker_spec["terminationGracePeriodSeconds"] >= longest + 10
    # a rollout never lowers capacity: the new worker is ready before an old one drains
    rolling = find(docs, "Deployment", "imgsvc-worker")["spec"]["strategy"]["rollingUpdate"]
    assert rolling == {"maxUnavailable": 0, "maxSurge": 1}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_model_zoo_is_mounted_read_only_from_the_zoo_image(
    rendered: dict[str, list[dict[str, Any]]], overlay: str
) -> None:
    docs = rendered[overlay]
    zoo_dockerfile = (REPO / "docker/zoo.Dockerfile").read_text()
    copied_to = set(re.findall(r"^COPY \S+ (/\S+)", zoo_dockerfile, flags=re.M))
    assert copied_to == {"/zoo/manifest.json", "/zoo/weights/", "/zoo/thumbnails/"}
    for name in ("imgsvc-api", "imgsvc-worker"):
        spec = pod_spec(docs, "Deployment", name)
        main = spec["containers"][0]
        zoo_dir = container_env(docs, spec, main["name"])["MODEL_ZOO_DIR"]
        (mount,) = [m for m in main["volumeMounts"] if m["mountPath"] == zoo_dir]
        assert mount["readOnly"] is True
        (init,) = spec["initContainers"]
        assert init["image"].split(":")[0].endswith("imgsvc-zoo")
        assert init["command"] == ["cp", "-R", "/zoo/.", zoo_dir + "/"]
        (init_mount,) = init["volumeMounts"]
        assert init_mount == {"name": mount["name"], "mountPath": zoo_dir}
        (volume,) = [v for v in spec["volumes"] if v["name"] == mount["name"]]
        assert "emptyDir" in volume


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_resources_security_and_images(
    rendered: dict[str, list[dict[str, Any]]], overlay: str
) -> None:
    docs = rendered[overlay]
    for doc in docs:
        if doc["kind"] not in ("Deployment", "StatefulSet"):
            continue
        spec = doc["spec"]["template"]["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True, doc["metadata"]["name"]
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert spec["automountServiceAccountToken"] is False
        for c in spec.get("initContainers", []) + spec["containers"]:
            where = f"{doc['metadata']['name']}/{c['name']}"
            image = c["image"]
            assert ":" in image and not image.endswith(":latest"), where
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc["capabilities"]["drop"] == ["ALL"], where
            assert sc["readOnlyRootFilesystem"] is True, where
            resources = c["resources"]
            assert {"cpu", "memory"} <= set(resources["requests"]), where
            assert "memory" in resources["limits"], where
    worker = container(pod_spec(docs, "Deployment", "imgsvc-worker"), "worker")["resources"]
    gpus = {k: v.get("nvidia.com/gpu") for k, v in worker.items()}
    if overlay == "gpu":
        assert gpus == {"requests": 1, "limits": 1}
        tolerations = pod_spec(docs, "Deployment", "imgsvc-worker")["tolerations"]
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in (
            tolerations
        )
    else:
        assert gpus == {"requests": None, "limits": None}
    hpa = find(docs, "HorizontalPodAutoscaler", "imgsvc-api")
    assert hpa["spec"]["scaleTargetRef"]["name"] == "imgsvc-api"
    assert hpa["spec"]["minReplicas"] >= 2
    # replica counts belong to the autoscalers: a value in the Deployment resets them on apply
    for name in ("imgsvc-api", "imgsvc-worker"):
        assert "replicas" not in find(docs, "Deployment", name)["spec"], name


def memory_bytes(text: str) -> int:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "kb": 1000, "mb": 2**20, "gb": 2**30}
    number, unit = re.fullmatch(r"(\d+)([A-Za-z]*)", text).groups()  # type: ignore[union-attr]
    return int(number) * units.get(unit, 1)


def test_redis_is_persistent_bounded_and_password_protected(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    docs = rendered["cpu"]
    statefulset = find(docs, "StatefulSet", "imgsvc-redis")
    spec = statefulset["spec"]["template"]["spec"]
    redis_container = container(spec, "redis")
    args = redis_container["args"]
    assert args[0] == "redis-server"
    option = {args[i]: args[i + 1] for i in range(1, len(args) - 1, 2)}
    assert option["--appendonly"] == "yes"
    assert option["--maxmemory-policy"] == "noeviction"
    assert option["--requirepass"] == "$(REDIS_PASSWORD)"
    # the dataset stays clear of the limit: an AOF rewrite forks and needs room above it
    limit = memory_bytes(redis_container["resources"]["limits"]["memory"])
    assert memory_bytes(option["--maxmemory"]) <= 0.8 * limit
    (mount,) = redis_container["volumeMounts"]
    assert mount["mountPath"] == option["--dir"]
    (claim,) = statefulset["spec"]["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == mount["name"]  # a PVC, not the container's disk
    env = {v["name"]: v["valueFrom"]["secretKeyRef"] for v in redis_container["env"]}
    assert env["REDIS_PASSWORD"] == {"name": "imgsvc-redis", "key": "password"}
    assert env["REDISCLI_AUTH"] == env["REDIS_PASSWORD"]  # the probes' redis-cli
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    assert redis_container["image"] == compose["services"]["redis"]["image"]
    # no ConfigMap carries a password or a URL with one
    for doc in docs:
        if doc["kind"] == "ConfigMap":
            for key, value in doc.get("data", {}).items():
                assert "PASSWORD" not in key and "@" not in value, (doc["metadata"], key)


def test_secrets_are_the_ones_the_readme_creates(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    readme = (REPO / "README.md").read_text()
    created: dict[str, set[str]] = {}
    for name, sources in re.findall(r"create secret generic (\S+)((?: +--from-\S+)+)", readme):
        created[name] = set(re.findall(r"--from-(?:literal|file)=([^=\s]+)=", sources))
    assert created, "README: no `kubectl create secret generic` commands"
    used: dict[str, set[str]] = {}
    for doc in rendered["gpu"] + rendered["cpu"]:
        for ref in re.findall(r"'secretKeyRef': \{'name': '([^']+)', 'key': '([^']+)'", str(doc)):
            used.setdefault(ref[0], set()).add(ref[1])
        if doc["kind"] == "TriggerAuthentication":
            for ref in doc["spec"]["secretTargetRef"]:
                used.setdefault(ref["name"], set()).add(ref["key"])
        if doc["kind"] == "Deployment":
            for volume in doc["spec"]["template"]["spec"].get("volumes", []):
                if "secret" in volume:
                    keys = {item["key"] for item in volume["secret"]["items"]}
                    used.setdefault(volume["secret"]["secretName"], set()).update(keys)
    assert used == created


# ------------------------------------------------------------------------------- scaling


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_scaled_object_reads_the_queue_the_processes_use(
    rendered: dict[str, list[dict[str, Any]]], overlay: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    docs = rendered[overlay]
    scaled = find(docs, "ScaledObject", "imgsvc-worker")["spec"]
    target = scaled["scaleTargetRef"]
    find(docs, target["kind"], target["name"])
    assert target["name"] == "imgsvc-worker"
    api_spec = pod_spec(docs, "Deployment", "imgsvc-api")
    api = settings_from(container_env(docs, api_spec, "api"), ApiSettings, monkeypatch)
    keys = Keys(api.queue_prefix)
    triggers = {t["name"]: t for t in scaled["triggers"]}
    assert set(triggers) == {"interactive", "bulk"}
    assert triggers["interactive"]["metadata"]["stream"] == keys.stream
    assert triggers["bulk"]["metadata"]["stream"] == keys.bulk_stream
    redis_service = find(docs, "Service", "imgsvc-redis")
    namespace = redis_service["metadata"]["namespace"]
    url = urlsplit(api.redis_url)
    for trigger in triggers.values():
        meta = trigger["metadata"]
        assert trigger["type"] == "redis-streams"
        assert set(meta) <= REDIS_STREAMS_METADATA, set(meta) - REDIS_STREAMS_METADATA
        # XLEN mode: without consumerGroup the v2.17 scaler reads the stream's length
        # (with one it would read XPENDING or the NULL-prone lag; see keda.yaml)
        assert "consumerGroup" not in meta and int(meta["streamLength"]) >= 1
        # KEDA's operator runs in its own namespace: the Service's namespaced name
        host, port = meta["address"].rsplit(":", 1)
        assert host == f"imgsvc-redis.{namespace}.svc"
        assert int(port) == url.port == redis_service["spec"]["ports"][0]["port"]
        assert int(meta["databaseIndex"]) == int(url.path.lstrip("/"))
        auth = find(docs, "TriggerAuthentication", trigger["authenticationRef"]["name"])
        assert auth["spec"]["secretTargetRef"] == [
            {"parameter": "password", "name": "imgsvc-redis", "key": "password"}
        ]
    # never zero workers (/readyz needs one), and a node drain leaves one serving
    pdb = find(docs, "PodDisruptionBudget", "imgsvc-worker")["spec"]
    assert scaled["minReplicaCount"] >= 1
    assert scaled["minReplicaCount"] > pdb["maxUnavailable"]
    assert scaled["maxReplicaCount"] > scaled["minReplicaCount"]
    # the queue can hold enough jobs for the HPA to ask for the maximum (else 503s first)
    per_worker = int(triggers["interactive"]["metadata"]["streamLength"])
    assert api.max_queue_depth >= per_worker * scaled["maxReplicaCount"]


def test_stream_length_is_the_work_in_the_system_and_lag_is_not(
    rendered: dict[str, list[dict[str, Any]]], tmp_path: Path
) -> None:
    """The Redis of the manifest, started here from its rendered command line, with the
    processes' own clients and the URL the manifest builds: after the workers' XACK + XDEL the
    stream's length is exactly the jobs unread plus the jobs being computed, while the
    consumer group's lag reads NULL as soon as two workers finish out of order."""
    docs = rendered["cpu"]
    statefulset = pod_spec(docs, "StatefulSet", "imgsvc-redis")
    args = list(container(statefulset, "redis")["args"])
    args = [FAKE_PASSWORD if a == "$(REDIS_PASSWORD)" else a for a in args]
    args[args.index("--dir") + 1] = str(tmp_path)
    port = free_port()
    binary = shutil.which("redis-server")
    assert binary, "redis-server is required (scripts/setup.sh installs it)"
    process = subprocess.Popen(
        [binary, *args[1:], "--port", str(port), "--bind", "127.0.0.1", "--save", ""],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        api_env = container_env(docs, pod_spec(docs, "Deployment", "imgsvc-api"), "api")
        url = api_env["REDIS_URL"].replace("@imgsvc-redis:6379", f"@127.0.0.1:{port}")
        client = wait_for_redis(url)
        with pytest.raises(redis.AuthenticationError):  # requirepass holds
            redis.Redis(port=port, socket_timeout=3).ping()
        config = client.config_get("*")
        assert config["appendonly"] == "yes" and config["maxmemory-policy"] == "noeviction"
        assert int(config["maxmemory"]) == 1536 * 2**20
        keys = Keys(config_map(docs, "imgsvc-queue")["QUEUE_PREFIX"])
        enqueue_jobs(url, keys, 6)
        workers = [
            Consumer(url, keys, name, result_ttl_s=60, claim_idle_ms=30_000) for name in "ab"
        ]
        workers[0].ensure_groups()
        older = workers[0].read("interactive", 1, None)
        newer = workers[1].read("interactive", 1, None)
        workers[1].outcome().commit(newer)  # the newer job finishes first: XACK + XDEL
        (group,) = client.xinfo_groups(keys.stream)
        unread, pending = 4, 1
        assert group["name"] == CONSUMER_GROUP
        assert group["pending"] == pending and len(older) == 1
        assert client.xlen(keys.stream) == unread + pending
        assert group["lag"] is None  # what lagCount would have scaled on
        workers[0].outcome().commit(older)
        assert client.xlen(keys.stream) == unread
    finally:
        process.terminate()
        process.wait(timeout=10)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_redis(url: str) -> redis.Redis:
    client = redis.Redis.from_url(url, socket_timeout=3, decode_responses=True)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            return client
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def enqueue_jobs(url: str, keys: Keys, count: int) -> None:
    """``count`` tiny jobs through the API's own enqueue (its Lua admission script)."""
    from jobqueue.client import JobQueue

    async def go() -> None:
        queue = JobQueue(url, keys, max_queue_depth=64, result_ttl_s=60)
        try:
            for _ in range(count):
                job = Job(model="mosaic", op="stylize", width=1, height=1, channels=3,
                          pixels=b"\0\0\0")  # fmt: skip
                await queue.enqueue(job, status_ttl_s=60)
        finally:
            await queue.close()

    asyncio.run(go())


# ------------------------------------------------------------------------ network policy


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    assert set(selector) <= {"matchLabels"}, selector  # matchExpressions: extend this
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def _peer_matches(peer: dict[str, Any], pod: Pod, policy_ns: str) -> bool:
    if "ipBlock" in peer:  # the policies here name no addresses; an outside one matches
        return pod.namespace == ""
    if pod.namespace == "":
        return False
    if "namespaceSelector" in peer:
        namespace_labels = {"kubernetes.io/metadata.name": pod.namespace}
        if not _selects(peer["namespaceSelector"], namespace_labels):
            return False
    elif pod.namespace != policy_ns:
        return False
    return _selects(peer.get("podSelector", {}), pod.labels)


class Pod:
    def __init__(self, namespace: str, **labels: str) -> None:
        self.namespace = namespace  # "" = outside the cluster
        self.labels = {k.replace("__", "."): v for k, v in labels.items()}


def allowed(policies: list[dict[str, Any]], src: Pod, dst: Pod, port: int) -> bool:
    """NetworkPolicy semantics for one TCP connection: the destination's ingress policies and
    the source's egress policies must both allow it (a pod no policy selects is open)."""

    def side(pod: Pod, direction: str, other: Pod) -> bool:
        mine = [
            p for p in policies
            if pod.namespace == p["metadata"]["namespace"]
            and _selects(p["spec"]["podSelector"], pod.labels)
            and direction.capitalize() in p["spec"]["policyTypes"]
        ]  # fmt: skip
        if pod.namespace == "" or not mine:
            return True
        peers_key = "from" if direction == "ingress" else "to"
        for policy in mine:
            for rule in policy["spec"].get(direction, []):
                ports = rule.get("ports")
                if ports and not any(p["port"] == port and p["protocol"] == "TCP" for p in ports):
                    continue
                peers = rule.get(peers_key)
                if not peers or any(
                    _peer_matches(peer, other, policy["metadata"]["namespace"]) for peer in peers
                ):
                    return True
        return False

    return side(dst, "ingress", src) and side(src, "egress", dst)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_only_the_service_reaches_redis(
    rendered: dict[str, list[dict[str, Any]]], overlay: str
) -> None:
    docs = rendered[overlay]
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]

    def labels(component: str) -> dict[str, str]:
        kind = "StatefulSet" if component == "redis" else "Deployment"
        return find(docs, kind, f"imgsvc-{component}")["spec"]["template"]["metadata"]["labels"]

    ns = "imgsvc"
    api, worker, redis_pod = (Pod(ns, **labels(c)) for c in ("api", "worker", "redis"))
    keda = Pod("keda", app="keda-operator")
    stranger = Pod(ns, app="debug-shell")
    elsewhere = Pod("default", **labels("api"))  # same labels, other namespace
    prometheus = Pod("monitoring", app="prometheus")
    internet = Pod("")
    assert allowed(policies, api, redis_pod, 6379)
    assert allowed(policies, worker, redis_pod, 6379)
    assert allowed(policies, keda, redis_pod, 6379)
    for intruder in (stranger, elsewhere, prometheus, internet):
        assert not allowed(policies, intruder, redis_pod, 6379), intruder.labels
    assert not allowed(policies, api, redis_pod, 6380)  # the Redis port only
    # the API is the entry point; workers take no connection but Prometheus' scrape
    assert allowed(policies, internet, api, 8000) and allowed(policies, prometheus, api, 8000)
    assert allowed(policies, prometheus, worker, 9100)
    assert not allowed(policies, stranger, worker, 9100)
    assert not allowed(policies, api, worker, 9100)
    # and nothing of the service calls out
    for pod in (api, worker, redis_pod):
        assert not allowed(policies, pod, internet, 443)
    # everything else in the namespace is denied by default, both ways
    (deny,) = [p for p in policies if p["spec"]["podSelector"] == {}]
    assert set(deny["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    assert "ingress" not in deny["spec"] and "egress" not in deny["spec"]


def test_capacity_formula_in_the_readme_matches_its_table() -> None:
    """The README's capacity table is what ``bench.capacity`` computes from the measured
    seconds per image it states (so the table cannot drift from the formula)."""
    from bench.capacity import workers_needed

    readme = (REPO / "README.md").read_text()
    section = readme.split("### Capacity model", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| (\d+(?:\.\d+)?) \| ([\d.]+) \| ([\d.]+) \| (\d+) \| (\d+) \|", section,
                      flags=re.M)  # fmt: skip
    assert len(rows) >= 4, "capacity table not found"
    for rate, seconds, p99_target, simple, queued in rows:
        plan = workers_needed(float(rate), float(seconds), float(p99_target))
        assert plan.by_utilisation == int(simple), (rate, seconds)
        assert plan.for_p99 == int(queued), (rate, seconds, p99_target)
        assert math.isfinite(plan.p99_s) and plan.p99_s <= float(p99_target)
