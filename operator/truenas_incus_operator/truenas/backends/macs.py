"""MAC addresses as each TrueNAS takes them. Up to 26 a NIC's ``mac`` is a pattern-checked string
(``^([0-9A-Fa-f]{2}[:-]?){5}([0-9A-Fa-f]{2})$``) stored as given; 27's ``MACAddress``
(api/base/types/network.py) takes colon-separated hex only and stores it lower case. The backends send
and compare 27's form there, so a spec MAC written otherwise neither fails nor reads back as a change."""

from __future__ import annotations

import re

_DIGITS = re.compile(r"[0-9A-Fa-f]{12}")


def mac_for(version: tuple[int, ...], mac: str | None) -> str | None:
    """``mac`` in the form TrueNAS ``version`` stores; anything not 12 hex digits is left for TrueNAS to refuse."""
    if not mac or version < (27,):
        return mac
    digits = re.sub(r"[:.\-]", "", mac)
    if not _DIGITS.fullmatch(digits):
        return mac
    return ":".join(digits[i : i + 2] for i in range(0, 12, 2)).lower()
