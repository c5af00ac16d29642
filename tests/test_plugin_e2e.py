"""``kubectl truenas`` (issue 25 item 4) against the real API server, run as users run it: kubectl
finds the installed ``kubectl-truenas`` on PATH. status on one screen (and as JSON), pause and resume,
snapshot and restore waited for with their progress, import and doctor through the plugin, and
errors as one line and exit code 1."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from .conftest import Cluster, module_prefix
from .harness import Harness, module_operator, unique

pytestmark = pytest.mark.e2e  # needs the local control plane (kube-apiserver + etcd)

PLUGIN = Path(sys.executable).parent / "kubectl-truenas"


PROFILES = ["25.04.0", "25.04.2", "25.10", "26.0", "27.0"]


@pytest.fixture(scope="module", params=PROFILES)
def harness(
    cluster: Cluster, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[Harness]:
    profile = str(request.param)
    prefix = f"{module_prefix(request)}{profile.replace('.', '')}-"
    for running in module_operator(cluster, tmp_path_factory.mktemp(f"plugin{profile}"), prefix, profile):
        running.prefix = prefix  # type: ignore[attr-defined]
        yield running


@pytest.fixture
def ns(harness: Harness) -> str:
    name = f"{harness.prefix}{uuid.uuid4().hex[:8]}"  # type: ignore[attr-defined]
    harness.cluster.kubectl("create", "namespace", name)
    return name


def plugin(harness: Harness, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``kubectl truenas ARGS``: kubectl runs the console script from PATH, as a user's shell would."""
    assert PLUGIN.exists(), f"{PLUGIN}: the package's kubectl-truenas console script is not installed"
    path = f"{PLUGIN.parent}{os.pathsep}{os.environ.get('PATH', '')}"
    environment = {**os.environ, "PATH": path, "KUBECONFIG": str(harness.cluster.kubeconfig), **(env or {})}
    return subprocess.run(
        [str(harness.cluster.bin_dir / "kubectl"), "truenas", *args],
        capture_output=True,
        text=True,
        env=environment,
        timeout=300,
        check=False,
    )


def ledger_namespace(harness: Harness) -> str:
    return str(harness.operator.env.get("TIO_LEDGER_NAMESPACE", "truenas-incus-operator"))


def test_status_shows_the_whole_story_as_text_and_json(harness: Harness, ns: str) -> None:
    name = unique("web")
    harness.apply(ns, name, {"cpu": "2"})
    harness.wait_ready(ns, name, timeout=60)
    shown = plugin(harness, "status", name, "-n", ns, "--ledger-namespace", ledger_namespace(harness))
    assert shown.returncode == 0, shown.stderr
    text = shown.stdout
    assert text.startswith(f"IncusInstance {ns}/{name}: Running, Ready=True (Available)"), text
    assert "connection:  <default>" in text and "conditions:" in text and "Synced" in text
    assert f"ownership:   created {name} on nas-" in text, text
    assert "events (last 10):" in text and "Created" in text
    machine = plugin(harness, "status", name, "-n", ns, "-o", "json", "--ledger-namespace", ledger_namespace(harness))
    data: dict[str, Any] = json.loads(machine.stdout)
    assert data["instance"]["phase"] == "Running" and data["ownership"]["records"][0]["state"] == "created"
    missing = plugin(harness, "status", "nothing-here", "-n", ns)
    assert missing.returncode == 1 and missing.stderr.strip().endswith("does not exist (or you may not read it)")
    assert harness.delete(ns, name).returncode == 0


def test_pause_resume_snapshot_and_restore_wait_with_progress(harness: Harness, ns: str) -> None:
    name = unique("db")
    harness.apply(ns, name, {})
    harness.wait_ready(ns, name, timeout=60)
    paused = plugin(harness, "pause", name, "-n", ns)
    assert paused.returncode == 0, paused.stderr
    assert f"paused IncusInstance {ns}/{name}" in paused.stdout
    assert "Synced=False (ReconciliationPaused)" in paused.stdout, paused.stdout
    resumed = plugin(harness, "resume", name, "-n", ns)
    assert resumed.returncode == 0 and "Synced=True" in resumed.stdout, resumed.stdout + resumed.stderr

    taken = plugin(harness, "snapshot", name, "-n", ns, "--snapshot-name", "before")
    assert taken.returncode == 0, taken.stdout + taken.stderr
    assert f"created IncusInstanceSnapshot {ns}/before" in taken.stdout and " Ready: " in taken.stdout
    assert "snapshot tio-" in taken.stdout
    back = plugin(harness, "restore", name, "-n", ns, "--from-snapshot", "before", "--restore-name", "undo")
    assert back.returncode == 0, back.stdout + back.stderr
    assert "RollingBack" in back.stdout or "Stopping" in back.stdout or "Pending" in back.stdout, back.stdout
    assert " Succeeded: " in back.stdout
    # A refusal comes back as the API server said it (admission), one line, exit 1.
    twice = plugin(harness, "restore", name, "-n", ns, "--from-snapshot", "before", "--restore-name", "undo")
    assert twice.returncode == 1 and "already exists" in twice.stderr, twice.stderr
    for kind, obj in (("incusinstancerestore", "undo"), ("incusinstancesnapshot", "before")):
        harness.cluster.kubectl("delete", kind, obj, "-n", ns)
    assert harness.delete(ns, name).returncode == 0


def test_import_and_doctor_through_the_plugin_are_read_only(harness: Harness, ns: str) -> None:
    name = unique("ui")
    harness.sim.run(lambda: harness.sim.sim.seed_instance(name=name, type="CONTAINER", status="RUNNING"))
    env = {k: v for k, v in harness.operator.env.items() if k.startswith("TIO_TRUENAS_")}
    writes = harness.sim.run(lambda: harness.sim.sim.counters.snapshot()["writes"])
    printed = plugin(harness, "import", "-n", ns, env=env)
    assert printed.returncode == 0, printed.stderr
    assert f"# TrueNAS instance '{name}'" in printed.stdout
    (manifest,) = [d for d in yaml.safe_load_all(printed.stdout) if d]
    assert manifest["spec"]["managementPolicy"] == "ObserveOnly", printed.stdout
    # Through a TrueNASConnection and its Secrets, read with the kubeconfig's user: no TIO_TRUENAS_* at all.
    harness.connect_namespace(ns, harness.sim, name="nas")
    through = plugin(harness, "import", "--connection", f"{ns}/nas")
    assert through.returncode == 0, through.stderr
    (via,) = [d for d in yaml.safe_load_all(through.stdout) if d]
    assert via["metadata"]["namespace"] == ns and via["spec"]["connectionRef"] == {"name": "nas"}, through.stdout
    checked = plugin(harness, "doctor", env=env)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert harness.sim.run(lambda: harness.sim.sim.counters.snapshot()["writes"]) == writes, "a write reached TrueNAS"
