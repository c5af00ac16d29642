"""TrueNAS query filters and options (``filter_list``): ``[["status", "=", "RUNNING"]]``, ``OR``,
``select``, ``order_by``, ``count``, ``get``, ``offset``, ``limit``."""

from __future__ import annotations

import re
from collections.abc import Callable
from functools import partial
from typing import Any

from .errors import MatchNotFound, ValidationErrors


def _get(entry: dict[str, Any], path: str) -> Any:
    value: Any = entry
    for part in path.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def _ci(value: Any) -> Any:
    return value.casefold() if isinstance(value, str) else value


_OPS: dict[str, Callable[[Any, Any], bool]] = {
    "=": lambda a, b: a == b,
    "!=": lambda a, b: a != b,
    ">": lambda a, b: a is not None and a > b,
    ">=": lambda a, b: a is not None and a >= b,
    "<": lambda a, b: a is not None and a < b,
    "<=": lambda a, b: a is not None and a <= b,
    "~": lambda a, b: isinstance(a, str) and re.search(b, a) is not None,
    "in": lambda a, b: a in b,
    "nin": lambda a, b: a not in b,
    "rin": lambda a, b: a is not None and b in a,
    "rnin": lambda a, b: a is not None and b not in a,
    "^": lambda a, b: isinstance(a, str) and a.startswith(b),
    "!^": lambda a, b: isinstance(a, str) and not a.startswith(b),
    "$": lambda a, b: isinstance(a, str) and a.endswith(b),
    "!$": lambda a, b: isinstance(a, str) and not a.endswith(b),
}


def _match(entry: dict[str, Any], flt: list[Any]) -> bool:
    if len(flt) == 2 and flt[0] == "OR":
        return any(
            all(_match(entry, f) for f in (branch if _is_list_of_filters(branch) else [branch])) for branch in flt[1]
        )
    if len(flt) != 3:
        raise ValidationErrors([("query-filters", f"Invalid filter {flt!r}", 22)])
    name, op, value = flt
    insensitive = isinstance(op, str) and op.startswith("C")
    op_name = op[1:] if insensitive else op
    if op_name not in _OPS:
        raise ValidationErrors([("query-filters", f"Invalid operation: {op}", 22)])
    left = _get(entry, name)
    if insensitive:
        left, value = _ci(left), [_ci(v) for v in value] if isinstance(value, list) else _ci(value)
    return _OPS[op_name](left, value)


def _is_list_of_filters(item: Any) -> bool:
    return isinstance(item, list) and bool(item) and isinstance(item[0], list)


def _sort_key(field: str, entry: dict[str, Any]) -> tuple[bool, Any]:
    value = _get(entry, field)
    return (value is None, value)


def filter_list(entries: list[dict[str, Any]], filters: list[Any] | None, options: dict[str, Any] | None) -> Any:
    options = options or {}
    result = [e for e in entries if all(_match(e, f) for f in filters or [])]
    for key in reversed(options.get("order_by") or []):
        reverse = key.startswith("-")
        field = key.lstrip("-").removeprefix("nulls_first:").removeprefix("nulls_last:")
        result.sort(key=partial(_sort_key, field), reverse=reverse)
    offset = options.get("offset") or 0
    limit = options.get("limit") or 0
    result = result[offset : offset + limit] if limit else result[offset:]
    if options.get("count"):
        return len(result)
    select = options.get("select")
    if select:
        result = [{k: e[k] for k in select if isinstance(k, str) and k in e} for e in result]
    if options.get("get"):
        if not result:
            raise MatchNotFound()
        return result[0]
    return result


QUERY_OPTION_KEYS = {"extra", "order_by", "select", "count", "get", "offset", "limit", "force_sql_filters"}


def check_query_args(params: list[Any], method: str) -> tuple[list[Any], dict[str, Any]]:
    """Validates ``[filters, options]`` as the QueryArgs model would."""
    filters = params[0] if params else []
    options = params[1] if len(params) > 1 else {}
    errors = ValidationErrors()
    attr = method.replace(".", "_")
    if not isinstance(filters, list):
        errors.add(f"{attr}.filters", "Input should be a valid list")
    if not isinstance(options, dict):
        errors.add(f"{attr}.options", "Input should be a valid dictionary")
    else:
        for key in options:
            if key not in QUERY_OPTION_KEYS:
                errors.add(f"{attr}.options.{key}", "Extra inputs are not permitted")
    if len(params) > 2:
        errors.add(attr, f"Too many arguments (expected 2, found {len(params)})")
    errors.check()
    return filters, options
