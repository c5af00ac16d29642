"""The TrueNASConnection: where a TrueNAS is, its credentials and TLS, and its status."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    Field,
)

from .common import Condition, DeletionPolicy, NICType, PowerState, TransportType, _Model
from .limits import DNS1123_SUBDOMAIN_PATTERN, SECRET_KEY_PATTERN, USERNAME_PATTERN


class SecretKeyReference(_Model):
    """A key of a Secret in the same namespace."""

    name: Annotated[str, Field(pattern=DNS1123_SUBDOMAIN_PATTERN, min_length=1, max_length=253)] = Field(
        description="Secret name (a Kubernetes object name)."
    )
    key: Annotated[str, Field(pattern=SECRET_KEY_PATTERN, min_length=1, max_length=253)] = Field(
        description="Key within the Secret: letters, digits, '-', '_' and '.', not '.' or '..' or starting with '..'."
    )


# A host (name or bracketed IPv6 literal) and an optional port of 1-65535 written as plain digits: a URL
# such as wss://nas:+1234 parses in some libraries and not in others (issue 19 item 9), so none is admitted.
_URL_HOST = r"(?:[A-Za-z0-9._~-]+|\[[0-9A-Fa-f:.]+\])"
_URL_PORT = r"(?::(?:6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}|[1-9][0-9]{0,3}))?"
CONNECTION_URL_PATTERN = rf"^(wss|https|ws|http)://{_URL_HOST}{_URL_PORT}(/\S*)?$"
IMAGE_SERVER_PATTERN = rf"^(https?://{_URL_HOST}{_URL_PORT}(/\S*)?|file:///\S*|/\S*)$"


class ConnectionTLS(_Model):
    """TLS settings. Certificates are verified against the system CAs unless a CA is given."""

    ca_secret_ref: SecretKeyReference | None = Field(
        None,
        description=(
            "A Secret key holding the PEM CA bundle that signed TrueNAS's certificate "
            "(the Secret must carry the label incus.truenas.io/credentials=true)."
        ),
    )
    insecure_skip_verify: bool | None = Field(
        None,
        description=(
            "Skip certificate verification (reported as Secure=False, InsecureSkipVerify). Off by default; "
            "for tests only."
        ),
    )


class TrueNASConnectionSpec(_Model):
    """How to reach one TrueNAS system."""

    url: Annotated[str, Field(pattern=CONNECTION_URL_PATTERN, max_length=2048)] = Field(
        description=(
            "wss://host or https://host. Plain ws:// and http:// are refused (InsecureTransport) except to "
            "loopback or with allowInsecureTransport."
        )
    )
    transport: TransportType | None = Field(
        None,
        description="websocket (JSON-RPC, the default and the only one TrueNAS 26 has) or rest (/api/v2.0 on 25.x).",
    )
    api_key_secret_ref: SecretKeyReference = Field(
        description=(
            "The Secret key holding the TrueNAS API key. The Secret must carry the label "
            "incus.truenas.io/credentials=true, and may list the hosts its key may go to in the annotation "
            "incus.truenas.io/allowed-hosts."
        )
    )
    username: Annotated[str, Field(pattern=USERNAME_PATTERN, min_length=1, max_length=256)] | None = Field(
        None,
        description=(
            "The TrueNAS user the API key belongs to. TrueNAS 26 logs in with SCRAM, which names the key's "
            "owner (the key itself never crosses the wire); a key of another user is refused. Effective "
            "default: root."
        ),
    )
    tls: ConnectionTLS | None = Field(None, description="TLS verification settings.")
    allow_insecure_transport: bool | None = Field(
        None,
        description=(
            "Allow plain ws:// or http:// to a host other than loopback: all traffic travels unencrypted, and "
            "on TrueNAS 25.x the API key too, which TrueNAS then revokes. TrueNAS 26's SCRAM login keeps the "
            "key off the wire, but without TLS a man in the middle can pose as a 25.x on the first connection "
            "and receive it (the operator then refuses and never sends it again). Off by default."
        ),
    )
    max_concurrent_calls: Annotated[int, Field(ge=1, le=20)] | None = Field(
        None, description="Concurrent calls on this connection (TrueNAS allows 20). Effective default: 20."
    )
    vm_image_server: Annotated[str, Field(pattern=IMAGE_SERVER_PATTERN, min_length=1, max_length=2048)] | None = Field(
        None,
        description=(
            "Where VMs on vm.* (TrueNAS 25.04.2 and later) get their disk images: a simplestreams server "
            "(https://...), or a local mirror on the operator's host (file:// URL or directory path) for NAS "
            "hosts without internet access. Only a server the administrator's policy allows (vmImageServers; "
            "by default only the operator's own), else the connection is refused (PolicyDenied). Unset: the "
            "operator's TIO_VM_IMAGE_SERVER, else https://images.linuxcontainers.org."
        ),
    )


class TrueNASConnectionStatus(_Model):
    """What the operator learned about the connection."""

    conditions: list[Condition] | None = Field(
        None,
        description=(
            "Ready: the operator logged in and detected the API. Secure: False (PlainTransport, "
            "InsecureSkipVerify) when the key travels unencrypted or to an unverified server."
        ),
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    version: str | None = Field(None, description="TrueNAS version, e.g. TrueNAS-25.10.1.")
    api_version: str | None = Field(None, description="The API version the operator speaks, e.g. v25.10.0.")
    transport: str | None = Field(None, description="The transport in use: websocket (JSON-RPC) or rest.")
    api_family: str | None = Field(
        None,
        description=("The API families used for instances: virt.instance or container, with +vm where VMs use vm.*."),
    )
    observed_generation: int | None = Field(None, description="The spec generation last acted on.")


class TrueNASConnection(_Model):
    """A TrueNAS system that IncusInstances in this namespace can use."""

    api_version: Literal["incus.truenas.io/v1alpha1"] = Field(description="incus.truenas.io/v1alpha1")
    kind: Literal["TrueNASConnection"] = Field(description="TrueNASConnection")
    metadata: dict[str, Any] = Field(description="Standard object metadata.")
    spec: TrueNASConnectionSpec = Field(description="How to reach TrueNAS.")
    status: TrueNASConnectionStatus | None = Field(None, description="Observed state.")


# The operator's defaults for fields users omit (never written into spec).
EFFECTIVE_DEFAULTS: dict[str, Any] = {
    "autostart": True,
    "power_state": PowerState.RUNNING,
    "stop_timeout_seconds": 30,
    "deletion_policy": DeletionPolicy.DELETE,
    "nic_type": NICType.BRIDGED,
    "transport": TransportType.WEBSOCKET,
    "max_concurrent_calls": 20,
    "username": "root",
}
