"""Kubernetes resource quantities (``2Gi``, ``1.5Gi``, ``512M``, ``1e9``) as whole byte counts.

Parsed the way ``k8s.io/apimachinery/pkg/api/resource.ParseQuantity`` parses them (no surrounding
whitespace; fractions below a nano-unit rounded up, away from zero), so a value is a whole number of
bytes here exactly when the API server's CEL ``quantity()`` says so (the CRD's rule for ``spec.memory``).
"""

from __future__ import annotations

import re
from decimal import ROUND_UP, Decimal, InvalidOperation, localcontext

_SUFFIXES: dict[str, Decimal] = {
    "": Decimal(1),
    "Ki": Decimal(2**10),
    "Mi": Decimal(2**20),
    "Gi": Decimal(2**30),
    "Ti": Decimal(2**40),
    "Pi": Decimal(2**50),
    "Ei": Decimal(2**60),
    "n": Decimal(1) / 10**9,
    "u": Decimal(1) / 10**6,
    "m": Decimal(1) / 1000,
    "k": Decimal(10**3),
    "M": Decimal(10**6),
    "G": Decimal(10**9),
    "T": Decimal(10**12),
    "P": Decimal(10**15),
    "E": Decimal(10**18),
}
# The quantity grammar of k8s.io/apimachinery/pkg/api/resource (sign, digits, suffix or exponent).
_QUANTITY = re.compile(r"^([+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+))((?:[KMGTPE]i)|[numkMGTPE]|[eE][+-]?[0-9]+)?$")
_NANO = Decimal("1e-9")

MIB = 2**20


def parse_quantity(value: str) -> Decimal:
    """The exact value of a Kubernetes quantity string; raises ValueError if it is not one."""
    match = _QUANTITY.match(value)
    if not match:
        raise ValueError(f"{value!r} is not a Kubernetes quantity (for example 512Mi, 1.5Gi, 64M or 2147483648)")
    number, suffix = match.group(1), match.group(2) or ""
    with localcontext() as context:
        context.prec = 200  # exact for every quantity the API server can hold
        try:
            amount = Decimal(number)
            if suffix[:1] in ("e", "E") and len(suffix) > 1:
                exponent = int(suffix[1:])
                if abs(exponent) > 100:
                    raise ValueError(f"{value!r}: exponent out of range")
                amount = amount.scaleb(exponent)
            else:
                amount *= _SUFFIXES[suffix]
        except (InvalidOperation, KeyError) as exc:  # pragma: no cover - the regex admits only valid parts
            raise ValueError(f"{value!r} is not a Kubernetes quantity") from exc
        # ParseQuantity rounds anything finer than a nano-unit up (away from zero): 0.9999999999 is 1.
        if amount and int(amount.as_tuple().exponent) < -9:
            amount = amount.quantize(_NANO, rounding=ROUND_UP)
    return amount


def parse_bytes(value: int | str) -> int:
    """Returns a byte count for an int or a quantity string; raises ValueError naming the problem."""
    if isinstance(value, bool):
        raise ValueError("must be a byte count or a quantity such as 2Gi, not a boolean")
    if isinstance(value, int):
        return value
    amount = parse_quantity(value)
    if abs(amount) >= 10**30:
        raise ValueError(f"{value!r} is too large")
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
