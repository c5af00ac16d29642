"""The ``virt.instance`` API family (TrueNAS 25.04 - 25.10): Incus containers and VMs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

from ..addresses import MAX_AGENT_ITEMS, MAX_GUEST_ADDRESSES, global_text
from ..errors import AlreadyExists, ImageNotFound, JobFailed, ValidationFailed
from ..jobs import job_running
from ..transports.base import Transport
from ..types import (
    UNSET,
    Calls,
    DeviceConfig,
    InstanceChanges,
    InstanceConfig,
    InstanceEventCallback,
    InstanceStatus,
    ObservedImage,
    ObservedInstance,
    SnapshotTarget,
)
from .images_only import image_of

# Device fields that the IncusInstance spec names itself; everything else travels in ``extra``.
_OWN_FIELDS = ("name", "dev_type", "source", "destination", "readonly")


def alias_addresses(aliases: Any) -> tuple[str, ...]:
    """virt.instance's ``aliases`` (Incus's global-scope addresses) as addresses, each checked, at
    most MAX_GUEST_ADDRESSES: the answer is the server's (and the guest's) word."""
    found: dict[str, None] = {}
    for alias in aliases[:MAX_AGENT_ITEMS] if isinstance(aliases, list) else []:
        address = global_text(alias.get("address") if isinstance(alias, dict) else None)
        if address is not None and len(found) < MAX_GUEST_ADDRESSES:
            found.setdefault(address)
    return tuple(found)


def observed(entry: dict[str, Any]) -> ObservedInstance:
    image = entry.get("image") or {}
    return ObservedInstance(
        id=str(entry["id"]),
        name=entry["name"],
        type=entry.get("type") or "CONTAINER",
        status=InstanceStatus.of(entry.get("status")),
        cpu=entry.get("cpu"),
        memory=entry.get("memory"),
        autostart=bool(entry.get("autostart")),
        environment=dict(entry.get("environment") or {}),
        addresses=alias_addresses(entry.get("aliases")),
        image=ObservedImage(
            os=image.get("os"),
            release=image.get("release"),
            serial=image.get("serial"),
            architecture=image.get("architecture"),
            variant=image.get("variant"),
            description=image.get("description"),
        ),
        storage_pool=entry.get("storage_pool"),
        family="virt.instance",
    )


def device_payload(device: DeviceConfig, with_mac: bool) -> dict[str, Any]:
    """The ``virt.device`` object for a device (truenas-api.md §5)."""
    # extra first, without the keys the typed fields own: extra can never override them.
    payload: dict[str, Any] = {k: v for k, v in device.extra.items() if k not in _OWN_FIELDS}
    payload.update(dev_type=device.type, name=device.name)
    if device.type in ("DISK", "CDROM") and device.source is not None:
        payload["source"] = device.source
    if device.type == "DISK" and device.destination is not None:
        payload["destination"] = device.destination
    if device.readonly:
        payload["readonly"] = True
    if device.type == "NIC" and not with_mac:
        payload.pop("mac", None)
    return payload


def device_config(entry: dict[str, Any]) -> DeviceConfig:
    extra = {k: v for k, v in entry.items() if k not in _OWN_FIELDS and v is not None}
    return DeviceConfig(
        name=entry.get("name") or "",
        type=entry.get("dev_type") or "",
        source=entry.get("source"),
        destination=entry.get("destination"),
        readonly=bool(entry.get("readonly")),
        extra=extra,
        inherited=entry.get("name") in ("eth0", "root") and entry.get("dev_type") in ("NIC", "DISK"),
    )


class VirtInstanceBackend:
    family = "virt.instance"

    @staticmethod
    def calls(version: tuple[int, ...]) -> Calls:
        return Calls(
            reads=("virt.instance.query", "virt.instance.device_list", "virt.global.config"),
            writes=(
                "virt.instance.create",
                "virt.instance.update",
                "virt.instance.start",
                "virt.instance.stop",
                "virt.instance.delete",
                "virt.instance.device_add",
                "virt.instance.device_update",
                "virt.instance.device_delete",
            ),
        )

    def __init__(self, transport: Transport, version: tuple[int, ...]) -> None:
        self.transport = transport
        self.version = version
        self.can_create_vms = version < (25, 4, 2)
        self.nic_mac = version >= (25, 10)

    def deferred_fields(self, config: InstanceConfig, observed: ObservedInstance | None) -> list[str]:
        return []  # changes apply when made

    def unsupported_fields(self, config: InstanceConfig, observed: ObservedInstance | None = None) -> list[str]:
        unsupported = []
        if config.type == "VM" and not self.can_create_vms:
            unsupported.append("type")
        if not self.nic_mac and any(d.type == "NIC" and d.extra.get("mac") for d in config.devices):
            unsupported.append("nics[].hwaddr")
        if config.root_disk_size is not None:
            unsupported.append("rootDiskSize")  # the vm.* backend's field
        own_network = config.cloud_init_network_config is not None and not config.network_declared
        if config.cloud_init_user_data is not None or own_network:
            unsupported.append("cloudInit")
        if config.network_declared:
            unsupported.append("nics[].addresses")  # no TrueNAS API gives this family a static address
        if config.memory_overcommit:
            unsupported.append("memoryOvercommit")  # vm.start's option
        return unsupported

    def honoured(self, config: InstanceConfig, observed: ObservedInstance | None = None) -> InstanceConfig:
        """The part of ``config`` this family can apply (a NIC's MAC only from 25.10)."""
        if self.nic_mac:
            return config
        devices = tuple(
            replace(d, extra={k: v for k, v in d.extra.items() if k != "mac"}) if d.type == "NIC" else d
            for d in config.devices
        )
        return replace(config, devices=devices)

    @staticmethod
    def device_identity(device: DeviceConfig) -> str:
        return device.name

    async def list_instances(self) -> list[ObservedInstance]:
        entries = await self.transport.call("virt.instance.query", [], {}, idempotent=True)
        return [observed(e) for e in entries]

    async def get_instance(self, name: str) -> ObservedInstance | None:
        entries = await self.transport.call("virt.instance.query", [["id", "=", name]], {}, idempotent=True)
        return observed(entries[0]) if entries else None

    async def snapshot_target(self, name: str) -> SnapshotTarget | None:
        """Incus's ZFS driver on the virt pool's ``.ix-virt`` (plugins/virt/global.py): a container's root
        filesystem; a VM's ``.block`` volume, its disk (the configuration filesystem beside it is
        Incus's own and not taken: the two are siblings, and one snapshot takes one tree)."""
        found = await self.get_instance(name)
        if found is None:
            return None
        pool = found.storage_pool or "tank"
        if found.type == "VM":
            return SnapshotTarget(f"{pool}/.ix-virt/virtual-machines/{name}.block")
        return SnapshotTarget(f"{pool}/.ix-virt/containers/{name}")

    async def create(
        self, config: InstanceConfig, on_progress: Callable[[dict[str, Any]], None] | None = None
    ) -> ObservedInstance:
        payload: dict[str, Any] = {
            "name": config.name,
            "instance_type": config.type,
            "image": image_of(config, "virt.instance.create"),
            "autostart": config.autostart,
        }
        if config.storage_pool:
            payload["storage_pool"] = config.storage_pool
        if config.cpu is not None:
            payload["cpu"] = config.cpu
        if config.memory is not None:
            payload["memory"] = config.memory
        if config.environment:
            payload["environment"] = dict(config.environment)
        if config.devices:
            payload["devices"] = [device_payload(d, self.nic_mac) for d in config.devices]
        try:
            entry = await self.transport.call_job("virt.instance.create", payload, on_progress=on_progress)
        except ValidationFailed as exc:
            # "virt_instance_create.name: Name 'c1' already exists" (truenas-api.md §2.1)
            if any((e.attribute or "").endswith(".name") and "already exists" in e.message for e in exc.errors):
                raise AlreadyExists.from_validation(exc) from None
            raise
        except JobFailed as exc:
            # Incus's "Failed getting remote image info: Image not found: debian/bookwrm" ends the job.
            if "image not found" in exc.message.lower() or "failed getting remote image" in exc.message.lower():
                raise ImageNotFound(exc.message, exc.errno, exc.method) from None
            raise
        return observed(entry)

    async def update(self, name: str, changes: InstanceChanges) -> ObservedInstance:
        payload: dict[str, Any] = {}
        for key in ("cpu", "memory"):
            value = getattr(changes, key)
            if value is UNSET:
                payload[key] = None
            elif value is not None:
                payload[key] = value
        if changes.autostart is not None:
            payload["autostart"] = changes.autostart
        if changes.environment is not None:
            payload["environment"] = dict(changes.environment)
        entry = await self.transport.call_job("virt.instance.update", name, payload)
        return observed(entry)

    async def delete(self, name: str) -> None:
        await self.transport.call_job("virt.instance.delete", name)

    async def start(self, name: str, overcommit: bool = False) -> None:
        await self.transport.call_job("virt.instance.start", name)

    async def stop(self, name: str, timeout: int | None = None, force: bool = False) -> None:
        # TrueNAS refuses force=false without a timeout; a plain stop gets a 30 s grace period.
        await self.transport.call_job("virt.instance.stop", name, _stop_args(timeout, force))

    async def create_in_progress(self, name: str) -> bool:
        return await job_running(self.transport, "virt.instance.create", name)

    async def discard_unfinished(self, name: str) -> None:
        return None  # a create is one job: it leaves an instance or nothing

    async def list_devices(self, name: str) -> list[DeviceConfig]:
        entries = await self.transport.call("virt.instance.device_list", name, idempotent=True)
        return [device_config(e) for e in entries]

    async def add_device(self, name: str, device: DeviceConfig) -> None:
        await self.transport.call("virt.instance.device_add", name, device_payload(device, self.nic_mac))

    async def update_device(self, name: str, device: DeviceConfig, target: str | None = None) -> None:
        await self.transport.call("virt.instance.device_update", name, device_payload(device, self.nic_mac))

    async def delete_device(self, name: str, device_name: str) -> None:
        await self.transport.call("virt.instance.device_delete", name, device_name)

    def instance_from_event(self, fields: dict[str, Any]) -> ObservedInstance | None:
        """A full query entry from an ADDED/CHANGED event; None for partial ones ({"status": ...})."""
        if {"id", "name", "type", "status", "aliases"} <= fields.keys():
            return observed(fields)
        return None

    async def watch(self, callback: InstanceEventCallback) -> None:
        if not self.transport.supports_events:
            return

        def relay(msg: str, ident: Any, fields: dict[str, Any] | None) -> None:
            callback(msg, str(ident), fields)

        await self.transport.subscribe("virt.instance.query", relay)


def _stop_args(timeout: int | None, force: bool) -> dict[str, Any]:
    if force:
        return {"force": True, "timeout": -1 if timeout is None else timeout}
    return {"force": False, "timeout": 30 if timeout is None else timeout}
