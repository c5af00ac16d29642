"""The administrator's snapshot policy, as the operator enforces it (admission may be off or bypassed):
a namespace that may neither snapshot nor restore is refused with PolicyDenied naming the rule, and
the cap on snapshots per instance refuses the one past it; nothing reaches TrueNAS for a refusal."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from .conftest import Cluster, module_prefix
from .harness import ADOPT_ANYWHERE, Harness, module_operator
from .test_snapshots_e2e import apply, clone_spec, make_instance, wait_phase, writes

pytestmark = pytest.mark.e2e  # needs the local control plane (kube-apiserver + etcd)

POLICY: dict[str, Any] = {
    **ADOPT_ANYWHERE,
    "rules": [
        {"namespaces": ["*-ro-*"], "connections": ["*"], "snapshots": {"snapshot": False, "restore": False}},
        {"namespaces": ["*-nc-*"], "connections": ["*"], "snapshots": {"clone": False}},
    ],
    "defaultRule": {"snapshots": {"maxPerInstance": 1}},
}


@pytest.fixture(scope="module")
def harness(
    cluster: Cluster, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[Harness]:
    prefix = module_prefix(request)
    for running in module_operator(cluster, tmp_path_factory.mktemp("snappolicy"), prefix, "25.10", policy=POLICY):
        running.prefix = prefix  # type: ignore[attr-defined]
        yield running


def namespace(harness: Harness, cluster: Cluster, middle: str) -> str:
    name = f"{harness.prefix}{middle}{uuid.uuid4().hex[:6]}"  # type: ignore[attr-defined]
    cluster.kubectl("create", "namespace", name)
    return name


def ready_reason(found: dict[str, Any]) -> tuple[str, str]:
    (ready,) = [c for c in found["conditions"] if c["type"] == "Ready"]
    return str(ready["reason"]), str(ready["message"])


def test_a_namespace_the_policy_forbids_may_neither_snapshot_nor_restore(harness: Harness, cluster: Cluster) -> None:
    ns = namespace(harness, cluster, "x-ro-")
    name = make_instance(harness, ns, "CONTAINER")
    apply(harness, ns, "IncusInstanceSnapshot", "no", {"instanceRef": {"name": name}})
    reason, message = ready_reason(wait_phase(harness, ns, "incusinstancesnapshots", "no", "Failed"))
    assert reason == "PolicyDenied" and message.startswith(
        "policy.rules[0].snapshots.snapshot: kind IncusInstanceSnapshot"
    )
    apply(harness, ns, "IncusInstanceRestore", "no", {"instanceRef": {"name": name}, "truenasSnapshot": "any"})
    reason, message = ready_reason(wait_phase(harness, ns, "incusinstancerestores", "no", "Failed"))
    assert reason == "PolicyDenied" and message.startswith(
        "policy.rules[0].snapshots.restore: kind IncusInstanceRestore"
    )
    assert not any(m.endswith(("snapshot.create", "snapshot.rollback", ".stop")) for m, _ in writes(harness, name))
    harness.delete(ns, name)


def test_the_cap_refuses_the_snapshot_past_it(harness: Harness, cluster: Cluster) -> None:
    ns = namespace(harness, cluster, "open-")
    name = make_instance(harness, ns, "CONTAINER")
    apply(harness, ns, "IncusInstanceSnapshot", "first", {"instanceRef": {"name": name}})
    wait_phase(harness, ns, "incusinstancesnapshots", "first", "Ready")
    apply(harness, ns, "IncusInstanceSnapshot", "second", {"instanceRef": {"name": name}})
    reason, message = ready_reason(wait_phase(harness, ns, "incusinstancesnapshots", "second", "Failed"))
    assert reason == "PolicyDenied" and message.startswith("policy.defaultRule.snapshots.maxPerInstance:"), message
    assert "the most the policy allows (1)" in message
    creates = [m for m, _ in writes(harness, name) if m.endswith("snapshot.create")]
    assert len(creates) == 1
    harness.delete(ns, name)


def test_the_policy_holds_over_a_rest_connection_too(harness: Harness, cluster: Cluster) -> None:
    """A REST TrueNASConnection (25.x) takes snapshots over restful.py's routes: the policy refuses
    before any of them, as over JSON-RPC."""
    ns = namespace(harness, cluster, "x-ro-rest-")
    harness.connect_namespace(ns, harness.sim, transport="rest")
    name = make_instance(harness, ns, "CONTAINER", {"connectionRef": {"name": "nas"}})
    apply(harness, ns, "IncusInstanceSnapshot", "over-rest", {"instanceRef": {"name": name}})
    reason, message = ready_reason(wait_phase(harness, ns, "incusinstancesnapshots", "over-rest", "Failed"))
    assert reason == "PolicyDenied" and message.startswith("policy.rules[0].snapshots.snapshot:"), message
    assert not any(m.endswith("snapshot.create") for m, _ in writes(harness, name))
    harness.delete(ns, name)


def test_a_namespace_the_policy_forbids_to_clone_makes_no_clone(harness: Harness, cluster: Cluster) -> None:
    ns = namespace(harness, cluster, "x-nc-")
    name = make_instance(harness, ns, "VM")
    apply(harness, ns, "IncusInstanceSnapshot", "gold", {"instanceRef": {"name": name}})
    wait_phase(harness, ns, "incusinstancesnapshots", "gold", "Ready")  # snapshots stay allowed
    apply(harness, ns, "IncusInstance", "copy", clone_spec("gold"))
    refused = harness.wait_synced_false(ns, "copy", "PolicyDenied", timeout=60)
    message = next(c["message"] for c in refused["conditions"] if c["type"] == "Synced")
    assert message.startswith("policy.rules[1].snapshots.clone: spec.source.snapshotRef: "), message
    assert "copy" not in harness.instance_names() and not writes(harness, "copy")
    for resource in ("copy", name):
        assert harness.delete(ns, resource).returncode == 0
