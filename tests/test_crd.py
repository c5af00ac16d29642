"""The generated CRDs: fresh, structural, documented, default-free."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from truenas_incus_operator.crd import all_crds, render

from .conftest import ROOT


def _walk(node: Any, path: str = "") -> list[tuple[str, dict[str, Any]]]:
    found: list[tuple[str, dict[str, Any]]] = []
    if isinstance(node, dict):
        found.append((path, node))
        for key, value in node.get("properties", {}).items():
            found += _walk(value, f"{path}.{key}")
        if isinstance(node.get("items"), dict):
            found += _walk(node["items"], f"{path}[]")
        if isinstance(node.get("additionalProperties"), dict):
            found += _walk(node["additionalProperties"], f"{path}{{}}")
    return found


def _keys(node: Any) -> set[str]:
    if isinstance(node, dict):
        return set(node) | {k for v in node.values() for k in _keys(v)}
    if isinstance(node, list):
        return {k for v in node for k in _keys(v)}
    return set()


@pytest.mark.parametrize("folder", ["crds", "charts/truenas-incus-operator/files/crds"])
def test_crds_folder_is_fresh(folder: str) -> None:
    for crd in all_crds():
        path = ROOT / folder / f"{crd['metadata']['name']}.yaml"
        assert path.exists(), f"{path} missing: run `python -m truenas_incus_operator crd`"
        assert path.read_text() == render(crd), f"{path} is stale: run `python -m truenas_incus_operator crd`"


def test_schema_is_structural_and_documented() -> None:
    for crd in all_crds():
        schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
        keys = _keys(schema)
        for forbidden in ("$ref", "anyOf", "oneOf", "allOf", "default", "title", "$defs", "const"):
            assert forbidden not in keys, f"{forbidden} in {crd['metadata']['name']}"
        assert "additionalProperties: false" not in yaml.safe_dump(schema)
        for path, node in _walk(schema):
            scalar_item = path.endswith(("[]", "{}")) and node.get("type") != "object"
            if path in (".metadata", ".apiVersion", ".kind") or scalar_item:
                continue
            assert node.get("description"), f"{crd['metadata']['name']}: {path} has no description"
            assert "type" in node or node.get("x-kubernetes-int-or-string"), f"{path} has no type"


def test_memory_is_int_or_string_and_extra_is_a_bounded_flat_map() -> None:
    spec = all_crds()[0]["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    assert spec["memory"]["x-kubernetes-int-or-string"] is True
    assert "type" not in spec["memory"]
    extra = spec["devices"]["items"]["properties"]["extra"]
    assert extra["type"] == "object" and extra["maxProperties"] == 8
    values = extra["additionalProperties"]
    assert values["x-kubernetes-int-or-string"] is True and values["maxLength"] == 64
    root = all_crds()[0]["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    preserved = [p for p, n in _walk(root) if n.get("x-kubernetes-preserve-unknown-fields")]
    assert preserved == [], f"no field may keep unknown fields (unbounded): {preserved}"
    assert spec["cpu"]["nullable"] is True


def test_every_string_list_and_map_is_bounded() -> None:
    for crd in all_crds():
        spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
        for path, node in _walk(spec):
            if node.get("type") == "string" and "enum" not in node:
                assert "maxLength" in node, f"{crd['metadata']['name']}: spec{path} has no maxLength"
            if node.get("type") == "array":
                assert "maxItems" in node, f"spec{path} has no maxItems"
            if node.get("type") == "object" and "additionalProperties" in node:
                assert "maxProperties" in node, f"spec{path} has no maxProperties"
            if node.get("x-kubernetes-int-or-string"):
                assert "maxLength" in node, f"spec{path} has no maxLength"


def test_status_subresource_columns_and_short_names() -> None:
    instance, connection, *_ = all_crds()
    version = instance["spec"]["versions"][0]
    assert version["subresources"] == {"status": {}}
    assert [c["name"] for c in version["additionalPrinterColumns"]] == [
        "Type",
        "Phase",
        "CPU",
        "Memory",
        "Autostart",
        "IP",
        "Ready",
        "Synced",
        "Age",
    ]
    assert instance["spec"]["names"]["shortNames"] == ["ii", "incus"]
    assert connection["spec"]["names"]["shortNames"] == ["tnc"]


def test_immutability_rules_present() -> None:
    root = all_crds()[0]["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    rules = root["x-kubernetes-validations"]
    for field in ("name", "type", "image", "storagePool"):
        (rule,) = [r for r in rules if r["message"].startswith(f"spec.{field} is immutable")]
        assert rule["fieldPath"] == f".spec.{field}"
        assert "oldSelf.status" in rule["rule"]
