"""Snapshot, restore and clone, end to end (BENCHMARKS.md, "Snapshots and restores"): the operator as a
subprocess against the local kube-apiserver and an in-process simulator, timed from `kubectl apply`
to the resource's Ready (polled every 0.1 s with kubectl, which adds up to ~0.15 s per figure).

Run: ``PYTHONPATH=operator:tools:. .venv/bin/python benchmarks/snapshots.py [--runs 3]``. Simulator
timing: a stop or start job takes the ``job_duration`` knob; a snapshot and a rollback are single
calls that a real NAS answers in tens of milliseconds (a ZFS snapshot is a transaction group).
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from tests.conftest import ROOT, Cluster
from tests.harness import Harness, operator_with_simulator

from truenas_incus_dev.localcluster import LocalControlPlane, binaries_dir

GROUP = "incus.truenas.io/v1alpha1"
VM = {"type": "VM", "image": "debian/bookworm", "cpu": "1", "memory": "1Gi"}


def ready(cluster: Cluster, kind: str, name: str, namespace: str, timeout: float = 180) -> float:
    """Seconds until the object's Ready condition is True."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        status = cluster.get(kind, name, namespace).get("status") or {}
        if any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or []):
            return time.monotonic() - started
        time.sleep(0.1)
    raise TimeoutError(f"{kind}/{name} not Ready within {timeout} s")


def apply(cluster: Cluster, namespace: str, kind: str, name: str, spec: dict[str, Any]) -> None:
    manifest = {"apiVersion": GROUP, "kind": kind, "metadata": {"name": name}, "spec": spec}
    result = cluster.apply(manifest, namespace)
    assert result.returncode == 0, result.stderr


def one_round(harness: Harness, namespace: str, kind: str, extra: dict[str, Any] | None = None) -> dict[str, float]:
    cluster = harness.cluster
    name = f"{kind.lower()[:2]}-{uuid.uuid4().hex[:6]}"
    started = time.monotonic()
    harness.apply(namespace, name, {**(VM if kind == "VM" else {}), **(extra or {})})
    ready(cluster, "incusinstance", name, namespace)
    created = time.monotonic() - started
    apply(cluster, namespace, "IncusInstanceSnapshot", f"{name}-s", {"instanceRef": {"name": name}})
    snapshot = ready(cluster, "incusinstancesnapshot", f"{name}-s", namespace)
    spec = {"instanceRef": {"name": name}, "snapshotRef": {"name": f"{name}-s"}}
    apply(cluster, namespace, "IncusInstanceRestore", f"{name}-r", spec)
    restore = ready(cluster, "incusinstancerestore", f"{name}-r", namespace)
    figures = {"create": created, "snapshot": snapshot, "restore": restore}
    if kind == "VM":
        # A clone of the snapshot against a fresh VM from the same image (its base already cached).
        started = time.monotonic()
        clone = {"type": "VM", "source": {"snapshotRef": {"name": f"{name}-s"}}, "cpu": "1", "memory": "1Gi"}
        apply(cluster, namespace, "IncusInstance", f"{name}-c", clone)
        ready(cluster, "incusinstance", f"{name}-c", namespace)
        figures["clone"] = time.monotonic() - started
        started = time.monotonic()
        harness.apply(namespace, f"{name}-f", VM)
        ready(cluster, "incusinstance", f"{name}-f", namespace)
        figures["fresh"] = time.monotonic() - started
        harness.delete(namespace, f"{name}-c")
        harness.delete(namespace, f"{name}-f")
    harness.delete(namespace, name)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    results: dict[str, Any] = {"machine": f"{platform.node()} {platform.machine()} Python {platform.python_version()}"}
    with tempfile.TemporaryDirectory(prefix="tio-bench-snapshots-") as tmp:
        workdir = Path(tmp)
        plane = LocalControlPlane(workdir=workdir / "cp", bin_dir=binaries_dir(progress=False)).start()
        try:
            cluster = Cluster(plane)
            cluster.kubectl("apply", "-f", str(ROOT / "crds"))
            cluster.kubectl("wait", "--for=condition=Established", "crd", "--all", "--timeout=60s")
            for job_duration in (0.05, 0.5):
                run_dir = workdir / f"jobs-{job_duration}"
                run_dir.mkdir()
                harness = operator_with_simulator(cluster, run_dir, "25.10", job_duration=job_duration)
                try:
                    for kind, transport in (("CONTAINER", "websocket"), ("VM", "websocket"), ("CONTAINER", "rest")):
                        namespace = f"bench-{kind.lower()}-{transport}-{str(job_duration).replace('.', '')}"
                        cluster.kubectl("create", "namespace", namespace)
                        extra: dict[str, Any] = {}
                        if transport == "rest":  # a TrueNASConnection of the namespace, over REST v2.0
                            extra["connectionRef"] = {
                                "name": harness.connect_namespace(namespace, harness.sim, transport="rest")
                            }
                        rounds = [one_round(harness, namespace, kind, extra) for _ in range(args.runs)]
                        key = f"{kind} job_duration={job_duration}s" + (" over REST" if transport == "rest" else "")
                        results[key] = rounds
                        for what in ("create", "snapshot", "restore", "clone", "fresh"):
                            values = [r[what] for r in rounds if what in r]
                            if not values:
                                continue
                            print(f"{key}: {what} {min(values):.2f}-{max(values):.2f} s", flush=True)
                finally:
                    harness.operator.stop()
                    harness.sim.stop()
        finally:
            plane.stop()
    if args.output:
        args.output.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
