"""The simulator's TrueNAS 26 profile: container.*, as truenas-vm-container.md §3-§6 describes it."""

from __future__ import annotations

import asyncio
from typing import Any

import jsonschema
import pytest

from truenas_simulator import Simulator
from truenas_simulator.errors import CallError, MethodNotFound, ValidationErrors
from truenas_simulator.validation import load_schema

from .test_simulator import run_job, session


def newest(sim: Simulator, name: str) -> str:
    return sim.containers.registry()[name][-1]


async def create(sim: Simulator, **payload: Any) -> dict[str, Any]:
    body = {
        "name": "c1",
        "image": {"name": "debian:bookworm:amd64:default", "version": newest(sim, "debian:bookworm:amd64:default")},
    }
    return await run_job(sim, "container.create", {**body, **payload})


async def test_registry_lists_product_keys_with_versions() -> None:
    sim = Simulator("26.0")
    registry = await sim.call(session(sim), "container.image.query_registry", [])
    names = {item["name"] for item in registry}
    assert {"debian:bookworm:amd64:default", "ubuntu:noble:amd64:default", "voidlinux:current:amd64:musl"} <= names
    for item in registry:
        jsonschema.validate(item, load_schema("v26_0_0.container.image.query_registry.entry"))
        assert len(item["versions"]) == 2


async def test_create_stays_stopped_with_an_integer_id_and_start_is_not_a_job() -> None:
    sim = Simulator("26.0")
    events: list[dict[str, Any]] = []
    sim.events.subscribe("container.query", lambda n: events.append(n["params"]))
    job = await create(sim, initenv={"TZ": "UTC"}, cpuset="0-1")
    assert job["state"] == "SUCCESS"
    entry = job["result"]
    assert entry["id"] == 1 and entry["status"]["state"] == "STOPPED" and entry["initenv"] == {"TZ": "UTC"}
    jsonschema.validate(entry, load_schema("v26_0_0.container.query.entry"))
    s = session(sim)
    assert await sim.call(s, "container.start", [1]) is None
    running = await sim.call(s, "container.get_instance", [1])
    assert running["status"]["state"] == "RUNNING" and running["status"]["pid"]
    with pytest.raises(CallError, match=r"Domain 'c1' is already started"):
        await sim.call(s, "container.start", [1])
    assert [e["msg"] for e in events] == ["added", "changed"] and events[1]["fields"]["status"]["state"] == "RUNNING"
    stopped = await run_job(sim, "container.stop", 1, {"force": True})
    assert stopped["state"] == "SUCCESS" and sim.containers.containers[1].state == "STOPPED"
    again = await run_job(sim, "container.stop", 1, {})
    assert again["error"] == "[EFAULT] Domain 'c1' is not active"
    assert await sim.call(s, "container.delete", [1]) is None
    assert sim.containers.containers == {}
    with pytest.raises(ValidationErrors, match="Container 1 does not exist"):
        await sim.call(s, "container.get_instance", [1])


@pytest.mark.parametrize(
    "payload,attribute,message",
    [
        ({"memory": 2**30}, "container_create.memory", "Extra inputs are not permitted"),
        ({"image": "debian/bookworm"}, "container_create.image", "Input should be a valid dictionary or instance of ContainerCreateImage"),
        ({"image": {"name": "debian:bookworm:amd64:default"}}, "container_create.image.version", "Field required"),
        ({"image": {"name": "plan9:4th:amd64:default", "version": "x"}}, "container_create.image.name", "Image does not exist in the registry."),
        ({"image": {"name": "debian:bookworm:amd64:default", "version": "1999"}}, "container_create.image.version", "Version does not exist in the registry."),
        ({"name": "10.0.0.1"}, "container_create.name", "Name must be a valid hostname"),
        ({"shutdown_timeout": 1}, "container_create.shutdown_timeout", "Input should be greater than or equal to 5"),
    ],
)  # fmt: skip
async def test_create_validation(payload: dict[str, Any], attribute: str, message: str) -> None:
    job = await create(Simulator("26.0"), **payload)
    assert job["state"] == "FAILED" and job["exc_info"]["type"] == "VALIDATION"
    assert any(a == attribute and m.startswith(message) for a, m, _ in job["exc_info"]["extra"]), job["exc_info"][
        "extra"
    ]


async def test_duplicate_names_and_updates() -> None:
    sim = Simulator("26.0")
    await create(sim)
    duplicate = await create(sim)
    assert duplicate["exc_info"]["extra"] == [
        ["container_create.name", "A container with this name already exists.", 17]
    ]
    s = session(sim)
    updated = await sim.call(s, "container.update", [1, {"autostart": False, "initenv": {"A": "b"}, "cpuset": "0,2"}])
    assert (updated["autostart"], updated["initenv"], updated["cpuset"]) == (False, {"A": "b"}, "0,2")
    with pytest.raises(ValidationErrors) as caught:
        await sim.call(s, "container.update", [1, {"cpuset": "0_1"}])
    assert caught.value.extra() == [["container_update.cpuset", "Underscores are not allowed in CPU set values", 22]]
    with pytest.raises(ValidationErrors) as caught:
        await sim.call(s, "container.update", [1, {"idmap": None}])
    assert caught.value.extra() == [["container_update.idmap", "Extra inputs are not permitted", 22]]
    await sim.call(s, "container.start", [1])
    with pytest.raises(CallError, match=r"Container must be stopped before renaming\."):
        await sim.call(s, "container.update", [1, {"name": "c2"}])


async def test_devices() -> None:
    sim = Simulator("26.0")
    await create(sim)
    s = session(sim)
    disk = await sim.call(
        s,
        "container.device.create",
        [{"container": 1, "attributes": {"dtype": "FILESYSTEM", "source": "/mnt/tank/data", "target": "/data"}}],
    )
    assert disk["id"] == 1
    nic = await sim.call(
        s, "container.device.create", [{"container": 1, "attributes": {"dtype": "NIC", "nic_attach": "br0"}}]
    )
    assert nic["attributes"]["mac"].startswith("00:a0:98:") and nic["attributes"]["type"] == "E1000"
    with pytest.raises(ValidationErrors) as caught:
        await sim.call(s, "container.device.create", [{"container": 1, "attributes": {"dtype": "PROXY"}}])
    assert caught.value.extra()[0][1].startswith(
        "Input tag 'PROXY' found using 'dtype' does not match any of the expected tags: 'FILESYSTEM', 'GPU', 'NIC', 'USB'"
    )
    with pytest.raises(ValidationErrors) as caught:
        await sim.call(
            s,
            "container.device.create",
            [{"container": 1, "attributes": {"dtype": "FILESYSTEM", "source": "/etc", "target": "/x"}}],
        )
    assert caught.value.extra() == [
        ["container_device_create.attributes.path", "The path must reside within a pool mount point", 22]
    ]
    listed = await sim.call(s, "container.device.query", [[["container", "=", 1]]])
    assert [d["id"] for d in listed] == [1, 2]
    for device in listed:
        jsonschema.validate(device, load_schema("v26_0_0.container.device.entry"))
    await sim.call(s, "container.start", [1])
    with pytest.raises(CallError, match=r"Please stop/resume associated CONTAINER before deleting CONTAINER device\."):
        await sim.call(s, "container.device.delete", [1])
    await run_job(sim, "container.stop", 1, {"force": True})
    assert await sim.call(s, "container.device.delete", [1]) is True


async def test_upgrade_from_25_10_migrates_containers_like_truenas() -> None:
    sim = Simulator("25.10")
    s = session(sim)
    await sim.call(s, "core.set_options", [{"legacy_jobs": False}])
    devices = [
        {"dev_type": "DISK", "name": "data", "source": "/mnt/tank/data", "destination": "/data"},
        {"dev_type": "NIC", "name": "eth1", "nic_type": "BRIDGED", "parent": "br0", "mac": "10:66:6a:01:02:03"},
        {
            "dev_type": "PROXY",
            "name": "http",
            "source_proto": "TCP",
            "source_port": 8080,
            "dest_proto": "TCP",
            "dest_port": 80,
        },
    ]
    await sim.call(s, "virt.instance.create", [{"name": "web", "image": "debian/bookworm", "cpu": "2", "memory": 2**30,
                                                 "environment": {"TZ": "UTC"}, "privileged_mode": True, "devices": devices}])  # fmt: skip
    await sim.call(s, "virt.instance.create", [{"name": "idle", "image": "debian/bookworm", "autostart": False}])
    sim.seed_instance(name="oldvm", type="VM", image="ubuntu/noble", status="RUNNING")
    log = sim.upgrade("26.0")
    assert "oldvm: Incus VM, not migrated" in log and any("http (PROXY) skipped" in line for line in log)
    assert sim.instances == {} and sim.profile.name == "26.0"
    by_name = {c.name: c for c in sim.containers.containers.values()}
    assert set(by_name) == {"web", "idle"}
    web = by_name["web"]
    assert isinstance(web.id, int) and web.cpuset == "2" and web.initenv == {} and web.state == "RUNNING"
    assert sorted(d["dtype"] for d in web.devices.values()) == ["FILESYSTEM", "NIC"]
    nic = next(d for d in web.devices.values() if d["dtype"] == "NIC")
    assert nic["nic_attach"] == "br0" and nic["mac"] == "10:66:6a:01:02:03"
    assert by_name["idle"].state == "STOPPED"
    with pytest.raises(MethodNotFound):
        await sim.call(session(sim), "virt.instance.query", [])
    entries = await sim.call(session(sim), "container.query", [])
    assert {e["name"] for e in entries} == {"web", "idle"}
    await asyncio.sleep(0)
