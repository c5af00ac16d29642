"""Fixtures: a real kube-apiserver + etcd (built from the upstream Go modules, see
tools/build-controlplane.sh), a namespace per test, and the CRDs installed once."""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from truenas_incus_dev.localcluster import LocalControlPlane, binaries_dir

ROOT = Path(__file__).resolve().parents[1]


class Cluster:
    """kubectl against the local control plane (tests use the same tool users do)."""

    def __init__(self, plane: LocalControlPlane) -> None:
        self.plane = plane

    @property
    def kubeconfig(self) -> Path:
        return self.plane.kubeconfig

    @property
    def bin_dir(self) -> Path:
        return self.plane.bin_dir

    def kubectl(self, *args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = self.plane.kubectl(*args, input=input, check=False)
        if check and result.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed ({result.returncode}): {result.stderr}")
        return result

    def apply(self, manifest: str | dict[str, Any], namespace: str, *extra: str) -> subprocess.CompletedProcess[str]:
        text = manifest if isinstance(manifest, str) else yaml.safe_dump(manifest)
        return self.kubectl("apply", "-n", namespace, "-f", "-", *extra, input=text, check=False)

    def get(self, kind: str, name: str, namespace: str) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.kubectl("get", kind, name, "-n", namespace, "-o", "json").stdout)
        return data

    def wait_for(self, predicate: Any, timeout: float = 30.0, interval: float = 0.2, what: str = "condition") -> Any:
        return wait_until(predicate, timeout, interval, what)


def wait_until(predicate: Any, timeout: float = 30.0, interval: float = 0.2, what: str = "condition") -> Any:
    """Polls ``predicate`` until it returns something truthy (returned), or fails after ``timeout``."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last value: {last!r}")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A test that starts the control plane must be marked e2e, or `make unit` would build Go."""
    unmarked = [
        item.nodeid
        for item in items
        if "control_plane" in getattr(item, "fixturenames", ()) and item.get_closest_marker("e2e") is None
    ]
    if unmarked:
        raise pytest.UsageError("tests that use the control plane must be marked e2e: " + ", ".join(unmarked))


@pytest.fixture(scope="session")
def control_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalControlPlane]:
    plane = LocalControlPlane(workdir=tmp_path_factory.mktemp("controlplane"), bin_dir=binaries_dir())
    started = time.monotonic()
    plane.start()
    os.environ.setdefault("TIO_TEST_CONTROLPLANE_START", f"{time.monotonic() - started:.2f}")
    try:
        yield plane
    finally:
        plane.stop()


@pytest.fixture(scope="session")
def cluster(control_plane: LocalControlPlane) -> Cluster:
    """The control plane with this project's CRDs (and a stand-in Argo CD Application CRD) Established."""
    c = Cluster(control_plane)
    c.kubectl("apply", "-f", str(ROOT / "crds"))
    c.kubectl("create", "namespace", "truenas-incus-operator")  # the default ownership-ledger namespace
    c.kubectl("apply", "-f", str(ROOT / "tests" / "fixtures" / "argocd-application-crd.yaml"))
    c.kubectl(
        "wait",
        "--for=condition=Established",
        "crd/incusinstances.incus.truenas.io",
        "crd/truenasconnections.incus.truenas.io",
        "crd/incusinstancesnapshots.incus.truenas.io",
        "crd/incusinstancerestores.incus.truenas.io",
        "crd/applications.argoproj.io",
        "--timeout=60s",
    )
    return c


def module_prefix(request: pytest.FixtureRequest) -> str:
    """``operator-26--`` for tests/test_operator_26.py: a module's operator watches only ``operator-26--*``."""
    name: str = request.module.__name__
    return name.rsplit(".", 1)[-1].removeprefix("test_").replace("_", "-") + "--"


def slug_of_test(request: pytest.FixtureRequest) -> str:
    base = request.node.name.lower().removeprefix("test_").replace("_", "-")
    return "".join(ch for ch in base if ch.isalnum() or ch == "-")


@pytest.fixture
def namespace(cluster: Cluster, request: pytest.FixtureRequest) -> str:
    """A fresh namespace per test (namespaces are not reclaimed: there is no controller manager)."""
    ns = f"{module_prefix(request)}{slug_of_test(request)}"[:56].strip("-") + f"-{uuid.uuid4().hex[:6]}"
    cluster.kubectl("create", "namespace", ns)
    return ns
