"""spec.expose: the instance as a Kubernetes Service. The operator owns a Service without a selector
(named after the IncusInstance, so pods reach the instance as NAME.NAMESPACE.svc) and one
EndpointSlice per address family (NAME-ipv4, NAME-ipv6) holding the addresses status.addresses
shows, ready only while the instance is Running; both owner-referenced to the IncusInstance.

Only objects the operator made are ever changed or deleted: one of that name without this
resource's controller reference is reported (Exposed=False/ExposeConflict) and left alone; a create
never writes over one (409), an update is a PUT onto the version read (resourceVersion: what the
API server assigned and others' labels and annotations stay), a delete removes only that very
object (uid precondition). Nothing is watched: what the loop wants is
compared with what the API server holds when it changes, and again once per resync interval (an
edit or a deletion by someone else is repaired within that). Kubernetes is one edge: every call
goes through ``kube.Kube`` (errors as ``OperatorError``), and a failure here is reported in the
Exposed condition, never a failed pass of the instance."""

from __future__ import annotations

import contextlib
import copy
import ipaddress
import logging
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from ..kube import Kube
from ..models import API_GROUP, API_VERSION, SERVICE_NAME_PATTERN, AddressFamily, Expose, InstanceAddress
from ..problems import OperatorError, Reason, fail
from ..reconcile import Desired, Plan
from ..status import ConditionUpdate, Exposure, clip, instance_addresses, printable
from ..truenas import ObservedInstance
from ..truenas.addresses import global_address
from ..truenas.types import InstanceStatus
from .resource import ExposeMemo, about

log = logging.getLogger(__name__)
SERVICES = "services"
SLICES = "endpointslices"
MANAGED_BY = "endpointslice.kubernetes.io/managed-by"
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
INSTANCE_LABEL = f"{API_GROUP}/instance"
CONTROLLER = API_GROUP
"""The EndpointSlices' managed-by: the endpointslice controller leaves slices of another manager alone."""
ANNOTATIONS_RECORD = f"{API_GROUP}/expose-annotations"
"""On the Service: the keys of spec.expose.annotations the operator set (one the spec drops is removed)."""
SERVER_SET = ("clusterIP", "clusterIPs", "ipFamilies", "ipFamilyPolicy", "loadBalancerClass")
"""What the API server assigned (or cannot change once set) in a Service's spec: kept by an update."""
DEFAULTED = {
    "sessionAffinity": "None",
    "internalTrafficPolicy": "Cluster",
    "externalTrafficPolicy": "Cluster",
    "allocateLoadBalancerNodePorts": True,
}
"""Fields the API server defaults: kept only at their default (another value was someone's edit)."""
FAMILIES = {AddressFamily.IPV4: "ipv4", AddressFamily.IPV6: "ipv6"}
MAX_SLICE_ENDPOINTS = 16
"""What is read back from a slice (an object anyone with write access to it may have filled)."""


@dataclass(frozen=True)
class EndpointBounds:
    """Which addresses may become endpoints: inside the policy's networks (``rule`` names the field),
    never the NAS's own. A guest can give itself any address, and TrueNAS reports what it has."""

    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] | None = None
    rule: str = ""
    excluded: tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ...] = ()

    @classmethod
    def of(cls, networks: tuple[str, list[str]] | None, nas_url: str | None) -> EndpointBounds:
        excluded = []
        with contextlib.suppress(ValueError):
            excluded.append(ipaddress.ip_address(urlsplit(nas_url or "").hostname or ""))
        if networks is None:
            return cls(excluded=tuple(excluded))
        parsed = tuple(ipaddress.ip_network(c, strict=False) for c in networks[1])
        return cls(parsed, networks[0], tuple(excluded))

    def allows(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        if ip in self.excluded:
            return False
        return self.networks is None or any(ip.version == n.version and ip in n for n in self.networks)


def had_exposure(status: Mapping[str, Any]) -> bool:
    """Whether a status (as read after a restart) says spec.expose was acted on: its Service or condition."""
    conditions = status.get("conditions") or []
    named = isinstance(conditions, list) and any(isinstance(c, dict) and c.get("type") == "Exposed" for c in conditions)
    return bool(status.get("service")) or named


def owner_reference(desired: Desired) -> dict[str, Any]:
    return {
        "apiVersion": f"{API_GROUP}/{API_VERSION}",
        "kind": "IncusInstance",
        "name": desired.name,
        "uid": desired.uid,
        "controller": True,
    }


def owned(obj: Mapping[str, Any], uid: str) -> bool:
    """Whether this resource (its UID) is the object's controller."""
    refs = (obj.get("metadata") or {}).get("ownerReferences") or []
    return isinstance(refs, list) and any(
        isinstance(r, dict) and r.get("uid") == uid and r.get("controller") is True and r.get("kind") == "IncusInstance"
        for r in refs
    )


def service_manifest(desired: Desired, expose: Expose) -> dict[str, Any]:
    ports = []
    for port in expose.ports:
        entry: dict[str, Any] = {"port": port.port, "targetPort": port.target, "protocol": port.transport}
        if port.name:
            entry["name"] = port.name
        ports.append(entry)
    metadata: dict[str, Any] = {
        "name": desired.name,
        "namespace": desired.namespace,
        "labels": {INSTANCE_LABEL: desired.name},
        "ownerReferences": [owner_reference(desired)],
    }
    if expose.annotations:
        record = ",".join(sorted(expose.annotations))
        metadata["annotations"] = {**expose.annotations, ANNOTATIONS_RECORD: record}
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata,
        "spec": {"type": expose.service_type, "ports": ports},
    }


def slice_manifest(
    desired: Desired, expose: Expose, family: str, addresses: tuple[str, ...], ready: bool
) -> dict[str, Any]:
    # discovery/v1 defaults an unnamed port's name to "": sent as stored, so a comparison can settle.
    ports = [{"name": port.name or "", "port": port.target, "protocol": port.transport} for port in expose.ports]
    conditions = {"ready": ready, "serving": ready, "terminating": False}
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": f"{desired.name}-{FAMILIES[AddressFamily(family)]}",
            "namespace": desired.namespace,
            "labels": {SERVICE_NAME_LABEL: desired.name, MANAGED_BY: CONTROLLER, INSTANCE_LABEL: desired.name},
            "ownerReferences": [owner_reference(desired)],
        },
        "addressType": family,
        "endpoints": [{"addresses": [a], "conditions": dict(conditions)} for a in addresses],
        "ports": ports,
    }


def _recorded(obj: Mapping[str, Any]) -> set[str]:
    """The annotations of spec.expose the operator put on ``obj`` (its record annotation lists them)."""
    annotations = (obj.get("metadata") or {}).get("annotations") or {}
    raw = annotations.get(ANNOTATIONS_RECORD) if isinstance(annotations, dict) else None
    return {k for k in raw.split(",") if k} if isinstance(raw, str) else set()


def _metadata_matches(actual: Mapping[str, Any], wanted: Mapping[str, Any]) -> bool:
    meta, want = actual.get("metadata") or {}, wanted["metadata"]
    for what in ("labels", "annotations"):
        have = meta.get(what) or {}
        if not isinstance(have, dict) or any(have.get(k) != v for k, v in (want.get(what) or {}).items()):
            return False
    if _recorded(actual) != _recorded(wanted):
        return False  # one the spec no longer gives is still there
    refs = meta.get("ownerReferences") or []
    return isinstance(refs, list) and want["ownerReferences"][0] in refs


def _service_matches(actual: Mapping[str, Any], wanted: Mapping[str, Any]) -> bool:
    """The whole spec is as the operator would write it (nothing added: a selector, externalIPs,
    publishNotReadyAddresses, ...) and the metadata it owns too."""
    spec = actual.get("spec")
    return isinstance(spec, dict) and updated(actual, wanted)["spec"] == spec and _metadata_matches(actual, wanted)


def _slice_matches(actual: Mapping[str, Any], wanted: Mapping[str, Any]) -> bool:
    keep = ("addresses", "conditions")
    endpoints = [{k: e.get(k) for k in keep} for e in actual.get("endpoints") or [] if isinstance(e, dict)]
    return (
        actual.get("addressType") == wanted["addressType"]
        and endpoints == wanted["endpoints"]
        and (actual.get("ports") or []) == wanted["ports"]
        and _metadata_matches(actual, wanted)
    )


def updated(existing: Mapping[str, Any], wanted: Mapping[str, Any]) -> dict[str, Any]:
    """The operator's own object as read, with what it owns made as ``wanted`` says (a PUT onto that
    version): its labels, its annotations (those it set before and the spec dropped go), the owner
    reference; a Service's whole spec: its type and ports (each keeping the node port it was given),
    what the API server assigned (cluster IPs, families) and its defaults, nothing else (a selector,
    externalIPs, publishNotReadyAddresses someone added go); a slice's endpoints and ports. Others'
    labels and annotations stay."""
    body = copy.deepcopy(dict(existing))
    meta = body.setdefault("metadata", {})
    want = wanted["metadata"]
    labels = meta.get("labels") if isinstance(meta.get("labels"), dict) else {}
    meta["labels"] = {**labels, **want.get("labels", {})}
    annotations = meta.get("annotations") if isinstance(meta.get("annotations"), dict) else {}
    for key in _recorded(existing) | {ANNOTATIONS_RECORD}:
        annotations.pop(key, None)
    annotations.update(want.get("annotations") or {})
    meta["annotations"] = annotations
    refs = [
        r
        for r in meta.get("ownerReferences") or []
        if isinstance(r, dict) and r.get("uid") != want["ownerReferences"][0]["uid"]
    ]
    meta["ownerReferences"] = [*want["ownerReferences"], *refs]
    if wanted["kind"] == "Service":
        raw = existing.get("spec")
        before: dict[str, Any] = raw if isinstance(raw, dict) else {}
        spec = {k: before[k] for k in SERVER_SET if k in before}  # the rest is the operator's alone
        for key, default in DEFAULTED.items():
            if before.get(key) == default:
                spec[key] = default  # the API server's own default, as it stores it
        kind = spec["type"] = wanted["spec"]["type"]
        if kind == "ClusterIP":
            spec.pop("externalTrafficPolicy", None)
        if kind != "LoadBalancer":
            spec.pop("allocateLoadBalancerNodePorts", None)
            spec.pop("loadBalancerClass", None)
        given = {
            (p.get("port"), p.get("protocol")): p.get("nodePort")
            for p in before.get("ports") or []
            if isinstance(p, dict) and p.get("nodePort")
        }
        ports = []
        for port in wanted["spec"]["ports"]:
            node_port = given.get((port["port"], port["protocol"]))
            keeps = node_port is not None and wanted["spec"]["type"] != "ClusterIP"
            ports.append({**port, "nodePort": node_port} if keeps else dict(port))
        spec["ports"] = ports
        body["spec"] = spec
    else:
        body["endpoints"] = wanted["endpoints"]
        body["ports"] = wanted["ports"]
    return body


def slice_addresses(obj: Mapping[str, Any] | None, family: str) -> tuple[str, ...]:
    """The addresses an EndpointSlice holds, each checked (bounded: anyone who may edit it wrote them)."""
    found: list[str] = []
    endpoints = (obj or {}).get("endpoints") or []
    for endpoint in endpoints[:MAX_SLICE_ENDPOINTS] if isinstance(endpoints, list) else []:
        for raw in (endpoint.get("addresses") or [])[:1] if isinstance(endpoint, dict) else []:
            address = global_address(raw) if isinstance(raw, str) else None
            if address is not None and _family(address) == family and str(address) not in found:
                found.append(str(address))
    return tuple(found)


def _family(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> AddressFamily:
    return AddressFamily.IPV4 if address.version == 4 else AddressFamily.IPV6


class Exposer:
    def __init__(self, kube: Kube, resync_seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.kube = kube
        self.resync_seconds = resync_seconds
        self.clock = clock

    def due(self, memo: ExposeMemo) -> bool:
        """Whether ``sync`` would read the Service and its slices again now (once per resync interval)."""
        return memo.applied is None or self.clock() - memo.checked_at >= self.resync_seconds

    async def sync(
        self,
        desired: Desired,
        observed: ObservedInstance | None,
        plan: Plan | None,
        memo: ExposeMemo,
        previous: Exposure | None,
        status: Mapping[str, Any],
        bounds: EndpointBounds | None = None,
    ) -> Exposure:
        """The Service and its slices made to match spec.expose and what the instance is now (``observed``
        as the status shows it: None when unknown or not the resource's); returns what the status says.
        ``bounds``: which addresses may be endpoints (the policy's networks, never the NAS's own)."""
        expose = desired.spec.expose
        bounds = bounds or EndpointBounds()
        if expose is None:
            had = previous.service if previous is not None else status.get("service")
            if had or (previous is None and had_exposure(status)) or (previous and previous.condition):
                # A Service may exist even where status.service is empty (a conflict on a slice, a failure).
                try:
                    await self.remove(desired.namespace, desired.name, desired.uid)
                except OperatorError as exc:
                    return Exposure(str(had), ("False", Reason.EXPOSE_FAILED, f"removing the Service: {_said(exc)}"))
            memo.applied, memo.endpoints = None, {}
            return Exposure()
        if not re.fullmatch(SERVICE_NAME_PATTERN, desired.name):
            message = f"metadata.name {desired.name!r} is not a DNS label: a Service cannot be named after it"
            return Exposure(None, ("False", Reason.INVALID_SPEC, message))
        running = observed is not None and observed.status == InstanceStatus.RUNNING
        selected = [a for a in instance_addresses(observed, desired, plan) if expose.selects(a.address)]
        current = [a for a in selected if bounds.allows(a.address)]
        refused = [a.address for a in selected if not bounds.allows(a.address)]
        kept = {f: tuple(a for a in items if bounds.allows(a)) for f, items in memo.endpoints.items()}
        wanted_endpoints = _by_family(current) if current else {f: items for f, items in kept.items() if items}
        ready = running and bool(current)
        service = service_manifest(desired, expose)
        key = (repr(service), tuple(sorted(wanted_endpoints.items())), ready)
        if memo.applied == key and self.clock() - memo.checked_at < self.resync_seconds and previous is not None:
            return previous
        try:
            outcome = await self._apply(desired, expose, service, wanted_endpoints, ready, bool(current), bounds)
        except OperatorError as exc:
            memo.applied = None
            log.warning("spec.expose: %s", exc.problem.message, extra=about(desired.namespace, desired.name))
            return Exposure(
                previous.service if previous is not None else status.get("service"),
                ("False", Reason.EXPOSE_FAILED, _said(exc)),
            )
        if isinstance(outcome, Exposure):
            memo.applied = None
            return outcome
        memo.endpoints = outcome
        memo.applied = (repr(service), tuple(sorted(outcome.items())), ready)
        memo.checked_at = self.clock()
        condition = _exposed_condition(desired, expose, outcome, ready, running, observed)
        if refused:
            note = f"; left out by {bounds.rule}: {', '.join(refused[:4])}" if bounds.rule else ""
            note = note or f"; left out (the NAS's own address): {', '.join(refused[:4])}"
            condition = (condition[0], condition[1], clip(condition[2] + note))
        return Exposure(desired.name, condition)

    async def _apply(
        self,
        desired: Desired,
        expose: Expose,
        service: dict[str, Any],
        endpoints: dict[str, tuple[str, ...]],
        ready: bool,
        known: bool,
        bounds: EndpointBounds,
    ) -> dict[str, tuple[str, ...]] | Exposure:
        """Writes what differs; returns the endpoints put in place per family, or the refusal to report."""
        existing_service = await self.kube.read_exposed(SERVICES, desired.namespace, desired.name)
        refused = await self._put(SERVICES, desired, service, _service_matches, existing_service)
        if refused is not None:
            # Another's Service of that name: the slices carry its name, so they would serve it. Ours go.
            for suffix in FAMILIES.values():
                found = await self.kube.read_exposed(SLICES, desired.namespace, f"{desired.name}-{suffix}")
                if found is not None and owned(found, desired.uid):
                    await self._delete(SLICES, desired.namespace, found)
            return refused
        placed: dict[str, tuple[str, ...]] = {}
        for family in FAMILIES:
            name = slice_manifest(desired, expose, family, (), ready)["metadata"]["name"]
            existing = await self.kube.read_exposed(SLICES, desired.namespace, name)
            addresses = endpoints.get(family, ())
            if not known and not addresses and existing is not None and owned(existing, desired.uid):
                # After a restart: what it held stays, not ready (only what the spec and the policy allow).
                held = slice_addresses(existing, family)
                addresses = tuple(a for a in held if expose.selects(a) and bounds.allows(a))
            if not addresses:
                if existing is not None and owned(existing, desired.uid):
                    await self._delete(SLICES, desired.namespace, existing)
                continue
            wanted = slice_manifest(desired, expose, family, addresses, ready)
            refused = await self._put(SLICES, desired, wanted, _slice_matches, existing)
            if refused is not None:
                return refused
            placed[family] = addresses
        return placed

    async def _put(
        self,
        kind: str,
        desired: Desired,
        wanted: dict[str, Any],
        matches: Callable[[Mapping[str, Any], Mapping[str, Any]], bool],
        existing: dict[str, Any] | None,
    ) -> Exposure | None:
        """Creates ``wanted``, or applies it onto the operator's own object of that name (``existing``, as
        read); an object of that name it does not own is refused (returned as the Exposure to report)."""
        name = wanted["metadata"]["name"]
        for _ in range(3):
            if existing is None:
                if await self.kube.create_exposed(kind, desired.namespace, wanted) is not None:
                    return None
                existing = await self.kube.read_exposed(kind, desired.namespace, name)  # made meanwhile
                continue
            if not owned(existing, desired.uid):
                what = "Service" if kind == SERVICES else "EndpointSlice"
                message = (
                    f"a {what} named {name} exists in {desired.namespace} and is not this IncusInstance's (no "
                    "controller reference to it): it is left alone; delete or rename it, or rename this resource"
                )
                return Exposure(None, ("False", Reason.EXPOSE_CONFLICT, printable(message)))
            if matches(existing, wanted):
                return None
            if await self.kube.replace_exposed(kind, desired.namespace, updated(existing, wanted)) is not None:
                return None
            existing = await self.kube.read_exposed(kind, desired.namespace, name)  # changed or gone since read
        raise fail(Reason.EXPOSE_FAILED, f"{kind}/{name} kept changing while it was written; will retry")

    async def _delete(self, kind: str, namespace: str, obj: Mapping[str, Any]) -> None:
        meta = obj.get("metadata") or {}
        await self.kube.delete_exposed(kind, namespace, str(meta.get("name")), str(meta.get("uid")))

    async def withdraw(self, desired: Desired, status: Mapping[str, Any]) -> Exposure:
        """The policy refuses spec.expose: the Service and slices go (the refusal is in Synced)."""
        message = "not exposed: the administrator's policy refuses spec.expose (see the Synced condition)"
        try:
            await self.remove(desired.namespace, desired.name, desired.uid)
        except OperatorError as exc:
            return Exposure(
                status.get("service"), ("False", Reason.EXPOSE_FAILED, f"removing the Service: {_said(exc)}")
            )
        return Exposure(None, ("False", Reason.POLICY_DENIED, message))

    async def remove(self, namespace: str, name: str, uid: str) -> None:
        """Deletes the Service and the slices this resource (``uid``) owns; others' are left alone."""
        if not re.fullmatch(SERVICE_NAME_PATTERN, name):
            return  # never made: no Service can have that name
        names = [(SERVICES, name)] + [(SLICES, f"{name}-{suffix}") for suffix in FAMILIES.values()]
        for kind, object_name in names:
            existing = await self.kube.read_exposed(kind, namespace, object_name)
            if existing is not None and owned(existing, uid):
                await self._delete(kind, namespace, existing)


def _by_family(addresses: list[InstanceAddress]) -> dict[str, tuple[str, ...]]:
    found: dict[str, list[str]] = {}
    for address in addresses:
        found.setdefault(str(address.family), []).append(address.address)
    return {family: tuple(items) for family, items in found.items()}


def _exposed_condition(
    desired: Desired,
    expose: Expose,
    endpoints: dict[str, tuple[str, ...]],
    ready: bool,
    running: bool,
    observed: ObservedInstance | None,
) -> ConditionUpdate:
    shown = ", ".join(a for items in endpoints.values() for a in items)
    where = f"Service {desired.name} ({expose.service_type}, {desired.name}.{desired.namespace}.svc)"
    if ready:
        return "True", Reason.EXPOSED, clip(f"{where} -> {shown}")
    if not running:
        state = f"TrueNAS reports {observed.status}" if observed is not None else "not observed: see Synced"
        held = f": {shown} not ready" if shown else ": no endpoint"
        return "False", Reason.NOT_EXPOSED, clip(f"{where}{held} ({state})")
    selected = " in spec.expose.networks" if expose.networks else ""
    held = f"; {shown} kept, not ready" if shown else ""
    return "False", Reason.NO_ADDRESS, clip(f"{where}: no address of the instance{selected} is known yet{held}")


def _said(exc: OperatorError) -> str:
    return clip(printable(exc.problem.message), 512)
