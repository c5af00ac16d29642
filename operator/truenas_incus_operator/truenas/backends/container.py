"""The ``container.*`` API family (TrueNAS 26 and 27): LXC containers through libvirt.

What differs from ``virt.instance`` (truenas-vm-container.md §3, §5): integer ids, images named
``os:release:arch:variant`` with a version serial, no memory limit and no CPU count (only a
``cpuset`` pin), the environment is the init process's, devices have no names (matched here by what
they attach: a mount target, a NIC's parent, a USB id, a GPU slot), no readonly mounts, no
PROXY/TPM/PCI/CDROM, no IP addresses, ``start``/``update``/``delete`` are not jobs, create never
starts. 27 makes ``container.delete`` a job that wants ``force`` for an active container.
"""

from __future__ import annotations

import errno
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from ..errors import AlreadyExists, FieldError, ImageNotFound, NotFound, ValidationFailed
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
from .macs import mac_for

SUPPORTED_DEVICES = ("DISK", "NIC", "USB", "GPU")
REGISTRY_TTL = 600.0


def is_cpu_set(cpu: str | None) -> bool:
    """``"0-3"``/``"1,3"`` pin CPUs (26 can do that); ``"2"`` counts them (26 cannot)."""
    return cpu is not None and not cpu.isdigit()


def status_of(state: Any) -> InstanceStatus:
    """``status.state``: RUNNING/STOPPED, and 27's SUSPENDED (a paused domain), which is FROZEN here."""
    return InstanceStatus.FROZEN if state == "SUSPENDED" else InstanceStatus.of(state)


def observed(entry: dict[str, Any]) -> ObservedInstance:
    return ObservedInstance(
        id=str(entry["id"]),
        name=entry["name"],
        type="CONTAINER",
        status=status_of((entry.get("status") or {}).get("state")),
        cpu=entry.get("cpuset"),
        memory=None,
        autostart=bool(entry.get("autostart")),
        environment=dict(entry.get("initenv") or {}),
        addresses=(),
        image=ObservedImage(),
        storage_pool=str(entry.get("dataset") or "").split("/")[0] or None,
        family="container",
    )


def device_identity(device: DeviceConfig) -> str:
    """What makes a container device the same device (26 stores no names)."""
    extra = device.extra
    if device.type == "DISK":
        return f"DISK:{device.destination}"
    if device.type == "NIC":
        return f"NIC:{extra.get('parent') or ''}"
    if device.type == "USB":
        return f"USB:{extra.get('device') or extra.get('vendor_id')}:{extra.get('product_id') or ''}"
    return f"{device.type}:{extra.get('pci_address') or extra.get('pci') or device.name}"


def honoured_device(device: DeviceConfig, version: tuple[int, ...] = ()) -> DeviceConfig:
    """A spec device in this family's terms (readonly and NIC modes cannot be expressed)."""
    if device.type == "NIC":
        mac = mac_for(version, device.extra.get("mac"))
        extra = {k: v for k, v in (("parent", device.extra.get("parent")), ("mac", mac)) if v}
        return replace(device, extra=extra, readonly=False)
    return replace(device, readonly=False)


def device_from_entry(entry: dict[str, Any]) -> DeviceConfig:
    attributes = entry.get("attributes") or {}
    kind = attributes.get("dtype")
    name = str(entry["id"])
    if kind == "FILESYSTEM":
        return DeviceConfig(name, "DISK", source=attributes.get("source"), destination=attributes.get("target"))
    if kind == "NIC":
        extra = {"parent": attributes.get("nic_attach"), "mac": attributes.get("mac")}
        return DeviceConfig(name, "NIC", extra={k: v for k, v in extra.items() if v})
    if kind == "USB":
        usb = attributes.get("usb") or {}
        extra = {
            "device": attributes.get("device"),
            "vendor_id": usb.get("vendor_id"),
            "product_id": usb.get("product_id"),
        }
        return DeviceConfig(name, "USB", extra={k: v for k, v in extra.items() if v})
    return DeviceConfig(name, str(kind), extra={k: v for k, v in attributes.items() if k != "dtype"})


def device_attributes(device: DeviceConfig, version: tuple[int, ...] = ()) -> dict[str, Any]:
    if device.type == "DISK":
        return {"dtype": "FILESYSTEM", "source": device.source, "target": device.destination}
    if device.type == "NIC":
        attributes: dict[str, Any] = {"dtype": "NIC", "nic_attach": device.extra.get("parent")}
        if device.extra.get("mac"):
            attributes["mac"] = mac_for(version, device.extra["mac"])
        return attributes
    if device.type == "USB":
        if device.extra.get("device"):
            return {"dtype": "USB", "device": device.extra["device"]}
        return {
            "dtype": "USB",
            "usb": {"vendor_id": device.extra.get("vendor_id"), "product_id": device.extra.get("product_id")},
        }
    return {**device.extra, "dtype": device.type}  # the typed dtype wins over extra


class ContainerBackend:
    family = "container"

    @staticmethod
    def calls(version: tuple[int, ...]) -> Calls:
        return Calls(
            reads=("container.query", "container.device.query", "container.image.query_registry", "lxc.config"),
            writes=(
                "container.create",
                "container.update",
                "container.start",
                "container.stop",
                "container.delete",
                "container.device.create",
                "container.device.update",
                "container.device.delete",
            ),
        )

    def __init__(self, transport: Transport, version: tuple[int, ...], arch: str = "amd64") -> None:
        self.transport = transport
        self.version = version
        self.arch = arch
        self._ids: dict[str, int] = {}
        self._names: dict[int, str] = {}
        self._registry: list[dict[str, Any]] = []
        self._registry_at = 0.0

    # ----- what this family can do ------------------------------------------------------------------
    def deferred_fields(self, config: InstanceConfig, observed: ObservedInstance | None) -> list[str]:
        return []  # changes apply when made

    def unsupported_fields(self, config: InstanceConfig, observed: ObservedInstance | None = None) -> list[str]:
        unsupported = []
        if config.type == "VM":
            unsupported.append("type")
        if config.memory is not None:
            unsupported.append("memory")
        if config.cpu is not None and not is_cpu_set(config.cpu):
            unsupported.append("cpu")
        for device in config.devices:
            if device.type not in SUPPORTED_DEVICES:
                unsupported.append(f"devices[{device.name}] ({device.type})")
            elif device.readonly:
                unsupported.append(f"devices[{device.name}].readonly")
        if config.devices:
            unsupported.append("devices[].name")
        if config.root_disk_size is not None:
            unsupported.append("rootDiskSize")  # the vm.* backend's field
        own_network = config.cloud_init_network_config is not None and not config.network_declared
        if config.cloud_init_user_data is not None or own_network:
            unsupported.append("cloudInit")
        if config.network_declared:
            unsupported.append("nics[].addresses")  # no TrueNAS API gives this family a static address
        if config.memory_overcommit:
            unsupported.append("memoryOvercommit")  # vm.start's option
        if config.wants_address:
            unsupported.append("readiness.address")  # container.query reports no address (ContainerEntry)
        return unsupported

    def honoured(self, config: InstanceConfig, observed: ObservedInstance | None = None) -> InstanceConfig:
        """The part of ``config`` this family can apply, in its own terms."""
        return replace(
            config,
            memory=None,
            cpu=config.cpu if is_cpu_set(config.cpu) else None,
            devices=tuple(honoured_device(d, self.version) for d in config.devices if d.type in SUPPORTED_DEVICES),
        )

    device_identity = staticmethod(device_identity)

    # ----- bookkeeping: names <-> integer ids -----------------------------------------------------------
    def _remember(self, entry: dict[str, Any]) -> ObservedInstance:
        self._ids[entry["name"]] = entry["id"]
        self._names[entry["id"]] = entry["name"]
        return observed(entry)

    async def _id(self, name: str) -> int:
        if name not in self._ids:
            await self.get_instance(name)
        if name not in self._ids:
            raise NotFound([FieldError(None, f"Container {name} does not exist", 2)], "container.get_instance")
        return self._ids[name]

    # ----- instances -----------------------------------------------------------------------------------------
    async def list_instances(self) -> list[ObservedInstance]:
        entries = await self.transport.call("container.query", [], {}, idempotent=True)
        self._ids.clear()
        self._names.clear()
        return [self._remember(e) for e in entries]

    async def get_instance(self, name: str) -> ObservedInstance | None:
        entries = await self.transport.call("container.query", [["name", "=", name]], {}, idempotent=True)
        if not entries:
            stale = self._ids.pop(name, None)
            if stale is not None:
                self._names.pop(stale, None)
            return None
        return self._remember(entries[0])

    async def snapshot_target(self, name: str) -> SnapshotTarget | None:
        """The container's ``dataset`` (``<pool>/.truenas_containers/containers/<name>``, container.py)."""
        entries = await self.transport.call("container.query", [["name", "=", name]], {}, idempotent=True)
        dataset = str((entries[0] if entries else {}).get("dataset") or "")
        return SnapshotTarget(dataset) if dataset else None

    async def resolve_image(self, alias: str) -> dict[str, str]:
        """``debian/bookworm`` -> ``{"name": "debian:bookworm:amd64:default", "version": <newest>}``."""
        for refresh in (False, True):
            if refresh or time.monotonic() - self._registry_at > REGISTRY_TTL:
                self._registry = await self.transport.call("container.image.query_registry", idempotent=True)
                self._registry_at = time.monotonic()
            match = self._match(alias)
            if match is not None:
                return match
        names = sorted(item["name"] for item in self._registry)
        shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
        raise ImageNotFound(
            f"no image in the TrueNAS registry matches {alias!r} (registry names look like "
            f"os:release:arch:variant: {shown})"
        )

    def _match(self, alias: str) -> dict[str, str] | None:
        if ":" in alias:  # already a registry name
            candidates = [item for item in self._registry if item["name"] == alias]
        else:
            parts = alias.lower().split("/")
            candidates = []
            for item in self._registry:
                os_, release, arch, variant = [*item["name"].split(":"), "", "", "", ""][:4]
                if os_ != parts[0] or arch != self.arch:
                    continue
                rest = parts[1:]
                if (
                    not rest
                    or (rest[0] == release and ((len(rest) == 1 and variant == "default") or rest[1:] == [variant]))
                    or (len(rest) == 1 and rest[0] == variant)
                ):
                    candidates.append(item)
        for item in candidates:
            if item.get("versions"):
                return {"name": item["name"], "version": item["versions"][-1]["version"]}
        return None

    async def create(
        self, config: InstanceConfig, on_progress: Callable[[dict[str, Any]], None] | None = None
    ) -> ObservedInstance:
        payload: dict[str, Any] = {
            "name": config.name,
            "image": await self.resolve_image(image_of(config, "container.create")),
            "autostart": config.autostart,
            "initenv": dict(config.environment),
        }
        if is_cpu_set(config.cpu):
            payload["cpuset"] = config.cpu
        if config.storage_pool:
            payload["pool"] = config.storage_pool
        try:
            entry = await self.transport.call_job("container.create", payload, on_progress=on_progress)
        except ValidationFailed as exc:
            # "container_create.name: A container with this name already exists." (EEXIST)
            if any(e.errno == errno.EEXIST for e in exc.errors):
                raise AlreadyExists.from_validation(exc) from None
            raise
        return self._remember(entry)

    async def update(self, name: str, changes: InstanceChanges) -> ObservedInstance:
        payload: dict[str, Any] = {}
        if changes.cpu is UNSET:
            payload["cpuset"] = None
        elif isinstance(changes.cpu, str) and is_cpu_set(changes.cpu):
            payload["cpuset"] = changes.cpu
        if changes.autostart is not None:
            payload["autostart"] = changes.autostart
        if changes.environment is not None:
            payload["initenv"] = dict(changes.environment)
        entry = await self.transport.call("container.update", await self._id(name), payload)
        return self._remember(entry)

    async def delete(self, name: str) -> None:
        if self.version >= (27,):
            # 27: a job (lock container_delete:<id>) that refuses an active container without force
            # (26 destroyed it anyway). Never ``recursive``: that would also destroy the clones of the
            # dataset's snapshots wherever they live; a dataset with snapshots is refused, saying so.
            await self.transport.call_job("container.delete", await self._id(name), {"force": True})
        else:
            await self.transport.call("container.delete", await self._id(name))
        ident = self._ids.pop(name, None)
        if ident is not None:
            self._names.pop(ident, None)

    async def start(self, name: str, overcommit: bool = False) -> None:
        await self.transport.call("container.start", await self._id(name))

    async def stop(self, name: str, timeout: int | None = None, force: bool = False) -> None:
        # 26 has no timeout argument: a graceful stop waits the container's shutdown_timeout, then kills it.
        options = {"force": True} if force else {"force_after_timeout": True}
        await self.transport.call_job("container.stop", await self._id(name), options)

    async def create_in_progress(self, name: str) -> bool:
        return await job_running(self.transport, "container.create", name)

    async def discard_unfinished(self, name: str) -> None:
        return None  # a create is one job: it leaves an instance or nothing

    # ----- devices ----------------------------------------------------------------------------------------------
    async def list_devices(self, name: str) -> list[DeviceConfig]:
        entries = await self.transport.call(
            "container.device.query", [["container", "=", await self._id(name)]], {}, idempotent=True
        )
        return [device_from_entry(e) for e in entries]

    async def add_device(self, name: str, device: DeviceConfig) -> None:
        await self.transport.call(
            "container.device.create",
            {"container": await self._id(name), "attributes": device_attributes(device, self.version)},
        )

    async def update_device(self, name: str, device: DeviceConfig, target: str | None = None) -> None:
        ident = int(target) if target is not None else int(device.name)
        await self.transport.call(
            "container.device.update", ident, {"attributes": device_attributes(device, self.version)}
        )

    async def delete_device(self, name: str, device_name: str) -> None:
        await self.transport.call("container.device.delete", int(device_name))

    # ----- events ----------------------------------------------------------------------------------------------
    def instance_from_event(self, fields: dict[str, Any]) -> ObservedInstance | None:
        if {"id", "name", "status"} <= fields.keys():
            return self._remember(fields)
        return None

    async def watch(self, callback: InstanceEventCallback) -> None:
        if not self.transport.supports_events:
            return

        def relay(msg: str, ident: Any, fields: dict[str, Any] | None) -> None:
            name = (fields or {}).get("name") or self._names.get(ident)
            if name is not None:
                callback(msg, str(name), fields)

        await self.transport.subscribe("container.query", relay)
