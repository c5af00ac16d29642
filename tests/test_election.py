"""Leader election over a Lease (election.py), against FakeKube's Lease store and a hand-moved clock."""

from __future__ import annotations

from typing import Any

import pytest

from truenas_incus_operator.election import Elector, holder_identity
from truenas_incus_operator.problems import fail

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
        raise fail("KubernetesError", "Kubernetes API unreachable")

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
