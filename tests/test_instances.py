"""The instance loops, claims, wake-ups, deletion and the connection cache, with fakes
(tests/fakes.py): no cluster, no simulator, no subprocess."""

from __future__ import annotations

import asyncio
import functools
from typing import Any

import jsonschema
import pytest

from truenas_incus_operator.connections import (
    Connection,
    ConnectionConfig,
    ConnectionManager,
    ConnectionResources,
    InstanceCache,
)
from truenas_incus_operator.connections.resources import _Reported
from truenas_incus_operator.crd import incus_instance_crd
from truenas_incus_operator.instances import deletion, executor
from truenas_incus_operator.instances.ledger import record_name
from truenas_incus_operator.instances.resource import LoopState
from truenas_incus_operator.policy import Grant, Policy
from truenas_incus_operator.problems import OperatorError, Problem, Reason
from truenas_incus_operator.settings import Settings
from truenas_incus_operator.truenas import FieldError, Secret, TrueNASClient, ValidationFailed

from .fakes import (
    LEDGER_NAMESPACE,
    TRUENAS,
    FakeBackend,
    FakeKube,
    FakeOperator,
    NoTransport,
    fake_operator,
    observed,
    resource,
)


def no_wake() -> None:
    return None


async def one_pass(fake: FakeOperator, body: dict[str, Any], state: LoopState | None = None) -> LoopState:
    state = state or LoopState(status={})
    await fake.operator.loops.reconcile_once(body, state, no_wake)
    return state


def conditions(status: dict[str, Any]) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["reason"]) for c in status["conditions"]}


# ----- the loop ------------------------------------------------------------------------------------------
def ledger_record(fake: FakeOperator, instance: str = "web01") -> dict[str, str]:
    body = fake.kube.configmaps.get((LEDGER_NAMESPACE, record_name(TRUENAS, instance)))
    assert body is not None, f"no ledger record for {instance}"
    data: dict[str, str] = body["data"]
    return data


async def test_a_pass_records_ownership_before_it_creates_then_reports_running() -> None:
    fake = fake_operator()
    order = fake.kube.calls  # Kubernetes and TrueNAS calls, in the order they happened
    fake.backend.on_call = order.append
    state = await one_pass(fake, resource(cpu="2"))
    assert order.index("create_configmap") < order.index("create web01")
    record = ledger_record(fake)
    assert record["ownerUID"] == "uid-web01" and record["owner"] == "apps/web01" and record["state"] == "created"
    assert not [p for p in fake.kube.patches if p.kind == "annotations"], "ownership is not an annotation"
    assert fake.backend.instances["web01"].cpu == "2"
    last = fake.kube.statuses("web01")[-1]
    assert last["phase"] == "Running" and last["instanceId"] == "web01"
    assert conditions(last) == {"Ready": ("True", "Available"), "Synced": ("True", "ReconcileSuccess")}
    assert state.failures == 0
    assert ("Normal", "Created", "created CONTAINER web01 on TrueNAS") in fake.events


async def test_a_second_pass_with_nothing_to_do_writes_nothing() -> None:
    fake = fake_operator()
    body = resource()
    state = await one_pass(fake, body)
    writes = len(fake.kube.patches)
    calls = len(fake.backend.calls)
    await one_pass(fake, body, state)
    assert len(fake.kube.patches) == writes, "an unchanged status is not written again, however long idle"
    assert fake.backend.calls[calls:] == [], "a converged pass reads only the cache"


async def test_an_existing_foreign_instance_is_never_touched_whatever_the_annotations_say() -> None:
    fake = fake_operator(FakeBackend(instances={"web01": observed("web01", environment={"A": "1"})}))
    forged = {"incus.truenas.io/created-instance": "web01"}
    await one_pass(fake, resource(environment={"B": "2"}, annotations=forged))
    assert fake.backend.calls == [], "no create, no update, no stop"
    last = fake.kube.statuses("web01")[-1]
    assert conditions(last)["Synced"] == ("False", "AlreadyExists")
    assert (last["instanceId"] is None and "cpu" not in last) or last["cpu"] is None
    assert [e for e in fake.events if e[1] == "AlreadyExists"]
    assert fake.kube.configmaps == {}


async def test_adoption_needs_the_annotation_and_the_administrators_policy() -> None:
    existing = {"web01": observed("web01", environment={"A": "1"})}
    asked = {"incus.truenas.io/adopt": "true"}
    refused = fake_operator(FakeBackend(instances=dict(existing)))
    await one_pass(refused, resource(environment={"B": "2"}, annotations=asked))
    assert refused.backend.calls == []
    assert conditions(refused.kube.statuses("web01")[-1])["Synced"] == ("False", "AdoptionNotAllowed")
    policy = Policy(adoption=[Grant(namespaces=["apps"], connections=["<default>"])])
    allowed = fake_operator(FakeBackend(instances=dict(existing)), policy=policy)
    await one_pass(allowed, resource(environment={"B": "2"}, annotations=asked))
    assert ledger_record(allowed)["state"] == "adopted"
    assert allowed.backend.instances["web01"].environment == {"B": "2"}
    other_namespace = fake_operator(FakeBackend(instances=dict(existing)), policy=policy)
    await one_pass(other_namespace, resource(namespace="tenant", environment={"B": "2"}, annotations=asked))
    assert other_namespace.backend.calls == []


async def test_a_failing_pass_backs_off_and_posts_one_event_per_distinct_problem() -> None:
    fake = fake_operator()
    fake.connection.detach()
    body = resource()
    state = LoopState(status={})
    delays = [await fake.operator.loops.reconcile_once(body, state, no_wake) for _ in range(4)]
    assert delays[1] > delays[0] * 1.2 and delays[3] > delays[1], f"exponential backoff: {delays}"
    assert [e[1] for e in fake.events] == ["Connecting"], "one Event for four failures"
    assert conditions(fake.kube.statuses("web01")[-1])["Synced"] == ("False", "Connecting")


async def test_an_invalid_spec_is_reported_not_raised() -> None:
    fake = fake_operator()
    body = resource(memory="1Ki")
    state = await one_pass(fake, body)
    last = fake.kube.statuses("web01")[-1]
    assert last["phase"] == "Error" and conditions(last)["Synced"] == ("False", "InvalidSpec")
    assert "memory" in last["message"]
    assert fake.backend.calls == []
    assert state.posted is not None


# ----- ownership across resources and restarts --------------------------------------------------------------
async def test_the_first_resource_to_claim_holds_the_instance_and_the_other_reports_conflict() -> None:
    fake = fake_operator()
    first = resource("a", instance="shared")
    second = resource("b", instance="shared")
    await one_pass(fake, first)
    assert fake.backend.calls.count("create shared") == 1
    calls = len(fake.backend.calls)
    await one_pass(fake, second)
    assert fake.backend.calls[calls:] == [], "the other resource does nothing"
    assert conditions(fake.kube.statuses("b")[-1])["Synced"] == ("False", "Conflict")
    assert "another IncusInstance" in fake.kube.statuses("b")[-1]["message"], "the holder is not named (issue 19)"
    # Deleting the blocked resource leaves the holder's instance alone.
    await fake.operator.deletion.delete(resource("b", instance="shared", deleting=True), 0)
    assert "shared" in fake.backend.instances and ledger_record(fake, "shared")["owner"] == "apps/a"


async def test_ownership_survives_a_restart() -> None:
    fake = fake_operator()
    await one_pass(fake, resource("a", instance="shared"))
    restarted = fake_operator(fake.backend)
    restarted.kube.configmaps = fake.kube.configmaps
    await restarted.operator.ledger.load()
    restarted.connection.cache.replace_all(fake.backend.instances.values())
    calls = len(fake.backend.calls)
    await one_pass(restarted, resource("b", instance="shared", environment={"X": "1"}))
    assert fake.backend.calls[calls:] == [], "a younger resource never acts before the owner is back"
    assert conditions(restarted.kube.statuses("b")[-1])["Synced"] == ("False", "Conflict")


# ----- wake-ups ----------------------------------------------------------------------------------------------
def test_wakeups_ignore_the_operators_own_writes() -> None:
    fake = fake_operator()
    wakeups = fake.operator.wakeups
    event = wakeups.register(("apps", "web01"))
    body = resource()
    wakeups.resource_changed(body)
    assert event.is_set()
    event.clear()
    body["status"] = {"phase": "Running"}
    body["metadata"]["annotations"]["incus.truenas.io/last-handled-configuration"] = "{}"
    wakeups.resource_changed(body)
    assert not event.is_set(), "status and kopf's annotations are the operator's own writes"
    paused = {"incus.truenas.io/adopt": "true", "incus.truenas.io/paused": "true"}
    changes = (
        {"generation": 2},
        {"annotations": {"incus.truenas.io/adopt": "true"}},
        {"annotations": paused},  # pausing stops writes now, not at the next resync
        {"annotations": {"incus.truenas.io/adopt": "true"}},  # and so does resuming
        {"deletionTimestamp": "x"},
    )
    for change in changes:
        body["metadata"].update(change)
        wakeups.resource_changed(body)
        assert event.is_set(), change
        event.clear()


def test_wakeups_forget_deleted_resources() -> None:
    fake = fake_operator()
    wakeups = fake.operator.wakeups
    for index in range(50):
        wakeups.resource_changed(resource(f"r{index}"))
    for index in range(50):
        wakeups.resource_deleted(("apps", f"r{index}"))
    assert wakeups.signatures == {}


# ----- deletion ----------------------------------------------------------------------------------------------
async def test_deletion_waits_for_a_create_in_flight_then_deletes_it() -> None:
    backend = FakeBackend(gate=asyncio.Event())
    fake = fake_operator(backend)
    body = resource()
    creating = asyncio.create_task(one_pass(fake, body))
    for _ in range(100):
        if "create web01" in backend.calls:
            break
        await asyncio.sleep(0.01)
    deleting = resource(deleting=True)
    with pytest.raises(OperatorError) as waiting:
        await fake.operator.deletion.delete(deleting, 0)
    assert waiting.value.problem.reason == "CreateInProgress" and waiting.value.retry_after
    assert "delete web01" not in backend.calls
    assert backend.gate is not None
    backend.gate.set()
    await creating
    await fake.operator.deletion.delete(deleting, 1)
    assert "web01" not in backend.instances
    assert backend.calls.index("stop web01") < backend.calls.index("delete web01")
    assert ("Normal", "Deleted", "deleted web01 on TrueNAS") in fake.events


async def test_deletion_leaves_an_instance_it_never_managed() -> None:
    fake = fake_operator(FakeBackend(instances={"web01": observed("web01")}))
    forged = {"incus.truenas.io/created-instance": "web01", "incus.truenas.io/adopt": "true"}
    await fake.operator.deletion.delete(resource(deleting=True, annotations=forged), 0)
    assert "web01" in fake.backend.instances
    assert not [c for c in fake.backend.calls if c.startswith(("stop", "delete"))]


async def test_a_failing_delete_posts_one_event_per_distinct_problem(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = fake_operator()
    await one_pass(fake, resource())  # it owns web01
    fake.connection.detach()
    fake.events.clear()
    body = resource(deleting=True)
    monkeypatch.setattr(deletion, "CONNECT_WAIT_SECONDS", 0.01)
    for retry in range(3):
        with pytest.raises(OperatorError):
            await fake.operator.deletion.delete(body, retry)
    assert [e[1] for e in fake.events] == ["Unreachable"]


async def test_a_resource_that_owns_nothing_is_deleted_without_its_connection() -> None:
    fake = fake_operator()
    fake.operator.connections.connections.clear()  # its TrueNASConnection is gone
    await fake.operator.deletion.delete(resource(connectionRef={"name": "gone"}, deleting=True), 0)
    assert fake.backend.calls == []


# ----- the connection's cache ------------------------------------------------------------------------------
def cache_with_lookups() -> tuple[InstanceCache, list[str]]:
    lookups: list[str] = []
    return InstanceCache(lookups.append), lookups


def test_cache_changed_before_added_asks_for_a_lookup() -> None:
    """Real TrueNAS can send ``changed`` {status} for an instance before its ``added``."""
    cache, lookups = cache_with_lookups()
    woken: list[str] = []
    cache.listen("c1", lambda: woken.append("c1"))
    cache.apply_event("changed", "c1", {"id": "c1", "status": "RUNNING"}, lambda f: None)
    assert cache.get("c1") is None and lookups == ["c1"] and woken == []


def test_cache_status_only_changes_update_status_and_drop_addresses_when_not_running() -> None:
    cache, lookups = cache_with_lookups()
    cache.store("c1", observed("c1"))
    woken: list[str] = []
    cache.listen("c1", lambda: woken.append("c1"))
    cache.apply_event("changed", "c1", {"id": "c1", "status": "STOPPED"}, lambda f: None)
    current = cache.get("c1")
    assert current is not None and current.status == "STOPPED" and current.addresses == ()
    assert woken == ["c1"] and lookups == []
    cache.apply_event("changed", "c1", {"id": "c1", "status": "RUNNING"}, lambda f: None)
    assert lookups == ["c1"], "addresses only come with a full read"


def test_cache_full_entries_removals_and_no_wake_without_change() -> None:
    cache, lookups = cache_with_lookups()
    woken: list[str] = []
    cache.listen("c1", lambda: woken.append("c1"))
    backend = FakeBackend()
    full = {"name": "c1", "status": "RUNNING", "type": "CONTAINER"}
    cache.apply_event("added", "c1", full, backend.instance_from_event)
    cache.apply_event("changed", "c1", full, backend.instance_from_event)
    assert woken == ["c1"], "the same observation twice wakes once"
    cache.apply_event("removed", "c1", None, backend.instance_from_event)
    assert cache.get("c1") is None and woken == ["c1", "c1"] and lookups == []


def test_cache_replace_all_wakes_only_what_changed() -> None:
    cache, _ = cache_with_lookups()
    cache.replace_all([observed("a"), observed("b")])
    woken: list[str] = []
    for name in ("a", "b", "c"):
        cache.listen(name, functools.partial(woken.append, name))
    cache.replace_all([observed("a"), observed("b", status="STOPPED"), observed("c")])
    assert sorted(woken) == ["b", "c"]
    cache.unlisten("a", no_wake)
    cache.notify_all()
    assert sorted(woken) == ["a", "b", "b", "c", "c"]


# ----- devices: removal and drift ------------------------------------------------------------------------------
DISK = {"name": "data", "type": "DISK", "source": "/mnt/tank/data", "destination": "/data"}


async def test_removing_the_last_device_or_the_whole_field_removes_it_on_truenas() -> None:
    laters: list[dict[str, Any]] = [{"devices": []}, {}]
    for later in laters:
        fake = fake_operator()
        state = await one_pass(fake, resource(devices=[DISK]))
        assert [d.name for d in fake.backend.devices["web01"]] == ["data"]
        await one_pass(fake, resource(generation=2, **later), state)
        assert fake.backend.devices["web01"] == [], later
        assert "delete_device web01 data" in fake.backend.calls


async def test_an_adopted_instance_keeps_its_devices_until_the_spec_manages_them() -> None:
    backend = FakeBackend(instances={"web01": observed("web01")})
    from truenas_incus_operator.truenas import DeviceConfig

    backend.devices["web01"] = [DeviceConfig("gpu0", "GPU")]
    policy = Policy(adoption=[Grant()])
    fake = fake_operator(backend, policy=policy)
    asked = {"incus.truenas.io/adopt": "true"}
    state = await one_pass(fake, resource(annotations=asked))
    assert [d.name for d in backend.devices["web01"]] == ["gpu0"], "no devices in the spec: left alone"
    state = await one_pass(fake, resource(annotations=asked, generation=2, devices=[DISK]), state)
    assert [d.name for d in backend.devices["web01"]] == ["data"], "now the spec's devices are applied"
    assert ledger_record(fake)["devices"] == "managed"
    await one_pass(fake, resource(annotations=asked, generation=3), state)
    assert backend.devices["web01"] == [], "and removing the field removes them"


async def test_devices_changed_outside_the_operator_are_restored_within_the_audit_rotation() -> None:
    fake = fake_operator()
    fake.connection.device_audits_per_resync = 2
    states = {}
    for name in ("a", "b", "c", "d", "e"):
        fake.connection.cache.listen(name, no_wake)
        states[name] = await one_pass(fake, resource(name, devices=[DISK]))
        await one_pass(fake, resource(name, devices=[DISK]), states[name])  # compared once after the create
    fake.backend.devices["c"] = []  # removed in the TrueNAS UI
    for _ in range(3):  # three resync intervals: 2 audits each covers all five
        await fake.connection.refresh()
        fake.connection._schedule_device_audits()
        before = len(fake.backend.calls)
        for name in ("a", "b", "c", "d", "e"):
            await one_pass(fake, resource(name, devices=[DISK]), states[name])
        audited = {c for c in fake.backend.calls[before:] if c.startswith("list_devices")}
        assert len(audited) <= 2, f"at most device_audits_per_resync instances per interval: {audited}"
    assert [d.name for d in fake.backend.devices["c"]] == ["data"]
    assert any(e[1] == "DriftCorrected" and "adding data" in e[2] for e in fake.events)


async def test_the_running_create_job_shows_in_status_and_goes_when_it_ends(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(executor, "JOB_REPORT_SECONDS", 0.01)
    backend = FakeBackend(gate=asyncio.Event())
    fake = fake_operator(backend)
    creating = asyncio.create_task(one_pass(fake, resource()))

    def job_shown() -> dict[str, Any] | None:
        return next((s["job"] for s in fake.kube.statuses("web01") if s.get("job")), None)

    for _ in range(200):
        if job_shown():
            break
        await asyncio.sleep(0.01)
    assert job_shown() == {
        "id": 41, "method": "virt.instance.create", "state": "RUNNING", "progress": 30,
        "description": "Downloading image",
    }  # fmt: skip
    assert fake.kube.statuses("web01")[-1]["phase"] == "Creating"
    assert backend.gate is not None
    backend.gate.set()
    await creating
    last = fake.kube.statuses("web01")[-1]
    assert last["phase"] == "Running" and last["job"] is None, "cleared (a null in the merge patch removes it)"


# ----- events racing reads (issue 12, item 4: no lost drift events) ---------------------------------------
async def test_a_full_query_answered_before_an_event_does_not_undo_it() -> None:
    """The lost drift event: TrueNAS answers the resync query (RUNNING), an out-of-band stop's event
    arrives before the connection has applied that answer, and the older answer overwrote the stop
    until the next resync (25.5 s in the benchmark)."""
    fake = fake_operator()
    body = resource(powerState="Manual")
    state = await one_pass(fake, body)
    assert state.status["phase"] == "Running"
    fake.backend.answer_gate = asyncio.Event()
    query = asyncio.create_task(fake.connection.refresh())
    await asyncio.sleep(0)  # TrueNAS has computed the answer: web01 RUNNING
    assert fake.backend.calls[-1] == "list_instances"
    fake.backend.instances["web01"] = observed("web01", status="STOPPED")  # stopped in the TrueNAS UI
    fake.connection._on_event("changed", "web01", {"id": "web01", "status": "STOPPED"})
    fake.backend.answer_gate.set()  # the older answer comes in after the event
    await query
    current = fake.connection.cache.get("web01")
    assert current is not None and current.status == "STOPPED"
    await one_pass(fake, body, state)
    assert state.status["phase"] == "Stopped"


async def test_a_lookup_answered_before_an_event_does_not_undo_it() -> None:
    """The same race for one instance: the executor's read after its own change is in flight when an
    out-of-band stop's event arrives. Its answer goes back to the caller (what TrueNAS said after the
    caller's action) but not into the cache, which keeps the newer event."""
    fake = fake_operator(FakeBackend(instances={"web01": observed("web01")}))
    fake.connection.cache.replace_all(fake.backend.instances.values())
    fake.backend.answer_gate = asyncio.Event()
    lookup = asyncio.create_task(fake.connection.refresh_one("web01"))
    await asyncio.sleep(0)  # answered: RUNNING
    fake.backend.instances["web01"] = observed("web01", status="STOPPED")
    fake.connection._on_event("changed", "web01", {"id": "web01", "status": "STOPPED"})
    fake.backend.answer_gate.set()
    answer = await lookup
    assert answer is not None and answer.status == "RUNNING"
    current = fake.connection.cache.get("web01")
    assert current is not None and current.status == "STOPPED"
    await asyncio.sleep(0.2)  # the instance is read again, after the settle delay
    current = fake.connection.cache.get("web01")
    assert current is not None and current.status == "STOPPED"
    assert fake.backend.calls.count("get_instance web01") == 2
    await fake.connection.close()


async def test_an_event_during_a_lookup_in_flight_is_not_swallowed() -> None:
    """A RUNNING event whose lookup is refused because one is already in flight (answered before the
    event) still gets its own read."""
    fake = fake_operator(FakeBackend(instances={"web01": observed("web01", status="STOPPED")}))
    fake.connection.cache.replace_all(fake.backend.instances.values())
    fake.backend.answer_gate = asyncio.Event()
    fake.connection._on_event("changed", "web01", {"id": "web01", "status": "RUNNING"})  # lookup 1
    for _ in range(100):
        if fake.backend.calls:
            break
        await asyncio.sleep(0.01)
    assert fake.backend.calls == ["get_instance web01"]  # answered STOPPED, held
    fake.backend.instances["web01"] = observed("web01")
    fake.connection._on_event("changed", "web01", {"id": "web01", "status": "RUNNING"})
    fake.backend.answer_gate.set()
    for _ in range(100):
        if fake.backend.calls.count("get_instance web01") == 2:
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.01)
    current = fake.connection.cache.get("web01")
    assert current is not None and current.status == "RUNNING" and current.addresses == ("10.0.0.2",)
    await fake.connection.close()


# ----- faults (issue 12, item 6) --------------------------------------------------------------------------
def _without_nulls(value: Any) -> Any:
    """A JSON merge patch's nulls delete fields; what the API server stores (and validates) has none."""
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


def crd_refusals(status: dict[str, Any]) -> list[str]:
    """What the IncusInstance CRD's status schema refuses in ``status`` (maxLength, enums, types)."""
    schema = incus_instance_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]
    validator = jsonschema.Draft7Validator(schema)
    return [
        f"{'.'.join(map(str, e.absolute_path))}: {e.message[:80]}"
        for e in validator.iter_errors(_without_nulls(status))
    ]


async def test_a_40_kib_truenas_message_gives_a_status_patch_the_crd_accepts() -> None:
    """TrueNAS messages can be huge (tracebacks): a 40 KiB one made the status patch fail (422,
    conditions[].message is at most 32768), so the user saw nothing at all."""
    huge = "Traceback (most recent call last): " + "x" * (40 * 1024)

    def refuse(call: str) -> None:
        if call.startswith("create"):
            raise ValidationFailed([FieldError("virt_instance_create.image", huge)])

    fake = fake_operator(FakeBackend(on_call=refuse))
    state = await one_pass(fake, resource())
    statuses = fake.kube.statuses("web01")
    assert statuses, "a status was written"
    assert conditions(statuses[-1])["Synced"] == ("False", "ValidationFailed")
    for status in statuses:
        assert crd_refusals(status) == []
    synced = next(c for c in state.status["conditions"] if c["type"] == "Synced")
    assert synced["message"].startswith("virt_instance_create.image: Traceback") and "(truncated)" in synced["message"]
    assert len(synced["message"]) <= 4096 and len(state.status["message"]) <= 4096
    assert [len(message) <= 1024 for _, _, message in fake.events] == [True]
    assert crd_refusals({"conditions": [{**synced, "message": huge}]}), "the schema check itself can fail"


class GatedKube(FakeKube):
    """Holds status patches until ``gate`` is set, as a slow API server would."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()

    async def patch_status(self, plural: str, namespace: str, name: str, status: dict[str, Any]) -> None:
        await self.gate.wait()
        await super().patch_status(plural, namespace, name, status)


async def test_a_connection_state_change_during_a_status_write_is_written_too() -> None:
    """Ready must follow the connection: a change that came while the previous one was being
    written was dropped, leaving Ready=False on a connection that had come back (or the reverse)."""
    kube = GatedKube()
    manager = ConnectionManager(30.0, 300.0)
    resources = ConnectionResources(Settings(ledger_namespace=LEDGER_NAMESPACE), kube, manager)
    resources._reported["apps/nas"] = _Reported("apps", "nas", 1, {})
    connection = Connection(
        "apps/nas", ConnectionConfig(url="wss://nas.invalid", api_key=Secret("1-x")), resync_seconds=30
    )
    connection.detach(Problem(Reason.UNREACHABLE, "TrueNAS went away"))
    resources._state_changed(connection)  # lost: its write is held by the API server
    await asyncio.sleep(0)
    connection.attach(TrueNASClient(NoTransport(), FakeBackend(), (25, 10), "TrueNAS-25.10.1"))  # type: ignore[arg-type]
    resources._state_changed(connection)  # back, while the first write is in flight
    kube.gate.set()
    for _ in range(100):
        if not resources._writes:
            break
        await asyncio.sleep(0.01)
    written = [conditions(p.body)["Ready"] for p in kube.patches]
    assert written[-1] == ("True", "Connected"), written
