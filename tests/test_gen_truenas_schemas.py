"""tools/gen_truenas_schemas.py's post-processing (the generator itself runs by hand against a middleware
checkout; these are the steps it applies to every model_json_schema())."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Annotated, Any

from pydantic import AfterValidator

import gen_truenas_schemas as gen


def test_refs_are_inlined_and_discriminators_reduced() -> None:
    raw: dict[str, Any] = {
        "$defs": {"A": {"properties": {"dtype": {"const": "A"}}, "title": "A"}},
        "properties": {
            "attributes": {
                "oneOf": [{"$ref": "#/$defs/A"}],
                "discriminator": {"propertyName": "dtype", "mapping": {"A": "#/$defs/A"}},
            }
        },
    }
    out = gen.inline(raw, raw["$defs"])
    assert "$defs" not in out
    assert out["properties"]["attributes"] == {
        "oneOf": [{"properties": {"dtype": {"const": "A"}}, "title": "A"}],
        "discriminator": {"propertyName": "dtype"},
    }


def test_update_schemas_lose_required_and_defaults() -> None:
    schema = {"required": ["name"], "properties": {"name": {"type": "string", "default": "x"}}}
    assert gen.strip_update(schema) == {"properties": {"name": {"type": "string"}}}


def test_a_match_validator_becomes_a_pattern_with_pydantics_wording() -> None:
    def match_validator(pattern: re.Pattern[str], explanation: str) -> Callable[[str], str]:  # the middleware's
        def validator(value: str) -> str:
            assert pattern.match(value), explanation
            return value

        return validator

    mac = Annotated[str, AfterValidator(match_validator(re.compile(r"^[0-9a-f]{2}\Z"), "two hex digits")), "x"]
    pattern = gen.validator_pattern(mac)
    assert pattern == (r"^[0-9a-f]{2}\Z", "two hex digits")
    schema = {"properties": {"mac": {"anyOf": [{"type": "string"}, {"type": "null"}]}}}
    out = gen.add_validator_patterns(schema, {"mac": (*pattern, True)})
    assert out["properties"]["mac"]["anyOf"][0] == {
        "type": "string",
        "pattern": r"^[0-9a-f]{2}\Z",
        "x-error": "two hex digits",
        "x-error-kind": "assertion",
        "x-lowercase": True,
    }


def test_hints_carry_over_where_the_path_still_exists() -> None:
    schema: dict[str, Any] = {
        "properties": {"memory": {"type": "integer"}},
        "oneOf": [{"title": "B", "properties": {}}, {"title": "A", "properties": {"size": {}}}],
    }
    hints = {
        "x-source": "old",
        "x-note": "kept",
        "properties": {"memory": {"x-unit": "MiB"}, "gone": {"x-unit": "bytes"}},
        "oneOf": [{"title": "A", "properties": {"size": {"x-unit": "bytes"}}}],
    }
    gen.carry_hints(schema, hints)
    assert schema["x-note"] == "kept" and "x-source" not in schema
    assert schema["properties"] == {"memory": {"type": "integer", "x-unit": "MiB"}}
    assert schema["oneOf"][1]["properties"]["size"] == {"x-unit": "bytes"}  # matched by title, not index
