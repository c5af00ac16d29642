"""The operator against TrueNAS 27 (middleware master, api/v27_0_0): a running container deleted through
27's container.delete job, and a VM whose guest agent's addresses reach status.addresses (with the
interface each is on) and make it Ready where spec.readiness.address asks."""

from __future__ import annotations

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
from .test_client_27 import AGENT

pytestmark = pytest.mark.e2e  # needs the local control plane (kube-apiserver + etcd)


@pytest.fixture(scope="module")
def harness(
    cluster: Cluster, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[Harness]:
    # VM images from a local mirror of the simulator's (no internet here): module_operator writes it
    yield from module_operator(cluster, tmp_path_factory.mktemp("operator27"), module_prefix(request), "27.0")


def test_running_container_is_deleted_through_the_job(harness: Harness, namespace: str) -> None:
    name = unique("web")
    harness.apply(namespace, name, {"cpu": "0-1"})
    harness.wait_ready(namespace, name)
    assert harness.instance(name).state == "RUNNING"
    assert harness.delete(namespace, name).returncode == 0
    assert name not in harness.instance_names() and not harness.exists(namespace, name)
    assert harness.calls().get("container.delete", 0) >= 1


def test_vm_status_shows_the_guest_agents_addresses(harness: Harness, namespace: str) -> None:
    harness.sim.run(lambda: setattr(harness.sim.sim.knobs, "guest_agent_interfaces", AGENT))
    name = unique("vm")
    spec: dict[str, Any] = {
        "type": "VM",
        "image": "debian/bookworm",
        "cpu": "1",
        "memory": "1Gi",
        "readiness": {"address": True},  # 27's guest agent can tell: no PartiallyApplied here
    }
    harness.apply(namespace, name, spec)
    harness.wait_ready(namespace, name, timeout=60)
    wait_until(
        lambda: (
            (harness.get(namespace, name).get("status") or {}).get("ipAddresses") == ["192.168.1.50", "2001:db8::50"]
        ),
        what="status.ipAddresses from the guest agent",
        timeout=30,
    )
    status = harness.get(namespace, name)["status"]
    assert status["addresses"] == [
        {"address": "192.168.1.50", "family": "IPv4", "interface": "enp1s0", "source": "TrueNAS"},
        {"address": "2001:db8::50", "family": "IPv6", "interface": "enp1s0", "source": "TrueNAS"},
    ]
    synced = next(c for c in status["conditions"] if c["type"] == "Synced")
    assert "readiness.address" not in synced["message"], synced
    harness.delete(namespace, name)
    assert harness.sim.run(lambda: dict(harness.sim.sim.vms.vms)) == {}
