"""The policy's image-server allow-list, VM caps and connection quota (issue 19 items 2, 4, 8), pure."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.fakes import FakeKube, fake_operator, resource
from truenas_incus_operator.connections import Connection
from truenas_incus_operator.connections.config import ConnectionConfig
from truenas_incus_operator.connections.manager import ConnectionManager
from truenas_incus_operator.connections.resources import ConnectionResources
from truenas_incus_operator.instances.resource import LoopState
from truenas_incus_operator.models import IncusInstanceSpec
from truenas_incus_operator.policy import Policy, PolicyError, load_policy
from truenas_incus_operator.settings import Settings
from truenas_incus_operator.truenas import Secret

NS = "team-a"
TNC = f"{NS}/nas"
OWN = "https://images.example.org/"


def policy(**rule: Any) -> Policy:
    return Policy.model_validate({"rules": [{"namespaces": ["team-*"], **rule}]})


def vm(**fields: Any) -> IncusInstanceSpec:
    return IncusInstanceSpec.model_validate({"type": "VM", "image": "debian/bookworm", **fields})


# ----- vmImageServers ------------------------------------------------------------------------------------
@pytest.mark.parametrize("named", [None, OWN, "https://images.example.org"])
def test_by_default_only_the_operators_own_image_server_is_allowed(named: str | None) -> None:
    decision = Policy().image_server(NS, TNC, named, OWN)
    assert decision.violation is None and decision.trusted and decision.url == OWN.rstrip("/") + "/"


@pytest.mark.parametrize(
    "named",
    [
        "https://bob.example/",
        "http://10.0.0.5/",
        "/tmp/bob",
        "file:///var/run/secrets",
        "https://images.example.org.bob.example/",
    ],
)
def test_by_default_a_tenant_names_no_other_server_and_no_local_path(named: str) -> None:
    decision = Policy().image_server(NS, TNC, named, OWN)
    assert decision.violation is not None
    assert decision.violation.field == "spec.vmImageServer"
    assert decision.violation.rule == "policy.defaultRule.vmImageServers"
    assert "the operator's own" in decision.violation.message and OWN not in decision.violation.message


def test_an_allow_listed_url_prefix_or_host_is_trusted_and_a_star_allows_public_https_only() -> None:
    rules = policy(vmImageServers=["https://mirror.team-a.internal/simplestreams", "cache.internal", "*"])
    prefix = rules.image_server(NS, TNC, "https://mirror.team-a.internal/simplestreams/v2", OWN)
    assert prefix.violation is None and prefix.trusted
    host = rules.image_server(NS, TNC, "https://cache.internal:443/x/", OWN)
    assert host.violation is None and host.trusted
    anywhere = rules.image_server(NS, TNC, "https://images.linuxcontainers.org/", OWN)
    assert anywhere.violation is None and not anywhere.trusted  # public addresses only, checked on connect
    # Components, not characters: the prefix does not cover a sibling path.
    sibling = rules.image_server(NS, TNC, "https://mirror.team-a.internal/simplestreams-bob/", OWN)
    assert sibling.violation is None and not sibling.trusted  # only through '*'
    for dotted in (
        "https://mirror.team-a.internal/simplestreams/../private",
        "https://mirror.team-a.internal/simplestreams/%2e%2e/x",
    ):
        escaped = rules.image_server(NS, TNC, dotted, OWN)
        assert escaped.violation is None and not escaped.trusted, dotted  # not under the prefix: only through '*'
    plain = rules.image_server(NS, TNC, "http://images.linuxcontainers.org/", OWN)
    assert plain.violation is not None and "https" in plain.violation.message


def test_a_local_mirror_only_where_the_administrator_lists_it() -> None:
    rules = policy(vmImageServers=["file:///srv/mirror"])
    assert rules.image_server(NS, TNC, "file:///srv/mirror", OWN).violation is None
    assert rules.image_server(NS, TNC, "/srv/mirror", OWN).violation is None
    for other in ("/srv/mirror/../../etc", "/srv/mirror2", "file:///srv/mirror/sub"):
        assert rules.image_server(NS, TNC, other, OWN).violation is not None, other


@pytest.mark.parametrize("entry", ["ftp://x/", "https://", "https://a/../b", "file://relative", "white space"])
def test_a_bad_allow_list_entry_stops_the_policy(entry: str, tmp_path: Any) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(f"defaultRule:\n  vmImageServers: [{entry!r}]\n")
    with pytest.raises(PolicyError, match="vmImageServers"):
        load_policy(path)


# ----- VM caps ---------------------------------------------------------------------------------------------
def test_vm_caps_refuse_root_disk_memory_and_vcpus_above_them() -> None:
    rules = policy(maxRootDiskSize="100Gi", maxMemory="8Gi", maxVCPUs=4)
    assert rules.violations(NS, TNC, vm(rootDiskSize="100Gi", memory="8Gi", cpu="4")) == []
    found = {v.field: v for v in rules.violations(NS, TNC, vm(rootDiskSize="1Pi", memory="9Gi", cpu="0-7"))}
    assert set(found) == {"spec.rootDiskSize", "spec.memory", "spec.cpu"}
    assert found["spec.rootDiskSize"].rule == "policy.rules[0].maxRootDiskSize"
    assert "1Pi" in found["spec.rootDiskSize"].message and "100Gi" in found["spec.rootDiskSize"].message
    assert "8 CPUs" in found["spec.cpu"].message


def test_caps_also_bound_an_omitted_memory_or_cpu_by_the_vm_defaults() -> None:
    """A VM without memory gets 1 GiB and one vCPU: within any cap of at least that."""
    rules = policy(maxMemory="512Mi")
    assert [v.field for v in rules.violations(NS, TNC, vm())] == ["spec.memory"]


# ----- quotas ---------------------------------------------------------------------------------------------
def test_connection_and_vm_quotas_per_namespace() -> None:
    rules = Policy.model_validate(
        {"quotas": [{"namespaces": ["team-*"], "maxConnections": 2, "maxVMs": 3}], "defaultQuota": {}}
    )
    assert rules.quota_for(NS) == ("policy.quotas[0]", rules.quotas[0])
    assert rules.quota_for("other")[1].max_connections is None
    assert Policy().quota_for(NS)[1].max_connections == 16  # the default bounds every namespace


async def test_a_namespace_over_its_connection_quota_gets_no_further_connection() -> None:
    """Finding 4 of issue 19: 600 TrueNASConnections in one namespace, 600 clients and WebSockets."""
    kube = FakeKube()
    manager = ConnectionManager(30.0, 300.0)
    quota = Policy.model_validate({"quotas": [{"namespaces": [NS], "maxConnections": 2}]})
    resources = ConnectionResources(Settings.model_construct(ledger_namespace="ops"), kube, manager, quota)
    for name in ("one", "two", "elsewhere"):
        key = f"{NS}/{name}" if name != "elsewhere" else "team-b/one"
        config = ConnectionConfig(url="wss://nas.invalid", api_key=Secret("1-x"))
        manager.connections[key] = Connection(key, config, resync_seconds=30)
    body = {
        "metadata": {"namespace": NS, "name": "three", "generation": 1},
        "spec": {"url": "wss://nas.invalid", "apiKeySecretRef": {"name": "key", "key": "apiKey"}},
    }
    await resources.sync(body)
    assert f"{NS}/three" not in manager.connections
    problem = manager.problems[f"{NS}/three"]
    assert problem.reason == "QuotaExceeded" and "policy.quotas[0].maxConnections" in problem.message
    ready = [p.body["conditions"] for p in kube.patches][-1]
    assert any(c["type"] == "Ready" and c["reason"] == "QuotaExceeded" for c in ready)


async def test_a_namespace_at_its_vm_quota_gets_no_further_vm_but_keeps_its_own(tmp_path: Path) -> None:
    """Item 8 of issue 19: the policy had no VM limits. maxVMs: 2; a third VM is refused before any
    TrueNAS call; the first two keep being reconciled; containers do not count."""
    path = tmp_path / "policy.yaml"
    path.write_text("quotas:\n  - namespaces: [team-*]\n    maxVMs: 2\n")
    fake = fake_operator(policy_file=path)
    vms = [resource(f"vm{i}", namespace=NS, type="VM") for i in range(3)]
    for body in [*vms[:2], resource("box", namespace=NS)]:
        await fake.operator.loops.reconcile_once(body, LoopState(status={}), lambda: None)
    assert {"create vm0", "create vm1", "create box"} <= set(fake.backend.calls)
    fake.backend.calls.clear()
    await fake.operator.loops.reconcile_once(vms[2], LoopState(status={}), lambda: None)
    assert fake.backend.calls == []
    last = fake.kube.statuses("vm2")[-1]
    synced = next(c for c in last["conditions"] if c["type"] == "Synced")
    assert synced["reason"] == "PolicyDenied" and synced["message"].startswith("policy.quotas[0].maxVMs: spec.type")
    # The first two are still theirs, and another namespace has its own count.
    await fake.operator.loops.reconcile_once(vms[0], LoopState(status={}), lambda: None)
    elsewhere = resource("vm9", namespace="team-b", type="VM")
    await fake.operator.loops.reconcile_once(elsewhere, LoopState(status={}), lambda: None)
    assert "create vm9" in fake.backend.calls
    assert not any(c["reason"] == "PolicyDenied" for c in fake.kube.statuses("vm0")[-1]["conditions"])
