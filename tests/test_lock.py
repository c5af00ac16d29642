"""The dependency lock: pyproject.toml, uv.lock and its exports agree, and every install uses them."""

from __future__ import annotations

import re
import subprocess
import tomllib

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from .conftest import ROOT

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def pins(name: str) -> dict[str, str]:
    """Package -> version pinned in requirements/<name>.txt, each of which must carry hashes."""
    text = (ROOT / "requirements" / f"{name}.txt").read_text()
    found: dict[str, str] = {}
    for entry in re.split(r"\n(?=\S)", text):
        if entry.startswith("#") or not entry.strip():
            continue
        match = re.match(r"([A-Za-z0-9._-]+)==(\S+)", entry)
        assert match, f"requirements/{name}.txt: not an exact pin: {entry.splitlines()[0]}"
        assert "--hash=sha256:" in entry, f"requirements/{name}.txt: {match[1]} has no hash"
        found[canonicalize_name(match[1])] = match[2]
    return found


def direct(requirements: list[str]) -> set[str]:
    return {canonicalize_name(Requirement(line).name) for line in requirements}


def test_the_lock_matches_pyproject_and_the_exports_match_the_lock() -> None:
    # What `make lint` runs: offline, it resolves nothing.
    result = subprocess.run(["bash", "tools/lock.sh", "--check"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]


def test_runtime_and_dev_exports_pin_what_pyproject_asks_for() -> None:
    runtime, dev = pins("runtime"), pins("dev")
    project = PYPROJECT["project"]
    build = direct(PYPROJECT["dependency-groups"]["build"])
    assert direct(project["dependencies"]) | build <= runtime.keys()
    assert direct(project["optional-dependencies"]["dev"]) | runtime.keys() <= dev.keys()
    assert all(dev[name] == version for name, version in runtime.items()), "one version of each package"
    leaked = (direct(project["optional-dependencies"]["dev"]) & runtime.keys()) - direct(project["dependencies"])
    assert not leaked, f"dev dependencies in the image's lock: {leaked}"


def test_the_locked_build_group_is_the_build_backend() -> None:
    assert direct(PYPROJECT["build-system"]["requires"]) == direct(PYPROJECT["dependency-groups"]["build"])


def test_bootstrap_installs_only_the_lock_and_the_project_without_dependencies() -> None:
    text = (ROOT / "tools" / "bootstrap.sh").read_text()
    installs = [line.strip() for line in text.splitlines() if "pip install" in line]
    assert any("--require-hashes -r requirements/dev.txt" in line for line in installs)
    assert all("--require-hashes" in line or "--no-deps" in line for line in installs), installs
    assert "--upgrade" not in text, "pip itself stays the venv's: nothing resolved at install time"
