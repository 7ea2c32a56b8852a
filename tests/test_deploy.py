"""deploy/k8s: every manifest is valid Kubernetes (offline schemas) and agrees with the code and the Dockerfile."""

from __future__ import annotations

import dataclasses
import re
import shlex
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml

from fuseport.client.stats import DEFAULT_METRICS_URL
from fuseport.server.settings import ENV_PREFIX, Settings

from .test_packaging import _final_stage

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
MANIFESTS = sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
# The oldest release the manifests are for (native gRPC probes are GA from 1.27) and a
# newer one; kubernetes-validate bundles the JSON schemas of both (no network needed).
KUBERNETES_VERSIONS = ("1.27.0", "1.31.0")
# Settings the TLS/auth work adds on another branch, not yet fields here: the
# Deployment sets them already. Drop this list once those fields exist (the test
# then checks them like every other variable).
# Read by the client side (`fuseport health` in the probes), not by the server's Settings.
CLIENT_SETTINGS = {"FUSEPORT_TLS_CA", "FUSEPORT_TLS_SERVER_NAME"}
# Seconds the kubelet should leave between the drain's end and its SIGKILL: the
# process still logs and exits, and probes and signals are not instantaneous.
EXIT_MARGIN = 5


def _documents(name: str) -> list[dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all((K8S / name).read_text()) if d is not None]
    assert docs, f"{name} holds no document"
    return docs


def _one(kind: str) -> dict[str, Any]:
    found = [d for name in MANIFESTS for d in _documents(name) if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def _pod() -> dict[str, Any]:
    return _one("Deployment")["spec"]["template"]


def _container() -> dict[str, Any]:
    containers = _pod()["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def _env() -> dict[str, str]:
    return {e["name"]: e["value"] for e in _container().get("env", [])}


def _effective_settings() -> Settings:
    """What the server in the pod runs with: the image's environment, then the Deployment's."""
    env = {k: v for k, v in {**_final_stage().env, **_env()}.items() if k.startswith(ENV_PREFIX)}
    known = {ENV_PREFIX + f.name.upper() for f in dataclasses.fields(Settings)}
    return Settings.load(environ={k: v for k, v in env.items() if k in known})


def _mount_for(path: str) -> dict[str, Any]:
    """The volume mount that holds `path`, and the volume behind it."""
    mounts = [m for m in _container()["volumeMounts"] if PurePosixPath(path).is_relative_to(m["mountPath"])]
    assert mounts, f"{path} is on no mounted volume"
    mount = max(mounts, key=lambda m: len(m["mountPath"]))
    volumes = {v["name"]: v for v in _pod()["spec"]["volumes"]}
    return {**mount, "volume": volumes[mount["name"]]}


# --- the schemas --------------------------------------------------------------------


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("name", MANIFESTS)
def test_every_manifest_document_is_valid_kubernetes(name: str, version: str) -> None:
    for doc in _documents(name):
        # strict: a field the schema does not know (a typo, a misplaced key) is an error
        # here, where kubectl would drop it silently or fail only at apply time.
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            path = ".".join(str(p) for p in e.path)
            pytest.fail(f"{name}: {doc['kind']}/{doc['metadata']['name']} at {path}: {e.message} (Kubernetes {version})")


def test_kustomization_applies_every_manifest_and_sets_the_deployments_image() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == MANIFESTS
    image_name = _container()["image"].rsplit(":", 1)[0]
    assert image_name in {i["name"] for i in kustomization["images"]}


def test_selectors_of_the_service_and_the_budget_match_the_pods() -> None:
    labels = _pod()["metadata"]["labels"]
    deployment = _one("Deployment")["spec"]["selector"]["matchLabels"]
    service = _one("Service")["spec"]
    budget = _one("PodDisruptionBudget")["spec"]["selector"]["matchLabels"]
    for selector in (deployment, service["selector"], budget):
        assert selector.items() <= labels.items()
    assert service["clusterIP"] == "None", "headless: clients balance over the pods themselves"
    assert _one("PodDisruptionBudget")["spec"]["maxUnavailable"] < _one("Deployment")["spec"]["replicas"]


# --- consistency with the code and the Dockerfile ----------------------------------


def test_probes_ask_grpc_health_over_tls_on_the_port_the_image_serves() -> None:
    """The kubelet's own gRPC probe speaks plaintext: with TLS on, the probes run the CLI."""
    image_env = _final_stage().env
    port = int(image_env["FUSEPORT_PORT"])
    container = _container()
    settings = _effective_settings()
    assert settings.port == port and settings.tls_cert is not None
    assert image_env["FUSEPORT_TARGET"] == f"127.0.0.1:{port}", "where `fuseport health` in the pod dials"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        command = container[probe]["exec"]["command"]
        assert command[:2] == ["fuseport", "health"], probe
        timeout = float(command[command.index("--timeout") + 1])
        assert timeout < container[probe]["timeoutSeconds"], f"{probe}: the CLI gives up before the kubelet"
    env = _env()
    assert _mount_for(env["FUSEPORT_TLS_CA"])["volume"]["secret"]["secretName"] == "fuseport-tls"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["grpc"] == port
    service_ports = {p["name"]: p["targetPort"] for p in _one("Service")["spec"]["ports"]}
    assert ports[service_ports["grpc"]] == port


def test_termination_grace_covers_the_pre_stop_pause_and_the_servers_drain() -> None:
    pod, container = _pod()["spec"], _container()
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep", command
    pause = float(command[1])
    grace = _effective_settings().grace_seconds
    assert grace >= Settings().grace_seconds, "in-flight calls get at least the server's default grace"
    assert pod["terminationGracePeriodSeconds"] >= pause + grace + EXIT_MARGIN


def test_metrics_annotations_name_the_port_the_server_serves_metrics_on() -> None:
    annotations = _pod()["metadata"]["annotations"]
    metrics_port = _effective_settings().metrics_port
    assert metrics_port, "the Deployment turns metrics on"
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == metrics_port
    assert annotations["prometheus.io/path"] == urlsplit(DEFAULT_METRICS_URL).path
    assert {p["name"]: p["containerPort"] for p in _container()["ports"]}["metrics"] == metrics_port
    # `fuseport stats` with no --metrics-url reads this port (through a port-forward).
    assert urlsplit(DEFAULT_METRICS_URL).port == metrics_port


def test_the_pod_runs_as_the_images_unprivileged_user() -> None:
    uid, _, gid = _final_stage().user.partition(":")
    security = {**_pod()["spec"]["securityContext"], **_container().get("securityContext", {})}
    assert security["runAsNonRoot"] is True
    assert str(security["runAsUser"]) == uid != "0"
    assert str(security.get("runAsGroup", gid)) == gid
    assert security["allowPrivilegeEscalation"] is False


def test_a_gpu_is_requested() -> None:
    resources = _container()["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == 1
    assert resources["requests"].get("nvidia.com/gpu", 1) == 1  # extended resources: requests == limits


def test_every_fuseport_variable_is_a_setting() -> None:
    names = {n for n in _env() if n.startswith(ENV_PREFIX)}
    known = {ENV_PREFIX + f.name.upper() for f in dataclasses.fields(Settings)}
    unknown = names - known - CLIENT_SETTINGS
    assert not unknown, f"the Deployment sets variables fuseport does not read: {sorted(unknown)}"
    assert {"FUSEPORT_TLS_CERT", "FUSEPORT_TLS_KEY", "FUSEPORT_AUTH_TOKENS"} <= names, "TLS and tokens are on"
    assert CLIENT_SETTINGS <= names


def test_the_store_and_compile_caches_are_on_a_writable_volume() -> None:
    env = {**_final_stage().env, **_env()}
    for path in (str(_effective_settings().store_dir), env["TORCHINDUCTOR_CACHE_DIR"], env["TRITON_CACHE_DIR"]):
        mount = _mount_for(path)
        assert not mount.get("readOnly", False), path
        assert "secret" not in mount["volume"], path


@pytest.mark.parametrize(
    ("variable", "secret_key"),
    [
        ("FUSEPORT_TLS_CERT", "tls.crt"),
        ("FUSEPORT_TLS_KEY", "tls.key"),
        ("FUSEPORT_TLS_CA", "ca.crt"),
        ("FUSEPORT_AUTH_TOKENS", "tokens"),
    ],
)
def test_tls_and_token_files_come_from_secrets_the_docs_say_how_to_create(variable: str, secret_key: str) -> None:
    path = PurePosixPath(_env()[variable])
    mount = _mount_for(str(path))
    secret = mount["volume"].get("secret")
    assert secret is not None, f"{variable} is not on a Secret volume"
    assert mount.get("readOnly") is True
    # A whole Secret mounted: each key is a file of that name.
    assert "items" not in secret and path.relative_to(mount["mountPath"]) == PurePosixPath(secret_key)
    guide = (ROOT / "docs" / "guides" / "kubernetes.md").read_text().replace("\\\n", " ")  # continued lines joined
    commands = [shlex.split(c) for c in re.findall(r"^kubectl create secret .*$", guide, re.M)]
    creating = [c for c in commands if secret["secretName"] in c]
    assert creating, f"docs/guides/kubernetes.md does not say how to create Secret {secret['secretName']}"
    assert any(secret_key in " ".join(c) for c in creating), (
        f"docs/guides/kubernetes.md's Secret {secret['secretName']} lacks {secret_key}"
    )
