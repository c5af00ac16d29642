"""The Helm chart: lint, rendered output, and its RBAC proven on a real API server."""

from __future__ import annotations

import base64
import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from truenas_incus_dev.localcluster import LocalControlPlane, binaries_dir
from truenas_incus_operator.policy import Policy
from truenas_simulator.images import write_mirror

from .conftest import ROOT, Cluster
from .harness import Harness, OperatorProcess, _reason, operator_env, start_simulator, unique

pytestmark = pytest.mark.e2e  # needs the local control plane (kube-apiserver + etcd, helm)

CHART = ROOT / "charts" / "truenas-incus-operator"
KUBE_VERSION = "1.37.2"
RECOMMENDED_LABELS = {
    "helm.sh/chart",
    "app.kubernetes.io/name",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/version",
    "app.kubernetes.io/managed-by",
}


def helm(*args: str, kubeconfig: Path | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    command = [str(binaries_dir(progress=False) / "helm"), *args]
    if kubeconfig is not None:
        command += ["--kubeconfig", str(kubeconfig)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def render(*sets: str) -> list[dict[str, Any]]:
    args = ["template", "tio", str(CHART), "--namespace", "tio-system", "--kube-version", KUBE_VERSION]
    for item in sets:
        args += ["--set", item]
    return [d for d in yaml.safe_load_all(helm(*args).stdout) if d]


def by_kind(documents: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in documents if d["kind"] == kind]


def test_lint_is_clean() -> None:
    result = helm("lint", "--strict", str(CHART), "--kube-version", KUBE_VERSION)
    assert "0 chart(s) failed" in result.stdout
    assert "[WARNING]" not in result.stdout and "[ERROR]" not in result.stdout and "[INFO]" not in result.stdout


def test_deployment_is_restricted_and_single() -> None:
    documents = render()
    (deployment,) = by_kind(documents, "Deployment")
    spec = deployment["spec"]
    assert spec["replicas"] == 1 and spec["strategy"] == {"type": "Recreate"}
    # No election by default: no Lease, no Role for it, no PodDisruptionBudget.
    assert "TIO_LEADER_ELECTION" not in {e["name"] for e in spec["template"]["spec"]["containers"][0]["env"]}
    assert not by_kind(documents, "PodDisruptionBudget")
    assert not [r for r in by_kind(documents, "Role") if r["metadata"]["name"].endswith("-election")]
    pod = spec["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    (container,) = pod["containers"]
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert "--liveness=http://0.0.0.0:8080/healthz" in container["args"] and "--all-namespaces" in container["args"]
    assert container["resources"]["requests"] == {"cpu": "50m", "memory": "128Mi"}
    assert container["image"].endswith(":0.1.0")
    assert pod["serviceAccountName"] == "tio-truenas-incus-operator"
    for document in documents:
        assert set(document["metadata"]["labels"]) >= RECOMMENDED_LABELS, document["kind"]


SCRATCH = "/var/cache/truenas-incus-operator"


def container_of(documents: list[dict[str, Any]]) -> dict[str, Any]:
    (deployment,) = by_kind(documents, "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    result: dict[str, Any] = container
    return result


def volumes_of(documents: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    (deployment,) = by_kind(documents, "Deployment")
    return {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}


def test_a_scratch_volume_sized_for_vm_images() -> None:
    """VM images (hundreds of MB) are downloaded to TIO_SCRATCH_DIR: a volume of its own, not the 16Mi /tmp."""
    documents = render()
    container = container_of(documents)
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["TIO_SCRATCH_DIR"] == SCRATCH
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert mounts[SCRATCH] == "scratch"
    assert volumes_of(documents)["scratch"] == {"name": "scratch", "emptyDir": {"sizeLimit": "10Gi"}}
    assert "TIO_VM_IMAGE_SERVER" not in env, "unset: the operator's built-in default"
    bigger = volumes_of(render("scratch.sizeLimit=40Gi"))["scratch"]
    assert bigger == {"name": "scratch", "emptyDir": {"sizeLimit": "40Gi"}}
    claimed = volumes_of(render("scratch.persistentVolumeClaim.claimName=images"))["scratch"]
    assert claimed == {"name": "scratch", "persistentVolumeClaim": {"claimName": "images"}}


def test_vm_image_server_and_extra_env_volumes_and_mounts() -> None:
    documents = render(
        "vmImageServer=https://images.example.org/",
        "extraEnv[0].name=TIO_DEVICE_AUDITS_PER_RESYNC",
        "extraEnv[0].value=5",
        "extraVolumes[0].name=mirror",
        "extraVolumes[0].persistentVolumeClaim.claimName=mirror",
        "extraVolumeMounts[0].name=mirror",
        "extraVolumeMounts[0].mountPath=/srv/mirror",
        "extraVolumeMounts[0].readOnly=true",
    )
    container = container_of(documents)
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["TIO_VM_IMAGE_SERVER"] == "https://images.example.org/"
    assert env["TIO_DEVICE_AUDITS_PER_RESYNC"] == "5"
    assert {"name": "mirror", "mountPath": "/srv/mirror", "readOnly": True} in container["volumeMounts"]
    assert volumes_of(documents)["mirror"] == {"name": "mirror", "persistentVolumeClaim": {"claimName": "mirror"}}


def test_a_vm_is_created_through_the_charts_rendered_environment(
    cluster: Cluster, namespace: str, tmp_path: Path
) -> None:
    """The operator with exactly the environment the chart renders (the kubelet's mounts replaced by
    local files and folders) creates a VM from the chart's vmImageServer, downloading into TIO_SCRATCH_DIR."""
    sim = start_simulator("25.10", job_duration=0.05)
    operator: OperatorProcess | None = None
    try:
        mirror = write_mirror(list(sim.sim.images.values()), tmp_path / "mirror")
        documents = render(
            f"truenas.url={sim.ws_url}",
            "truenas.apiKeySecret.name=nas-key",
            "truenas.caSecret.name=nas-ca",
            f"vmImageServer={mirror}",
            "metrics.enabled=false",
        )
        container = container_of(documents)
        rendered = {e["name"]: e["value"] for e in container["env"] if "value" in e}
        assert rendered["TIO_VM_IMAGE_SERVER"] == str(mirror) and rendered["TIO_SCRATCH_DIR"] == SCRATCH
        files = operator_env(sim, tmp_path)  # the key file the Secret mount would provide
        (tmp_path / "scratch").mkdir()
        (tmp_path / "policy.yaml").write_text(policy_text(documents))
        assert sim.ca_file is not None
        mounted = {
            "/etc/truenas-incus-operator/api-key/key": files["TIO_TRUENAS_API_KEY_FILE"],
            "/etc/truenas-incus-operator/ca/ca.crt": str(sim.ca_file),
            "/etc/truenas-incus-operator/policy/policy.yaml": str(tmp_path / "policy.yaml"),
            SCRATCH: str(tmp_path / "scratch"),
        }
        env = {name: mounted.get(value, value) for name, value in rendered.items()}
        unmapped = [v for v in env.values() if v.startswith(("/etc/", "/var/"))]
        assert not unmapped, f"a path the test does not provide: {unmapped}"
        env.pop("TIO_LEDGER_NAMESPACE")  # the release namespace: here the harness's own ledger namespace
        env["TIO_RETRY_MIN_SECONDS"] = "0.5"  # tests' usual backoff; not a chart value
        operator = OperatorProcess(cluster, env, tmp_path / "operator.log", args=["-n", namespace]).start()
        harness = Harness(cluster, sim, operator, tmp_path)
        name = unique("vm")
        spec = {"type": "VM", "image": "debian/bookworm", "cpu": "1", "memory": "1Gi", "rootDiskSize": "10Gi"}
        harness.apply(namespace, name, spec)
        status = harness.wait_ready(namespace, name, timeout=120)
        assert status["phase"] == "Running"
        assert harness.delete(namespace, name).returncode == 0
    finally:
        if operator is not None:
            operator.stop()
        sim.stop()


def test_the_conventional_keys_make_it_a_subchart() -> None:
    """``global`` (every parent chart passes it), ``nameOverride`` and ``fullnameOverride`` are accepted."""
    documents = render("global.imageRegistry=registry.example", "nameOverride=tio-op")
    (deployment,) = by_kind(documents, "Deployment")
    assert deployment["metadata"]["name"] == "tio-tio-op"
    assert deployment["metadata"]["labels"]["app.kubernetes.io/name"] == "tio-op"
    documents = render("fullnameOverride=incus")
    names = {d["metadata"]["name"] for d in documents if d["kind"] in ("Deployment", "ServiceAccount", "ClusterRole")}
    assert names == {"incus"}
    (deployment,) = by_kind(documents, "Deployment")
    assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == "incus"


def test_helm_knows_a_current_kubernetes_without_a_cluster() -> None:
    """Built with Helm's Kubernetes-version link flags: without --kube-version (and without a cluster)
    `helm template` and `helm lint` accept the chart's kubeVersion (>=1.31) instead of assuming v1.20."""
    template = helm("template", "tio", str(CHART), check=False)
    assert template.returncode == 0, template.stderr
    lint = helm("lint", "--strict", str(CHART), check=False)
    assert lint.returncode == 0 and "[ERROR]" not in lint.stdout, lint.stdout + lint.stderr


def test_crds_are_kept_and_identical_to_crds_folder() -> None:
    crds = by_kind(render(), "CustomResourceDefinition")
    assert len(crds) == 4
    for crd in crds:
        assert crd["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}
        plain = yaml.safe_load((ROOT / "crds" / f"{crd['metadata']['name']}.yaml").read_text())
        assert crd["spec"] == plain["spec"]
    assert by_kind(render("crds.install=false"), "CustomResourceDefinition") == []


OURS = "incus.truenas.io"
KINDS = ("incusinstances", "truenasconnections", "incusinstancesnapshots", "incusinstancerestores")
READ_PATCH = ["get", "list", "watch", "patch"]
EXPECTED_RULES = [
    {"apiGroups": [OURS], "resources": [*KINDS], "verbs": READ_PATCH},
    {"apiGroups": [OURS], "resources": [f"{kind}/status" for kind in KINDS], "verbs": ["patch"]},
    {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]},
    {"apiGroups": ["", "events.k8s.io"], "resources": ["events"], "verbs": ["create", "patch"]},
    # spec.expose: by name only (no list, no watch)
    {"apiGroups": [""], "resources": ["services"], "verbs": ["get", "create", "update", "delete"]},
    {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["get", "create", "update", "delete"]},
]  # fmt: skip


def test_cluster_wide_rbac() -> None:
    documents = render()
    (role,) = by_kind(documents, "ClusterRole")
    # Nothing on CRDs or namespaces even cluster-wide: no scanning (a CRD delete must not hang).
    assert role["rules"] == EXPECTED_RULES
    (ledger,) = by_kind(documents, "Role")  # the ownership ledger in the release namespace, nothing more
    assert ledger["metadata"]["namespace"] == "tio-system"
    assert ledger["rules"] == [
        {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "list", "create", "update", "delete"]},
        # The credential copies (issue 19 item 7): one Secret by name, created by the chart.
        {
            "apiGroups": [""],
            "resources": ["secrets"],
            "resourceNames": ["tio-truenas-incus-operator-credentials"],
            "verbs": ["get", "update"],
        },
    ]


def test_namespaced_rbac() -> None:
    documents = render("watch.namespaces={apps,db}")
    assert not by_kind(documents, "ClusterRole") and not by_kind(documents, "ClusterRoleBinding")
    roles = [r for r in by_kind(documents, "Role") if not r["metadata"]["name"].endswith("-ledger")]
    assert [r["metadata"]["namespace"] for r in roles] == ["apps", "db"]
    assert all(r["rules"] == EXPECTED_RULES for r in roles)
    bindings = by_kind(documents, "RoleBinding")
    assert [b["subjects"][0]["namespace"] for b in bindings] == ["tio-system"] * 3
    (deployment,) = by_kind(documents, "Deployment")
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--namespace=apps" in args and "--namespace=db" in args and "--all-namespaces" not in args


def test_default_connection_values() -> None:
    documents = render(
        "truenas.url=wss://nas.example", "truenas.apiKeySecret.name=nas-key", "truenas.caSecret.name=nas-ca"
    )
    (deployment,) = by_kind(documents, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    env = {e["name"]: e["value"] for e in pod["containers"][0]["env"]}
    assert env["TIO_TRUENAS_URL"] == "wss://nas.example"
    assert env["TIO_TRUENAS_API_KEY_FILE"] == "/etc/truenas-incus-operator/api-key/key"
    assert env["TIO_TRUENAS_CA_FILE"] == "/etc/truenas-incus-operator/ca/ca.crt"
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["api-key"]["secret"] == {"secretName": "nas-key", "items": [{"key": "apiKey", "path": "key"}]}
    assert "TIO_TRUENAS_API_KEY" not in env, "the key itself never goes into the pod spec"


def test_metrics_port_service_and_an_optional_service_monitor() -> None:
    documents = render()
    (deployment,) = by_kind(documents, "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["TIO_METRICS_PORT"] == "9090"
    assert {"name": "metrics", "containerPort": 9090, "protocol": "TCP"} in container["ports"]
    (service,) = by_kind(documents, "Service")
    assert service["metadata"]["name"] == "tio-truenas-incus-operator-metrics"
    assert service["spec"]["type"] == "ClusterIP"
    assert service["spec"]["ports"] == [{"name": "metrics", "port": 9090, "targetPort": "metrics", "protocol": "TCP"}]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert by_kind(documents, "ServiceMonitor") == [], "off by default: it needs the Prometheus Operator's CRD"

    documents = render("metrics.serviceMonitor.enabled=true", "metrics.serviceMonitor.labels.release=prom")
    (service,) = by_kind(documents, "Service")
    (monitor,) = by_kind(documents, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["namespace"] == "tio-system" and monitor["metadata"]["labels"]["release"] == "prom"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": ["tio-system"]}
    assert monitor["spec"]["endpoints"] == [
        {"port": "metrics", "path": "/metrics", "interval": "30s", "scrapeTimeout": "10s"}
    ]

    documents = render("metrics.enabled=false", "metrics.serviceMonitor.enabled=true")
    (deployment,) = by_kind(documents, "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert "TIO_METRICS_PORT" not in {e["name"] for e in container["env"]}
    assert [p["name"] for p in container["ports"]] == ["health"]
    assert by_kind(documents, "Service") == [] and by_kind(documents, "ServiceMonitor") == []


def test_a_standby_with_leader_election() -> None:
    documents = render("leaderElection.enabled=true", "replicas=2", "updateStrategy=RollingUpdate")
    (deployment,) = by_kind(documents, "Deployment")
    spec = deployment["spec"]
    assert spec["replicas"] == 2
    assert spec["strategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}
    (container,) = spec["template"]["spec"]["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert env["TIO_LEADER_ELECTION"]["value"] == "true"
    assert env["TIO_LEASE_NAME"]["value"] == "tio-truenas-incus-operator"
    assert (env["TIO_LEASE_DURATION_SECONDS"]["value"], env["TIO_LEASE_RENEW_DEADLINE_SECONDS"]["value"]) == (
        "15",
        "10",
    )
    assert env["TIO_POD_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    # The election's RBAC: create leases, get and update only its own, in the release namespace only.
    (role,) = [r for r in by_kind(documents, "Role") if r["metadata"]["name"].endswith("-election")]
    assert role["metadata"]["namespace"] == "tio-system"
    assert role["rules"] == [
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["create"]},
        {
            "apiGroups": ["coordination.k8s.io"],
            "resources": ["leases"],
            "resourceNames": ["tio-truenas-incus-operator"],
            "verbs": ["get", "update"],
        },
    ]
    (binding,) = [b for b in by_kind(documents, "RoleBinding") if b["metadata"]["name"].endswith("-election")]
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    (budget,) = by_kind(documents, "PodDisruptionBudget")
    assert budget["spec"]["maxUnavailable"] == 1
    assert budget["spec"]["selector"]["matchLabels"] == spec["selector"]["matchLabels"]
    # One replica with election: no budget (it would only block drains).
    assert not by_kind(render("leaderElection.enabled=true"), "PodDisruptionBudget")


@pytest.mark.parametrize(
    "values,message",
    [
        (["replicas=2"], "replicas > 1 needs leaderElection.enabled=true"),
        (["updateStrategy=RollingUpdate"], "RollingUpdate needs leaderElection.enabled=true"),
        (
            ["leaderElection.enabled=true", "leaderElection.renewDeadlineSeconds=15"],
            "renewDeadlineSeconds must be less than leaseDurationSeconds",
        ),
        (["updateStrategy=OnDelete"], "value must be one of 'Recreate', 'RollingUpdate'"),
        (["metrics.port=8080"], "/metrics/port"),
        (["metrics.serviceMonitor.interval=often"], "/metrics/serviceMonitor/interval"),
        (["truenas.transport=grpc"], "value must be one of 'websocket', 'rest'"),
        (["truenas.url=wss://nas"], "/truenas/apiKeySecret/name"),
        (["truenas.maxConcurrentCalls=50"], "maximum: got 50, want 20"),
        (["watch.namespaces={Bad_NS}"], "/watch/namespaces/0"),
        (["nonsense=1"], "additional properties 'nonsense' not allowed"),
    ],
)
def test_values_schema_refuses_bad_values(values: list[str], message: str) -> None:
    args = ["template", "tio", str(CHART), "--kube-version", KUBE_VERSION]
    for item in values:
        args += ["--set", item]
    result = helm(*args, check=False)
    assert result.returncode != 0 and message in result.stderr, result.stderr


# ----- RBAC proven on a real API server -------------------------------------------------------------------
@pytest.fixture(scope="module")
def fresh_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """Its own control plane: Helm installs (and owns) the CRDs here."""
    plane = LocalControlPlane(workdir=tmp_path_factory.mktemp("chart-cp"), bin_dir=binaries_dir(progress=False)).start()
    try:
        yield Cluster(plane)
    finally:
        plane.stop()


def service_account_kubeconfig(cluster: Cluster, path: Path, namespace: str, name: str) -> Path:
    token = cluster.kubectl("create", "token", name, "-n", namespace, "--duration=1h").stdout.strip()
    plane = cluster.plane
    assert plane.ca is not None
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "local",
                "cluster": {
                    "server": plane.server,
                    "certificate-authority-data": base64.b64encode(plane.ca.cert_pem).decode(),
                },
            }
        ],
        "users": [{"name": name, "user": {"token": token}}],
        "contexts": [{"name": "local", "context": {"cluster": "local", "user": name}}],
        "current-context": "local",
    }
    path.write_text(yaml.safe_dump(config))
    return path


def can_i(cluster: Cluster, verb: str, resource: str, namespace: str | None = None) -> bool:
    args = ["auth", "can-i", verb, resource, "--as=system:serviceaccount:tio-system:tio-truenas-incus-operator"]
    args += ["-n", namespace] if namespace else ["--all-namespaces"]
    return cluster.kubectl(*args, check=False).stdout.strip() == "yes"


def forbidden(logs: str) -> list[str]:
    """Lines where the API server refused the operator something (a status 403; not a quoted value such
    as a resourceVersion that happens to be '403' in kopf's debug lines, nor the milliseconds of a log
    line's timestamp: ``[2026-12-04 20:28:09,403]`` failed CI once)."""
    found = []
    for line in logs.splitlines():
        text = re.sub(r"^\[[0-9-]+ [0-9:]+,[0-9]+\]", "", line)
        if "Forbidden" in text or re.search(r"(?<!['\"\w.,:])403(?!['\"\w.,:])", text):
            found.append(line)
    return found


def lifecycle(harness: Harness, namespace: str) -> None:
    """Create, update, stop, connect through a TrueNASConnection (a Secret read), delete."""
    name = unique("rbac")
    harness.apply(namespace, name, {"cpu": "1"})
    harness.wait_ready(namespace, name, timeout=60)
    harness.apply(namespace, name, {"cpu": "2", "powerState": "Stopped"})
    harness.wait_status(namespace, name, "stopped", lambda s: s.get("phase") == "Stopped" and s.get("cpu") == "2")
    harness.wait_event(namespace, name, "Created")
    # spec.expose: its Service and EndpointSlice made, applied, and deleted with the RBAC the chart gives.
    exposed = {"cpu": "2", "powerState": "Stopped", "expose": {"ports": [{"port": 80}], "annotations": {"a": "1"}}}
    harness.apply(namespace, name, exposed)
    harness.wait_status(namespace, name, "not exposed", lambda s: _reason(s, "Exposed") == "NotExposed")
    harness.apply(namespace, name, {"cpu": "2", "expose": {"ports": [{"port": 81}]}})  # running again
    harness.wait_status(namespace, name, "exposed", lambda s: _reason(s, "Exposed") == "Exposed", timeout=60)
    service = harness.cluster.get("service", name, namespace)
    assert service["spec"]["ports"][0]["port"] == 81 and "a" not in service["metadata"].get("annotations", {})
    harness.cluster.get("endpointslice", f"{name}-ipv4", namespace)
    harness.apply(namespace, name, {"cpu": "2", "powerState": "Stopped"})
    harness.wait_status(namespace, name, "unexposed", lambda s: "service" not in s)
    assert harness.cluster.kubectl("get", "service", name, "-n", namespace, check=False).returncode != 0
    other = start_simulator("25.10")
    try:
        harness.connect_namespace(namespace, other)
        via = unique("via")
        harness.apply(namespace, via, {"connectionRef": {"name": "nas"}})
        harness.wait_ready(namespace, via, timeout=60)
        assert harness.delete(namespace, via).returncode == 0
    finally:
        other.stop()
    assert harness.delete(namespace, name).returncode == 0
    assert name not in harness.instance_names()


def lifecycle_as_service_account(
    cluster: Cluster,
    kubeconfig: Path,
    workdir: Path,
    args: list[str],
    namespace: str,
    env: dict[str, str] | None = None,
) -> None:
    """The operator with the ServiceAccount's token runs the lifecycle and is never refused anything."""
    workdir.mkdir()
    sim = start_simulator("25.10", job_duration=0.05)
    operator = OperatorProcess(
        cluster, {**operator_env(sim, workdir), **(env or {})}, workdir / "operator.log", args=args
    )
    operator.env["KUBECONFIG"] = str(kubeconfig)
    operator.env["TIO_LEDGER_NAMESPACE"] = "tio-system"  # what the chart sets: the release namespace
    operator.env["TIO_CREDENTIALS_SECRET"] = "tio-truenas-incus-operator-credentials"  # and its credential copies
    operator.start()
    try:
        lifecycle(Harness(cluster, sim, operator, workdir), namespace)
    finally:
        operator.stop()
        sim.stop()
    assert not forbidden(operator.logs())


def test_operator_runs_under_the_charts_service_account(fresh_cluster: Cluster, tmp_path: Path) -> None:
    cluster = fresh_cluster
    for ns in ("apps", "elsewhere"):
        cluster.kubectl("create", "namespace", ns)
    kubeconfig = cluster.kubeconfig
    install = helm(
        "install", "tio", str(CHART), "-n", "tio-system", "--create-namespace", "--set", "watch.namespaces={apps}",
        kubeconfig=kubeconfig,
    )  # fmt: skip
    assert "STATUS: deployed" in install.stdout
    assert (
        "default connection for: *" in install.stdout
        and "in status (Synced=False, reason PolicyDenied)" in install.stdout
    )
    cluster.kubectl("wait", "--for=condition=Established", "crd/incusinstances.incus.truenas.io", "--timeout=60s")

    # What it may do, and nothing more.
    assert can_i(cluster, "get", "secrets", "apps")
    assert not can_i(cluster, "list", "secrets", "apps") and not can_i(cluster, "watch", "secrets", "apps")
    assert not can_i(cluster, "get", "secrets", "elsewhere") and not can_i(cluster, "get", "secrets", "tio-system")
    # Its one Secret there (credential copies for teardown, issue 19 item 7): by name, get and update only.
    copies = "secrets/tio-truenas-incus-operator-credentials"
    assert can_i(cluster, "get", copies, "tio-system") and can_i(cluster, "update", copies, "tio-system")
    assert not can_i(cluster, "delete", copies, "tio-system") and not can_i(cluster, "create", "secrets", "tio-system")
    for verb in ("get", "list", "watch", "patch"):
        assert can_i(cluster, verb, "incusinstances.incus.truenas.io", "apps")
        assert not can_i(cluster, verb, "incusinstances.incus.truenas.io", "elsewhere")
    for verb in ("create", "update", "delete"):
        assert not can_i(cluster, verb, "incusinstances.incus.truenas.io", "apps")
    assert can_i(cluster, "patch", "incusinstances.incus.truenas.io/status", "apps")
    assert can_i(cluster, "create", "events", "apps")
    for verb, resource in (("create", "pods"), ("create", "secrets"), ("update", "configmaps"), ("delete", "events")):
        assert not can_i(cluster, verb, resource, "apps"), (verb, resource)
    # spec.expose: Services and EndpointSlices by name in the watched namespaces, never listed or watched.
    for resource in ("services", "endpointslices.discovery.k8s.io"):
        for verb in ("get", "create", "update", "delete"):
            assert can_i(cluster, verb, resource, "apps") and not can_i(cluster, verb, resource, "elsewhere")
        for verb in ("list", "watch", "patch", "deletecollection"):
            assert not can_i(cluster, verb, resource, "apps"), (verb, resource)
    # The ownership ledger: ConfigMaps in its own namespace only, where tenants have no access.
    for verb in ("get", "list", "create", "update", "delete"):
        assert can_i(cluster, verb, "configmaps", "tio-system"), verb
        assert not can_i(cluster, verb, "configmaps", "elsewhere"), verb
    assert not can_i(cluster, "list", "namespaces") and not can_i(cluster, "list", "customresourcedefinitions")
    # Its own policy: whatever holds it, the operator cannot rewrite or remove it (issue 19).
    kind, name = policy_source(render("watch.namespaces={apps}"))
    cluster.kubectl("get", kind.lower(), name, "-n", "tio-system")
    for verb in ("update", "patch", "delete"):
        assert not can_i(cluster, verb, f"{kind.lower()}s/{name}", "tio-system"), (verb, kind)

    sa_kubeconfig = service_account_kubeconfig(
        cluster, tmp_path / "sa.kubeconfig", "tio-system", "tio-truenas-incus-operator"
    )
    lifecycle_as_service_account(cluster, sa_kubeconfig, tmp_path / "namespaced", ["-n", "apps"], "apps")

    # Cluster-wide: a ClusterRole instead, and the same lifecycle.
    helm("upgrade", "tio", str(CHART), "-n", "tio-system", "--set", "watch.namespaces=null", kubeconfig=kubeconfig)
    assert can_i(cluster, "get", "secrets", "elsewhere") and not can_i(cluster, "list", "secrets", "elsewhere")
    assert not can_i(cluster, "list", "namespaces") and not can_i(cluster, "list", "customresourcedefinitions")
    lifecycle_as_service_account(cluster, sa_kubeconfig, tmp_path / "cluster-wide", ["-A"], "elsewhere")
    # With leader election: its one Lease in the release namespace, nothing else.
    helm("upgrade", "tio", str(CHART), "-n", "tio-system",
         "--set", "watch.namespaces=null", "--set", "leaderElection.enabled=true", kubeconfig=kubeconfig)  # fmt: skip
    assert can_i(cluster, "create", "leases.coordination.k8s.io", "tio-system")
    assert can_i(cluster, "get", "leases.coordination.k8s.io/tio-truenas-incus-operator", "tio-system")
    assert can_i(cluster, "update", "leases.coordination.k8s.io/tio-truenas-incus-operator", "tio-system")
    assert not can_i(cluster, "update", "leases.coordination.k8s.io/someone-elses", "tio-system")
    for verb in ("list", "watch", "delete"):
        assert not can_i(cluster, verb, "leases.coordination.k8s.io", "tio-system"), verb
    assert not can_i(cluster, "create", "leases.coordination.k8s.io", "elsewhere")
    lifecycle_as_service_account(
        cluster, sa_kubeconfig, tmp_path / "elected", ["-A"], "elsewhere",
        {"TIO_LEADER_ELECTION": "true", "TIO_LEASE_NAME": "tio-truenas-incus-operator"},
    )  # fmt: skip
    lease = json.loads(
        cluster.kubectl("get", "lease", "tio-truenas-incus-operator", "-n", "tio-system", "-o", "json").stdout
    )
    assert lease["spec"].get("holderIdentity") is None  # released on the clean stop
    # Uninstalling keeps the CRDs (and so every IncusInstance), and leaves no ledger record: the
    # lifecycles deleted their instances, and each record went with its instance (docs/operations.md).
    helm("uninstall", "tio", "-n", "tio-system", kubeconfig=kubeconfig)
    left = cluster.kubectl(
        "get", "configmaps", "-n", "tio-system", "-l", "incus.truenas.io/ownership=true", "-o", "name"
    )
    assert left.stdout.strip() == "", left.stdout
    crds = json.loads(cluster.kubectl("get", "crd", "-o", "json").stdout)["items"]
    assert {c["metadata"]["name"] for c in crds} >= {
        "incusinstances.incus.truenas.io",
        "truenasconnections.incus.truenas.io",
    }


# ----- the administrator's policy ----------------------------------------------------------------------------
MULTI_TENANT = CHART / "examples" / "multi-tenant.yaml"


def render_files(*files: Path, release: str = "tio") -> list[dict[str, Any]]:
    args = ["template", release, str(CHART), "--namespace", "tio-system", "--kube-version", KUBE_VERSION]
    for path in files:
        args += ["-f", str(path)]
    return [d for d in yaml.safe_load_all(helm(*args).stdout) if d]


def policy_source(documents: list[dict[str, Any]]) -> tuple[str, str]:
    """The kind and name of the object the Deployment mounts the policy from."""
    volume = volumes_of(documents)["policy"]
    if "secret" in volume:
        return "Secret", volume["secret"]["secretName"]
    return "ConfigMap", volume["configMap"]["name"]


def policy_text(documents: list[dict[str, Any]]) -> str:
    kind, name = policy_source(documents)
    (source,) = [d for d in by_kind(documents, kind) if d["metadata"]["name"] == name]
    if kind == "Secret":
        return base64.b64decode(source["data"]["policy.yaml"]).decode()
    text: str = source["data"]["policy.yaml"]
    return text


def test_policy_is_a_secret_mounted_read_only() -> None:
    """A Secret: the operator's ServiceAccount writes ConfigMaps in the release namespace (its ledger),
    never Secrets, so it cannot rewrite its own policy (proven on a real API server above)."""
    documents = render()
    assert policy_source(documents) == ("Secret", "tio-truenas-incus-operator-policy")
    (policy_secret,) = [s for s in by_kind(documents, "Secret") if s["metadata"]["name"].endswith("-policy")]
    assert policy_secret["metadata"]["namespace"] == "tio-system"
    loaded = Policy.model_validate(yaml.safe_load(policy_text(documents)))
    assert loaded == Policy(), "the chart's default is the built-in homelab policy"
    (deployment,) = by_kind(documents, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["TIO_POLICY_FILE"] == "/etc/truenas-incus-operator/policy/policy.yaml"
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert mounts["policy"] == {"name": "policy", "mountPath": "/etc/truenas-incus-operator/policy", "readOnly": True}


def test_the_image_server_caps_and_quotas_of_the_policy_reach_the_operator() -> None:
    """Issue 19: vmImageServers, VM caps and quotas are values the administrator can set."""
    documents = render(
        "policy.rules[0].namespaces={team-*}",
        "policy.rules[0].vmImageServers={https://mirror.example/streams,cache.internal}",
        "policy.rules[0].maxRootDiskSize=100Gi",
        "policy.rules[0].maxMemory=8Gi",
        "policy.rules[0].maxVCPUs=4",
        "policy.quotas[0].namespaces={team-*}",
        "policy.quotas[0].maxConnections=3",
        "policy.quotas[0].maxVMs=10",
        "policy.defaultQuota.maxConnections=1",
    )
    loaded = Policy.model_validate(yaml.safe_load(policy_text(documents)))
    rule = loaded.rules[0]
    assert rule.vm_image_servers == ["https://mirror.example/streams", "cache.internal"]
    assert (rule.max_root_disk_size, rule.max_memory, rule.max_vcpus) == ("100Gi", "8Gi", 4)
    assert (loaded.quotas[0].max_connections, loaded.quotas[0].max_vms) == (3, 10)
    assert loaded.default_quota.max_connections == 1


def test_the_snapshot_rules_of_the_policy_reach_the_operator() -> None:
    """Issue 24 item 5: who may snapshot, restore and clone, the cap and the shortest schedule."""
    documents = render(
        "policy.rules[0].namespaces={team-*}",
        "policy.rules[0].snapshots.restore=false",
        "policy.rules[0].snapshots.maxPerInstance=10",
        "policy.rules[0].snapshots.minScheduleMinutes=60",
        "policy.defaultRule.snapshots.clone=false",
    )
    loaded = Policy.model_validate(yaml.safe_load(policy_text(documents)))
    snapshots = loaded.rules[0].snapshots
    assert (snapshots.snapshot, snapshots.restore, snapshots.clone) == (True, False, True)
    assert (snapshots.max_per_instance, snapshots.min_schedule_minutes) == (10, 60)
    assert loaded.default_rule.snapshots.clone is False
    assert loaded.snapshot_cap("team-a", "<default>") == ("policy.rules[0].snapshots.maxPerInstance", 10)


def snapshot_admission(documents: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [d for d in documents if d["metadata"]["name"].endswith("-snapshot-policy")]


def test_snapshot_admission_only_where_a_rule_forbids_snapshots_or_restores() -> None:
    """Nothing to refuse, nothing rendered: the homelab, caps, schedules and clones (the operator's alone)."""
    assert snapshot_admission(render()) == []
    assert snapshot_admission(render("policy.defaultRule.snapshots.maxPerInstance=5")) == []
    assert snapshot_admission(render("policy.defaultRule.snapshots.minScheduleMinutes=60")) == []
    assert snapshot_admission(render("policy.defaultRule.snapshots.clone=false")) == []
    assert snapshot_admission(render("policy.defaultRule.snapshots.snapshot=true")) == []
    documents = render("policy.rules[0].namespaces={team-*}", "policy.rules[0].snapshots.restore=false")
    vap, binding = snapshot_admission(documents)
    assert (vap["kind"], binding["kind"]) == ("ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding")
    assert binding["spec"]["policyName"] == vap["metadata"]["name"] == "tio-truenas-incus-operator-snapshot-policy"
    assert binding["spec"]["validationActions"] == ["Deny"]
    assert "matchResources" not in binding["spec"]
    (rule,) = vap["spec"]["matchConstraints"]["resourceRules"]
    assert rule["operations"] == ["CREATE"], "both specs are immutable; deleting never waits on the policy"
    assert rule["resources"] == ["incusinstancesnapshots", "incusinstancerestores"]
    (validation,) = vap["spec"]["validations"]
    assert "'incusinstancerestores'" in validation["expression"]
    assert ".snapshots.restore" in validation["messageExpression"]
    # Only the watched namespaces.
    documents = render("policy.defaultRule.snapshots.snapshot=false", "watch.namespaces={apps}")
    _, binding = snapshot_admission(documents)
    assert binding["spec"]["matchResources"]["namespaceSelector"]["matchExpressions"][0]["values"] == ["apps"]
    assert (
        snapshot_admission(render("policy.defaultRule.snapshots.snapshot=false", "policy.admission.enabled=false"))
        == []
    )


def test_changing_the_policy_restarts_the_operator() -> None:
    def checksum(*sets: str) -> str:
        (deployment,) = by_kind(render(*sets), "Deployment")
        value: str = deployment["spec"]["template"]["metadata"]["annotations"]["checksum/policy"]
        return value

    assert checksum() == checksum("resyncSeconds=30")
    assert checksum() != checksum("policy.defaultConnectionNamespaces={home}")


def test_multi_tenant_example_renders_the_policy_and_admission() -> None:
    documents = render_files(MULTI_TENANT)
    loaded = Policy.model_validate(yaml.safe_load(policy_text(documents)))
    assert loaded.default_connection_namespaces == ["infra", "team-*"] and len(loaded.rules) == 2
    assert loaded.snapshot_cap("team-a", "<default>") == ("policy.rules[0].snapshots.maxPerInstance", 10)
    assert loaded.schedule_violation("team-a", "<default>", "*/30 * * * *") is not None
    assert loaded.schedule_violation("team-a", "<default>", "@hourly") is None
    (vap,) = by_kind(documents, "ValidatingAdmissionPolicy")
    messages = [v["message"] for v in vap["spec"]["validations"]]
    fields = ("deviceTypes", "hostPathPrefixes", "nicParents", "addressCIDRs", "storagePools", "proxyPorts")
    for field in (*fields, "instanceNamePrefix", "expose.serviceTypes"):
        assert any(m.startswith(f"policy.rules[0].{field}: ") for m in messages), field
        assert any(m.startswith(f"policy.defaultRule.{field}: ") for m in messages), field
    assert messages[0].startswith("policy.defaultConnectionNamespaces: ")
    (binding,) = by_kind(documents, "ValidatingAdmissionPolicyBinding")
    assert binding["spec"]["policyName"] == vap["metadata"]["name"]
    assert binding["spec"]["validationActions"] == ["Deny"]
    selector = binding["spec"]["matchResources"]["namespaceSelector"]["matchExpressions"][0]
    assert selector["values"] == ["infra", "team-a", "team-b"], "only the watched namespaces"


def test_homelab_admission_only_gates_passthrough_memory_overcommit_and_load_balancers() -> None:
    (vap,) = by_kind(render(), "ValidatingAdmissionPolicy")
    assert [v["message"].split(":")[0] for v in vap["spec"]["validations"]] == [
        "policy.defaultConnectionNamespaces",
        "policy.defaultRule.deviceTypes",
        "policy.defaultRule.expose.serviceTypes",  # a LoadBalancer takes an address of the network: opt-in
        "policy.defaultRule.memoryOvercommit",  # VMs without TrueNAS's memory guarantee: opt-in, as passthrough
    ]
    (binding,) = by_kind(render(), "ValidatingAdmissionPolicyBinding")
    assert "matchResources" not in binding["spec"], "cluster-wide when the operator watches the cluster"


def test_admission_can_be_switched_off() -> None:
    documents = render("policy.admission.enabled=false")
    assert not by_kind(documents, "ValidatingAdmissionPolicy")
    assert not by_kind(documents, "ValidatingAdmissionPolicyBinding")
    assert policy_text(documents), "the operator still enforces the policy"


@pytest.mark.parametrize(
    "values,message",
    [
        (["policy.defaultRule.deviceTypes={FLOPPY}"], "/policy/defaultRule/deviceTypes/0"),
        (["policy.rules[0].hostPathPrefixes={relative}"], "/policy/rules/0/hostPathPrefixes/0"),
        (["policy.rules[0].hostPathPrefixes={/mnt/tank/../etc}"], "/policy/rules/0/hostPathPrefixes/0"),
        (["policy.rules[0].namespaces={team-[ab]}"], "/policy/rules/0/namespaces/0"),
        (["policy.rules[0].proxyPorts[0].from=70000"], "/policy/rules/0/proxyPorts/0/from"),
        (["policy.rules[0].instanceNamePrefix=bad_prefix"], "/policy/rules/0/instanceNamePrefix"),
        (["policy.defaultRule.devices={DISK}"], "additional properties 'devices' not allowed"),
        (["policy.rules[0].vmImageServers={ftp://x/}"], "/policy/rules/0/vmImageServers/0"),
        (["policy.rules[0].maxVCPUs=0"], "/policy/rules/0/maxVCPUs"),
        (["policy.quotas[0].maxConnections=-1"], "/policy/quotas/0/maxConnections"),
        (["policy.rules[0].snapshots.maxPerInstance=-1"], "/policy/rules/0/snapshots/maxPerInstance"),
        (["policy.defaultRule.snapshots.minScheduleMinutes=0"], "/policy/defaultRule/snapshots/minScheduleMinutes"),
        (["policy.defaultRule.snapshots.restore=maybe"], "/policy/defaultRule/snapshots/restore"),
        (["policy.defaultRule.snapshots.delete=false"], "additional properties 'delete' not allowed"),
    ],
)
def test_values_schema_refuses_bad_policies(values: list[str], message: str) -> None:
    args = ["template", "tio", str(CHART), "--kube-version", KUBE_VERSION]
    for item in values:
        args += ["--set", item]
    result = helm(*args, check=False)
    assert result.returncode != 0 and message in result.stderr, result.stderr
