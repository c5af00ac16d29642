"""What the operator and the backends exchange, in IncusInstance terms (not any API family's)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol


class InstanceStatus(StrEnum):
    """An instance's state in TrueNAS's words (virt.instance's ``status`` on 25.04.1+, the container and
    vm.* families mapped onto them by their backends)."""

    RUNNING = "RUNNING"
    STOPPED = "STOPPED"
    STARTING = "STARTING"
    STOPPING = "STOPPING"
    FREEZING = "FREEZING"
    FROZEN = "FROZEN"
    THAWED = "THAWED"
    ABORTING = "ABORTING"
    ERROR = "ERROR"
    UNKNOWN = "UNKNOWN"

    @classmethod
    def of(cls, value: object) -> InstanceStatus:
        """``value`` as a status; a word this operator does not know (a newer TrueNAS) is UNKNOWN."""
        try:
            return cls(str(value).upper()) if value else cls.UNKNOWN
        except ValueError:
            return cls.UNKNOWN

    @property
    def transitional(self) -> bool:
        """TrueNAS is on its way to another state: wait, do not act."""
        return self in (
            InstanceStatus.STARTING,
            InstanceStatus.STOPPING,
            InstanceStatus.FREEZING,
            InstanceStatus.ABORTING,
        )


@dataclass(frozen=True)
class Calls:
    """The TrueNAS methods a backend calls on a given version: what a key's roles must allow
    (doctor checks them; tests/test_declared_calls.py holds every backend to its list)."""

    reads: tuple[str, ...]
    writes: tuple[str, ...]


@dataclass(frozen=True)
class DeviceConfig:
    """A device as the operator wants it (or as a backend reports it)."""

    name: str
    type: str
    """DISK, NIC, GPU, USB, TPM, PROXY, PCI, CDROM."""
    source: str | None = None
    destination: str | None = None
    readonly: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    inherited: bool = False
    """Comes from a profile (e.g. the default NIC and root disk); never managed by the operator."""


@dataclass(frozen=True)
class CloneSource:
    """A snapshot the operator took of another instance, to clone a new instance's disk from."""

    instance: str
    """The instance the snapshot is of (its name on TrueNAS)."""
    snapshot: str
    """The snapshot's name (``tio-...``), the same in every dataset of the instance."""
    owner: str = ""
    """The IncusInstanceSnapshot's UID: the snapshot's owner property must say it (else never cloned)."""


@dataclass(frozen=True)
class InstanceConfig:
    """Everything needed to create an instance."""

    name: str
    type: str
    image: str | None
    """None when ``source`` says what to clone instead."""
    storage_pool: str | None = None
    cpu: str | None = None
    memory: int | None = None
    autostart: bool = True
    environment: dict[str, str] = field(default_factory=dict)
    devices: tuple[DeviceConfig, ...] = ()
    root_disk_size: int | None = None
    """Bytes; VMs on vm.* only (grow the image's disk)."""
    cloud_init_user_data: str | None = None
    cloud_init_network_config: str | None = None
    memory_overcommit: bool = False
    """vm.*: start even when TrueNAS cannot guarantee the memory (``vm.start``'s ``overcommit``)."""
    source: CloneSource | None = None
    """vm.*: the root disk is a clone of this snapshot's root volume instead of a base image."""
    network_declared: bool = False
    """spec.nics[].addresses: ``cloud_init_network_config`` is the operator's rendering of them (vm.*
    delivers it in the seed; a family without a seed reports ``nics[].addresses``, not cloudInit)."""
    wants_address: bool = False
    """spec.readiness.address: Ready waits for an address, which the family must be able to report."""


@dataclass(frozen=True)
class InstanceChanges:
    """A partial update; ``None`` means leave unchanged, ``UNSET`` means remove the limit."""

    cpu: str | Unset | None = None
    memory: int | Unset | None = None
    autostart: bool | None = None
    environment: dict[str, str] | None = None

    def is_empty(self) -> bool:
        return self.cpu is None and self.memory is None and self.autostart is None and self.environment is None


class Unset:
    """Marks a limit to remove (TrueNAS: ``null``)."""

    _instance: Unset | None = None

    def __new__(cls) -> Unset:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "UNSET"


UNSET = Unset()


@dataclass(frozen=True)
class ObservedImage:
    os: str | None = None
    release: str | None = None
    serial: str | None = None
    architecture: str | None = None
    variant: str | None = None
    description: str | None = None


@dataclass(frozen=True)
class ObservedInstance:
    """An instance as TrueNAS reports it."""

    id: str
    name: str
    type: str
    status: InstanceStatus
    cpu: str | None
    memory: int | None
    autostart: bool
    environment: dict[str, str] | None
    """None where TrueNAS cannot show it (vm.*: the seed holds it; ``seed`` tells whether it changed)."""
    addresses: tuple[str, ...]
    image: ObservedImage
    storage_pool: str | None = None
    family: str = ""
    """The API family that reported it (``virt.instance``, ``container``, ``vm``): which one manages it."""
    interfaces: tuple[tuple[str, str], ...] = ()
    """(address, interface name) where TrueNAS names the interface an address is on (27's guest agent);
    virt.instance's aliases do not say (TrueNAS drops Incus's interface names)."""
    seed: tuple[str, ...] | None = None
    """vm.*: the digests of what its seed holds (environment, cloud-init, its network-config where the VM
    has that mark), from its description."""
    pending: tuple[str, ...] = ()
    """Fields changed on the running instance that take effect at its next start (vm.* redefines
    nothing live); known only to the process that changed them."""


@dataclass(frozen=True)
class SnapshotTarget:
    """The datasets one instance owns, as one ZFS snapshot takes them (backends/snapshots.py)."""

    root: str
    """The dataset the snapshot is taken of."""
    recursive: bool = False
    """With its descendants, atomically (one transaction group)."""

    def owns(self, dataset: str) -> bool:
        return dataset == self.root or (self.recursive and dataset.startswith(f"{self.root}/"))


InstanceEventCallback = Callable[[str, str, dict[str, Any] | None], None]
"""``(kind, instance name, fields)``; kind is added, changed or removed."""


class InstanceBackend(Protocol):
    """One API family (``virt.instance`` on 25.x, ``container.*`` on 26) behind one interface."""

    family: str

    # What a family can do: pure functions of (config, observation), never of what the backend did before.
    def unsupported_fields(self, config: InstanceConfig, observed: ObservedInstance | None = None) -> list[str]:
        """Spec fields of ``config`` this backend cannot honour (reported, never silently dropped);
        ``observed`` says which family manages an existing instance."""
        ...

    def deferred_fields(self, config: InstanceConfig, observed: ObservedInstance | None) -> list[str]:
        """Spec fields TrueNAS took (or cannot deliver any more) that the instance does not use yet, each
        with when it applies, e.g. ``memory (takes effect at the next start)``: reported beside the
        unsupported ones, never retried."""
        ...

    def honoured(self, config: InstanceConfig, observed: ObservedInstance | None = None) -> InstanceConfig:
        """``config`` reduced to what this backend applies, in its terms (what observations compare to)."""
        ...

    def device_identity(self, device: DeviceConfig) -> str:
        """What makes a device the same device on this backend (a name, or what it attaches)."""
        ...

    async def list_instances(self) -> list[ObservedInstance]: ...

    async def get_instance(self, name: str) -> ObservedInstance | None: ...

    async def create(
        self, config: InstanceConfig, on_progress: Callable[[dict[str, Any]], None] | None = None
    ) -> ObservedInstance: ...

    async def update(self, name: str, changes: InstanceChanges) -> ObservedInstance: ...

    async def delete(self, name: str) -> None: ...

    async def start(self, name: str, overcommit: bool = False) -> None:
        """``overcommit``: vm.* only, start although TrueNAS cannot guarantee the memory (it shrinks
        the ZFS ARC); families without it never see it set (``unsupported_fields``)."""
        ...

    async def stop(self, name: str, timeout: int | None = None, force: bool = False) -> None: ...

    async def create_in_progress(self, name: str) -> bool:
        """Whether TrueNAS is still running a create job for ``name`` (e.g. one started before a crash)."""
        ...

    async def discard_unfinished(self, name: str) -> None:
        """Removes what a create of ``name`` that never finished left on TrueNAS, when no instance exists
        under the name (vm.*: the per-VM dataset with its root disk clone and seed). Families whose create
        is one TrueNAS job leave nothing: a no-op there."""
        ...

    async def list_devices(self, name: str) -> list[DeviceConfig]: ...

    async def add_device(self, name: str, device: DeviceConfig) -> None: ...

    async def update_device(self, name: str, device: DeviceConfig, target: str | None = None) -> None:
        """``target`` names the observed device to change (where the backend keeps no names)."""
        ...

    async def delete_device(self, name: str, device_name: str) -> None: ...

    async def snapshot_target(self, name: str) -> SnapshotTarget | None:
        """The datasets ``name`` owns on ZFS, as one snapshot takes them (docs/snapshots.md); None when
        the instance does not exist."""
        ...

    def instance_from_event(self, fields: dict[str, Any]) -> ObservedInstance | None:
        """The instance an event describes in full, or None when it carries only some fields."""
        ...

    async def watch(self, callback: InstanceEventCallback) -> None:
        """Follows instance changes where the transport has events (REST has none: callers poll)."""
        ...
