"""spec.expose: the instance as a Kubernetes Service (a selector-less Service and its EndpointSlices,
owned by the operator: instances/exposure.py), so pods reach it as NAME.NAMESPACE.svc."""

from __future__ import annotations

import ipaddress
import re
from enum import StrEnum
from typing import Annotated

from pydantic import Field, field_validator, model_validator

from .cel import _cel
from .common import _Model
from .limits import SERVICE_NAME_PATTERN

__all__ = ["SERVICE_NAME_PATTERN", "Expose", "ExposePort", "ServiceProtocol", "ServiceType"]

PORT_NAME_PATTERN = r"^[a-z0-9]([-a-z0-9]{0,13}[a-z0-9])?$"
"""A Service port's name (IANA_SVC_NAME: at most 15 characters, lowercase letters, digits and '-')."""
ANNOTATION_KEY_PATTERN = (
    r"^([a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?([.][a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?)*/)?"
    r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"
)
"""A qualified name, as Kubernetes requires of an annotation's key (an optional DNS prefix, then a name)."""
MAX_EXPOSE_PORTS = 16
MAX_EXPOSE_ANNOTATIONS = 16
MAX_ANNOTATION_VALUE = 1024
MAX_EXPOSE_NETWORKS = 8
OWNED_ANNOTATION_PREFIXES = ("incus.truenas.io/", "kubectl.kubernetes.io/", "argocd.argoproj.io/")
"""Keys spec.expose.annotations may not set: the operator's own, and those kubectl and Argo CD keep
on the objects they apply (the Service is the operator's, not theirs)."""
RESERVED_ANNOTATION_PATTERN = r"^([^/]*[.])?(kubernetes|k8s)[.]io/"
"""Kubernetes's own prefixes (service.kubernetes.io/, ...): they steer the cluster's own components."""


class ServiceType(StrEnum):
    CLUSTER_IP = "ClusterIP"
    NODE_PORT = "NodePort"
    LOAD_BALANCER = "LoadBalancer"


class ServiceProtocol(StrEnum):
    TCP = "TCP"
    UDP = "UDP"
    SCTP = "SCTP"


class ExposePort(_Model):
    """A port of the Service, and the instance's port it forwards to."""

    name: Annotated[str, Field(pattern=PORT_NAME_PATTERN, max_length=15)] | None = Field(
        None, description="The port's name (needed once there are two ports), e.g. http. Lowercase, at most 15."
    )
    port: Annotated[int, Field(ge=1, le=65535)] = Field(description="The Service's port.")
    target_port: Annotated[int, Field(ge=1, le=65535)] | None = Field(
        None, description="The instance's port (the EndpointSlice's). Default: port."
    )
    protocol: ServiceProtocol | None = Field(None, description="TCP (default), UDP or SCTP.")

    @property
    def target(self) -> int:
        return self.target_port if self.target_port is not None else self.port

    @property
    def transport(self) -> str:
        return str(self.protocol or ServiceProtocol.TCP)


class Expose(_Model):
    """The instance as a Service: pods reach it as NAME.NAMESPACE.svc (NAME: the IncusInstance's)."""

    ports: Annotated[list[ExposePort], Field(min_length=1, max_length=MAX_EXPOSE_PORTS)] = Field(
        description=f"The Service's ports (at most {MAX_EXPOSE_PORTS}).",
        json_schema_extra={
            "x-kubernetes-validations": [
                _cel(
                    "size(self) == 1 || self.all(p, has(p.name))",
                    "spec.expose.ports: every port needs a name once there are two",
                ),
                _cel(
                    "self.all(p, !has(p.name) || self.exists_one(q, has(q.name) && q.name == p.name))",
                    "spec.expose.ports: names must be unique",
                ),
                _cel(
                    "self.all(p, self.exists_one(q, q.port == p.port && "
                    "(has(q.protocol) ? q.protocol : 'TCP') == (has(p.protocol) ? p.protocol : 'TCP')))",
                    "spec.expose.ports: each port and protocol at most once",
                ),
            ]
        },
    )
    type: ServiceType | None = Field(
        None,
        description=(
            "ClusterIP (default), NodePort or LoadBalancer; the administrator's policy says which are allowed "
            "(LoadBalancer only where a rule allows it)."
        ),
    )
    annotations: dict[str, Annotated[str, Field(max_length=MAX_ANNOTATION_VALUE)]] | None = Field(
        None,
        description=(
            f"Annotations of the Service (at most {MAX_EXPOSE_ANNOTATIONS}), e.g. a load balancer's address pool; "
            "the administrator's policy may bound the keys. Keys under incus.truenas.io/, argocd.argoproj.io/ "
            "and Kubernetes's own (kubernetes.io/, k8s.io/) are refused."
        ),
        json_schema_extra={
            "maxProperties": MAX_EXPOSE_ANNOTATIONS,
            "x-kubernetes-validations": [
                _cel(
                    f"self.all(k, size(k) <= 253 && k.matches('{ANNOTATION_KEY_PATTERN}'))",
                    "spec.expose.annotations: keys must be qualified names (an optional DNS prefix and '/', "
                    "then at most 63 letters, digits, '-', '_' and '.')",
                ),
                _cel(
                    "self.all(k, " + " && ".join(f"!k.startsWith('{p}')" for p in OWNED_ANNOTATION_PREFIXES) + ")",
                    "spec.expose.annotations may not set keys under " + ", ".join(OWNED_ANNOTATION_PREFIXES),
                ),
                _cel(
                    f"self.all(k, !k.matches('{RESERVED_ANNOTATION_PATTERN}'))",
                    "spec.expose.annotations may not set Kubernetes's own keys (kubernetes.io/, k8s.io/ and "
                    "their subdomains)",
                ),
            ],
        },
    )
    networks: (
        Annotated[list[Annotated[str, Field(max_length=49)]], Field(min_length=1, max_length=MAX_EXPOSE_NETWORKS)]
        | None
    ) = Field(
        None,
        description=(
            "Only the addresses of status.addresses in these networks become the Service's endpoints, e.g. the "
            "LAN's 192.168.10.0/24 (leaving out a NAT bridge's address the cluster cannot reach). Default: all."
        ),
        json_schema_extra={
            "x-kubernetes-validations": [
                _cel("self.all(c, isCIDR(c) && c.contains('/'))", "each a network with its prefix, e.g. 10.0.0.0/8")
            ]
        },
    )

    @property
    def service_type(self) -> str:
        return str(self.type or ServiceType.CLUSTER_IP)

    @field_validator("annotations")
    @classmethod
    def _annotation_keys(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value is not None and len(value) > MAX_EXPOSE_ANNOTATIONS:
            raise ValueError(f"at most {MAX_EXPOSE_ANNOTATIONS} annotations")
        for key in value or {}:
            if len(key) > 253 or not re.fullmatch(ANNOTATION_KEY_PATTERN, key):
                raise ValueError(f"{key!r} is not a qualified name")
            if key.startswith(OWNED_ANNOTATION_PREFIXES):
                raise ValueError(f"{key!r}: keys under {', '.join(OWNED_ANNOTATION_PREFIXES)} are not the tenant's")
            if re.match(RESERVED_ANNOTATION_PATTERN, key):
                raise ValueError(f"{key!r}: Kubernetes's own keys (kubernetes.io/, k8s.io/) are not the tenant's")
        return value

    @field_validator("networks")
    @classmethod
    def _networks(cls, value: list[str] | None) -> list[str] | None:
        for item in value or []:
            if not re.fullmatch(r"[0-9A-Fa-f:.]+/[0-9]{1,3}", item):
                raise ValueError(f"{item!r}: a network with its prefix length, e.g. 192.168.10.0/24")
            try:
                ipaddress.ip_network(item, strict=False)
            except ValueError:
                raise ValueError(f"{item!r} is not a network (CIDR)") from None
        return value

    @model_validator(mode="after")
    def _ports(self) -> Expose:
        if len(self.ports) > 1 and not all(p.name for p in self.ports):
            raise ValueError("spec.expose.ports: every port needs a name once there are two")
        names = [p.name for p in self.ports if p.name]
        if len(names) != len(set(names)):
            raise ValueError("spec.expose.ports: names must be unique")
        pairs = [(p.port, p.transport) for p in self.ports]
        if len(pairs) != len(set(pairs)):
            raise ValueError("spec.expose.ports: each port and protocol at most once")
        return self

    def selects(self, address: str) -> bool:
        """Whether an address of status.addresses becomes an endpoint (``networks``)."""
        if not self.networks:
            return True
        ip = ipaddress.ip_address(address)
        return any(
            ip.version == n.version and ip in n for n in (ipaddress.ip_network(c, strict=False) for c in self.networks)
        )
