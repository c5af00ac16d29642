"""What the simulated TrueNAS holds: instances, their devices, the image catalogue, host limits,
and the knobs that tests, demos and benchmarks turn (latency, job time, faults)."""

from __future__ import annotations

import hashlib
import ipaddress
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

from .profiles import Profile

GIB = 2**30
MIB = 2**20


@dataclass(frozen=True)
class Image:
    alias: str
    os: str
    release: str
    variant: str = "default"
    archs: tuple[str, ...] = ("amd64",)
    instance_types: tuple[str, ...] = ("CONTAINER", "VM")
    serial: str = "20251120_05:24"
    secureboot: bool | None = None

    @property
    def label(self) -> str:
        return f"{self.os} {self.release} ({', '.join(self.archs)}, {self.variant})"


DEFAULT_IMAGES: tuple[Image, ...] = (
    Image("debian/bookworm", "Debian", "bookworm", archs=("amd64", "arm64")),
    Image("debian/trixie", "Debian", "trixie", archs=("amd64", "arm64")),
    Image("ubuntu/noble", "Ubuntu", "noble", archs=("amd64", "arm64"), secureboot=True),
    Image("ubuntu/jammy", "Ubuntu", "jammy", archs=("amd64", "arm64"), secureboot=True),
    Image("alpine/3.22", "Alpine", "3.22", instance_types=("CONTAINER",)),
    Image("archlinux", "Archlinux", "current", instance_types=("CONTAINER", "VM")),
    Image("fedora/42", "Fedora", "42"),
    Image("voidlinux/musl", "Voidlinux", "current", variant="musl", instance_types=("CONTAINER",)),
)


@dataclass
class Knobs:
    """Behaviour that tests and demos change at run time (also through the control API)."""

    job_duration: float = 0.0
    """Seconds a create/start/stop/... job spends working."""
    latency: float = 0.0
    """Seconds added before every call is answered."""
    error_rates: dict[str, float] = field(default_factory=dict)
    """Method name -> probability that a call fails with a simulated CallError."""
    drop_rate: float = 0.0
    """Probability that a WebSocket call closes the connection instead of answering."""
    hung_methods: set[str] = field(default_factory=set)
    """Job methods whose jobs never finish (until core.job_abort)."""
    hung_calls: set[str] = field(default_factory=set)
    """Methods that are never answered, as a hung middleware's (``"*"``: every method)."""
    rest_5xx_rate: float = 0.0
    """Probability that a REST request answers 502."""
    host_memory: int = 64 * GIB
    """Physical memory (system.info's physmem) and, unless ``mem_available`` says otherwise, MemAvailable."""
    mem_available: int | None = None
    """The kernel's MemAvailable in bytes (None: ``host_memory``); the ZFS ARC is not part of it."""
    arc_size: int = 0
    """The ZFS ARC's current size (``sysctl.get_arcstats_size``): a NAS that has been up a while has most
    of its memory here."""
    arc_min: int = 0
    """The ARC's floor (``sysctl.get_arc_min``): what vm.start can never take from it."""
    pool_available: int = 4 * 1024 * GIB
    """Free bytes on each pool, before volumes that reserve their size (not sparse) take theirs."""
    host_cores: int = 16
    dhcp: bool = True
    """Incus guests get their addresses as they start (25.x: virt.instance's ``aliases``, what Incus's
    state reports with global scope); False: instances created from now on run without any until
    ``Simulator.set_lease`` gives them one (a guest whose DHCP has not answered yet)."""
    guest_agent_interfaces: list[dict[str, Any]] | None = None
    """What a VM's QEMU guest agent reports (27's ``vm.get_guest_network_interfaces``) unless the VM has its
    own ``agent_interfaces``; None: guests have no agent."""
    max_concurrent_calls: int = 20
    """Calls a socket may have running or waiting; one more is refused (-32000). The middleware's
    ``SoftHardSemaphore(10, 20)`` per socket (api/base/server/ws_handler/rpc.py, apps/websocket_app.py)."""
    running_calls: int = 10
    """Of those, how many run at once; the others wait for one to finish (the semaphore's soft limit)."""
    auth_fail_delay: float = 1.0
    """A refused login answers after uniform(d, d + 1) seconds, as TrueNAS's AAL1 ``min_fail_delay``
    of 1 does (plugins/auth.py, utils/auth.py); 0 answers at once (tests)."""
    scram_iterations: int = 500_000
    """PBKDF2 rounds of the SCRAM secrets (26); real keys use 500 000, clients accept 50 000 and up."""
    scram_wrong_signature: bool = False
    """Sign SCRAM's server-final with the wrong key, as a server that does not hold the key would:
    a client must refuse the login (RFC 5802 §3), never fall back to sending the key."""


@dataclass
class Instance:
    name: str
    type: str
    image: Image
    status: str = "STOPPED"
    cpu: str | None = None
    memory: int | None = None
    autostart: bool = True
    environment: dict[str, str] = field(default_factory=dict)
    devices: dict[str, dict[str, Any]] = field(default_factory=dict)
    storage_pool: str = "tank"
    privileged_mode: bool = False
    secure_boot: bool = False
    vnc_enabled: bool = False
    vnc_port: int | None = None
    root_disk_size: int | None = None
    root_disk_io_bus: str | None = None
    ignores_shutdown: bool = False
    """The guest ignores a graceful stop (only force stops it)."""
    leased: bool = True
    """The guest holds its DHCP lease: while running, Incus reports its addresses (``Knobs.dhcp``)."""
    lease: int = 0
    """Which lease: another one (``Simulator.renumber``) is another address."""

    def addresses(self) -> list[dict[str, Any]]:
        if self.status != "RUNNING" or not self.leased:
            return []
        digest = hashlib.sha256((f"{self.name}#{self.lease}" if self.lease else self.name).encode()).digest()
        return [
            {"type": "INET", "address": f"10.142.{87 + digest[0] % 8}.{2 + digest[1] % 250}", "netmask": 24},
            {
                "type": "INET6",
                # Canonical, as Incus (Go's net.IP) writes it: no leading zeros in a group.
                "address": str(
                    ipaddress.ip_address(
                        f"fd42:9c1b:77e0:41d2:216:3eff:fe{digest[2]:02x}:{digest[3]:02x}{digest[4]:02x}"
                    )
                ),
                "netmask": 64,
            },
        ]

    def entry(self, profile: Profile) -> dict[str, Any]:
        """The query entry, as the profile's API version serves it (truenas-api.md §4)."""
        vm = self.type == "VM"
        data: dict[str, Any] = {
            "id": self.name,
            "name": self.name,
            "type": self.type,
            "status": self.status if self.status in profile.statuses else "UNKNOWN",
            "cpu": self.cpu,
            "memory": self.memory,
            "autostart": self.autostart,
            "environment": dict(self.environment),
            "aliases": self.addresses(),
            "image": {
                "architecture": self.image.archs[0],
                "description": f"{self.image.os} {self.image.release} {self.image.archs[0]} ({self.image.serial})",
                "os": self.image.os,
                "release": self.image.release,
                "serial": self.image.serial,
                "type": "disk-kvm.img" if vm else "squashfs",
                "variant": self.image.variant,
                "secureboot": self.image.secureboot if vm else None,
            },
            "userns_idmap": None
            if vm or self.privileged_mode
            else {
                "uid": {"hostid": 2147000001, "maprange": 458752, "nsid": 0},
                "gid": {"hostid": 2147000001, "maprange": 458752, "nsid": 0},
            },
            "raw": None,
            "vnc_enabled": self.vnc_enabled if vm else False,
            "vnc_port": self.vnc_port if vm else None,
            "vnc_password": None,
            "secure_boot": self.secure_boot if vm else None,
        }
        if profile.privileged_mode:
            data["privileged_mode"] = None if vm else self.privileged_mode
        data["root_disk_size"] = self.root_disk_size if vm else None
        data["root_disk_io_bus"] = (self.root_disk_io_bus or "VIRTIO-SCSI") if vm else None
        data["storage_pool"] = self.storage_pool
        return data


@dataclass
class GlobalConfig:
    pool: str | None = "tank"
    storage_pools: list[str] = field(default_factory=lambda: ["tank"])
    bridge: str | None = None
    state: str = "INITIALIZED"

    def entry(self) -> dict[str, Any]:
        return {
            "id": 1,
            "pool": self.pool,
            "dataset": f"{self.pool}/.ix-virt" if self.pool else None,
            "storage_pools": list(self.storage_pools),
            "bridge": self.bridge,
            "v4_network": "10.142.87.1/24" if self.pool else None,
            "v6_network": "fd42:9c1b:77e0:41d2::1/64" if self.pool else None,
            "state": self.state,
        }


@dataclass
class ApiKey:
    id: int
    secret: str
    username: str = "root"
    name: str = "operator"
    revoked: bool = False
    readonly: bool = False
    """A key whose user has a read-only role: writes are refused with "Not authorized"."""
    roles: tuple[str, ...] = ()
    """The user's roles as ``auth.me`` shows them; empty: FULL_ADMIN, or READONLY_ADMIN when
    ``readonly``. A key without FULL_ADMIN may not call the FULL_ADMIN-only methods
    (``FULL_ADMIN_ONLY`` in simulator.py), whatever else its roles allow."""

    @property
    def role_names(self) -> tuple[str, ...]:
        return self.roles or (("READONLY_ADMIN",) if self.readonly else ("FULL_ADMIN",))

    @property
    def full_admin(self) -> bool:
        return "FULL_ADMIN" in self.role_names

    @property
    def key(self) -> str:
        return f"{self.id}-{self.secret}"


@dataclass
class CallCounters:
    """Calls per method, and how many of them were writes (anything but reads and auth)."""

    by_method: Counter[str] = field(default_factory=Counter)
    faults: Counter[str] = field(default_factory=Counter)
    """Injected faults by kind (rest_5xx, dropped, error:<method>)."""
    writes_log: deque[tuple[str, str]] = field(default_factory=lambda: deque(maxlen=10_000))
    """The writes in the order they reached the dispatcher: (method, its first argument, shortened),
    so tests can prove an order (never a rollback after the instance started again)."""
    over_rest: Counter[str] = field(default_factory=Counter)
    """Of ``by_method``, the calls that came over REST v2.0."""

    READ_PREFIXES = ("core.", "auth.", "system.")
    READ_METHODS = frozenset(
        {
            "virt.instance.query",
            "virt.instance.get_instance",
            "virt.instance.device_list",
            "virt.instance.image_choices",
            "virt.global.config",
            "container.query",
            "container.get_instance",
            "container.device.query",
            "container.image.query_registry",
            "lxc.config",
            "vm.query",
            "vm.get_instance",
            "vm.status",
            "vm.device.query",
            "vm.device.nic_attach_choices",
            "vm.get_available_memory",
            "pool.dataset.query",
            "pool.snapshot.query",
            "zfs.snapshot.query",
        }
    )

    @classmethod
    def is_write(cls, method: str) -> bool:
        return method not in cls.READ_METHODS and not method.startswith(cls.READ_PREFIXES)

    def count(self, method: str, params: list[Any] | None = None) -> None:
        self.by_method[method] += 1
        if params is not None and self.is_write(method):
            self.writes_log.append((method, str(params[0])[:200] if params else ""))

    def snapshot(self) -> dict[str, Any]:
        writes = sum(n for m, n in self.by_method.items() if self.is_write(m))
        return {
            "by_method": dict(self.by_method),
            "total": sum(self.by_method.values()),
            "writes": writes,
            "faults": dict(self.faults),
        }

    def reset(self) -> None:
        self.writes_log.clear()
        self.by_method.clear()
        self.faults.clear()
        self.over_rest.clear()
