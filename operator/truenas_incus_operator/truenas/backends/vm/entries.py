"""What ``vm.query`` and ``vm.device.query`` entries mean as observations, and the names on both
sides: VM names allow letters, digits and ``_`` only, so ``web-01`` is ``web_01`` on TrueNAS."""

from __future__ import annotations

import ipaddress
import re
from typing import Any

from ...addresses import MAX_AGENT_ITEMS, MAX_GUEST_ADDRESSES, global_address
from ...types import DeviceConfig, InstanceStatus, ObservedImage, ObservedInstance
from ..macs import mac_for

DEFAULT_MEMORY = 1024 * 2**20
SUPPORTED_DEVICES = ("NIC",)
STATUS = {
    "RUNNING": InstanceStatus.RUNNING,
    "STOPPED": InstanceStatus.STOPPED,
    "SUSPENDED": InstanceStatus.FROZEN,
    "ERROR": InstanceStatus.ERROR,
}
"""vm.query's ``status.state`` (plugins/vm/vm_lifecycle.py) in the operator's terms."""


def vm_name(name: str) -> str:
    """``web-01`` -> ``web_01`` (vm.* names are ``^[a-zA-Z_0-9]+$``; instance names have no ``_``)."""
    return name.replace("-", "_")


def instance_name(name: str) -> str:
    return name.replace("_", "-")


def instance_of_dataset(dataset: str) -> str | None:
    """The instance whose disk ``dataset`` is (``<pool>/incus-operator/vms/<vm>/...``); None: no VM's."""
    parts = dataset.split("/")
    if len(parts) >= 4 and parts[1:3] == ["incus-operator", "vms"] and parts[3]:
        return instance_name(parts[3].split("@")[0])
    return None


def cpu_count(cpu: str | None) -> int:
    return int(cpu) if cpu is not None and cpu.isdigit() and int(cpu) > 0 else 1


def observed(entry: dict[str, Any]) -> ObservedInstance:
    total = int(entry.get("vcpus") or 1) * int(entry.get("cores") or 1) * int(entry.get("threads") or 1)
    return ObservedInstance(
        id=str(entry["id"]),
        name=instance_name(entry["name"]),
        type="VM",
        status=STATUS.get(str((entry.get("status") or {}).get("state")), InstanceStatus.UNKNOWN),
        cpu=str(total),
        memory=int(entry["memory"]) * 2**20 if entry.get("memory") is not None else None,
        autostart=bool(entry.get("autostart")),
        environment=None,  # in the seed, which vm.query cannot show: the observation's ``seed`` holds its digest
        addresses=(),  # vm.query reports none; 27's guest agent does (guest_addresses, the backend adds them)
        image=ObservedImage(description=entry.get("description") or None),
        storage_pool=None,
        family="vm",
    )


def device_identity(device: DeviceConfig) -> str:
    return nic_key(device.extra.get("parent")) if device.type == "NIC" else device.name


def nic_key(parent: Any) -> str:
    """vm.device has no names: a NIC is known by what it attaches to, in every family's identity."""
    return f"nic-{parent or 'default'}"


def device_from_entry(entry: dict[str, Any], root_paths: tuple[str, ...]) -> DeviceConfig:
    attributes = entry.get("attributes") or {}
    kind = str(attributes.get("dtype"))
    name = str(entry["id"])
    if kind == "NIC":
        extra = {"parent": attributes.get("nic_attach"), "mac": attributes.get("mac")}
        return DeviceConfig(nic_key(extra["parent"]), "NIC", extra={k: v for k, v in extra.items() if v})
    path = str(attributes.get("path") or "")
    # The root disk and the seed are the operator's own (like a profile's devices): never managed as spec devices.
    inherited = path in root_paths
    return DeviceConfig(name, kind, source=path or None, extra={}, inherited=inherited)


def nic_attributes(device: DeviceConfig, version: tuple[int, ...] = ()) -> dict[str, Any]:
    """A spec NIC on vm.*: VIRTIO on ``parent`` (bridge or macvtap, as TrueNAS decides from the parent)."""
    attributes: dict[str, Any] = {"dtype": "NIC", "type": "VIRTIO", "nic_attach": device.extra.get("parent")}
    if device.extra.get("mac"):
        attributes["mac"] = mac_for(version, device.extra["mac"])
    return attributes


def guest_addresses(interfaces: Any) -> tuple[str, ...]:
    """27's ``vm.get_guest_network_interfaces`` answer (what the QEMU guest agent sees) as the addresses
    status reports: not loopback, link-local, multicast or unspecified; IPv4 first, then the agent's
    order. The answer is the guest's word: anything that is not an address is skipped."""
    return tuple(address for address, _ in guest_interfaces(interfaces))


INTERFACE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:@-]{0,14}")
"""A Linux interface name (at most 15 characters), as the status may show one; anything else is left out."""


def guest_interfaces(interfaces: Any) -> tuple[tuple[str, str], ...]:
    """``guest_addresses`` with the interface each is on (the agent's ``name``; "" when it is not a
    plausible interface name). Bounded: the guest controls the answer (at most MAX_AGENT_ITEMS
    interfaces and addresses each, and MAX_GUEST_ADDRESSES kept), linear in its size."""
    found: dict[ipaddress.IPv4Address | ipaddress.IPv6Address, str] = {}
    for interface in interfaces[:MAX_AGENT_ITEMS] if isinstance(interfaces, list) else []:
        items = interface.get("ip_addresses") if isinstance(interface, dict) else None
        raw = interface.get("name") if isinstance(interface, dict) else None
        name = raw if isinstance(raw, str) and INTERFACE_NAME.fullmatch(raw) else ""
        for item in items[:MAX_AGENT_ITEMS] if isinstance(items, list) else []:
            address = global_address(item.get("ip_address") if isinstance(item, dict) else None)
            if address is not None and address not in found and len(found) < MAX_GUEST_ADDRESSES:
                found[address] = name
    return tuple((str(a), n) for a, n in sorted(found.items(), key=lambda pair: pair[0].version))
