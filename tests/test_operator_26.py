"""The operator against TrueNAS 26 (container.*), and across the upgrade from 25.10."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from .conftest import Cluster, module_prefix
from .harness import (
    Harness,
    module_operator,
    unique,
    wait_until,
)

pytestmark = pytest.mark.e2e  # needs the local control plane (kube-apiserver + etcd, helm)


@pytest.fixture(scope="module")
def harness(
    cluster: Cluster, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[Harness]:
    # Only this module's namespaces: other modules' leftovers are not this operator's business.
    yield from module_operator(cluster, tmp_path_factory.mktemp("operator26"), module_prefix(request), "26.0")


def conditions(status: dict[str, object]) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["reason"]) for c in status["conditions"]}  # type: ignore[attr-defined]


def test_container_lifecycle_on_26(harness: Harness, namespace: str) -> None:
    name = unique("web")
    harness.apply(namespace, name, {"cpu": "0-1", "environment": {"TZ": "UTC"}})
    status = harness.wait_ready(namespace, name)
    container = harness.instance(name)
    assert container.state == "RUNNING" and container.initenv == {"TZ": "UTC"} and container.cpuset == "0-1"
    assert status["phase"] == "Running" and status["instanceId"] == str(container.id)
    assert conditions(status)["Synced"] == ("True", "ReconcileSuccess")
    harness.apply(namespace, name, {"cpu": "0-1", "environment": {"TZ": "Europe/Berlin"}, "autostart": False})
    wait_until(lambda: harness.instance(name).initenv == {"TZ": "Europe/Berlin"}, what="initenv updated")
    harness.wait_status(
        namespace, name, "autostart off", lambda s: s.get("autostart") is False and s.get("observedGeneration") == 2
    )
    harness.apply(namespace, name, {"powerState": "Stopped"})
    harness.wait_status(namespace, name, "Stopped", lambda s: s.get("phase") == "Stopped")
    assert harness.instance(name).state == "STOPPED" and harness.instance(name).cpuset is None
    harness.apply(namespace, name, {"powerState": "Running"})
    harness.wait_status(namespace, name, "Running", lambda s: s.get("phase") == "Running")
    assert harness.delete(namespace, name).returncode == 0
    assert name not in harness.instance_names() and not harness.exists(namespace, name)
    # TrueNAS 26: the operator logged in with SCRAM (docs/scram.md), never with the key in clear.
    tried = harness.sim.run(lambda: dict(harness.sim.sim.auth.mechanisms_tried))
    assert tried.get("SCRAM", 0) >= 2 and not tried.get("LEGACY_API_KEY") and not tried.get("API_KEY_PLAIN"), tried


def test_fields_26_cannot_honour_are_reported(harness: Harness, namespace: str) -> None:
    name = unique("part")
    harness.apply(
        namespace,
        name,
        {
            "cpu": "2",
            "memory": "1Gi",
            "devices": [
                {"name": "data", "type": "DISK", "source": "/mnt/tank/data", "destination": "/data", "readonly": True},
                {
                    "name": "http",
                    "type": "PROXY",
                    "extra": {"source_proto": "TCP", "source_port": 8080, "dest_proto": "TCP", "dest_port": 80},
                },
            ],
            "nics": [{"name": "eth1", "parent": "br0"}],
        },
    )
    status = harness.wait_ready(namespace, name)
    synced = next(c for c in status["conditions"] if c["type"] == "Synced")
    assert (synced["status"], synced["reason"]) == ("True", "PartiallyApplied")
    for field in ("memory", "cpu", "devices[data].readonly", "devices[http] (PROXY)", "devices[].name"):
        assert field in synced["message"]
    event = harness.wait_event(namespace, name, "Unsupported")
    assert "memory" in event["message"] and event["type"] == "Warning"
    container = harness.instance(name)
    kinds = sorted(d["dtype"] for d in container.devices.values())
    assert kinds == ["FILESYSTEM", "NIC"] and container.cpuset is None
    writes = harness.sim.run(lambda: harness.sim.sim.counters.snapshot()["writes"])
    time.sleep(3)  # settled: nothing is retried for the unsupported fields
    assert harness.sim.run(lambda: harness.sim.sim.counters.snapshot()["writes"]) == writes


def test_drift_and_power_on_26(harness: Harness, namespace: str) -> None:
    manual, running = unique("man"), unique("run")
    harness.apply(namespace, manual, {"powerState": "Manual"})
    harness.apply(namespace, running, {})
    harness.wait_ready(namespace, manual)
    harness.wait_ready(namespace, running)
    harness.sim.run(lambda: harness.sim.sim.set_power(manual, "STOPPED"))
    harness.wait_status(namespace, manual, "Stopped", lambda s: s.get("phase") == "Stopped", timeout=2.0)
    harness.sim.run(lambda: harness.sim.sim.set_power(running, "STOPPED"))
    wait_until(lambda: harness.instance(running).state == "RUNNING", timeout=10, what="restarted by the operator")
    assert harness.instance(manual).state == "STOPPED"


def test_adoption_safety_on_26(harness: Harness, namespace: str) -> None:
    name = unique("adopt")
    harness.sim.run(lambda: harness.sim.sim.seed_instance(name=name, status="RUNNING"))
    harness.apply(namespace, name, {"environment": {"A": "1"}})
    harness.wait_synced_false(namespace, name, "AlreadyExists")
    assert harness.instance(name).initenv == {}
    creates = harness.calls().get("container.create", 0)
    harness.apply(namespace, name, {"environment": {"A": "1"}}, annotations={"incus.truenas.io/adopt": "true"})
    harness.wait_ready(namespace, name)
    assert harness.instance(name).initenv == {"A": "1"}
    assert harness.calls().get("container.create", 0) == creates


def test_vm_on_26_goes_through_vm_api(harness: Harness, namespace: str) -> None:
    """26 has no Incus VMs; a VM resource becomes a libvirt VM through vm.* (issue 16)."""
    name = unique("vm")
    harness.apply(namespace, name, {"type": "VM", "image": "debian/bookworm", "cpu": "2", "memory": "1Gi"})
    status = harness.wait_ready(namespace, name, timeout=60)
    assert status["phase"] == "Running"
    assert harness.calls().get("vm.create", 0) >= 1 and harness.calls().get("vm.device.convert", 0) >= 1


def test_bad_image_alias_on_26(harness: Harness, namespace: str) -> None:
    name = unique("img")
    harness.apply(namespace, name, {"image": "plan9/4th"})
    status = harness.wait_synced_false(namespace, name, "ImageNotFound")
    assert "no image in the TrueNAS registry matches 'plan9/4th'" in status["message"]
