"""The operator against TrueNAS 27 (middleware master, api/v27_0_0): a running container deleted through
27's container.delete job, and a VM whose guest agent's addresses reach status.ipAddresses."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from truenas_simulator.images import write_mirror

from .conftest import Cluster, module_prefix
from .harness import (
    ADOPT_ANYWHERE,
    Harness,
    OperatorProcess,
    operator_env,
    start_simulator,
    unique,
    wait_until,
    write_policy,
)
from .test_client_27 import AGENT

pytestmark = pytest.mark.e2e  # needs the local control plane (kube-apiserver + etcd)


@pytest.fixture(scope="module")
def harness(
    cluster: Cluster, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[Harness]:
    workdir = tmp_path_factory.mktemp("operator27")
    sim = start_simulator("27.0", job_duration=0.05)
    mirror = write_mirror(list(sim.sim.images.values()), workdir / "mirror")
    env = {**operator_env(sim, workdir, TIO_VM_IMAGE_SERVER=str(mirror)), **write_policy(workdir, ADOPT_ANYWHERE)}
    operator = OperatorProcess(cluster, env, workdir / "operator.log", args=["-n", f"{module_prefix(request)}*"])
    running = Harness(cluster, sim, operator.start(), workdir)
    try:
        yield running
    finally:
        running.operator.stop()
        running.sim.stop()


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
    spec: dict[str, Any] = {"type": "VM", "image": "debian/bookworm", "cpu": "1", "memory": "1Gi"}
    harness.apply(namespace, name, spec)
    harness.wait_ready(namespace, name, timeout=60)
    wait_until(
        lambda: (
            (harness.get(namespace, name).get("status") or {}).get("ipAddresses") == ["192.168.1.50", "2001:db8::50"]
        ),
        what="status.ipAddresses from the guest agent",
        timeout=30,
    )
    harness.delete(namespace, name)
    assert harness.sim.run(lambda: dict(harness.sim.sim.vms.vms)) == {}
