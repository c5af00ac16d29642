"""The Argo CD health check (resource_customizations/incus.truenas.io/IncusInstance) in Argo CD's
own Lua runtime (tools/argocd-health: gopher-lua as Argo CD pins it), on the captured objects of
health_test.yaml, in both ways Argo CD runs it; and the harness itself against Argo CD's rules."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from .argocd import (
    CHECK_DIR,
    HEALTH_TESTS,
    MODES,
    SCRIPT,
    TESTDATA,
    binary,
    expected_health,
    health,
    run_health_tests,
)
from .conftest import ROOT

pytestmark = pytest.mark.e2e  # needs Argo CD's Lua runtime, a Go build (tools/argocd-health)

DOC = ROOT / "charts" / "truenas-incus-operator" / "docs" / "argocd-health.md"
CASES = sorted(expected_health())


@pytest.fixture(scope="module")
def runs() -> dict[str, tuple[int, dict[str, dict[str, Any]]]]:
    return {mode: run_health_tests(mode) for mode in MODES}


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("input_path", CASES)
def test_health_test_yaml(runs: dict[str, tuple[int, dict[str, dict[str, Any]]]], mode: str, input_path: str) -> None:
    result = runs[mode][1][input_path]
    assert result["actual"] == result["expected"] == expected_health()[input_path]


@pytest.mark.parametrize("mode", sorted(MODES))
def test_the_harness_fails_on_a_wrong_expectation(mode: str, tmp_path: Path) -> None:
    """The runner behind test_health_test_yaml does report a mismatch (exit 1, ok false)."""
    (tmp_path / "testdata").mkdir()
    first = CASES[0]
    (tmp_path / first).write_text((CHECK_DIR / first).read_text())
    tests = {"tests": [{"healthStatus": {"status": "Healthy", "message": "surely not"}, "inputPath": first}]}
    (tmp_path / "health_test.yaml").write_text(yaml.safe_dump(tests))
    out = subprocess.run(
        [str(binary()), *MODES[mode], "-script", str(SCRIPT), "-tests", str(tmp_path / "health_test.yaml")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 1 and '"ok":false' in out.stdout, out


def test_every_testdata_file_has_a_case() -> None:
    files = sorted(f"testdata/{p.name}" for p in TESTDATA.glob("*.yaml"))
    assert files == CASES
    listed = [t["inputPath"] for t in yaml.safe_load(HEALTH_TESTS.read_text())["tests"]]
    assert len(listed) == len(set(listed)), "a case is listed twice"


def test_doc_embeds_the_tested_script() -> None:
    doc = DOC.read_text()
    block = re.search(r"resource\.customizations\.health\.incus\.truenas\.io_IncusInstance: \|\n(.*?)```", doc, re.S)
    assert block, "the argocd-cm snippet is missing"
    embedded = "\n".join(line[4:] for line in block.group(1).rstrip().splitlines())
    assert embedded.strip() == SCRIPT.read_text().strip()


# ----- the harness is Argo CD's runtime, not any Lua -------------------------------------------------------
def obj(**metadata: Any) -> dict[str, Any]:
    return {
        "apiVersion": "incus.truenas.io/v1alpha1",
        "kind": "IncusInstance",
        "metadata": {"name": "web01", "namespace": "apps", "generation": 1, **metadata},
        "spec": {"type": "CONTAINER", "image": "debian/bookworm"},
    }


HEALTHY = 'return {status = "Healthy", message = "script ran"}'


@pytest.mark.parametrize("mode", sorted(MODES))
def test_deletion_is_pending_before_any_script(mode: str) -> None:
    """gitops-engine GetResourceHealth: deletionTimestamp set -> Progressing "Pending deletion"."""
    deleting = obj(deletionTimestamp="2026-11-26T10:00:00Z", finalizers=["incus.truenas.io/finalizer"])
    assert health(deleting, HEALTHY, mode) == {"status": "Progressing", "message": "Pending deletion"}
    assert health(deleting, SCRIPT, mode) == {"status": "Progressing", "message": "Pending deletion"}
    # ... except for an Argo CD hook that still carries the hook finalizer.
    hook = obj(deletionTimestamp="2026-11-26T10:00:00Z", finalizers=["argocd.argoproj.io/hook-finalizer"])
    assert health(hook, HEALTHY, mode) == {"status": "Healthy", "message": "script ran"}


def test_argocd_cm_scripts_have_no_string_library() -> None:
    """argocd-cm without useOpenLibs: only package, base, table and a safe os (via require)."""
    script = 'return {status = "Healthy", message = string.format("%s", "x")}'
    result = health(obj(), script, "argocd-cm")
    assert result is not None and result["status"] == "Unknown"
    assert "attempt to index a non-table object(nil) with key 'format'" in result["message"]
    assert health(obj(), script, "built-in") == {"status": "Healthy", "message": "x"}
    probe = 'return {status = "Healthy", message = type(os) .. " " .. type(require("os").time) .. " " .. type(ipairs)}'
    assert health(obj(), probe, "argocd-cm") == {"status": "Healthy", "message": "nil function function"}


@pytest.mark.parametrize("mode", sorted(MODES))
def test_lua_5_1_with_nulls_dropped_and_float_numbers(mode: str) -> None:
    """gopher-lua is Lua 5.1 (unpack, no table.unpack); decodeValue drops null array items."""
    probe = (
        'return {status = "Healthy", message = tostring(unpack ~= nil and table.unpack == nil) .. " "'
        ' .. #obj.items .. " " .. obj.items[2] .. " " .. obj.n / 2 .. " " .. tostring(obj.gone)}'
    )
    value = {**obj(), "items": ["a", None, "b"], "n": 3, "gone": None}
    assert health(value, probe, mode) == {"status": "Healthy", "message": "true 2 b 1.5 nil"}


@pytest.mark.parametrize(
    "script,expected",
    [
        ('return {status = "Fine"}', {"status": "Unknown", "message": "Lua returned an invalid health status"}),
        ('return "Healthy"', {"status": "Unknown", "message": "expect table output from Lua script, not string"}),
        ("return {}", {}),
        ("return nil", {}),
        ('return {status = "Degraded"}', {"status": "Degraded"}),
        ('error("boom")', {"status": "Unknown", "message": "<string>:1: boom"}),
    ],
)
def test_result_handling(script: str, expected: dict[str, str]) -> None:
    """util/lua/lua.go ExecuteHealthLua: how the returned value becomes {status, message}."""
    assert health(obj(), script) == expected
