"""Day two with the chart, on control planes of their own (issue 21 items 5 and 7): from the README's
`kubectl apply -f crds/` to Helm, following docs/operations.md literally; a CRD upgrade through
`helm upgrade`; and deleting the CRDs with the operator running does not hang."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from truenas_incus_dev.localcluster import LocalControlPlane, binaries_dir
from truenas_incus_operator.crd import all_crds

from .conftest import ROOT, Cluster
from .harness import Harness, OperatorProcess, operator_env, start_simulator, unique
from .test_chart import CHART, helm

pytestmark = pytest.mark.e2e  # needs the local control plane (kube-apiserver + etcd, helm)

CRDS = tuple(crd["metadata"]["name"] for crd in all_crds())
OPERATIONS = ROOT / "docs" / "operations.md"
NAMESPACE = "truenas-incus-operator"  # the release namespace docs/operations.md uses


@pytest.fixture
def plain_cluster(tmp_path: Path) -> Iterator[Cluster]:
    """A cluster set up as the README's out-of-cluster path leaves it: CRDs from `kubectl apply`."""
    plane = LocalControlPlane(workdir=tmp_path / "cp", bin_dir=binaries_dir(progress=False)).start()
    try:
        cluster = Cluster(plane)
        cluster.kubectl("apply", "-f", str(ROOT / "crds"))
        cluster.kubectl("wait", "--for=condition=Established", *(f"crd/{c}" for c in CRDS), "--timeout=60s")
        yield cluster
    finally:
        plane.stop()


def crd(cluster: Cluster, name: str) -> dict[str, Any]:
    found: dict[str, Any] = json.loads(cluster.kubectl("get", "crd", name, "-o", "json").stdout)
    return found


def documented_ownership_commands() -> str:
    """The shell block of docs/operations.md that hands the CRDs to the release, without its helm line."""
    blocks = re.findall(r"```sh\n(.*?)```", OPERATIONS.read_text(), flags=re.S)
    (block,) = [b for b in blocks if "kubectl label crd" in b]
    return "\n".join(line for line in block.splitlines() if not line.startswith("helm "))


def run_documented(cluster: Cluster, script: str) -> None:
    env = {
        **os.environ,
        "KUBECONFIG": str(cluster.kubeconfig),
        "PATH": f"{cluster.bin_dir}{os.pathsep}{os.environ['PATH']}",
    }
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", script], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def install(cluster: Cluster, chart: Path, *extra: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    args = ("install", "tio", str(chart), "-n", NAMESPACE, "--create-namespace", *extra)
    return helm(*args, kubeconfig=cluster.kubeconfig, check=check)


def an_instance(cluster: Cluster) -> None:
    cluster.kubectl("create", "namespace", "apps")
    manifest = {
        "apiVersion": "incus.truenas.io/v1alpha1",
        "kind": "IncusInstance",
        "metadata": {"name": "keep-me"},
        "spec": {"type": "CONTAINER", "image": "debian/bookworm"},
    }
    assert cluster.apply(manifest, "apps").returncode == 0


def test_from_kubectl_apply_to_helm_as_documented_and_a_crd_upgrade(plain_cluster: Cluster, tmp_path: Path) -> None:
    cluster = plain_cluster
    an_instance(cluster)  # a user's resource, from before Helm

    refused = install(cluster, CHART, check=False)
    assert refused.returncode != 0 and "invalid ownership metadata" in refused.stderr, refused.stderr

    # Either way of docs/operations.md: the ownership labels and annotations ...
    run_documented(cluster, documented_ownership_commands())
    assert "STATUS: deployed" in install(cluster, CHART).stdout
    for name in CRDS:
        metadata = crd(cluster, name)["metadata"]
        assert metadata["labels"]["app.kubernetes.io/managed-by"] == "Helm"
        assert metadata["annotations"]["meta.helm.sh/release-name"] == "tio"
        assert metadata["annotations"]["helm.sh/resource-policy"] == "keep"
    helm("uninstall", "tio", "-n", NAMESPACE, kubeconfig=cluster.kubeconfig)
    assert cluster.get("incusinstance", "keep-me", "apps"), "the CRDs and the resources stay"

    # ... or --take-ownership, from CRDs as `kubectl apply -f crds/` leaves them.
    for name in CRDS:
        cluster.kubectl("label", "crd", name, "app.kubernetes.io/managed-by-")
        annotations = ("meta.helm.sh/release-name-", "meta.helm.sh/release-namespace-", "helm.sh/resource-policy-")
        cluster.kubectl("annotate", "crd", name, *annotations)
    assert install(cluster, CHART, check=False).returncode != 0
    assert "STATUS: deployed" in install(cluster, CHART, "--take-ownership").stdout

    # A CRD upgrade: the release from an older chart whose CRD lacks a printer column; helm upgrade
    # with this chart brings it (the CRDs are templates, not a crds/ folder Helm installs only once).
    helm("uninstall", "tio", "-n", NAMESPACE, kubeconfig=cluster.kubeconfig)
    older = tmp_path / "older-chart"
    shutil.copytree(CHART, older)
    path = older / "files" / "crds" / f"{CRDS[0]}.yaml"
    document = yaml.safe_load(path.read_text())
    columns = document["spec"]["versions"][0]["additionalPrinterColumns"]
    dropped = columns.pop()["name"]
    path.write_text(yaml.safe_dump(document))
    install(cluster, older)
    live = [c["name"] for c in crd(cluster, CRDS[0])["spec"]["versions"][0]["additionalPrinterColumns"]]
    assert dropped not in live
    helm("upgrade", "tio", str(CHART), "-n", NAMESPACE, "--reuse-values", kubeconfig=cluster.kubeconfig)
    live = [c["name"] for c in crd(cluster, CRDS[0])["spec"]["versions"][0]["additionalPrinterColumns"]]
    assert dropped in live, live
    assert cluster.get("incusinstance", "keep-me", "apps")


def test_deleting_the_crds_with_the_operator_running_does_not_hang(plain_cluster: Cluster, tmp_path: Path) -> None:
    """Connections and instances go together; each instance is torn down on TrueNAS with the credentials
    of the connection it names, which waits for it."""
    cluster = plain_cluster
    sim = start_simulator("25.10", job_duration=0.05)
    operator = OperatorProcess(cluster, operator_env(sim, tmp_path), tmp_path / "operator.log").start()
    try:
        harness = Harness(cluster, sim, operator, tmp_path)
        cluster.kubectl("create", "namespace", "apps")
        harness.connect_namespace("apps", sim)
        via, default = unique("via"), unique("default")
        harness.apply("apps", via, {"connectionRef": {"name": "nas"}})
        harness.apply("apps", default, {})
        harness.wait_ready("apps", via, timeout=90)
        harness.wait_ready("apps", default, timeout=90)
        # docs/operations.md: the instances' and connections' CRDs first, the snapshot kinds' after them.
        first = [name for name in CRDS if name.startswith(("incusinstances.", "truenasconnections."))]
        deleted = cluster.kubectl("delete", "crd", *first, "--timeout=180s", check=False)
        assert deleted.returncode == 0, deleted.stderr + operator.logs()[-3000:]
        assert not {via, default} & harness.instance_names(), "torn down on TrueNAS, not left behind"
        rest = [name for name in CRDS if name not in first]
        deleted = cluster.kubectl("delete", "crd", *rest, "--timeout=60s", check=False)
        assert deleted.returncode == 0, deleted.stderr
    finally:
        operator.stop()
        sim.stop()
