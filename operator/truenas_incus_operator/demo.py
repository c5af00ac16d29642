"""The embedded default of the main command: a local control plane with the CRDs, a TrueNAS
simulator, and the examples applied, so people can look around without a cluster or a NAS."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from truenas_simulator import Simulator, SimulatorThread

from .localcluster import REPO_ROOT, ControlPlaneError, LocalControlPlane, binaries_dir, wait_for_interrupt


def run_demo(workdir: Path) -> int:
    print("demo: building or reusing the local control plane (the first build takes several minutes)", flush=True)
    bin_dir = binaries_dir()
    plane = LocalControlPlane(workdir=workdir / "controlplane", bin_dir=bin_dir)
    started = time.monotonic()
    try:
        plane.start()
    except ControlPlaneError as exc:
        plane.stop()
        print(f"error: {exc}", file=sys.stderr)
        return 1
    try:
        print(f"demo: control plane ready in {time.monotonic() - started:.1f}s", flush=True)
        plane.kubectl("apply", "-f", str(REPO_ROOT / "crds"))
        plane.kubectl("wait", "--for=condition=Established", "crd", "--all", "--timeout=60s")
        with SimulatorThread(Simulator("25.10"), tls=True, cert_dir=workdir / "simulator-tls") as sim:
            print(f"demo: TrueNAS simulator at {sim.ws_url}/api/current", flush=True)
            for example in ("container.yaml", "with-devices.yaml"):
                plane.kubectl("apply", "-n", "default", "-f", str(REPO_ROOT / "examples" / example))
            print(plane.kubectl("get", "incusinstances", "-A").stdout, flush=True)
            print(f"export KUBECONFIG={plane.kubeconfig}; export PATH={bin_dir}:$PATH", flush=True)
            print("demo: Ctrl-C stops everything.", flush=True)
            wait_for_interrupt()
    finally:
        plane.stop()
    return 0
