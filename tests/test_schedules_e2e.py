"""spec.snapshots against the real API server and the simulator, on every TrueNAS generation (issue 24
item 4): the periodic snapshot task made with the instance's dataset, schedule and lifetime where the
version offers one; the simulator's clock makes snapshots that appear in status.snapshots (bounded) and
that a restore can name; a spec change updates the task, removing the field deletes it, deleting the
instance deletes it first; a task the operator did not create is left alone; TrueNAS 25.x's refusal on
a container's dataset reported once, with no call repeated; the policy's shortest schedule refused."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from .conftest import Cluster, module_prefix
from .harness import ADOPT_ANYWHERE, Harness, module_operator, unique, wait_until
from .test_snapshots_e2e import VM_SPEC, apply, kubectl_wait_ready, status, storage, zfs_snapshots

pytestmark = pytest.mark.e2e  # needs the local control plane (kube-apiserver + etcd)

PROFILES = ["25.04.0", "25.04.2", "25.10", "26.0", "27.0"]
KIND_WITH_TASKS = {"25.04.0": None, "25.04.2": "VM", "25.10": "VM", "26.0": "CONTAINER", "27.0": "CONTAINER"}
"""The instance kind whose datasets the version's pool.filesystem_choices lists (so a task may use
them): 25.x leaves the Incus datasets out (.ix-virt: containers, and 25.04.0's Incus VMs), not the
operator's own vm.* homes; 26 lists every dataset. None: no kind at all (25.04.0)."""
HOUR = 3600


@pytest.fixture(scope="module", params=PROFILES)
def harness(
    cluster: Cluster, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[Harness]:
    profile = str(request.param)
    prefix = f"{module_prefix(request)}{profile.replace('.', '')}-"
    workdir = tmp_path_factory.mktemp(f"schedules{profile}")
    # Namespaces pol-* may not snapshot more often than hourly; the others may, as often as they like.
    policy = {**ADOPT_ANYWHERE, "rules": [{"namespaces": [f"{prefix}pol-*"], "snapshots": {"minScheduleMinutes": 60}}]}
    for running in module_operator(cluster, workdir, prefix, profile, policy=policy):
        running.prefix = prefix  # type: ignore[attr-defined]
        running.profile = profile  # type: ignore[attr-defined]
        yield running


def namespace(harness: Harness, infix: str = "") -> str:
    name = f"{harness.prefix}{infix}{uuid.uuid4().hex[:8]}"  # type: ignore[attr-defined]
    harness.cluster.kubectl("create", "namespace", name)
    return name


@pytest.fixture
def ns(harness: Harness) -> str:
    return namespace(harness)


def tasks(harness: Harness) -> dict[int, dict[str, Any]]:
    """The simulator's periodic snapshot tasks, as pool.snapshottask.query lists them."""
    return harness.sim.run(lambda: {i: t.entry() for i, t in storage(harness).tasks.tasks.items()})


def advance(harness: Harness, seconds: float) -> list[str]:
    """The simulator's clock moves on: every task fires as its schedule says, then its retention."""
    return harness.sim.run(lambda: storage(harness).tasks.advance(seconds))


def calls(harness: Harness, method: str) -> int:
    return harness.calls().get(method, 0)


def spec_of(kind: str, **fields: Any) -> dict[str, Any]:
    return {**(dict(VM_SPEC) if kind == "VM" else {}), **fields}


def dataset_of(kind: str, name: str) -> str:
    return (
        f"tank/incus-operator/vms/{name.replace('-', '_')}"
        if kind == "VM"
        else (f"tank/.truenas_containers/containers/{name}")
    )


def instance_status(harness: Harness, namespace: str, name: str) -> dict[str, Any]:
    return dict(harness.get(namespace, name).get("status") or {})


def wait_for(harness: Harness, namespace: str, name: str, what: str, check: Any, timeout: float = 30) -> Any:
    def probe() -> Any:
        return check(instance_status(harness, namespace, name))

    return wait_until(probe, timeout=timeout, what=f"{name}: {what}")


def condition(found: dict[str, Any], kind: str) -> dict[str, Any]:
    return next((c for c in found.get("conditions") or [] if c["type"] == kind), {})


def test_a_schedule_becomes_a_task_that_snapshots_changes_and_goes(harness: Harness, ns: str) -> None:
    kind = KIND_WITH_TASKS[harness.profile]  # type: ignore[attr-defined]
    if kind is None:
        # 25.04.0 has no instance whose datasets a periodic snapshot task may use: what it says instead.
        name = unique("ct")
        harness.apply(ns, name, {"snapshots": {"schedule": "0 * * * *", "keep": 3}})
        found = wait_for(harness, ns, name, "the refusal", lambda s: "snapshotSchedule" in s and s, timeout=90)
        assert condition(found, "Synced")["reason"] == "PartiallyApplied"
        assert "taskId" not in found["snapshotSchedule"]
        assert not [t for t in tasks(harness).values() if t["naming_schema"].startswith("tio-auto-")]
        assert harness.delete(ns, name).returncode == 0
        return
    name = unique("vm" if kind == "VM" else "ct")
    harness.apply(ns, name, spec_of(kind, snapshots={"schedule": "0 * * * *", "keep": 3}))
    harness.wait_ready(ns, name, timeout=90)
    found = wait_for(harness, ns, name, "the task", lambda s: (s.get("snapshotSchedule") or {}).get("taskId") and s)
    schedule = found["snapshotSchedule"]
    task = tasks(harness)[schedule["taskId"]]
    dataset = dataset_of(kind, name)
    assert task["dataset"] == schedule["dataset"] == dataset and task["recursive"] is (kind == "VM")
    assert {k: task["schedule"][k] for k in ("minute", "hour", "dom", "month", "dow")} == {
        "minute": "0", "hour": "*", "dom": "*", "month": "*", "dow": "*",
    }  # fmt: skip
    assert (task["lifetime_value"], task["lifetime_unit"]) == (3, "HOUR") == (
        schedule["lifetimeValue"], schedule["lifetimeUnit"],
    )  # fmt: skip
    assert task["naming_schema"] == schedule["namingSchema"] and task["naming_schema"].startswith("tio-auto-")
    assert "keep 3 x every 1 hour" in schedule["message"]
    assert condition(found, "Synced")["reason"] == "ReconcileSuccess"

    # The NAS's clock runs (the cluster is not asked): the task snapshots, its retention keeps 3 hours.
    apply(harness, ns, "IncusInstanceSnapshot", "by-hand", {"instanceRef": {"name": name}})
    kubectl_wait_ready(harness, ns, "incusinstancesnapshot", "by-hand")
    taken = advance(harness, 10 * HOUR)
    assert len(taken) == 10 and all(t.startswith(f"{dataset}@tio-auto-") for t in taken)
    listed = wait_for(
        harness, ns, name, "the task's snapshots listed",
        lambda s: sum(1 for e in s.get("snapshots") or [] if e.get("scheduled")) >= 3 and s,
    )  # fmt: skip
    mine = [e for e in listed["snapshots"] if e.get("scheduled")]
    assert 3 <= len(mine) <= 4 and all(not e["operator"] and e["created"] for e in mine)
    assert [e for e in listed["snapshots"] if e.get("operator")] == [
        next(
            e
            for e in listed["snapshots"]
            if e["name"] == status(harness, ns, "incusinstancesnapshots", "by-hand")["snapshotName"]
        )
    ], "whoever made them: the IncusInstanceSnapshot's too"
    assert listed["snapshotCount"] == len(listed["snapshots"])

    # A restore names one of them as the status lists it (the newest: no newer snapshot to destroy).
    newest = listed["snapshots"][0]["name"]
    apply(harness, ns, "IncusInstanceRestore", "back", {"instanceRef": {"name": name}, "truenasSnapshot": newest})
    kubectl_wait_ready(harness, ns, "incusinstancerestore", "back", timeout=120)
    harness.wait_ready(ns, name, timeout=60)

    # A spec change updates the task; 36 snapshots three hours on, the status lists the newest 20.
    harness.apply(ns, name, spec_of(kind, snapshots={"schedule": "*/5 * * * *", "keep": 100}))
    wait_until(lambda: tasks(harness)[task["id"]]["schedule"]["minute"] == "*/5", what="the task updated")
    updated = tasks(harness)[task["id"]]
    assert (updated["lifetime_value"], updated["lifetime_unit"]) == (9, "HOUR"), "500 minutes, in whole hours"
    assert len(tasks(harness)) == 1 and harness.events(ns, name)
    advance(harness, 3 * HOUR)
    bounded = wait_for(harness, ns, name, "36 more listed", lambda s: (s.get("snapshotCount") or 0) >= 36 and s)
    assert len(bounded["snapshots"]) == 20 and all(e.get("scheduled") for e in bounded["snapshots"])
    names = [e["name"] for e in bounded["snapshots"]]
    assert names == sorted(names, reverse=True), "newest first"
    assert "rounded up to 9 hours" in bounded["snapshotSchedule"]["message"]

    # Removing the field deletes the task; what it made stays (and stays listed).
    harness.apply(ns, name, spec_of(kind))
    wait_until(lambda: task["id"] not in tasks(harness), what="the task deleted")
    gone = wait_for(harness, ns, name, "no schedule in status", lambda s: "snapshotSchedule" not in s and s)
    assert "snapshots" not in gone
    kept = {s for s in zfs_snapshots(harness) if s.startswith(f"{dataset}@tio-auto-")}
    assert len(kept) >= 36
    reasons = {e["reason"] for e in harness.events(ns, name)}
    assert {"ScheduleCreated", "ScheduleUpdated", "ScheduleDeleted"} <= reasons, reasons

    # Back again, then the instance goes: its task and the task's snapshots go first.
    harness.apply(ns, name, spec_of(kind, snapshots={"schedule": "0 0 * * *", "keep": 7}))
    again = wait_for(harness, ns, name, "a new task", lambda s: (s.get("snapshotSchedule") or {}).get("taskId"))
    assert again != task["id"] and tasks(harness)[again]["lifetime_unit"] == "WEEK"
    advance(harness, 2 * 24 * HOUR)
    assert harness.delete(ns, name).returncode == 0
    assert name not in harness.instance_names() and again not in tasks(harness)
    assert not {s for s in zfs_snapshots(harness) if s.startswith(f"{dataset}@")}


def test_a_task_the_operator_did_not_create_is_left_alone(harness: Harness, ns: str) -> None:
    kind = KIND_WITH_TASKS[harness.profile] or "CONTAINER"  # type: ignore[attr-defined]
    name = unique("own")
    other = f"tank/hand-{uuid.uuid4().hex[:6]}"

    def hand_made() -> list[dict[str, Any]]:
        made = []
        storage(harness).add_dataset(other)
        made.append(storage(harness).tasks.create(None, [{"dataset": other, "naming_schema": "hand-%Y%m%d-%H%M"}]))
        return made

    theirs = harness.sim.run(hand_made)
    harness.apply(ns, name, spec_of(kind))
    harness.wait_ready(ns, name, timeout=90)
    if KIND_WITH_TASKS[harness.profile] is not None:  # type: ignore[attr-defined]
        # Someone's own task on the instance's very dataset, with their naming.
        payload = {"dataset": dataset_of(kind, name), "naming_schema": "theirs-%Y%m%d-%H%M", "recursive": kind == "VM"}
        theirs.append(harness.sim.run(lambda: storage(harness).tasks.create(None, [payload])))
    before = {t["id"]: t for t in theirs}
    harness.apply(ns, name, spec_of(kind, snapshots={"schedule": "0 * * * *", "keep": 2}))
    wait_for(harness, ns, name, "the schedule judged", lambda s: "snapshotSchedule" in s)
    harness.apply(ns, name, spec_of(kind, snapshots={"schedule": "0 */2 * * *", "keep": 2}))
    if KIND_WITH_TASKS[harness.profile] is None:  # type: ignore[attr-defined]
        time.sleep(3)  # nothing to change: the refusal stands
    else:
        wait_until(
            lambda: any(t["schedule"]["hour"] == "*/2" for t in tasks(harness).values()), what="our task updated"
        )
    harness.apply(ns, name, spec_of(kind))
    wait_for(harness, ns, name, "the schedule gone", lambda s: "snapshotSchedule" not in s)
    assert harness.delete(ns, name).returncode == 0
    now = tasks(harness)
    assert {i: now.get(i) for i in before} == before, "unchanged, and still there"
    assert not [t for t in now.values() if t["naming_schema"].startswith("tio-auto-")]


def test_the_refusal_on_25x_is_reported_once_and_not_asked_again(harness: Harness, ns: str) -> None:
    profile = harness.profile  # type: ignore[attr-defined]
    if not profile.startswith("25."):
        # 26 and later list every dataset: a container's schedule is no refusal there but a task.
        name = unique("ct")
        harness.apply(ns, name, {"snapshots": {"schedule": "0 * * * *", "keep": 24}})
        found = wait_for(
            harness, ns, name, "the task", lambda s: (s.get("snapshotSchedule") or {}).get("taskId") and s, timeout=90
        )
        assert condition(found, "Synced")["reason"] == "ReconcileSuccess", condition(found, "Synced")
        assert harness.delete(ns, name).returncode == 0
        return
    name = unique("ct")
    harness.apply(ns, name, {"snapshots": {"schedule": "0 * * * *", "keep": 24}})
    found = wait_for(harness, ns, name, "the refusal reported", lambda s: "snapshotSchedule" in s and s, timeout=90)
    synced = condition(found, "Synced")
    assert (synced["status"], synced["reason"]) == ("True", "PartiallyApplied"), synced
    assert f"tank/.ix-virt/containers/{name}" in synced["message"] and "Dataset not found" in synced["message"]
    assert harness.sim.sim.profile.system_version in synced["message"], "names the version"
    assert condition(found, "Ready")["status"] == "True", "the rest is in sync"
    assert "taskId" not in found["snapshotSchedule"] and "Dataset not found" in found["snapshotSchedule"]["message"]
    event = harness.wait_event(ns, name, "Unsupported")
    assert "Dataset not found" in event["message"]
    asked, version = calls(harness, "pool.snapshottask.create"), harness.get(ns, name)["metadata"]["resourceVersion"]
    time.sleep(12)  # six resyncs, two check intervals
    assert calls(harness, "pool.snapshottask.create") == asked, "TrueNAS's no is not asked again"
    assert harness.get(ns, name)["metadata"]["resourceVersion"] == version, "and nothing is written again"
    assert [e["reason"] for e in harness.events(ns, name)].count("Unsupported") == 1
    assert not [t for t in tasks(harness).values() if t["naming_schema"].startswith("tio-auto-")]
    harness.apply(ns, name, {"snapshots": {"schedule": "0 0 * * *", "keep": 7}})
    wait_until(lambda: calls(harness, "pool.snapshottask.create") == asked + 1, what="the new spec asked once")
    assert harness.delete(ns, name).returncode == 0
    assert name not in harness.instance_names()


def test_a_schedule_more_often_than_the_policy_allows_is_refused(harness: Harness) -> None:
    ns = namespace(harness, "pol-")
    name = unique("ct")
    created = calls(harness, "pool.snapshottask.create")
    harness.apply(ns, name, {"snapshots": {"schedule": "*/15 * * * *", "keep": 4}})
    refused = harness.wait_synced_false(ns, name, "PolicyDenied")
    assert "minScheduleMinutes" in condition(refused, "Synced")["message"]
    assert "15 minutes apart" in condition(refused, "Synced")["message"]
    assert name not in harness.instance_names() and calls(harness, "pool.snapshottask.create") == created
    harness.apply(ns, name, {"snapshots": {"schedule": "0 * * * *", "keep": 4}})
    harness.wait_ready(ns, name, timeout=90)
    assert harness.delete(ns, name).returncode == 0
