"""Leader election over a Lease (election.py), against FakeKube's Lease store and a hand-moved clock."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from truenas_incus_operator.election import Elector, holder_identity
from truenas_incus_operator.problems import Reason, fail

from .fakes import FakeKube

NS, NAME = "tio-system", "truenas-incus-operator"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def elector(kube: FakeKube, clock: Clock, identity: str) -> Elector:
    return Elector(kube, NS, NAME, identity, duration=15, renew_deadline=10, retry=2, clock=clock)


def lease(kube: FakeKube) -> dict[str, Any]:
    return kube.leases[(NS, NAME)]


async def test_the_first_candidate_creates_the_lease_and_leads() -> None:
    kube, clock = FakeKube(), Clock()
    a = elector(kube, clock, "a")
    assert await a.try_acquire_or_renew()
    spec = lease(kube)["spec"]
    assert spec["holderIdentity"] == "a" and spec["leaseDurationSeconds"] == 15 and spec["leaseTransitions"] == 0
    assert a.leading and a.valid_until == 1000.0 + 10


async def test_a_standby_waits_while_the_holder_renews() -> None:
    kube, clock = FakeKube(), Clock()
    a, b = elector(kube, clock, "a"), elector(kube, clock, "b")
    assert await a.try_acquire_or_renew()
    for _ in range(20):  # 40 s of renewals every 2 s: b never takes over
        assert not await b.try_acquire_or_renew()
        clock.now += 2
        assert await a.try_acquire_or_renew()
    assert b.holder == "a" and not b.leading
    assert lease(kube)["spec"]["holderIdentity"] == "a"


async def test_a_standby_takes_over_a_full_duration_after_the_last_renewal_it_saw() -> None:
    kube, clock = FakeKube(), Clock()
    a, b = elector(kube, clock, "a"), elector(kube, clock, "b")
    assert await a.try_acquire_or_renew()
    assert not await b.try_acquire_or_renew()  # b sees a's renewal at t=1000; a dies now
    clock.now += 14.9
    assert not await b.try_acquire_or_renew()
    clock.now += 0.2
    assert await b.try_acquire_or_renew()
    spec = lease(kube)["spec"]
    assert spec["holderIdentity"] == "b" and spec["leaseTransitions"] == 1


async def test_expiry_is_measured_on_the_standbys_clock_not_the_holders_renew_time() -> None:
    """A holder whose clock is an hour behind still holds: its renewTime is never compared."""
    kube, clock = FakeKube(), Clock()
    a, b = elector(kube, clock, "a"), elector(kube, clock, "b")
    assert await a.try_acquire_or_renew()
    lease(kube)["spec"]["renewTime"] = "2000-01-01T00:00:00.000000Z"
    assert not await b.try_acquire_or_renew()
    clock.now += 5
    assert not await b.try_acquire_or_renew()


async def test_a_new_standby_waits_a_full_duration_even_for_a_stale_lease() -> None:
    """It cannot know when the holder last renewed: it counts from its own first look."""
    kube, clock = FakeKube(), Clock()
    assert await elector(kube, clock, "a").try_acquire_or_renew()
    clock.now += 3600
    b = elector(kube, clock, "b")
    assert not await b.try_acquire_or_renew()
    clock.now += 15.1
    assert await b.try_acquire_or_renew()


async def test_a_released_lease_is_taken_at_once() -> None:
    kube, clock = FakeKube(), Clock()
    a, b = elector(kube, clock, "a"), elector(kube, clock, "b")
    assert await a.try_acquire_or_renew()
    assert not await b.try_acquire_or_renew()
    await a.release()
    assert lease(kube)["spec"].get("holderIdentity") is None and not a.leading and a.valid_until is None
    assert await b.try_acquire_or_renew()


async def test_two_standbys_racing_for_an_expired_lease_one_wins() -> None:
    kube, clock = FakeKube(), Clock()
    assert await elector(kube, clock, "a").try_acquire_or_renew()
    b, c = elector(kube, clock, "b"), elector(kube, clock, "c")
    assert not await b.try_acquire_or_renew() and not await c.try_acquire_or_renew()
    clock.now += 16
    # Both read the same version; the second write is refused (409) by the optimistic update.
    stale = await kube.read_lease(NS, NAME)
    assert await b.try_acquire_or_renew()
    real_read = kube.read_lease

    async def read_stale(namespace: str, name: str) -> dict[str, Any] | None:
        return stale

    kube.read_lease = read_stale  # type: ignore[method-assign]
    assert not await c.try_acquire_or_renew()
    kube.read_lease = real_read  # type: ignore[method-assign]
    assert lease(kube)["spec"]["holderIdentity"] == "b" and not c.leading


async def test_a_leader_that_reads_another_holder_has_lost() -> None:
    kube, clock = FakeKube(), Clock()
    a = elector(kube, clock, "a")
    assert await a.try_acquire_or_renew()
    lease(kube)["spec"]["holderIdentity"] = "intruder"
    assert not await a.try_acquire_or_renew()
    assert a.lost
    await a.keep()  # returns at once: the caller exits


async def test_a_failed_renewal_does_not_extend_the_leaders_time() -> None:
    kube, clock = FakeKube(), Clock()
    a = elector(kube, clock, "a")
    assert await a.try_acquire_or_renew()
    valid_until = a.valid_until

    async def down(namespace: str, name: str) -> dict[str, Any] | None:
        raise fail(Reason.KUBERNETES_ERROR, "Kubernetes API unreachable")

    kube.read_lease = down  # type: ignore[method-assign]
    clock.now += 2
    with pytest.raises(Exception, match="unreachable"):
        await a.try_acquire_or_renew()
    assert a.valid_until == valid_until  # the watchdog exits at 1010 unless a renewal succeeds


def test_the_renew_deadline_must_be_shorter_than_the_duration() -> None:
    with pytest.raises(ValueError):
        Elector(FakeKube(), NS, NAME, "a", duration=10, renew_deadline=10)


def test_identities_differ_per_process_start_in_one_pod() -> None:
    first, second = holder_identity("tio-7d9f-abcde"), holder_identity("tio-7d9f-abcde")
    assert first.startswith("tio-7d9f-abcde_") and first != second


async def test_the_watchdog_ends_the_process_when_no_renewal_succeeds_in_time(monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    from truenas_incus_operator import election

    exits: list[str] = []
    done = threading.Event()

    def exit_now(reason: str) -> None:
        exits.append(reason)
        done.set()

    monkeypatch.setattr(election, "_exit_now", exit_now)
    kube, clock = FakeKube(), Clock()
    a = elector(kube, clock, "a")
    assert await a.try_acquire_or_renew()
    thread = a.watch(interval=0.01)
    clock.now += 9.9
    assert not done.wait(0.1)
    clock.now += 0.2
    assert done.wait(2)
    thread.join(2)
    assert exits == [f"no renewal of the Lease {NS}/{NAME} for 10 s"]


def test_a_standby_serves_tio_leader_0_and_the_leaders_metrics_say_1() -> None:
    import socket
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    from truenas_incus_operator.metrics import Metrics, serve_standby_metrics

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    stop = serve_standby_metrics(port, "127.0.0.1")
    assert stop is not None
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            text = response.read().decode()
    finally:
        stop()
    samples = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
    assert samples == {"tio_leader": 0.0}
    assert Metrics().registry.get_sample_value("tio_leader") == 1.0
    assert serve_standby_metrics(0) is None


# ----- issue 20 item 1: the election fails closed -------------------------------------------------
async def test_a_lease_read_that_times_out_leaves_the_candidate_standing_by() -> None:
    """aiohttp raises a bare TimeoutError: the candidate must keep trying, never return as if it led."""
    kube, clock = FakeKube(), Clock()
    b = elector(kube, clock, "b")
    b.retry = 0.01
    real = kube.read_lease
    failures = iter([TimeoutError(), ValueError("not JSON"), KeyError("spec")])

    async def flaky(namespace: str, name: str) -> dict[str, Any] | None:
        error = next(failures, None)
        if error is not None:
            raise error
        return await real(namespace, name)

    kube.read_lease = flaky  # type: ignore[method-assign]
    await b.acquire()
    assert b.leading and lease(kube)["spec"]["holderIdentity"] == "b"


async def test_an_election_that_cannot_prove_the_lease_never_starts_the_operator(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from truenas_incus_operator import election
    from truenas_incus_operator.settings import Settings

    async def broken(self: Elector) -> None:
        raise TimeoutError()

    started: list[bool] = []

    async def operator() -> None:
        started.append(True)

    monkeypatch.setattr(election, "Kube", lambda *_: FakeKube())
    monkeypatch.setattr(Elector, "acquire", broken)
    settings = Settings(leader_election=True, metrics_port=0)
    code = await election.run_elected(settings, None, operator)
    assert started == [] and code == election.EXIT_LOST


async def test_a_renewal_that_times_out_is_a_failed_renewal_not_the_end_of_renewing() -> None:
    kube, clock = FakeKube(), Clock()
    a = elector(kube, clock, "a")
    a.retry = 0.01
    assert await a.try_acquire_or_renew()
    real, calls = kube.read_lease, []

    async def flaky(namespace: str, name: str) -> dict[str, Any] | None:
        calls.append(1)
        if len(calls) == 1:
            raise TimeoutError()
        if len(calls) == 3:
            kube.leases[(NS, NAME)]["spec"]["holderIdentity"] = "b"  # then someone else holds it
        return await real(namespace, name)

    kube.read_lease = flaky  # type: ignore[method-assign]
    await asyncio.wait_for(a.keep(), 5)  # returns when it sees the loss, not with the TimeoutError
    assert a.lost and len(calls) == 3


async def test_the_fence_refuses_writes_once_the_lease_is_no_longer_proven() -> None:
    """After a pause (SIGSTOP, a stalled event loop) the leader re-checks before it writes."""
    from truenas_incus_operator.kube import Fence
    from truenas_incus_operator.problems import OperatorError

    kube, clock = FakeKube(), Clock()
    a = elector(kube, clock, "a")
    fence = Fence()
    fence.check()  # no election: always open
    a.fence(fence)
    with pytest.raises(OperatorError) as refused:
        fence.check()  # not leading yet
    assert refused.value.problem.reason == "LeaseNotHeld"
    assert await a.try_acquire_or_renew()
    fence.check()
    clock.now += 9.9
    fence.check()
    clock.now += 0.2  # paused past the renew deadline: others may take over soon
    with pytest.raises(OperatorError, match="Lease"):
        fence.check()
    assert await a.try_acquire_or_renew()
    fence.check()


async def test_a_leader_past_its_renew_deadline_writes_nothing_to_truenas() -> None:
    from truenas_incus_operator.kube import Fence
    from truenas_incus_operator.problems import OperatorError

    from .fakes import fake_operator, resource

    fake = fake_operator()
    clock = Clock()
    a = elector(fake.kube, clock, "a")
    fence = Fence()
    fake.operator.loops.executor.fence = fence
    a.fence(fence)
    assert await a.try_acquire_or_renew()
    clock.now += 11  # paused past the deadline
    fake.backend.on_call = lambda call: pytest.fail(f"wrote to TrueNAS while not proven: {call}")
    body = resource()
    from truenas_incus_operator.instances.resource import LoopState

    state = LoopState(status={})
    await fake.operator.loops.reconcile_once(body, state, lambda: None)
    synced = next(c for c in fake.kube.statuses("web01")[-1]["conditions"] if c["type"] == "Synced")
    assert synced["reason"] == "LeaseNotHeld"
    with pytest.raises(OperatorError):
        fence.check()


async def test_a_lease_that_lapses_while_waiting_for_a_job_slot_writes_nothing() -> None:
    """The fence is checked again once the job slot is held: the wait for a slot (all taken by other
    creates) and the status write before it can outlast the renew deadline."""
    import contextlib
    from collections.abc import AsyncIterator

    from truenas_incus_operator.instances.resource import LoopState
    from truenas_incus_operator.kube import Fence

    from .fakes import fake_operator, resource

    fake = fake_operator()
    lapsed = False
    fence = Fence()
    fence.arm(lambda: not lapsed, "Lease test/lease")
    fake.operator.loops.executor.fence = fence
    slots = fake.connection.job_slots
    take = slots.slot

    @contextlib.asynccontextmanager
    async def slow_slot(namespace: str) -> AsyncIterator[None]:
        nonlocal lapsed
        async with take(namespace):
            lapsed = True  # the slot came after the renew deadline had passed
            yield

    slots.slot = slow_slot  # type: ignore[method-assign]
    fake.backend.on_call = lambda call: pytest.fail(f"wrote to TrueNAS after the Lease lapsed: {call}")
    await fake.operator.loops.reconcile_once(resource(), LoopState(status={}), lambda: None)
    synced = next(c for c in fake.kube.statuses("web01")[-1]["conditions"] if c["type"] == "Synced")
    assert synced["reason"] == "LeaseNotHeld"
