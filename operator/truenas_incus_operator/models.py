"""The custom resources' spec and status: the single source of truth.

``crd.py`` turns these models into the CRDs in ``crds/``; the operator parses live objects with the
same models. Every rule the API server can check is written twice on purpose: as Pydantic validation
(for the operator and unit tests) and as schema keywords or CEL (``x-kubernetes-validations``) for
admission, so ``kubectl apply`` refuses bad manifests before they reach TrueNAS. The exception is
the root-level transition rules (``INSTANCE_ROOT_RULES``: immutability once the instance exists),
which need the old object and exist only as CEL.

No field has a default here: what users omit stays omitted (Argo CD would otherwise show diffs), and
the operator applies defaults itself (``EFFECTIVE_DEFAULTS``) and reports the effective values.
"""

from __future__ import annotations

import re
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    StrictStr,
    WithJsonSchema,
    field_validator,
    model_validator,
)
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
# An upper bound keeps the CEL check exact (asApproximateFloat is exact below 2^53) and no host has more.
MAX_MEMORY = 2**50
MAX_MEMORY_QUANTITY = "1Pi"
# Kubernetes object names (DNS-1123 subdomain) and Secret keys (IsConfigMapKey: [-._a-zA-Z0-9]+, not
# "." or "..", not starting with "..").
DNS1123_SUBDOMAIN_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
SECRET_KEY_PATTERN = r"^\.?[-_a-zA-Z0-9][-._a-zA-Z0-9]*$"

# Bounds on every free-form field. kopf copies the whole spec into the annotation
# incus.truenas.io/last-handled-configuration as ASCII JSON (a non-ASCII character costs up to 12
# bytes there), and all annotations together are capped at 256 KiB: with these limits the largest
# admissible spec serializes to less than 128 KiB (tests/test_models.py builds it; test_admission.py
# stores it). Strings restricted to ASCII by a pattern count 1 byte a character, free text 12.
MAX_SPEC_JSON_BYTES = 128 * 1024
IMAGE_MAX_LENGTH = 200
STORAGE_POOL_MAX_LENGTH = 200
ENV_MAX_ENTRIES = 64
ENV_KEY_MAX_LENGTH = 128
ENV_VALUE_MAX_LENGTH = 1024  # TrueNAS's own limit (str_max_length=1024)
ENV_VALUES_TOTAL_MAX_LENGTH = 4096
DEVICES_MAX_ITEMS = 32
NICS_MAX_ITEMS = 16
DEVICE_PATH_MAX_LENGTH = 1024
_PATH_COMPONENT = r"([^/.][^/]*|\.[^/]+)"
HOST_PATH_PATTERN = rf"^/?{_PATH_COMPONENT}(/{_PATH_COMPONENT})*/?$"
"""A device source: no empty (``//``) and no ``.`` component. The chart's admission policy compares
sources with allowed prefixes as strings, the operator's policy by components; they disagreed on
exactly these forms (``/mnt/./x`` and ``/mnt//x``: refused by one, allowed by the other), so
neither is accepted at all. ``..`` stays the policies' to refuse (both do, naming their rule)."""
DEVICE_PATHS_TOTAL_MAX_LENGTH = 2048
NIC_PARENT_MAX_LENGTH = 15  # Linux IFNAMSIZ - 1
EXTRA_MAX_ENTRIES = 8
EXTRA_KEY_PATTERN = r"^[a-z][a-z0-9_]{0,31}$"
EXTRA_VALUE_MAX_LENGTH = 64
# Printable ASCII without '"' and '\\' (TrueNAS's type-specific fields are identifiers, ids and paths).
EXTRA_VALUE_PATTERN = r"^[ !#-\[\]-~]*$"
EXTRA_INT_MIN = -(2**31)
EXTRA_INT_MAX = 2**31 - 1

# Keys of devices[].extra that the typed fields own: the backends build them from name, type, source,
# destination and readonly (truenas/backends/virt.py device_payload: dev_type, name, source,
# destination, readonly; truenas/backends/container.py device_attributes: dtype, source, target) or,
# for NICs, from spec.nics (reconcile.desired_devices -> nic_type, parent, mac; container.py: nic_attach).
EXTRA_OWNED_KEYS = ("dev_type", "dtype", "name", "source", "destination", "target", "readonly")
# ``network`` (an Incus managed network on 25.x) too: it would bypass the policy's nicParents.
EXTRA_NIC_OWNED_KEYS = ("nic_type", "parent", "mac", "nic_attach", "network")
RE2_SPACE = "\t\n\f\r "
"""What ``\\s`` matches in the API server's CEL regexes (RE2): ASCII only, so a value of Unicode spaces
is not blank there and must not be blank here either (a spec admission accepts must parse)."""

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


def _cel_list(values: tuple[str, ...] | list[str]) -> str:
    return "[" + ", ".join(f"'{v}'" for v in values) + "]"


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


def _extra_value(value: int | str) -> int | str:
    if isinstance(value, str):
        if len(value) > EXTRA_VALUE_MAX_LENGTH:
            raise ValueError(f"must be at most {EXTRA_VALUE_MAX_LENGTH} characters")
        if not re.fullmatch(EXTRA_VALUE_PATTERN[1:-1], value):
            raise ValueError("must be printable ASCII without '\"' or '\\\\'")
    elif not EXTRA_INT_MIN <= value <= EXTRA_INT_MAX:
        raise ValueError(f"must be between {EXTRA_INT_MIN} and {EXTRA_INT_MAX}")
    return value


# One value of devices[].extra: a string or an integer (TrueNAS's device fields that are not typed here
# are strings and integers: ports, bus/dev numbers, uid/gid, boot_priority; its only boolean, readonly,
# is a typed field). Not nested, so the spec stays small and flat.
ExtraValue = Annotated[
    StrictInt | StrictStr,
    AfterValidator(_extra_value),
    WithJsonSchema(
        {
            "x-kubernetes-int-or-string": True,
            "maxLength": EXTRA_VALUE_MAX_LENGTH,
            "pattern": EXTRA_VALUE_PATTERN,
            "minimum": EXTRA_INT_MIN,
            "maximum": EXTRA_INT_MAX,
        }
    ),
]

_EXTRA_RULES: list[JsonValue] = [
    _cel(
        f"self.all(k, k.matches('{EXTRA_KEY_PATTERN}'))",
        "keys must be TrueNAS field names: lowercase letters, digits and '_', at most 32 characters",
    ),
]

_DEVICE_RULES: list[JsonValue] = [
    _cel(
        f"!has(self.extra) || !self.extra.exists(k, k in {_cel_list(EXTRA_OWNED_KEYS)})",
        "extra may not set " + ", ".join(EXTRA_OWNED_KEYS) + ": the typed fields name, type, source, "
        "destination and readonly own them",
        ".extra",
    ),
    _cel(
        f"self.type != 'NIC' || !has(self.extra) || !self.extra.exists(k, k in {_cel_list(EXTRA_NIC_OWNED_KEYS)})",
        "extra of a NIC may not set " + ", ".join(EXTRA_NIC_OWNED_KEYS) + ": declare the NIC in spec.nics "
        "(type, parent, hwaddr)",
        ".extra",
    ),
]


class InstanceDevice(_Model):
    """A device attached to the instance, managed through TrueNAS's device calls."""

    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": _DEVICE_RULES})

    name: Annotated[str, Field(pattern=DEVICE_NAME_PATTERN, max_length=63)] = Field(
        description="Device name, unique within the instance (e.g. data0, proxy-http). Key of the list."
    )
    type: DeviceType = Field(
        description=(
            "Device type: DISK, NIC, GPU, USB, TPM, PROXY; PCI and CDROM for VMs only, PROXY for containers only. "
            "Types a TrueNAS version lacks (e.g. TPM and PROXY for TrueNAS 26 containers) are reported in status."
        )
    )
    source: Annotated[str, Field(min_length=1, max_length=DEVICE_PATH_MAX_LENGTH, pattern=HOST_PATH_PATTERN)] | None = (
        Field(
            None,
            description=(
                "Source: a host path under /mnt/ or a /dev/zvol/ path for DISK, the ISO path for CDROM; "
                "written plainly (no '//' and no '.' component). "
                f"Sources and destinations of all devices together: at most {DEVICE_PATHS_TOTAL_MAX_LENGTH} characters."
            ),
        )
    )
    destination: Annotated[str, Field(min_length=1, max_length=DEVICE_PATH_MAX_LENGTH)] | None = Field(
        None, description="Path inside the instance where a DISK is mounted (containers)."
    )
    readonly: bool | None = Field(None, description="Mount the device read-only. Effective default: false.")
    extra: dict[str, ExtraValue] | None = Field(
        None,
        max_length=EXTRA_MAX_ENTRIES,
        description=(
            "Type-specific TrueNAS fields passed through unchanged, e.g. for PROXY "
            "{source_proto: TCP, source_port: 8080, dest_proto: TCP, dest_port: 80}, "
            "for GPU {gpu_type: PHYSICAL, pci: ...}. A flat map of at most "
            f"{EXTRA_MAX_ENTRIES} entries: keys are TrueNAS field names, values strings (printable ASCII, "
            f"at most {EXTRA_VALUE_MAX_LENGTH} characters) or integers. Fields the typed fields own "
            "(" + ", ".join(EXTRA_OWNED_KEYS) + "; for NICs " + ", ".join(EXTRA_NIC_OWNED_KEYS) + ") are refused."
        ),
        json_schema_extra={"x-kubernetes-validations": _EXTRA_RULES},
    )

    @field_validator("extra")
    @classmethod
    def _extra_keys(cls, value: dict[str, int | str] | None) -> dict[str, int | str] | None:
        for key in value or {}:
            if not re.fullmatch(EXTRA_KEY_PATTERN[1:-1], key):
                raise ValueError(f"key {key!r}: keys must be TrueNAS field names (lowercase, digits, '_', <= 32)")
        owned = sorted(set(value or {}) & set(EXTRA_OWNED_KEYS))
        if owned:
            raise ValueError(f"extra may not set {', '.join(owned)}: the typed fields own them")
        return value

    @model_validator(mode="after")
    def _nic_extra(self) -> InstanceDevice:
        owned = sorted(set(self.extra or {}) & set(EXTRA_NIC_OWNED_KEYS))
        if self.type == DeviceType.NIC and owned:
            raise ValueError(f"extra of a NIC may not set {', '.join(owned)}: declare the NIC in spec.nics")
        return self


class InstanceNIC(_Model):
    """A network interface of the instance (a NIC device on TrueNAS)."""

    name: Annotated[str, Field(pattern=DEVICE_NAME_PATTERN, max_length=63)] = Field(
        description="Interface (device) name, e.g. eth1. Key of the list."
    )
    type: NICType | None = Field(
        None, description="How the NIC attaches to the host: bridged or macvlan. Effective default: bridged."
    )
    parent: Annotated[str, Field(min_length=1, max_length=NIC_PARENT_MAX_LENGTH)] | None = Field(
        None, description="Host bridge or interface the NIC attaches to, e.g. br0 or enp1s0."
    )
    hwaddr: Annotated[str, Field(pattern=MAC_PATTERN, max_length=17)] | None = Field(
        None, description="MAC address, e.g. 10:66:6a:01:02:03 (honoured by TrueNAS 25.10 and later)."
    )


class ConnectionReference(_Model):
    """Names a TrueNASConnection in the same namespace."""

    name: Annotated[str, Field(pattern=DNS1123_SUBDOMAIN_PATTERN, min_length=1, max_length=253)] = Field(
        description="Name of a TrueNASConnection in this namespace (a Kubernetes object name)."
    )


# Device types each instance type can have. Admission cannot know which TrueNAS a connection reaches,
# so it refuses what every TrueNAS version refuses; a type one version lacks (TPM and PROXY on
# TrueNAS 26 containers, truenas-vm-container.md §3.5) is reported in status by that version's backend.
#  * virt.instance, 25.04-25.10 (truenas-api.md §5, schemas truenas-schemas/v25_*.virt.device.json):
#    DISK, NIC, USB, TPM and GPU for both types (TPM: "containers default /dev/tpm0");
#    PCI only for VMs ("PCI passthrough is only supported for vms"), CDROM only for VMs (25.10,
#    "Container instance type is not supported"); PROXY is built with bind=host and without NAT
#    (truenas-api.md §5, "Incus mapping"), which Incus allows for containers only (Incus docs,
#    reference/devices_proxy: "VMs (NAT mode only)").
#  * container.*, 26 (truenas-vm-container.md §3.5): FILESYSTEM (our DISK), NIC, GPU, USB.
#  * vm.*, 25.04.2+ (truenas-vm-container.md §2.5): no PROXY device at all (nor TPM/GPU: a VM flag and PCI).
DEVICE_TYPES_BY_INSTANCE_TYPE: dict[str, tuple[str, ...]] = {
    "VM": ("DISK", "NIC", "GPU", "USB", "TPM", "PCI", "CDROM"),
    "CONTAINER": ("DISK", "NIC", "GPU", "USB", "TPM", "PROXY"),
}
_VM_ONLY = tuple(t for t in DEVICE_TYPES_BY_INSTANCE_TYPE["VM"] if t not in DEVICE_TYPES_BY_INSTANCE_TYPE["CONTAINER"])
_CONTAINER_ONLY = tuple(
    t for t in DEVICE_TYPES_BY_INSTANCE_TYPE["CONTAINER"] if t not in DEVICE_TYPES_BY_INSTANCE_TYPE["VM"]
)


def _device_type_rule(instance_type: str, refused: tuple[str, ...], why: str) -> JsonDict:
    # A static message: messageExpression listing the offending names costs too much for the API
    # server's estimate; the message names the types, and each name in the list has one type.
    kinds = " or ".join(refused)
    present = f"self.devices.exists(d, d.type in {_cel_list(refused)})"
    return _cel(
        f"self.type != '{instance_type}' || !has(self.devices) || !{present}",
        f"spec.devices: a {instance_type} cannot have {kinds} devices: {why}",
        ".devices",
    )


_CROSS_FIELD_RULES: list[JsonValue] = [
    _device_type_rule("CONTAINER", _VM_ONLY, " and ".join(_VM_ONLY) + " devices are only supported for VMs"),
    _device_type_rule(
        "VM", _CONTAINER_ONLY, " and ".join(_CONTAINER_ONLY) + " devices are only supported for containers"
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
    _cel(
        "!has(self.devices) || self.devices.map(d, (has(d.source) ? size(d.source) : 0) + "
        f"(has(d.destination) ? size(d.destination) : 0)).sum() <= {DEVICE_PATHS_TOTAL_MAX_LENGTH}",
        f"spec.devices: sources and destinations of all devices together may not exceed "
        f"{DEVICE_PATHS_TOTAL_MAX_LENGTH} characters",
        ".devices",
    ),
]

# An instance exists on TrueNAS (or is being created) once the operator wrote status.instanceId or a
# phase other than Pending and Error. Until then image, type, name and storagePool can be corrected in
# place (a typo, a create TrueNAS refused); afterwards they are immutable. Root-level transition rules,
# because only the whole object sees the status next to the spec.
#
# status.binding is the anchor: the operator sets it once, when it starts the create or sees the
# instance it created or adopted, keeps it through connection and authentication failures, and removes
# it only when TrueNAS answers that the instance is gone. Tenants have no rights on the status
# subresource, and a spec update cannot change the status (the API server keeps the old one), so
# oldSelf.status is what the operator last wrote. instanceId and the phase still count, for a status
# written before status.binding existed.
_NOT_CREATED = (
    "!has(oldSelf.status) || (!has(oldSelf.status.binding) && !has(oldSelf.status.instanceId) && "
    "(!has(oldSelf.status.phase) || oldSelf.status.phase in ['Pending', 'Error']))"
)


def _immutable(field: str, message: str) -> JsonDict:
    """Also refuses adding or removing an optional field (``has`` on both sides)."""
    same = (
        f"has(self.spec.{field}) == has(oldSelf.spec.{field}) && "
        f"(!has(self.spec.{field}) || self.spec.{field} == oldSelf.spec.{field})"
    )
    return _cel(f"{_NOT_CREATED} || ({same})", message, f".spec.{field}")


_CREATED_NOTE = "once the instance exists on TrueNAS (status.binding set: created, adopted or a create under way)"
# Checked on the whole object: metadata.name becomes the instance name when spec.name is omitted.
INSTANCE_ROOT_RULES: list[JsonValue] = [
    _cel(
        f"has(self.spec.name) || self.metadata.name.matches('{INSTANCE_NAME_PATTERN}')",
        "metadata.name is not a valid Incus instance name (letters, digits and '-', 1-63 characters, "
        "starting with a letter): set spec.name",
    ),
    _immutable("name", f"spec.name is immutable {_CREATED_NOTE}: the instance cannot be renamed"),
    _immutable("type", f"spec.type is immutable {_CREATED_NOTE}"),
    _immutable(
        "image",
        f"spec.image is immutable {_CREATED_NOTE}: an instance cannot be rebuilt from another image",
    ),
    _immutable("storagePool", f"spec.storagePool is immutable {_CREATED_NOTE}"),
    _immutable(
        "connectionRef",
        f"spec.connectionRef is immutable {_CREATED_NOTE}: the resource stays bound to the TrueNAS its instance "
        "lives on",
    ),
]


CLOUD_INIT_MAX_LENGTH = 65536
MAX_ROOT_DISK = 2**50


class CloudInit(_Model):
    """NoCloud data for a VM's cloud-init (TrueNAS vm.* has none: the operator writes a seed ISO)."""

    user_data: Annotated[str, Field(max_length=CLOUD_INIT_MAX_LENGTH)] | None = Field(
        None,
        description=(
            "cloud-init user-data (#cloud-config, a script, ...). With spec.environment both are given to "
            "cloud-init as one MIME multi-part user-data. Read at the VM's first boot; changes later are not applied."
        ),
    )
    network_config: Annotated[str, Field(max_length=CLOUD_INIT_MAX_LENGTH)] | None = Field(
        None, description="cloud-init network-config (version 1 or 2). Omitted: cloud-init's default (DHCP)."
    )


class IncusInstanceSpec(_Model):
    """Desired state of a TrueNAS Incus instance. Fields left out keep TrueNAS's defaults, reported in status."""

    model_config = ConfigDict(
        json_schema_extra={"x-kubernetes-validations": _CROSS_FIELD_RULES},
    )

    name: Annotated[str, Field(pattern=INSTANCE_NAME_PATTERN, max_length=63)] | None = Field(
        None,
        description=(
            "Instance name on TrueNAS. Defaults to metadata.name. A hostname: letters, digits and '-', "
            "1-63 characters, starting with a letter and not ending with '-'. Immutable once the instance exists."
        ),
    )
    type: InstanceType = Field(description="Instance type: CONTAINER or VM. Immutable once the instance exists.")
    image: Annotated[str, Field(min_length=1, max_length=IMAGE_MAX_LENGTH)] = Field(
        description=(
            "Image alias from the Linux Containers catalogue, e.g. debian/bookworm or ubuntu/noble. "
            "Immutable once the instance exists; can be corrected while a create failed or never ran."
        )
    )
    storage_pool: Annotated[str, Field(min_length=1, max_length=STORAGE_POOL_MAX_LENGTH)] | None = Field(
        None,
        description=(
            "ZFS pool for the instance's root disk. Defaults to TrueNAS's virtualization pool. "
            "Immutable once the instance exists."
        ),
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
            "Memory limit in bytes or as a Kubernetes quantity (512Mi, 1.5Gi, 64M): a whole number of bytes, "
            "at least 32Mi and at most 1Pi. TrueNAS stores whole MiB. Omitted: no limit. Applied live."
        ),
        json_schema_extra={
            "x-kubernetes-int-or-string": True,
            "maxLength": 64,
            "x-kubernetes-validations": [
                # isInteger() is false for every quantity the API server stores as a decimal (1.5Gi), so a
                # quantity is also whole when it equals its own value rounded to an integer; exact below
                # 2^53 bytes, hence the upper bound checked first.
                _cel(
                    "type(self) == int || (isQuantity(self) && (quantity(self).isInteger() || "
                    "(quantity(self).isGreaterThan(quantity('0')) && "
                    f"quantity(self).compareTo(quantity('{MAX_MEMORY_QUANTITY}')) <= 0 && "
                    "quantity('0').add(int(quantity(self).asApproximateFloat() + 0.5))"
                    ".compareTo(quantity(self)) == 0)))",
                    "spec.memory must be a whole number of bytes: a byte count or a Kubernetes quantity "
                    "such as 512Mi, 1.5Gi or 64M",
                ),
                _cel(
                    f"type(self) == int ? self >= {MIN_MEMORY} && self <= {MAX_MEMORY} : (!isQuantity(self) || "
                    "(quantity(self).compareTo(quantity('32Mi')) >= 0 && "
                    f"quantity(self).compareTo(quantity('{MAX_MEMORY_QUANTITY}')) <= 0))",
                    f"spec.memory must be at least 32Mi ({MIN_MEMORY} bytes) and at most {MAX_MEMORY_QUANTITY}",
                ),
            ],
        },
    )
    autostart: bool | None = Field(None, description="Start the instance when TrueNAS boots. Effective default: true.")
    environment: dict[str, Annotated[str, Field(max_length=ENV_VALUE_MAX_LENGTH)]] | None = Field(
        None,
        description=(
            "Environment variables of the instance. Keys match ^\\w[\\w/]*$ (at most "
            f"{ENV_KEY_MAX_LENGTH} characters); values must not be blank, at most {ENV_VALUE_MAX_LENGTH} "
            f"characters each and {ENV_VALUES_TOTAL_MAX_LENGTH} together; at most {ENV_MAX_ENTRIES} entries. "
            "Replaces the whole environment on TrueNAS."
        ),
        json_schema_extra={
            "maxProperties": ENV_MAX_ENTRIES,
            "x-kubernetes-validations": [
                _cel(
                    f"self.all(k, size(k) <= {ENV_KEY_MAX_LENGTH} && k.matches('^\\\\w[\\\\w/]*$'))",
                    "spec.environment keys must match ^\\w[\\w/]*$ (letters, digits, _ and /, not starting with /) "
                    f"and be at most {ENV_KEY_MAX_LENGTH} characters",
                ),
                _cel(
                    "self.all(k, !self[k].matches('^\\\\s*$'))",
                    "spec.environment values must not be blank",
                ),
                _cel(
                    f"self.map(k, size(self[k])).sum() <= {ENV_VALUES_TOTAL_MAX_LENGTH}",
                    f"spec.environment values together may not exceed {ENV_VALUES_TOTAL_MAX_LENGTH} characters",
                ),
            ],
        },
    )
    devices: list[InstanceDevice] | None = Field(
        None,
        max_length=DEVICES_MAX_ITEMS,
        description=(
            "Devices (disks, proxies, GPUs, ...) keyed by name; added, changed and removed live. "
            "Omitted or empty: the instance has no devices besides those its TrueNAS profile gives it "
            "(the operator removes any it added)."
        ),
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )
    nics: list[InstanceNIC] | None = Field(
        None,
        max_length=NICS_MAX_ITEMS,
        description=(
            "Extra network interfaces keyed by name (the default NIC from TrueNAS's profile stays). "
            "Omitted or empty: the instance has no NICs besides those its TrueNAS profile gives it "
            "(the operator removes any it added)."
        ),
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )
    root_disk_size: int | str | None = Field(
        None,
        description=(
            "VMs on the vm.* API (TrueNAS 25.04.2 and later): size of the root disk in bytes or as a quantity "
            "(20Gi). Only grows the image's own size, never shrinks it. Applied when the VM is created."
        ),
        json_schema_extra={"x-kubernetes-int-or-string": True, "maxLength": 64},
    )
    cloud_init: CloudInit | None = Field(
        None,
        description=(
            "VMs on the vm.* API: cloud-init data, given to the guest through a NoCloud seed (a 'cidata' ISO "
            "attached as CDROM). Applied when the VM is created."
        ),
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
        None,
        description=(
            "The TrueNASConnection to use. Omitted: the operator's default connection. Immutable once the "
            "instance exists (the resource stays bound to the TrueNAS its instance lives on)."
        ),
    )

    @field_validator("memory")
    @classmethod
    def _memory_in_bytes(cls, value: int | str | None) -> int | str | None:
        if value is None:
            return None
        if isinstance(value, str) and len(value) > 64:
            raise ValueError("must be at most 64 characters")
        amount = parse_bytes(value)
        if not MIN_MEMORY <= amount <= MAX_MEMORY:
            raise ValueError(f"must be at least 32Mi ({MIN_MEMORY} bytes) and at most {MAX_MEMORY_QUANTITY}")
        return value

    @field_validator("root_disk_size")
    @classmethod
    def _root_disk_in_bytes(cls, value: int | str | None) -> int | str | None:
        if value is None:
            return None
        if isinstance(value, str) and len(value) > 64:
            raise ValueError("must be at most 64 characters")
        if not 0 < parse_bytes(value) <= MAX_ROOT_DISK:
            raise ValueError("must be a positive size of at most 1Pi")
        return value

    def root_disk_bytes(self) -> int | None:
        return None if self.root_disk_size is None else parse_bytes(self.root_disk_size)

    @field_validator("environment")
    @classmethod
    def _environment_rules(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value is not None and len(value) > ENV_MAX_ENTRIES:
            raise ValueError(f"at most {ENV_MAX_ENTRIES} entries")
        for key, item in (value or {}).items():
            if len(key) > ENV_KEY_MAX_LENGTH or not re.match(r"^\w[\w/]*$", key, re.ASCII):
                raise ValueError(f"key {key!r} must match ^\\w[\\w/]*$ and be at most {ENV_KEY_MAX_LENGTH} characters")
            if not item.strip(RE2_SPACE):
                raise ValueError(f"value of {key!r} must not be blank")
        if sum(len(item) for item in (value or {}).values()) > ENV_VALUES_TOTAL_MAX_LENGTH:
            raise ValueError(f"values together may not exceed {ENV_VALUES_TOTAL_MAX_LENGTH} characters")
        return value

    @model_validator(mode="after")
    def _cross_field(self) -> IncusInstanceSpec:
        devices = self.devices or []
        for label, entries in (("devices", devices), ("nics", self.nics or [])):
            names = [entry.name for entry in entries]
            duplicates = sorted({name for name in names if names.count(name) > 1})
            if duplicates:
                raise ValueError(f"spec.{label}: duplicate names {duplicates}")
        allowed = DEVICE_TYPES_BY_INSTANCE_TYPE[str(self.type)]
        refused = [f"{d.name}: {d.type}" for d in devices if str(d.type) not in allowed]
        if refused:
            raise ValueError(f"spec.devices: a {self.type} cannot have these devices ({', '.join(refused)})")
        for device in devices:
            if device.type == DeviceType.DISK and not device.source:
                raise ValueError(f"spec.devices[{device.name}]: a DISK device needs a source")
            if device.type == DeviceType.DISK and self.type != InstanceType.VM and not device.destination:
                raise ValueError(f"spec.devices[{device.name}]: a DISK device of a CONTAINER needs a destination")
        paths = sum(len(d.source or "") + len(d.destination or "") for d in devices)
        if paths > DEVICE_PATHS_TOTAL_MAX_LENGTH:
            limit = DEVICE_PATHS_TOTAL_MAX_LENGTH
            raise ValueError(f"spec.devices: sources and destinations together may not exceed {limit} characters")
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


class InstanceBinding(_Model):
    """The instance a resource is bound to, with the spec fields it was created (or adopted) with."""

    name: str = Field(description="The instance's name on TrueNAS.")
    type: str = Field(description="CONTAINER or VM, as created or adopted.")
    image: str = Field(description="spec.image when the instance was created or adopted.")
    storage_pool: str | None = Field(None, description="spec.storagePool when the instance was created or adopted.")
    connection_ref: str | None = Field(
        None, description="spec.connectionRef.name when the instance was created or adopted; empty: the default."
    )


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
    binding: InstanceBinding | None = Field(
        None,
        description=(
            "Set by the operator when it starts creating the instance or sees the one it created or adopted; "
            "kept while TrueNAS cannot be reached or refuses the key; removed only when TrueNAS reports the "
            "instance gone. While set, spec.name, type, image, storagePool and connectionRef are immutable, and "
            "a spec that differs from it is never reported Ready."
        ),
    )
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
    last_sync_time: datetime | None = Field(
        None, description="When the operator last wrote this status (it writes only changes: idle, nothing)."
    )
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
    tls: ConnectionTLS | None = Field(None, description="TLS verification settings.")
    allow_insecure_transport: bool | None = Field(
        None,
        description=(
            "Allow plain ws:// or http:// to a host other than loopback: the API key and all traffic travel "
            "unencrypted, and TrueNAS revokes a key it receives that way. Off by default."
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
}
