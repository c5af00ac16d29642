"""One connection, two API families: containers (``virt.instance`` on 25.x, ``container.*`` on 26) and
libvirt VMs (``vm.*``, 25.04.2 and later), behind the one ``InstanceBackend`` interface.

Creates go by ``config.type``; everything else by the family that reported the instance (learnt from
``list_instances``/``get_instance``/``create``, asked of both when unknown). Legacy Incus VMs that
``virt.instance`` still reports on 25.04.2/25.10 stay with ``virt.instance``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..types import (
    DeviceConfig,
    InstanceBackend,
    InstanceChanges,
    InstanceConfig,
    InstanceEventCallback,
    ObservedInstance,
    SnapshotTarget,
)
from .vm import VMBackend


class RoutingBackend:
    def __init__(self, containers: InstanceBackend, vms: VMBackend) -> None:
        self.containers = containers
        self.vms = vms
        self.family = f"{containers.family}+{vms.family}"
        self._owner: dict[str, InstanceBackend] = {}

    def _for(self, config: InstanceConfig) -> InstanceBackend:
        if config.type == "VM" and self._owner.get(config.name) is not self.containers:
            return self.vms
        return self.containers

    async def _backend(self, name: str) -> InstanceBackend:
        known = self._owner.get(name)
        if known is not None:
            return known
        for backend in (self.vms, self.containers):
            if await backend.get_instance(name) is not None:
                self._owner[name] = backend
                return backend
        return self.containers  # raises its own NotFound

    # ----- what each family can do: pure, from the spec and the observation ------------------------
    def _capable(self, config: InstanceConfig, observed: ObservedInstance | None) -> InstanceBackend:
        """The family whose rules apply: the one that reported the instance (a legacy Incus VM stays with
        ``virt.instance``), else the one a create of ``config.type`` goes to."""
        if observed is not None and observed.family:
            return self.vms if observed.family == self.vms.family else self.containers
        return self.vms if config.type == "VM" else self.containers

    def unsupported_fields(self, config: InstanceConfig, observed: ObservedInstance | None = None) -> list[str]:
        return self._capable(config, observed).unsupported_fields(config, observed)

    def deferred_fields(self, config: InstanceConfig, observed: ObservedInstance | None) -> list[str]:
        return self._capable(config, observed).deferred_fields(config, observed)

    def honoured(self, config: InstanceConfig, observed: ObservedInstance | None = None) -> InstanceConfig:
        return self._capable(config, observed).honoured(config, observed)

    def device_identity(self, device: DeviceConfig) -> str:
        # VM NICs, on both sides, are named after their parent (vm.py nic_key), which either family's
        # identity (a name, or the parent) matches.
        return self.containers.device_identity(device)

    # ----- instances ---------------------------------------------------------------------------------
    async def list_instances(self) -> list[ObservedInstance]:
        containers = await self.containers.list_instances()
        vms = await self.vms.list_instances()
        self._owner = {i.name: self.vms for i in vms}
        self._owner.update({i.name: self.containers for i in containers})
        return [*containers, *(i for i in vms if self._owner[i.name] is self.vms)]

    async def get_instance(self, name: str) -> ObservedInstance | None:
        known = self._owner.get(name)
        order = [known] if known is not None else []
        order += [b for b in (self.containers, self.vms) if b is not known]
        for backend in order:
            found = await backend.get_instance(name)
            if found is not None:
                self._owner[name] = backend
                return found
        self._owner.pop(name, None)
        return None

    async def create(
        self, config: InstanceConfig, on_progress: Callable[[dict[str, Any]], None] | None = None
    ) -> ObservedInstance:
        backend = self._for(config)
        created = await backend.create(config, on_progress)
        self._owner[config.name] = backend
        return created

    async def update(self, name: str, changes: InstanceChanges) -> ObservedInstance:
        return await (await self._backend(name)).update(name, changes)

    async def delete(self, name: str) -> None:
        await (await self._backend(name)).delete(name)
        self._owner.pop(name, None)

    async def start(self, name: str, overcommit: bool = False) -> None:
        await (await self._backend(name)).start(name, overcommit)

    async def stop(self, name: str, timeout: int | None = None, force: bool = False) -> None:
        await (await self._backend(name)).stop(name, timeout, force)

    async def create_in_progress(self, name: str) -> bool:
        return await self.containers.create_in_progress(name)

    async def discard_unfinished(self, name: str) -> None:
        await self.containers.discard_unfinished(name)
        await self.vms.discard_unfinished(name)

    # ----- devices -------------------------------------------------------------------------------------
    async def list_devices(self, name: str) -> list[DeviceConfig]:
        return await (await self._backend(name)).list_devices(name)

    async def add_device(self, name: str, device: DeviceConfig) -> None:
        await (await self._backend(name)).add_device(name, device)

    async def update_device(self, name: str, device: DeviceConfig, target: str | None = None) -> None:
        await (await self._backend(name)).update_device(name, device, target)

    async def delete_device(self, name: str, device_name: str) -> None:
        await (await self._backend(name)).delete_device(name, device_name)

    async def snapshot_target(self, name: str) -> SnapshotTarget | None:
        return await (await self._backend(name)).snapshot_target(name)

    # ----- events ---------------------------------------------------------------------------------------
    def instance_from_event(self, fields: dict[str, Any]) -> ObservedInstance | None:
        if "vcpus" in fields:  # a vm.query entry (containers have no vCPU count)
            found = self.vms.instance_from_event(fields)
            if found is not None:
                self._owner[found.name] = self.vms
            return found
        return self.containers.instance_from_event(fields)

    async def watch(self, callback: InstanceEventCallback) -> None:
        await self.containers.watch(callback)
        await self.vms.watch(callback)
