"""The simulator's libvirt VMs (``vm.*``, ``vm.device.*``), volumes, snapshots, clones, uploads and
disk image conversion, per profile (truenas-vm-container.md §2, §4, §6)."""

from __future__ import annotations

import asyncio
import errno
import json
from typing import Any

import aiohttp
import jsonschema
import pytest

from truenas_simulator import Simulator, SimulatorServer
from truenas_simulator.errors import CallError, MethodNotFound, ValidationErrors
from truenas_simulator.images import qcow2_image, read_iso, simplestreams_file
from truenas_simulator.state import GIB
from truenas_simulator.validation import load_schema

from .test_simulator import run_job, session

VM_PROFILES = ("25.04.2", "25.10", "26.0", "27.0")
SCHEMA = {"25.04.2": "v25_04_2", "25.10": "v25_10_0", "26.0": "v26_0_0", "27.0": "v27_0_0"}
PYLIBVIRT = ("26.0", "27.0")


async def call(sim: Simulator, method: str, *params: Any) -> Any:
    return await sim.call(session(sim), method, list(params))


def put_file(sim: Simulator, path: str, content: bytes) -> None:
    sim.storage.files[path] = content


@pytest.mark.parametrize("profile", ["25.04.0", *VM_PROFILES])
def test_which_profile_serves_which_vm_methods(profile: str) -> None:
    methods = Simulator(profile).methods
    assert ("vm.create" in methods) == (profile != "25.04.0")  # 25.04.0/1 keep Incus VMs in virt.instance
    assert ("vm.device.convert" in methods) == (profile in ("25.10", *PYLIBVIRT))
    assert ("vm.import_disk_image" in methods) == (profile in ("25.04.2", "25.10"))
    assert ("zfs.snapshot.clone" in methods) == (profile in ("25.04.0", "25.04.2"))  # public on 25.04 only
    assert ("pool.snapshot.clone" in methods) == (profile in ("25.10", *PYLIBVIRT))
    if profile != "25.04.0":
        assert methods["vm.stop"][1] is True and methods["vm.start"][1] is False and methods["vm.create"][1] is False


@pytest.mark.parametrize("profile", VM_PROFILES)
async def test_vm_lifecycle_matches_the_schemas_and_the_version(profile: str) -> None:
    sim = Simulator(profile)
    events: list[dict[str, Any]] = []
    sim.events.subscribe("vm.query", lambda n: events.append(n["params"]))
    entry = await call(sim, "vm.create", {"name": "web01", "memory": 1024, "vcpus": 2, "autostart": False})
    jsonschema.validate(entry, load_schema(f"{SCHEMA[profile]}.vm.query.entry"))
    assert entry["id"] == 1 and entry["memory"] == 1024 and entry["status"]["state"] == "STOPPED"
    assert entry["status"]["domain_state"] == (None if profile in PYLIBVIRT else "SHUTOFF")
    assert entry["suspend_on_snapshot"] is (profile in PYLIBVIRT)
    assert await call(sim, "vm.start", 1) is None
    running = await call(sim, "vm.get_instance", 1)
    assert running["status"]["state"] == "RUNNING" and running["status"]["pid"]
    already = "VM 'web01' is already running" if profile in PYLIBVIRT else "'web01' is already running"
    with pytest.raises(CallError, match=already):
        await call(sim, "vm.start", 1)
    updated = await call(sim, "vm.update", 1, {"memory": 2048})
    assert updated["memory"] == 2048
    with pytest.raises(CallError, match="VM name can only be changed when VM is inactive"):
        await call(sim, "vm.update", 1, {"name": "web02"})
    stopped = await run_job(sim, "vm.stop", 1, {"force_after_timeout": True})
    assert stopped["state"] == "SUCCESS" and sim.vms.vms[1].state == "STOPPED"
    again = await run_job(sim, "vm.stop", 1, {})
    expected = (
        "Domain 'web01' is not active" if profile in PYLIBVIRT else "[EFAULT] VM state is currently not 'RUNNING'"
    )
    assert again["state"] == "FAILED" and again["error"] == expected
    assert await call(sim, "vm.delete", 1) == (None if profile in PYLIBVIRT else True)
    seen = [(e["msg"], (e.get("fields") or {}).get("status", {}).get("state"), e.get("extra")) for e in events]
    if profile in PYLIBVIRT:  # plugins/vm/event.py: the full entry on every domain event, CRUD events besides
        assert seen == [
            ("added", "STOPPED", None),
            ("changed", "RUNNING", None),
            ("changed", "RUNNING", None),
            ("changed", "STOPPED", None),
            ("removed", None, None),
        ]
    else:  # plugins/vm/events.py: libvirt state names, extra.state from the event number, no CRUD event
        assert seen == [
            ("added", "SHUTOFF", {"state": "NOSTATE"}),  # do_create defines the domain
            ("added", "STOPPED", None),  # CRUDService's
            ("changed", "UPDATING CONFIGURATION", {"state": "RUNNING"}),  # start: undefine,
            ("added", "SHUTOFF", {"state": "NOSTATE"}),  # define,
            ("changed", "RUNNING", {"state": "BLOCKED"}),  # create()
            ("changed", "RUNNING", None),  # vm.update (running: no redefinition)
            ("changed", "SHUTDOWN", {"state": "CRASHED"}),  # vm.stop: the guest shut down (event 6),
            ("changed", "SHUTOFF", {"state": "SHUTOFF"}),  # then STOPPED (event 5)
            ("removed", None, None),
        ]
        assert all("devices" not in e["fields"] for e in events if e.get("extra"))
    with pytest.raises(ValidationErrors, match="VM 1 does not exist"):
        await call(sim, "vm.get_instance", 1)


@pytest.mark.parametrize(
    "payload,attribute,message",
    [
        ({"name": "web-01"}, "vm_create.name", "Only alphanumeric characters are allowed."),
        ({"memory": 10}, "vm_create.memory", "Input should be greater than or equal to 20"),
        ({"devices": []}, "vm_create.devices", "Extra inputs are not permitted"),
        ({"vcpus": 64}, "vm_create.vcpus", "Maximum 16 vcpus are supported.Please ensure"),
        ({"min_memory": 4096}, "vm_create.min_memory", "Minimum memory should not be greater than defined/maximum memory"),
    ],
)  # fmt: skip
async def test_create_validation(payload: dict[str, Any], attribute: str, message: str) -> None:
    sim = Simulator("25.10")
    with pytest.raises(ValidationErrors) as caught:
        await call(sim, "vm.create", {"name": "web01", "memory": 1024, **payload})
    assert any(a == attribute and message in m for a, m, _ in caught.value.errors), caught.value.errors


async def test_duplicate_name_is_eexist() -> None:
    sim = Simulator("25.10")
    await call(sim, "vm.create", {"name": "web01", "memory": 512})
    with pytest.raises(ValidationErrors) as caught:
        await call(sim, "vm.create", {"name": "web01", "memory": 512})
    assert caught.value.errors == [("vm_create.name", "This name already exists.", 17)]


async def test_volumes_snapshots_clones_and_their_protection() -> None:
    sim = Simulator("25.10")
    await call(sim, "pool.dataset.create", {"name": "tank/images"})
    base = await call(sim, "pool.dataset.create", {"name": "tank/images/base", "type": "VOLUME", "volsize": 4 * GIB})
    assert base["type"] == "VOLUME" and base["volsize"]["parsed"] == 4 * GIB
    with pytest.raises(ValidationErrors, match="Parent dataset does not exist"):
        await call(sim, "pool.dataset.create", {"name": "tank/nope/x"})
    await call(sim, "pool.snapshot.create", {"dataset": "tank/images/base", "name": "ready"})
    assert await call(sim, "pool.snapshot.clone", {"snapshot": "tank/images/base@ready", "dataset_dst": "tank/vm1"})
    clone = (await call(sim, "pool.dataset.query", [["id", "=", "tank/vm1"]]))[0]
    assert clone["origin"]["parsed"] == "tank/images/base@ready" and clone["volsize"]["parsed"] == 4 * GIB
    await call(sim, "pool.dataset.update", "tank/vm1", {"volsize": 8 * GIB})
    with pytest.raises(ValidationErrors, match="You cannot shrink a zvol"):
        await call(sim, "pool.dataset.update", "tank/vm1", {"volsize": GIB})
    with pytest.raises(ValidationErrors, match="snapshot has dependent clones: tank/vm1"):
        await call(sim, "pool.snapshot.delete", "tank/images/base@ready")
    with pytest.raises(CallError, match="filesystem has dependent clones"):
        await call(sim, "pool.dataset.delete", "tank/images/base")
    assert await call(sim, "pool.dataset.delete", "tank/vm1")
    assert await call(sim, "pool.dataset.delete", "tank/images", {"recursive": True})
    assert set(sim.storage.datasets) == {"tank"} and sim.storage.snapshots == {}


async def test_25_04_2_snapshots_live_in_zfs_snapshot() -> None:
    sim = Simulator("25.04.2")
    await call(sim, "pool.dataset.create", {"name": "tank/v", "type": "VOLUME", "volsize": GIB})
    await call(sim, "zfs.snapshot.create", {"dataset": "tank/v", "name": "s"})
    assert await call(sim, "zfs.snapshot.clone", {"snapshot": "tank/v@s", "dataset_dst": "tank/c"})
    with pytest.raises(MethodNotFound):
        await call(sim, "pool.snapshot.clone", {"snapshot": "tank/v@s", "dataset_dst": "tank/d"})


@pytest.mark.parametrize("profile", ["25.10", *PYLIBVIRT])
async def test_convert_writes_the_image_into_the_volume_with_truenas_messages(profile: str) -> None:
    sim = Simulator(profile)
    await call(sim, "pool.dataset.create", {"name": "tank/images"})
    image = qcow2_image(3 * GIB, b"payload")
    put_file(sim, "/mnt/tank/images/disk.qcow2", image)
    await call(sim, "pool.dataset.create", {"name": "tank/small", "type": "VOLUME", "volsize": 2 * GIB})
    await call(sim, "pool.dataset.create", {"name": "tank/root", "type": "VOLUME", "volsize": 3 * GIB})
    cases = [
        ({"source": "/mnt/tank/images/disk.img", "destination": "/dev/zvol/tank/root"},
         "vm.device.convert: One path must be a disk image and the other must be a ZFS volume"),
        ({"source": "/mnt/tank/images/none.qcow2", "destination": "/dev/zvol/tank/root"},
         "vm.device.convert.source: '/mnt/tank/images/none.qcow2' does not exist"),
        ({"source": "/tmp/x.qcow2", "destination": "/dev/zvol/tank/root"},
         "vm.device.convert.source: '/tmp/x.qcow2' is an invalid location"),
        ({"source": "/mnt/tank/images/disk.qcow2", "destination": "/dev/zvol/tank/nothing"},
         "vm.device.convert.destination: 'tank/nothing' is not a volume"),
    ]  # fmt: skip
    for payload, message in cases:
        job = await run_job(sim, "vm.device.convert", payload)
        assert job["state"] == "FAILED" and job["exc_info"]["type"] == "VALIDATION" and message in job["error"]
    small = await run_job(
        sim, "vm.device.convert", {"source": "/mnt/tank/images/disk.qcow2", "destination": "/dev/zvol/tank/small"}
    )
    assert small["error"] == "[ENOSPC] tank/small too small (~2G). Minimum size must be 3G"
    done = await run_job(
        sim, "vm.device.convert", {"source": "/mnt/tank/images/disk.qcow2", "destination": "/dev/zvol/tank/root"}
    )
    assert done["state"] == "SUCCESS" and done["result"] is True and done["progress"]["percent"] == 100
    assert sim.storage.datasets["tank/root"].content is not None


@pytest.mark.parametrize("profile", ["25.04.2", "25.10"])
async def test_import_disk_image_takes_a_dataset_name(profile: str) -> None:
    sim = Simulator(profile)
    await call(sim, "pool.dataset.create", {"name": "tank/images"})
    put_file(sim, "/mnt/tank/images/disk.qcow2", qcow2_image(GIB, b"x"))
    await call(sim, "pool.dataset.create", {"name": "tank/root", "type": "VOLUME", "volsize": GIB})
    job = await run_job(sim, "vm.import_disk_image", {"diskimg": "/mnt/tank/images/disk.qcow2", "zvol": "tank/root"})
    assert job["state"] == "SUCCESS" and sim.storage.datasets["tank/root"].content


async def test_import_disk_image_is_gone_in_26() -> None:
    with pytest.raises(MethodNotFound):
        await call(Simulator("26.0"), "vm.import_disk_image", {"diskimg": "/mnt/x.qcow2", "zvol": "tank/x"})


@pytest.mark.parametrize("profile", VM_PROFILES)
async def test_devices_validation_and_delete_while_running(profile: str) -> None:
    sim = Simulator(profile)
    await call(sim, "vm.create", {"name": "web01", "memory": 512})
    with pytest.raises(ValidationErrors) as caught:
        await call(sim, "vm.device.create", {"vm": 1, "attributes": {"dtype": "DISK", "path": "/dev/zvol/tank/none"}})
    assert caught.value.errors[0][0] == "attributes.path"
    with pytest.raises(ValidationErrors, match="Input tag 'GPU' found using 'dtype'"):
        await call(sim, "vm.device.create", {"vm": 1, "attributes": {"dtype": "GPU"}})
    await call(sim, "pool.dataset.create", {"name": "tank/root", "type": "VOLUME", "volsize": GIB})
    disk = await call(
        sim,
        "vm.device.create",
        {"vm": 1, "attributes": {"dtype": "DISK", "path": "/dev/zvol/tank/root", "type": "VIRTIO"}},
    )
    nic = await call(
        sim, "vm.device.create", {"vm": 1, "attributes": {"dtype": "NIC", "nic_attach": "br0", "type": "VIRTIO"}}
    )
    assert disk["order"] == 1001 and nic["attributes"]["nic_attach"] == "br0"
    assert (nic["attributes"]["mac"] is not None) == (profile in PYLIBVIRT)  # 26 stores a generated MAC
    with pytest.raises(ValidationErrors, match="Not a valid choice"):
        await call(sim, "vm.device.create", {"vm": 1, "attributes": {"dtype": "NIC", "nic_attach": "nope0"}})
    await call(sim, "vm.start", 1)
    with pytest.raises(CallError, match=r"Please stop/resume associated VM before deleting VM device\."):
        await call(sim, "vm.device.delete", disk["id"])
    with pytest.raises(CallError, match="dataset is busy"):
        await call(sim, "pool.dataset.delete", "tank/root")
    if profile == "27.0":  # 27 plugins/vm/crud.py: an active VM is deleted only with force
        with pytest.raises(CallError, match=r"\[EBUSY\] 'web01' is running; stop the VM first or pass force"):
            await call(sim, "vm.delete", 1, {"zvols": True})
    await call(sim, "vm.delete", 1, {"zvols": True, "force": True})
    assert "tank/root" not in sim.storage.datasets


async def test_upload_feeds_filesystem_put_and_the_mirror_serves_images() -> None:
    sim = Simulator("25.10")
    await call(sim, "pool.dataset.create", {"name": "tank/images"})
    server = await SimulatorServer(sim).start()
    try:
        async with aiohttp.ClientSession() as http:
            index = await (await http.get(f"{server.url}/_simulator/simplestreams/streams/v1/images.json")).json()
            product = index["products"]["debian:bookworm:amd64:default"]
            assert "debian/bookworm" in product["aliases"].split(",")
            item = next(iter(product["versions"].values()))["items"]["disk.qcow2"]
            image = await (await http.get(f"{server.url}/_simulator/simplestreams/{item['path']}")).read()
            assert len(image) == item["size"]

            def form(path: str) -> aiohttp.FormData:
                data = aiohttp.FormData()
                data.add_field("data", json.dumps({"method": "filesystem.put", "params": [path, {"mode": 420}]}))
                data.add_field("file", image, filename="disk.qcow2", content_type="application/octet-stream")
                return data

            refused = await http.post(f"{server.url}/_upload", data=form("/mnt/tank/images/d.qcow2"))
            assert refused.status == 401
            headers = {"Authorization": f"Bearer {sim.api_key}"}
            answer = await http.post(f"{server.url}/_upload", data=form("/mnt/tank/images/d.qcow2"), headers=headers)
            job_id = (await answer.json())["job_id"]
            await sim.jobs.jobs[job_id].done.wait()
            assert sim.jobs.jobs[job_id].state == "SUCCESS"
            assert sim.storage.files["/mnt/tank/images/d.qcow2"] == image
            # plugins/filesystem.py put(): os.makedirs(dirname) when it is missing; no rule on where
            deeper = await http.post(f"{server.url}/_upload", data=form("/mnt/tank/new/sub/d.qcow2"), headers=headers)
            job = sim.jobs.jobs[(await deeper.json())["job_id"]]
            await job.done.wait()
            assert job.state == "SUCCESS" and sim.storage.files["/mnt/tank/new/sub/d.qcow2"] == image
            assert sim.storage.directory_exists("/mnt/tank/new") and sim.storage.directory_exists("/mnt/tank/new/sub")
    finally:
        await server.stop()


def test_simplestreams_fixture_lists_only_vm_images() -> None:
    sim = Simulator("25.10")
    products = json.loads(simplestreams_file(list(sim.images.values()), "streams/v1/images.json") or b"{}")
    keys = set(products["products"])
    assert "debian:bookworm:amd64:default" in keys and not any(k.startswith("alpine:") for k in keys)


def test_iso_reader_rejects_what_is_not_an_iso() -> None:
    assert read_iso(b"") is None and read_iso(b"\0" * 40000) is None


# ----- the conversion lock and its queue of one (issue 23 items 1 and 6) ------------------------------------------
async def three_volumes(sim: Simulator) -> list[str]:
    await call(sim, "pool.dataset.create", {"name": "tank/images"})
    for n in range(3):
        put_file(sim, f"/mnt/tank/images/{n}.qcow2", qcow2_image(GIB, f"image {n}".encode()))
        await call(sim, "pool.dataset.create", {"name": f"tank/v{n}", "type": "VOLUME", "volsize": GIB})
    return [f"tank/v{n}" for n in range(3)]


@pytest.mark.parametrize("profile", ["25.10", *PYLIBVIRT])
async def test_a_third_conversion_is_handed_the_waiting_job_whatever_its_arguments(profile: str) -> None:
    """vm_devices.py: ``@job(lock='vm.device.convert', lock_queue_size=1)``; job.py ``JobsQueue.add``."""
    sim = Simulator(profile)
    sim.knobs.job_duration = 0.2
    volumes = await three_volumes(sim)
    ids = []
    for n, volume in enumerate(volumes):
        args = {"source": f"/mnt/tank/images/{n}.qcow2", "destination": f"/dev/zvol/{volume}"}
        ids.append(await sim.call(session(sim), "vm.device.convert", [args]))
        await asyncio.sleep(0.02)  # the first one runs, the second waits
    assert ids[0] != ids[1] and ids[2] == ids[1]  # no job of its own, no error
    for ident in set(ids):
        await asyncio.wait_for(sim.jobs.jobs[ident].done.wait(), 10)
    contents = [sim.storage.datasets[v].content for v in volumes]
    assert contents[0] and contents[1] and contents[2] is None  # the third volume was never written
    assert len([j for j in sim.jobs.jobs.values() if j.method == "vm.device.convert"]) == 2


@pytest.mark.parametrize("profile", ["25.04.2", "25.10"])
async def test_import_disk_image_locks_per_volume(profile: str) -> None:
    """disk_utils.py: ``lock=lambda args: f"zvol_disk_image_{args[-1]['zvol']}"``, ``lock_queue_size=1``."""
    sim = Simulator(profile)
    sim.knobs.job_duration = 0.2
    volumes = await three_volumes(sim)
    own = [
        await sim.call(session(sim), "vm.import_disk_image", [{"diskimg": f"/mnt/tank/images/{n}.qcow2", "zvol": v}])
        for n, v in enumerate(volumes)
    ]
    assert len(set(own)) == 3  # other volumes: other locks, never merged
    await asyncio.sleep(0.02)
    into_v0 = [
        await sim.call(
            session(sim), "vm.import_disk_image", [{"diskimg": f"/mnt/tank/images/{n}.qcow2", "zvol": "tank/v0"}]
        )
        for n in (1, 2)
    ]
    assert into_v0[0] == into_v0[1] and into_v0[0] not in own  # the same volume: the waiting one is handed back
    for ident in {*own, *into_v0}:
        await asyncio.wait_for(sim.jobs.jobs[ident].done.wait(), 10)
    assert all(sim.storage.datasets[v].content for v in volumes)


# ----- pool.dataset.delete and clones, per version (issue 23 items 5 and 6) ----------------------------------------
@pytest.mark.parametrize("profile", VM_PROFILES)
async def test_a_recursive_delete_destroys_other_trees_clones_on_26_and_is_refused_before(profile: str) -> None:
    """26: plugins/zfs/destroy_impl.py (DESTROY_RESOURCES channel program) destroys the clones of every
    snapshot in the tree; 25.x's zfs destroy -r refuses while they exist."""
    sim = Simulator(profile)
    snapshots = "pool.snapshot" if profile != "25.04.2" else "zfs.snapshot"
    await call(sim, "pool.dataset.create", {"name": "tank/images"})
    await call(sim, "pool.dataset.create", {"name": "tank/images/base", "type": "VOLUME", "volsize": GIB})
    await call(sim, f"{snapshots}.create", {"dataset": "tank/images/base", "name": "base"})
    await call(sim, f"{snapshots}.clone", {"snapshot": "tank/images/base@base", "dataset_dst": "tank/vm1"})
    await call(sim, f"{snapshots}.create", {"dataset": "tank/vm1", "name": "s"})
    await call(sim, f"{snapshots}.clone", {"snapshot": "tank/vm1@s", "dataset_dst": "tank/vm2"})
    await call(sim, "pool.dataset.create", {"name": "tank/plain", "type": "VOLUME", "volsize": GIB})
    await call(sim, f"{snapshots}.create", {"dataset": "tank/plain", "name": "s"})
    with pytest.raises(CallError, match="filesystem has children"):  # a snapshot, and no recursive
        await call(sim, "pool.dataset.delete", "tank/plain")
    with pytest.raises(CallError, match="dependent clones"):
        await call(sim, "pool.dataset.delete", "tank/images/base")
    if profile in PYLIBVIRT:
        assert await call(sim, "pool.dataset.delete", "tank/images", {"recursive": True})
        assert not {"tank/images/base", "tank/vm1", "tank/vm2"} & set(sim.storage.datasets)  # clones of clones too
        assert set(sim.storage.snapshots) == {"tank/plain@s"}
    else:
        with pytest.raises(CallError, match="dependent clones"):
            await call(sim, "pool.dataset.delete", "tank/images", {"recursive": True})
        assert {"tank/images/base", "tank/vm1", "tank/vm2"} <= set(sim.storage.datasets)


@pytest.mark.parametrize("profile", VM_PROFILES)
async def test_a_dataset_with_children_is_not_deleted_without_recursive_enotempty(profile: str) -> None:
    """plugins/pool_/dataset.py do_delete (25.04.2, 25.10, 26): children found by an ``id ^ name/``
    query, before anything else, refuse with CallError ENOTEMPTY."""
    sim = Simulator(profile)
    await call(sim, "pool.dataset.create", {"name": "tank/home"})
    await call(sim, "pool.dataset.create", {"name": "tank/home/root", "type": "VOLUME", "volsize": GIB})
    with pytest.raises(CallError) as refused:
        await call(sim, "pool.dataset.delete", "tank/home")
    assert refused.value.errno == errno.ENOTEMPTY
    assert refused.value.errmsg == "Failed to delete dataset: cannot destroy 'tank/home': filesystem has children"
    assert str(refused.value).startswith("[ENOTEMPTY] ")
    assert {"tank/home", "tank/home/root"} <= set(sim.storage.datasets)


async def test_26s_snapshot_calls_let_zfs_exceptions_through_as_method_call_errors() -> None:
    """26's pool.snapshot.clone calls zfs.resource.snapshot.clone_impl, and pool.snapshot.create lets
    ZFSPathNotFoundException through (plugins/pool_/snapshot.py, plugins/zfs/exceptions.py): not
    CallErrors, so the JSON-RPC server answers -32001 "Method call error" with EINVAL and the
    exception's text (api/base/server/ws_handler/rpc.py). A snapshot name taken is a ValidationError
    of ``pool.snapshot.create``; deleting a missing snapshot is InstanceNotFound with
    zfs.resource.snapshot.destroy's text; one with clones, that call's ValidationError (EBUSY)."""
    sim = Simulator("26.0")
    server = await SimulatorServer(sim).start()
    try:
        async with aiohttp.ClientSession() as http, http.ws_connect(f"{server.ws_url}/api/current") as ws:
            ident = 0

            async def rpc(method: str, *params: Any) -> dict[str, Any]:
                nonlocal ident
                ident += 1
                await ws.send_json({"jsonrpc": "2.0", "id": ident, "method": method, "params": list(params)})
                while True:
                    answer: dict[str, Any] = await ws.receive_json()
                    if answer.get("id") == ident:
                        return answer

            assert "result" in await rpc("auth.login_with_api_key", sim.api_key)
            await rpc("pool.dataset.create", {"name": "tank/images"})
            await rpc("pool.dataset.create", {"name": "tank/images/b", "type": "VOLUME", "volsize": GIB})
            missing = (await rpc("pool.snapshot.create", {"dataset": "tank/nope", "name": "base"}))["error"]
            assert (missing["code"], missing["message"]) == (-32001, "Method call error")
            assert missing["data"]["errname"] == "EINVAL" and missing["data"]["reason"] == "'tank/nope' not found"
            assert missing["data"]["trace"]["class"] == "ZFSPathNotFoundException"
            assert "result" in await rpc("pool.snapshot.create", {"dataset": "tank/images/b", "name": "base"})
            taken = (await rpc("pool.snapshot.create", {"dataset": "tank/images/b", "name": "base"}))["error"]
            assert taken["code"] == -32602
            assert taken["data"]["extra"] == [["pool.snapshot.create", "base already exists.", errno.EEXIST]]
            clone = {"snapshot": "tank/images/b@nope", "dataset_dst": "tank/images/c"}
            gone = (await rpc("pool.snapshot.clone", clone))["error"]
            assert gone["code"] == -32001 and gone["data"]["reason"] == "'tank/images/b@nope' not found"
            assert gone["data"]["trace"]["class"] == "ZFSPathNotFoundException"
            clone["snapshot"] = "tank/images/b@base"
            assert (await rpc("pool.snapshot.clone", clone))["result"] is True
            twice = (await rpc("pool.snapshot.clone", clone))["error"]
            assert twice["data"]["reason"] == "'tank/images/c' already exists"
            assert twice["data"]["trace"]["class"] == "ZFSPathAlreadyExistsException"
            busy = (await rpc("pool.snapshot.delete", "tank/images/b@base"))["error"]
            assert busy["code"] == -32602 and busy["data"]["extra"] == [
                [
                    "zfs.resource.snapshot.destroy",
                    "'tank/images/b@base' has the following clones: tank/images/c",
                    errno.EBUSY,
                ]
            ]
            absent = (await rpc("pool.snapshot.delete", "tank/images/b@other"))["error"]
            assert absent["data"]["extra"] == [[None, "'tank/images/b@other' not found", errno.ENOENT]]
    finally:
        await server.stop()
