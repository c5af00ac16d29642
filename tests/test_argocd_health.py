"""The Argo CD health checks (resource_customizations/incus.truenas.io/<Kind>, one per kind) in Argo
CD's own Lua runtime (tools/argocd-health: gopher-lua as Argo CD pins it), on the objects of each
kind's health_test.yaml, in both ways Argo CD runs them; and the harness itself against Argo CD's
rules."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from .argocd import CHECKS, GROUP, MODES, Check, binary, health, run_health_tests
from .conftest import ROOT

pytestmark = pytest.mark.e2e  # needs Argo CD's Lua runtime, a Go build (tools/argocd-health)

DOC = ROOT / "charts" / "truenas-incus-operator" / "docs" / "argocd-health.md"
KINDS = sorted(CHECKS)
CASES = [(kind, input_path) for kind in KINDS for input_path in sorted(CHECKS[kind].expected_health())]
Runs = dict[tuple[str, str], tuple[int, dict[str, dict[str, Any]]]]


def crd_kinds() -> dict[str, dict[str, Any]]:
    """The group's CRDs in crds/, by kind."""
    crds = (yaml.safe_load(p.read_text()) for p in sorted((ROOT / "crds").glob("*.yaml")))
    return {crd["spec"]["names"]["kind"]: crd for crd in crds if crd["spec"]["group"] == GROUP}


@pytest.fixture(scope="module")
def runs() -> Runs:
    return {(kind, mode): run_health_tests(CHECKS[kind], mode) for kind in KINDS for mode in MODES}


def test_the_checks_found_are_the_expected_kinds() -> None:
    """Every kind directory is tested; losing one (a rename, a bad glob) must not pass quietly."""
    assert KINDS == ["IncusInstance", "IncusInstanceRestore", "IncusInstanceSnapshot"]


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_directory_is_a_check_of_a_crd_kind(kind: str) -> None:
    check = CHECKS[kind]
    assert check.script.is_file() and check.health_tests.is_file() and check.testdata.is_dir()
    assert kind in crd_kinds(), f"{kind} is not a kind of a CRD in crds/"


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("kind,input_path", CASES, ids=[f"{k}:{p}" for k, p in CASES])
def test_health_test_yaml(runs: Runs, kind: str, mode: str, input_path: str) -> None:
    result = runs[kind, mode][1][input_path]
    assert result["actual"] == result["expected"] == CHECKS[kind].expected_health()[input_path]


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("kind", KINDS)
def test_every_case_passes_and_nothing_else_runs(runs: Runs, kind: str, mode: str) -> None:
    status, results = runs[kind, mode]
    assert status == 0 and sorted(results) == sorted(CHECKS[kind].expected_health())


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("kind", KINDS)
def test_the_harness_fails_on_a_wrong_expectation(kind: str, mode: str, tmp_path: Path) -> None:
    """The runner behind test_health_test_yaml does report a mismatch (exit 1, ok false)."""
    check = CHECKS[kind]
    (tmp_path / "testdata").mkdir()
    first = sorted(check.expected_health())[0]
    (tmp_path / first).write_text((check.dir / first).read_text())
    tests = {"tests": [{"healthStatus": {"status": "Healthy", "message": "surely not"}, "inputPath": first}]}
    (tmp_path / "health_test.yaml").write_text(yaml.safe_dump(tests))
    out = subprocess.run(
        [str(binary()), *MODES[mode], "-script", str(check.script), "-tests", str(tmp_path / "health_test.yaml")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 1 and '"ok":false' in out.stdout, out


@pytest.mark.parametrize("kind", KINDS)
def test_every_testdata_file_has_a_case(kind: str) -> None:
    check = CHECKS[kind]
    files = sorted(f"testdata/{p.name}" for p in check.testdata.glob("*.yaml"))
    assert files == sorted(check.expected_health())
    listed = [t["inputPath"] for t in yaml.safe_load(check.health_tests.read_text())["tests"]]
    assert len(listed) == len(set(listed)), "a case is listed twice"


@pytest.mark.parametrize("kind", KINDS)
def test_testdata_are_objects_the_crd_accepts(kind: str) -> None:
    """Each testdata object is of its check's kind, and its spec and status fit the CRD's schema
    (hand-written objects cannot show a field the API server would drop, nor a value or length it
    would refuse). The
    testdata leave out what changes from run to run (test_argocd_fixtures.normalized), among it the
    conditions' required lastTransitionTime: put back for the check."""
    check = CHECKS[kind]
    root = crd_kinds()[kind]["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]
    validators = {part: jsonschema.Draft7Validator(pruning(root[part])) for part in ("spec", "status")}
    for path in sorted(check.testdata.glob("*.yaml")):
        obj = yaml.safe_load(path.read_text())
        assert (obj["apiVersion"], obj["kind"]) == (f"{GROUP}/v1alpha1", kind), path.name
        for condition in obj.get("status", {}).get("conditions", []):
            condition.setdefault("lastTransitionTime", "2026-01-01T00:00:00Z")
        for part, validator in validators.items():
            errors = [e.message[:120] for e in validator.iter_errors(obj.get(part, {}))]
            assert not errors, f"{path.name} {part}: {errors}"


def pruning(schema: Any) -> Any:
    """``schema`` with the API server's pruning as refusals: an object schema with properties and no
    additionalProperties (nor x-kubernetes-preserve-unknown-fields) takes no other field."""
    if isinstance(schema, list):
        return [pruning(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    closed = {key: pruning(value) for key, value in schema.items()}
    if "properties" in closed and "additionalProperties" not in closed:
        closed.setdefault("additionalProperties", bool(closed.get("x-kubernetes-preserve-unknown-fields")))
    return closed


def embedded(doc: str, check: Check) -> str:
    """The script under the check's argocd-cm key in the doc: the key's indented block, unindented."""
    found = re.findall(rf"^  {re.escape(check.argocd_cm_key)}: \|\n((?:(?:    .*)?\n)+)", doc, re.M)
    assert len(found) == 1, f"the doc has {len(found)} argocd-cm entries {check.argocd_cm_key}"
    return "\n".join(line[4:] for line in found[0].splitlines()).strip()


@pytest.mark.parametrize("kind", KINDS)
def test_doc_embeds_the_tested_script(kind: str) -> None:
    assert embedded(DOC.read_text(), CHECKS[kind]) == CHECKS[kind].script.read_text().strip()


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
    assert health(deleting, mode=mode) == {"status": "Progressing", "message": "Pending deletion"}
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
def test_length_operator_without_the_string_library(mode: str) -> None:
    """The checks bound relayed messages with ``#`` (no string.sub in argocd-cm): it counts bytes."""
    probe = 'return {status = "Healthy", message = #obj.metadata.name .. " " .. #obj.metadata.finalizers}'
    assert health(obj(name="wébé", finalizers=["a", "b"]), probe, mode) == {"status": "Healthy", "message": "6 2"}


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
