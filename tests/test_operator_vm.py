"""VMs on vm.* end to end (TrueNAS 25.10 simulator): two VMs from one alias (the second without a
conversion), cloud-init through the seed, update, stop, delete without leaks."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from .conftest import Cluster, module_prefix
from .harness import (
    Harness,
    module_operator,
    unique,
    wait_until,
)
from .test_client_vm import mime_parts

pytestmark = pytest.mark.e2e  # needs the local control plane (kube-apiserver + etcd)


@pytest.fixture(scope="module")
def harness(
    cluster: Cluster, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[Harness]:
    # VM images from a local mirror of the simulator's (no internet here): module_operator writes it
    yield from module_operator(cluster, tmp_path_factory.mktemp("operator"), module_prefix(request), "25.10")


def vm(harness: Harness, name: str) -> Any:
    return harness.sim.run(lambda: harness.sim.sim.vms.by_name(name.replace("-", "_")))


def converts(harness: Harness) -> int:
    calls = harness.calls()
    return calls.get("vm.device.convert", 0) + calls.get("vm.import_disk_image", 0)


def test_two_vms_from_one_alias_update_stop_delete(harness: Harness, namespace: str) -> None:
    first, second = unique("vm"), unique("vm")
    spec: dict[str, Any] = {
        "type": "VM",
        "image": "debian/bookworm",
        "cpu": "2",
        "memory": "2Gi",
        "rootDiskSize": "10Gi",
        "environment": {"TZ": "UTC"},
        "cloudInit": {"userData": "#cloud-config\npackages: [nginx]\n"},
        "nics": [{"name": "eth1", "parent": "br0"}],
    }
    started = time.monotonic()
    harness.apply(namespace, first, spec)
    try:
        status = harness.wait_ready(namespace, first, timeout=30)
    except AssertionError:
        print(
            harness.get(namespace, first).get("status"), harness.sim.run(lambda: list(harness.sim.sim.vms.vms.values()))
        )
        raise
    first_seconds = time.monotonic() - started
    assert status["phase"] == "Running" and converts(harness) == 1
    synced = harness.condition(namespace, first, "Synced")
    assert (synced["status"], synced["reason"]) == ("True", "PartiallyApplied") and "nics[].name" in synced["message"]
    machine = vm(harness, first)
    assert machine.state == "RUNNING" and machine.config["memory"] == 2048 and machine.config["vcpus"] == 2
    seed = machine.guest["nocloud"]
    parts = [p.decode() for p in mime_parts(seed["user-data"])]  # environment and user-data as one multi-part
    assert seed["meta-data"].startswith(f"instance-id: {first}\n") and parts[1] == spec["cloudInit"]["userData"]
    assert "TZ=" in parts[0]

    started = time.monotonic()
    plain = {k: v for k, v in spec.items() if k not in ("cloudInit", "environment", "nics")}
    harness.apply(namespace, second, plain)
    harness.wait_ready(namespace, second, timeout=60)
    second_seconds = time.monotonic() - started
    assert converts(harness) == 1  # the second VM cloned the cached base: no second conversion
    print(f"\nsimulator timing: first VM {first_seconds:.2f}s, second VM {second_seconds:.2f}s")

    harness.apply(namespace, first, {**spec, "memory": "4Gi"})
    wait_until(lambda: vm(harness, first).config["memory"] == 4096, what="memory updated")
    harness.apply(namespace, first, {**spec, "memory": "4Gi", "powerState": "Stopped"})
    harness.wait_status(namespace, first, "Stopped", lambda s: s.get("phase") == "Stopped", timeout=60)
    assert vm(harness, first).state == "STOPPED"

    harness.delete(namespace, first)
    harness.delete(namespace, second)
    assert harness.sim.run(lambda: dict(harness.sim.sim.vms.vms)) == {}
    datasets = harness.sim.run(lambda: list(harness.sim.sim.storage.datasets))
    assert not [d for d in datasets if "/vms/" in d], datasets  # no leaked root disks or seeds
    assert any(d.startswith("tank/incus-operator/images/") for d in datasets)  # the cached base stays
