"""The client's container.* backend (TrueNAS 26) against the simulator over WebSocket."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from truenas_incus_operator.truenas import UNSET, DeviceConfig, ImageNotFound, InstanceChanges, InstanceConfig

from .test_client import client_for, serve


@pytest.mark.parametrize("profile", ["26.0", "27.0"])
async def test_container_lifecycle_on_26(profile: str) -> None:
    async with serve(profile) as (sim, server), client_for(server, "websocket") as client:
        backend = client.instances
        created = await backend.create(
            InstanceConfig(
                name="web01", type="CONTAINER", image="debian/bookworm", cpu="0-1", environment={"TZ": "UTC"}
            )
        )
        container = sim.containers.by_name("web01")
        assert container is not None
        assert (container.image, container.version) == ("debian:bookworm:amd64:default", "20251120_05:24")
        assert created.id == str(container.id) and created.status == "STOPPED" and created.cpu == "0-1"
        assert created.environment == {"TZ": "UTC"}
        await backend.start("web01")
        assert container.state == "RUNNING"
        updated = await backend.update("web01", InstanceChanges(cpu=UNSET, autostart=False, environment={"A": "b"}))
        assert (updated.cpu, updated.autostart, updated.environment) == (None, False, {"A": "b"})
        await backend.add_device("web01", DeviceConfig("data", "DISK", source="/mnt/tank/data", destination="/data"))
        await backend.add_device("web01", DeviceConfig("eth1", "NIC", extra={"parent": "br0"}))
        devices = await backend.list_devices("web01")
        assert sorted((d.type, backend.device_identity(d)) for d in devices) == [
            ("DISK", "DISK:/data"),
            ("NIC", "NIC:br0"),
        ]
        disk = next(d for d in devices if d.type == "DISK")
        await backend.update_device(
            "web01", DeviceConfig("data", "DISK", source="/mnt/tank/other", destination="/data"), disk.name
        )
        assert container.devices[int(disk.name)]["source"] == "/mnt/tank/other"
        await backend.stop("web01")
        assert container.state == "STOPPED"
        await backend.delete_device("web01", disk.name)
        await backend.delete("web01")
        assert await backend.get_instance("web01") is None and sim.containers.containers == {}


@pytest.mark.parametrize(
    "alias,name",
    [
        ("debian/bookworm", "debian:bookworm:amd64:default"),
        ("ubuntu/noble", "ubuntu:noble:amd64:default"),
        ("voidlinux/musl", "voidlinux:current:amd64:musl"),
        ("alpine/3.22", "alpine:3.22:amd64:default"),
        ("debian:trixie:amd64:default", "debian:trixie:amd64:default"),
    ],
)
async def test_image_aliases_map_to_registry_names(alias: str, name: str) -> None:
    async with serve("26.0") as (sim, server), client_for(server, "websocket") as client:
        image = await client.instances.containers.resolve_image(alias)  # type: ignore[attr-defined]
        assert image == {"name": name, "version": sim.containers.registry()[name][-1]}


async def test_unknown_alias_errs_clearly() -> None:
    async with serve("26.0") as (sim, server), client_for(server, "websocket") as client:
        with pytest.raises(ImageNotFound) as caught:
            await client.instances.create(InstanceConfig(name="x1", type="CONTAINER", image="plan9/4th"))
        assert "no image in the TrueNAS registry matches 'plan9/4th'" in str(caught.value)
        assert "debian:bookworm:amd64:default" in str(caught.value)
        assert sim.counters.by_method.get("container.create", 0) == 0


async def test_events_name_the_container() -> None:
    async with serve("26.0") as (sim, server), client_for(server, "websocket") as client:
        await client.instances.create(InstanceConfig(name="c1", type="CONTAINER", image="debian/bookworm"))
        seen: asyncio.Queue[tuple[str, str, Any]] = asyncio.Queue()
        await client.instances.watch(lambda kind, name, fields: seen.put_nowait((kind, name, fields)))
        sim.set_power("c1", "RUNNING")
        kind, name, fields = await asyncio.wait_for(seen.get(), 5)
        assert (kind, name) == ("changed", "c1") and fields["status"]["state"] == "RUNNING"
        observed = client.instances.instance_from_event(fields)
        assert observed is not None and observed.status == "RUNNING"
        sim.remove_instance("c1")
        kind, name, _ = await asyncio.wait_for(seen.get(), 5)
        assert (kind, name) == ("removed", "c1")
