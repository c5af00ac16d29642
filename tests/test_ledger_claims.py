"""The ownership ledger under two actors and after its records go stale (issue 19 items 6 and 9,
issue 21 item 7), with fakes (tests/fakes.py): two operator graphs share one Kubernetes and one
TrueNAS, as two operators without an election do."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from truenas_incus_operator.instances.ledger import record_name
from truenas_incus_operator.instances.resource import LoopState
from truenas_incus_operator.truenas import AlreadyExists, FieldError, InstanceConfig, ObservedInstance

from .fakes import LEDGER_NAMESPACE, TRUENAS, FakeBackend, FakeOperator, fake_operator, resource


def no_wake() -> None:
    return None


async def one_pass(fake: FakeOperator, body: dict[str, Any], state: LoopState | None = None) -> LoopState:
    state = state or LoopState(status={})
    await fake.operator.loops.reconcile_once(body, state, no_wake)
    return state


def synced(fake: FakeOperator, name: str) -> tuple[str, str]:
    last = fake.kube.statuses(name)[-1]
    condition = next(c for c in last["conditions"] if c["type"] == "Synced")
    return condition["status"], condition["reason"]


class SharedTrueNAS(FakeBackend):
    """A TrueNAS that refuses a name while a create job for it runs (as virt/container/vm do), and
    runs ``before_create`` (once) when the first create call arrives."""

    before_create: Callable[[], Awaitable[None]] | None = None
    made = 0
    """Instances created (a refused create call makes none)."""

    async def create(
        self, config: InstanceConfig, on_progress: Callable[[dict[str, Any]], None] | None = None
    ) -> ObservedInstance:
        hook, self.before_create = self.before_create, None
        if hook is not None:
            await hook()
        if config.name in self.creating:
            self._log(f"create {config.name}")
            raise AlreadyExists([FieldError("create.name", f"Name {config.name!r} already exists")])
        instance = await super().create(config, on_progress)
        self.made += 1
        return instance


def two_operators() -> tuple[FakeOperator, FakeOperator, SharedTrueNAS]:
    backend = SharedTrueNAS()
    first = fake_operator(backend)
    second = fake_operator(backend)
    second.kube.configmaps = first.kube.configmaps  # one API server
    second.kube._version = 1000
    return first, second, backend


async def race_creates(b_reads_the_ledger_first: bool) -> tuple[FakeOperator, FakeOperator, SharedTrueNAS]:
    """A claims and calls create; while A's create waits, B (no election) runs a pass for the same
    resource and calls create first; A's create is then refused (AlreadyExists). With
    ``b_reads_the_ledger_first``, B starts then (loads the ledger, so it finds A's record without a 409)."""
    a, b, backend = two_operators()
    body = resource()
    backend.gate = asyncio.Event()
    b_pass: asyncio.Task[LoopState] | None = None

    async def b_creates() -> None:
        nonlocal b_pass
        if b_reads_the_ledger_first:
            await b.operator.ledger.load()  # B's startup, after A's claim
        b_pass = asyncio.create_task(one_pass(b, body))
        for _ in range(200):
            if "web01" in backend.creating:
                return
            await asyncio.sleep(0.01)
        raise AssertionError("B never called create")

    backend.before_create = b_creates
    await one_pass(a, body)
    assert b_pass is not None
    backend.gate.set()
    await b_pass
    return a, b, backend


LEDGER_KEY = (LEDGER_NAMESPACE, record_name(TRUENAS, "web01"))


async def test_two_operators_leave_the_instance_owned_when_one_create_finds_the_others() -> None:
    """Operator A claims and calls create; meanwhile operator B (no election) sees the same resource,
    finds A's record (409, same UID) and creates; A's create is refused (AlreadyExists). Today A
    releases the record it created, and B's instance is left with no owner."""
    a, b, backend = await race_creates(b_reads_the_ledger_first=False)
    assert "web01" in backend.instances
    assert LEDGER_KEY in a.kube.configmaps, "the instance B created for this resource has an owner"
    assert a.kube.configmaps[LEDGER_KEY]["data"]["ownerUID"] == "uid-web01"
    assert a.kube.configmaps[LEDGER_KEY]["data"]["state"] == "created"
    # Both converge on the one instance, neither creates again nor releases.
    await one_pass(a, resource())
    await one_pass(b, resource())
    assert LEDGER_KEY in a.kube.configmaps
    assert backend.made == 1, "one instance; the other create calls were refused by TrueNAS"
    assert synced(a, "web01") == ("True", "ReconcileSuccess")
    assert synced(b, "web01") == ("True", "ReconcileSuccess")


async def test_an_operator_that_read_the_record_at_startup_joins_it_before_it_creates() -> None:
    """CI, stop 28: operator B started while A's create waited, so B *loaded* A's fresh record
    (state ``creating``, same UID) instead of meeting it with a 409, and created without joining
    it. B's create won; A's was refused (AlreadyExists) and A released the record it had created,
    which nobody had joined: B's instance was left with no owner, and both reported AlreadyExists."""
    a, b, backend = await race_creates(b_reads_the_ledger_first=True)
    assert "web01" in backend.instances
    assert LEDGER_KEY in a.kube.configmaps, "the instance B created for this resource has an owner"
    assert a.kube.configmaps[LEDGER_KEY]["data"]["ownerUID"] == "uid-web01"
    await one_pass(a, resource())
    await one_pass(b, resource())
    assert a.kube.configmaps[LEDGER_KEY]["data"]["state"] == "created"
    assert backend.made == 1
    assert synced(a, "web01") == ("True", "ReconcileSuccess")
    assert synced(b, "web01") == ("True", "ReconcileSuccess")


def message(fake: FakeOperator, name: str) -> str:
    text: str = fake.kube.statuses(name)[-1]["message"]
    return text


async def test_a_conflict_does_not_name_the_holders_namespace_or_resource() -> None:
    """Issue 19 item 9: Bob learnt which namespace and resource hold an instance name."""
    fake = fake_operator()
    await one_pass(fake, resource("payroll", namespace="alice", instance="shared"))
    await one_pass(fake, resource("probe", namespace="bob", instance="shared"))
    assert synced(fake, "probe") == ("False", "Conflict")
    text = message(fake, "probe")
    assert "alice" not in text and "payroll" not in text, text
    assert "another IncusInstance" in text
    assert not [e for e in fake.events if e[1] == "Conflict" and ("alice" in e[2] or "payroll" in e[2])]


async def test_a_recreated_resource_is_told_the_record_is_from_an_earlier_resource_of_its_name() -> None:
    """Issue 21 item 7: the Conflict named the very resource being looked at."""
    fake = fake_operator()
    await one_pass(fake, resource(uid="uid-first"))
    await one_pass(fake, resource(uid="uid-second"))
    assert synced(fake, "web01") == ("False", "Conflict")
    assert "an earlier resource with this name (UID uid-first)" in message(fake, "web01")
    assert "apps/web01" not in message(fake, "web01")


async def test_a_stale_record_deleted_by_hand_stops_blocking_without_a_restart() -> None:
    """Issue 21 item 7: the ledger was read only at startup; an administrator who deleted a stale
    record (and its instance) still saw Conflict until the operator restarted."""
    fake = fake_operator()
    await one_pass(fake, resource(uid="uid-first"))
    state = await one_pass(fake, resource(uid="uid-second"))
    assert synced(fake, "web01") == ("False", "Conflict")
    del fake.kube.configmaps[(LEDGER_NAMESPACE, record_name(TRUENAS, "web01"))]  # kubectl delete configmap
    del fake.backend.instances["web01"]
    fake.connection.remember_gone("web01")
    await one_pass(fake, resource(uid="uid-second"), state)
    assert synced(fake, "web01") == ("True", "ReconcileSuccess")
    record = fake.kube.configmaps[(LEDGER_NAMESPACE, record_name(TRUENAS, "web01"))]
    assert record["data"]["ownerUID"] == "uid-second"


# ----- records whose resource went while the operator was down ---------------------------------------------
def resource_gone(fake: FakeOperator) -> None:
    """The resource was deleted while no operator ran (its finalizer removed by hand)."""
    fake.kube.incus_instances.clear()


async def test_a_record_whose_resource_was_deleted_while_the_operator_was_down_is_reaped() -> None:
    """Finding 9: such a record was never reaped (the instance ran for ever, a re-created resource
    was in Conflict with its dead self). With deletionPolicy Delete recorded, the instance goes."""
    fake = fake_operator()
    body = resource()
    fake.kube.incus_instances[("apps", "web01")] = body
    await one_pass(fake, body)
    assert "web01" in fake.backend.instances
    resource_gone(fake)
    reaped = await fake.operator.reaper.sweep()
    assert reaped == 1
    assert "web01" not in fake.backend.instances, "deleted, as its deletionPolicy (Delete) said"
    assert fake.kube.configmaps == {}
    # A re-created resource of that name creates afresh.
    await one_pass(fake, resource(uid="uid-again"))
    assert synced(fake, "web01") == ("True", "ReconcileSuccess")


async def test_a_reaper_without_a_proven_lease_deletes_nothing() -> None:
    """The reaper deletes on TrueNAS outside the executor's actions: it too stops at the Lease fence
    (a paused leader's sweep must not delete what the new leader manages)."""
    from truenas_incus_operator.kube import Fence

    fake = fake_operator()
    body = resource()
    fake.kube.incus_instances[("apps", "web01")] = body
    await one_pass(fake, body)
    resource_gone(fake)
    fence = Fence()
    fence.arm(lambda: False, "Lease test/lease")
    fake.operator.reaper.executor.fence = fence
    assert await fake.operator.reaper.sweep() == 0
    assert "web01" in fake.backend.instances, "deleted on TrueNAS without a proven Lease"
    assert record_name(TRUENAS, "web01") in {name for _, name in fake.kube.configmaps}


async def test_a_reaped_record_of_an_orphan_or_unknown_policy_only_releases_the_instance() -> None:
    fake = fake_operator()
    body = resource(deletionPolicy="Orphan")
    fake.kube.incus_instances[("apps", "web01")] = body
    await one_pass(fake, body)
    resource_gone(fake)
    assert await fake.operator.reaper.sweep() == 1
    assert "web01" in fake.backend.instances and fake.kube.configmaps == {}


async def test_a_record_whose_resource_exists_is_kept() -> None:
    fake = fake_operator()
    body = resource()
    fake.kube.incus_instances[("apps", "web01")] = body
    await one_pass(fake, body)
    assert await fake.operator.reaper.sweep() == 0
    assert len(fake.kube.configmaps) == 1 and "web01" in fake.backend.instances


async def test_nothing_is_reaped_while_the_api_server_does_not_serve_incusinstances() -> None:
    """Every read of an owner answers 404 when the CRD is missing (an operator started before its
    CRDs, against an old ledger): that is no proof that the owners are gone."""
    fake = fake_operator()
    body = resource()
    fake.kube.incus_instances[("apps", "web01")] = body
    await one_pass(fake, body)
    resource_gone(fake)
    fake.kube.serves_incus_instances = False
    assert await fake.operator.reaper.sweep() == 0
    assert "web01" in fake.backend.instances and len(fake.kube.configmaps) == 1
