"""spec.expose against the real API server (issue 26 item 4): the operator's selector-less Service and
EndpointSlices follow the instance (address, power), are put back when someone deletes them, go
with spec.expose and with the resource, and a Service the operator did not make is never taken over.
No garbage collector (kube-controller-manager) runs here: every removal seen is the operator's own.
No DNS server runs either: NAME.NAMESPACE.svc is proven through what cluster DNS and kube-proxy read,
the Service (its cluster IP, no selector) and the EndpointSlices labelled with its name."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from .conftest import Cluster, module_prefix
from .harness import Harness, module_operator, unique

pytestmark = pytest.mark.e2e  # needs the local control plane (kube-apiserver + etcd)

EXPOSE = {"ports": [{"name": "ssh", "port": 22}, {"name": "http", "port": 80, "targetPort": 8080}]}


@pytest.fixture(scope="module", params=["25.10", "26.0"])
def harness(
    cluster: Cluster, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[Harness]:
    profile = str(request.param)
    prefix = f"{module_prefix(request)}{profile.replace('.', '')}-"
    for running in module_operator(cluster, tmp_path_factory.mktemp(f"expose{profile}"), prefix, profile):
        running.prefix = prefix  # type: ignore[attr-defined]
        yield running


@pytest.fixture
def namespace(harness: Harness) -> str:
    name = f"{harness.prefix}{uuid.uuid4().hex[:8]}"  # type: ignore[attr-defined]
    harness.cluster.kubectl("create", "namespace", name)
    return name


def condition(status: dict[str, Any], kind: str) -> dict[str, Any]:
    return next((c for c in status.get("conditions") or [] if c["type"] == kind), {})


def read(harness: Harness, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
    found = harness.cluster.kubectl("get", kind, name, "-n", namespace, "-o", "json", check=False)
    return json.loads(found.stdout) if found.returncode == 0 else None


def slices_of(harness: Harness, namespace: str, service: str) -> list[dict[str, Any]]:
    """The EndpointSlices kube-proxy and cluster DNS use for the Service: those labelled with its name."""
    found = harness.cluster.kubectl(
        "get", "endpointslices", "-n", namespace, "-l", f"kubernetes.io/service-name={service}", "-o", "json"
    )
    return list(json.loads(found.stdout)["items"])


def wait_for(check: Any, what: str, timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def endpoints(harness: Harness, namespace: str, name: str, family: str = "ipv4") -> list[dict[str, Any]]:
    found = read(harness, "endpointslice", namespace, f"{name}-{family}")
    return list(found["endpoints"]) if found else []


def test_the_service_follows_the_instance(harness: Harness, namespace: str) -> None:
    sim = harness.sim.sim
    name = unique("web")
    if sim.profile.has_container:  # 26: a container reports no address; a VM's declared one is shown
        spec: dict[str, Any] = {
            "type": "VM",
            "cpu": "1",
            "memory": "1Gi",
            "nics": [{"name": "lan", "hwaddr": "10:66:6a:0a:14:07", "addresses": ["192.168.10.27/24"]}],
        }
        addresses = ["192.168.10.27"]
    else:
        spec = {}
        addresses = []
    harness.apply(namespace, name, {**spec, "expose": EXPOSE})
    status = harness.wait_status(
        namespace, name, "Exposed", lambda s: condition(s, "Exposed").get("status") == "True", timeout=120
    )
    assert status["service"] == name
    shown = [a["address"] for a in status["addresses"]]
    addresses = addresses or shown
    assert set(addresses) <= set(shown)
    uid = harness.get(namespace, name)["metadata"]["uid"]

    service = read(harness, "service", namespace, name)
    assert service is not None
    assert "selector" not in service["spec"] and service["spec"]["type"] == "ClusterIP"
    assert service["spec"]["clusterIP"] not in ("", "None"), "NAME.NAMESPACE.svc resolves to this cluster IP"
    ports = [(p.get("name"), p["port"], p["targetPort"], p["protocol"]) for p in service["spec"]["ports"]]
    assert ports == [("ssh", 22, 22, "TCP"), ("http", 80, 8080, "TCP")]
    owner = service["metadata"]["ownerReferences"]
    assert owner == [
        {
            "apiVersion": "incus.truenas.io/v1alpha1",
            "kind": "IncusInstance",
            "name": name,
            "uid": uid,
            "controller": True,
        }
    ]
    slices = slices_of(harness, namespace, name)
    ipv4 = next(s for s in slices if s["addressType"] == "IPv4")
    assert ipv4["metadata"]["labels"]["endpointslice.kubernetes.io/managed-by"] == "incus.truenas.io"
    assert ipv4["metadata"]["ownerReferences"] == owner
    assert [e["addresses"][0] for e in ipv4["endpoints"]] == [a for a in addresses if ":" not in a]
    assert all(e["conditions"]["ready"] is True for e in ipv4["endpoints"])
    assert [(p["name"], p["port"], p["protocol"]) for p in ipv4["ports"]] == [("ssh", 22, "TCP"), ("http", 8080, "TCP")]
    families = {s["addressType"] for s in slices}
    assert families == {a["family"] for a in status["addresses"]}, (families, status["addresses"])
    # Idle, nothing is written: the objects are compared at each resync (2 s here), never rewritten.
    versions = [o["metadata"]["resourceVersion"] for o in (service, *slices)]
    time.sleep(5)
    again = [read(harness, "service", namespace, name), *slices_of(harness, namespace, name)]
    assert [o["metadata"]["resourceVersion"] for o in again if o] == versions

    # Stopped: the endpoints stay, not ready (a client is not sent to a stopped instance).
    harness.apply(namespace, name, {**spec, "expose": EXPOSE, "powerState": "Stopped"})
    wait_for(
        lambda: (e := endpoints(harness, namespace, name)) and all(not x["conditions"]["ready"] for x in e),
        "endpoints not ready",
    )
    assert [e["addresses"][0] for e in endpoints(harness, namespace, name)] == [a for a in addresses if ":" not in a]
    assert condition(harness.get(namespace, name)["status"], "Exposed")["reason"] == "NotExposed"
    harness.apply(namespace, name, {**spec, "expose": EXPOSE})
    wait_for(
        lambda: (e := endpoints(harness, namespace, name)) and all(x["conditions"]["ready"] for x in e),
        "endpoints ready again",
    )

    if not sim.profile.has_container:
        # The guest gets another address: the slice follows at the pass that shows it in status.
        before = endpoints(harness, namespace, name)[0]["addresses"][0]
        harness.sim.run(lambda: sim.renumber(name))
        moved = wait_for(
            lambda: (e := endpoints(harness, namespace, name)) and e[0]["addresses"][0] != before and e,
            "the new address in the slice",
        )
        status = harness.get(namespace, name)["status"]
        assert moved[0]["addresses"][0] == status["addresses"][0]["address"]

    # Deleted by someone: put back within the resync interval (2 s here).
    harness.cluster.kubectl("delete", "service", name, "-n", namespace)
    again = wait_for(lambda: read(harness, "service", namespace, name), "the Service put back", timeout=30)
    assert again["metadata"]["ownerReferences"] == owner

    # spec.expose removed: both go, status.service and Exposed too.
    harness.apply(namespace, name, spec)
    wait_for(lambda: read(harness, "service", namespace, name) is None, "the Service removed")
    assert slices_of(harness, namespace, name) == []
    status = harness.wait_status(namespace, name, "no service", lambda s: "service" not in s)
    assert condition(status, "Exposed") == {}


def test_a_service_the_operator_did_not_make_is_never_taken_over(harness: Harness, namespace: str) -> None:
    name = unique("taken")
    theirs = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"selector": {"app": "theirs"}, "ports": [{"port": 5432}]},
    }
    assert harness.cluster.apply(theirs, namespace).returncode == 0
    before = read(harness, "service", namespace, name)
    assert before is not None
    harness.apply(namespace, name, {"expose": {"ports": [{"port": 5432}]}})
    status = harness.wait_status(
        namespace, name, "ExposeConflict", lambda s: condition(s, "Exposed").get("reason") == "ExposeConflict"
    )
    assert "is not this IncusInstance's" in condition(status, "Exposed")["message"]
    assert "service" not in status
    harness.wait_event(namespace, name, "ExposeConflict")
    assert slices_of(harness, namespace, name) == []
    after = read(harness, "service", namespace, name)
    assert after is not None and after["metadata"]["resourceVersion"] == before["metadata"]["resourceVersion"]
    assert harness.delete(namespace, name).returncode == 0
    kept = read(harness, "service", namespace, name)
    assert kept is not None and kept["metadata"]["uid"] == before["metadata"]["uid"], "deleting ours left theirs"


def test_deleting_the_resource_removes_its_service(harness: Harness, namespace: str) -> None:
    name = unique("gone")
    spec: dict[str, Any] = {"expose": {"ports": [{"port": 443, "protocol": "TCP"}], "annotations": {"team": "a"}}}
    harness.apply(namespace, name, spec)
    harness.wait_status(namespace, name, "service", lambda s: s.get("service") == name, timeout=90)
    service = read(harness, "service", namespace, name)
    assert service is not None and service["metadata"]["annotations"]["team"] == "a"
    # An annotation dropped from the spec is dropped from the Service (server-side apply owns it).
    harness.apply(namespace, name, {"expose": {"ports": [{"port": 443}], "annotations": {"other": "b"}}})
    wait_for(
        lambda: (
            (s := read(harness, "service", namespace, name))
            and "team" not in s["metadata"].get("annotations", {})
            and s["metadata"]["annotations"].get("other") == "b"
        ),
        "the annotations as the spec says",
    )
    assert harness.delete(namespace, name).returncode == 0
    assert read(harness, "service", namespace, name) is None
    assert slices_of(harness, namespace, name) == []


def test_the_policy_refuses_a_load_balancer_by_default(harness: Harness, namespace: str) -> None:
    name = unique("lb")
    harness.apply(namespace, name, {"expose": {"type": "LoadBalancer", "ports": [{"port": 80}]}})
    status = harness.wait_synced_false(namespace, name, "PolicyDenied")
    assert "expose.serviceTypes" in condition(status, "Synced")["message"]
    assert read(harness, "service", namespace, name) is None
