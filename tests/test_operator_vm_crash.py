"""Crash safety of VMs on vm.* (TrueNAS 25.10 simulator): SIGKILL the operator at random points of
create, update and delete of several VMs, then converge and check what is left on TrueNAS: one VM per
live resource with its root disk, seed and NIC, nothing of the deleted ones, no leaked datasets or
files, and one conversion of the cached base, which stays."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from truenas_simulator.images import write_mirror

from .conftest import Cluster
from .harness import Chaos, Harness, OperatorProcess, operator_env, start_simulator, unique, wait_until

pytestmark = pytest.mark.e2e  # needs the local control plane (kube-apiserver + etcd)

ROOT = "tank/incus-operator"


def vm_spec(**fields: Any) -> dict[str, Any]:
    return {"type": "VM", "image": "debian/bookworm", "cpu": "1", "nics": [{"name": "eth0", "parent": "br0"}], **fields}


def snapshot_of_truenas(harness: Harness) -> dict[str, Any]:
    sim = harness.sim.sim

    def read() -> dict[str, Any]:
        return {
            "vms": {
                vm.name: {
                    "state": vm.state,
                    "memory": vm.config["memory"],
                    "vcpus": vm.config["vcpus"],
                    "devices": sorted(
                        (str(a["dtype"]), str(a.get("path") or a.get("nic_attach"))) for a in vm.devices.values()
                    ),
                }
                for vm in sim.vms.vms.values()
            },
            "datasets": sorted(sim.storage.datasets),
            "snapshots": sorted(sim.storage.snapshots),
            "files": sorted(sim.storage.files),
            "converts": sum(
                1 for j in sim.jobs.jobs.values() if j.method in ("vm.device.convert", "vm.import_disk_image")
            ),
            "created": Counter(str(vm.name) for vm in sim.vms.vms.values()),
        }

    return harness.sim.run(read)


def test_sigkill_during_vm_create_update_delete_leaks_nothing(cluster: Cluster, namespace: str, tmp_path: Path) -> None:
    # Jobs (uploads, the conversion, stops) take 0.4 s so that kills land inside them, not only between.
    sim = start_simulator("25.10", job_duration=0.4)
    mirror = write_mirror(list(sim.sim.images.values()), tmp_path / "mirror")
    env = operator_env(sim, tmp_path, resync=2.0, TIO_VM_IMAGE_SERVER=str(mirror))
    operator = OperatorProcess(cluster, env, tmp_path / "operator.log", args=["-n", namespace]).start()
    harness = Harness(cluster, sim, operator, tmp_path)
    chaos = Chaos(operator, seed=20261127)

    try:
        names = [unique("vmcrash") for _ in range(5)]
        for name in names:
            harness.apply(namespace, name, vm_spec())
        chaos.rounds(8)  # during the download, the conversion, the clones and the creates
        for name in names:
            harness.apply(namespace, name, vm_spec(cpu="2", memory="1Gi"))
        chaos.rounds(6)  # during updates
        deleted = names[:2]
        for name in deleted:
            harness.delete(namespace, name, wait=False)
        late = [unique("vmlate") for _ in range(2)]
        for name in late:
            harness.apply(namespace, name, vm_spec(powerState="Stopped"))
        chaos.rounds(7)  # during deletes and more creates
        assert chaos.kills >= 20

        alive = names[2:] + late
        for name in alive:
            harness.wait_status(
                namespace,
                name,
                "converged",
                lambda s: any(c["type"] == "Ready" and c["status"] == "True" for c in s.get("conditions", [])),
                timeout=120,
            )
        wait_until(lambda: not any(harness.exists(namespace, n) for n in deleted), timeout=120, what="deletions")
        expected = {n.replace("-", "_") for n in alive}
        wait_until(
            lambda: set(snapshot_of_truenas(harness)["vms"]) == expected, timeout=30, what="exactly the live VMs"
        )

        seen = snapshot_of_truenas(harness)
        print(f"\nafter {chaos.kills} SIGKILLs: {seen}")
        assert all(count == 1 for count in seen["created"].values())
        for name in alive:
            vm = seen["vms"][name.replace("-", "_")]
            home = f"{ROOT}/vms/{name.replace('-', '_')}"
            assert vm["devices"] == sorted(
                [("CDROM", f"/mnt/{home}/seed.iso"), ("DISK", f"/dev/zvol/{home}/root"), ("NIC", "br0")]
            ), (name, vm)
        for name in names[2:]:
            vm = seen["vms"][name.replace("-", "_")]
            assert (vm["state"], vm["vcpus"], vm["memory"]) == ("RUNNING", 2, 1024), (name, vm)
        for name in late:
            assert seen["vms"][name.replace("-", "_")]["state"] == "STOPPED"

        per_vm = {d for d in seen["datasets"] if d.startswith(f"{ROOT}/vms/")}
        assert per_vm == {f"{ROOT}/vms/{n}" for n in expected} | {f"{ROOT}/vms/{n}/root" for n in expected}
        images = [d for d in seen["datasets"] if d.startswith(f"{ROOT}/images/")]
        assert len(images) == 1 and not images[0].endswith("-upload"), images  # the base, no leftover upload
        assert seen["snapshots"] == [f"{images[0]}@base"]
        assert seen["converts"] == 1  # the base was never converted twice
        assert set(seen["files"]) == {f"/mnt/{ROOT}/vms/{n}/seed.iso" for n in expected}

        for name in alive:
            harness.delete(namespace, name, wait=False)
        wait_until(lambda: not any(harness.exists(namespace, n) for n in alive), timeout=120, what="all deleted")
        final = snapshot_of_truenas(harness)
        assert final["vms"] == {}
        assert [d for d in final["datasets"] if d.startswith(f"{ROOT}/vms")] == [f"{ROOT}/vms"]
        assert final["files"] == [] and final["snapshots"] == [f"{images[0]}@base"]  # the cached base stays
    finally:
        operator.stop()
        sim.stop()
