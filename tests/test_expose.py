"""spec.expose without a cluster: the model's refusals (the CRD's CEL rules say the same at admission,
tests/admission/invalid.yaml), the manifests the operator writes, how an update keeps what the API
server and others set, what is read back from a slice, the policy's expose block, and the status."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from pydantic import ValidationError

from truenas_incus_operator.instances.exposure import (
    ANNOTATIONS_RECORD,
    _service_matches,
    _slice_matches,
    owned,
    service_manifest,
    slice_addresses,
    slice_manifest,
    updated,
)
from truenas_incus_operator.models import Expose, IncusInstanceSpec
from truenas_incus_operator.policy import Policy
from truenas_incus_operator.problems import Reason
from truenas_incus_operator.reconcile import Desired
from truenas_incus_operator.status import Exposure, render_instance

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
    "kind,allowed", [(None, True), ("ClusterIP", True), ("NodePort", True), ("LoadBalancer", False)]
)
def test_a_load_balancer_is_off_without_any_policy(kind: str | None, allowed: bool) -> None:
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
