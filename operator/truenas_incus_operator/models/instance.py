"""The IncusInstance: its spec (devices, NICs, cloud-init), its status, and the resource."""

from __future__ import annotations

import ipaddress
import re
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    ConfigDict,
    Field,
    StrictInt,
    StrictStr,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from ..quantity import parse_bytes
from .cel import _CROSS_FIELD_RULES, _DEVICE_RULES, _EXTRA_RULES, DEVICE_TYPES_BY_INSTANCE_TYPE, _cel
from .common import (
    AddressFamily,
    AddressSource,
    Condition,
    DeletionPolicy,
    DeviceType,
    InstanceType,
    ManagementPolicy,
    NICType,
    Phase,
    PowerState,
    _Model,
)
from .expose import Expose
from .limits import (
    CPU_PATTERN,
    DEVICE_NAME_PATTERN,
    DEVICE_PATH_MAX_LENGTH,
    DEVICE_PATHS_TOTAL_MAX_LENGTH,
    DEVICES_MAX_ITEMS,
    DNS1123_SUBDOMAIN_PATTERN,
    ENV_KEY_MAX_LENGTH,
    ENV_MAX_ENTRIES,
    ENV_VALUE_MAX_LENGTH,
    ENV_VALUES_TOTAL_MAX_LENGTH,
    EXTRA_INT_MAX,
    EXTRA_INT_MIN,
    EXTRA_KEY_PATTERN,
    EXTRA_MAX_ENTRIES,
    EXTRA_NIC_OWNED_KEYS,
    EXTRA_OWNED_KEYS,
    EXTRA_VALUE_MAX_LENGTH,
    EXTRA_VALUE_PATTERN,
    HOST_PATH_PATTERN,
    IMAGE_MAX_LENGTH,
    INSTANCE_NAME_PATTERN,
    MAC_PATTERN,
    MAX_MEMORY,
    MAX_MEMORY_QUANTITY,
    MIN_MEMORY,
    NIC_PARENT_MAX_LENGTH,
    NICS_MAX_ITEMS,
    RE2_SPACE,
    SNAPSHOT_KEEP_MAX,
    SNAPSHOT_SCHEDULE_MAX_LENGTH,
    SNAPSHOT_SCHEDULE_PATTERN,
    STORAGE_POOL_MAX_LENGTH,
)
from .snapshot import MAX_LISTED_SNAPSHOTS, ObjectReference, SnapshotEntry, SnapshotScheduleStatus


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
    addresses: Annotated[list[Annotated[str, Field(max_length=49)]], Field(min_length=1, max_length=8)] | None = Field(
        None,
        description=(
            "Static addresses with their prefix (CIDR), e.g. 192.168.10.20/24 or 2001:db8::20/64, delivered to a "
            "VM's cloud-init as the NoCloud network-config (version 2) of its seed at first boot; they show in "
            "status.addresses with source Declared. Containers: no TrueNAS API sets one (Synced says "
            "PartiallyApplied). Every NIC of spec.nics then needs hwaddr: the guest matches its interfaces by MAC."
        ),
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "self.all(a, isCIDR(a) && a.contains('/'))",
                    "message": "each address with its prefix length, e.g. 192.168.10.20/24",
                }
            ]
        },
    )
    gateway: Annotated[str, Field(max_length=39)] | None = Field(
        None,
        description="The default route's gateway on this NIC (on the network of one of its addresses).",
        json_schema_extra={"x-kubernetes-validations": [{"rule": "isIP(self)", "message": "an IP address"}]},
    )
    nameservers: Annotated[list[Annotated[str, Field(max_length=39)]], Field(max_length=3)] | None = Field(
        None,
        description="DNS servers for this NIC (at most 3).",
        json_schema_extra={
            "x-kubernetes-validations": [{"rule": "self.all(a, isIP(a))", "message": "each an IP address"}]
        },
    )

    @field_validator("addresses")
    @classmethod
    def _addresses(cls, value: list[str] | None) -> list[str] | None:
        for item in value or []:
            if not re.fullmatch(r"[0-9A-Fa-f:.]+/[0-9]{1,3}", item):
                raise ValueError(f"{item!r}: an address with its prefix length, e.g. 192.168.10.20/24")
            try:
                interface = ipaddress.ip_interface(item)
            except ValueError:
                raise ValueError(f"{item!r} is not an IP address with a prefix length") from None
            address = interface.ip
            if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
                raise ValueError(f"{item!r}: an IPv4-mapped address; write the IPv4 address")
            if address.is_unspecified or address.is_loopback or address.is_multicast or address.is_link_local:
                raise ValueError(f"{item!r}: not an address a guest can be given (loopback, link-local, ...)")
            if interface.network.prefixlen == interface.max_prefixlen and address.version == 4:
                raise ValueError(f"{item!r}: a /32 leaves no network for a gateway")
        return value

    @field_validator("gateway")
    @classmethod
    def _gateway(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                ipaddress.ip_address(value)
            except ValueError:
                raise ValueError(f"{value!r} is not an IP address") from None
        return value

    @field_validator("nameservers")
    @classmethod
    def _nameservers(cls, value: list[str] | None) -> list[str] | None:
        for item in value or []:
            try:
                ipaddress.ip_address(item)
            except ValueError:
                raise ValueError(f"{item!r} is not an IP address") from None
        return value

    @model_validator(mode="after")
    def _gateway_on_its_network(self) -> InstanceNIC:
        if (self.gateway or self.nameservers) and not self.addresses:
            raise ValueError(f"spec.nics[{self.name}]: gateway and nameservers need addresses")
        if self.gateway is not None:
            gateway = ipaddress.ip_address(self.gateway)
            networks = [ipaddress.ip_interface(a).network for a in self.addresses or []]
            if not any(gateway.version == n.version and gateway in n for n in networks):
                message = f"gateway {self.gateway} is on none of its addresses' networks"
                raise ValueError(f"spec.nics[{self.name}]: {message}")
        return self


class ConnectionReference(_Model):
    """Names a TrueNASConnection in the same namespace."""

    name: Annotated[str, Field(pattern=DNS1123_SUBDOMAIN_PATTERN, min_length=1, max_length=253)] = Field(
        description="Name of a TrueNASConnection in this namespace (a Kubernetes object name)."
    )


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


class SnapshotSchedule(_Model):
    """Snapshots TrueNAS takes on its own (a periodic snapshot task): they go on while the cluster or
    the operator is down."""

    schedule: Annotated[str, Field(min_length=9, max_length=SNAPSHOT_SCHEDULE_MAX_LENGTH)] = Field(
        description=(
            "When: a 5-field cron schedule (minute hour day-of-month month day-of-week) in the NAS's time zone, "
            "e.g. '0 * * * *' (hourly) or '30 2 * * 1-5' (02:30 on weekdays)."
        ),
        json_schema_extra={
            "x-kubernetes-validations": [
                _cel(
                    f"self.matches('{SNAPSHOT_SCHEDULE_PATTERN}')",
                    "spec.snapshots.schedule must be a 5-field cron schedule (minute hour day-of-month month "
                    "day-of-week), e.g. '0 */6 * * *'",
                )
            ]
        },
    )
    keep: Annotated[int, Field(ge=1, le=SNAPSHOT_KEEP_MAX)] = Field(
        description=(
            f"How many snapshots to keep, 1 to {SNAPSHOT_KEEP_MAX}. TrueNAS keeps snapshots for a lifetime, not "
            "a count: keep times the shortest gap between two firings of the schedule becomes the lifetime, "
            "rounded up to whole hours (status.snapshotSchedule says what it became)."
        )
    )

    @field_validator("schedule")
    @classmethod
    def _five_fields(cls, value: str) -> str:
        if not re.fullmatch(SNAPSHOT_SCHEDULE_PATTERN[1:-1], value):
            raise ValueError("must be a 5-field cron schedule (minute hour day-of-month month day-of-week)")
        return value


class InstanceSource(_Model):
    """What a new instance is made from instead of an image (``spec.source``)."""

    snapshot_ref: ObjectReference = Field(
        description=(
            "An IncusInstanceSnapshot of this namespace: the new VM's root disk is a ZFS clone of that snapshot's "
            "root volume (seconds, no download, no conversion), then the VM is built as usual with its own seed. "
            "VMs on the vm.* API only (TrueNAS 25.04.2 and later); the clone lives on the snapshot's pool, and "
            "the snapshot cannot be deleted while the clone exists. Immutable once the instance exists."
        )
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
    image: Annotated[str, Field(min_length=1, max_length=IMAGE_MAX_LENGTH)] | None = Field(
        None,
        description=(
            "Image alias from the Linux Containers catalogue, e.g. debian/bookworm or ubuntu/noble. Exactly one of "
            "image and source. Immutable once the instance exists; can be corrected while a create failed or "
            "never ran."
        ),
    )
    source: InstanceSource | None = Field(
        None,
        description=(
            "Instead of image: make the instance from a snapshot (source.snapshotRef.name, an IncusInstanceSnapshot "
            "of this namespace). Exactly one of image and source. Immutable once the instance exists."
        ),
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
    memory_overcommit: bool | None = Field(
        None,
        description=(
            "VMs on the vm.* API: start the VM even when TrueNAS cannot guarantee its memory (vm.start's "
            "overcommit: TrueNAS shrinks the ZFS cache instead of refusing). Needs the administrator's policy "
            "(memoryOvercommit: true). Default: false (a refusal is reported as InsufficientMemory)."
        ),
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
    readiness: Readiness | None = Field(
        None, description="What Ready waits for besides the instance running as the spec says (an address)."
    )
    management_policy: ManagementPolicy | None = Field(
        None,
        description=(
            "Full (default): the operator creates, changes, powers and deletes the instance. ObserveOnly: it "
            "never writes to TrueNAS and never deletes the instance; the status mirrors the instance and the "
            "InSync condition says what Full would change. Observing an instance this resource did not create "
            "needs the administrator's policy (observation). ObserveOnly to Full is an adoption (the "
            "incus.truenas.io/adopt annotation and the policy's adoption); Full to ObserveOnly stops all writes."
        ),
    )
    connection_ref: ConnectionReference | None = Field(
        None,
        description=(
            "The TrueNASConnection to use. Omitted: the operator's default connection. Immutable once the "
            "instance exists (the resource stays bound to the TrueNAS its instance lives on)."
        ),
    )
    expose: Expose | None = Field(
        None,
        description=(
            "The instance as a Kubernetes Service named after this IncusInstance (so pods reach it as "
            "NAME.NAMESPACE.svc): a Service without a selector and its EndpointSlices, owned by the operator, "
            "holding the addresses of status.addresses (ready only while the instance is Running). Removing it "
            "deletes them. A Service of that name the operator did not make is never taken over (Exposed=False)."
        ),
    )
    snapshots: SnapshotSchedule | None = Field(
        None,
        description=(
            "Periodic snapshots of the instance's datasets, taken by TrueNAS itself (a periodic snapshot task the "
            "operator creates, changes and deletes with this field). Removing it deletes the task; the "
            "snapshots it made stay, listed in status.snapshots, until the instance is deleted. TrueNAS 25.x "
            "has no periodic tasks on the datasets of Incus instances (reported in status)."
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
            if len(key) > ENV_KEY_MAX_LENGTH or not re.fullmatch(r"\w[\w/]*", key, re.ASCII):
                raise ValueError(f"key {key!r} must match ^\\w[\\w/]*$ and be at most {ENV_KEY_MAX_LENGTH} characters")
            if not item.strip(RE2_SPACE):
                raise ValueError(f"value of {key!r} must not be blank")
        if sum(len(item) for item in (value or {}).values()) > ENV_VALUES_TOTAL_MAX_LENGTH:
            raise ValueError(f"values together may not exceed {ENV_VALUES_TOTAL_MAX_LENGTH} characters")
        return value

    @model_validator(mode="after")
    def _cross_field(self) -> IncusInstanceSpec:
        if self.image is not None and self.source is not None:
            raise ValueError("at most one of spec.image and spec.source may be set")
        if self.image is None and self.source is None and self.management_policy != ManagementPolicy.OBSERVE_ONLY:
            raise ValueError(
                "exactly one of spec.image and spec.source must be set (only spec.managementPolicy ObserveOnly may "
                "leave both out)"
            )
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
        nics = self.nics or []
        if any(n.addresses for n in nics):
            if self.cloud_init is not None and self.cloud_init.network_config is not None:
                raise ValueError("spec.nics[].addresses and spec.cloudInit.networkConfig: one network-config only")
            if not all(n.hwaddr for n in nics):  # the guest's interface is matched by MAC (any renderer)
                raise ValueError("spec.nics: with addresses, every NIC needs hwaddr (the guest matches it by MAC)")
        return self

    def memory_bytes(self) -> int | None:
        return None if self.memory is None else parse_bytes(self.memory)


class ImageStatus(_Model):
    """The image the instance was built from, as TrueNAS reports it."""

    os: str | None = Field(None, description="Operating system, e.g. Debian.")
    release: str | None = Field(None, description="Release, e.g. bookworm.")
    serial: str | None = Field(None, description="Image build serial, e.g. 20250612_05:24.")
    architecture: str | None = Field(None, description="Architecture, e.g. amd64.")
    variant: str | None = Field(None, description="Variant, e.g. default or cloud.")
    description: str | None = Field(None, description="TrueNAS's description of the image.")


MAX_OBSERVED_DEVICES = 32


MAX_LISTED_ADDRESSES = 16


class InstanceAddress(_Model):
    """An address of the instance, and how it is known (never a guess)."""

    address: Annotated[str, Field(max_length=45)] = Field(description="The IP address (IPv4 or IPv6).")
    family: AddressFamily = Field(description="IPv4 or IPv6.")
    interface: Annotated[str, Field(max_length=15)] | None = Field(
        None, description="The guest's interface, where TrueNAS names it (27's guest agent; 25.x's aliases do not)."
    )
    source: AddressSource = Field(
        description="TrueNAS: TrueNAS reports it (25.x containers and Incus VMs; vm.* VMs on 27 through the "
        "guest agent). Declared: spec.nics[].addresses."
    )


class Readiness(_Model):
    """What Ready waits for besides the instance running as the spec says."""

    address: bool | None = Field(
        None,
        description=(
            "true: a running instance is Ready only once status.addresses has an address (Ready=False/NoAddress "
            "until then), so kubectl wait --for=condition=Ready and Argo CD sync waves can wait for it. Where "
            "TrueNAS reports no address for the instance (26 containers, vm.* VMs before 27), Synced says so "
            "(PartiallyApplied) and Ready waits until an address is declared."
        ),
    )


class ObservedDevice(_Model):
    """A device as TrueNAS reports it (an ObserveOnly resource's mirror of its instance)."""

    name: Annotated[str, Field(max_length=128)] = Field(description="Its name (vm.* and 26 keep none: an id).")
    type: Annotated[str, Field(max_length=16)] = Field(description="DISK, NIC, GPU, USB, TPM, PROXY, PCI or CDROM.")
    source: Annotated[str, Field(max_length=1024)] | None = Field(None, description="Its source (a host path, ...).")
    destination: Annotated[str, Field(max_length=1024)] | None = Field(None, description="Where it appears inside.")


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
    image: str | None = Field(None, description="spec.image when the instance was created or adopted.")
    source: str | None = Field(
        None, description="spec.source.snapshotRef.name when the instance was cloned from a snapshot."
    )
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
        description=(
            "Ready (exists, power state as desired, spec applied) and Synced (last reconcile succeeded); Exposed "
            "with spec.expose, Paused and InSync where they apply."
        ),
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    cpu: str | None = Field(None, description="Effective CPU limit read back from TrueNAS; empty means no limit.")
    memory: str | None = Field(None, description="Effective memory limit read back from TrueNAS, as a quantity.")
    autostart: bool | None = Field(None, description="Effective autostart setting read back from TrueNAS.")
    ip_addresses: list[str] | None = Field(
        None, description="Global IP addresses of the running instance (status.addresses says more)."
    )
    addresses: Annotated[list[InstanceAddress], Field(max_length=MAX_LISTED_ADDRESSES)] | None = Field(
        None,
        description=(
            f"The running instance's global addresses (at most {MAX_LISTED_ADDRESSES}, IPv4 first), each with its "
            "family, interface where known and source: what TrueNAS reports or the spec declares, never a guess."
        ),
    )
    service: Annotated[str, Field(max_length=63)] | None = Field(
        None,
        description=(
            "spec.expose: the Service the operator made and owns (this resource's name); its EndpointSlices are "
            "NAME-ipv4 and NAME-ipv6. The Exposed condition says whether it holds the instance's addresses."
        ),
    )
    image: ImageStatus | None = Field(None, description="The image TrueNAS reports for the instance.")
    devices: Annotated[list[ObservedDevice], Field(max_length=MAX_OBSERVED_DEVICES)] | None = Field(
        None,
        description=(
            f"spec.managementPolicy ObserveOnly: the instance's own devices as TrueNAS reports them (at most "
            f"{MAX_OBSERVED_DEVICES}; a profile's are left out), read again on a spec change, a reconnect and "
            "the connection's audit rotation."
        ),
    )
    job: JobStatus | None = Field(None, description="The TrueNAS job in flight, if any.")
    snapshot_schedule: SnapshotScheduleStatus | None = Field(
        None, description="The periodic snapshot task spec.snapshots became on TrueNAS."
    )
    snapshots: Annotated[list[SnapshotEntry], Field(max_length=MAX_LISTED_SNAPSHOTS)] | None = Field(
        None,
        description=(
            f"The newest snapshots of the instance's datasets, whoever made them (at most {MAX_LISTED_SNAPSHOTS}, "
            "newest first; with spec.snapshots only, read again about once per resync interval): the names an "
            "IncusInstanceRestore's truenasSnapshot can give."
        ),
    )
    snapshot_count: Annotated[int, Field(ge=0)] | None = Field(
        None, description="How many snapshots the instance's datasets have (status.snapshots lists the newest)."
    )
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
