"""Every backend calls only what it declares (``calls(version)``), so doctor's role check asks the key
for exactly what the operator will call (issue 22 item 8: doctor's hand-kept list lacked vm.poweroff
and every snapshot call). A whole lifecycle of each API family against the simulator, recorded."""

from __future__ import annotations

from typing import Any

import pytest

from truenas_incus_operator.doctor import declared_calls
from truenas_incus_operator.truenas import DeviceConfig, InstanceChanges, InstanceConfig, TrueNASClient
from truenas_incus_operator.truenas.backends.routing import RoutingBackend

from .test_client import client_for, serve
from .test_client_vm import mirror, vm_config


class Recorder:
    """An Observer that keeps the name of every call and job."""

    def __init__(self) -> None:
        self.methods: set[str] = set()

    def call_started(self) -> None:
        return None

    def call_finished(self, method: str, outcome: str, seconds: float) -> None:
        self.methods.add(method)

    def job_finished(self, method: str, state: str, seconds: float) -> None:
        self.methods.add(method)

    def event_received(self, collection: str, lag: float | None) -> None:
        return None

    def reconnected(self) -> None:
        return None

    def base_collected(self) -> None:
        return None


def declared(client: TrueNASClient) -> set[str]:
    """What doctor checks the key's roles against (connect() reads the NAS's identity: among them)."""
    calls = declared_calls(client)
    return set(calls["read"]) | set(calls["write"])


async def running(client: TrueNASClient, name: str) -> None:
    observed = await client.instances.get_instance(name)
    assert observed is not None
    if observed.status != "RUNNING":
        await client.instances.start(name)


async def container_lifecycle(client: TrueNASClient) -> None:
    backend = client.instances
    disk = DeviceConfig("data", "DISK", source="/mnt/tank/data", destination="/data")
    config = InstanceConfig(name="web01", type="CONTAINER", image="debian/bookworm", cpu="1", autostart=True)
    await backend.create(config)
    await backend.list_instances()
    await backend.get_instance("web01")
    await backend.update("web01", InstanceChanges(cpu="2"))
    await backend.add_device("web01", disk)
    added = next(d for d in await backend.list_devices("web01") if d.source == "/mnt/tank/data")
    moved = DeviceConfig("data", "DISK", source="/mnt/tank/other", destination="/data")
    await backend.update_device("web01", moved, added.name)
    await backend.delete_device("web01", added.name)
    await running(client, "web01")
    await backend.stop("web01", timeout=5)
    await backend.start("web01")
    await backend.stop("web01", timeout=5)
    await backend.delete("web01")


async def vm_lifecycle(client: TrueNASClient) -> None:
    backend = client.instances
    await backend.create(vm_config("vm-01", autostart=True))
    await backend.create(vm_config("vm-02", image="ubuntu/noble"))
    await backend.list_instances()
    await backend.update("vm-01", InstanceChanges(cpu="1"))
    nic = next(d for d in await backend.list_devices("vm-01") if d.type == "NIC")
    await backend.delete_device("vm-01", nic.name)
    await backend.add_device("vm-01", nic)
    with_mac = DeviceConfig(nic.name, "NIC", extra={**nic.extra, "mac": "00:a0:98:00:00:01"})
    await backend.update_device("vm-01", with_mac, nic.name)
    await running(client, "vm-01")
    await backend.stop("vm-01", timeout=5)
    await backend.start("vm-01")
    await backend.delete("vm-01")  # running: powered off first
    await backend.delete("vm-02")
    assert isinstance(backend, RoutingBackend)
    vms = backend.vms
    vms.base_grace_seconds = 0.0
    await vms.collect_bases(now=0.0)
    await vms.collect_bases(now=1.0)  # both bases unused: collected (snapshot and dataset deleted)


@pytest.mark.parametrize("profile", ["25.04.2", "25.10", "26.0", "27.0"])
async def test_each_family_calls_only_what_it_declares(profile: str) -> None:
    recorder = Recorder()
    async with (
        serve(profile) as (_sim, server),
        client_for(server, "websocket", vm_image_server=mirror(server), observer=recorder) as client,
    ):
        await container_lifecycle(client)
        await vm_lifecycle(client)
        undeclared = recorder.methods - declared(client)
        assert undeclared == set(), f"{profile}: called but not declared (doctor would not check them): {undeclared}"
        assert {"vm.poweroff", "filesystem.put"} <= recorder.methods, "the lifecycle reaches the calls doctor missed"


async def snapshot_lifecycle(client: TrueNASClient) -> None:
    """What IncusInstanceSnapshot, IncusInstanceRestore and spec.snapshots call: a snapshot taken,
    listed, rolled back to and deleted; a periodic task made, found, changed and deleted."""
    await client.instances.create(InstanceConfig(name="web01", type="CONTAINER", image="debian/bookworm"))
    target = await client.instances.snapshot_target("web01")
    assert target is not None
    snaps = client.snapshots
    await snaps.take(target, "tio-0123456789ab", owner="uid-1")
    await snaps.rollback(target, "tio-0123456789ab")
    await snaps.delete(target, "tio-0123456789ab", owner="uid-1")
    await snaps.delete_scheduled(target, "tio-auto-0123456789ab-20260101-0000", "tio-auto-0123456789ab-%Y%m%d-%H%M")
    tasks = client.snapshot_tasks
    home, schema = "tank/incus-operator", "tio-auto-0123456789ab-%Y%m%d-%H%M"  # a dataset every version lists
    payload: dict[str, Any] = {"dataset": home, "naming_schema": schema, "recursive": False}
    payload |= {"lifetime_value": 1, "lifetime_unit": "HOUR", "schedule": {"minute": "0"}}
    task = await tasks.create(payload)
    await tasks.get(task["id"])
    await tasks.find(schema, home)
    await tasks.update(task["id"], {**payload, "lifetime_value": 2})
    await tasks.delete(task["id"])


@pytest.mark.parametrize("profile", ["25.04.0", "25.04.2", "25.10", "26.0", "27.0"])
async def test_snapshots_and_schedules_call_only_what_is_declared(profile: str) -> None:
    recorder = Recorder()
    async with serve(profile) as (sim, server), client_for(server, "websocket", observer=recorder) as client:
        sim.storage.add_dataset("tank/incus-operator")
        await snapshot_lifecycle(client)
        undeclared = recorder.methods - declared(client)
        assert undeclared == set(), f"{profile}: called but not declared (doctor would not check them): {undeclared}"
