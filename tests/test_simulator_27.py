"""The simulator's TrueNAS 27 profile (middleware master, api/v27_0_0): what changed from 26 in ``vm.*``,
``vm.device.*`` and ``container.*``."""

from __future__ import annotations

from typing import Any

import jsonschema
import pytest

from truenas_simulator import Simulator
from truenas_simulator.errors import CallError, MethodNotFound, ValidationErrors
from truenas_simulator.services.storage import Dataset
from truenas_simulator.validation import load_schema

from .test_simulator import run_job, session
from .test_simulator_26 import create


async def call(sim: Simulator, method: str, *params: Any, api_version: str = "current") -> Any:
    return await sim.call(session(sim, api_version=api_version), method, list(params))


def test_the_profile_serves_27_and_the_26_endpoint_keeps_26_models() -> None:
    sim = Simulator("27.0")
    assert sim.profile.current_api == "v27.0.0" and sim.profile.schema_version == "v27_0_0"
    assert sim.profile.schema_for_api("v26.0.0") == "v26_0_0"
    assert Simulator("27").profile.name == "27.0"
    methods = sim.methods
    assert methods["container.delete"][1] is True  # a job on 27 (plugins/container/__init__.py)
    assert methods["vm.reset"][1] is False and methods["vm.get_guest_network_interfaces"][1] is False
    assert "vm.reset" not in Simulator("26.0").methods
    assert Simulator("26.0").methods["container.delete"][1] is False


async def test_vm_reset_keeps_the_process_and_needs_a_running_domain() -> None:
    sim = Simulator("27.0")
    await call(sim, "vm.create", {"name": "web01", "memory": 512})
    with pytest.raises(CallError, match="Domain 'web01' is not active"):
        await call(sim, "vm.reset", 1)
    await call(sim, "vm.start", 1)
    pid = sim.vms.vms[1].pid
    assert await call(sim, "vm.reset", 1) is None
    assert sim.vms.vms[1].state == "RUNNING" and sim.vms.vms[1].pid == pid and sim.vms.vms[1].resets == 1
    with pytest.raises(MethodNotFound):
        await call(Simulator("26.0"), "vm.reset", 1)


async def test_guest_network_interfaces_come_from_the_agent() -> None:
    sim = Simulator("27.0")
    await call(sim, "vm.create", {"name": "web01", "memory": 512})
    with pytest.raises(CallError, match="VM 1 is not running"):
        await call(sim, "vm.get_guest_network_interfaces", 1)
    await call(sim, "vm.start", 1)
    with pytest.raises(CallError, match="QEMU guest agent is not connected"):
        await call(sim, "vm.get_guest_network_interfaces", 1)
    sim.vms.vms[1].agent_interfaces = [
        {
            "name": "lo",
            "hardware-address": "00:00:00:00:00:00",
            "ip-addresses": [{"ip-address": "127.0.0.1", "prefix": 8}],
        },
        {
            "name": "enp1s0",
            "hardware-address": "00:a0:98:01:02:7e",
            "ip-addresses": [
                {"ip-address": "192.168.1.50", "prefix": 24, "ip-address-type": "ipv4"},
                {"ip-address": "fe80::2a0:98ff:fe01:27e", "prefix": 64, "ip-address-type": "ipv6"},
            ],
        },
    ]
    interfaces = await call(sim, "vm.get_guest_network_interfaces", 1)
    assert interfaces[1] == {
        "name": "enp1s0",
        "hardware_address": "00:a0:98:01:02:7e",
        "ip_addresses": [
            {"ip_address": "192.168.1.50", "prefix": 24, "ip_address_type": "IPV4"},
            {"ip_address": "fe80::2a0:98ff:fe01:27e", "prefix": 64, "ip_address_type": "IPV6"},
        ],
    }
    assert interfaces[0]["ip_addresses"][0]["ip_address_type"] == "IPV4"  # the agent's default, upper-cased


async def test_vm_delete_refuses_an_active_vm_without_force() -> None:
    sim = Simulator("27.0")
    await call(sim, "vm.create", {"name": "web01", "memory": 512})
    await call(sim, "vm.start", 1)
    with pytest.raises(CallError, match=r"\[EBUSY\] 'web01' is running; stop the VM first or pass force") as info:
        await call(sim, "vm.delete", 1, {"zvols": False, "force": False})
    assert info.value.errno == 16
    assert await call(sim, "vm.delete", 1, {"force": True}) is None
    assert sim.vms.vms == {}


async def test_nic_mac_is_colon_separated_and_stored_lower_case() -> None:
    sim = Simulator("27.0")
    await call(sim, "vm.create", {"name": "web01", "memory": 512})
    with pytest.raises(ValidationErrors, match="Assertion failed, MAC address must be a colon-separated") as info:
        await call(sim, "vm.device.create", {"vm": 1, "attributes": {"dtype": "NIC", "mac": "00-a0-98-00-00-01"}})
    assert info.value.errors[0][0] == "vm_device_create.attributes.NIC.mac"
    nic = await call(sim, "vm.device.create", {"vm": 1, "attributes": {"dtype": "NIC", "mac": "00:A0:98:00:00:0A"}})
    assert nic["attributes"]["mac"] == "00:a0:98:00:00:0a"
    jsonschema.validate(nic, load_schema("v27_0_0.vm.device.entry"))
    # 26 took dashes and kept the case
    sim26 = Simulator("26.0")
    await call(sim26, "vm.create", {"name": "web01", "memory": 512})
    old = await call(sim26, "vm.device.create", {"vm": 1, "attributes": {"dtype": "NIC", "mac": "00-A0-98-00-00-01"}})
    assert old["attributes"]["mac"] == "00-A0-98-00-00-01"


async def test_container_delete_is_a_job_that_wants_force_and_recursive() -> None:
    sim = Simulator("27.0")
    entry = (await create(sim))["result"]
    jsonschema.validate(entry, load_schema("v27_0_0.container.query.entry"))
    await call(sim, "container.start", 1)
    refused = await run_job(sim, "container.delete", 1)
    assert refused["state"] == "FAILED"
    assert "container_delete.force" in refused["exc_info"]["extra"][0][0]
    assert "Container 'c1' is running. Stop it first" in refused["error"]
    await run_job(sim, "container.stop", 1, {"force": True})
    dataset = entry["dataset"]
    sim.storage.datasets[dataset] = Dataset(dataset)
    await call(sim, "pool.snapshot.create", {"dataset": dataset, "name": "before"})
    kept = await run_job(sim, "container.delete", 1, {"force": True})
    assert kept["state"] == "FAILED" and "has 1 snapshot(s). Set `recursive`" in kept["error"]
    assert 1 in sim.containers.containers
    gone = await run_job(sim, "container.delete", 1, {"recursive": True})
    assert gone["state"] == "SUCCESS" and gone["result"] is None
    assert sim.containers.containers == {} and f"{dataset}@before" not in sim.storage.snapshots
    with pytest.raises(ValidationErrors, match="Extra inputs are not permitted"):
        await call(sim, "container.delete", 1, {"zvols": True})


async def test_container_device_type_cannot_be_changed() -> None:
    sim = Simulator("27.0")
    await create(sim)
    device = await call(
        sim, "container.device.create", {"container": 1, "attributes": {"dtype": "NIC", "nic_attach": "br0"}}
    )
    with pytest.raises(ValidationErrors, match="Device type cannot be changed"):
        await call(
            sim,
            "container.device.update",
            device["id"],
            {"attributes": {"dtype": "FILESYSTEM", "source": "/mnt/tank/a", "target": "/a"}},
        )
