#!/usr/bin/env python3
"""Generate the simulator's ``vm.*`` / ``container.*`` JSON Schemas from a truenas/middleware checkout.

Run by hand (not in CI), with a Python that can parse the middleware (3.12 for 27's ``model.py``) and the
pydantic the middleware pins (the 26 files were made with 2.14.4)::

    python3.12 -m venv /tmp/gen && /tmp/gen/bin/pip install pydantic==2.14.4
    git -C <mirror> archive <ref> src/middlewared/middlewared | tar -x -C /tmp/mw-<ref>
    /tmp/gen/bin/python tools/gen_truenas_schemas.py /tmp/mw-<ref>/src/middlewared v27_0_0 \\
        --source "truenas/middleware master (66d9e1b9c3)" \\
        --hints operator/truenas_simulator/schemas/v26_0_0 --out operator/truenas_simulator/schemas

Nothing of the middleware is copied into this repository: the model files are imported from the checkout
under a stub ``middlewared`` package whose ``api.base`` is assembled from the checkout's own ``model.py``,
``excluded.py``, ``private.py``, ``types/{string,network,json_schema}.py`` and ``validators/base.py`` (what
``string.py`` imports for other types, zettarepl and the SMB/NetBIOS checks, is stubbed out: no model used
here refers to it). Then ``model_json_schema()`` per file, and the post-processing of
shared/reference/truenas-schemas/README.md:

* ``$ref``s inlined, ``$defs`` dropped; ``discriminator`` reduced to ``{propertyName}``;
* update schemas (``*.update.args``): ``required`` and ``default`` removed (PATCH semantics);
* AfterValidator regexes (``MACAddress``: ``match_validator``) written as ``pattern`` + ``x-error``
  (+ ``x-error-kind: assertion``, pydantic's "Assertion failed, ..." wording) + ``x-lowercase``;
* hand-written hints (``x-unit``, ``x-note``, ``x-business-rule``, ...) carried over from ``--hints``
  (the previous version's files) at the same JSON path, where that path still exists.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import shutil
import sys
import tempfile
import typing
from pathlib import Path
from typing import Any

BASE_FILES = (
    "model.py",
    "excluded.py",
    "private.py",
    "types/string.py",
    "types/network.py",
    "types/json_schema.py",
    "validators/base.py",
)
MODEL_FILES = ("vm.py", "vm_device.py", "container.py", "container_device.py", "container_image.py")

STUBS = {
    "middlewared/__init__.py": "",
    "middlewared/api/__init__.py": "",
    "middlewared/utils/__init__.py": "",
    "middlewared/utils/netbios.py": "def validate_netbios_domain(v):\n    return v\n\n\n"
    "def validate_netbios_name(v):\n    return v\n",
    "middlewared/utils/smb.py": "def validate_smb_share_name(v):\n    return v\n",
    "zettarepl/__init__.py": "",
    "zettarepl/snapshot/__init__.py": "",
    "zettarepl/snapshot/name.py": "def validate_snapshot_naming_schema(v):\n    return v\n",
    "middlewared/api/base/types/__init__.py": "",
    "middlewared/api/base/validators/__init__.py": "from .base import *  # noqa\n",
    "middlewared/api/base/__init__.py": (
        "from .model import *  # noqa\nfrom .excluded import *  # noqa\nfrom .private import *  # noqa\n"
        "from .types.string import *  # noqa\nfrom .types.network import *  # noqa\n"
        "from .types.json_schema import *  # noqa\n"
    ),
}

HINT_KEYS_SKIPPED = ("x-source", "x-generated-by")


def build_stub(src: Path, version: str, root: Path) -> None:
    """``src`` is ``<checkout>/src/middlewared`` (the folder holding the ``middlewared`` package)."""
    for name, text in STUBS.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    package = src / "middlewared"
    for name in ("utils/lang.py", "utils/typing_.py"):
        if (package / name).exists():
            shutil.copy(package / name, root / "middlewared" / name)
    for name in BASE_FILES:
        shutil.copy(package / "api" / "base" / name, root / "middlewared" / "api" / "base" / name)
    target = root / "middlewared" / "api" / version
    target.mkdir(parents=True)
    (target / "__init__.py").write_text("")
    for name in MODEL_FILES:
        shutil.copy(package / "api" / version / name, target / name)


def inline(schema: Any, defs: dict[str, Any]) -> Any:
    if isinstance(schema, dict):
        if "$ref" in schema:
            target = inline(copy.deepcopy(defs[schema["$ref"].rsplit("/", 1)[-1]]), defs)
            rest = {k: inline(v, defs) for k, v in schema.items() if k != "$ref"}
            return {**target, **rest}
        out = {k: inline(v, defs) for k, v in schema.items() if k != "$defs"}
        if isinstance(out.get("discriminator"), dict):
            out["discriminator"] = {"propertyName": out["discriminator"]["propertyName"]}
        return out
    if isinstance(schema, list):
        return [inline(v, defs) for v in schema]
    return schema


def strip_update(schema: Any) -> Any:
    if isinstance(schema, dict):
        return {k: strip_update(v) for k, v in schema.items() if k not in ("required", "default")}
    if isinstance(schema, list):
        return [strip_update(v) for v in schema]
    return schema


def validator_pattern(annotated: Any) -> tuple[str, str] | None:
    """The regex and explanation of a ``match_validator`` AfterValidator in ``Annotated[...]`` metadata."""
    for meta in typing.get_args(annotated)[1:]:
        func = getattr(meta, "func", None)
        cells = getattr(func, "__closure__", None) or ()
        values = [c.cell_contents for c in cells]
        patterns = [v for v in values if hasattr(v, "pattern")]
        texts = [v for v in values if isinstance(v, str)]
        if patterns:
            return patterns[0].pattern, (texts[0] if texts else "")
    return None


def add_validator_patterns(schema: Any, fields: dict[str, tuple[str, str, bool]]) -> Any:
    """Writes the AfterValidator regex of each field named in ``fields`` onto its string branch."""
    if isinstance(schema, dict):
        out = {k: add_validator_patterns(v, fields) for k, v in schema.items()}
        for name, sub in (out.get("properties") or {}).items():
            if name not in fields:
                continue
            pattern, error, lower = fields[name]
            branches = sub.get("anyOf") or [sub]
            for branch in branches:
                if branch.get("type") == "string" and "pattern" not in branch:
                    branch["pattern"] = pattern
                    branch["x-error"] = error
                    branch["x-error-kind"] = "assertion"
                    if lower:
                        branch["x-lowercase"] = True
        return out
    if isinstance(schema, list):
        return [add_validator_patterns(v, fields) for v in schema]
    return schema


def carry_hints(schema: Any, hints: Any) -> None:
    """Copies ``x-*`` keys of ``hints`` onto ``schema`` where the same path exists (in place)."""
    if isinstance(schema, dict) and isinstance(hints, dict):
        for key, value in hints.items():
            if key.startswith("x-") and key not in HINT_KEYS_SKIPPED and key not in schema:
                schema[key] = copy.deepcopy(value)
            elif key in schema:
                carry_hints(schema[key], value)
    elif isinstance(schema, list) and isinstance(hints, list):
        if all(isinstance(x, dict) and "title" in x for x in schema + hints):
            by_title = {h["title"]: h for h in hints}
            for item in schema:
                if item["title"] in by_title:
                    carry_hints(item, by_title[item["title"]])
        else:
            for item, hint in zip(schema, hints, strict=False):
                carry_hints(item, hint)


def targets(version: str) -> dict[str, tuple[str, str, str | None]]:
    """File stem -> (module, model, field): the field's model when the file describes one argument."""
    return {
        "container.create.args": ("container", "ContainerCreateArgs", "container_create"),
        "container.update.args": ("container", "ContainerUpdateArgs", "container_update"),
        "container.query.entry": ("container", "ContainerEntry", None),
        "container.stop.args": ("container", "ContainerStopArgs", None),
        "container.device.entry": ("container_device", "ContainerDeviceEntry", None),
        "container.image.query_registry.entry": ("container_image", "ContainerImageQueryRegistryResultImage", None),
        "vm.create.args": ("vm", "VMCreateArgs", "vm_create"),
        "vm.update.args": ("vm", "VMUpdateArgs", "vm_update"),
        "vm.query.entry": ("vm", "VMEntry", None),
        "vm.stop.args": ("vm", "VMStopArgs", None),
        "vm.device.entry": ("vm_device", "VMDeviceEntry", None),
        "vm.device.create.args": ("vm_device", "VMDeviceCreateArgs", "vm_device_create"),
    }


def generate(src: Path, version: str, source: str, hints: str | None) -> dict[str, dict[str, Any]]:
    root = Path(tempfile.mkdtemp(prefix="mwstub-"))
    try:
        build_stub(src, version, root)
        sys.path.insert(0, str(root))
        return _generate(version, source, hints)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _generate(version: str, source: str, hints: str | None) -> dict[str, dict[str, Any]]:
    network = importlib.import_module("middlewared.api.base.types.network")
    mac = validator_pattern(network.MACAddress)
    validators = {"mac": (mac[0], mac[1], True)} if mac else {}
    result = {}
    for stem, (module_name, model_name, field) in targets(version).items():
        module = importlib.import_module(f"middlewared.api.{version}.{module_name}")
        model = getattr(module, model_name)
        if field is not None:
            model = model.model_fields[field].annotation
        raw = model.model_json_schema()
        schema = inline(raw, raw.get("$defs", {}))
        if stem.endswith("update.args"):
            schema = strip_update(schema)
        schema = add_validator_patterns(schema, validators)
        schema = {
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "x-source": f"{source} src/middlewared/middlewared/api/{version}/{module_name}.py",
            "x-generated-by": (
                "tools/gen_truenas_schemas.py: pydantic model_json_schema() run on the real model files (BaseModel "
                "config extra=forbid, strict=True, str_max_length=1024); $refs inlined; x-* keys are hints from "
                "service code, carried over from the previous version where the path still exists"
            ),
            **schema,
        }
        if hints:
            hint_file = Path(f"{hints}.{stem}.json")
            if hint_file.exists():
                carry_hints(schema, json.loads(hint_file.read_text()))
        result[stem] = schema
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("src", type=Path, help="<checkout>/src/middlewared")
    parser.add_argument("version", help="API folder, e.g. v27_0_0")
    parser.add_argument("--source", required=True, help="what x-source names, e.g. the tag or commit")
    parser.add_argument("--hints", help="path prefix of the previous version's files, e.g. .../schemas/v26_0_0")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    for stem, schema in generate(args.src, args.version, args.source, args.hints).items():
        path = args.out / f"{args.version}.{stem}.json"
        path.write_text(json.dumps(schema, indent=2, ensure_ascii=False) + "\n")
        print(path)


if __name__ == "__main__":
    main()
