"""status.addresses and spec.readiness.address (issue 26 items 1 and 3): each address with its family,
interface where TrueNAS names it, and source; only what parses as an address; Ready waits for one
when the spec asks, and Synced says where TrueNAS can never report one."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from truenas_incus_operator.models import IncusInstanceSpec
from truenas_incus_operator.reconcile import Desired, Ownership, instance_config, plan
from truenas_incus_operator.status import render_instance
from truenas_incus_operator.truenas.backends.vm.entries import guest_interfaces

from .test_reconcile import observed

NOW = datetime(2026, 12, 7, tzinfo=UTC)


def desired(**spec: Any) -> Desired:
    model = IncusInstanceSpec.model_validate({"type": "CONTAINER", "image": "debian/bookworm", **spec})
    return Desired("ns", "web", 1, model, uid="u1", ownership=Ownership(mine=True))


def render(want: Desired, seen: Any, unsupported: tuple[str, ...] = ()) -> Any:
    result = plan(want, seen, None, unsupported)
    return render_instance(want, seen, previous=None, now=NOW, plan=result)


def conditions(status: Any) -> dict[str, tuple[str, str, str]]:
    return {c.type: (str(c.status), str(c.reason), c.message) for c in status.conditions}


def test_addresses_have_a_family_an_interface_where_named_and_a_source() -> None:
    seen = observed(
        addresses=("fd42::5", "10.0.0.2", "not an address", "10.0.0.2", "<script>"),
        interfaces=(("fd42::5", "enp5s0"),),
    )
    status = render(desired(), seen)
    shown = [a.model_dump(by_alias=True, exclude_none=True) for a in status.addresses or []]
    assert shown == [
        {"address": "10.0.0.2", "family": "IPv4", "source": "TrueNAS"},
        {"address": "fd42::5", "family": "IPv6", "interface": "enp5s0", "source": "TrueNAS"},
    ]
    assert render(desired(), observed(status="STOPPED")).addresses == []


def test_ready_waits_for_an_address_when_the_spec_asks() -> None:
    want = desired(readiness={"address": True})
    assert conditions(render(desired(), observed(addresses=())))["Ready"][:2] == ("True", "Available")
    waiting = conditions(render(want, observed(addresses=())))
    assert waiting["Ready"][:2] == ("False", "NoAddress") and "spec.readiness.address" in waiting["Ready"][2]
    assert conditions(render(want, observed()))["Ready"][:2] == ("True", "Available")
    stopped = desired(readiness={"address": True}, powerState="Stopped")
    assert conditions(render(stopped, observed(status="STOPPED", addresses=())))["Ready"][:2] == ("True", "Stopped")


def test_where_truenas_reports_no_address_synced_says_so() -> None:
    want = desired(readiness={"address": True})
    found = conditions(render(want, observed(addresses=()), ("readiness.address",)))
    assert found["Synced"][:2] == ("True", "PartiallyApplied") and "readiness.address" in found["Synced"][2]
    assert found["Ready"][:2] == ("False", "NoAddress") and "reports no address" in found["Ready"][2]


@pytest.mark.parametrize(
    ("version", "kind", "unsupported"),
    [((26, 0), "CONTAINER", True), ((25, 10), "VM", True), ((27, 0), "VM", False)],
)
def test_the_families_that_cannot_report_an_address_say_so(
    version: tuple[int, int], kind: str, unsupported: bool
) -> None:
    from truenas_incus_operator.truenas.backends.container import ContainerBackend
    from truenas_incus_operator.truenas.backends.vm import VMBackend

    spec: dict[str, Any] = {"type": kind, "readiness": {"address": True}}
    config = instance_config(desired(**spec))
    backend: Any = ContainerBackend.__new__(ContainerBackend) if kind == "CONTAINER" else VMBackend.__new__(VMBackend)
    backend.version = version
    fields = type(backend).unsupported_fields(backend, config)
    assert ("readiness.address" in fields) is unsupported, fields


def test_the_guest_agents_interface_names_are_kept_only_when_they_are_interface_names() -> None:
    answer = [
        {"name": "enp1s0", "ip_addresses": [{"ip_address": "10.0.0.9"}, {"ip_address": "fe80::1"}]},
        {"name": "x\n" * 20, "ip_addresses": [{"ip_address": "192.0.2.1"}]},
        {"name": "lo", "ip_addresses": [{"ip_address": "127.0.0.1"}]},
    ]
    assert guest_interfaces(answer) == (("10.0.0.9", "enp1s0"), ("192.0.2.1", ""))
