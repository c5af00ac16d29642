"""Kubernetes resource quantities (``2Gi``, ``512Mi``, ``1e9``) as whole byte counts."""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

_SUFFIXES: dict[str, Decimal] = {
    "": Decimal(1),
    "Ki": Decimal(2**10),
    "Mi": Decimal(2**20),
    "Gi": Decimal(2**30),
    "Ti": Decimal(2**40),
    "Pi": Decimal(2**50),
    "Ei": Decimal(2**60),
    "k": Decimal(10**3),
    "M": Decimal(10**6),
    "G": Decimal(10**9),
    "T": Decimal(10**12),
    "P": Decimal(10**15),
    "E": Decimal(10**18),
    "m": Decimal(1) / 1000,
}
# The quantity grammar of k8s.io/apimachinery/pkg/api/resource (sign, digits, suffix or exponent).
_QUANTITY = re.compile(r"^([+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+))((?:[KMGTPE]i)|[kMGTPEm]|[eE][+-]?[0-9]+)?$")

MIB = 2**20


def parse_bytes(value: int | str) -> int:
    """Returns a byte count for an int or a quantity string; raises ValueError naming the problem."""
    if isinstance(value, bool):
        raise ValueError("must be a byte count or a quantity such as 2Gi, not a boolean")
    if isinstance(value, int):
        return value
    match = _QUANTITY.match(value.strip())
    if not match:
        raise ValueError(f"{value!r} is not a Kubernetes quantity (for example 512Mi, 2Gi or 2147483648)")
    number, suffix = match.group(1), match.group(2) or ""
    try:
        amount = Decimal(number)
        if suffix[:1] in ("e", "E"):
            amount *= Decimal(10) ** int(suffix[1:])
        else:
            amount *= _SUFFIXES[suffix]
    except (InvalidOperation, KeyError) as exc:  # pragma: no cover - the regex admits only valid parts
        raise ValueError(f"{value!r} is not a Kubernetes quantity") from exc
    if amount != amount.to_integral_value():
        raise ValueError(f"{value!r} is not a whole number of bytes")
    return int(amount)


def format_bytes(value: int) -> str:
    """The shortest exact binary quantity for a byte count: 2147483648 -> ``2Gi``."""
    for suffix in ("Ei", "Pi", "Ti", "Gi", "Mi", "Ki"):
        unit = int(_SUFFIXES[suffix])
        if value and value % unit == 0:
            return f"{value // unit}{suffix}"
    return str(value)
