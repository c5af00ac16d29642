"""Argo CD's health checks for this operator's kinds, run in Argo CD's own Lua runtime.

Each kind of the group has its check in ``resource_customizations/incus.truenas.io/<Kind>/``
(``health.lua``, ``health_test.yaml``, ``testdata/``), laid out as Argo CD keeps its built-in ones.
``tools/argocd-health`` (Go) runs ``health.lua`` with gopher-lua at the version Argo CD pins,
the libraries Argo CD opens, its object decoding and result handling, after gitops-engine's own
checks (see the comment at the top of ``tools/argocd-health/main.go`` for the sources mirrored).
``tools/build-argocd-health.sh`` builds it once into a per-user cache keyed by its sources.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .conftest import ROOT

GROUP = "incus.truenas.io"
CHECKS_DIR = ROOT / "resource_customizations" / GROUP
BUILD_SCRIPT = ROOT / "tools" / "build-argocd-health.sh"

# How Argo CD runs the script: from argocd-cm (standard libraries off unless
# resource.customizations.useOpenLibs.<group>_<kind> is set), or built in (libraries on).
MODES = {"argocd-cm": [], "built-in": ["-open-libs"]}


@dataclass(frozen=True)
class Check:
    """One kind's health check: ``resource_customizations/incus.truenas.io/<kind>/``."""

    kind: str

    @property
    def dir(self) -> Path:
        return CHECKS_DIR / self.kind

    @property
    def script(self) -> Path:
        return self.dir / "health.lua"

    @property
    def health_tests(self) -> Path:
        return self.dir / "health_test.yaml"

    @property
    def testdata(self) -> Path:
        return self.dir / "testdata"

    @property
    def argocd_cm_key(self) -> str:
        """Where argocd-cm takes the script (resource.customizations.health.<group>_<kind>)."""
        return f"resource.customizations.health.{GROUP}_{self.kind}"

    def expected_health(self) -> dict[str, dict[str, str]]:
        """health_test.yaml as {inputPath: healthStatus}."""
        tests = yaml.safe_load(self.health_tests.read_text())["tests"]
        return {t["inputPath"]: t["healthStatus"] for t in tests}


# Every kind directory is a check: one without health.lua fails the tests instead of being skipped.
CHECKS = {p.name: Check(p.name) for p in sorted(CHECKS_DIR.iterdir()) if p.is_dir()}


@functools.cache
def binary() -> Path:
    """The harness binary, built on first use (``TIO_ARGOCD_HEALTH_BIN`` points at a prebuilt one)."""
    override = os.environ.get("TIO_ARGOCD_HEALTH_BIN")
    if override:
        return Path(override)
    result = subprocess.run(["bash", str(BUILD_SCRIPT)], stdout=subprocess.PIPE, text=True, check=False)
    assert result.returncode == 0, f"building the Argo CD health harness failed (exit {result.returncode})"
    return Path(result.stdout.strip().splitlines()[-1])


def health(obj: dict[str, Any], script: Path | str | None = None, mode: str = "argocd-cm") -> dict[str, str] | None:
    """What Argo CD shows for ``obj``: {"status", "message"} (keys absent when empty), None for no health.

    ``script`` is a path, or Lua source text; by default the check of ``obj``'s kind.
    """
    if script is None:
        script = CHECKS[obj["kind"]].script
    with tempfile.NamedTemporaryFile("w", suffix=".lua") as source:
        if isinstance(script, str):
            source.write(script)
            source.flush()
            script = Path(source.name)
        result = subprocess.run(
            [str(binary()), *MODES[mode], "-script", str(script), "-"],
            input=json.dumps(obj),
            capture_output=True,
            text=True,
            check=False,
        )
    assert result.returncode == 0, f"argocd-health failed ({result.returncode}): {result.stderr}"
    value: dict[str, str] | None = json.loads(result.stdout)
    return value


def run_health_tests(check: Check, mode: str) -> tuple[int, dict[str, dict[str, Any]]]:
    """The harness over every case of the check's health_test.yaml: (exit status, result by inputPath)."""
    result = subprocess.run(
        [str(binary()), *MODES[mode], "-script", str(check.script), "-tests", str(check.health_tests)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode in (0, 1), f"argocd-health failed ({result.returncode}): {result.stderr}"
    return result.returncode, {r["inputPath"]: r for r in map(json.loads, result.stdout.splitlines())}
