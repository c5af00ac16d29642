"""spec.expose without a cluster: the model's refusals (the CRD's CEL rules say the same at admission,
tests/admission/invalid.yaml), the manifests the operator writes, how an update keeps what the API
server and others set, what is read back from a slice, the policy's expose block, and the status."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest
from pydantic import ValidationError

from truenas_incus_operator.instances.exposure import (
    ANNOTATIONS_RECORD,
    EndpointBounds,
    Exposer,
    _service_matches,
    _slice_matches,
    owned,
    service_manifest,
    slice_addresses,
    slice_manifest,
    updated,
)
from truenas_incus_operator.instances.resource import ExposeMemo
from truenas_incus_operator.models import Expose, IncusInstanceSpec
from truenas_incus_operator.policy import Policy
from truenas_incus_operator.problems import Reason
from truenas_incus_operator.reconcile import Desired, Plan
from truenas_incus_operator.status import Exposure, render_instance
from truenas_incus_operator.truenas.types import InstanceStatus, ObservedImage, ObservedInstance

UID = "0f3c7a52-4c1e-4d8e-9b7a-2f1f4c9e5a11"


def desired(**expose: Any) -> Desired:
    spec = IncusInstanceSpec.model_validate(
        {"type": "CONTAINER", "image": "debian/bookworm", "expose": expose or {"ports": [{"port": 80}]}}
    )
    return Desired(namespace="apps", name="web", generation=1, spec=spec, uid=UID)


def expose_of(d: Desired) -> Expose:
    assert d.spec.expose is not None
    return d.spec.expose


@pytest.mark.parametrize(
    "expose,message",
    [
        ({"ports": []}, "at least 1"),
        ({"ports": [{"port": 0}]}, "greater than or equal to 1"),
        ({"ports": [{"port": 80}, {"port": 443}]}, "every port needs a name once there are two"),
        ({"ports": [{"name": "a", "port": 80}, {"name": "a", "port": 443}]}, "names must be unique"),
        ({"ports": [{"name": "a", "port": 53}, {"name": "b", "port": 53, "protocol": "TCP"}]}, "at most once"),
        ({"ports": [{"port": 80, "name": "HTTP"}]}, "String should match pattern"),
        ({"ports": [{"port": 80}], "type": "ExternalName"}, "ClusterIP"),
        ({"ports": [{"port": 80}], "annotations": {"incus.truenas.io/x": "1"}}, "not the tenant's"),
        ({"ports": [{"port": 80}], "annotations": {"argocd.argoproj.io/sync-wave": "1"}}, "not the tenant's"),
        ({"ports": [{"port": 80}], "annotations": {"bad key": "1"}}, "not a qualified name"),
        ({"ports": [{"port": 80}], "annotations": {"service.kubernetes.io/topology-mode": "1"}}, "Kubernetes's own"),
        ({"ports": [{"port": 80}], "annotations": {"external-dns.alpha.kubernetes.io/hostname": "x"}}, "own keys"),
        ({"ports": [{"port": 80}], "annotations": {"k8s.io/x": "1"}}, "Kubernetes's own"),
        ({"ports": [{"port": 80}], "networks": ["192.168.10.0"]}, "with its prefix length"),
        ({"ports": [{"port": 80}], "networks": ["192.168.10.0/33"]}, "not a network"),
    ],
)
def test_the_model_refuses_what_admission_refuses(expose: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        Expose.model_validate(expose)


def test_same_port_on_two_protocols_is_fine() -> None:
    ports = [{"name": "dns", "port": 53, "protocol": "UDP"}, {"name": "dns-tcp", "port": 53}]
    assert [p.transport for p in Expose.model_validate({"ports": ports}).ports] == ["UDP", "TCP"]


def test_the_service_has_no_selector_and_is_owned_by_the_resource() -> None:
    d = desired(ports=[{"name": "http", "port": 80, "targetPort": 8080}], annotations={"team": "a"})
    service = service_manifest(d, expose_of(d))
    assert "selector" not in service["spec"]
    assert service["spec"] == {
        "type": "ClusterIP",
        "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}],
    }
    assert service["metadata"]["ownerReferences"] == [
        {
            "apiVersion": "incus.truenas.io/v1alpha1",
            "kind": "IncusInstance",
            "name": "web",
            "uid": UID,
            "controller": True,
        }
    ]
    assert service["metadata"]["annotations"] == {"team": "a", ANNOTATIONS_RECORD: "team"}
    assert owned(service, UID) and not owned(service, "another-uid")


def test_a_slice_holds_the_target_ports_and_the_readiness() -> None:
    d = desired(ports=[{"name": "http", "port": 80, "targetPort": 8080}])
    found = slice_manifest(d, expose_of(d), "IPv4", ("192.168.10.20",), ready=False)
    assert found["metadata"]["name"] == "web-ipv4"
    assert found["metadata"]["labels"] == {
        "kubernetes.io/service-name": "web",
        "endpointslice.kubernetes.io/managed-by": "incus.truenas.io",
        "incus.truenas.io/instance": "web",
    }
    assert found["endpoints"] == [
        {"addresses": ["192.168.10.20"], "conditions": {"ready": False, "serving": False, "terminating": False}}
    ]
    assert found["ports"] == [{"name": "http", "port": 8080, "protocol": "TCP"}]


def test_an_object_naming_the_resource_but_not_as_controller_is_not_owned() -> None:
    ref = {"apiVersion": "incus.truenas.io/v1alpha1", "kind": "IncusInstance", "name": "web", "uid": UID}
    assert not owned({"metadata": {"ownerReferences": [ref]}}, UID)
    assert not owned({"metadata": {"ownerReferences": [{**ref, "controller": True, "kind": "Pod"}]}}, UID)
    assert not owned({"metadata": {"ownerReferences": "not a list"}}, UID)
    assert not owned({}, UID)


def test_an_update_keeps_what_the_api_server_and_others_set() -> None:
    d = desired(type="NodePort", ports=[{"name": "http", "port": 80}], annotations={"new": "1"})
    wanted = service_manifest(d, expose_of(d))
    existing: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": "web",
            "resourceVersion": "42",
            "uid": "svc-uid",
            "labels": {"incus.truenas.io/instance": "web", "someone": "else"},
            "annotations": {"old": "0", ANNOTATIONS_RECORD: "old", "metallb.io/status": "kept"},
            "ownerReferences": wanted["metadata"]["ownerReferences"],
        },
        "spec": {
            "type": "NodePort",
            "clusterIP": "10.96.0.12",
            "clusterIPs": ["10.96.0.12"],
            "selector": {"app": "added-by-someone"},
            "ports": [{"name": "http", "port": 80, "targetPort": 80, "protocol": "TCP", "nodePort": 31080}],
        },
    }
    assert not _service_matches(existing, wanted)
    body = updated(existing, wanted)
    assert body["metadata"]["resourceVersion"] == "42" and body["metadata"]["uid"] == "svc-uid"
    assert body["metadata"]["labels"] == {"incus.truenas.io/instance": "web", "someone": "else"}
    assert body["metadata"]["annotations"] == {"new": "1", ANNOTATIONS_RECORD: "new", "metallb.io/status": "kept"}
    assert body["spec"]["clusterIP"] == "10.96.0.12" and "selector" not in body["spec"]
    assert body["spec"]["ports"] == [
        {"name": "http", "port": 80, "targetPort": 80, "protocol": "TCP", "nodePort": 31080}
    ]
    assert _service_matches(body, wanted)
    assert existing["metadata"]["annotations"]["old"] == "0", "the object read is left as it was"


def test_back_to_cluster_ip_drops_the_node_ports() -> None:
    d = desired(ports=[{"port": 80}])
    wanted = service_manifest(d, expose_of(d))
    existing = {
        "kind": "Service",
        "metadata": {"name": "web", "ownerReferences": wanted["metadata"]["ownerReferences"]},
        "spec": {"type": "NodePort", "ports": [{"port": 80, "targetPort": 80, "protocol": "TCP", "nodePort": 31080}]},
    }
    body = updated(existing, wanted)
    assert body["spec"]["type"] == "ClusterIP"
    assert body["spec"]["ports"] == [{"port": 80, "targetPort": 80, "protocol": "TCP"}]


def test_a_slice_matches_only_with_the_same_endpoints() -> None:
    d = desired()
    wanted = slice_manifest(d, expose_of(d), "IPv4", ("192.168.10.20",), ready=True)
    assert _slice_matches(wanted, wanted)
    moved = slice_manifest(d, expose_of(d), "IPv4", ("192.168.10.21",), ready=True)
    assert not _slice_matches(moved, wanted)
    stopped = slice_manifest(d, expose_of(d), "IPv4", ("192.168.10.20",), ready=False)
    assert not _slice_matches(stopped, wanted)
    assert _slice_matches(updated(moved, wanted), wanted)


def test_what_a_slice_holds_is_checked_and_bounded() -> None:
    hostile = {
        "endpoints": [
            {"addresses": ["127.0.0.1"]},
            {"addresses": ["not an address"]},
            {"addresses": [{"nested": 1}]},
            {"addresses": ["2001:db8::1"]},  # the other family
            {"addresses": ["192.168.10.20", "192.168.10.99"]},  # only the first of each endpoint
            {"addresses": ["192.168.10.20"]},  # once
            "not an endpoint",
        ]
        + [{"addresses": [f"10.0.0.{i}"]} for i in range(1, 40)]
    }
    found = slice_addresses(hostile, "IPv4")
    assert found[0] == "192.168.10.20" and "192.168.10.99" not in found
    assert len(found) <= 16 and all(a.startswith(("192.168.", "10.0.0.")) for a in found)
    assert slice_addresses({"endpoints": "x"}, "IPv4") == () and slice_addresses(None, "IPv6") == ()


def test_networks_select_the_endpoints() -> None:
    expose = Expose.model_validate({"ports": [{"port": 80}], "networks": ["192.168.10.0/24", "2001:db8::/64"]})
    assert expose.selects("192.168.10.20") and expose.selects("2001:db8::20")
    assert not expose.selects("10.142.87.5") and not expose.selects("fd42::1")
    assert Expose.model_validate({"ports": [{"port": 80}]}).selects("10.142.87.5")


# ----- the policy's expose block ----------------------------------------------------------------------------
def spec_with(expose: dict[str, Any]) -> IncusInstanceSpec:
    return IncusInstanceSpec.model_validate({"type": "CONTAINER", "image": "debian/bookworm", "expose": expose})


@pytest.mark.parametrize(
    "kind,allowed", [(None, True), ("ClusterIP", True), ("NodePort", False), ("LoadBalancer", False)]
)
def test_node_ports_and_load_balancers_are_off_without_any_policy(kind: str | None, allowed: bool) -> None:
    expose: dict[str, Any] = {"ports": [{"port": 80}], **({"type": kind} if kind else {})}
    found = Policy().violations("apps", "<default>", spec_with(expose))
    assert [(v.rule, v.field) for v in found] == (
        [] if allowed else [("policy.defaultRule.expose.serviceTypes", "spec.expose.type")]
    )


def test_a_rule_allows_types_and_ports() -> None:
    policy = Policy.model_validate(
        {
            "rules": [
                {"namespaces": ["team-*"], "expose": {"serviceTypes": ["LoadBalancer"], "ports": [{"from": 443}]}}
            ],
            "defaultRule": {"expose": {"serviceTypes": []}},
        }
    )
    ok = spec_with({"type": "LoadBalancer", "ports": [{"port": 443}]})
    assert policy.violations("team-a", "<default>", ok) == []
    found = policy.violations("team-a", "<default>", spec_with({"ports": [{"name": "db", "port": 5432}]}))
    assert [(v.rule, v.field) for v in found] == [
        ("policy.rules[0].expose.serviceTypes", "spec.expose.type"),
        ("policy.rules[0].expose.ports", "spec.expose.ports[db].port"),
    ]
    assert "allowed: LoadBalancer" in found[0].message and "(443)" in found[1].message
    refused = policy.expose_violations("elsewhere", "<default>", ok)
    assert [v.rule for v in refused] == ["policy.defaultRule.expose.serviceTypes"]
    assert "none: this rule refuses spec.expose" in refused[0].message
    assert policy.expose_violations("elsewhere", "<default>", IncusInstanceSpec.model_validate(
        {"type": "CONTAINER", "image": "debian/bookworm"}
    )) == []  # fmt: skip


# ----- the status -----------------------------------------------------------------------------------------
NOW = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)


def test_the_status_names_the_service_and_keeps_what_it_said_when_not_told() -> None:
    d = desired()
    exposed = Exposure("web", ("True", Reason.EXPOSED, "Service web -> 192.168.10.20"))
    first = render_instance(d, None, previous={}, now=NOW, plan=None, exposure=exposed, connected=False)
    previous = first.model_dump(by_alias=True, exclude_none=True, mode="json")
    assert previous["service"] == "web"
    assert [c["type"] for c in previous["conditions"]] == ["Ready", "Synced", "Exposed"]
    kept = render_instance(d, None, previous=previous, now=NOW, plan=None, connected=False)
    assert kept.service == "web" and any(c.type == "Exposed" for c in kept.conditions or [])
    gone = render_instance(d, None, previous=previous, now=NOW, plan=None, exposure=Exposure(), connected=False)
    assert gone.service is None and not any(c.type == "Exposed" for c in gone.conditions or [])


def test_annotation_keys_and_endpoint_networks_per_rule() -> None:
    policy = Policy.model_validate(
        {
            "rules": [
                {
                    "namespaces": ["team-*"],
                    "addressCIDRs": ["192.168.50.0/24"],
                    "expose": {"annotationKeys": ["metallb.universe.tf/address-pool"]},
                },
                {"namespaces": ["ops"], "expose": {"endpointCIDRs": ["10.0.0.0/8"]}},
            ]
        }
    )
    pool = spec_with({"ports": [{"port": 80}], "annotations": {"metallb.universe.tf/address-pool": "a"}})
    assert policy.violations("team-a", "<default>", pool) == []
    dns = spec_with({"ports": [{"port": 80}], "annotations": {"tailscale.com/expose": "true"}})
    found = policy.violations("team-a", "<default>", dns)
    assert [(v.rule, v.field) for v in found] == [("policy.rules[0].expose.annotationKeys", "spec.expose.annotations")]
    assert policy.endpoint_networks("team-a", "<default>") == ("policy.rules[0].addressCIDRs", ["192.168.50.0/24"])
    assert policy.endpoint_networks("ops", "<default>") == ("policy.rules[1].expose.endpointCIDRs", ["10.0.0.0/8"])
    assert policy.endpoint_networks("other", "<default>") is None


def test_endpoint_bounds_keep_to_the_networks_and_never_the_nas() -> None:
    bounds = EndpointBounds.of(("policy.rules[0].addressCIDRs", ["192.168.50.0/24"]), "wss://192.168.50.2/api/current")
    assert bounds.allows("192.168.50.20")
    assert not bounds.allows("192.168.50.2"), "the NAS's own address"
    for hostile in ("10.96.0.1", "10.244.1.7", "100.100.100.200", "fd00:ec2::254", "not an address"):
        assert not bounds.allows(hostile), hostile
    open_bounds = EndpointBounds.of(None, "wss://nas.lan/api/current")  # a host name: nothing to exclude
    assert open_bounds.allows("10.96.0.1") and open_bounds.excluded == ()
    assert not EndpointBounds.of(None, "wss://[2001:db8::2]/api").allows("2001:db8::2")


# ----- the exposer against an in-memory API (unit tier; tests/test_expose_e2e.py uses a real one) -------------
class MemoryKube:
    """Services and EndpointSlices by (kind, name), with resourceVersions, 409s and uid preconditions,
    defaulting a slice port's name to "" as discovery/v1 does."""

    def __init__(self) -> None:
        self.objects: dict[tuple[str, str], dict[str, Any]] = {}
        self.writes: list[tuple[str, str, str]] = []
        self._version = 0

    def _stored(self, kind: str, body: dict[str, Any]) -> dict[str, Any]:
        self._version += 1
        stored: dict[str, Any] = json.loads(json.dumps(body))
        stored["metadata"]["resourceVersion"] = str(self._version)
        stored["metadata"].setdefault("uid", f"uid-{self._version}")
        if kind == "endpointslices":
            for port in stored.get("ports") or []:
                port.setdefault("name", "")
        else:
            stored["spec"].setdefault("sessionAffinity", "None")
            stored["spec"].setdefault("clusterIP", "10.96.0.50")
        return stored

    async def read_exposed(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        found = self.objects.get((kind, name))
        return json.loads(json.dumps(found)) if found else None

    async def create_exposed(self, kind: str, namespace: str, body: dict[str, Any]) -> dict[str, Any] | None:
        name = body["metadata"]["name"]
        if (kind, name) in self.objects:
            return None
        self.writes.append(("create", kind, name))
        self.objects[(kind, name)] = self._stored(kind, body)
        return self.objects[(kind, name)]

    async def replace_exposed(self, kind: str, namespace: str, body: dict[str, Any]) -> dict[str, Any] | None:
        name = body["metadata"]["name"]
        current = self.objects.get((kind, name))
        if current is None or current["metadata"]["resourceVersion"] != body["metadata"].get("resourceVersion"):
            return None
        self.writes.append(("update", kind, name))
        self.objects[(kind, name)] = self._stored(kind, body)
        return self.objects[(kind, name)]

    async def delete_exposed(self, kind: str, namespace: str, name: str, uid: str) -> None:
        current = self.objects.get((kind, name))
        if current is not None and current["metadata"]["uid"] == uid:
            self.writes.append(("delete", kind, name))
            del self.objects[(kind, name)]


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def running(*addresses: str) -> ObservedInstance:
    return ObservedInstance(
        id="web", name="web", type="CONTAINER", status=InstanceStatus.RUNNING, cpu=None, memory=None,
        autostart=True, environment={}, addresses=addresses, image=ObservedImage(),
    )  # fmt: skip


def exposer() -> tuple[Exposer, MemoryKube, Clock]:
    kube, clock = MemoryKube(), Clock()
    return Exposer(kube, 2.0, clock), kube, clock  # type: ignore[arg-type]


async def test_an_unnamed_port_settles_and_idle_passes_write_nothing() -> None:
    ex, kube, clock = exposer()
    d, memo = desired(ports=[{"port": 80}]), ExposeMemo()
    first = await ex.sync(d, running("192.168.50.20"), Plan(), memo, None, {})
    assert first.condition is not None and first.condition[1] == Reason.EXPOSED
    assert [w[0] for w in kube.writes] == ["create", "create"]
    for _ in range(3):
        clock.now += 5  # past the resync interval: read and compared again
        again = await ex.sync(d, running("192.168.50.20"), Plan(), memo, first, {})
        assert again == first
    assert len(kube.writes) == 2, kube.writes


async def test_endpoints_outside_the_bounds_are_left_out_and_said() -> None:
    ex, kube, _ = exposer()
    bounds = EndpointBounds.of(("policy.rules[0].addressCIDRs", ["192.168.50.0/24"]), "wss://192.168.50.2")
    found = await ex.sync(
        desired(), running("10.96.0.1", "192.168.50.2", "192.168.50.20"), Plan(), ExposeMemo(), None, {}, bounds
    )
    held = kube.objects[("endpointslices", "web-ipv4")]["endpoints"]
    assert [e["addresses"] for e in held] == [["192.168.50.20"]]
    assert (
        found.condition is not None
        and "left out by policy.rules[0].addressCIDRs: 10.96.0.1, 192.168.50.2" in (found.condition[2])
    )
    nothing = await ex.sync(desired(), running("10.96.0.1"), Plan(), ExposeMemo(), None, {}, bounds)
    assert nothing.condition is not None and nothing.condition[1] == Reason.NO_ADDRESS


async def test_another_service_of_that_name_takes_the_operators_slices_away() -> None:
    ex, kube, clock = exposer()
    d, memo = desired(), ExposeMemo()
    first = await ex.sync(d, running("192.168.50.20"), Plan(), memo, None, {})
    assert ("endpointslices", "web-ipv4") in kube.objects
    # The tenant deletes the operator's Service and makes its own LoadBalancer of that name.
    del kube.objects[("services", "web")]
    kube.objects[("services", "web")] = {
        "kind": "Service", "metadata": {"name": "web", "uid": "theirs", "resourceVersion": "900"},
        "spec": {"type": "LoadBalancer", "ports": [{"port": 80}]},
    }  # fmt: skip
    clock.now += 5
    found = await ex.sync(d, running("192.168.50.20"), Plan(), memo, first, {})
    assert found.condition is not None and found.condition[1] == Reason.EXPOSE_CONFLICT
    assert ("endpointslices", "web-ipv4") not in kube.objects, "the slices would have served their Service"
    assert kube.objects[("services", "web")]["metadata"]["uid"] == "theirs"


async def test_a_service_someone_widened_is_put_back() -> None:
    ex, kube, clock = exposer()
    d, memo = desired(), ExposeMemo()
    first = await ex.sync(d, running("192.168.50.20"), Plan(), memo, None, {})
    edited = kube.objects[("services", "web")]
    edited["spec"].update(externalIPs=["203.0.113.9"], publishNotReadyAddresses=True, sessionAffinity="ClientIP")
    clock.now += 5
    await ex.sync(d, running("192.168.50.20"), Plan(), memo, first, {})
    spec = kube.objects[("services", "web")]["spec"]
    assert "externalIPs" not in spec and "publishNotReadyAddresses" not in spec
    assert spec["clusterIP"] == "10.96.0.50" and spec.get("sessionAffinity", "None") == "None"


async def test_a_service_left_by_a_slice_conflict_goes_with_expose() -> None:
    ex, kube, _ = exposer()
    kube.objects[("endpointslices", "web-ipv4")] = {
        "kind": "EndpointSlice", "metadata": {"name": "web-ipv4", "uid": "theirs", "resourceVersion": "1"},
        "addressType": "IPv4", "endpoints": [], "ports": [],
    }  # fmt: skip
    d, memo = desired(), ExposeMemo()
    conflict = await ex.sync(d, running("192.168.50.20"), Plan(), memo, None, {})
    assert conflict.condition is not None and conflict.condition[1] == Reason.EXPOSE_CONFLICT
    assert conflict.service is None and ("services", "web") in kube.objects
    plain = Desired(
        namespace="apps",
        name="web",
        generation=2,
        spec=IncusInstanceSpec.model_validate({"type": "CONTAINER", "image": "debian/bookworm"}),
        uid=UID,
    )
    gone = await ex.sync(plain, running("192.168.50.20"), Plan(), memo, conflict, {})
    assert gone == Exposure() and ("services", "web") not in kube.objects
    assert ("endpointslices", "web-ipv4") in kube.objects, "theirs stays"
    # After a restart (no memory), a status that names the Exposed condition is enough to look.
    await ex.sync(d, running("192.168.50.20"), Plan(), ExposeMemo(), None, {})
    restarted = await ex.sync(plain, None, Plan(), ExposeMemo(), None, {"conditions": [{"type": "Exposed"}]})
    assert restarted == Exposure() and ("services", "web") not in kube.objects
