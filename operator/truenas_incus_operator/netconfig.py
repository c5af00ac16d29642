"""spec.nics[].addresses as the NoCloud ``network-config`` (version 2) a VM's cloud-init reads from its
seed at first boot. Pure: the spec in, YAML text out (None when no NIC declares an address).

Each NIC becomes an ``ethernets`` entry, its guest interface matched by MAC (``hwaddr``: the models
require it on every NIC once one declares addresses; a name glob works with netplan only, and
Debian's cloud images render ifupdown). A NIC without addresses keeps DHCP; a gateway becomes the
default route of its family.
"""

from __future__ import annotations

import ipaddress
from typing import Any
from urllib.parse import urlsplit

import yaml

from .models import InstanceNIC


def network_config(nics: list[InstanceNIC] | None) -> str | None:
    if not nics or not any(n.addresses for n in nics):
        return None
    ethernets: dict[str, Any] = {}
    for nic in nics:
        if not nic.hwaddr:
            continue  # the models refuse it: every NIC needs a MAC once one declares addresses
        entry: dict[str, Any] = {"match": {"macaddress": nic.hwaddr.lower().replace("-", ":")}}
        if not nic.addresses:
            entry["dhcp4"] = True
        else:
            entry["dhcp4"] = False
            entry["dhcp6"] = False
            entry["addresses"] = list(nic.addresses)
            if nic.gateway is not None:
                family = "0.0.0.0/0" if ipaddress.ip_address(nic.gateway).version == 4 else "::/0"
                entry["routes"] = [{"to": family, "via": nic.gateway}]
            if nic.nameservers:
                entry["nameservers"] = {"addresses": list(nic.nameservers)}
        ethernets[nic.name] = entry
    return yaml.safe_dump({"version": 2, "ethernets": ethernets}, sort_keys=False)


def declared_addresses(nics: list[InstanceNIC] | None) -> list[tuple[str, str]]:
    """(address without its prefix, NIC name) of every declared address, in the spec's order."""
    return [(str(ipaddress.ip_interface(a).ip), n.name) for n in nics or [] for a in n.addresses or []]


def nas_address_clash(nics: list[InstanceNIC] | None, url: str) -> str | None:
    """Why a declared address cannot be given: it is the NAS's own (the connection's URL names it by
    address; a host name is not resolved here, the policy's addressCIDRs is the general bound)."""
    try:
        host = urlsplit(url).hostname or ""
        nas = ipaddress.ip_address(host)
    except ValueError:
        return None
    for nic in nics or []:
        for item in nic.addresses or []:
            if ipaddress.ip_interface(item).ip == nas:
                return f"spec.nics[{nic.name}].addresses: {item} is the NAS's own address (the connection's URL)"
    return None
