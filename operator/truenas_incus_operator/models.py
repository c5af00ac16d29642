"""The custom resources' spec and status: the single source of truth.

``crd.py`` turns these models into the CRDs in ``crds/``; the operator parses live objects with the
same models. Every rule the API server can check is written twice on purpose: as Pydantic validation
(for the operator and unit tests) and as schema keywords or CEL (``x-kubernetes-validations``) for
admission, so ``kubectl apply`` refuses bad manifests before they reach TrueNAS.

No field has a default here: what users omit stays omitted (Argo CD would otherwise show diffs), and
the operator applies defaults itself (``EFFECTIVE_DEFAULTS``) and reports the effective values.
"""

from __future__ import annotations

import re
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic.alias_generators import to_camel
from pydantic.config import JsonDict, JsonValue

from .quantity import MIB, parse_bytes

API_GROUP = "incus.truenas.io"
API_VERSION = "v1alpha1"

# Incus instance names are hostnames: letters, digits and '-', 1-63 characters, a letter first.
INSTANCE_NAME_PATTERN = r"^[A-Za-z](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?$"
# Incus limits.cpu: a count ("2") or a set of CPUs ("0-3", "1,3", "0-1,6").
_CPU_ITEM = r"[0-9]{1,4}(?:-[0-9]{1,4})?"
CPU_PATTERN = rf"^(?:[1-9][0-9]{{0,3}}|[0-9]{{1,4}}-[0-9]{{1,4}}(?:,{_CPU_ITEM})*|[0-9]{{1,4}}(?:,{_CPU_ITEM})+)$"
ENV_KEY_PATTERN = r"^\w[\w/]*$"
MAC_PATTERN = r"^([0-9A-Fa-f]{2}[:-]){5}[0-9A-Fa-f]{2}$"
DEVICE_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$"
MIN_MEMORY = 32 * MIB

ADOPT_ANNOTATION = f"{API_GROUP}/adopt"


class _Model(BaseModel):
    """camelCase on the wire, snake_case in Python; unknown fields are refused."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        use_enum_values=True,
    )


def _cel(rule: str, message: str, field_path: str | None = None) -> JsonDict:
    validation: JsonDict = {"rule": rule, "message": message}
    if field_path:
        validation["fieldPath"] = field_path
    return validation


class InstanceType(StrEnum):
    VM = "VM"
    CONTAINER = "CONTAINER"


class DeviceType(StrEnum):
    DISK = "DISK"
    NIC = "NIC"
    GPU = "GPU"
    USB = "USB"
    TPM = "TPM"
    PROXY = "PROXY"
    PCI = "PCI"
    CDROM = "CDROM"


class NICType(StrEnum):
    BRIDGED = "bridged"
    MACVLAN = "macvlan"


class PowerState(StrEnum):
    RUNNING = "Running"
    STOPPED = "Stopped"
    MANUAL = "Manual"


class DeletionPolicy(StrEnum):
    DELETE = "Delete"
    ORPHAN = "Orphan"


class TransportType(StrEnum):
    WEBSOCKET = "websocket"
    REST = "rest"


class Phase(StrEnum):
    PENDING = "Pending"
    CREATING = "Creating"
    STARTING = "Starting"
    RUNNING = "Running"
    STOPPING = "Stopping"
    STOPPED = "Stopped"
    FROZEN = "Frozen"
    ERROR = "Error"
    DELETING = "Deleting"
    UNKNOWN = "Unknown"


class InstanceDevice(_Model):
    """A device attached to the instance, managed through TrueNAS's device calls."""

    name: Annotated[str, Field(pattern=DEVICE_NAME_PATTERN, max_length=63)] = Field(
        description="Device name, unique within the instance (e.g. data0, proxy-http). Key of the list."
    )
    type: DeviceType = Field(
        description="Device type: DISK, NIC, GPU, USB, TPM, PROXY; PCI and CDROM for VMs where the server has them."
    )
    source: Annotated[str, Field(min_length=1, max_length=1024)] | None = Field(
        None,
        description="Source: a host path under /mnt/ or a /dev/zvol/ path for DISK, the ISO path for CDROM.",
    )
    destination: Annotated[str, Field(min_length=1, max_length=1024)] | None = Field(
        None, description="Path inside the instance where a DISK is mounted (containers)."
    )
    readonly: bool | None = Field(None, description="Mount the device read-only. Effective default: false.")
    extra: dict[str, Any] | None = Field(
        None,
        description=(
            "Type-specific TrueNAS fields passed through unchanged, e.g. for PROXY "
            "{source_proto: TCP, source_port: 8080, dest_proto: TCP, dest_port: 80}, "
            "for GPU {gpu_type: PHYSICAL, pci: ...}."
        ),
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True},
    )


class InstanceNIC(_Model):
    """A network interface of the instance (a NIC device on TrueNAS)."""

    name: Annotated[str, Field(pattern=DEVICE_NAME_PATTERN, max_length=63)] = Field(
        description="Interface (device) name, e.g. eth1. Key of the list."
    )
    type: NICType | None = Field(
        None, description="How the NIC attaches to the host: bridged or macvlan. Effective default: bridged."
    )
    parent: Annotated[str, Field(min_length=1, max_length=64)] | None = Field(
        None, description="Host bridge or interface the NIC attaches to, e.g. br0 or enp1s0."
    )
    hwaddr: Annotated[str, Field(pattern=MAC_PATTERN)] | None = Field(
        None, description="MAC address, e.g. 10:66:6a:01:02:03 (honoured by TrueNAS 25.10 and later)."
    )


class ConnectionReference(_Model):
    """Names a TrueNASConnection in the same namespace."""

    name: Annotated[str, Field(min_length=1, max_length=253)] = Field(
        description="Name of a TrueNASConnection in this namespace."
    )


def _immutable_optional(field: str, message: str) -> JsonDict:
    """Also refuses adding or removing the field (a field-level rule only sees both present)."""
    rule = f"has(self.{field}) == has(oldSelf.{field}) && (!has(self.{field}) || self.{field} == oldSelf.{field})"
    return _cel(rule, message, f".{field}")


_IMMUTABLE_RULES: list[JsonValue] = [
    _immutable_optional("name", "spec.name is immutable: the instance cannot be renamed"),
    _cel("self.type == oldSelf.type", "spec.type is immutable", ".type"),
    _cel(
        "self.image == oldSelf.image",
        "spec.image is immutable: an instance cannot be rebuilt from another image",
        ".image",
    ),
    _immutable_optional("storagePool", "spec.storagePool is immutable"),
]
_CROSS_FIELD_RULES: list[JsonValue] = [
    _cel(
        "self.type == 'VM' || !has(self.devices) || self.devices.all(d, d.type != 'PCI' && d.type != 'CDROM')",
        "spec.devices: PCI and CDROM devices are only supported for VMs",
        ".devices",
    ),
    _cel(
        "!has(self.devices) || self.devices.all(d, d.type != 'DISK' || has(d.source))",
        "spec.devices: a DISK device needs a source",
        ".devices",
    ),
    _cel(
        "self.type == 'VM' || !has(self.devices) || self.devices.all(d, d.type != 'DISK' || has(d.destination))",
        "spec.devices: a DISK device of a CONTAINER needs a destination",
        ".devices",
    ),
    _cel(
        "!has(self.devices) || !has(self.nics) || self.nics.all(n, self.devices.all(d, d.name != n.name))",
        "spec.nics: a NIC may not share its name with an entry of spec.devices",
        ".nics",
    ),
]


# Checked on the whole object: metadata.name becomes the instance name when spec.name is omitted.
INSTANCE_ROOT_RULES: list[JsonValue] = [
    _cel(
        f"has(self.spec.name) || self.metadata.name.matches('{INSTANCE_NAME_PATTERN}')",
        "metadata.name is not a valid Incus instance name (letters, digits and '-', 1-63 characters, "
        "starting with a letter): set spec.name",
    )
]


class IncusInstanceSpec(_Model):
    """Desired state of a TrueNAS Incus instance. Fields left out keep TrueNAS's defaults, reported in status."""

    model_config = ConfigDict(
        json_schema_extra={"x-kubernetes-validations": _IMMUTABLE_RULES + _CROSS_FIELD_RULES},
    )

    name: Annotated[str, Field(pattern=INSTANCE_NAME_PATTERN, max_length=63)] | None = Field(
        None,
        description=(
            "Instance name on TrueNAS. Defaults to metadata.name. A hostname: letters, digits and '-', "
            "1-63 characters, starting with a letter and not ending with '-'. Immutable."
        ),
    )
    type: InstanceType = Field(description="Instance type: CONTAINER or VM. Immutable.")
    image: Annotated[str, Field(min_length=1, max_length=200)] = Field(
        description="Image alias from the Linux Containers catalogue, e.g. debian/bookworm or ubuntu/noble. Immutable."
    )
    storage_pool: Annotated[str, Field(min_length=1, max_length=200)] | None = Field(
        None, description="ZFS pool for the instance's root disk. Defaults to TrueNAS's virtualization pool. Immutable."
    )
    cpu: Annotated[str, Field(pattern=CPU_PATTERN, max_length=64)] | None = Field(
        None,
        description=(
            'CPU limit: a count of cores ("2") or a set of host CPUs ("0-3", "1,3"). Omitted: no limit. Applied live.'
        ),
    )
    memory: int | str | None = Field(
        None,
        description=(
            "Memory limit in bytes or as a Kubernetes quantity (512Mi, 2Gi); at least 32Mi. TrueNAS stores "
            "whole MiB. Omitted: no limit. Applied live."
        ),
        json_schema_extra={
            "x-kubernetes-int-or-string": True,
            "x-kubernetes-validations": [
                _cel(
                    "type(self) == int || (isQuantity(self) && quantity(self).isInteger())",
                    "spec.memory must be a byte count or a Kubernetes quantity such as 512Mi or 2Gi",
                ),
                _cel(
                    "type(self) == int ? self >= 33554432 : (!isQuantity(self) || "
                    "quantity(self).compareTo(quantity('32Mi')) >= 0)",
                    "spec.memory must be at least 32Mi (33554432 bytes)",
                ),
            ],
        },
    )
    autostart: bool | None = Field(None, description="Start the instance when TrueNAS boots. Effective default: true.")
    environment: dict[str, Annotated[str, Field(max_length=1024)]] | None = Field(
        None,
        description=(
            "Environment variables of the instance. Keys match ^\\w[\\w/]*$; values must not be blank. "
            "Replaces the whole environment on TrueNAS."
        ),
        json_schema_extra={
            "maxProperties": 128,
            "x-kubernetes-validations": [
                _cel(
                    "self.all(k, size(k) <= 256 && k.matches('^\\\\w[\\\\w/]*$'))",
                    "spec.environment keys must match ^\\w[\\w/]*$ (letters, digits, _ and /, not starting with /)",
                ),
                _cel(
                    "self.all(k, !self[k].matches('^\\\\s*$'))",
                    "spec.environment values must not be blank",
                ),
            ],
        },
    )
    devices: list[InstanceDevice] | None = Field(
        None,
        max_length=64,
        description="Devices (disks, proxies, GPUs, ...) keyed by name; added, changed and removed live.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )
    nics: list[InstanceNIC] | None = Field(
        None,
        max_length=32,
        description="Extra network interfaces keyed by name (the default NIC from TrueNAS's profile stays).",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )
    power_state: PowerState | None = Field(
        None,
        description=(
            "Running (default) or Stopped are enforced, also after a change made on TrueNAS; "
            "Manual: the operator never starts or stops the instance and only reports its state."
        ),
    )
    stop_timeout_seconds: Annotated[int, Field(ge=0, le=3600)] | None = Field(
        None, description="Seconds to wait for a graceful stop before forcing it. Effective default: 30."
    )
    deletion_policy: DeletionPolicy | None = Field(
        None,
        description=(
            "Delete (default): deleting the resource deletes the instance. Orphan: the instance stays on TrueNAS."
        ),
    )
    connection_ref: ConnectionReference | None = Field(
        None, description="The TrueNASConnection to use. Omitted: the operator's default connection."
    )

    @field_validator("memory")
    @classmethod
    def _memory_in_bytes(cls, value: int | str | None) -> int | str | None:
        if value is None:
            return None
        if parse_bytes(value) < MIN_MEMORY:
            raise ValueError("must be at least 32Mi (33554432 bytes)")
        return value

    @field_validator("environment")
    @classmethod
    def _environment_rules(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        for key, item in (value or {}).items():
            if not re.match(r"^\w[\w/]*$", key, re.ASCII):
                raise ValueError(f"key {key!r} must match ^\\w[\\w/]*$")
            if not item.strip():
                raise ValueError(f"value of {key!r} must not be blank")
        return value

    @model_validator(mode="after")
    def _cross_field(self) -> IncusInstanceSpec:
        devices = self.devices or []
        for label, entries in (("devices", devices), ("nics", self.nics or [])):
            names = [entry.name for entry in entries]
            duplicates = sorted({name for name in names if names.count(name) > 1})
            if duplicates:
                raise ValueError(f"spec.{label}: duplicate names {duplicates}")
        if self.type != InstanceType.VM and any(d.type in (DeviceType.PCI, DeviceType.CDROM) for d in devices):
            raise ValueError("spec.devices: PCI and CDROM devices are only supported for VMs")
        for device in devices:
            if device.type == DeviceType.DISK and not device.source:
                raise ValueError(f"spec.devices[{device.name}]: a DISK device needs a source")
            if device.type == DeviceType.DISK and self.type != InstanceType.VM and not device.destination:
                raise ValueError(f"spec.devices[{device.name}]: a DISK device of a CONTAINER needs a destination")
        clashes = {n.name for n in self.nics or []} & {d.name for d in devices}
        if clashes:
            raise ValueError(f"spec.nics: names {sorted(clashes)} are also used in spec.devices")
        return self

    def memory_bytes(self) -> int | None:
        return None if self.memory is None else parse_bytes(self.memory)


class ConditionStatus(StrEnum):
    TRUE = "True"
    FALSE = "False"
    UNKNOWN = "Unknown"


class Condition(_Model):
    """A condition in the standard Kubernetes shape."""

    type: Annotated[str, Field(max_length=316)] = Field(description="Condition type: Ready or Synced.")
    status: ConditionStatus = Field(description="True, False or Unknown.")
    reason: Annotated[str, Field(max_length=1024)] = Field(
        description="A CamelCase reason, e.g. Available, AlreadyExists, ValidationFailed, Unreachable."
    )
    message: Annotated[str, Field(max_length=32768)] = Field(
        description="Human-readable detail, including TrueNAS's own error message."
    )
    last_transition_time: datetime = Field(description="When the status last changed.")
    observed_generation: Annotated[int, Field(ge=0)] | None = Field(
        None, description="metadata.generation this condition was computed for."
    )


class ImageStatus(_Model):
    """The image the instance was built from, as TrueNAS reports it."""

    os: str | None = Field(None, description="Operating system, e.g. Debian.")
    release: str | None = Field(None, description="Release, e.g. bookworm.")
    serial: str | None = Field(None, description="Image build serial, e.g. 20250612_05:24.")
    architecture: str | None = Field(None, description="Architecture, e.g. amd64.")
    variant: str | None = Field(None, description="Variant, e.g. default or cloud.")
    description: str | None = Field(None, description="TrueNAS's description of the image.")


class JobStatus(_Model):
    """The TrueNAS job the operator is waiting for."""

    id: int = Field(description="TrueNAS job id.")
    method: str = Field(description="The job's method, e.g. virt.instance.create.")
    state: str = Field(description="WAITING, RUNNING, SUCCESS, FAILED or ABORTED.")
    progress: int | None = Field(None, description="Progress in percent.")
    description: str | None = Field(None, description="Progress description from TrueNAS.")


class IncusInstanceStatus(_Model):
    """Observed state, read back from TrueNAS."""

    phase: Phase | None = Field(
        None,
        description=(
            "Pending, Creating, Starting, Running, Stopping, Stopped, Frozen, Error, Deleting or Unknown: "
            "TrueNAS's status refined by what the operator is doing."
        ),
    )
    instance_id: str | None = Field(None, description="The instance's id on TrueNAS.")
    observed_generation: int | None = Field(None, description="The spec generation last acted on.")
    conditions: list[Condition] | None = Field(
        None,
        description="Ready (exists, power state as desired, spec applied) and Synced (last reconcile succeeded).",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    cpu: str | None = Field(None, description="Effective CPU limit read back from TrueNAS; empty means no limit.")
    memory: str | None = Field(None, description="Effective memory limit read back from TrueNAS, as a quantity.")
    autostart: bool | None = Field(None, description="Effective autostart setting read back from TrueNAS.")
    ip_addresses: list[str] | None = Field(None, description="Global IP addresses of the running instance.")
    image: ImageStatus | None = Field(None, description="The image TrueNAS reports for the instance.")
    job: JobStatus | None = Field(None, description="The TrueNAS job in flight, if any.")
    last_sync_time: datetime | None = Field(None, description="When TrueNAS was last observed.")
    message: str | None = Field(None, description="A one-line human summary.")


class IncusInstance(_Model):
    """A TrueNAS Incus instance (container or VM) owned by the cluster."""

    api_version: Literal["incus.truenas.io/v1alpha1"] = Field(description="incus.truenas.io/v1alpha1")
    kind: Literal["IncusInstance"] = Field(description="IncusInstance")
    metadata: dict[str, Any] = Field(description="Standard object metadata.")
    spec: IncusInstanceSpec = Field(description="Desired state.")
    status: IncusInstanceStatus | None = Field(None, description="Observed state.")


class SecretKeyReference(_Model):
    """A key of a Secret in the same namespace."""

    name: Annotated[str, Field(min_length=1, max_length=253)] = Field(description="Secret name.")
    key: Annotated[str, Field(min_length=1, max_length=253)] = Field(description="Key within the Secret.")


class ConnectionTLS(_Model):
    """TLS settings. Certificates are verified against the system CAs unless a CA is given."""

    ca_secret_ref: SecretKeyReference | None = Field(
        None, description="A Secret key holding the PEM CA bundle that signed TrueNAS's certificate."
    )
    insecure_skip_verify: bool | None = Field(
        None, description="Skip certificate verification. Off by default; for tests only."
    )


class TrueNASConnectionSpec(_Model):
    """How to reach one TrueNAS system."""

    url: Annotated[str, Field(pattern=r"^(wss|https|ws|http)://[^/\s]+(/.*)?$", max_length=2048)] = Field(
        description="wss://host or https://host (ws:// and http:// only for loopback simulators)."
    )
    transport: TransportType | None = Field(
        None,
        description="websocket (JSON-RPC, the default and the only one TrueNAS 26 has) or rest (/api/v2.0 on 25.x).",
    )
    api_key_secret_ref: SecretKeyReference = Field(description="The Secret key holding the TrueNAS API key.")
    tls: ConnectionTLS | None = Field(None, description="TLS verification settings.")
    max_concurrent_calls: Annotated[int, Field(ge=1, le=20)] | None = Field(
        None, description="Concurrent calls on this connection (TrueNAS allows 20). Effective default: 20."
    )


class TrueNASConnectionStatus(_Model):
    """What the operator learned about the connection."""

    conditions: list[Condition] | None = Field(
        None,
        description="Ready: the operator logged in and detected the API.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    version: str | None = Field(None, description="TrueNAS version, e.g. TrueNAS-25.10.1.")
    api_version: str | None = Field(None, description="The API version the operator speaks, e.g. v25.10.0.")
    api_family: str | None = Field(None, description="The API family used for instances: virt.instance or container.")
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
}
