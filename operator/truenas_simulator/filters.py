"""TrueNAS query filters and options (``filter_list``): ``[["status", "=", "RUNNING"]]``, ``OR``,
``select``, ``order_by``, ``count``, ``get``, ``offset``, ``limit``."""

from __future__ import annotations

import errno
import re
from collections.abc import Callable
from functools import partial
from typing import Any

from .errors import MatchNotFound, ValidationErrors


def _get(entry: Any, path: str) -> Any:
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
    "~": lambda a, b: re.match(b, a or "") is not None,  # op_re: anchored at the start, null as ""
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


MAX_LIMIT = 10000
NULLS_FIRST, NULLS_LAST = "nulls_first:", "nulls_last:"
GET_IMPLIES_ONE = "Invalid options combination. `get` implies a single result."


def validate_options(options: dict[str, Any], max_limit: bool = True) -> None:
    """``validate_options`` (utils/filter_list.py on 25.10 and 26, utils/__init__.py on 25.04):
    raises ``ValueError`` as the middleware does. The ``MAX_LIMIT`` check came with 25.10.

    25.10 and 26 also run it in ``QueryOptions``' model validator (api/v25_10_0/common.py,
    api/v26_0_0/common.py), which ``check_query_args`` turns into a validation error on ``options``.
    """
    if options.get("get") and (options.get("limit") or 0) > 1:
        raise ValueError(GET_IMPLIES_ONE)
    if options.get("get") and options.get("offset"):
        raise ValueError(GET_IMPLIES_ONE)
    if max_limit and (options.get("limit") or 0) > MAX_LIMIT:
        raise ValueError(f"Options limit must be between 1 and {MAX_LIMIT}")


def _select(entries: list[dict[str, Any]], select: list[Any]) -> list[dict[str, Any]]:
    """``do_select``: a dotted path keeps its nesting (``status.state`` -> ``{"status": {"state": ..}}``),
    ``[path, name]`` puts the value under ``name``; a path that is not there is left out."""
    result = []
    for entry in entries:
        picked: dict[str, Any] = {}
        for item in select:
            path, alias = (item[0], item[1]) if isinstance(item, list) else (item, None)
            keys: list[str] = []
            value: Any = entry
            for part in path.split("."):  # select_path: a scalar ends the walk, keeping the value
                if isinstance(value, dict):
                    keys.append(part)
                    value = value.get(part, MatchNotFound)
                elif isinstance(value, list | tuple):
                    raise ValueError("Selecting by list index is not supported")
            if value is MatchNotFound:
                continue
            if alias is not None:
                picked[alias] = value
                continue
            target = picked
            for key in keys[:-1]:
                target = target.setdefault(key, {})
            target[keys[-1]] = value
        result.append(picked)
    return result


def _order(entries: list[dict[str, Any]], order_by: list[str]) -> list[dict[str, Any]]:
    """``do_order``: one stable sort per key, in the order given, so the last key is the primary one.

    ``-`` reverses; ``nulls_first:``/``nulls_last:`` set apart the entries whose top-level ``get`` of
    the name is null. Without them a null among the values fails the sort as Python's ``sorted`` does.
    """
    for key in order_by:
        nulls: str | None = None
        for prefix in (NULLS_FIRST, NULLS_LAST):
            if key.startswith(prefix):
                nulls, key = prefix, key[len(prefix) :]
        reverse = key.startswith("-")
        name = key[1:] if reverse else key
        if nulls is None:
            entries = sorted(entries, key=partial(_get, path=name), reverse=reverse)
            continue
        empty = [e for e in entries if e.get(name) is None]
        full = sorted((e for e in entries if e.get(name) is not None), key=partial(_get, path=name), reverse=reverse)
        entries = empty + full if nulls == NULLS_FIRST else full + empty
    return entries


def filter_list(entries: list[dict[str, Any]], filters: list[Any] | None, options: dict[str, Any] | None) -> Any:
    """``filter_list`` (utils/filter_list.py; utils/__init__.py on 25.04; the same steps), in order: match
    the filters and ``select`` from what matched; ``count`` (before any ordering, offset or limit);
    ``order_by``; ``get`` (the first, before offset and limit); then ``offset`` and ``limit``."""
    options = options or {}
    validate_options(options, max_limit=False)  # from 25.10 the model refused a larger limit already
    order_by = options.get("order_by") or []
    result = [e for e in entries if all(_match(e, f) for f in filters or [])]
    if options.get("get") and not order_by and filters:
        if not result:
            raise MatchNotFound()
        result = result[:1]
    select = options.get("select")
    if select:
        result = _select(result, select)
    if options.get("count") is True:
        return len(result)
    result = _order(result, order_by)
    if options.get("get") is True:
        if not result:
            raise MatchNotFound()
        return result[0]
    if options.get("offset"):
        result = result[options["offset"] :]
    if options.get("limit"):
        return result[: options["limit"]]
    return result


QUERY_OPTION_KEYS = frozenset({"extra", "order_by", "select", "count", "get", "offset", "limit", "force_sql_filters"})
"""``QueryOptions``' fields from api/v25_10_0/common.py (and v26_0_0); the 25.04 models
(api/v25_04_0, v25_04_2 common.py) also have the four below."""
QUERY_OPTION_KEYS_25_04 = QUERY_OPTION_KEYS | {"relationships", "extend", "extend_context", "prefix"}


def check_query_args(params: list[Any], schema: str) -> tuple[list[Any], dict[str, Any]]:
    """Validates ``[filters, options]`` as ``QueryArgs`` (fields ``filters`` and ``options``) does for
    the API ``schema`` (``v25_04_2``, ``v25_10_0``, ...): its errors are located at ``filters`` and
    ``options.<key>`` (api/base/handler/accept.py joins pydantic's location; no method name). From
    25.10 the options model validates their combination too (``validate_options``)."""
    filters = params[0] if params else []
    options = params[1] if len(params) > 1 else {}
    errors = ValidationErrors()
    older = schema.startswith("v25_04")
    if not isinstance(filters, list):
        errors.add("filters", "Input should be a valid list")
    if not isinstance(options, dict):
        errors.add("options", "Input should be a valid dictionary")
    else:
        for key in options:
            if key not in (QUERY_OPTION_KEYS_25_04 if older else QUERY_OPTION_KEYS):
                errors.add(f"options.{key}", "Extra inputs are not permitted")
    errors.check()
    if not older:
        try:
            validate_options(options)
        except ValueError as exc:
            raise ValidationErrors([("options", f"Value error, {exc}", errno.EINVAL)]) from None
    return filters, options
