"""Builds the CRD manifests in ``crds/`` from the Pydantic models in ``models/``.

Pydantic's JSON schema is turned into a structural OpenAPI v3 schema as the API server wants it:
``$ref`` inlined, ``anyOf [X, null]`` folded into ``nullable: true``, ``int | str`` into
``x-kubernetes-int-or-string``, free-form objects into ``x-kubernetes-preserve-unknown-fields``,
no ``default``/``title``/``additionalProperties: false``.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from .models import (
    API_GROUP,
    API_VERSION,
    INSTANCE_ROOT_RULES,
    RESTORE_ROOT_RULES,
    SNAPSHOT_ROOT_RULES,
    IncusInstanceRestoreSpec,
    IncusInstanceRestoreStatus,
    IncusInstanceSnapshotSpec,
    IncusInstanceSnapshotStatus,
    IncusInstanceSpec,
    IncusInstanceStatus,
    TrueNASConnectionSpec,
    TrueNASConnectionStatus,
)

_DROP = {"title", "default", "$defs"}


def _inline(node: Any, defs: dict[str, Any]) -> Any:
    if isinstance(node, list):
        return [_inline(item, defs) for item in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        target = copy.deepcopy(defs[node["$ref"].rsplit("/", 1)[-1]])
        merged = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
        return _inline(merged, defs)
    return {key: _inline(value, defs) for key, value in node.items() if key not in _DROP}


def _structural(node: Any) -> Any:
    """Rewrites one inlined JSON-schema node (recursively) into CRD-structural form."""
    if isinstance(node, list):
        return [_structural(item) for item in node]
    if not isinstance(node, dict):
        return node
    node = dict(node)
    if node.get("x-kubernetes-int-or-string"):
        node.pop("anyOf", None)
        return {k: _structural(v) for k, v in node.items()}
    if "anyOf" in node:
        branches = node.pop("anyOf")
        non_null = [b for b in branches if b.get("type") != "null"]
        if len(non_null) != len(branches):
            node["nullable"] = True
        if len(non_null) != 1:
            raise ValueError(f"cannot express anyOf {branches!r} structurally; annotate the field")
        node = {**non_null[0], **node}
    if "const" in node:
        node["enum"] = [node.pop("const")]
    if node.get("additionalProperties") is False:
        del node["additionalProperties"]
    if node.get("x-kubernetes-preserve-unknown-fields") or node.get("additionalProperties") is True:
        node.pop("additionalProperties", None)
        node["type"] = "object"
        node["x-kubernetes-preserve-unknown-fields"] = True
    return {key: _structural(value) for key, value in node.items()}


def schema_of(model: type[BaseModel]) -> dict[str, Any]:
    raw = model.model_json_schema(by_alias=True)
    result: dict[str, Any] = _structural(_inline(raw, raw.get("$defs", {})))
    return result


def _root_schema(
    spec: type[BaseModel], status: type[BaseModel], description: str, rules: list[Any] | None = None
) -> dict[str, Any]:
    root: dict[str, Any] = {
        "type": "object",
        "description": description,
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string", "description": "APIVersion of this representation of the object."},
            "kind": {"type": "string", "description": "Kind of this object."},
            "metadata": {"type": "object"},
            "spec": schema_of(spec),
            "status": schema_of(status),
        },
    }
    if rules:
        root["x-kubernetes-validations"] = rules
    return root


def _crd(
    kind: str,
    plural: str,
    short_names: list[str],
    schema: dict[str, Any],
    columns: list[dict[str, Any]],
) -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{plural}.{API_GROUP}",
            "labels": {
                "app.kubernetes.io/name": "truenas-incus-operator",
                "app.kubernetes.io/part-of": "truenas-incus-operator",
            },
        },
        "spec": {
            "group": API_GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": kind,
                "listKind": f"{kind}List",
                "plural": plural,
                "singular": kind.lower(),
                "shortNames": short_names,
                "categories": ["truenas"],
            },
            "versions": [
                {
                    "name": API_VERSION,
                    "served": True,
                    "storage": True,
                    "schema": {"openAPIV3Schema": schema},
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": columns,
                }
            ],
        },
    }


def incus_instance_crd() -> dict[str, Any]:
    ready = '.status.conditions[?(@.type=="Ready")].status'
    return _crd(
        "IncusInstance",
        "incusinstances",
        ["ii", "incus"],
        _root_schema(
            IncusInstanceSpec,
            IncusInstanceStatus,
            "An Incus instance (container or VM) on TrueNAS, owned by this cluster.",
            INSTANCE_ROOT_RULES,
        ),
        [
            {"name": "Type", "type": "string", "jsonPath": ".spec.type"},
            {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
            {"name": "CPU", "type": "string", "jsonPath": ".status.cpu"},
            {"name": "Memory", "type": "string", "jsonPath": ".status.memory"},
            {"name": "Autostart", "type": "boolean", "jsonPath": ".status.autostart"},
            {"name": "IP", "type": "string", "jsonPath": ".status.addresses[0].address"},
            {"name": "Ready", "type": "string", "jsonPath": ready},
            {"name": "Synced", "type": "string", "jsonPath": '.status.conditions[?(@.type=="Synced")].status'},
            {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
        ],
    )


def truenas_connection_crd() -> dict[str, Any]:
    ready = '.status.conditions[?(@.type=="Ready")].status'
    return _crd(
        "TrueNASConnection",
        "truenasconnections",
        ["tnc"],
        _root_schema(
            TrueNASConnectionSpec,
            TrueNASConnectionStatus,
            "A TrueNAS system that IncusInstances in this namespace can use.",
        ),
        [
            {"name": "URL", "type": "string", "jsonPath": ".spec.url"},
            {"name": "Version", "type": "string", "jsonPath": ".status.version"},
            {"name": "API", "type": "string", "jsonPath": ".status.apiFamily"},
            {"name": "Ready", "type": "string", "jsonPath": ready},
            {"name": "Secure", "type": "string", "jsonPath": '.status.conditions[?(@.type=="Secure")].status'},
            {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
        ],
    )


def incus_instance_snapshot_crd() -> dict[str, Any]:
    ready = '.status.conditions[?(@.type=="Ready")].status'
    return _crd(
        "IncusInstanceSnapshot",
        "incusinstancesnapshots",
        ["iis"],
        _root_schema(
            IncusInstanceSnapshotSpec,
            IncusInstanceSnapshotStatus,
            "An atomic ZFS snapshot of everything one IncusInstance owns on TrueNAS.",
            SNAPSHOT_ROOT_RULES,
        ),
        [
            {"name": "Instance", "type": "string", "jsonPath": ".spec.instanceRef.name"},
            {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
            {"name": "Snapshot", "type": "string", "jsonPath": ".status.snapshotName"},
            {"name": "Used", "type": "integer", "jsonPath": ".status.usedBytes"},
            {"name": "Consistency", "type": "string", "jsonPath": ".status.consistency"},
            {"name": "Ready", "type": "string", "jsonPath": ready},
            {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
        ],
    )


def incus_instance_restore_crd() -> dict[str, Any]:
    ready = '.status.conditions[?(@.type=="Ready")].status'
    return _crd(
        "IncusInstanceRestore",
        "incusinstancerestores",
        ["iir"],
        _root_schema(
            IncusInstanceRestoreSpec,
            IncusInstanceRestoreStatus,
            "Rolls an IncusInstance back to one of its snapshots, once; the IncusInstance's spec is never changed.",
            RESTORE_ROOT_RULES,
        ),
        [
            {"name": "Instance", "type": "string", "jsonPath": ".spec.instanceRef.name"},
            {"name": "Snapshot", "type": "string", "jsonPath": ".status.snapshotName"},
            {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
            {"name": "Ready", "type": "string", "jsonPath": ready},
            {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
        ],
    )


def all_crds() -> list[dict[str, Any]]:
    return [incus_instance_crd(), truenas_connection_crd(), incus_instance_snapshot_crd(), incus_instance_restore_crd()]


def render(crd: dict[str, Any]) -> str:
    header = "# Generated by `python -m truenas_incus_operator crd` from models/. Do not edit.\n"
    return header + yaml.safe_dump(crd, sort_keys=False, width=120)


def write_crds(directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for crd in all_crds():
        path = directory / f"{crd['metadata']['name']}.yaml"
        path.write_text(render(crd))
        written.append(path)
    return written
