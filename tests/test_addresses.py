"""status.addresses and spec.readiness.address (issue 26 items 1 and 3): each address with its family,
interface where TrueNAS names it, and source; only what parses as an address; Ready waits for one
when the spec asks, and Synced says where TrueNAS can never report one."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime
from typing import Any

import pytest

from truenas_incus_operator.models import IncusInstanceSpec
from truenas_incus_operator.reconcile import Desired, Ownership, instance_config, plan
from truenas_incus_operator.status import render_instance
from truenas_incus_operator.truenas import addresses as addresses_module
from truenas_incus_operator.truenas.addresses import global_address, global_text
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


# ----- declared addresses (issue 26 item 2) ---------------------------------------------------------------
def test_declared_addresses_become_a_version_2_network_config() -> None:
    import yaml

    from truenas_incus_operator.netconfig import network_config

    spec = IncusInstanceSpec.model_validate(
        {
            "type": "VM",
            "image": "debian/bookworm",
            "nics": [
                {
                    "name": "lan",
                    "parent": "br0",
                    "hwaddr": "10:66:6A:01:02:03",
                    "addresses": ["192.168.10.20/24", "2001:db8::20/64"],
                    "gateway": "192.168.10.1",
                    "nameservers": ["192.168.10.1"],
                },
                {"name": "backup", "parent": "br1", "hwaddr": "10:66:6a:01:02:04"},
            ],
        }
    )
    rendered = network_config(spec.nics)
    assert rendered is not None
    assert yaml.safe_load(rendered) == {
        "version": 2,
        "ethernets": {
            "lan": {
                "match": {"macaddress": "10:66:6a:01:02:03"},
                "dhcp4": False,
                "dhcp6": False,
                "addresses": ["192.168.10.20/24", "2001:db8::20/64"],
                "routes": [{"to": "0.0.0.0/0", "via": "192.168.10.1"}],
                "nameservers": {"addresses": ["192.168.10.1"]},
            },
            "backup": {"match": {"macaddress": "10:66:6a:01:02:04"}, "dhcp4": True},
        },
    }
    with pytest.raises(ValueError, match="every NIC needs hwaddr"):  # matched by MAC only (any renderer)
        IncusInstanceSpec.model_validate(
            {"type": "VM", "image": "debian/bookworm", "nics": [{"name": "eth0", "addresses": ["10.0.0.5/24"]}]}
        )
    assert network_config(None) is None


@pytest.mark.parametrize(
    ("nic", "message"),
    [
        ({"addresses": ["10.0.0.5"]}, "prefix length"),
        ({"addresses": ["10.0.0.500/24"]}, "not an IP address"),
        ({"addresses": ["127.0.0.2/8"]}, "loopback"),
        ({"addresses": ["10.0.0.5/24"], "gateway": "10.0.1.1"}, "on none of its addresses' networks"),
        ({"gateway": "10.0.0.1"}, "need addresses"),
        ({"addresses": ["10.0.0.5/24"], "nameservers": ["dns.example"]}, "not an IP address"),
        ({"addresses": ["10.0.0.5/255.255.255.0"]}, "prefix length"),  # what the CRD refuses too
        ({"addresses": ["2001:db8::5%x/64"]}, "prefix length"),
        ({"addresses": ["::ffff:192.168.1.1/120"]}, "IPv4-mapped"),
    ],
)
def test_a_declared_address_that_cannot_be_one_is_refused_naming_it(nic: dict[str, Any], message: str) -> None:
    mac = {"hwaddr": "10:66:6a:01:02:03"}
    with pytest.raises(ValueError, match=message):
        IncusInstanceSpec.model_validate(
            {"type": "VM", "image": "debian/bookworm", "nics": [{"name": "eth0", **mac, **nic}]}
        )


def test_two_nics_with_addresses_need_macs_and_one_network_config_only() -> None:
    nics = [{"name": "a", "addresses": ["10.0.0.5/24"], "hwaddr": "10:66:6a:01:02:03"}, {"name": "b"}]
    with pytest.raises(ValueError, match="every NIC needs hwaddr"):
        IncusInstanceSpec.model_validate({"type": "VM", "image": "debian/bookworm", "nics": nics})
    with pytest.raises(ValueError, match="one network-config only"):
        IncusInstanceSpec.model_validate(
            {
                "type": "VM",
                "image": "debian/bookworm",
                "nics": nics[:1],
                "cloudInit": {"networkConfig": "version: 2\n"},
            }
        )


def test_declared_addresses_show_as_declared_where_applied_and_count_for_readiness() -> None:
    nic = {"name": "eth0", "hwaddr": "10:66:6a:01:02:03", "addresses": ["192.168.10.20/24"]}
    want = desired(type="VM", readiness={"address": True}, nics=[nic])
    seen = observed(type="VM", addresses=(), seed=("env", "cloud-init"))  # a VM the operator seeded
    status = render(want, seen)
    assert [a.model_dump(by_alias=True, exclude_none=True) for a in status.addresses or []] == [
        {"address": "192.168.10.20", "family": "IPv4", "source": "Declared"}
    ]
    assert conditions(status)["Ready"][:2] == ("True", "Available")
    undelivered = render(want, seen, ("nics[].addresses",))
    assert undelivered.addresses == [] and conditions(undelivered)["Ready"][:2] == ("False", "NoAddress")
    later = render(want, seen, ("nics[].addresses (read by cloud-init at first boot only)",))
    assert later.addresses == [], "a declared change the guest has not read is not shown as its address"
    adopted = render(want, observed(type="VM", addresses=()))  # no seed marks: the operator never wrote it
    assert adopted.addresses == [] and conditions(adopted)["Ready"][:2] == ("False", "NoAddress")
    reported = render(want, observed(type="VM", addresses=("10.9.9.9",), seed=("env", "cloud-init")))
    assert [a.source for a in reported.addresses or []] == ["TrueNAS"], "what the guest reports wins"


@pytest.mark.parametrize("backend_name", ["container", "virt"])
def test_families_without_a_seed_say_declared_addresses_are_not_applied(backend_name: str) -> None:
    from truenas_incus_operator.truenas.backends.container import ContainerBackend
    from truenas_incus_operator.truenas.backends.virt import VirtInstanceBackend

    cls: Any = ContainerBackend if backend_name == "container" else VirtInstanceBackend
    backend = cls.__new__(cls)
    backend.version, backend.can_create_vms, backend.nic_mac = (26, 0), True, True
    config = instance_config(
        desired(nics=[{"name": "eth0", "hwaddr": "10:66:6a:01:02:03", "addresses": ["10.0.0.5/24"]}])
    )
    fields = type(backend).unsupported_fields(backend, config)
    assert "nics[].addresses" in fields and "cloudInit" not in fields, fields


async def test_a_vm_declaring_the_nas_s_own_address_is_refused_before_anything_is_written() -> None:
    from truenas_incus_operator.instances.resource import LoopState
    from truenas_incus_operator.netconfig import nas_address_clash

    from .fakes import fake_operator, resource

    fake = fake_operator()
    fake.connection.config = dataclasses.replace(fake.connection.config, url="wss://192.168.1.10")
    body = resource(type="VM", nics=[{"name": "lan", "hwaddr": "10:66:6a:01:02:03", "addresses": ["192.168.1.10/24"]}])
    await fake.operator.loops.reconcile_once(body, LoopState(status={}), lambda: None)
    assert fake.backend.calls == [], fake.backend.calls
    synced = next(c for c in fake.kube.statuses("web01")[-1]["conditions"] if c["type"] == "Synced")
    assert synced["reason"] == "AddressConflict" and "192.168.1.10/24 is the NAS's own address" in synced["message"]
    spec = IncusInstanceSpec.model_validate(
        {
            "type": "VM",
            "image": "debian/bookworm",
            "nics": [{"name": "lan", "hwaddr": "10:66:6a:01:02:03", "addresses": ["192.168.1.11/24"]}],
        }
    )
    assert nas_address_clash(spec.nics, "wss://192.168.1.10") is None
    assert nas_address_clash(spec.nics, "wss://nas.lan") is None, "a host name is not resolved"


# ----- what a hostile server or guest sends (review of the networking change) --------------------------------
def test_a_guest_agent_answer_is_bounded() -> None:
    """8000 distinct addresses from the guest took seconds with a quadratic dedup, on the loop every
    resource shares: at most MAX_AGENT_ITEMS entries are read (what lies past them is never touched)
    and 16 addresses kept."""
    from truenas_incus_operator.truenas.addresses import MAX_AGENT_ITEMS

    class Untouchable(dict):  # type: ignore[type-arg]
        def get(self, *args: Any) -> Any:
            raise AssertionError("read past the bound")

    addresses: list[Any] = [{"ip_address": f"10.1.{i // 256}.{i % 256}"} for i in range(MAX_AGENT_ITEMS)]
    addresses += [Untouchable()] * 8000
    interfaces: list[Any] = [{"name": "eth0", "ip_addresses": addresses}] * MAX_AGENT_ITEMS
    interfaces += [Untouchable()] * 300
    found = guest_interfaces(interfaces)
    assert len(found) == 16 and found[0] == ("10.1.0.0", "eth0")


@pytest.mark.parametrize(
    "raw",
    [
        "fe80::1%eth0",
        "2001:db8::1%" + "x" * 60,
        "2001:db8::1%\x1b[31m",
        "127.0.0.1",
        "::ffff:127.0.0.1",
        "::",
        "224.0.0.1",
        "169.254.1.1",
        7,
        None,
        ["x"],
    ],
)
def test_what_is_not_a_reachable_address_never_reaches_the_status(raw: Any) -> None:
    from truenas_incus_operator.truenas.backends.virt import alias_addresses

    assert alias_addresses([{"address": raw}, "junk", 5]) == ()
    status = render(desired(), observed(addresses=(raw, "10.0.0.2")))
    assert [a.address for a in status.addresses or []] == ["10.0.0.2"] and status.ip_addresses == ["10.0.0.2"]


def test_the_status_lists_at_most_sixteen_addresses_in_canonical_form() -> None:
    many = tuple(f"2001:db8::{i:04x}" for i in range(100))
    status = render(desired(), observed(addresses=("2001:DB8::0001", *many)))
    assert len(status.addresses or []) == 16 and len(status.ip_addresses or []) == 16
    assert (status.addresses or [])[0].address == "2001:db8::1"


@pytest.mark.parametrize(
    "text",
    [
        "10.0.0.2",
        "2001:db8::1",
        "2001:0db8:0000::0001",
        "::ffff:10.0.0.2",
        "::ffff:127.0.0.1",
        "127.0.0.1",
        "fe80::1",
        "fe80::1%eth0",
        "224.0.0.1",
        "0.0.0.0",
        "::",
        "not an address",
        "1" * 46,
        "",
        "10.0.0.256",
    ],
)
def test_an_address_as_text_is_the_checked_address_printed(text: str) -> None:
    """The cached text (the resync's hot path) says what the checked address says, and nothing else."""
    address = global_address(text)
    assert global_text(text) == (None if address is None else str(address))


def test_odd_values_are_no_address_and_the_cache_stays_bounded() -> None:
    for odd in (None, 5, ["10.0.0.1"], {"address": "10.0.0.1"}):
        assert global_address(odd) is None and global_text(odd) is None
    for n in range(20_000):  # a server answering ever new addresses
        global_text(f"10.{n // 65536}.{n // 256 % 256}.{n % 256}")
    assert addresses_module._global_text.cache_info().currsize <= 8192
    assert addresses_module._global.cache_info().currsize <= 8192
