"""The Argo CD health check (Lua), run with Debian's Lua 5.4 against sample IncusInstances."""

from __future__ import annotations

import re
import shutil
import subprocess
from typing import Any

import pytest

from .conftest import ROOT

SCRIPT = ROOT / "charts" / "truenas-incus-operator" / "docs" / "argocd-health.lua"
DOC = SCRIPT.with_name("argocd-health.md")


def lua_value(value: Any) -> str:
    """A Lua table constructor for a JSON-like value (None -> nil, so keys vanish as in Argo CD)."""
    if value is None:
        return "nil"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        return f'"{escaped}"'
    if isinstance(value, list):
        return "{" + ", ".join(lua_value(v) for v in value) + "}"
    return "{" + ", ".join(f"[{lua_value(k)}] = {lua_value(v)}" for k, v in value.items()) + "}"


def health(obj: dict[str, Any]) -> tuple[str, str]:
    lua = shutil.which("lua5.4")
    assert lua, "lua5.4 is missing: tools/bootstrap.sh installs it (apt-get install lua5.4)"
    program = f'obj = {lua_value(obj)}\nlocal hs = dofile("{SCRIPT}")\nio.write(hs.status, "\\t", hs.message)'
    result = subprocess.run([lua, "-"], input=program, capture_output=True, text=True, check=True)
    status, _, message = result.stdout.partition("\t")
    return status, message


def instance(
    status: dict[str, Any] | None = None, spec: dict[str, Any] | None = None, **metadata: Any
) -> dict[str, Any]:
    return {
        "apiVersion": "incus.truenas.io/v1alpha1",
        "kind": "IncusInstance",
        "metadata": {"name": "web01", "namespace": "apps", "generation": 1, **metadata},
        "spec": {"type": "CONTAINER", "image": "debian/bookworm", **(spec or {})},
        "status": status,
    }


def conditions(
    ready: tuple[str, str, str], synced: tuple[str, str, str] = ("True", "ReconcileSuccess", "in sync")
) -> list[Any]:
    return [
        {"type": "Ready", "status": ready[0], "reason": ready[1], "message": ready[2]},
        {"type": "Synced", "status": synced[0], "reason": synced[1], "message": synced[2]},
    ]


CASES = [
    ("no-status-yet", instance(), "Progressing", "Waiting for the operator"),
    (
        "running",
        instance(
            {"phase": "Running", "observedGeneration": 1, "conditions": conditions(("True", "Available", "running"))}
        ),
        "Healthy",
        "running",
    ),
    (
        "creating",
        instance(
            {
                "phase": "Creating",
                "observedGeneration": 1,
                "conditions": conditions(("False", "Creating", "being created")),
            }
        ),
        "Progressing",
        "Creating: being created",
    ),
    (
        "starting",
        instance(
            {"phase": "Starting", "observedGeneration": 1, "conditions": conditions(("False", "Starting", "starting"))}
        ),
        "Progressing",
        "Starting: starting",
    ),
    (
        "validation-failed",
        instance(
            {
                "phase": "Error",
                "observedGeneration": 1,
                "conditions": conditions(
                    ("False", "NotFound", "missing"),
                    (
                        "False",
                        "ValidationFailed",
                        "virt_instance_create.memory: Cannot reserve more than physical memory",
                    ),
                ),
            }
        ),
        "Degraded",
        "ValidationFailed: virt_instance_create.memory: Cannot reserve more than physical memory",
    ),
    (
        "stopped-as-asked",
        instance(
            {"phase": "Stopped", "observedGeneration": 1, "conditions": conditions(("True", "Stopped", "stopped"))},
            {"powerState": "Stopped"},
        ),
        "Suspended",
        "Stopped, as spec.powerState asks",
    ),
    (
        "stopped-out-of-band",
        instance(
            {
                "phase": "Stopped",
                "observedGeneration": 1,
                "conditions": conditions(("False", "NotRunning", "TrueNAS reports STOPPED")),
            }
        ),
        "Progressing",
        "Stopped: TrueNAS reports STOPPED",
    ),
    (
        "stopping-towards-stopped",
        instance(
            {"phase": "Stopping", "observedGeneration": 2, "conditions": conditions(("False", "Stopping", "stopping"))},
            {"powerState": "Stopped"},
            generation=2,
        ),
        "Progressing",
        "Stopping: stopping",
    ),
    (
        "spec-not-yet-acted-on",
        instance(
            {"phase": "Running", "observedGeneration": 1, "conditions": conditions(("True", "Available", "running"))},
            generation=2,
        ),
        "Progressing",
        "Waiting for the operator to apply generation 2",
    ),
    (
        "deleting",
        instance(
            {"phase": "Deleting", "observedGeneration": 1, "conditions": conditions(("False", "Deleting", "deleting"))},
            deletionTimestamp="2026-11-26T10:00:00Z",
        ),
        "Progressing",
        "Deleting the instance on TrueNAS",
    ),
    (
        "delete-refused",
        instance(
            {
                "phase": "Deleting",
                "observedGeneration": 1,
                "conditions": conditions(("False", "NotSynced", "x"), ("False", "DeleteFailed", "CallFailed: busy")),
            },
            deletionTimestamp="2026-11-26T10:00:00Z",
        ),
        "Degraded",
        "DeleteFailed: CallFailed: busy",
    ),
    (
        "manual-power",
        instance(
            {
                "phase": "Stopped",
                "observedGeneration": 1,
                "conditions": conditions(("True", "Manual", "power left alone")),
            },
            {"powerState": "Manual"},
        ),
        "Healthy",
        "power left alone",
    ),
    (
        "not-ours",
        instance(
            {
                "phase": "Error",
                "observedGeneration": 1,
                "conditions": conditions(("False", "NotFound", "x"), ("False", "AlreadyExists", "exists")),
            }
        ),
        "Degraded",
        "AlreadyExists: exists",
    ),
]


@pytest.mark.parametrize("obj,expected_status,expected_message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_health(obj: dict[str, Any], expected_status: str, expected_message: str) -> None:
    assert health(obj) == (expected_status, expected_message)


def test_doc_embeds_the_tested_script() -> None:
    doc = DOC.read_text()
    block = re.search(r"resource\.customizations\.health\.incus\.truenas\.io_IncusInstance: \|\n(.*?)```", doc, re.S)
    assert block, "the argocd-cm snippet is missing"
    embedded = "\n".join(line[4:] for line in block.group(1).rstrip().splitlines())
    assert embedded.strip() == SCRIPT.read_text().strip()
