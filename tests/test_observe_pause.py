"""spec.managementPolicy ObserveOnly and the incus.truenas.io/paused annotation (issue 25 items 1, 2),
in the pure planner and the status: ObserveOnly plans no TrueNAS write (only the ledger's Observe),
says what Full would change (InSync, never an environment value), and never deletes; a paused
resource's plan is reported, not executed, with Paused=True and Synced=False."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import pytest

from truenas_incus_operator.instances.ledger import Record, RecordState
from truenas_incus_operator.instances.ownership import ownership_of
from truenas_incus_operator.models import IncusInstanceSpec
from truenas_incus_operator.problems import Reason
from truenas_incus_operator.reconcile import (
    Adopt,
    Desired,
    Observe,
    Ownership,
    Plan,
    Start,
    Update,
    plan,
    plan_delete,
    plan_observe,
)
from truenas_incus_operator.status import render_instance

from .test_reconcile import observed

NOW = datetime(2026, 12, 7, tzinfo=UTC)


def desired(ownership: Ownership | None = None, paused: bool = False, **spec: Any) -> Desired:
    body = {"type": "CONTAINER", "managementPolicy": "ObserveOnly", **spec}
    model = IncusInstanceSpec.model_validate(body)
    return Desired("ns", "web", 3, model, uid="u1", ownership=ownership or Ownership(), paused=paused)


def conditions(status: Any) -> dict[str, tuple[str, str, str]]:
    return {c.type: (str(c.status), str(c.reason), c.message) for c in status.conditions}


def render(want: Desired, seen: Any, result: Plan) -> dict[str, tuple[str, str, str]]:
    return conditions(render_instance(want, seen, previous=None, now=NOW, plan=result))


OBSERVING = Ownership(mine=True, observing=True, observe_allowed=True)


def test_observe_only_needs_no_image_and_full_still_does() -> None:
    assert desired().spec.image is None
    with pytest.raises(ValueError, match=r"exactly one of spec\.image and spec\.source"):
        IncusInstanceSpec.model_validate({"type": "CONTAINER"})
    with pytest.raises(ValueError, match=r"at most one of spec\.image and spec\.source"):
        IncusInstanceSpec.model_validate(
            {"type": "VM", "image": "debian/bookworm", "source": {"snapshotRef": {"name": "s"}}}
        )


def test_an_instance_nobody_holds_is_observed_only_where_the_policy_allows() -> None:
    refused = plan_observe(desired(), observed())
    assert refused.actions == () and refused.blocked is not None
    assert refused.blocked.reason == Reason.OBSERVE_NOT_ALLOWED and "policy: observation" in refused.blocked.message
    assert not refused.blocked.ours, "nothing of an instance it may not observe is reported"
    status = render_instance(desired(), observed(), previous=None, now=NOW, plan=refused)
    assert status.instance_id is None and status.cpu is None and status.ip_addresses is None
    allowed = plan_observe(desired(Ownership(observe_allowed=True)), observed())
    assert allowed.actions == (Observe(),) and allowed.blocked is None


def test_an_observed_instance_is_reported_with_what_full_would_change_and_no_write() -> None:
    seen = observed(cpu="1", memory=512 * 2**20, status="STOPPED", environment={"SECRET": "hunter2"})
    want = desired(OBSERVING, cpu="2", memory="1Gi", environment={"SECRET": "other", "NEW": "x"})
    result = plan_observe(want, seen)
    assert result.actions == () and result.observing
    assert result.differences == (
        "update cpu 1 -> 2, memory 512Mi -> 1024Mi, environment (NEW)",
        "start it (spec.powerState Running)",
    )
    found = render(want, seen, result)
    assert found["Ready"][:2] == ("True", "Observed") and "STOPPED" in found["Ready"][2]
    assert found["Synced"][:2] == ("True", "Observing")
    assert found["InSync"][:2] == ("False", "Differs") and found["InSync"][2].startswith(
        "Full would: update cpu 1 -> 2"
    )
    assert "hunter2" not in str(found) and "other" not in found["InSync"][2], "environment values can be secrets"


def test_the_status_mirrors_an_observed_instances_own_devices_printable_and_bounded() -> None:
    from truenas_incus_operator.truenas.types import DeviceConfig

    seen = observed()
    devices = [
        DeviceConfig("root", "DISK", inherited=True),
        DeviceConfig("data\x1b[31m", "DISK", source="/mnt/tank/data", destination="/data"),
        *(DeviceConfig(f"usb{i}", "USB") for i in range(40)),
    ]
    want = desired(OBSERVING)
    status = render_instance(want, seen, previous=None, now=NOW, plan=plan_observe(want, seen), devices=devices)
    assert status.devices is not None and len(status.devices) == 32
    assert status.devices[0].name == "data\\x1b[31m" and status.devices[0].source == "/mnt/tank/data"
    full = replace(want, spec=want.spec.model_copy(update={"management_policy": None, "image": "debian/bookworm"}))
    assert render_instance(full, seen, previous=None, now=NOW, plan=plan(full, seen), devices=devices).devices is None


def test_a_matching_instance_is_in_sync_and_a_missing_one_is_never_created() -> None:
    seen = observed(cpu="2", status="RUNNING", environment={})
    want = desired(OBSERVING, cpu="2", powerState="Running", autostart=True)
    assert render(want, seen, plan_observe(want, seen))["InSync"][:2] == ("True", "Matches")
    missing = plan_observe(want, None)
    assert missing.actions == () and missing.blocked is None
    found = render(want, None, missing)
    assert found["Ready"][:2] == ("False", "NotFound") and found["InSync"][:2] == ("False", "NotFound")
    assert plan_observe(desired(), None).actions == (), "not even the ledger: nothing exists to observe"


def test_an_observe_only_resource_never_deletes_even_the_instance_it_created() -> None:
    created = desired(Ownership(mine=True), deletionPolicy="Delete")
    assert created.deletion_policy == "Orphan"
    assert plan_delete(created, observed()).actions == ()
    # Switched back to Full: the record it only observed still never deletes the instance.
    full = replace(created, spec=created.spec.model_copy(update={"management_policy": None}), ownership=OBSERVING)
    assert full.deletion_policy == "Orphan" and plan_delete(full, observed()).actions == ()


def test_full_on_an_observed_instance_is_an_adoption() -> None:
    full = {"type": "CONTAINER", "image": "debian/bookworm", "cpu": "2"}
    spec = IncusInstanceSpec.model_validate(full)
    base = Desired("ns", "web", 4, spec, uid="u1")
    blocked = plan(replace(base, ownership=OBSERVING), observed(cpu="1"))
    assert blocked.actions == () and blocked.blocked is not None and blocked.blocked.reason == Reason.ALREADY_EXISTS
    asked = replace(OBSERVING, adopt_requested=True)
    assert plan(replace(base, ownership=asked), observed()).blocked.reason == Reason.ADOPTION_NOT_ALLOWED  # type: ignore[union-attr]
    granted = replace(asked, adopt_allowed=True)
    assert plan(replace(base, ownership=granted), observed()).actions == (Adopt(),)
    gone = plan(replace(base, ownership=granted), None)
    assert gone.actions == () and gone.blocked is not None and gone.blocked.reason == Reason.INSTANCE_GONE


def test_the_ledger_record_of_an_observer_makes_an_observing_ownership() -> None:
    record = Record("nas-1", "web", "u1", "ns/web", "<default>", RecordState.OBSERVED, deletion_policy="Orphan")
    found = ownership_of(desired(), "nas-1", record, [record], adopt_requested=False, adopt_allowed=False)
    assert found.mine and found.observing and not found.devices_managed and not found.adopted
    other = ownership_of(
        replace(desired(), uid="u2"),
        "nas-1",
        record,
        [],
        adopt_requested=True,
        adopt_allowed=True,
        observe_allowed=True,
    )
    assert other.holder is not None and not other.mine
    second = plan_observe(replace(desired(), uid="u2", ownership=other), observed())
    assert second.blocked is not None and second.blocked.reason == Reason.CONFLICT, "two cannot observe one"


def test_a_paused_plan_is_reported_not_done() -> None:
    full = IncusInstanceSpec.model_validate({"type": "CONTAINER", "image": "debian/bookworm", "cpu": "2"})
    want = Desired("ns", "web", 5, full, uid="u1", ownership=Ownership(mine=True), paused=True)
    seen = observed(cpu="1", status="STOPPED")
    result = replace(plan(want, seen), paused=True)
    assert [type(a) for a in result.actions] == [Update, Start]
    found = render(want, seen, result)
    assert found["Paused"][:2] == ("True", "ReconciliationPaused")
    assert found["Synced"][:2] == ("False", "ReconciliationPaused")
    assert "a reconcile would update cpu 1 -> 2; start it" in found["Synced"][2]
    assert found["Ready"][:2] == ("False", "NotSynced") and "paused" in found["Ready"][2]
    # Paused and in sync: Ready tells the truth, Paused stays.
    settled = observed(cpu="2", status="RUNNING")
    calm = render(want, settled, replace(plan(want, settled), paused=True))
    assert calm["Ready"][:2] == ("True", "Available") and calm["Paused"][0] == "True"
    assert "would change nothing" in calm["Synced"][2]
    # Resumed: no Paused condition at all.
    resumed = replace(want, paused=False)
    assert "Paused" not in render(resumed, settled, plan(resumed, settled))


# ----- a switch during a pass (review M1) -------------------------------------------------------------------
async def test_a_pause_set_while_an_action_waits_for_a_job_slot_stops_it() -> None:
    """One job slot per namespace: b waits behind a's create; b is paused meanwhile: b is never created."""
    import asyncio

    from truenas_incus_operator.connections.slots import JobSlots
    from truenas_incus_operator.instances.resource import LoopState

    from .fakes import FakeBackend, fake_operator, resource

    backend = FakeBackend(gate=asyncio.Event())
    fake = fake_operator(backend)
    fake.connection.job_slots = JobSlots(2)
    a, b = resource("a", powerState="Stopped"), resource("b", powerState="Stopped")
    loops = fake.operator.loops
    first = asyncio.create_task(loops.reconcile_once(a, LoopState(status={}), lambda: None))
    await asyncio.sleep(0.2)
    second = asyncio.create_task(loops.reconcile_once(b, LoopState(status={}), lambda: None))
    await asyncio.sleep(0.3)
    assert fake.connection.job_slots.per_namespace == 1 and "create b" not in backend.calls, backend.calls
    b["metadata"]["annotations"]["incus.truenas.io/paused"] = "true"
    assert backend.gate is not None
    backend.gate.set()
    await asyncio.gather(first, second)
    assert "create a" in backend.calls and "create b" not in backend.calls, backend.calls
    assert not any(
        k[1].startswith("tio-owner") and v["data"].get("instance") == "b" for k, v in fake.kube.configmaps.items()
    )


@pytest.mark.parametrize(
    "switch",
    [
        lambda body: body["metadata"]["annotations"].update({"incus.truenas.io/paused": "true"}),
        lambda body: body["spec"].update({"managementPolicy": "ObserveOnly"}),
    ],
    ids=["pause", "observe-only"],
)
async def test_a_pause_or_observe_only_set_during_a_pass_stops_its_next_write(switch: Any) -> None:
    """The pass re-reads kopf's live body before every write: set while a create job runs, the stop
    that would follow it is never sent."""
    import asyncio

    from truenas_incus_operator.instances.resource import LoopState

    from .fakes import FakeBackend, fake_operator, resource

    backend = FakeBackend(gate=asyncio.Event())
    fake = fake_operator(backend)
    body = resource(powerState="Stopped")
    running = asyncio.create_task(fake.operator.loops.reconcile_once(body, LoopState(status={}), lambda: None))
    for _ in range(200):
        if "create web01" in backend.calls:
            break
        await asyncio.sleep(0.01)
    assert "create web01" in backend.calls
    switch(body)
    assert backend.gate is not None
    backend.gate.set()
    await running
    assert [c for c in backend.calls if not c.startswith(("get", "list"))] == ["create web01"], backend.calls


# ----- a grant taken back (review M3) -------------------------------------------------------------------------
@pytest.mark.parametrize("route", ["observe-only", "switched-to-full", "paused"])
async def test_an_observation_the_policy_no_longer_grants_ends_and_hides_the_instance(route: str) -> None:
    """The administrator empties policy.observation: the observer's ledger record goes (another may
    then take the instance, as the policy says) and the status stops mirroring it at once."""
    from truenas_incus_operator.instances.ledger import record_name
    from truenas_incus_operator.instances.resource import LoopState
    from truenas_incus_operator.policy import Grant, Policy

    from .fakes import LEDGER_NAMESPACE, TRUENAS, FakeBackend, fake_operator, resource
    from .fakes import observed as fake_observed

    seen = fake_observed("web01", cpu="4", environment={"DB_PASSWORD": "hunter2"})
    backend = FakeBackend(instances={"web01": seen})
    granted = Policy(observation=[Grant(namespaces=["apps"], connections=["<default>"])])
    fake = fake_operator(backend, policy=granted)
    body = resource(managementPolicy="ObserveOnly", cpu="2")
    state = LoopState(status={})
    await fake.operator.loops.reconcile_once(body, state, lambda: None)
    key = (LEDGER_NAMESPACE, record_name(TRUENAS, "web01"))
    assert fake.kube.configmaps[key]["data"]["state"] == "observed"
    assert fake.kube.statuses("web01")[-1]["cpu"] == "4"

    fake.operator.loops.policy = Policy()  # the grant is taken back (a policy reload)
    if route == "switched-to-full":  # the tenant's dodge: Full, no adopt annotation (review round 2, R1)
        body["spec"].pop("managementPolicy")
        body["metadata"]["generation"] = 2
    elif route == "paused":
        body["metadata"]["annotations"]["incus.truenas.io/paused"] = "true"
    await fake.operator.loops.reconcile_once(body, state, lambda: None)
    assert key not in fake.kube.configmaps, "the observer's record is released"
    last = fake.kube.statuses("web01")[-1]
    synced = next(c for c in last["conditions"] if c["type"] == "Synced")
    expected = {"observe-only": "ObserveNotAllowed", "switched-to-full": "AlreadyExists"}
    assert synced["reason"] == expected.get(route, "ReconciliationPaused"), synced
    assert last.get("cpu") is None and not last.get("instanceId"), "nothing of the instance is shown any more"
    assert not last.get("ipAddresses") and not last.get("image"), last
    assert ("Normal", "Released", "stopped observing web01 on TrueNAS: the policy no longer allows it") in fake.events
    assert backend.calls == [] or all(c.startswith(("get", "list")) for c in backend.calls), backend.calls


# ----- deletion of a spec the models refuse (review M4) ---------------------------------------------------
@pytest.mark.parametrize(
    "spec",
    [
        {"managementPolicy": "ObserveOnly", "deletionPolicy": "Orphan", "stopTimeoutSeconds": 10**9},
        {"managementPolicy": "ObserveOnly", "stopTimeoutSeconds": -1},
        {"deletionPolicy": "Orphan", "name": "bad name!"},
        {"managementPolicy": "Watch"},  # a value this operator does not know: the safe side
        {"deletionPolicy": "Keep"},
        {"deletionPolicy": "Orphan", "managementPolicy": 7},
    ],
)
def test_a_spec_the_models_refuse_never_turns_orphan_into_delete(spec: dict[str, Any]) -> None:
    from truenas_incus_operator.instances.resource import deletion_view

    from .fakes import resource

    body = resource(memory="1Ki", **spec)  # memory alone already fails the full parse
    assert deletion_view(body).deletion_policy == "Orphan", spec


def test_a_spec_the_models_refuse_keeps_each_field_that_parses() -> None:
    from truenas_incus_operator.instances.resource import deletion_view

    from .fakes import resource

    view = deletion_view(resource(memory="1Ki", stopTimeoutSeconds=-1, deletionPolicy="Delete", name="db01"))
    assert view.deletion_policy == "Delete" and view.instance_name == "db01"


# ----- a clone of an observed instance's snapshot (review L3) ----------------------------------------------
async def test_a_snapshot_of_an_instance_the_namespace_only_observes_is_not_cloned() -> None:
    """A snapshot an earlier Full owner took, of an instance a resource of the namespace now only
    observes: a clone would pin that instance's snapshot (it could no longer be destroyed nor rolled
    back past), so it is refused, as for an instance the namespace does not own."""
    from types import SimpleNamespace

    from truenas_incus_operator.instances.ledger import Ledger
    from truenas_incus_operator.problems import OperatorError
    from truenas_incus_operator.snapshots.cloning import CloneSources

    from .fakes import LEDGER_NAMESPACE, FakeKube

    class Kube(FakeKube):
        async def read_object(self, plural: str, namespace: str, name: str) -> dict[str, Any] | None:
            meta = {"name": name, "namespace": namespace, "uid": "snap-uid"}
            return {"metadata": meta, "status": {"phase": "Ready"}}

    kube = Kube()
    instances, snapshots = Ledger(kube, LEDGER_NAMESPACE), Ledger(kube, LEDGER_NAMESPACE, "snapshots")
    kwargs = {"connection": "<default>", "deletion_policy": "Orphan"}
    await instances.claim("nas-1", "src", owner_uid="obs", owner="apps/src", state=RecordState.OBSERVED, **kwargs)
    await snapshots.claim(
        "nas-1", "src@tio-1", owner_uid="snap-uid", owner="apps/s", state=RecordState.CREATED, **kwargs
    )
    client = SimpleNamespace(instances=SimpleNamespace(family="virt.instance+vm"))
    cache = SimpleNamespace(get=lambda name: None)
    connection = SimpleNamespace(key="<default>", identity="nas-1", version="25.10.0", client=client, cache=cache)
    spec = IncusInstanceSpec.model_validate({"type": "VM", "source": {"snapshotRef": {"name": "s"}}})
    clone = Desired("apps", "copy", 1, spec, uid="copy-uid")
    sources = CloneSources(kube, snapshots, instances=instances)
    with pytest.raises(OperatorError) as refused:
        await sources.resolve(clone, connection)  # type: ignore[arg-type]
    assert refused.value.problem.reason == Reason.SOURCE_NOT_READY and "owns now" in refused.value.problem.message
    held = instances.get("nas-1", "src")
    assert held is not None
    await instances.release(held)
    await instances.claim("nas-1", "src", owner_uid="own", owner="apps/src", state=RecordState.CREATED, **kwargs)
    found = await sources.resolve(clone, connection)  # type: ignore[arg-type]
    assert (found.instance, found.snapshot) == ("src", "tio-1"), "an instance the namespace owns is cloned"


# ----- the reaper and a paused resource (review L2) ---------------------------------------------------------
async def test_a_paused_resource_s_ledger_record_says_orphan_until_it_resumes() -> None:
    """The reaper acts on the ledger when a resource vanished unseen: while paused, the record says
    Orphan (a paused resource's instance is never deleted), and Delete again once it resumes."""
    from truenas_incus_operator.instances.ledger import record_name
    from truenas_incus_operator.instances.resource import LoopState

    from .fakes import LEDGER_NAMESPACE, TRUENAS, fake_operator, resource

    fake = fake_operator()
    body = resource()
    state = LoopState(status={})
    key = (LEDGER_NAMESPACE, record_name(TRUENAS, "web01"))

    async def once() -> str:
        await fake.operator.loops.reconcile_once(body, state, lambda: None)
        return str(fake.kube.configmaps[key]["data"].get("deletionPolicy"))

    await once()
    assert await once() == "Delete"
    body["metadata"]["annotations"]["incus.truenas.io/paused"] = "true"
    assert await once() == "Orphan"
    del body["metadata"]["annotations"]["incus.truenas.io/paused"]
    assert await once() == "Delete"


# ----- a paused ObserveOnly resource (review L5) -----------------------------------------------------------
async def test_a_paused_observe_only_resource_reports_observation_not_fulls_plan() -> None:
    from truenas_incus_operator.instances.resource import LoopState
    from truenas_incus_operator.policy import Grant, Policy

    from .fakes import FakeBackend, fake_operator, resource
    from .fakes import observed as fake_observed

    backend = FakeBackend(instances={"web01": fake_observed("web01", cpu="4", status="STOPPED")})
    fake = fake_operator(backend, policy=Policy(observation=[Grant()]))
    paused = {"incus.truenas.io/paused": "true"}
    # Paused before it was ever observed: nothing of the instance is shown, nothing is recorded.
    body = resource(managementPolicy="ObserveOnly", cpu="2", annotations=paused)
    state = LoopState(status={})
    await fake.operator.loops.reconcile_once(body, state, lambda: None)
    first = fake.kube.statuses("web01")[-1]
    assert first.get("cpu") is None and not any(k[1].startswith("tio-owner") for k in fake.kube.configmaps)
    # Observed, then paused: Synced says it only observes, InSync keeps the dry run.
    del body["metadata"]["annotations"]["incus.truenas.io/paused"]
    await fake.operator.loops.reconcile_once(body, state, lambda: None)
    body["metadata"]["annotations"].update(paused)
    await fake.operator.loops.reconcile_once(body, state, lambda: None)
    last = fake.kube.statuses("web01")[-1]
    found = {c["type"]: c for c in last["conditions"]}
    assert found["Paused"]["status"] == "True" and found["Synced"]["reason"] == "ReconciliationPaused"
    assert "would start" not in found["Synced"]["message"] and "only observes" in found["Synced"]["message"]
    assert found["InSync"]["reason"] == "Differs" and "start it" in found["InSync"]["message"]
    assert backend.calls == [] or all(c.startswith(("get", "list")) for c in backend.calls), backend.calls


async def test_adopting_an_observed_instance_records_the_new_owners_deletion_policy() -> None:
    from truenas_incus_operator.instances.ledger import record_name
    from truenas_incus_operator.instances.resource import LoopState
    from truenas_incus_operator.policy import Grant, Policy

    from .fakes import LEDGER_NAMESPACE, TRUENAS, FakeBackend, fake_operator, resource
    from .fakes import observed as fake_observed

    backend = FakeBackend(instances={"web01": fake_observed("web01")})
    fake = fake_operator(backend, policy=Policy(observation=[Grant()], adoption=[Grant()]))
    body = resource(managementPolicy="ObserveOnly")
    state = LoopState(status={})
    await fake.operator.loops.reconcile_once(body, state, lambda: None)
    key = (LEDGER_NAMESPACE, record_name(TRUENAS, "web01"))
    assert fake.kube.configmaps[key]["data"]["state"] == "observed"
    adopting = resource(annotations={"incus.truenas.io/adopt": "true"}, deletionPolicy="Delete")
    await fake.operator.loops.reconcile_once(adopting, state, lambda: None)
    data = fake.kube.configmaps[key]["data"]
    assert data["state"] == "adopted" and data["deletionPolicy"] == "Delete", data


async def test_a_pause_set_while_a_deletion_stops_the_instance_keeps_the_instance() -> None:
    """The deletion reads the resource again before each step (review round 2, R8): paused during the
    stop, the delete that would follow is not sent; the deletion waits for the resume."""
    import asyncio
    import copy

    from truenas_incus_operator.instances.resource import LoopState
    from truenas_incus_operator.problems import OperatorError

    from .fakes import FakeBackend, fake_operator, resource

    release = asyncio.Event()

    class SlowStop(FakeBackend):
        async def stop(self, name: str, timeout: int | None = None, force: bool = False) -> None:
            await release.wait()
            await super().stop(name, timeout, force)

    backend = SlowStop()
    fake = fake_operator(backend)
    body = resource()
    await fake.operator.loops.reconcile_once(body, LoopState(status={}), lambda: None)
    assert "web01" in backend.instances
    deleting = resource(deleting=True)
    fake.kube.incus_instances[("apps", "web01")] = copy.deepcopy(deleting)
    task = asyncio.create_task(fake.operator.deletion.delete(deleting, 0))
    for _ in range(100):
        if "stop web01" in backend.calls or task.done():
            break
        await asyncio.sleep(0.01)
    fake.kube.incus_instances[("apps", "web01")]["metadata"]["annotations"]["incus.truenas.io/paused"] = "true"
    release.set()
    with pytest.raises(OperatorError) as waiting:
        await task
    assert waiting.value.retry_after is not None and waiting.value.problem.reason == "ReconciliationPaused"
    assert "delete web01" not in backend.calls and "web01" in backend.instances, backend.calls
