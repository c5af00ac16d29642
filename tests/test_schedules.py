"""spec.snapshots (issue 24 item 4, instances/schedules.py): the pure parts (lifetime from keep and
the schedule, the task's naming schema and payload, the status's bounded listing), and the loop
against the simulator in process (real client, FakeKube): created, checked at a bounded rate,
changed, set back, found again after a crash, deleted; a task the operator did not create left
alone; TrueNAS 25.x's refusal reported once, never asked again in a loop."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from truenas_incus_operator.app import Operator, build
from truenas_incus_operator.connections import Connection, ConnectionConfig
from truenas_incus_operator.instances.ledger import Record, RecordState, schedule_key
from truenas_incus_operator.instances.resource import LoopState, desired_from
from truenas_incus_operator.instances.schedules import (
    Lifetime,
    cron_fields,
    lifetime_for,
    listed,
    naming_schema,
    refusal_note,
    signature,
    task_payload,
)
from truenas_incus_operator.models import MAX_LISTED_SNAPSHOTS, SnapshotSchedule
from truenas_incus_operator.policy import Policy, ScheduleError
from truenas_incus_operator.problems import OperatorError
from truenas_incus_operator.reconcile import Ownership, Plan
from truenas_incus_operator.settings import Settings
from truenas_incus_operator.status import SnapshotsView, as_patch, render_instance
from truenas_incus_operator.truenas import (
    APIUnavailable,
    FieldError,
    Secret,
    SnapshotInfo,
    SnapshotTarget,
    TrueNASClient,
    ValidationFailed,
)
from truenas_simulator import Simulator

from .fakes import LEDGER_NAMESPACE, NOW, FakeKube, observed, resource
from .test_client import client_for, serve
from .test_client_vm import mirror
from .test_simulator import session

UID = "0f8c2e9a-1b2c-4d5e-8f90-123456789abc"
SCHEMA = "tio-auto-0f8c2e9a1b2c-%Y%m%d-%H%M"


# ----- lifetime: keep x the schedule's shortest gap, in whole hours -------------------------------------------
@pytest.mark.parametrize(
    "schedule,keep,value,unit",
    [
        ("0 * * * *", 24, 1, "DAY"),
        ("0 * * * *", 3, 3, "HOUR"),
        ("*/15 * * * *", 8, 2, "HOUR"),
        ("*/15 * * * *", 3, 1, "HOUR"),  # 45 minutes: rounded up
        ("*/7 * * * *", 10, 1, "HOUR"),  # 4 minutes apart at :56 -> :00, so 40 minutes
        ("* * * * *", 1000, 17, "HOUR"),  # 16 h 40 min
        ("0 0 * * *", 7, 1, "WEEK"),
        ("0 0 * * *", 10, 10, "DAY"),
        ("0 0 * * *", 14, 2, "WEEK"),
        ("30 2 * * 1-5", 5, 5, "DAY"),
        ("0 0 1 * *", 12, 48, "WEEK"),  # February's 28 days are the shortest gap
        ("0 0 1 1 *", 1000, 365000, "DAY"),
        ("  0   6  *  *  * ", 2, 2, "DAY"),
    ],
)
def test_the_lifetime_is_keep_times_the_shortest_gap_in_whole_hours(
    schedule: str, keep: int, value: int, unit: str
) -> None:
    lifetime = lifetime_for(schedule, keep)
    assert (lifetime.value, lifetime.unit) == (value, unit)
    assert lifetime.minutes >= keep * lifetime.gap.total_seconds() // 60, "never fewer than keep where closest"
    assert lifetime.minutes - keep * lifetime.gap.total_seconds() // 60 < 60, "at most the rounding to an hour"


def test_the_status_says_how_keep_became_the_lifetime() -> None:
    exact = lifetime_for("0 * * * *", 24).describe()
    assert exact == (
        "TrueNAS keeps snapshots for a lifetime, not a count: keep 24 x every 1 hour (the schedule's shortest gap) "
        "= 1 day; lifetime 1 DAY"
    )
    rounded = lifetime_for("*/15 * * * *", 3).describe()
    assert "= 45 minutes, rounded up to 1 hour (whole hours): about 4 are kept; lifetime 1 HOUR" in rounded
    weekdays = lifetime_for("30 2 * * 1-5", 5)
    assert weekdays.longest == timedelta(days=3)
    assert weekdays.describe().endswith(
        "lifetime 5 DAY. The schedule's firings are up to 3 days apart: fewer are kept where they are further apart"
    )
    assert "further apart" not in lifetime_for("0 0 * * *", 7).describe()


@pytest.mark.parametrize("schedule", ["0 0 30 2 *", "H * * * *", "R 0 * * *", "61 * * * *"])
def test_a_schedule_that_cannot_be_judged_has_no_lifetime(schedule: str) -> None:
    with pytest.raises(ScheduleError):
        lifetime_for(schedule, 3)


# ----- naming schema and payload ---------------------------------------------------------------------------
def test_the_naming_schema_marks_the_resource_and_meets_zettarepls_rules() -> None:
    schema = naming_schema(UID)
    assert schema == SCHEMA and len(schema) <= 150  # storage_task.task_naming_schema is a String(150)
    # zettarepl's validate_snapshot_naming_schema (snapshot/name.py), newest version: ZFS's characters,
    # no '%%', %Y %m %d %H %M present, and a time formatted with it parses back to the same time.
    assert "%%" not in schema and not re.findall(r"[^0-9A-Za-z %_.:-]", schema)
    assert all(p in schema for p in ("%Y", "%m", "%d", "%H", "%M"))
    when = datetime(2000, 2, 29, 19, 40)
    assert datetime.strptime(when.strftime(schema), schema) == when
    assert when.strftime(schema) == "tio-auto-0f8c2e9a1b2c-20000229-1940"
    assert naming_schema("another-uid-0000") != schema


def test_the_payload_is_the_instances_datasets_on_the_spec_schedule() -> None:
    wanted = SnapshotSchedule(schedule="*/15 9-17 * * MON-FRI", keep=8)
    lifetime = lifetime_for(wanted.schedule, wanted.keep)
    payload = task_payload(SnapshotTarget("tank/incus-operator/vms/web_01", recursive=True), wanted, UID, lifetime)
    assert payload == {
        "dataset": "tank/incus-operator/vms/web_01",
        "recursive": True,
        "exclude": [],
        "lifetime_value": 2,
        "lifetime_unit": "HOUR",
        "naming_schema": SCHEMA,
        "schedule": {
            "minute": "*/15", "hour": "9-17", "dom": "*", "month": "*", "dow": "MON-FRI",
            "begin": "00:00", "end": "23:59",
        },
        "allow_empty": True,
        "enabled": True,
    }  # fmt: skip
    assert cron_fields("  0  * * *  1 ") == ("0", "*", "*", "*", "1")


@pytest.mark.parametrize("profile", ["25.04.2", "26.0", "27.0"])
async def test_the_simulator_takes_the_payload_and_lists_it_as_sent(profile: str) -> None:
    """What TrueNAS lists matches what was sent (``signature``): a settled task is never updated again."""
    sim = Simulator(profile)
    await sim.call(session(sim), "pool.dataset.create", [{"name": "tank/home"}])
    wanted = SnapshotSchedule(schedule="0 */6 * * *", keep=4)
    payload = task_payload(SnapshotTarget("tank/home"), wanted, UID, lifetime_for(wanted.schedule, wanted.keep))
    entry = await sim.call(session(sim), "pool.snapshottask.create", [payload])
    assert signature(entry) == signature(payload)
    assert signature({**entry, "lifetime_value": 5}) != signature(payload)


# ----- the status's listing: the newest 20, whoever made them ------------------------------------------------
def info(index: int, owner: str | None = None, name: str | None = None) -> SnapshotInfo:
    return SnapshotInfo(
        name=name or f"tio-auto-0f8c2e9a1b2c-202601{1 + index // 24:02d}-{index % 24:02d}00",
        datasets=("tank/home",),
        txg=100 + index,
        created=1_767_225_600 + 3600 * index,
        used=4096 * index,
        referenced=8192,
        owner=owner,
    )


def test_the_listing_holds_the_newest_twenty_newest_first() -> None:
    snapshots = [info(i) for i in range(25)]
    snapshots += [info(30, owner="uid-snap", name="tio-5f0e1d2c3b4a"), info(31, name="manual-before-upgrade")]
    entries, count = listed(list(reversed(snapshots)), SCHEMA)
    assert count == 27 and len(entries) == MAX_LISTED_SNAPSHOTS
    assert [e.name for e in entries[:3]] == ["manual-before-upgrade", "tio-5f0e1d2c3b4a", snapshots[24].name]
    assert [(e.operator, e.scheduled) for e in entries[:3]] == [(False, False), (True, False), (False, True)]
    assert entries[2].created == datetime(2026, 1, 2, 0, 0, tzinfo=UTC) and entries[2].used_bytes == 4096 * 24
    assert entries[-1].name == snapshots[7].name
    assert listed([], SCHEMA) == ((), 0)


def test_a_snapshot_the_status_cannot_hold_is_left_out() -> None:
    entries, count = listed([info(1), info(2, name="x" * 300)], None)
    assert [e.name for e in entries] == [info(1).name] and count == 2
    assert entries[0].scheduled is False  # no schema: nothing is the task's


def test_the_status_keeps_what_it_said_of_snapshots_until_they_are_read_again() -> None:
    body = resource(snapshots={"schedule": "0 * * * *", "keep": 3})
    desired = replace(desired_from(body), ownership=Ownership(mine=True))
    entries, count = listed([info(1), info(2)], SCHEMA)
    view = SnapshotsView(None, entries, count)
    written = as_patch(render_instance(desired, observed("web01"), previous={}, now=NOW, plan=Plan(), snapshots=view))
    assert written["snapshotCount"] == 2 and [s["name"] for s in written["snapshots"]] == [info(2).name, info(1).name]
    kept = as_patch(render_instance(desired, observed("web01"), previous=written, now=NOW, plan=Plan()))
    assert kept["snapshots"] == written["snapshots"] and kept["snapshotCount"] == 2
    unobserved = as_patch(render_instance(desired, None, previous=written, now=NOW, plan=None, connected=False))
    assert unobserved["snapshots"] == written["snapshots"]
    cleared = as_patch(
        render_instance(desired, observed("web01"), previous=written, now=NOW, plan=Plan(), snapshots=SnapshotsView())
    )
    assert cleared["snapshots"] is None and cleared["snapshotCount"] is None and cleared["snapshotSchedule"] is None


def test_refusals_say_which_truenas_refused_what() -> None:
    target = SnapshotTarget("tank/.ix-virt/containers/web01")
    refused = ValidationFailed([FieldError("periodic_snapshot_create.dataset", "Dataset not found")])
    assert refusal_note("TrueNAS-25.10.1", target, refused) == (
        "spec.snapshots (TrueNAS-25.10.1 offers no periodic snapshot task on tank/.ix-virt/containers/web01, one of "
        "its internal datasets: pool.snapshottask.create answered 'periodic_snapshot_create.dataset: Dataset not "
        "found'; IncusInstanceSnapshots work)"
    )
    other = ValidationFailed([FieldError("periodic_snapshot_create.schedule", "Please ensure fields match cron")])
    assert refusal_note("TrueNAS-26.0.0", target, other).startswith(
        "spec.snapshots (TrueNAS-26.0.0 refused the periodic snapshot task: "
    )
    assert "cannot be used over this connection" in refusal_note(None, target, APIUnavailable("no REST route"))


# ----- the loop, in process against the simulator ------------------------------------------------------------
class Kube(FakeKube):
    """No IncusInstanceSnapshot or IncusInstanceRestore holds anything here (holds.confirm lists them)."""

    async def list_objects(self, plural: str, namespace: str) -> list[dict[str, Any]]:
        return []


@dataclass
class Rig:
    sim: Simulator
    operator: Operator
    kube: FakeKube
    connection: Connection
    client: TrueNASClient
    events: list[tuple[str, str, str]]
    now: list[float]

    def calls(self, *methods: str) -> int:
        return sum(self.sim.counters.by_method[m] for m in methods)

    def tasks(self) -> dict[int, Any]:
        return dict(self.sim.storage.tasks.tasks)

    async def settle(self, body: dict[str, Any], state: LoopState) -> dict[str, Any]:
        await self.operator.loops.reconcile_once(body, state, lambda: None)
        return state.status

    def later(self, seconds: float) -> None:
        self.now[0] += seconds


@asynccontextmanager
async def rig(profile: str, policy: Policy | None = None) -> AsyncIterator[Rig]:
    async with serve(profile) as (sim, server), client_for(server, "websocket") as client:
        kube = Kube()
        events: list[tuple[str, str, str]] = []

        def post_event(body: Any, kind: str, reason: str, message: str) -> None:
            events.append((kind, reason, message))

        settings = Settings(resync_seconds=30.0, retry_min_seconds=1.0, ledger_namespace=LEDGER_NAMESPACE)
        operator = build(settings, kube, post_event, clock=lambda: NOW, policy=policy or Policy())
        now = [1000.0]
        operator.loops.schedules.clock = lambda: now[0]  # type: ignore[union-attr]
        connection = Connection(
            "<default>", ConnectionConfig(url=server.ws_url, api_key=Secret("x")), resync_seconds=30
        )
        connection.attach(client, await client.instances.list_instances())
        operator.connections.connections["<default>"] = connection
        yield Rig(sim, operator, kube, connection, client, events, now)


def scheduled(schedule: str = "0 * * * *", keep: int = 3, **spec: Any) -> dict[str, Any]:
    return resource("web01", uid=UID, snapshots={"schedule": schedule, "keep": keep}, **spec)


def condition(status: dict[str, Any], kind: str) -> dict[str, Any]:
    return next(c for c in status["conditions"] if c["type"] == kind)


TASK_CALLS = ("pool.snapshottask.create", "pool.snapshottask.update", "pool.snapshottask.delete")


async def test_a_schedule_becomes_a_task_checked_at_a_bounded_rate() -> None:
    async with rig("26.0") as r:
        body, state = scheduled(), LoopState(status={})
        status = await r.settle(body, state)
        (task,) = r.tasks().values()
        assert task.dataset == "tank/.truenas_containers/containers/web01" and task.naming_schema == SCHEMA
        assert (task.lifetime_value, task.lifetime_unit) == (3, "HOUR")
        assert {k: task.schedule[k] for k in ("minute", "hour", "dom", "month", "dow")} == dict(
            zip(("minute", "hour", "dom", "month", "dow"), ("0", "*", "*", "*", "*"), strict=True)
        )
        record = r.operator.schedule_ledger.get(r.connection.identity, schedule_key("web01"))
        assert record is not None and record.task_id == task.id and record.state == RecordState.CREATED
        assert status["snapshotSchedule"]["taskId"] == task.id and status["snapshotSchedule"]["lifetimeUnit"] == "HOUR"
        assert "keep 3 x every 1 hour" in status["snapshotSchedule"]["message"]
        assert status["snapshots"] == [] and status["snapshotCount"] == 0
        assert condition(status, "Synced")["reason"] == "ReconcileSuccess"
        assert ("Normal", "ScheduleCreated") in [e[:2] for e in r.events]

        # Within the interval: nothing is read again, whatever the number of passes.
        reads = r.calls("pool.snapshottask.query", "pool.snapshot.query")
        for _ in range(5):
            r.later(5)
            await r.settle(body, state)
        assert r.calls("pool.snapshottask.query", "pool.snapshot.query") == reads
        # The clock runs on TrueNAS: its task takes snapshots, the next check lists them (bounded).
        r.sim.storage.tasks.advance(30 * 3600)
        r.later(30)
        status = await r.settle(body, state)
        assert r.calls("pool.snapshottask.query", "pool.snapshot.query") == reads + 2
        assert status["snapshotCount"] in (3, 4), "a lifetime of three hours (and the one exactly that old)"
        assert all(s["scheduled"] and not s["operator"] for s in status["snapshots"])
        assert r.calls(*TASK_CALLS) == 1, "only the create"


async def test_a_spec_change_updates_the_task_and_a_change_on_truenas_is_set_back() -> None:
    async with rig("27.0") as r:
        state = LoopState(status={})
        await r.settle(scheduled(), state)
        (task,) = r.tasks().values()
        body = scheduled("30 2 * * *", 14, generation=2)
        status = await r.settle(body, state)
        assert (task.lifetime_value, task.lifetime_unit, task.schedule["minute"], task.schedule["hour"]) == (
            2, "WEEK", "30", "2",
        )  # fmt: skip
        assert status["snapshotSchedule"]["lifetimeUnit"] == "WEEK"
        assert ("Normal", "ScheduleUpdated") in [e[:2] for e in r.events]
        # Someone edits the task on TrueNAS: the next check sets it back.
        task.lifetime_value = 99
        r.later(30)
        await r.settle(body, state)
        assert task.lifetime_value == 2 and ("Normal", "DriftCorrected") in [e[:2] for e in r.events]
        # Someone deletes it: the next check creates it again.
        del r.sim.storage.tasks.tasks[task.id]
        r.later(30)
        status = await r.settle(body, state)
        (again,) = r.tasks().values()
        assert again.id != task.id and status["snapshotSchedule"]["taskId"] == again.id
        updates = r.calls("pool.snapshottask.update")
        for _ in range(3):
            r.later(30)
            await r.settle(body, state)
        assert r.calls("pool.snapshottask.update") == updates, "a settled task is only read"


async def test_removing_the_field_deletes_only_the_operators_task() -> None:
    async with rig("26.0") as r:
        own = session(r.sim)
        await r.sim.call(own, "pool.dataset.create", [{"name": "tank/mine"}])
        theirs = await r.sim.call(
            own,
            "pool.snapshottask.create",
            [{"dataset": "tank/mine", "naming_schema": "auto-%Y-%m-%d_%H-%M", "schedule": {"minute": "0"}}],
        )
        state = LoopState(status={})
        await r.settle(scheduled(), state)
        dataset = "tank/.truenas_containers/containers/web01"
        beside = await r.sim.call(  # a task of someone else's on the very dataset, with their naming
            own, "pool.snapshottask.create", [{"dataset": dataset, "naming_schema": "hand-%Y%m%d-%H%M"}]
        )
        ours = next(t for t in r.tasks().values() if t.naming_schema == SCHEMA)
        r.sim.storage.tasks.advance(2 * 3600)
        status = await r.settle(resource("web01", uid=UID, generation=2), state)
        assert set(r.tasks()) == {theirs["id"], beside["id"]} and ours.id not in r.tasks()
        assert r.operator.schedule_ledger.owned_by(UID) == []
        assert "snapshotSchedule" not in status and "snapshots" not in status and "snapshotCount" not in status
        left = [s for s in r.sim.storage.snapshots if s.startswith(f"{dataset}@tio-auto-")]
        assert len(left) == 2, "its snapshots stay"
        assert any(e[1] == "ScheduleDeleted" and f"task {ours.id}" in e[2] for e in r.events)


async def test_a_task_created_before_a_crash_is_found_again_not_made_twice() -> None:
    async with rig("26.0") as r:
        state = LoopState(status={})
        await r.settle(resource("web01", uid=UID), state)  # the instance, no schedule yet
        dataset = "tank/.truenas_containers/containers/web01"
        wanted = SnapshotSchedule(schedule="0 * * * *", keep=3)
        made = await r.client.snapshot_tasks.create(
            task_payload(SnapshotTarget(dataset), wanted, UID, lifetime_for("0 * * * *", 3))
        )
        # The claim was written, the create returned, the process died before recording the id.
        await r.operator.schedule_ledger.claim(
            r.connection.identity, schedule_key("web01"), owner_uid=UID, owner="apps/web01",
            connection="<default>", state=RecordState.CREATING,
        )  # fmt: skip
        await r.settle(scheduled(generation=2), LoopState(status=dict(state.status)))
        assert list(r.tasks()) == [made["id"]] and r.calls("pool.snapshottask.create") == 1
        record = r.operator.schedule_ledger.get(r.connection.identity, schedule_key("web01"))
        assert record is not None and record.task_id == made["id"]


async def test_a_recorded_id_that_names_another_task_now_is_not_taken_for_ours() -> None:
    async with rig("26.0") as r:
        own = session(r.sim)
        await r.sim.call(own, "pool.dataset.create", [{"name": "tank/mine"}])
        theirs = await r.sim.call(own, "pool.snapshottask.create", [{"dataset": "tank/mine"}])
        state = LoopState(status={})
        await r.settle(resource("web01", uid=UID), state)
        stale = Record(
            r.connection.identity, schedule_key("web01"), UID, "apps/web01", "<default>", RecordState.CREATED,
            task_id=theirs["id"],
        )  # fmt: skip
        r.operator.schedule_ledger.remember(stale)
        await r.settle(scheduled(generation=2), LoopState(status=dict(state.status)))
        task = r.sim.storage.tasks.tasks[theirs["id"]]
        assert task.dataset == "tank/mine" and task.naming_schema == "auto-%Y-%m-%d_%H-%M", "untouched"
        assert any(t.naming_schema == SCHEMA for t in r.tasks().values())


@pytest.mark.parametrize("profile", ["25.04.0", "25.04.2", "25.10"])
async def test_25x_refuses_a_task_on_a_containers_dataset_reported_once(profile: str) -> None:
    async with rig(profile) as r:
        body, state = scheduled(), LoopState(status={})
        status = await r.settle(body, state)
        synced = condition(status, "Synced")
        assert synced["status"] == "True" and synced["reason"] == "PartiallyApplied"
        assert "offers no periodic snapshot task on tank/.ix-virt/containers/web01" in synced["message"]
        assert r.client.system_version in synced["message"] and "Dataset not found" in synced["message"]
        assert condition(status, "Ready")["status"] == "True", "the rest is in sync"
        assert "Dataset not found" in status["snapshotSchedule"]["message"]
        assert "taskId" not in status["snapshotSchedule"] or status["snapshotSchedule"]["taskId"] is None
        assert r.operator.schedule_ledger.owned_by(UID) == [], "nothing made, nothing owned"
        unsupported = [e for e in r.events if e[1] == "Unsupported"]
        assert len(unsupported) == 1 and "Dataset not found" in unsupported[0][2]
        writes = len(r.kube.statuses("web01"))
        for _ in range(10):
            r.later(31)
            await r.settle(body, state)
        assert r.calls("pool.snapshottask.create") == 1, "asked once, never again for the same task"
        assert len([e for e in r.events if e[1] == "Unsupported"]) == 1
        assert len(r.kube.statuses("web01")) == writes, "and nothing to write either"
        # A spec change is another task: asked once more.
        await r.settle(scheduled("0 0 * * *", 7, generation=2), state)
        assert r.calls("pool.snapshottask.create") == 2


async def test_25x_makes_the_task_of_a_vm_whose_home_it_lists() -> None:
    async with serve("25.10") as (sim, server), client_for(server, "websocket", vm_image_server=mirror(server)) as c:
        kube, events = Kube(), []
        settings = Settings(resync_seconds=30.0, ledger_namespace=LEDGER_NAMESPACE)
        operator = build(settings, kube, lambda *e: events.append(e), clock=lambda: NOW, policy=Policy())
        connection = Connection(
            "<default>", ConnectionConfig(url=server.ws_url, api_key=Secret("x")), resync_seconds=30
        )
        connection.attach(c, await c.instances.list_instances())
        operator.connections.connections["<default>"] = connection
        body = resource(
            "vm-01", uid=UID, type="VM", cpu="1", memory="1Gi", snapshots={"schedule": "0 0 * * *", "keep": 7}
        )
        state = LoopState(status={})
        for _ in range(3):
            await operator.loops.reconcile_once(body, state, lambda: None)
        (task,) = sim.storage.tasks.tasks.values()
        assert task.dataset == "tank/incus-operator/vms/vm_01" and task.recursive
        assert (task.lifetime_value, task.lifetime_unit) == (1, "WEEK")
        assert condition(state.status, "Synced")["reason"] == "ReconcileSuccess"


async def test_a_schedule_the_policy_refuses_is_policy_denied_before_any_call() -> None:
    policy = Policy.model_validate({"defaultRule": {"snapshots": {"minScheduleMinutes": 60}}})
    async with rig("26.0", policy) as r:
        status = await r.settle(scheduled("*/15 * * * *"), LoopState(status={}))
        synced = condition(status, "Synced")
        assert (synced["status"], synced["reason"]) == ("False", "PolicyDenied")
        assert "policy.defaultRule.snapshots.minScheduleMinutes" in synced["message"]
        assert r.tasks() == {} and "web01" not in r.sim.names(), "refused before anything was made"


async def test_deleting_the_instance_deletes_its_task_and_the_snapshots_it_made_first() -> None:
    async with rig("26.0") as r:
        state = LoopState(status={})
        await r.settle(scheduled(), state)
        dataset = "tank/.truenas_containers/containers/web01"
        r.sim.storage.tasks.advance(3 * 3600)
        assert len([s for s in r.sim.storage.snapshots if s.startswith(f"{dataset}@")]) == 3
        await r.operator.deletion.delete(scheduled(deleting=True), retry=0)
        assert r.tasks() == {} and "web01" not in r.sim.names()
        assert r.operator.schedule_ledger.owned_by(UID) == [] and r.operator.ledger.owned_by(UID) == []
        assert not [s for s in r.sim.storage.snapshots if s.startswith(f"{dataset}@")]


async def test_an_orphaned_instance_keeps_its_task() -> None:
    async with rig("26.0") as r:
        await r.settle(scheduled(deletionPolicy="Orphan"), LoopState(status={}))
        await r.operator.deletion.delete(scheduled(deletionPolicy="Orphan", deleting=True), retry=0)
        assert len(r.tasks()) == 1 and "web01" in r.sim.names()
        assert r.operator.schedule_ledger.owned_by(UID) == []


def test_lifetime_is_a_plain_value() -> None:
    assert Lifetime(2, "DAY", 2, timedelta(days=1), timedelta(days=1)).minutes == 2 * 24 * 60


def test_a_schedule_record_keeps_its_task_id_and_is_no_other_ledgers_record() -> None:
    record = Record("nas-1", schedule_key("web01"), UID, "apps/web01", "<default>", RecordState.CREATED, task_id=7)
    manifest = record.manifest(LEDGER_NAMESPACE, "incus.truenas.io/schedule-ownership")
    assert manifest["data"]["taskId"] == "7" and manifest["data"]["instance"] == "web01#schedule"
    assert Record.from_manifest(manifest) == record
    without = Record("nas-1", schedule_key("web01"), UID, "apps/web01", "<default>", RecordState.CREATING)
    assert "taskId" not in without.manifest(LEDGER_NAMESPACE)["data"]
    assert Record.from_manifest(without.manifest(LEDGER_NAMESPACE)) == without
    instance = Record("nas-1", "web01", UID, "apps/web01", "<default>", RecordState.CREATED)
    assert instance.name != record.name, "one instance's records in two ledgers never share a ConfigMap"


async def test_over_rest_the_schedule_is_refused_as_over_json_rpc_and_nothing_stays_owned() -> None:
    """25.x refuses a task on a container's dataset; over REST the request reaches TrueNAS as well
    (pool.snapshottask's routes) and its answer is reported once, not asked again."""
    async with serve("25.10") as (sim, server), client_for(server, "rest") as client:
        kube, events = Kube(), []
        settings = Settings(resync_seconds=30.0, ledger_namespace=LEDGER_NAMESPACE)
        operator = build(settings, kube, lambda *e: events.append(e), clock=lambda: NOW, policy=Policy())
        connection = Connection("<default>", ConnectionConfig(url=server.url, api_key=Secret("x")), resync_seconds=30)
        connection.attach(client, await client.instances.list_instances())
        operator.connections.connections["<default>"] = connection
        now = [0.0]
        operator.loops.schedules.clock = lambda: now[0]  # type: ignore[union-attr]
        state = LoopState(status={})
        for _ in range(2):
            await operator.loops.reconcile_once(scheduled(), state, lambda: None)
        synced = condition(state.status, "Synced")
        assert (synced["status"], synced["reason"]) == ("True", "PartiallyApplied")
        assert "Dataset not found" in synced["message"] and sim.counters.over_rest["pool.snapshottask.create"] == 1
        writes = len(kube.statuses("web01"))
        for _ in range(4):
            now[0] += 31
            await operator.loops.reconcile_once(scheduled(), state, lambda: None)
        assert condition(state.status, "Synced")["message"] == synced["message"], "the same notes, once each"
        assert len(kube.statuses("web01")) == writes
        assert sim.counters.over_rest["pool.snapshottask.create"] == 1, "not asked again"
        assert operator.schedule_ledger.owned_by(UID) == []
        await operator.deletion.delete(scheduled(deleting=True), retry=0)
        assert "web01" not in sim.names()


async def test_what_a_removed_schedule_made_goes_with_the_instance_and_nothing_else() -> None:
    async with rig("26.0") as r:
        state = LoopState(status={})
        await r.settle(scheduled(), state)
        dataset = "tank/.truenas_containers/containers/web01"
        r.sim.storage.tasks.advance(2 * 3600)
        await r.settle(resource("web01", uid=UID, generation=2), state)  # the field removed: the task goes
        assert r.tasks() == {} and len([s for s in r.sim.storage.snapshots if s.startswith(f"{dataset}@")]) == 2
        await r.sim.call(session(r.sim), "pool.snapshot.create", [{"dataset": dataset, "name": "by-hand"}])
        with pytest.raises(OperatorError, match="has snapshots"):
            await r.operator.deletion.delete(resource("web01", uid=UID, deleting=True), retry=0)
        assert [s for s in r.sim.storage.snapshots if s.startswith(f"{dataset}@")] == [f"{dataset}@by-hand"], (
            "the task's went, the hand-made one is reported, not deleted"
        )
