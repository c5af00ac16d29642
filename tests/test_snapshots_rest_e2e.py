"""Snapshots and restores through a REST v2.0 TrueNASConnection (TrueNAS 25.x, containers: REST has
no ``vm.*``), against the real API server and the simulator's REST facade: the same calls as over
JSON-RPC, over restful.py's routes (a snapshot's id percent-encoded into ``id/{id_}``, rollback's body
keyed by parameter name), proven to have gone over REST by the simulator's per-transport count."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from .conftest import Cluster, module_prefix
from .harness import Harness, module_operator
from .test_snapshots_e2e import (
    ROLLBACKS,
    apply,
    content,
    kubectl_wait_ready,
    make_instance,
    status,
    wait_phase,
    write,
    writes,
    zfs_snapshots,
)

pytestmark = pytest.mark.e2e  # needs the local control plane (kube-apiserver + etcd)

PROFILES = ["25.04.0", "25.04.2", "25.10"]
"""Every version that serves REST (26 removed it)."""


@pytest.fixture(scope="module", params=PROFILES)
def harness(
    cluster: Cluster, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[Harness]:
    profile = str(request.param)
    prefix = f"{module_prefix(request)}{profile.replace('.', '')}-"
    for running in module_operator(cluster, tmp_path_factory.mktemp(f"restsnap{profile}"), prefix, profile):
        running.prefix = prefix  # type: ignore[attr-defined]
        yield running


@pytest.fixture
def ns(harness: Harness) -> str:
    """A fresh namespace with its own TrueNASConnection ``nas`` over REST."""
    name = f"{harness.prefix}{uuid.uuid4().hex[:8]}"  # type: ignore[attr-defined]
    harness.cluster.kubectl("create", "namespace", name)
    harness.connect_namespace(name, harness.sim, transport="rest")
    return name


def over_rest(harness: Harness) -> dict[str, int]:
    return dict(harness.sim.run(lambda: dict(harness.sim.sim.counters.over_rest)))


def test_a_container_is_snapshotted_restored_and_its_snapshot_deleted_over_rest(harness: Harness, ns: str) -> None:
    namespace = harness.sim.run(lambda: harness.sim.sim.profile.snapshot_namespace)
    name = make_instance(harness, ns, "CONTAINER", {"connectionRef": {"name": "nas"}})
    apply(harness, ns, "IncusInstanceSnapshot", "before", {"instanceRef": {"name": name}})
    kubectl_wait_ready(harness, ns, "incusinstancesnapshot", "before")
    taken = status(harness, ns, "incusinstancesnapshots", "before")
    root = taken["datasets"][0]
    assert root.endswith(f"/containers/{name}") and f"{root}@{taken['snapshotName']}" in zfs_snapshots(harness)
    saved = content(harness, root)

    write(harness, root, "written after the snapshot")
    apply(
        harness, ns, "IncusInstanceRestore", "undo", {"instanceRef": {"name": name}, "snapshotRef": {"name": "before"}}
    )
    kubectl_wait_ready(harness, ns, "incusinstancerestore", "undo", timeout=120)
    done = status(harness, ns, "incusinstancerestores", "undo")
    assert done["phase"] == "Succeeded" and done["wasRunning"] and content(harness, root) == saved
    assert harness.sim.run(lambda: list(harness.sim.sim.storage.changed_under)) == []
    log = writes(harness, name)
    rollback = max(i for i, (method, _) in enumerate(log) if method in ROLLBACKS)
    assert any(m == "virt.instance.stop" for m, _ in log[:rollback]), log
    assert any(m == "virt.instance.start" for m, _ in log[rollback:]), log

    assert (
        harness.cluster.kubectl("delete", "incusinstancesnapshot", "before", "-n", ns, "--timeout=60s").returncode == 0
    )
    assert f"{root}@{taken['snapshotName']}" not in zfs_snapshots(harness)
    rest = over_rest(harness)
    for verb in ("create", "query", "rollback", "delete"):
        assert rest.get(f"{namespace}.{verb}", 0) >= 1, (verb, rest)
    assert harness.delete(ns, name).returncode == 0
    assert name not in harness.instance_names()


def test_a_schedule_over_rest_is_reported_as_25_x_refuses_it_and_a_clone_says_why(harness: Harness, ns: str) -> None:
    """25.x offers no periodic task on a container's dataset (over either transport), and no API clones
    a container: both are said in the status, once, as over JSON-RPC."""
    name = make_instance(
        harness, ns, "CONTAINER", {"connectionRef": {"name": "nas"}, "snapshots": {"schedule": "0 * * * *", "keep": 3}}
    )
    found = harness.wait_status(ns, name, "the refusal reported", lambda s: "snapshotSchedule" in s, timeout=90)
    synced = next(c for c in found["conditions"] if c["type"] == "Synced")
    assert (synced["status"], synced["reason"]) == ("True", "PartiallyApplied"), synced
    assert "Dataset not found" in synced["message"] and "taskId" not in found["snapshotSchedule"], synced
    assert over_rest(harness).get("pool.snapshottask.create", 0) >= 1

    apply(harness, ns, "IncusInstanceSnapshot", "gold", {"instanceRef": {"name": name}})
    wait_phase(harness, ns, "incusinstancesnapshots", "gold", "Ready")
    copy = {"type": "CONTAINER", "source": {"snapshotRef": {"name": "gold"}}, "connectionRef": {"name": "nas"}}
    apply(harness, ns, "IncusInstance", "copy", copy)
    refused = harness.wait_synced_false(ns, "copy", "Unsupported", timeout=60)
    said = next(c["message"] for c in refused["conditions"] if c["type"] == "Synced")
    assert said.startswith("spec.source.snapshotRef: ") and "container" in said, said
    assert "copy" not in harness.instance_names()
    for resource in ("copy", name):
        assert harness.delete(ns, resource).returncode == 0
