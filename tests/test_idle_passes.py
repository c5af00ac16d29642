"""Idle work flat in N (issue 27 item 1): a loop whose inputs did not move since its last pass that
had nothing to do makes no pass (no parse, plan or render), and any input that moves brings the full
pass back. With fakes (tests/fakes.py): no cluster, no simulator."""

from __future__ import annotations

import asyncio
import contextlib
import random
from dataclasses import replace
from typing import Any

import pytest
from prometheus_client import generate_latest

from truenas_incus_operator.connections import InstanceCache
from truenas_incus_operator.instances import loop as loop_module
from truenas_incus_operator.instances import resource as resource_module
from truenas_incus_operator.instances.exposure import Exposer
from truenas_incus_operator.instances.ledger import Ledger, Record, RecordState
from truenas_incus_operator.instances.resource import LoopState
from truenas_incus_operator.kube import KUBE_REASON
from truenas_incus_operator.metrics import Metrics
from truenas_incus_operator.policy import Grant, Policy
from truenas_incus_operator.problems import fail
from truenas_incus_operator.reconcile import Hold
from truenas_incus_operator.truenas import InstanceStatus

from .fakes import TRUENAS, FakeKube, FakeOperator, fake_operator, observed, resource
from .test_expose import MemoryKube


def no_wake() -> None:
    return None


class Parses:
    """Counts the loop's parses of the body (``desired_from``): the costly part of a pass."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        real = resource_module.desired_from

        def counting(body: Any, *args: Any) -> Any:
            self.count += 1
            return real(body, *args)

        monkeypatch.setattr(loop_module, "desired_from", counting)


async def settle(fake: FakeOperator, body: dict[str, Any], state: LoopState) -> None:
    """Passes until one settles with nothing to do (a create takes two: the second sees what it made)."""
    for _ in range(4):
        await fake.operator.loops.reconcile_once(body, state, no_wake)
        if state.settled is not None:
            return
    raise AssertionError(f"never settled: {state.status}")


async def idle_pass(fake: FakeOperator, body: dict[str, Any], state: LoopState, parses: Parses) -> bool:
    """One pass; True when it was skipped: no parse, no TrueNAS call, no Kubernetes write."""
    before = (parses.count, len(fake.backend.calls), len(fake.kube.patches), len(fake.kube.calls))
    delay = await fake.operator.loops.reconcile_once(body, state, no_wake)
    after = (parses.count, len(fake.backend.calls), len(fake.kube.patches), len(fake.kube.calls))
    if state.unchanged:
        assert after == before, "an unchanged pass parses nothing, calls nothing, writes nothing"
        assert 0.9 * 30 <= delay <= 1.1 * 30, "and sleeps one resync interval"
    else:
        assert after[0] == before[0] + 1, "a pass made parses the body once"
    return state.unchanged


async def test_a_settled_loop_skips_its_passes_until_something_moves(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = fake_operator()
    parses = Parses(monkeypatch)
    body, state = resource(cpu="2"), LoopState(status={})
    await settle(fake, body, state)
    assert state.status["phase"] == "Running"
    assert all([await idle_pass(fake, body, state, parses) for _ in range(5)]), "five idle passes, none made"
    assert state.settled is not None


async def test_a_spec_change_brings_the_full_pass_back(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = fake_operator()
    parses = Parses(monkeypatch)
    body, state = resource(cpu="2"), LoopState(status={})
    await settle(fake, body, state)
    body["spec"]["cpu"] = "4"
    body["metadata"]["generation"] = 2  # the API server bumps it with every spec change
    assert not await idle_pass(fake, body, state, parses)
    assert fake.backend.instances["web01"].cpu == "4"


async def test_an_out_of_band_change_brings_the_full_pass_back(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = fake_operator()
    parses = Parses(monkeypatch)
    body, state = resource(), LoopState(status={})
    await settle(fake, body, state)
    assert await idle_pass(fake, body, state, parses)
    stopped = replace(fake.backend.instances["web01"], status=observed("web01", status="STOPPED").status)
    fake.backend.instances["web01"] = stopped
    fake.connection.cache.store("web01", stopped)  # the collection_update event
    assert not await idle_pass(fake, body, state, parses)
    assert state.status["phase"] == "Stopped" or state.failures, "the pass saw the stop"


async def test_the_same_observation_read_again_leaves_the_loop_asleep(monkeypatch: pytest.MonkeyPatch) -> None:
    """The resync query lists every instance as it was: the cache's revision does not move."""
    fake = fake_operator()
    parses = Parses(monkeypatch)
    body, state = resource(), LoopState(status={})
    await settle(fake, body, state)
    fake.connection.cache.replace_all([replace(i) for i in fake.backend.instances.values()])
    assert await idle_pass(fake, body, state, parses)


@pytest.mark.parametrize(
    "moved",
    ["paused", "adopt", "deleting", "binding", "epoch", "down", "audit", "ledger", "owned", "hold", "policy"],
)
async def test_each_input_that_moves_brings_the_full_pass_back(monkeypatch: pytest.MonkeyPatch, moved: str) -> None:
    fake = fake_operator()
    parses = Parses(monkeypatch)
    body, state = resource(), LoopState(status={})
    await settle(fake, body, state)
    assert await idle_pass(fake, body, state, parses)
    loops, connection, ledger = fake.operator.loops, fake.connection, fake.operator.ledger
    record = ledger.get(TRUENAS, "web01")
    assert record is not None
    if moved == "paused":
        body["metadata"]["annotations"]["incus.truenas.io/paused"] = "true"
    elif moved == "adopt":
        body["metadata"]["annotations"]["incus.truenas.io/adopt"] = "true"
    elif moved == "deleting":
        body["metadata"]["deletionTimestamp"] = "2026-11-30T12:00:00Z"
    elif moved == "binding":
        body.setdefault("status", {})["binding"] = {"truenas": "nas-other", "instance": "web01"}
    elif moved == "epoch":
        connection.epoch += 1  # a reconnect
    elif moved == "down":
        connection.ready.clear()
    elif moved == "audit":
        connection.audit_marks["web01"] = 7  # the device audit reached it
    elif moved == "ledger":
        ledger.remember(replace(record, deletion_policy="Orphan"))
    elif moved == "owned":
        ledger.remember(Record(TRUENAS, "web02", record.owner_uid, record.owner, "<default>", RecordState.CREATED))
    elif moved == "hold":
        loops.holds.hold(("apps", "web01"), "uid-r1", Hold("Stopped", "IncusInstanceRestore r1"))
    elif moved == "policy":
        loops.policy = Policy(adoption=[Grant(namespaces=["apps"], connections=["<default>"])])
    before = parses.count
    await loops.reconcile_once(body, state, no_wake)
    assert not state.unchanged and parses.count == before + 1, f"{moved}: the pass is made"


async def test_a_failed_or_blocked_pass_is_never_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    from truenas_incus_operator.problems import Problem, Reason

    fake = fake_operator()
    parses = Parses(monkeypatch)
    fake.backend.instances["web01"] = observed("web01")  # not the operator's: blocked (AlreadyExists)
    fake.connection.cache.store("web01", observed("web01"))
    body, state = resource(), LoopState(status={})
    for _ in range(3):
        assert not await idle_pass(fake, body, state, parses), "blocked: every pass looks again"
    assert state.settled is None and state.status["conditions"][-1]["reason"] == "AlreadyExists"
    failing = fake_operator()
    body, state = resource(), LoopState(status={})
    await settle(failing, body, state)
    failing.connection.problem = Problem(Reason.CONNECTING, "connecting")
    failing.connection.ready.clear()
    for _ in range(3):
        assert not await idle_pass(failing, body, state, parses), "failing: every pass tries again"
    assert state.failures >= 3


async def test_exposed_resources_still_check_their_service_once_per_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]
    fake = fake_operator()
    services = MemoryKube()
    fake.operator.loops.exposer = Exposer(services, 30.0, lambda: now[0])  # type: ignore[arg-type]
    parses = Parses(monkeypatch)
    body = resource(expose={"ports": [{"port": 22}]})
    state = LoopState(status={})
    await settle(fake, body, state)
    assert state.expose.applied is not None and ("create", "services", "web01") in services.writes
    assert await idle_pass(fake, body, state, parses), "checked just now: not due"
    del services.objects[("services", "web01")]  # deleted behind the operator's back
    assert await idle_pass(fake, body, state, parses), "nothing is watched: found at the next check"
    now[0] += 31.0
    assert not await idle_pass(fake, body, state, parses), "a resync later the Service is read again"
    assert ("services", "web01") in services.objects, "and made again"
    assert await idle_pass(fake, body, state, parses)


class FlakyServices(MemoryKube):
    """The API server fails the next ``failing`` Service deletes (a 503, a timeout)."""

    def __init__(self) -> None:
        super().__init__()
        self.failing = 0

    async def delete_exposed(self, kind: str, namespace: str, name: str, uid: str) -> None:
        if self.failing:
            self.failing -= 1
            raise fail(KUBE_REASON, "503 from the API server")
        await super().delete_exposed(kind, namespace, name, uid)


async def test_a_failed_service_removal_is_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    """spec.expose removed, the delete fails once: the pass did not settle, so the next one retries
    (found by a hostile review: the Service kept routing to an un-exposed instance)."""
    now = [1000.0]
    fake = fake_operator()
    services = FlakyServices()
    fake.operator.loops.exposer = Exposer(services, 30.0, lambda: now[0])  # type: ignore[arg-type]
    parses = Parses(monkeypatch)
    body, state = resource(expose={"ports": [{"port": 22}]}), LoopState(status={})
    await settle(fake, body, state)
    del body["spec"]["expose"]
    body["metadata"]["generation"] = 2
    services.failing = 1
    assert not await idle_pass(fake, body, state, parses)
    assert ("services", "web01") in services.objects
    now[0] += 31.0
    assert not await idle_pass(fake, body, state, parses), "retried"
    assert ("services", "web01") not in services.objects
    assert await idle_pass(fake, body, state, parses), "then settled"


async def test_a_wake_up_during_the_settling_pass_is_not_lost(monkeypatch: pytest.MonkeyPatch) -> None:
    """A restore holds the instance stopped when the pass looks and lets go while the pass writes its
    status: the hold reads None before and after, but the release woke the loop, so the next pass is
    made and starts the instance (found by a hostile review)."""
    fake = fake_operator()
    parses = Parses(monkeypatch)
    loops, holds, key = fake.operator.loops, fake.operator.loops.holds, ("apps", "web01")
    loops.wakeups.register(key)  # as InstanceLoops.run does
    body, state = resource(), LoopState(status={})
    await settle(fake, body, state)
    stopped = replace(fake.backend.instances["web01"], status=InstanceStatus.STOPPED, addresses=())
    fake.backend.instances["web01"] = stopped
    fake.connection.cache.store("web01", stopped)
    confirmed: list[Any] = []

    async def confirm(held: Any) -> Hold | None:  # the restore's status, read from the API server
        if not confirmed:
            holds.hold(held, "uid-restore", Hold("Stopped", "IncusInstanceRestore r1"))
        confirmed.append(held)
        return holds.get(held)

    real_patch = fake.kube.patch_status

    async def patch_status(plural: str, namespace: str, name: str, status: dict[str, Any]) -> None:
        holds.release(key, "uid-restore")  # the restore ends while the status is written
        await real_patch(plural, namespace, name, status)

    monkeypatch.setattr(holds, "confirm", confirm)
    monkeypatch.setattr(fake.kube, "patch_status", patch_status)
    loops.wakeups.events[key].clear()
    assert not await idle_pass(fake, body, state, parses)
    assert fake.backend.instances["web01"].status == InstanceStatus.STOPPED, "held: not started"
    monkeypatch.setattr(fake.kube, "patch_status", real_patch)
    loops.wakeups.events[key].clear()  # the loop woke: run() clears it before the next pass
    assert not await idle_pass(fake, body, state, parses), "woken while it ran: the pass is made"
    started = fake.backend.instances["web01"]
    assert started.status == InstanceStatus.RUNNING


async def test_metrics_count_the_skipped_passes_apart(monkeypatch: pytest.MonkeyPatch) -> None:
    metrics = Metrics()
    fake = fake_operator(metrics=metrics)
    body, state = resource(), LoopState(status={})
    await settle(fake, body, state)
    for _ in range(3):
        with metrics.reconcile_pass(("apps", "web01"), state):
            await fake.operator.loops.reconcile_once(body, state, no_wake)
    scrape = generate_latest(metrics.registry).decode()
    assert 'tio_reconcile_passes_total{result="unchanged"} 3.0' in scrape


async def test_a_sleeping_loop_holds_no_task_but_its_own() -> None:
    """10 000 sleeping loops: each is its daemon's task and a timer, not three more tasks waiting on kopf's
    ``stopped`` (5.9 KB a loop instead of 1.3); kopf cancels a daemon to stop it."""
    fake = fake_operator()
    loop = asyncio.create_task(fake.operator.loops.run(resource(), Stopped()))
    for _ in range(100):
        await asyncio.sleep(0.01)
        if fake.operator.metrics.passes.labels("ok")._value.get() >= 1:
            break
    await asyncio.sleep(0.05)
    others = asyncio.all_tasks() - {asyncio.current_task(), loop}
    assert not [t for t in others if "sleep" in repr(t) or "wait" in repr(t)], others
    assert not loop.done()
    loop.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await loop
    assert fake.operator.loops.wakeups.events == {}, "cancelled: it forgot its wake-up"


class Stopped:
    def __bool__(self) -> bool:
        return False


# ----- what the skip stands on ---------------------------------------------------------------------------
def test_the_cache_revision_moves_only_with_a_change() -> None:
    cache = InstanceCache(lambda name: None)
    assert cache.revision("a") == 0
    cache.replace_all([observed("a"), observed("b")])
    first = cache.revision("a")
    assert first > 0
    cache.replace_all([observed("a"), observed("b")])
    cache.store("a", observed("a"))
    assert cache.revision("a") == first, "the same observation again is no change"
    cache.store("a", observed("a", status="STOPPED"))
    assert cache.revision("a") > first
    cache.replace_all([observed("b")])
    assert cache.revision("a") == 0, "gone"


def test_the_ledger_index_by_owner_matches_a_scan() -> None:
    ledger = Ledger(FakeKube(), "ops")
    rng = random.Random(27)
    for _ in range(2000):
        instance, owner = f"i{rng.randrange(30)}", f"uid-{rng.randrange(8)}"
        if rng.random() < 0.3:
            ledger._forget((TRUENAS, instance))
        else:
            ledger.remember(Record(TRUENAS, instance, owner, f"apps/{owner}", "<default>", RecordState.CREATED))
        for uid in {f"uid-{n}" for n in range(8)}:
            scanned = [r for r in ledger.records.values() if r.owner_uid == uid]
            assert sorted(ledger.owned_by(uid), key=repr) == sorted(scanned, key=repr)


# ----- the timer's pass, made in the timer's callback --------------------------------------------------------
class Counted:
    """Counts the loop's full passes (``reconcile_once``: the task woke)."""

    def __init__(self, fake: FakeOperator) -> None:
        self.count = 0
        real = fake.operator.loops.reconcile_once

        async def counting(*args: Any) -> float:
            self.count += 1
            return await real(*args)

        fake.operator.loops.reconcile_once = counting  # type: ignore[method-assign,assignment]


def unchanged(metrics: Metrics) -> float:
    found: float = metrics.passes.labels("unchanged")._value.get()
    return found


async def until(check: Any, what: str) -> None:
    for _ in range(500):
        if check():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"never: {what}")


async def test_an_idle_timer_pass_does_not_wake_the_loop() -> None:
    """5000 sleeping loops: the timer's pass is a comparison in the timer's callback, not a task woken
    (that switch, its future and the pass's bookkeeping were most of the idle CPU)."""
    metrics = Metrics()
    fake = fake_operator(metrics=metrics, resync_seconds=0.02)
    passes = Counted(fake)
    body = resource(cpu="2")
    task = asyncio.create_task(fake.operator.loops.run(body, Stopped()))
    await until(lambda: unchanged(metrics) >= 3, "three idle passes")
    made = passes.count
    await until(lambda: unchanged(metrics) >= 15, "more idle passes")
    assert passes.count == made, "idle passes counted, none made by the loop's task"
    body["metadata"]["generation"] = 2  # an input moved (no watch event here): the next due pass is made
    await until(lambda: passes.count > made, "a full pass")
    assert fake.operator.metrics.passes.labels("ok")._value.get() >= 1
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    idle = unchanged(metrics)
    await asyncio.sleep(0.1)
    assert unchanged(metrics) == idle, "a cancelled loop's timer is gone: nothing counted after"


async def test_a_failing_idle_check_wakes_the_loop(caplog: pytest.LogCaptureFixture) -> None:
    metrics = Metrics()
    fake = fake_operator(metrics=metrics, resync_seconds=0.02)
    passes = Counted(fake)
    loops = fake.operator.loops
    task = asyncio.create_task(loops.run(resource(cpu="2"), Stopped()))
    await until(lambda: unchanged(metrics) >= 2, "idle passes")
    made = passes.count
    real = loops._unchanged
    calls = {"n": 0}

    def broken(*args: Any) -> bool:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("a bug in the check")
        return real(*args)

    loops._unchanged = broken  # type: ignore[method-assign,assignment]
    await until(lambda: passes.count > made, "the full pass the failure asks for")
    await until(lambda: unchanged(metrics) >= 4, "the loop sleeps and checks again")
    assert any("the idle check failed" in r.getMessage() for r in caplog.records)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
