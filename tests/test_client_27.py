"""The client on TrueNAS 27 (middleware master, api/v27_0_0) against the simulator: what changed from 26
in ``container.*`` and ``vm.*`` and what the backends do about it."""

from __future__ import annotations

from dataclasses import replace

import pytest

from truenas_incus_operator.truenas import DeviceConfig, InstanceConfig, InstanceStatus, ValidationFailed
from truenas_incus_operator.truenas.backends.container import ContainerBackend
from truenas_incus_operator.truenas.backends.routing import RoutingBackend
from truenas_incus_operator.truenas.backends.vm import VMBackend

from .test_client import client_for, serve
from .test_client_vm import mirror, vm_config

AGENT = [
    {"name": "lo", "hardware-address": "00:00:00:00:00:00", "ip-addresses": [{"ip-address": "127.0.0.1", "prefix": 8}]},
    {
        "name": "enp1s0",
        "hardware-address": "00:a0:98:01:02:7e",
        "ip-addresses": [
            {"ip-address": "fe80::2a0:98ff:fe01:27e", "prefix": 64, "ip-address-type": "ipv6"},
            {"ip-address": "2001:db8::50", "prefix": 64, "ip-address-type": "ipv6"},
            {"ip-address": "192.168.1.50", "prefix": 24, "ip-address-type": "ipv4"},
        ],
    },
]


def container(name: str = "web01") -> InstanceConfig:
    return InstanceConfig(name=name, type="CONTAINER", image="debian/bookworm")


async def test_container_delete_is_a_job_that_stops_a_running_container() -> None:
    """27's container.delete is a job (lock container_delete:<id>) that refuses an active container
    without force: the backend waits for it and passes force (on 26 delete destroyed it anyway)."""
    async with serve("27.0") as (sim, server), client_for(server, "websocket") as client:
        backend = client.instances
        await backend.create(container())
        await backend.start("web01")
        await backend.delete("web01")
        assert sim.containers.containers == {}
        assert await backend.get_instance("web01") is None


async def test_container_delete_that_27_refuses_says_why() -> None:
    """A snapshot of the container's dataset: 27 refuses without recursive, and the operator does not
    pass it (it would also destroy the snapshots' clones wherever they live)."""
    async with serve("27.0") as (sim, server), client_for(server, "websocket") as client:
        backend = client.instances
        await backend.create(container())
        made = sim.containers.by_name("web01")
        assert made is not None
        dataset = made.entry()["dataset"]
        assert dataset in sim.storage.datasets  # the container's own, made by container.create
        sim.storage.snaps.create(None, [{"dataset": dataset, "name": "daily"}])  # type: ignore[arg-type]
        with pytest.raises(ValidationFailed, match=r"has 1 snapshot\(s\)\. Set `recursive`") as info:
            await backend.delete("web01")
        assert info.value.errors[0].attribute == "container_delete.recursive"
        assert sim.containers.by_name("web01") is not None


async def test_suspended_container_is_frozen() -> None:
    async with serve("27.0") as (sim, server), client_for(server, "websocket") as client:
        backend = client.instances
        await backend.create(container())
        made = sim.containers.by_name("web01")
        assert made is not None
        made.state = "SUSPENDED"  # virsh suspend: 27's ContainerStatus knows it
        observed = await backend.get_instance("web01")
        assert observed is not None and observed.status == InstanceStatus.FROZEN


@pytest.mark.parametrize("written", ["00:A0:98:00:00:0A", "00-a0-98-00-00-0a", "00a09800000a"])
async def test_vm_nic_mac_in_27s_form(written: str) -> None:
    """27's MACAddress takes colon-separated hex only and stores it lower case: the backend sends that
    form and compares in it, so a spec MAC in another spelling neither fails nor drifts."""
    async with (
        serve("27.0") as (_sim, server),
        client_for(server, "websocket", vm_image_server=mirror(server)) as client,
    ):
        backend = client.instances
        nic = DeviceConfig("eth1", "NIC", extra={"parent": "br0", "mac": written})
        config = vm_config(devices=(nic,))
        await backend.create(config)
        listed = [d for d in await backend.list_devices("web-01") if d.type == "NIC"]
        assert [d.extra["mac"] for d in listed] == ["00:a0:98:00:00:0a"]
        assert [d.extra["mac"] for d in backend.honoured(config).devices] == ["00:a0:98:00:00:0a"]


async def test_container_nic_mac_in_27s_form() -> None:
    async with serve("27.0") as (_sim, server), client_for(server, "websocket") as client:
        backend = client.instances
        await backend.create(container())
        nic = DeviceConfig("eth1", "NIC", extra={"parent": "br0", "mac": "00-A0-98-00-00-0B"})
        await backend.add_device("web01", nic)
        listed = [d for d in await backend.list_devices("web01") if d.type == "NIC"]
        assert [d.extra["mac"] for d in listed] == ["00:a0:98:00:00:0b"]
        honoured = backend.honoured(replace(container(), devices=(nic,)))
        assert [d.extra["mac"] for d in honoured.devices] == ["00:a0:98:00:00:0b"]


async def test_running_vm_reports_what_its_guest_agent_sees() -> None:
    """27's vm.get_guest_network_interfaces feeds status.ipAddresses: the guest's global addresses,
    IPv4 first; none without an agent or while stopped; an event's full entry keeps them."""
    async with (
        serve("27.0") as (sim, server),
        client_for(server, "websocket", vm_image_server=mirror(server)) as client,
    ):
        backend = client.instances
        assert isinstance(backend, RoutingBackend)
        backend.vms.guest_agent_retry = 0.0
        await backend.create(vm_config())
        await backend.start("web-01")
        vm = sim.vms.by_name("web_01")
        assert vm is not None
        no_agent = await backend.get_instance("web-01")
        assert no_agent is not None and no_agent.addresses == ()
        vm.agent_interfaces = AGENT
        running = await backend.get_instance("web-01")
        assert running is not None and running.addresses == ("192.168.1.50", "2001:db8::50")
        event = backend.instance_from_event(vm.entry(sim.profile.name))
        assert event is not None and event.addresses == ("192.168.1.50", "2001:db8::50")
        await backend.stop("web-01", force=True)
        stopped = await backend.get_instance("web-01")
        assert stopped is not None and stopped.addresses == ()


async def test_guest_agent_is_not_asked_again_before_its_retry() -> None:
    async with (
        serve("27.0") as (sim, server),
        client_for(server, "websocket", vm_image_server=mirror(server)) as client,
    ):
        backend = client.instances
        await backend.create(vm_config())
        await backend.start("web-01")
        sim.counters.reset()
        for _ in range(3):
            await backend.get_instance("web-01")
        assert sim.counters.by_method["vm.get_guest_network_interfaces"] == 1


def test_guest_addresses_skip_loopback_link_local_and_bad_answers() -> None:
    from truenas_incus_operator.truenas.backends.vm.entries import guest_addresses

    interfaces = [
        {"name": "lo", "ip_addresses": [{"ip_address": "127.0.0.1"}, {"ip_address": "::1"}]},
        {"name": "e", "ip_addresses": [{"ip_address": "169.254.1.1"}, {"ip_address": "not an address"}, {}]},
        {"name": "f", "ip_addresses": [{"ip_address": "fd00::1"}, {"ip_address": "10.0.0.2"}]},
        "junk",
    ]
    assert guest_addresses(interfaces) == ("10.0.0.2", "fd00::1")
    assert guest_addresses("junk") == ()


def test_declared_calls_by_version() -> None:
    assert "vm.get_guest_network_interfaces" in VMBackend.calls((27, 0, 0)).reads
    assert "vm.get_guest_network_interfaces" not in VMBackend.calls((26, 0, 0)).reads
    assert "container.delete" in ContainerBackend.calls((27, 0, 0)).writes


async def test_upgrade_from_26_keeps_instances_and_the_new_client_speaks_27() -> None:
    """26 -> 27 keeps containers and VMs (no migration); the client made after the reboot detects 27."""
    async with serve("26.0") as (sim, server):
        async with client_for(server, "websocket", vm_image_server=mirror(server)) as before:
            await before.instances.create(container())
            await before.instances.create(vm_config())
            await before.instances.start("web01")
            assert before.version == (26, 0, 0)
        assert sim.upgrade("27.0") == []
        async with client_for(server, "websocket", vm_image_server=mirror(server)) as after:
            assert after.version == (27, 0, 0)
            names = {i.name: i.status for i in await after.instances.list_instances()}
            assert names == {"web01": InstanceStatus.RUNNING, "web-01": InstanceStatus.STOPPED}
            await after.instances.delete("web01")  # running: 27's job, with force
            await after.instances.delete("web-01")
            assert sim.containers.containers == {} and sim.vms.vms == {}
