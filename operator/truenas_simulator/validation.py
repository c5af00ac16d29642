"""Strict validation of payloads against the schemas generated from TrueNAS's own models.

TrueNAS validates with pydantic (``extra="forbid"``, ``strict=True``, ``str_max_length=1024``) and
reports each error as ``<model_name>.<location>: <pydantic message>``. A generic JSON-schema
validator words its errors differently, so this walks the (small) subset of JSON Schema those
files use and produces pydantic's wording. It also fills in defaults, as the model would.
"""

from __future__ import annotations

import copy
import errno
import json
import re
from functools import cache
from importlib import resources
from typing import Any

from .errors import ValidationErrors

STR_MAX_LENGTH = 1024
_MISSING = object()


@cache
def load_schema(name: str) -> dict[str, Any]:
    """A schema file shipped in ``truenas_simulator/schemas`` (e.g. ``v25_10_0.virt.device``)."""
    text = resources.files("truenas_simulator").joinpath("schemas", f"{name}.json").read_text()
    schema: dict[str, Any] = json.loads(text)
    return schema


def _literal(value: Any) -> str:
    return "None" if value is None else repr(value)


def _expected(values: list[Any]) -> str:
    shown = [_literal(v) for v in values]
    if len(shown) == 1:
        return shown[0]
    return ", ".join(shown[:-1]) + " or " + shown[-1]


class _Walker:
    def __init__(self) -> None:
        self.errors: list[tuple[str, str]] = []

    def error(self, loc: list[str], message: str) -> None:
        self.errors.append((".".join(loc), message))

    def walk(self, schema: dict[str, Any], value: Any, loc: list[str]) -> Any:
        if "anyOf" in schema:
            branches = schema["anyOf"]
            nullable = any(b.get("type") == "null" for b in branches)
            if value is None and nullable:
                return None
            others = [b for b in branches if b.get("type") != "null"]
            if len(others) == 1:
                return self.walk(others[0], value, loc)
            for branch in others:  # a real union: first branch that accepts the value wins
                probe = _Walker()
                result = probe.walk(branch, value, loc)
                if not probe.errors:
                    return result
            probe = _Walker()
            probe.walk(others[0], value, loc)
            self.errors.extend(probe.errors)
            return value
        if "oneOf" in schema and "discriminator" in schema:
            return self._tagged(schema, value, loc)
        if "const" in schema:
            if value != schema["const"] or type(value) is not type(schema["const"]):
                self.error(loc, f"Input should be {_literal(schema['const'])}")
            return value
        if "enum" in schema:
            if value not in schema["enum"] or (value is not None and isinstance(value, bool)):
                self.error(loc, f"Input should be {_expected(schema['enum'])}")
            return value
        kind = schema.get("type")
        if kind == "string":
            return self._string(schema, value, loc)
        if kind == "integer":
            if isinstance(value, bool) or not isinstance(value, int):
                self.error(loc, "Input should be a valid integer")
                return value
            return self._bounds(schema, value, loc)
        if kind == "number":
            if isinstance(value, bool) or not isinstance(value, int | float):
                self.error(loc, "Input should be a valid number")
                return value
            return self._bounds(schema, value, loc)
        if kind == "boolean":
            if not isinstance(value, bool):
                self.error(loc, "Input should be a valid boolean")
            return value
        if kind == "null":
            if value is not None:
                self.error(loc, "Input should be None")
            return value
        if kind == "array":
            if not isinstance(value, list):
                self.error(loc, "Input should be a valid list")
                return value
            items = schema.get("items", {})
            return [self.walk(items, item, [*loc, str(i)]) for i, item in enumerate(value)]
        if kind == "object" or "properties" in schema:
            return self._object(schema, value, loc)
        return value

    def _string(self, schema: dict[str, Any], value: Any, loc: list[str]) -> Any:
        if not isinstance(value, str):
            self.error(loc, "Input should be a valid string")
            return value
        minimum = schema.get("minLength")
        maximum = min(schema.get("maxLength", STR_MAX_LENGTH), STR_MAX_LENGTH)
        if minimum is not None and len(value) < minimum:
            unit = "character" if minimum == 1 else "characters"
            self.error(loc, f"String should have at least {minimum} {unit}")
        elif len(value) > maximum:
            self.error(loc, f"String should have at most {maximum} characters")
        elif "pattern" in schema and not re.search(schema["pattern"], value):
            if "x-error" in schema:
                # an AfterValidator's ValueError ("Value error, ...") or assert ("Assertion failed, ...")
                kind = "Assertion failed" if schema.get("x-error-kind") == "assertion" else "Value error"
                self.error(loc, f"{kind}, {schema['x-error']}")
            else:
                self.error(loc, f"String should match pattern '{schema['pattern']}'")
        elif schema.get("x-lowercase"):
            return value.lower()  # AfterValidator(str.lower), e.g. 27's MACAddress
        return value

    def _bounds(self, schema: dict[str, Any], value: int | float, loc: list[str]) -> Any:
        custom = schema.get("x-error")
        if "minimum" in schema and value < schema["minimum"]:
            self.error(
                loc,
                f"Value error, {custom}" if custom else f"Input should be greater than or equal to {schema['minimum']}",
            )
        elif "maximum" in schema and value > schema["maximum"]:
            self.error(
                loc,
                f"Value error, {custom}" if custom else f"Input should be less than or equal to {schema['maximum']}",
            )
        elif "exclusiveMinimum" in schema and value <= schema["exclusiveMinimum"]:
            self.error(loc, f"Input should be greater than {schema['exclusiveMinimum']}")
        elif "exclusiveMaximum" in schema and value >= schema["exclusiveMaximum"]:
            self.error(loc, f"Input should be less than {schema['exclusiveMaximum']}")
        return value

    def _object(self, schema: dict[str, Any], value: Any, loc: list[str]) -> Any:
        if not isinstance(value, dict):
            # A model-typed field (it has properties and a model title) words it as pydantic does.
            model = schema.get("title") if schema.get("properties") else None
            self.error(
                loc,
                f"Input should be a valid dictionary or instance of {model}"
                if model
                else "Input should be a valid dictionary",
            )
            return value
        properties: dict[str, Any] = schema.get("properties", {})
        additional = schema.get("additionalProperties", True)
        result: dict[str, Any] = {}
        if properties or additional is False:
            for name, sub in properties.items():
                if name in value:
                    result[name] = self.walk(sub, value[name], [*loc, name])
                elif name in schema.get("required", []):
                    self.error([*loc, name], "Field required")
                elif "default" in sub:
                    result[name] = copy.deepcopy(sub["default"])
            for name in value:
                if name not in properties:
                    if additional is False:
                        self.error([*loc, name], "Extra inputs are not permitted")
                    else:
                        result[name] = value[name]
            return result
        names = schema.get("propertyNames")
        for key, item in value.items():
            if names is not None:
                self._string({"type": "string", **names}, key, [*loc, str(key), "[key]"])
            result[key] = self.walk(additional, item, [*loc, str(key)]) if isinstance(additional, dict) else item
        return result

    def _tagged(self, schema: dict[str, Any], value: Any, loc: list[str]) -> Any:
        tag = schema["discriminator"]["propertyName"]
        branches = {b["properties"][tag]["const"]: b for b in schema["oneOf"]}
        if not isinstance(value, dict):
            self.error(loc, "Input should be a valid dictionary")
            return value
        if tag not in value:
            self.error(loc, f"Unable to extract tag using discriminator '{tag}'")
            return value
        branch = branches.get(value[tag])
        if branch is None:
            expected = ", ".join(repr(k) for k in branches)
            self.error(
                loc, f"Input tag {value[tag]!r} found using '{tag}' does not match any of the expected tags: {expected}"
            )
            return value
        return self.walk(branch, value, [*loc, str(value[tag])])


def validate(schema: dict[str, Any], value: Any, attribute: str) -> tuple[Any, list[tuple[str, str]]]:
    """Returns the value with defaults filled in, and ``(attribute, message)`` for each error.

    ``attribute`` is the model's name in TrueNAS's errors, e.g. ``virt_instance_create``.
    """
    walker = _Walker()
    result = walker.walk(schema, value, [attribute] if attribute else [])
    return result, walker.errors


def validated(schema: dict[str, Any], value: Any, attribute: str) -> Any:
    """``validate``, raising the errors as TrueNAS does (``ValidationErrors``, each ``EINVAL``).

    Returns the value with defaults filled in when there are none.
    """
    result, errors = validate(schema, value, attribute)
    if errors:
        raise ValidationErrors([(a, m, errno.EINVAL) for a, m in errors])
    return result
