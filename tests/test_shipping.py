"""What ships: the image's install steps in a fresh venv, and the README's main command."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from truenas_incus_dev.localcluster import LocalControlPlane, free_port

from .conftest import ROOT, Cluster
from .harness import Harness, OperatorProcess, operator_env, start_simulator, wait_until

pytestmark = pytest.mark.e2e  # needs the local control plane (kube-apiserver + etcd, helm)

DOCKERFILE = ROOT / "Dockerfile"


def build_stage_steps() -> tuple[list[tuple[str, str]], list[str]]:
    """(COPY source, destination) pairs and RUN commands of the Dockerfile's build stage."""
    stages = re.split(r"^FROM .*$", DOCKERFILE.read_text(), flags=re.M)
    build = stages[1].replace("\\\n", " ")
    pairs: list[tuple[str, str]] = []
    runs: list[str] = []
    for line in build.splitlines():
        if line.startswith("COPY "):
            *sources, target = line.split()[1:]
            pairs += [(source, target) for source in sources]
        elif line.startswith("RUN "):
            runs.append(line[4:].strip())
    assert pairs and runs
    return pairs, runs


def test_dockerfile_is_slim_and_non_root() -> None:
    text = DOCKERFILE.read_text()
    bases = re.findall(r"^FROM (\S+)", text, re.M)
    # Pinned to a full Python version and Debian release, the same in both stages.
    assert len(bases) == 2 and bases[0] == bases[1], bases
    assert re.fullmatch(r"python:3\.11\.\d+-slim-[a-z]+(@sha256:[0-9a-f]{64})?", bases[0]), bases[0]
    assert re.search(r"^USER 65532:65532$", text, re.M)
    assert 'ENTRYPOINT ["truenas-incus-operator"]' in text
    assert "[dev]" not in text, "the image installs runtime dependencies only"
    # Only locked dependencies: the runtime lock with hashes, then the project without its dependencies.
    _, runs = build_stage_steps()
    assert any("--require-hashes -r runtime.txt" in run for run in runs)
    project = [run for run in runs if run.endswith(" .")]
    assert project and all("--no-deps" in run and "--no-build-isolation" in run for run in project)


def test_image_install_steps_in_a_fresh_venv_and_the_entry_point_starts(
    control_plane: LocalControlPlane, tmp_path: Path
) -> None:
    source, venv = tmp_path / "src", tmp_path / "venv"
    source.mkdir()
    pairs, runs = build_stage_steps()
    for item, target in pairs:
        destination = source / target if target not in ("./", ".") else source / Path(item).name
        if (ROOT / item).is_dir():
            shutil.copytree(ROOT / item, destination, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(ROOT / item, destination)
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    for command in runs:
        # The image's Python is the machine's here; the venv lands in tmp_path instead of /venv.
        command = command.replace("python -m venv", f"{sys.executable} -m venv").replace("/venv", str(venv))
        result = subprocess.run(command, shell=True, cwd=source, env=env, capture_output=True, text=True, check=False)
        assert result.returncode == 0, result.stderr[-2000:]
    installed = subprocess.run(
        [str(venv / "bin" / "pip"), "list", "--format=freeze"], capture_output=True, text=True
    ).stdout
    names = {line.split("==")[0].lower() for line in installed.splitlines()}
    assert {"kopf", "pydantic", "httpx", "aiohttp"} <= names
    assert not names & {"pytest", "mypy", "ruff", "jsonschema", "kubernetes"}, "dev dependencies leaked into the image"

    entry = venv / "bin" / "truenas-incus-operator"
    port = free_port()
    namespace = "image-check"
    control_plane.kubectl("create", "namespace", namespace, check=False)
    process = subprocess.Popen(
        [str(entry), "run", "-n", namespace, f"--liveness=http://127.0.0.1:{port}/healthz"],
        env={**os.environ, "KUBECONFIG": str(control_plane.kubeconfig)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:

        def healthy() -> bool:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as response:
                    return bool(response.status == 200)
            except OSError:
                return False

        wait_until(healthy, timeout=60, what="the installed entry point to serve /healthz")
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)


def test_main_command_runs_the_demo_to_running(tmp_path: Path, cluster: Cluster) -> None:
    """`make run` without KUBECONFIG/TIO_TRUENAS_URL: everything local, the examples reach Running."""
    env = {k: v for k, v in os.environ.items() if k not in ("KUBECONFIG", "TIO_TRUENAS_URL")}
    env["PYTHONPATH"] = str(ROOT / "tools")
    process = subprocess.Popen(
        [sys.executable, "-m", "truenas_incus_dev", "start", "--dir", str(tmp_path)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=ROOT,
    )
    lines: list[str] = []
    ready: set[str] = set()
    # The instances Running and Ready; examples/snapshot.yaml Ready (phase and condition), restore.yaml
    # Succeeded, clone.yaml's snapshot Ready and its clone Running; vm-static Ready on its declared address.
    wanted = {"web01", "media01", "vm01", "vm-static", "web01-before-upgrade", "web01-undo-upgrade", "vm01-gold"}
    wanted.add("vm01-copy")
    deadline = time.monotonic() + 150
    try:
        assert process.stdout is not None
        while ready != wanted and time.monotonic() < deadline:
            line = process.stdout.readline()
            if not line:
                break
            lines.append(line)
            columns = line.split()
            if len(columns) >= 9 and columns[3] in ("Running", "Ready") and columns[-2] == "True":
                ready.add(columns[1])
            if len(columns) >= 6 and "Succeeded" in columns[2:-2] and columns[-2] == "True":
                ready.add(columns[1])
        assert ready == wanted, "".join(lines)
        assert any("control plane ready" in line for line in lines)
        # vm-static is a Service too (spec.expose): its EndpointSlice holds the declared address, ready.
        shown = next(m for line in lines if (m := re.search(r"export KUBECONFIG=(\S+) PATH=(\S+):", line)))
        kubectl = [str(Path(shown.group(2)) / "kubectl"), "--kubeconfig", shown.group(1), "-n", "default"]

        def exposed() -> bool:
            found = subprocess.run(
                [*kubectl, "get", "endpointslice", "vm-static-ipv4", "-o", "json"], capture_output=True, text=True
            )
            if found.returncode != 0:
                return False
            endpoints = json.loads(found.stdout)["endpoints"]
            return [(e["addresses"], e["conditions"]["ready"]) for e in endpoints] == [(["192.168.10.20"], True)]

        wait_until(exposed, timeout=60, what="vm-static's EndpointSlice with its declared address")
        service = json.loads(
            subprocess.run(
                [*kubectl, "get", "service", "vm-static", "-o", "json"], capture_output=True, text=True
            ).stdout
        )
        assert "selector" not in service["spec"] and service["spec"]["ports"][0]["port"] == 22
    finally:
        process.send_signal(signal.SIGINT)
        code = process.wait(timeout=60)
        if process.stdout is not None:
            process.stdout.close()
    assert code == 0
    leftovers = subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True, text=True).stdout.split()
    assert leftovers == [], "Ctrl-C must stop the control plane, the simulators and the operator"


def test_main_command_runs_the_operator_against_a_configured_cluster_and_truenas(
    cluster: Cluster, namespace: str, tmp_path: Path
) -> None:
    sim = start_simulator("25.10")
    env = {**os.environ, "KUBECONFIG": str(cluster.kubeconfig), **operator_env(sim, tmp_path)}
    env["PYTHONPATH"] = str(ROOT / "tools")
    log = (tmp_path / "start.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "truenas_incus_dev", "start", "--dir", str(tmp_path)],
        env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
    )  # fmt: skip
    log.close()
    try:
        harness = Harness(cluster, sim, OperatorProcess(cluster, {}, tmp_path / "unused.log"), tmp_path)
        harness.apply(namespace, "configured", {})
        harness.wait_ready(namespace, "configured", timeout=60)
        assert "configured" in harness.instance_names()
    finally:
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=60)
        sim.stop()
    assert code == 0, (tmp_path / "start.log").read_text()[-2000:]


def test_main_command_uses_the_default_kubeconfig_and_builds_nothing(
    cluster: Cluster, namespace: str, tmp_path: Path
) -> None:
    """Like kubectl: without KUBECONFIG, ~/.kube/config; and no local control plane is built just for a
    kubectl (its binaries are made unavailable, and no kubectl is on PATH)."""
    sim = start_simulator("25.10")
    home = tmp_path / "home"
    (home / ".kube").mkdir(parents=True)
    shutil.copy(cluster.kubeconfig, home / ".kube" / "config")
    env = {k: v for k, v in os.environ.items() if k != "KUBECONFIG"}
    env.update(operator_env(sim, tmp_path))
    env["HOME"] = str(home)
    env["PYTHONPATH"] = str(ROOT / "tools")
    env["TIO_CONTROLPLANE_BIN"] = str(tmp_path / "no-binaries-here")  # a build or a kubectl from it fails
    env["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep) if not (Path(p) / "kubectl").exists())
    log = (tmp_path / "start.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "truenas_incus_dev", "start", "--dir", str(tmp_path)],
        env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
    )  # fmt: skip
    log.close()
    try:
        harness = Harness(cluster, sim, OperatorProcess(cluster, {}, tmp_path / "unused.log"), tmp_path)
        harness.apply(namespace, "default-kubeconfig", {})
        harness.wait_ready(namespace, "default-kubeconfig", timeout=90)
    finally:
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=60)
        sim.stop()
    output = (tmp_path / "start.log").read_text()
    assert code == 0, output[-2000:]
    assert f"KUBECONFIG={home / '.kube' / 'config'}" in output, output[:2000]
