"""The administrator's policy on a real API server: the chart's ValidatingAdmissionPolicy refuses a
tenant's IncusInstance with the rule named, and the operator (with admission off) reports
PolicyDenied in status without a single write to TrueNAS."""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from truenas_simulator.state import CallCounters

from .conftest import Cluster, module_prefix
from .harness import Harness, OperatorProcess, operator_env, start_simulator, unique
from .test_chart import CHART, KUBE_VERSION, MULTI_TENANT, helm

pytestmark = pytest.mark.e2e  # needs the local control plane (kube-apiserver + etcd, helm)

TENANT = "alice"


def manifest(name: str, /, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "incus.truenas.io/v1alpha1",
        "kind": "IncusInstance",
        "metadata": {"name": name},
        "spec": {"type": "CONTAINER", "image": "debian/bookworm", **spec},
    }


def as_tenant(cluster: Cluster, document: dict[str, Any], namespace: str) -> subprocess.CompletedProcess[str]:
    return cluster.kubectl(
        "apply", "-n", namespace, f"--as={TENANT}", "-f", "-", input=json.dumps(document), check=False
    )


@pytest.fixture(scope="module")
def tenancy(cluster: Cluster) -> Iterator[tuple[str, str]]:
    """Two namespaces where the tenant may manage IncusInstances (a team's, and one outside every rule),
    and the chart's multi-tenant admission policy bound to exactly these two."""
    suffix = uuid.uuid4().hex[:6]
    team, outsider = f"team-{suffix}", f"outsider-{suffix}"
    release = f"pol-{suffix}"
    for ns in (team, outsider):
        cluster.kubectl("create", "namespace", ns)
        cluster.kubectl(
            "create", "role", "instances", "-n", ns, "--verb=get,list,watch,create,update,patch,delete",
            "--resource=incusinstances.incus.truenas.io,truenasconnections.incus.truenas.io",
        )  # fmt: skip
        cluster.kubectl("create", "rolebinding", "instances", "-n", ns, "--role=instances", f"--user={TENANT}")
    # An instance created before the policy existed, outside what the policy now allows.
    legacy = manifest(f"{team}-legacy", devices=[{"name": "gpu0", "type": "GPU"}], storagePool="tenants")
    assert as_tenant(cluster, legacy, team).returncode == 0
    rendered = helm(
        "template", release, str(CHART), "-n", "tio-system", "--kube-version", KUBE_VERSION, "-f", str(MULTI_TENANT),
        "--set", f"watch.namespaces={{{team},{outsider}}}", "--show-only", "templates/admission-policy.yaml",
        "--set", "policy.rules[0].maxMemory=4Gi", "--set", "policy.rules[0].maxVCPUs=4",
        "--set", "policy.rules[0].maxRootDiskSize=53687091200",
    ).stdout  # fmt: skip
    documents = [d for d in yaml.safe_load_all(rendered) if d]
    assert [d["kind"] for d in documents] == ["ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"]
    installed = cluster.kubectl("apply", "-f", "-", input=rendered, check=False)
    assert installed.returncode == 0, installed.stderr
    # The API server compiles and starts enforcing a new policy asynchronously.
    probe = manifest(f"{team}-probe", devices=[{"name": "gpu0", "type": "GPU"}], storagePool="tenants")
    deadline = time.monotonic() + 30
    while as_tenant(cluster, probe, team).returncode == 0:
        cluster.kubectl("delete", "incusinstance", probe["metadata"]["name"], "-n", team, "--wait=false")
        assert time.monotonic() < deadline, "the admission policy never took effect"
        time.sleep(0.5)
    vap = json.loads(
        cluster.kubectl(
            "get", "validatingadmissionpolicy", f"{release}-truenas-incus-operator-policy", "-o", "json"
        ).stdout
    )
    assert not vap.get("status", {}).get("typeChecking", {}).get("expressionWarnings"), vap["status"]
    try:
        yield team, outsider
    finally:
        cluster.kubectl("delete", "-f", "-", input=rendered, check=False)


TEAM_OK: dict[str, Any] = {
    "storagePool": "tenants",
    "memory": "1Gi",  # within the rule's VM caps (maxMemory 4Gi, maxVCPUs 4)
    "cpu": "2",
    "devices": [
        {"name": "data", "type": "DISK", "source": "/mnt/tank/tenants/{ns}/data", "destination": "/srv/data"},
        {
            "name": "http",
            "type": "PROXY",
            "extra": {"source_proto": "TCP", "source_port": 20080, "dest_proto": "TCP", "dest_port": 80},
        },
        {
            "name": "alt",
            "type": "PROXY",
            "extra": {"source_proto": "TCP", "source_port": "20443", "dest_proto": "TCP", "dest_port": 443},
        },
    ],
    "nics": [{"name": "eth1", "type": "bridged", "parent": "br-tenants"}, {"name": "eth2"}],
    "expose": {"ports": [{"name": "http", "port": 80}, {"name": "app", "port": 8080}]},
}


def team_spec(namespace: str, **changes: Any) -> dict[str, Any]:
    spec: dict[str, Any] = json.loads(json.dumps(TEAM_OK).replace("{ns}", namespace))
    spec.update(changes)
    return spec


# (case, changes to the allowed team spec, the rule the refusal names)
REFUSALS: list[tuple[str, dict[str, Any], str]] = [
    ("gpu", {"devices": [{"name": "gpu0", "type": "GPU"}]}, "policy.rules[0].deviceTypes"),
    ("usb", {"devices": [{"name": "usb0", "type": "USB"}]}, "policy.rules[0].deviceTypes"),
    ("tpm", {"devices": [{"name": "tpm0", "type": "TPM"}]}, "policy.rules[0].deviceTypes"),
    ("other-tenant-path", {"devices": [{"name": "d", "type": "DISK", "source": "/mnt/tank/tenants/team-zzz", "destination": "/d"}]}, "policy.rules[0].hostPathPrefixes"),
    ("traversal", {"devices": [{"name": "d", "type": "DISK", "source": "/mnt/tank/tenants/{ns}/../team-zzz", "destination": "/d"}]}, "policy.rules[0].hostPathPrefixes"),
    ("sibling-prefix", {"devices": [{"name": "d", "type": "DISK", "source": "/mnt/tank/tenants/{ns}x", "destination": "/d"}]}, "policy.rules[0].hostPathPrefixes"),
    ("pool-root", {"devices": [{"name": "d", "type": "DISK", "source": "/mnt/tank", "destination": "/d"}]}, "policy.rules[0].hostPathPrefixes"),
    ("nic-parent", {"nics": [{"name": "eth1", "parent": "br0"}]}, "policy.rules[0].nicParents"),
    ("pool", {"storagePool": "fast"}, "policy.rules[0].storagePools"),
    ("own-network-config", {"type": "VM", "devices": [], "nics": [], "cloudInit": {"networkConfig": "version: 2\n"}}, "policy.rules[0].addressCIDRs"),
    ("foreign-address", {"type": "VM", "devices": [], "nics": [{"name": "eth1", "parent": "br-tenants", "hwaddr": "10:66:6a:01:02:03", "addresses": ["192.168.1.10/24"]}]}, "policy.rules[0].addressCIDRs"),
    ("proxy-port", {"devices": [{"name": "ssh", "type": "PROXY", "extra": {"source_proto": "TCP", "source_port": 22, "dest_proto": "TCP", "dest_port": 22}}]}, "policy.rules[0].proxyPorts"),
    ("proxy-port-string", {"devices": [{"name": "ssh", "type": "PROXY", "extra": {"source_proto": "TCP", "source_port": "21000", "dest_proto": "TCP", "dest_port": 22}}]}, "policy.rules[0].proxyPorts"),
    ("proxy-no-port", {"devices": [{"name": "p", "type": "PROXY", "extra": {"source_proto": "TCP"}}]}, "policy.rules[0].proxyPorts"),
    ("name-squat", {"name": "web"}, "policy.rules[0].instanceNamePrefix"),
    ("memory-cap", {"memory": "8Gi"}, "policy.rules[0].maxMemory"),
    ("memory-cap-bytes", {"memory": 8 * 2**30}, "policy.rules[0].maxMemory"),
    ("cpu-cap", {"cpu": "8"}, "policy.rules[0].maxVCPUs"),
    ("root-disk-cap", {"type": "VM", "devices": [], "nics": [], "rootDiskSize": "100Gi"}, "policy.rules[0].maxRootDiskSize"),
    ("load-balancer", {"expose": {"type": "LoadBalancer", "ports": [{"port": 80}]}}, "policy.rules[0].expose.serviceTypes"),
    ("node-port", {"expose": {"type": "NodePort", "ports": [{"port": 80}]}}, "policy.rules[0].expose.serviceTypes"),
    ("expose-port", {"expose": {"ports": [{"port": 5432}]}}, "policy.rules[0].expose.ports"),
    ("expose-annotation", {"expose": {"ports": [{"port": 80}], "annotations": {"tailscale.com/expose": "true"}}}, "policy.rules[0].expose.annotationKeys"),
    ("memory-overcommit", {"type": "VM", "devices": [], "nics": [], "memory": 2**30, "memoryOvercommit": True}, "policy.rules[0].memoryOvercommit"),
]  # fmt: skip


@pytest.mark.parametrize("case,changes,rule", REFUSALS, ids=[c[0] for c in REFUSALS])
def test_tenant_is_refused_at_admission_with_the_rule_named(
    cluster: Cluster, tenancy: tuple[str, str], case: str, changes: dict[str, Any], rule: str
) -> None:
    team, _ = tenancy
    changes = json.loads(json.dumps(changes).replace("{ns}", team))
    result = as_tenant(cluster, manifest(f"{team}-{case}", **team_spec(team, **changes)), team)
    assert result.returncode != 0, f"{case} was admitted"
    assert "ValidatingAdmissionPolicy" in result.stderr and f"{rule}: " in result.stderr, result.stderr
    assert cluster.kubectl("get", "incusinstance", f"{team}-{case}", "-n", team, check=False).returncode != 0


def test_tenant_within_the_rules_is_admitted(cluster: Cluster, tenancy: tuple[str, str]) -> None:
    team, _ = tenancy
    name = f"{team}-web"
    result = as_tenant(cluster, manifest(name, **team_spec(team)), team)
    assert result.returncode == 0, result.stderr
    # Named through spec.name instead of metadata.name: the prefix applies to the instance name.
    result = as_tenant(cluster, manifest("db", **team_spec(team, name=f"{team}-db")), team)
    assert result.returncode == 0, result.stderr
    # A VM within the caps, and a CPU set (counted by the operator, not at admission: never stricter).
    vm = team_spec(team, type="VM", devices=[], nics=[], rootDiskSize="20Gi", memory=2**30)
    result = as_tenant(cluster, manifest(f"{team}-vm", **vm), team)
    assert result.returncode == 0, result.stderr
    result = as_tenant(cluster, manifest(f"{team}-set", **team_spec(team, cpu="0-7")), team)
    assert result.returncode == 0, result.stderr
    # Changing it to something the policy refuses is refused as well.
    bad = team_spec(team, nics=[{"name": "eth1", "parent": "enp1s0"}])
    result = as_tenant(cluster, manifest(name, **bad), team)
    assert result.returncode != 0 and "policy.rules[0].nicParents: " in result.stderr, result.stderr


def test_default_connection_is_refused_outside_the_allowed_namespaces(
    cluster: Cluster, tenancy: tuple[str, str]
) -> None:
    _, outsider = tenancy
    result = as_tenant(cluster, manifest(f"{outsider}-web"), outsider)
    assert result.returncode != 0 and "policy.defaultConnectionNamespaces: " in result.stderr, result.stderr
    # Through a TrueNASConnection of its own, the defaultRule applies: no host resources, name prefix.
    via = {"connectionRef": {"name": "nas"}}
    result = as_tenant(cluster, manifest(f"{outsider}-web", **via), outsider)
    assert result.returncode == 0, result.stderr
    disk = {"name": "d", "type": "DISK", "source": "/mnt/tank/x", "destination": "/d"}
    result = as_tenant(cluster, manifest(f"{outsider}-disk", devices=[disk], **via), outsider)
    assert result.returncode != 0 and "policy.defaultRule.deviceTypes: " in result.stderr, result.stderr
    # serviceTypes: [] there: no Service at all, whatever its type.
    exposed = manifest(f"{outsider}-svc", expose={"ports": [{"port": 80}]}, **via)
    result = as_tenant(cluster, exposed, outsider)
    assert result.returncode != 0 and "policy.defaultRule.expose.serviceTypes: " in result.stderr, result.stderr
    assert "none: this rule refuses spec.expose" in result.stderr


def test_a_resource_from_before_the_policy_can_still_be_annotated_and_deleted(
    cluster: Cluster, tenancy: tuple[str, str]
) -> None:
    """The operator's metadata patches (finalizer, ownership) and deletion never wait on a tightened policy;
    only a new spec is judged."""
    team, _ = tenancy
    name = f"{team}-legacy"
    annotated = cluster.kubectl("annotate", "incusinstance", name, "-n", team, "example.org/touched=yes", check=False)
    assert annotated.returncode == 0, annotated.stderr
    patched = cluster.kubectl(
        "patch",
        "incusinstance",
        name,
        "-n",
        team,
        "--type=merge",
        "-p",
        json.dumps({"spec": {"cpu": "2"}}),
        check=False,
    )
    assert patched.returncode != 0 and "policy.rules[0].deviceTypes: " in patched.stderr, patched.stderr
    deleted = cluster.kubectl("delete", "incusinstance", name, "-n", team, f"--as={TENANT}", check=False)
    assert deleted.returncode == 0, deleted.stderr


# ----- the operator, with admission off ---------------------------------------------------------------------
OPERATOR_POLICY = """
adoption: []
rules:
  - namespaces: ["{prefix}*"]
    hostPathPrefixes: ["/mnt/tank/tenants/{{namespace}}"]
    instanceNamePrefix: "{prefix}"
"""


@pytest.fixture(scope="module")
def harness(
    cluster: Cluster, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[Harness]:
    workdir = tmp_path_factory.mktemp("policy-operator")
    prefix = module_prefix(request)
    policy_file = workdir / "policy.yaml"
    policy_file.write_text(OPERATOR_POLICY.format(prefix=prefix))
    sim = start_simulator("25.10", job_duration=0.05)
    env = operator_env(sim, workdir, TIO_POLICY_FILE=str(policy_file))
    operator = OperatorProcess(cluster, env, workdir / "operator.log", args=["-n", f"{prefix}*"]).start()
    try:
        yield Harness(cluster, sim, operator, workdir)
    finally:
        operator.stop()
        sim.stop()


def writes(harness: Harness) -> dict[str, int]:
    return {m: n for m, n in harness.calls().items() if CallCounters.is_write(m)}


def test_operator_reports_policy_denied_and_never_writes_to_truenas(harness: Harness, namespace: str) -> None:
    prefix = namespace.split("--")[0] + "--"
    name = unique(f"{prefix}web")
    before = writes(harness)
    bad = {"name": "data", "type": "DISK", "source": f"/mnt/tank/tenants/{namespace}/../other", "destination": "/d"}
    harness.apply(namespace, name, {"devices": [bad]})
    status = harness.wait_synced_false(namespace, name, "PolicyDenied")
    synced = next(c for c in status["conditions"] if c["type"] == "Synced")
    assert synced["message"].startswith("policy.rules[0].hostPathPrefixes: spec.devices[data].source: "), synced
    assert "'..'" in synced["message"]
    harness.wait_event(namespace, name, "PolicyDenied")
    # Another resync or two: still nothing written.
    time.sleep(5)
    assert writes(harness) == before, "a policy denial must not reach TrueNAS"
    assert name not in harness.instance_names()
    # The same resource within the policy is created: the refusal was the policy's.
    good = dict(bad, source=f"/mnt/tank/tenants/{namespace}/data")
    harness.apply(namespace, name, {"devices": [good]})
    harness.wait_ready(namespace, name, timeout=60)
    assert name in harness.instance_names()
    assert harness.delete(namespace, name).returncode == 0


def test_operator_refuses_a_squatted_name(harness: Harness, namespace: str) -> None:
    name = unique("web")
    before = writes(harness)
    harness.apply(namespace, name, {})
    status = harness.wait_synced_false(namespace, name, "PolicyDenied")
    synced = next(c for c in status["conditions"] if c["type"] == "Synced")
    assert synced["message"].startswith("policy.rules[0].instanceNamePrefix: metadata.name: "), synced
    assert writes(harness) == before and name not in harness.instance_names()
    # Deleting a refused resource deletes nothing on TrueNAS either.
    assert harness.delete(namespace, name).returncode == 0
    assert writes(harness) == before


def test_operator_refuses_to_start_with_a_bad_policy(cluster: Cluster, tmp_path: Path) -> None:
    policy_file = tmp_path / "policy.yaml"
    policy_file.write_text("rules: [{deviceTypes: [FLOPPY]}]")
    sim = start_simulator("25.10")
    try:
        env = operator_env(sim, tmp_path, TIO_POLICY_FILE=str(policy_file))
        operator = OperatorProcess(cluster, env, tmp_path / "operator.log").start()
        assert operator.process is not None
        assert operator.process.wait(timeout=60) == 2
        assert "refusing to start" in operator.logs() and "rules.0.deviceTypes.0" in operator.logs()
        assert writes(Harness(cluster, sim, operator, tmp_path)) == {}
    finally:
        sim.stop()
