"""The client's ZFS snapshots of an instance's datasets (issue 24's base, backends/snapshots.py)
against the simulator over real sockets (JSON-RPC), on every profile: the version's
calls, the owner property, newer snapshots named before a rollback, deletes of the operator's own
snapshots only."""

from __future__ import annotations

import pytest

from truenas_incus_operator.truenas import InstanceConfig
from truenas_incus_operator.truenas.backends.snapshots import (
    OWNER_PROPERTY,
    NewerSnapshots,
    NotOurs,
    Snapshots,
    SnapshotTarget,
)
from truenas_simulator.state import GIB

from .test_client import client_for, serve
from .test_client_vm import mirror, vm_config
from .test_simulator import session

CASES = [
    ("25.04.0", "websocket"),
    ("25.04.2", "websocket"),
    ("25.10", "websocket"),
    ("26.0", "websocket"),
    ("27.0", "websocket"),
]
"""JSON-RPC only so far: the REST transport has no snapshot routes yet (25.x only, deprecated)."""


@pytest.mark.parametrize("profile,transport", CASES)
async def test_take_list_roll_back_and_delete_an_instances_snapshots(profile: str, transport: str) -> None:
    async with serve(profile) as (sim, server), client_for(server, transport) as client:
        own = session(sim)
        await sim.call(own, "pool.dataset.create", [{"name": "tank/home"}])
        await sim.call(own, "pool.dataset.create", [{"name": "tank/home/root", "type": "VOLUME", "volsize": GIB}])
        snaps = Snapshots(client.transport, client.version)
        target = SnapshotTarget("tank/home", recursive=True)
        root = sim.storage.datasets["tank/home/root"]
        root.content = "v1"
        sim.storage.snaps.written("tank/home/root", 4096)
        first = await snaps.take(target, "tio-a", owner="uid-1")
        assert first.datasets == ("tank/home", "tank/home/root") and first.owner == "uid-1"
        assert first.referenced == 0 and first.used == 0 and first.created is not None
        assert sim.storage.snapshots["tank/home/root@tio-a"].user_properties == {OWNER_PROPERTY: "uid-1"}
        root.content = "v2"
        sim.storage.snaps.written("tank/home/root", 1024)
        await snaps.take(target, "tio-b", owner="uid-2")
        await sim.call(own, f"{snaps.namespace}.create", [{"dataset": "tank/home", "name": "manual"}])  # the UI's
        listed = await snaps.of(target)
        assert [s.name for s in listed] == ["tio-a", "tio-b", "manual"]
        assert listed[0].used == 1024, "what was overwritten since it was taken"
        assert listed[2].owner is None and listed[2].datasets == ("tank/home",)

        with pytest.raises(NewerSnapshots) as refused:
            await snaps.rollback(target, "tio-a")
        assert refused.value.newer == ["tank/home@tio-b", "tank/home@manual"]
        assert root.content == "v2"
        assert await snaps.rollback(target, "tio-b", destroy_newer=True) == ["tank/home@manual"]
        assert root.content == "v2" and [s.name for s in await snaps.of(target)] == ["tio-a", "tio-b"]
        root.content = "v3"
        assert await snaps.rollback(target, "tio-b") == []
        assert root.content == "v2", "the child volume rolled back with its parent"
        assert sim.storage.changed_under == []

        with pytest.raises(NotOurs):
            await snaps.delete(target, "tio-b", owner="uid-1")
        assert await snaps.delete(target, "tio-b", owner="uid-2") is True
        assert await snaps.delete(target, "tio-b", owner="uid-2") is False
        assert set(sim.storage.snapshots) == {"tank/home@tio-a", "tank/home/root@tio-a"}
        with pytest.raises(ValueError, match="snapshot name"):
            await snaps.take(target, "bad name/x", owner="uid-1")


@pytest.mark.parametrize("profile", ["25.04.0", "25.04.2", "25.10", "26.0", "27.0"])
async def test_a_containers_snapshot_is_of_its_own_dataset(profile: str) -> None:
    async with serve(profile) as (sim, server), client_for(server, "websocket") as client:
        backend = client.instances
        await backend.create(InstanceConfig(name="web01", type="CONTAINER", image="debian/bookworm", autostart=False))
        target = await backend.snapshot_target("web01")
        home = ".truenas_containers" if profile in ("26.0", "27.0") else ".ix-virt"
        assert target == SnapshotTarget(f"tank/{home}/containers/web01")
        taken = await Snapshots(client.transport, client.version).take(target, "tio-1", owner="uid-1")
        assert taken.datasets == (target.root,) and f"{target.root}@tio-1" in sim.storage.snapshots
        assert await backend.snapshot_target("missing") is None


async def test_an_incus_vms_snapshot_is_of_its_disk_volume() -> None:
    async with serve("25.04.0") as (sim, server), client_for(server, "websocket") as client:
        await client.instances.create(InstanceConfig(name="vm1", type="VM", image="debian/bookworm", autostart=False))
        target = await client.instances.snapshot_target("vm1")
        assert target == SnapshotTarget("tank/.ix-virt/virtual-machines/vm1.block")
        assert sim.storage.datasets[target.root].type == "VOLUME"


@pytest.mark.parametrize("profile", ["25.10", "26.0"])
async def test_a_vms_snapshot_takes_its_home_root_disk_and_seed_at_once(profile: str) -> None:
    async with (
        serve(profile) as (sim, server),
        client_for(server, "websocket", vm_image_server=mirror(server)) as client,
    ):
        await client.instances.create(vm_config())
        target = await client.instances.snapshot_target("web-01")
        assert target == SnapshotTarget("tank/incus-operator/vms/web_01", recursive=True)
        snaps = Snapshots(client.transport, client.version)
        taken = await snaps.take(target, "tio-1", owner="uid-1")
        assert taken.datasets == ("tank/incus-operator/vms/web_01", "tank/incus-operator/vms/web_01/root")
        assert len({sim.storage.snapshots[f"{d}@tio-1"].txg for d in taken.datasets}) == 1
        root = sim.storage.datasets["tank/incus-operator/vms/web_01/root"]
        image = root.content
        root.content = "overwritten by the guest"
        assert await snaps.rollback(target, "tio-1") == []
        assert root.content == image and sim.storage.changed_under == []
