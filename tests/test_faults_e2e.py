"""Faults injected live (issue 12, item 6) against the operator as a subprocess and a real
kube-apiserver: what the user sees in status when Secrets, connections and TrueNAS itself fail."""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .conftest import Cluster, module_prefix
from .harness import Harness, module_operator, start_simulator, unique

pytestmark = pytest.mark.e2e  # needs the local control plane (kube-apiserver + etcd)


@pytest.fixture(scope="module")
def harness(
    cluster: Cluster, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[Harness]:
    yield from module_operator(cluster, tmp_path_factory.mktemp("operator"), module_prefix(request), "25.10")


def connection_condition(harness: Harness, namespace: str, name: str, kind: str = "Ready") -> dict[str, Any]:
    status = harness.cluster.get("truenasconnection", name, namespace).get("status") or {}
    return next((dict(c) for c in status.get("conditions", []) if c["type"] == kind), {})


def wait_connection(harness: Harness, namespace: str, name: str, status: str, timeout: float = 30.0) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        condition = connection_condition(harness, namespace, name)
        return condition if condition.get("status") == status else None

    found: dict[str, Any] = harness.cluster.wait_for(check, timeout=timeout, what=f"{name} Ready={status}")
    return found


def test_a_secret_key_that_is_not_utf8_is_named_in_both_statuses(harness: Harness, namespace: str) -> None:
    """Before: no TrueNASConnection status at all, and its instances said "does not exist (yet)"."""
    binary = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "nas-key", "labels": {"incus.truenas.io/credentials": "true"}},
        "type": "Opaque",
        "data": {"apiKey": base64.b64encode(b"\xff\xfe1-not-utf8\x80").decode()},
    }
    connection = {
        "apiVersion": "incus.truenas.io/v1alpha1",
        "kind": "TrueNASConnection",
        "metadata": {"name": "nas"},
        "spec": {"url": harness.sim.ws_url, "apiKeySecretRef": {"name": "nas-key", "key": "apiKey"}},
    }
    for manifest in (binary, connection):
        result = harness.cluster.apply(manifest, namespace)
        assert result.returncode == 0, result.stderr
    ready = wait_connection(harness, namespace, "nas", "False")
    assert ready["reason"] == "SecretUnreadable" and "not UTF-8" in ready["message"]
    assert "nas-key" in ready["message"]
    name = unique("utf")
    harness.apply(namespace, name, {"connectionRef": {"name": "nas"}})
    status = harness.wait_synced_false(namespace, name, "SecretUnreadable")
    synced = next(c for c in status["conditions"] if c["type"] == "Synced")
    assert "not UTF-8" in synced["message"] and "does not exist" not in synced["message"]


def test_ready_follows_an_outage_of_truenas(harness: Harness, namespace: str, tmp_path: Path) -> None:
    """Before: Ready said Connected throughout an outage (written only on configuration events)."""
    sim = start_simulator("25.10", cert_dir=tmp_path)
    try:
        harness.connect_namespace(namespace, sim)
        wait_connection(harness, namespace, "nas", "True")
        assert sim.server is not None
        sim.submit(sim.server.stop()).result(timeout=30)  # TrueNAS goes away
        down = wait_connection(harness, namespace, "nas", "False")
        assert down["reason"] != "Connected"
        sim.submit(sim.server.start()).result(timeout=30)  # and comes back on the same address
        up = wait_connection(harness, namespace, "nas", "True", timeout=60)
        assert up["reason"] == "Connected"
    finally:
        sim.stop()


def test_a_resource_naming_a_missing_connection_is_deleted_promptly(harness: Harness, namespace: str) -> None:
    """It never created anything, so its deletion needs no TrueNAS (the ownership ledger says so)."""
    name = unique("gone")
    harness.apply(namespace, name, {"connectionRef": {"name": "no-such-connection"}})
    harness.wait_synced_false(namespace, name, "ConnectionNotFound")
    started = time.monotonic()
    deleted = harness.delete(namespace, name)
    assert deleted.returncode == 0, deleted.stderr
    assert not harness.exists(namespace, name)
    assert time.monotonic() - started < 10
