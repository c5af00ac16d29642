"""The client's ZFS snapshots of an instance's datasets (issue 24's base, backends/snapshots.py)
against the simulator over real sockets (JSON-RPC), on every profile: the version's
calls, the owner property, newer snapshots named before a rollback, deletes of the operator's own
snapshots only."""

from __future__ import annotations

from typing import Any

import pytest

from truenas_incus_operator.truenas import InstanceConfig, ValidationFailed
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
    ("25.04.0", "rest"),
    ("25.04.2", "rest"),
    ("25.10", "rest"),
]
"""JSON-RPC on every profile, REST where it exists (25.x): the same calls over restful.py's routes."""
REST_CASES = [case for case in CASES if case[1] == "rest"]


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


@pytest.mark.parametrize("profile,transport", CASES)
async def test_a_containers_snapshot_is_of_its_own_dataset(profile: str, transport: str) -> None:
    async with serve(profile) as (sim, server), client_for(server, transport) as client:
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


# ----- periodic snapshot tasks (pool.snapshottask.*) ------------------------------------------------------------
SCHEMA = "tio-auto-0123456789ab-%Y%m%d-%H%M"
TASK: dict[str, Any] = {
    "recursive": False,
    "exclude": [],
    "lifetime_value": 2,
    "lifetime_unit": "HOUR",
    "naming_schema": SCHEMA,
    "schedule": {"minute": "0", "hour": "*", "dom": "*", "month": "*", "dow": "*", "begin": "00:00", "end": "23:59"},
    "enabled": True,
    "allow_empty": True,
}


@pytest.mark.parametrize("profile,transport", CASES)
async def test_periodic_tasks_are_created_found_changed_and_deleted(profile: str, transport: str) -> None:
    async with serve(profile) as (sim, server), client_for(server, transport) as client:
        await sim.call(session(sim), "pool.dataset.create", [{"name": "tank/home"}])
        tasks = client.snapshot_tasks
        made = await tasks.create({**TASK, "dataset": "tank/home"})
        assert made["dataset"] == "tank/home" and made["lifetime_unit"] == "HOUR"
        assert await tasks.get(made["id"]) == made
        assert await tasks.get(made["id"] + 1) is None
        assert [t["id"] for t in await tasks.find(SCHEMA, "tank/home")] == [made["id"]]
        assert [t["id"] for t in await tasks.find(SCHEMA)] == [made["id"]]
        assert await tasks.find(SCHEMA, "tank/other") == []
        assert await tasks.find("auto-%Y-%m-%d_%H-%M", "tank/home") == []
        changed = await tasks.update(made["id"], {**TASK, "dataset": "tank/home", "lifetime_value": 5})
        assert changed["lifetime_value"] == 5 and sim.storage.tasks.tasks[made["id"]].lifetime_value == 5
        assert await tasks.delete(made["id"]) is True
        assert await tasks.delete(made["id"]) is False
        assert sim.storage.tasks.tasks == {}


@pytest.mark.parametrize("profile,transport", [*CASES[:1], *CASES[2:4], *REST_CASES])
async def test_a_task_on_a_containers_dataset_only_where_truenas_lists_it(profile: str, transport: str) -> None:
    async with serve(profile) as (_sim, server), client_for(server, transport) as client:
        await client.instances.create(InstanceConfig(name="web01", type="CONTAINER", image="debian/bookworm"))
        target = await client.instances.snapshot_target("web01")
        assert target is not None
        attempt = client.snapshot_tasks.create({**TASK, "dataset": target.root})
        if profile == "26.0":
            assert (await attempt)["dataset"] == target.root
            return
        with pytest.raises(ValidationFailed) as refused:  # 25.x: pool.filesystem_choices leaves .ix-virt out
            await attempt
        assert [(e.attribute, e.message) for e in refused.value.errors] == [
            ("periodic_snapshot_create.dataset", "Dataset not found")
        ]


async def test_only_the_operators_scheduled_snapshots_are_deleted_as_such() -> None:
    async with serve("26.0") as (sim, server), client_for(server, "websocket") as client:
        own = session(sim)
        await sim.call(own, "pool.dataset.create", [{"name": "tank/home"}])
        snaps = client.snapshots
        target = SnapshotTarget("tank/home")
        schema = SCHEMA
        for name in (
            "tio-auto-0123456789ab-20260101-0100",
            "auto-2026-01-01_01-00",
            "tio-auto-ffffffffffff-20260101-0100",
        ):
            await sim.call(own, "pool.snapshot.create", [{"dataset": "tank/home", "name": name}])
        await snaps.take(target, "tio-auto-0123456789ab-20260101-0200", owner="uid-1")  # an owner: not the task's
        assert await snaps.delete_scheduled(target, "tio-auto-0123456789ab-20260101-0100", schema) is True
        assert await snaps.delete_scheduled(target, "tio-auto-0123456789ab-20260101-0100", schema) is False
        for name, naming in [
            ("auto-2026-01-01_01-00", schema),
            ("tio-auto-ffffffffffff-20260101-0100", schema),
            ("tio-auto-0123456789ab-20260101-0200", schema),
            ("auto-2026-01-01_01-00", "auto-%Y-%m-%d_%H-%M"),  # parses, but not the operator's schema
        ]:
            with pytest.raises(NotOurs):
                await snaps.delete_scheduled(target, name, naming)
        assert len([s for s in sim.storage.snapshots if s.startswith("tank/home@")]) == 3


async def test_a_snapshot_listing_with_a_createtxg_that_is_no_number_is_a_malformed_answer() -> None:
    """Hostile review: a NAS (or what answers at its URL) sending createtxg "x" raised ValueError,
    outside the client's error tree, so an IncusInstance's deletion escaped its error mapping."""
    from truenas_incus_operator.truenas import MalformedAnswer, Snapshots, SnapshotTarget

    class Lying:
        async def call(self, method: str, *params: Any, **_: Any) -> Any:
            return [{"dataset": "tank/ct", "snapshot_name": "s", "createtxg": "x", "properties": {}}]

    with pytest.raises(MalformedAnswer, match="createtxg is not a number"):
        await Snapshots(Lying(), (25, 10)).of(SnapshotTarget("tank/ct"))  # type: ignore[arg-type]


async def test_a_snapshots_clones_are_found_by_origin_and_an_odd_origin_is_no_clone() -> None:
    from truenas_incus_operator.truenas import SnapshotInfo, Snapshots
    from truenas_incus_operator.truenas.backends.vm import instance_of_dataset

    class Answering:
        async def call(self, method: str, *params: Any, **_: Any) -> Any:
            assert method == "pool.dataset.query"
            assert params[0] == [["origin.value", "in", ["tank/incus-operator/vms/src/root@tio-a"]]]
            return [
                {
                    "id": "tank/incus-operator/vms/copy/root",
                    "origin": {"value": "tank/incus-operator/vms/src/root@tio-a"},
                },
                {"id": "tank/odd1", "origin": "tank/incus-operator/vms/src/root@tio-a"},  # not TrueNAS's shape
                {"id": "tank/odd2", "origin": {"value": 7}},
                "not an entry",
            ]

    info = SnapshotInfo("tio-a", ("tank/incus-operator/vms/src/root",), 1, None, None, None, "uid")
    clones = await Snapshots(Answering(), (25, 10)).clones(info)  # type: ignore[arg-type]
    assert clones == ["tank/incus-operator/vms/copy/root"]
    assert instance_of_dataset(clones[0]) == "copy" and instance_of_dataset("tank/other/root") is None
    assert instance_of_dataset("tank/incus-operator/vms/web_01") == "web-01"


@pytest.mark.parametrize("profile", ["25.04.2", "25.10", "26.0"])
async def test_a_vm_is_built_from_a_snapshot_of_another_and_neither_is_deleted_while_cloned(profile: str) -> None:
    from truenas_incus_operator.truenas import CallFailed, CloneSource
    from truenas_incus_operator.truenas.backends.routing import RoutingBackend

    async with serve(profile) as (sim, server), client_for(server, "websocket", vm_image_server=mirror(server)) as c:
        backend = c.instances
        assert isinstance(backend, RoutingBackend)
        await backend.create(vm_config("src"))
        target = await backend.snapshot_target("src")
        assert target is not None
        await c.snapshots.take(target, "tio-gold", owner="u1")
        copy = InstanceConfig(name="copy", type="VM", image=None, source=CloneSource("src", "tio-gold", "u1"))
        with pytest.raises(ValidationFailed, match="snapshot's pool"):
            await backend.create(InstanceConfig(**{**copy.__dict__, "storage_pool": "other"}))
        made = await backend.create(copy)
        assert made.name == "copy"
        home = target.root.rsplit("/", 1)[0] + "/copy"
        assert sim.storage.datasets[f"{home}/root"].origin == f"{target.root}/root@tio-gold"
        made_vm = sim.vms.by_name("copy")
        assert made_vm is not None and "clone of" in str(made_vm.config["description"])
        with pytest.raises(CallFailed, match="is a clone of its snapshots"):
            await backend.delete("src")
        assert sim.vms.by_name("src") is not None  # refused before anything went
        await backend.delete("copy")
        await c.snapshots.delete(target, "tio-gold", owner="u1")
        await backend.delete("src")
        assert sim.vms.by_name("src") is None
        with pytest.raises(ValidationFailed, match="from an image only"):
            await backend.containers.create(InstanceConfig(name="ct", type="CONTAINER", image=None, source=copy.source))


@pytest.mark.parametrize("profile", ["25.10", "26.0"])
async def test_a_clone_takes_only_the_operators_snapshot_and_never_a_leftover_disk(profile: str) -> None:
    """Hostile review: the disk was chosen by the snapshot's name alone, and a root disk left by
    another create cut short (VM names are one namespace on the NAS) was booted as the new VM's."""
    from truenas_incus_operator.truenas import CallFailed, CloneSource, NotFound

    async with serve(profile) as (sim, server), client_for(server, "websocket", vm_image_server=mirror(server)) as c:
        backend = c.instances
        await backend.create(vm_config("src"))
        target = await backend.snapshot_target("src")
        assert target is not None
        await c.snapshots.take(target, "tio-gold", owner="u1")
        own = session(sim)
        await sim.call(own, "pool.snapshot.create" if profile != "25.04.2" else "zfs.snapshot.create",
                       [{"dataset": target.root, "name": "tio-plain", "recursive": True}])  # fmt: skip
        with pytest.raises(NotFound, match="is gone"):  # the name without the owner property: not ours
            await backend.create(
                InstanceConfig(name="a", type="VM", image=None, source=CloneSource("src", "tio-plain", "u2"))
            )
        with pytest.raises(NotFound, match="is gone"):  # ours, but another IncusInstanceSnapshot's
            await backend.create(
                InstanceConfig(name="b", type="VM", image=None, source=CloneSource("src", "tio-gold", "u9"))
            )
        # Someone's leftover disk under the new VM's name: refused, and left as it is.
        pool = target.root.split("/")[0]
        await sim.call(own, "pool.dataset.create", [{"name": f"{pool}/incus-operator/vms/c"}])
        await sim.call(own, "pool.snapshot.clone" if profile != "25.04.2" else "zfs.snapshot.clone",
                       [{"snapshot": f"{target.root}/root@tio-plain", "dataset_dst": f"{pool}/incus-operator/vms/c/root"}])  # fmt: skip
        with pytest.raises(CallFailed, match="is not a clone of"):
            await backend.create(
                InstanceConfig(name="c", type="VM", image=None, source=CloneSource("src", "tio-gold", "u1"))
            )
        assert sim.storage.datasets[f"{pool}/incus-operator/vms/c/root"].origin == f"{target.root}/root@tio-plain"
        assert sim.vms.by_name("c") is None


def test_a_clones_owner_is_named_only_to_its_own_namespace() -> None:
    from types import SimpleNamespace

    from truenas_incus_operator.instances.deletion import clones_named

    records = {"copy": SimpleNamespace(owner="team-a/copy")}
    ledger = SimpleNamespace(get=lambda identity, instance: records.get(instance))
    clones = ["tank/incus-operator/vms/copy/root", "tank/elsewhere"]
    assert clones_named(ledger, "nas", clones, "team-a") == (  # type: ignore[arg-type]
        "IncusInstance team-a/copy (tank/incus-operator/vms/copy/root), tank/elsewhere"
    )
    assert clones_named(ledger, "nas", clones, "team-b") == "tank/incus-operator/vms/copy/root, tank/elsewhere"  # type: ignore[arg-type]
