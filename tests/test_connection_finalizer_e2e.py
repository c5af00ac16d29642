"""A TrueNASConnection holds a finalizer only while IncusInstances name it (issue 21 item 7): one
that nothing names is deleted at once, even with the operator gone; one in use waits for its
instances, so their teardown still has the credentials."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from .conftest import Cluster, module_prefix
from .harness import Harness, module_operator, unique, wait_until

pytestmark = pytest.mark.e2e  # needs the local control plane (kube-apiserver + etcd)

FINALIZER = "incus.truenas.io/finalizer"


@pytest.fixture(scope="module")
def harness(
    cluster: Cluster, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[Harness]:
    yield from module_operator(cluster, tmp_path_factory.mktemp("operator"), module_prefix(request), "25.10")


def finalizers(cluster: Cluster, namespace: str, name: str) -> list[str]:
    found: list[str] = (cluster.get("truenasconnection", name, namespace).get("metadata") or {}).get("finalizers", [])
    return found


def connected(cluster: Cluster, namespace: str, name: str) -> bool:
    status = cluster.get("truenasconnection", name, namespace).get("status") or {}
    return any(c["type"] == "Ready" and c["status"] == "True" for c in status.get("conditions", []))


def test_a_connection_nothing_names_is_deleted_without_the_operator(
    harness: Harness, cluster: Cluster, namespace: str
) -> None:
    harness.connect_namespace(namespace, harness.sim)
    wait_until(lambda: connected(cluster, namespace, "nas"), 60, what="the connection to come up")
    assert FINALIZER not in finalizers(cluster, namespace, "nas")
    harness.operator.stop()
    try:
        deleted = cluster.kubectl("delete", "truenasconnection", "nas", "-n", namespace, "--timeout=60s", check=False)
        assert deleted.returncode == 0, deleted.stderr
    finally:
        harness.operator.start()


def test_a_connection_in_use_waits_for_its_instances(harness: Harness, cluster: Cluster, namespace: str) -> None:
    harness.connect_namespace(namespace, harness.sim)
    name = unique("held")
    harness.apply(namespace, name, {"connectionRef": {"name": "nas"}})
    harness.wait_ready(namespace, name, timeout=60)
    wait_until(lambda: FINALIZER in finalizers(cluster, namespace, "nas"), 30, what="the connection's finalizer")
    cluster.kubectl("delete", "truenasconnection", "nas", "-n", namespace, "--wait=false")
    wait_until(
        lambda: cluster.get("truenasconnection", "nas", namespace)["metadata"].get("deletionTimestamp"),
        30,
        what="the deletion to start",
    )
    assert FINALIZER in finalizers(cluster, namespace, "nas"), "held while an instance names it"
    # Said once, by the operator (kopf's own "Handler ... failed temporarily" Events said `Action?`).
    waiting = harness.wait_event(namespace, "nas", "InUse")
    assert waiting["type"] == "Normal" and waiting["action"] == "Delete", waiting
    assert "1 IncusInstance" in waiting["message"], waiting
    time.sleep(6)  # the handler's next retry (5 s) posts nothing new
    assert [e["reason"] for e in harness.events(namespace, "nas")].count("InUse") == 1
    assert harness.delete(namespace, name).returncode == 0  # its teardown still has the credentials
    assert name not in harness.instance_names()
    wait_until(
        lambda: cluster.kubectl("get", "truenasconnection", "nas", "-n", namespace, check=False).returncode != 0,
        60,
        what="the connection to go once nothing names it",
    )
    for event in harness.events(namespace, "nas") + harness.events(namespace, name):
        assert event["reportingComponent"] == "truenas-incus-operator" and event["action"] != "Action?", event


def test_a_connection_in_use_is_still_held_after_a_restart(harness: Harness, cluster: Cluster, namespace: str) -> None:
    """The operator's own registry of who names a connection (not a kopf index, issue 27): after a
    restart the instances that existed before are known again, and until they are, nothing is let go."""
    harness.connect_namespace(namespace, harness.sim)
    name = unique("kept")
    harness.apply(namespace, name, {"connectionRef": {"name": "nas"}})
    harness.wait_ready(namespace, name, timeout=60)
    wait_until(lambda: FINALIZER in finalizers(cluster, namespace, "nas"), 30, what="the connection's finalizer")
    harness.operator.stop()
    harness.operator.start()
    cluster.kubectl("delete", "truenasconnection", "nas", "-n", namespace, "--wait=false")
    waiting = harness.wait_event(namespace, "nas", "InUse")
    assert "1 IncusInstance" in waiting["message"], waiting
    assert FINALIZER in finalizers(cluster, namespace, "nas"), "held while an instance names it"
    assert harness.delete(namespace, name).returncode == 0
    wait_until(
        lambda: cluster.kubectl("get", "truenasconnection", "nas", "-n", namespace, check=False).returncode != 0,
        60,
        what="the connection to go once nothing names it",
    )


def test_a_connection_whose_instances_went_is_deleted_without_the_operator(
    harness: Harness, cluster: Cluster, namespace: str
) -> None:
    """kopf drops a finalizer nothing needs at the connection's next event: the last instance's going
    causes one, so the connection is free before the operator might stop (a delete would hang)."""
    harness.connect_namespace(namespace, harness.sim)
    name = unique("gone")
    harness.apply(namespace, name, {"connectionRef": {"name": "nas"}})
    harness.wait_ready(namespace, name, timeout=60)
    wait_until(lambda: FINALIZER in finalizers(cluster, namespace, "nas"), 30, what="the connection's finalizer")
    assert harness.delete(namespace, name).returncode == 0
    wait_until(lambda: FINALIZER not in finalizers(cluster, namespace, "nas"), 30, what="the finalizer to go")
    harness.operator.stop()
    try:
        deleted = cluster.kubectl("delete", "truenasconnection", "nas", "-n", namespace, "--timeout=60s", check=False)
        assert deleted.returncode == 0, deleted.stderr
    finally:
        harness.operator.start()
