"""The README's main command (``make run`` -> ``python -m truenas_incus_dev start``).

- With ``TIO_TRUENAS_URL`` set and a kubeconfig (``KUBECONFIG``, else ``~/.kube/config`` as kubectl
  does): installs the CRDs into that cluster (server-side apply from Python: nothing is built, no
  kubectl needed) and runs the operator against that TrueNAS (key from ``TIO_TRUENAS_API_KEY_FILE``
  or ``TIO_TRUENAS_API_KEY``).
- Otherwise the embedded default: a local control plane, two TrueNAS simulators (25.10 as the
  default connection, 25.04.0 behind a TrueNASConnection for the VM example), the operator, and
  the examples, shown reaching Running as ``kubectl get -w`` shows them.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from truenas_incus_operator.kube import Kube
from truenas_incus_operator.problems import OperatorError
from truenas_simulator import Simulator, SimulatorThread
from truenas_simulator.images import write_mirror

from .localcluster import REPO_ROOT, LocalControlPlane, start_for_people, wait_for_interrupt

EXAMPLES = REPO_ROOT / "examples"
LEDGER_NAMESPACE = "truenas-incus-operator"


def kubeconfig() -> str | None:
    """The kubeconfig kubectl would use: ``KUBECONFIG``, else ``~/.kube/config`` when it exists."""
    explicit = os.environ.get("KUBECONFIG")
    if explicit:
        return explicit
    default = Path.home() / ".kube" / "config"
    return str(default) if default.exists() else None


def start(workdir: Path) -> int:
    if os.environ.get("TIO_TRUENAS_URL") and kubeconfig():
        return run_against_configured(workdir)
    return run_demo(workdir)


async def install(ledger: str) -> None:
    """The CRDs (server-side apply, so a second run changes nothing) and the ledger's namespace."""
    kube = Kube()  # the operator's own client: the same kubeconfig handling as `run`
    apply = {"Content-Type": "application/apply-patch+yaml"}
    try:
        for path in sorted((REPO_ROOT / "crds").glob("*.yaml")):
            crd = yaml.safe_load(path.read_text())
            name = crd["metadata"]["name"]
            where = f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}"
            await kube._request("PATCH", f"{where}?fieldManager=truenas-incus-operator&force=true", crd, apply)
            print(f"start: CRD {name} applied", flush=True)
        namespace = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ledger}}
        where = f"/api/v1/namespaces/{ledger}"
        await kube._request("PATCH", f"{where}?fieldManager=truenas-incus-operator", namespace, apply)
    finally:
        await kube.close()


def run_against_configured(workdir: Path) -> int:
    config = kubeconfig()
    print(f"start: KUBECONFIG={config}, TrueNAS at {os.environ['TIO_TRUENAS_URL']}", flush=True)
    os.environ["KUBECONFIG"] = str(config)
    # The ownership ledger's home (TIO_LEDGER_NAMESPACE, default truenas-incus-operator).
    ledger = os.environ.get("TIO_LEDGER_NAMESPACE", LEDGER_NAMESPACE)
    try:
        asyncio.run(install(ledger))
    except OperatorError as exc:
        print(f"error: could not install the CRDs or the namespace {ledger}: {exc.problem.message}", file=sys.stderr)
        return 1
    # Become the operator, so that signals (Ctrl-C, SIGTERM) reach it directly.
    os.execv(sys.executable, [sys.executable, "-m", "truenas_incus_operator", "run", "-A"])


def run_demo(workdir: Path) -> int:
    print("demo: no KUBECONFIG + TIO_TRUENAS_URL given, so starting everything locally", flush=True)
    print("demo: building or reusing the local control plane (the first build takes several minutes)", flush=True)
    started = start_for_people(workdir / "controlplane")
    if started is None:
        return 1
    plane, seconds = started
    bin_dir = plane.bin_dir
    processes: list[subprocess.Popen[Any]] = []
    try:
        print(f"demo: control plane ready in {seconds:.1f}s", flush=True)
        plane.kubectl("apply", "-f", str(REPO_ROOT / "crds"))
        plane.kubectl("wait", "--for=condition=Established", "crd", "--all", "--timeout=60s")
        plane.kubectl("create", "namespace", LEDGER_NAMESPACE)
        main_sim = SimulatorThread(Simulator("25.10"), tls=True, cert_dir=workdir / "simulator-tls").start()
        legacy_sim = SimulatorThread(Simulator("25.04.0"), tls=True, cert_dir=workdir / "simulator-legacy-tls").start()
        try:
            print(f"demo: TrueNAS 25.10 simulator at {main_sim.ws_url} (the operator's default connection)", flush=True)
            print(f"demo: TrueNAS 25.04.0 simulator at {legacy_sim.ws_url} (TrueNASConnection legacy/nas)", flush=True)
            key_file = workdir / "simulator-api-key"
            key_file.touch(mode=0o600)
            key_file.write_text(main_sim.api_key)
            env = dict(
                os.environ,
                KUBECONFIG=str(plane.kubeconfig),
                TIO_TRUENAS_URL=main_sim.ws_url,
                TIO_TRUENAS_API_KEY_FILE=str(key_file),
                TIO_TRUENAS_CA_FILE=str(main_sim.ca_file),
                # VM images for vm.* from a local simplestreams mirror of the simulator's test images
                TIO_VM_IMAGE_SERVER=str(write_mirror(list(main_sim.sim.images.values()), workdir / "vm-images")),
            )
            log = (workdir / "operator.log").open("w")
            processes.append(
                subprocess.Popen(
                    [sys.executable, "-m", "truenas_incus_operator", "run", "-A"], env=env, stdout=log, stderr=log
                )
            )
            print(f"demo: operator running (log: {workdir / 'operator.log'})", flush=True)
            _apply_examples(plane, legacy_sim)
            print(f"demo: export KUBECONFIG={plane.kubeconfig} PATH={bin_dir}:$PATH  # to look around", flush=True)
            print("demo: Ctrl-C stops everything.\n", flush=True)
            for kind in ("incusinstances", "incusinstancesnapshots", "incusinstancerestores"):
                watch = [str(bin_dir / "kubectl"), "--kubeconfig", str(plane.kubeconfig), "get", kind, "-A", "-w"]
                processes.append(subprocess.Popen(watch))
            wait_for_interrupt()
        finally:
            for process in reversed(processes):
                process.terminate()
                process.wait(timeout=20)
            main_sim.stop()
            legacy_sim.stop()
    finally:
        plane.stop()
    return 0


def _apply_examples(plane: LocalControlPlane, legacy: SimulatorThread) -> None:
    plane.kubectl("apply", "-n", "default", "-f", str(EXAMPLES / "container.yaml"))
    plane.kubectl("apply", "-n", "default", "-f", str(EXAMPLES / "with-devices.yaml"))
    plane.kubectl("apply", "-n", "default", "-f", str(EXAMPLES / "vm.yaml"))  # a vm.* VM on 25.10
    plane.kubectl("apply", "-n", "default", "-f", str(EXAMPLES / "vm-static-address.yaml"))  # a declared address
    # A snapshot of web01, and a restore to it (it waits for the snapshot, then rolls web01 back).
    plane.kubectl("apply", "-n", "default", "-f", str(EXAMPLES / "snapshot.yaml"))
    plane.kubectl("apply", "-n", "default", "-f", str(EXAMPLES / "restore.yaml"))
    # A snapshot of vm01 and a VM cloned from it (made once the snapshot is Ready).
    plane.kubectl("apply", "-n", "default", "-f", str(EXAMPLES / "clone.yaml"))
    plane.kubectl("create", "namespace", "legacy")
    assert legacy.ca_file is not None
    plane.kubectl("create", "secret", "generic", "nas-key", "-n", "legacy", f"--from-literal=apiKey={legacy.api_key}")
    plane.kubectl("create", "secret", "generic", "nas-ca", "-n", "legacy", f"--from-file=ca.crt={legacy.ca_file}")
    # The operator uses only Secrets that opt in (docs/security.md).
    plane.kubectl("label", "secret", "nas-key", "nas-ca", "-n", "legacy", "incus.truenas.io/credentials=true")
    connection = {
        "apiVersion": "incus.truenas.io/v1alpha1",
        "kind": "TrueNASConnection",
        "metadata": {"name": "nas", "namespace": "legacy"},
        "spec": {
            "url": legacy.ws_url,
            "apiKeySecretRef": {"name": "nas-key", "key": "apiKey"},
            "tls": {"caSecretRef": {"name": "nas-ca", "key": "ca.crt"}},
        },
    }
    vm = yaml.safe_load((EXAMPLES / "vm.yaml").read_text())
    vm["spec"]["connectionRef"] = {"name": "nas"}
    for manifest in (connection, vm):
        plane.kubectl("apply", "-n", "legacy", "-f", "-", input=yaml.safe_dump(manifest))
