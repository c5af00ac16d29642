"""Addresses as TrueNAS (or a guest through it) reports them: checked, bounded, never guessed."""

from __future__ import annotations

import functools
import ipaddress
from typing import Any

MAX_AGENT_ITEMS = 256
"""Entries read from one answer (interfaces, addresses per interface, aliases): the guest writes them."""
MAX_GUEST_ADDRESSES = 16
"""Addresses kept per instance (status.addresses holds as many)."""


def global_address(text: Any) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """``text`` as an address another host could reach: not loopback, link-local, multicast or
    unspecified, and no IPv6 zone (``fe80::1%eth0`` names the guest's own link). None otherwise."""
    if not isinstance(text, str) or len(text) > 45:
        return None
    return _global(text)


def global_text(text: Any) -> str | None:
    """``global_address`` as its text (the compressed form: ``::ffff:10.0.0.2`` is ``10.0.0.2``)."""
    if not isinstance(text, str) or len(text) > 45:
        return None
    return _global_text(text)


# Every resync reads every instance's addresses again: parsing them (and printing an IPv6 address) was
# a fifth of an idle operator's CPU at 5000 instances. Cached: bounded (the answers are the server's),
# and the addresses are immutable.
@functools.lru_cache(maxsize=8192)
def _global(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address):
        if address.scope_id is not None:
            return None
        if address.ipv4_mapped is not None:  # ::ffff:10.0.0.2 is 10.0.0.2 (and ::ffff:127.0.0.1 loopback)
            address = address.ipv4_mapped
    local = address.is_loopback or address.is_link_local or address.is_multicast or address.is_unspecified
    return None if local else address


@functools.lru_cache(maxsize=8192)
def _global_text(text: str) -> str | None:
    address = _global(text)
    return None if address is None else str(address)
