"""``ownership_of`` (instances/ownership.py): the one pure place where a ledger record, the records a
resource holds elsewhere and the adoption request and grant become an ``Ownership``."""

from __future__ import annotations

from typing import Any

import pytest

from truenas_incus_operator.instances.ledger import Record, RecordState
from truenas_incus_operator.instances.ownership import ownership_of
from truenas_incus_operator.instances.resource import desired_from
from truenas_incus_operator.reconcile import Ownership

from .fakes import resource

NAS = "nas-0123456789abcdef0123456789abcdef"
DESIRED = desired_from(resource("web01", namespace="apps", uid="uid-web01"))


def record(
    instance: str = "web01", uid: str = "uid-web01", state: RecordState = RecordState.CREATED, **kw: object
) -> Record:
    owner = str(kw.pop("owner", "apps/web01"))
    return Record(NAS, instance, uid, owner, "<default>", state, **kw)  # type: ignore[arg-type]


def of(held: Record | None, owned: list[Record] | None = None, **flags: bool) -> Ownership:
    return ownership_of(
        DESIRED,
        NAS,
        held,
        owned if owned is not None else ([held] if held is not None and held.owner_uid == DESIRED.uid else []),
        adopt_requested=flags.get("requested", False),
        adopt_allowed=flags.get("allowed", False),
    )


def test_no_record_owns_nothing() -> None:
    ownership = of(None)
    assert not ownership.mine and ownership.holder is None and ownership.elsewhere is None


def test_a_created_record_of_this_uid_is_mine_and_manages_devices() -> None:
    ownership = of(record())
    assert ownership.mine and ownership.devices_managed
    assert not ownership.unfinished and not ownership.adopted


def test_a_claim_still_creating_is_mine_and_unfinished() -> None:
    ownership = of(record(state=RecordState.CREATING))
    assert ownership.mine and ownership.unfinished


def test_an_adopted_record_manages_devices_only_once_applied() -> None:
    assert not of(record(state=RecordState.ADOPTED)).devices_managed
    applied = of(record(state=RecordState.ADOPTED, devices_managed=True))
    assert applied.adopted and applied.devices_managed


def test_another_uids_record_is_held_and_never_named() -> None:
    ownership = of(record(uid="uid-other", owner="payroll/secret"))
    assert not ownership.mine and ownership.holder == "another IncusInstance"
    again = of(record(uid="uid-first"))  # an earlier resource of this very name
    assert again.holder == "an earlier resource with this name (UID uid-first)"


def test_an_instance_owned_under_another_name_blocks_a_second_unless_still_a_claim() -> None:
    other = record(instance="web02")
    assert of(None, [other]).elsewhere == f"'web02' on {NAS}"
    assert of(None, [record(instance="web02", state=RecordState.CREATING)]).elsewhere is None
    assert of(record(), [record(), other]).elsewhere == f"'web02' on {NAS}"


def test_the_adoption_request_and_grant_pass_through_and_grant_nothing_else() -> None:
    ownership = of(None, requested=True, allowed=True)
    assert ownership.adopt_requested and ownership.adopt_allowed and not ownership.mine


async def test_a_pass_parses_the_body_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 22 item 3: the body -> Desired parse ran up to 13 times a pass."""
    from truenas_incus_operator.instances import resource as resource_module
    from truenas_incus_operator.instances.resource import LoopState

    from .fakes import fake_operator

    fake = fake_operator()
    parses = 0
    real = resource_module.desired_from

    def counting(*args: Any, **kwargs: Any) -> Any:
        nonlocal parses
        parses += 1
        return real(*args, **kwargs)

    monkeypatch.setattr("truenas_incus_operator.instances.loop.desired_from", counting)
    await fake.operator.loops.reconcile_once(resource(cpu="2"), LoopState(status={}), lambda: None)
    assert "web01" in fake.backend.instances  # claim, create, start: several steps
    assert parses == 1
