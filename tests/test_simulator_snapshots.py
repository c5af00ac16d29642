"""The simulator's ZFS snapshots per version (issue 24 item 6): ``zfs.snapshot.*`` on 25.04.2,
``pool.snapshot.*`` on 25.10 and 26 (26's over zfs.resource.snapshot, whose exceptions are not
CallErrors). Each rule is ZFS's; the wording per version is the middleware's (services/snapshots.py)."""

from __future__ import annotations

import errno
from typing import Any

import pytest

from truenas_simulator import Simulator
from truenas_simulator.errors import CallError, ValidationErrors
from truenas_simulator.services.snapshots import ZFSPathInvalidException, ZFSPathNotFoundException
from truenas_simulator.state import GIB

from .test_simulator import run_job, session

PROFILES = ["25.04.2", "25.10", "26.0", "27.0"]
PYLIBZFS = ("26.0", "27.0")
"""26 and later: pool.snapshot.* over zfs.resource.snapshot (truenas_pylibzfs)."""


def ns(profile: str) -> str:
    return "zfs.snapshot" if profile.startswith("25.04") else "pool.snapshot"


async def call(sim: Simulator, method: str, *params: Any) -> Any:
    return await sim.call(session(sim), method, list(params))


async def tree(sim: Simulator) -> None:
    await call(sim, "pool.dataset.create", {"name": "tank/app"})
    await call(sim, "pool.dataset.create", {"name": "tank/app/db", "type": "VOLUME", "volsize": GIB})
    await call(sim, "pool.dataset.create", {"name": "tank/app/logs"})


@pytest.mark.parametrize("profile", PROFILES)
async def test_a_recursive_snapshot_takes_the_whole_tree_in_one_txg_with_its_properties(profile: str) -> None:
    sim = Simulator(profile)
    await tree(sim)
    prop = {"io.truenas.incus:owner": "uid-1"}
    entry = await call(
        sim, f"{ns(profile)}.create", {"dataset": "tank/app", "name": "s1", "recursive": True, "properties": prop}
    )
    assert entry["id"] == "tank/app@s1" and entry["snapshot_name"] == "s1"
    taken = await call(sim, f"{ns(profile)}.query", [["snapshot_name", "=", "s1"]], {})
    assert sorted(e["id"] for e in taken) == ["tank/app/db@s1", "tank/app/logs@s1", "tank/app@s1"]
    assert len({e["createtxg"] for e in taken}) == 1, "atomic: one transaction group"
    later = await call(sim, f"{ns(profile)}.create", {"dataset": "tank/app", "name": "s2"})
    assert int(later["createtxg"]) > int(taken[0]["createtxg"])
    if profile in PYLIBZFS:  # user properties only with extra.retention, as user_properties
        plain = await call(sim, "pool.snapshot.query", [["id", "=", "tank/app@s1"]], {"get": True})
        assert plain["properties"] == {} and plain["holds"] == {}
        full = await call(
            sim, "pool.snapshot.query", [["id", "=", "tank/app@s1"]], {"get": True, "extra": {"retention": True}}
        )
        assert full["user_properties"] == prop
        asked = {"extra": {"properties": ["used", "referenced"]}, "get": True}
        assert set((await call(sim, "pool.snapshot.query", [["id", "=", "tank/app@s1"]], asked))["properties"]) == {
            "used",
            "referenced",
        }
    else:  # 25.x: every property, user properties among them
        found = await call(sim, f"{ns(profile)}.query", [["id", "=", "tank/app@s1"]], {"get": True})
        assert found["properties"]["io.truenas.incus:owner"]["value"] == "uid-1"
        assert {"used", "referenced", "creation", "createtxg"} <= set(found["properties"])
    again = {"dataset": "tank/app", "name": "s1", "recursive": True}
    if profile in PYLIBZFS:
        with pytest.raises(ValidationErrors) as taken_26:
            await call(sim, "pool.snapshot.create", again)
        assert taken_26.value.errors == [("pool.snapshot.create", "s1 already exists.", errno.EEXIST)]
    else:
        with pytest.raises(CallError, match="dataset already exists") as taken_25:
            await call(sim, f"{ns(profile)}.create", again)
        assert taken_25.value.errno == errno.EEXIST


@pytest.mark.parametrize("profile", PROFILES)
async def test_a_rollback_past_newer_snapshots_is_refused_naming_them_and_recursive_destroys_them(profile: str) -> None:
    sim = Simulator(profile)
    await tree(sim)
    volume = sim.storage.datasets["tank/app/db"]
    for name, content in (("a", "v1"), ("b", "v2"), ("c", "v3")):
        volume.content = content
        await call(sim, f"{ns(profile)}.create", {"dataset": "tank/app/db", "name": name})
    volume.content = "v4"
    if profile in PYLIBZFS:
        with pytest.raises(ValueError, match="more recent snapshots or bookmarks exist") as refused:
            await call(sim, "pool.snapshot.rollback", "tank/app/db@a", {})
        assert str(refused.value).endswith("\n  tank/app/db@b\n  tank/app/db@c")
    else:
        with pytest.raises(CallError) as refused_25:
            await call(sim, f"{ns(profile)}.rollback", "tank/app/db@a", {})
        assert refused_25.value.errmsg.startswith("Failed to rollback snapshot: cannot rollback to 'tank/app/db@a'")
        assert refused_25.value.errmsg.endswith("snapshots and bookmarks:\ntank/app/db@b\ntank/app/db@c")
    assert volume.content == "v4" and "tank/app/db@c" in sim.storage.snapshots
    assert await call(sim, f"{ns(profile)}.rollback", "tank/app/db@c", {}) is None  # the newest: no option needed
    assert volume.content == "v3"
    await call(sim, f"{ns(profile)}.rollback", "tank/app/db@a", {"recursive": True})
    assert volume.content == "v1" and set(sim.storage.snapshots) == {"tank/app/db@a"}


@pytest.mark.parametrize("profile", PROFILES)
async def test_newer_snapshots_with_clones_need_recursive_clones_which_destroys_the_clones(profile: str) -> None:
    sim = Simulator(profile)
    await tree(sim)
    await call(sim, f"{ns(profile)}.create", {"dataset": "tank/app/db", "name": "a"})
    await call(sim, f"{ns(profile)}.create", {"dataset": "tank/app/db", "name": "b"})
    await call(sim, f"{ns(profile)}.clone", {"snapshot": "tank/app/db@b", "dataset_dst": "tank/copy"})
    if profile in PYLIBZFS:  # _destroy_newer_snapshots passes over the one it cannot destroy; then the rollback fails
        with pytest.raises(ValueError, match="tank/app/db@b"):
            await call(sim, "pool.snapshot.rollback", "tank/app/db@a", {"recursive": True})
    else:
        with pytest.raises(CallError, match="clones of previous snapshots exist") as refused:
            await call(sim, f"{ns(profile)}.rollback", "tank/app/db@a", {"recursive": True})
        assert refused.value.errmsg.endswith("clones and dependents:\ntank/copy")
    assert "tank/copy" in sim.storage.datasets
    await call(sim, f"{ns(profile)}.rollback", "tank/app/db@a", {"recursive_clones": True})
    assert "tank/copy" not in sim.storage.datasets and set(sim.storage.snapshots) == {"tank/app/db@a"}


@pytest.mark.parametrize("profile", PROFILES)
async def test_a_snapshot_with_a_clone_or_a_hold_is_kept_and_defer_lets_it_go_with_the_last_one(profile: str) -> None:
    sim = Simulator(profile)
    await tree(sim)
    await call(sim, f"{ns(profile)}.create", {"dataset": "tank/app/db", "name": "a"})
    await call(sim, f"{ns(profile)}.clone", {"snapshot": "tank/app/db@a", "dataset_dst": "tank/copy"})
    with pytest.raises(ValidationErrors) as refused:
        await call(sim, f"{ns(profile)}.delete", "tank/app/db@a")
    if profile in PYLIBZFS:
        expected = ("zfs.resource.snapshot.destroy", "'tank/app/db@a' has the following clones: tank/copy", errno.EBUSY)
    else:
        expected = (
            "options.defer",
            "Please set this attribute as 'tank/app/db@a' snapshot has dependent clones: tank/copy",
            errno.EINVAL,
        )
    assert refused.value.errors == [expected]
    await call(sim, f"{ns(profile)}.delete", "tank/app/db@a", {"defer": True})
    assert sim.storage.snapshots["tank/app/db@a"].defer_destroy
    assert await call(sim, "pool.dataset.delete", "tank/copy")
    assert "tank/app/db@a" not in sim.storage.snapshots, "gone with its last clone"

    await call(sim, f"{ns(profile)}.create", {"dataset": "tank/app/db", "name": "kept"})
    await call(sim, f"{ns(profile)}.hold", "tank/app/db@kept", {})
    held = (await call(sim, f"{ns(profile)}.query", [["id", "=", "tank/app/db@kept"]], {"extra": {"holds": True}}))[0]
    assert held["holds"] == {"truenas": 1}
    with pytest.raises((CallError, ValidationErrors), match=r"busy|holds"):
        await call(sim, f"{ns(profile)}.delete", "tank/app/db@kept")
    await call(sim, f"{ns(profile)}.release", "tank/app/db@kept", {})
    await call(sim, f"{ns(profile)}.delete", "tank/app/db@kept")
    assert sim.storage.snapshots == {}


@pytest.mark.parametrize("profile", PROFILES)
async def test_used_is_what_was_overwritten_since_and_referenced_what_the_dataset_held(profile: str) -> None:
    sim = Simulator(profile)
    await tree(sim)
    snaps = sim.storage.snaps
    snaps.written("tank/app/db", 300)
    await call(sim, f"{ns(profile)}.create", {"dataset": "tank/app/db", "name": "a"})
    snaps.written("tank/app/db", 100)
    asked: dict[str, Any] = {"get": True, "extra": {"properties": ["used", "referenced"]}}
    found = await call(sim, f"{ns(profile)}.query", [["id", "=", "tank/app/db@a"]], asked)
    assert found["properties"]["used"]["parsed"] == 100 and found["properties"]["referenced"]["parsed"] == 300
    await call(sim, f"{ns(profile)}.rollback", "tank/app/db@a", {})
    found = await call(sim, f"{ns(profile)}.query", [["id", "=", "tank/app/db@a"]], asked)
    assert found["properties"]["used"]["parsed"] == 0 and sim.storage.datasets["tank/app/db"].referenced == 300


@pytest.mark.parametrize("profile", PROFILES)
async def test_promote_moves_the_origin_snapshot_and_older_ones_to_the_clone(profile: str) -> None:
    sim = Simulator(profile)
    await tree(sim)
    for name in ("a", "b", "c"):
        await call(sim, f"{ns(profile)}.create", {"dataset": "tank/app/db", "name": name})
    await call(sim, f"{ns(profile)}.clone", {"snapshot": "tank/app/db@b", "dataset_dst": "tank/copy"})
    await call(sim, "pool.dataset.promote", "tank/copy")
    assert {"tank/copy@a", "tank/copy@b", "tank/app/db@c"} == set(sim.storage.snapshots)
    assert sim.storage.datasets["tank/copy"].origin is None
    assert sim.storage.datasets["tank/app/db"].origin == "tank/copy@b"
    if profile in PYLIBZFS:
        with pytest.raises(ZFSPathInvalidException):
            await call(sim, "pool.dataset.promote", "tank/copy")
    else:
        with pytest.raises(CallError, match=r"Only cloned datasets can be promoted\.") as refused:
            await call(sim, "pool.dataset.promote", "tank/copy")
        assert refused.value.errno == errno.EBADMSG


@pytest.mark.parametrize("profile", PROFILES)
async def test_zfs_rolls_back_a_running_vms_disk_and_the_simulator_records_it(profile: str) -> None:
    """zfs_ioc_rollback suspends an open zvol (or a mounted filesystem), rolls back and resumes: nothing
    refuses it, and the guest sees its disk change beneath it. ``changed_under`` is the evidence tests
    use that the operator stopped the instance first."""
    sim = Simulator(profile)
    await tree(sim)
    await call(sim, f"{ns(profile)}.create", {"dataset": "tank/app/db", "name": "a"})
    vm = await call(sim, "vm.create", {"name": "db", "memory": 512, "autostart": False})
    disk = {"dtype": "DISK", "path": "/dev/zvol/tank/app/db"}
    await call(sim, "vm.device.create", {"vm": vm["id"], "attributes": disk})
    await call(sim, "vm.start", vm["id"])
    assert await call(sim, f"{ns(profile)}.rollback", "tank/app/db@a", {}) is None
    assert sim.storage.changed_under == [("tank/app/db", "db")]
    await call(sim, "vm.poweroff", vm["id"])
    assert await call(sim, f"{ns(profile)}.rollback", "tank/app/db@a", {}) is None
    assert len(sim.storage.changed_under) == 1


async def test_26_answers_a_missing_snapshot_with_zfs_exceptions() -> None:
    sim = Simulator("26.0")
    await tree(sim)
    with pytest.raises(ZFSPathNotFoundException, match="'tank/app@nope' not found"):
        await call(sim, "pool.snapshot.rollback", "tank/app@nope", {})
    with pytest.raises(ZFSPathNotFoundException):
        await call(sim, "pool.snapshot.hold", "tank/app@nope", {})
    await call(sim, "pool.snapshot.create", {"dataset": "tank/app", "name": "top"})
    with pytest.raises(ZFSPathNotFoundException, match="'tank/app/db@top' not found"):  # every child must have it
        await call(sim, "pool.snapshot.rollback", "tank/app@top", {"recursive_rollback": True})


@pytest.mark.parametrize("profile", ["25.04.0", "25.04.2", "25.10"])
async def test_incus_instances_have_their_datasets_under_ix_virt_and_take_their_snapshots_with_them(
    profile: str,
) -> None:
    sim = Simulator(profile)
    await run_job(sim, "virt.instance.create", {"name": "c1", "image": "debian/bookworm", "autostart": False})
    assert "tank/.ix-virt/containers/c1" in sim.storage.datasets
    await call(sim, f"{ns(profile)}.create", {"dataset": "tank/.ix-virt/containers/c1", "name": "before"})
    if profile == "25.04.0":
        await run_job(sim, "virt.instance.create", {"name": "v1", "instance_type": "VM", "image": "debian/bookworm"})
        names = set(sim.storage.datasets)
        assert {"tank/.ix-virt/virtual-machines/v1", "tank/.ix-virt/virtual-machines/v1.block"} <= names
        assert sim.storage.datasets["tank/.ix-virt/virtual-machines/v1.block"].type == "VOLUME"
    await run_job(sim, "virt.instance.start", "c1")
    await call(sim, f"{ns(profile)}.rollback", "tank/.ix-virt/containers/c1@before", {})
    assert sim.storage.changed_under == [("tank/.ix-virt/containers/c1", "c1")]
    assert (await run_job(sim, "virt.instance.delete", "c1"))["state"] == "SUCCESS"
    assert "tank/.ix-virt/containers/c1" not in sim.storage.datasets
    assert not sim.storage.snaps.of("tank/.ix-virt/containers/c1")


async def test_a_26_container_with_snapshots_leaves_its_dataset_behind_when_deleted() -> None:
    """plugins/container/container.py do_delete removes the container from the database and libvirt, then
    destroys its dataset without ``recursive``: with a snapshot the dataset stays and the call fails."""
    sim = Simulator("26.0")
    product = "debian:bookworm:amd64:default"
    image = {"name": product, "version": sim.containers.registry()[product][-1]}
    await run_job(sim, "container.create", {"name": "c1", "image": image, "autostart": False})
    await run_job(sim, "container.create", {"name": "c2", "image": image, "autostart": False})
    dataset = "tank/.truenas_containers/containers/c1"
    assert dataset in sim.storage.datasets
    await call(sim, "pool.snapshot.create", {"dataset": dataset, "name": "s"})
    c1, c2 = (await call(sim, "container.query"))[:2]
    with pytest.raises(ValidationErrors) as refused:
        await call(sim, "container.delete", c1["id"])
    message = f"{dataset!r} has snapshots. Set recursive=True to remove them."
    assert refused.value.errors == [("zfs.resource.destroy", message, errno.ENOTEMPTY)]
    assert await call(sim, "container.query", [["name", "=", "c1"]]) == [] and dataset in sim.storage.datasets
    await call(sim, "container.update", c2["id"], {"name": "c3"})  # a rename renames the dataset
    assert "tank/.truenas_containers/containers/c3" in sim.storage.datasets
    assert await call(sim, "container.delete", c2["id"]) is None
    assert "tank/.truenas_containers/containers/c3" not in sim.storage.datasets


@pytest.mark.parametrize("profile", ["25.04.0", "25.04.2", "25.10", "26.0", "27.0"])
async def test_pool_dataset_query_hides_the_instances_datasets_as_internal(profile: str) -> None:
    """plugins/pool_/dataset.py: 25.04's internal_datasets_filters (always), 25.10's and 26's
    dataset_query_utils INTERNAL_DATASETS (unless ``extra.exclude_internal_datasets: false``) hide
    ``.ix-virt`` (25.x) and ``.truenas_containers`` (26, CONTAINER_DS_NAME); snapshots stay visible."""
    sim = Simulator(profile)
    if sim.profile.has_virt:
        await run_job(sim, "virt.instance.create", {"name": "c1", "image": "debian/bookworm", "autostart": False})
        dataset = "tank/.ix-virt/containers/c1"
    else:
        product = "debian:bookworm:amd64:default"
        image = {"name": product, "version": sim.containers.registry()[product][-1]}
        await run_job(sim, "container.create", {"name": "c1", "image": image, "autostart": False})
        dataset = "tank/.truenas_containers/containers/c1"
    await call(sim, "pool.dataset.create", {"name": "tank/mine"})
    listed = {d["id"] for d in await call(sim, "pool.dataset.query")}
    assert "tank/mine" in listed and not any(".ix-virt" in n or ".truenas_containers" in n for n in listed)
    assert await call(sim, "pool.dataset.query", [["id", "=", dataset]]) == []
    shown = await call(
        sim, "pool.dataset.query", [["id", "=", dataset]], {"extra": {"exclude_internal_datasets": False}}
    )
    assert [d["id"] for d in shown] == ([] if profile.startswith("25.04") else [dataset])
    await call(sim, f"{ns(profile)}.create", {"dataset": dataset, "name": "s"})
    assert [s["id"] for s in await call(sim, f"{ns(profile)}.query", [["dataset", "=", dataset]])] == [f"{dataset}@s"]


# ----- periodic snapshot tasks (pool.snapshottask.*, plugins/snapshot.py) ---------------------------------------
HOUR = 3600


@pytest.mark.parametrize("profile", ["25.04.2", "25.10", "26.0", "27.0"])
async def test_a_periodic_task_snapshots_on_its_schedule_and_keeps_them_for_its_lifetime(profile: str) -> None:
    sim = Simulator(profile)
    await tree(sim)
    tasks = sim.storage.tasks
    tasks.now = 1_767_225_600.0  # 2026-01-01 00:00 UTC
    task = await call(
        sim,
        "pool.snapshottask.create",
        {
            "dataset": "tank/app",
            "recursive": True,
            "exclude": ["tank/app/logs"],
            "lifetime_value": 3,
            "lifetime_unit": "HOUR",
            "naming_schema": "tio-%Y-%m-%d_%H-%M",
            "schedule": {"minute": "0", "hour": "*"},
        },
    )
    assert task["id"] == 1 and task["state"] == {"state": "PENDING"} and task["schedule"]["begin"] == "00:00"
    await call(sim, f"{ns(profile)}.create", {"dataset": "tank/app", "name": "by-hand"})
    taken = tasks.advance(5 * HOUR + 60)
    assert taken == [f"tank/app@tio-2026-01-01_{h:02d}-00" for h in range(1, 6)]
    kept = sorted(s for s in sim.storage.snapshots if s.startswith("tank/app@tio-"))
    assert kept == [f"tank/app@tio-2026-01-01_{h:02d}-00" for h in range(3, 6)], "older than 3 hours: destroyed"
    assert "tank/app/db@tio-2026-01-01_05-00" in sim.storage.snapshots  # recursive
    assert "tank/app/logs@tio-2026-01-01_05-00" not in sim.storage.snapshots  # excluded
    assert "tank/app@by-hand" in sim.storage.snapshots, "not the task's naming: never its to destroy"
    listed = await call(sim, "pool.snapshottask.query", [["id", "=", 1]], {"get": True})
    assert listed["state"]["state"] == "FINISHED"
    await call(sim, "pool.snapshottask.update", 1, {"enabled": False})
    assert tasks.advance(2 * HOUR) == []
    with pytest.raises(CallError, match="Task is not enabled"):
        await call(sim, "pool.snapshottask.run", 1)
    assert await call(sim, "pool.snapshottask.delete", 1) is True


@pytest.mark.parametrize("profile", ["25.10", "26.0"])
async def test_a_periodic_task_is_refused_what_truenas_refuses(profile: str) -> None:
    sim = Simulator(profile)
    await tree(sim)
    with pytest.raises(ValidationErrors) as refused:
        await call(
            sim,
            "pool.snapshottask.create",
            {"dataset": "tank/app", "exclude": ["tank/app/db"], "naming_schema": "daily-%Y-%m-%d"},
        )
    assert refused.value.errors == [
        ("periodic_snapshot_create.naming_schema", "%H must be present in snapshot naming schema", errno.EINVAL)
    ]
    with pytest.raises(ValidationErrors) as refused:
        await call(sim, "pool.snapshottask.create", {"dataset": "tank/app", "exclude": ["tank/other"]})
    assert {e[0] for e in refused.value.errors} == {
        "periodic_snapshot_create.exclude",
        "periodic_snapshot_create.exclude.0",
    }
    await run_job(sim, "container.create" if profile == "26.0" else "virt.instance.create", *_container(sim, profile))
    dataset = "tank/.truenas_containers/containers/c1" if profile == "26.0" else "tank/.ix-virt/containers/c1"
    attempt = call(sim, "pool.snapshottask.create", {"dataset": dataset})
    if profile == "26.0":  # 26's filesystem_choices lists every dataset
        assert (await attempt)["dataset"] == dataset
    else:  # 25.x's leaves internal datasets out
        with pytest.raises(ValidationErrors, match="Dataset not found"):
            await attempt


def _container(sim: Simulator, profile: str) -> list[Any]:
    if profile == "26.0":
        product = "debian:bookworm:amd64:default"
        return [{"name": "c1", "image": {"name": product, "version": sim.containers.registry()[product][-1]}}]
    return [{"name": "c1", "image": "debian/bookworm", "autostart": False}]
