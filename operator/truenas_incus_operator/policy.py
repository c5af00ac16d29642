"""The administrator's policy: what tenants may do with the NAS through this operator.

It comes from a file only the administrator writes (the chart renders it from its values into a
ConfigMap in the operator's namespace and points ``TIO_POLICY_FILE`` at it), never from anything a
tenant writes. Pure: loading parses a file, evaluating reads nothing.

Connections are named as the operator keys them: ``<default>`` for the operator's own connection,
``namespace/name`` for a TrueNASConnection. Namespace and connection patterns are shell globs
(``*`` and ``?`` only, so that the chart can turn them into the same regular expressions for its
ValidatingAdmissionPolicy).

How rules apply: the first entry of ``rules`` whose ``namespaces`` and ``connections`` match the
resource's namespace and connection applies; when none matches, ``defaultRule`` does. A field a
rule leaves out takes the built-in default, which is open (any host path, NIC parent, pool, PROXY
port and name) except for passthrough devices (USB, GPU, PCI), which are off until a rule allows
them, as KubeVirt's host-disk gate is. So the homelab needs no policy at all, and a shared cluster
writes a restrictive ``defaultRule`` and one rule per team.

The chart's ValidatingAdmissionPolicy (``templates/admission-policy.yaml``) checks the same rules
in CEL; the operator checks them again before acting (``violations``), because admission can be
switched off or bypassed, and reports a refusal as ``Synced=False, reason=PolicyDenied``.

Snapshots (docs/snapshots.md) are a rule's ``snapshots`` block: one object rather than five flat
fields, because together they govern two other kinds (IncusInstanceSnapshot, IncusInstanceRestore)
and two IncusInstance fields (spec.source.snapshotRef, spec.snapshots), and a rule that leaves it
out is open: snapshots, restores and clones allowed, no cap per instance, no shortest schedule. The
controllers ask ``snapshot_violation`` (may this namespace snapshot, restore or clone on this
connection), ``snapshot_cap`` (how many IncusInstanceSnapshots one instance may have) and
``schedule_violation`` (is spec.snapshots.schedule allowed: ``shortest_interval`` of its 5-field
cron); the connection is always the one of the IncusInstance concerned. Admission cannot read a
snapshot's or a restore's IncusInstance, so the chart's ``templates/admission-policy-snapshots.yaml``
refuses a new IncusInstanceSnapshot or IncusInstanceRestore only where every rule that may apply to
its namespace, whatever the connection, forbids it; the cap, schedules and clones are the operator's.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from fnmatch import fnmatchcase
from functools import lru_cache
from itertools import pairwise
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from croniter import CroniterBadDateError, croniter
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.alias_generators import to_camel

from .models import DeviceType, IncusInstanceSpec, InstanceType, ServiceType
from .problems import Reason
from .quantity import parse_bytes

DEFAULT_CONNECTION = "<default>"
"""The key of the operator's default connection (TrueNASConnections are ``namespace/name``); the one
definition (connections.DEFAULT_KEY is this)."""
NAMESPACE_PLACEHOLDER = "{namespace}"
DEFAULT_POOL = "<default>"
"""In ``storagePools``: the pool TrueNAS picks when ``spec.storagePool`` is omitted."""
PASSTHROUGH_DEVICE_TYPES: tuple[str, ...] = (DeviceType.USB, DeviceType.GPU, DeviceType.PCI)
DEFAULT_DEVICE_TYPES: tuple[str, ...] = tuple(t.value for t in DeviceType if t not in PASSTHROUGH_DEVICE_TYPES)
POLICY_REASON = Reason.POLICY_DENIED

# Globs of namespaces (DNS labels) and connection keys (<default>, namespace/name): '*' and '?' only.
GLOB_PATTERN = r"^[a-z0-9.*?<>/-]{1,317}$"
Glob = Annotated[str, Field(pattern=GLOB_PATTERN)]
HOST_PATH_PREFIX_PATTERN = r"^/[A-Za-z0-9._/{}@+:-]*$"
NAME_PREFIX_PATTERN = r"^([A-Za-z0-9-]|\{namespace\}){1,62}$"
NIC_PARENT_PATTERN = r"^[A-Za-z0-9._-]{1,15}$"
ANY_PUBLIC_SERVER = "*"
"""In ``vmImageServers``: any https server, at public addresses only (checked on every connect)."""
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOST = rf"(?:{_LABEL}(?:\.{_LABEL})*|\[[0-9A-Fa-f:.]+\])"
_PORT = r"(?::[0-9]{1,5})?"
IMAGE_SERVER_ENTRY = re.compile(
    rf"^(?:\*|{_HOST}{_PORT}|https?://{_HOST}{_PORT}(?:/[A-Za-z0-9._~%/+-]*)?|(?:file://)?/[A-Za-z0-9._~%/+-]*)$"
)
VM_DEFAULT_MEMORY = 2**30
"""What a VM gets without spec.memory (backends/vm/entries.py), and one vCPU without spec.cpu."""
DEFAULT_MAX_CONNECTIONS = 16
SnapshotVerb = Literal["snapshot", "restore", "clone"]
SNAPSHOT_VERBS: dict[str, tuple[str, str]] = {
    "snapshot": ("kind IncusInstanceSnapshot", "take snapshots (IncusInstanceSnapshot)"),
    "restore": ("kind IncusInstanceRestore", "roll instances back to a snapshot (IncusInstanceRestore)"),
    "clone": ("spec.source.snapshotRef", "create instances from a snapshot (spec.source.snapshotRef)"),
}
"""Per verb of ``Policy.snapshot_violation``: the field a refusal names, and what is refused."""
SCHEDULE_FIELD = "spec.snapshots.schedule"
MAX_SCHEDULE_LENGTH = 256
SCHEDULE_WINDOW = (datetime(2001, 1, 1), datetime(2030, 1, 1))
"""The days ``shortest_interval`` looks for firing days in: 29 years. Between 1901 and 2099 the
Gregorian calendar repeats every 28 years, so these hold every combination of weekday, month end,
leap day and year end a day-of-month, month and day-of-week field can meet (with the first day of
2030, after the last leap year's year end)."""


class _Policy(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True)


class Grant(_Policy):
    """Namespaces allowed something on connections."""

    namespaces: list[Glob] = Field(default_factory=lambda: ["*"], description="Namespace globs.")
    connections: list[Glob] = Field(default_factory=lambda: ["*"], description="Connection globs.")

    def covers(self, namespace: str, connection: str) -> bool:
        return any(fnmatchcase(namespace, p) for p in self.namespaces) and any(
            fnmatchcase(connection, p) for p in self.connections
        )


class PortRange(_Policy):
    """Host ports ``from`` to ``to`` (inclusive); ``to`` omitted: the single port ``from``."""

    from_: Annotated[int, Field(ge=1, le=65535, alias="from")]
    to: Annotated[int, Field(ge=1, le=65535)] | None = None

    @model_validator(mode="after")
    def _ordered(self) -> PortRange:
        if self.to is not None and self.to < self.from_:
            raise ValueError(f"to ({self.to}) is below from ({self.from_})")
        return self

    @property
    def last(self) -> int:
        return self.from_ if self.to is None else self.to

    def __contains__(self, port: int) -> bool:
        return self.from_ <= port <= self.last

    def __str__(self) -> str:
        return str(self.from_) if self.to is None or self.to == self.from_ else f"{self.from_}-{self.to}"


class SnapshotRule(_Policy):
    """What the namespaces may do with snapshots on the connections (a rule's ``snapshots``). A field
    left out is open: snapshots, restores and clones allowed, no cap, no shortest schedule."""

    snapshot: bool = Field(
        True,
        description=(
            "Whether IncusInstanceSnapshots may be taken of the instances, and spec.snapshots schedules set "
            "(a schedule takes snapshots too). Default: true."
        ),
    )
    restore: bool = Field(
        True,
        description="Whether IncusInstanceRestores may roll the instances back to a snapshot. Default: true.",
    )
    clone: bool = Field(
        True,
        description="Whether an IncusInstance may be created from a snapshot (spec.source.snapshotRef). Default: true.",
    )
    max_per_instance: Annotated[int, Field(ge=0)] | None = Field(
        None,
        description=(
            "Most IncusInstanceSnapshots one IncusInstance may have; a new one beyond is refused (PolicyDenied), "
            "the ones it has stay. Counted by the operator only (admission cannot count). Null: no cap."
        ),
    )
    min_schedule_minutes: Annotated[int, Field(ge=1)] | None = Field(
        None,
        description=(
            "Shortest time, in minutes, spec.snapshots.schedule may leave between two snapshots: the shortest "
            "gap between two consecutive firings of its cron, so '*/7 * * * *' counts as 4 (56 to 60). Checked "
            "by the operator only. Null: any schedule."
        ),
    )


DEFAULT_SERVICE_TYPES: tuple[str, ...] = (ServiceType.CLUSTER_IP,)
"""What spec.expose.type may be where a rule leaves expose.serviceTypes out: a NodePort (every node relays
to the endpoints) and a LoadBalancer only where a rule allows them."""


def network_list(value: list[str] | None) -> list[str] | None:
    """A rule's networks (addressCIDRs, expose.endpointCIDRs): each a CIDR with its prefix length."""
    for item in value or []:
        if not re.fullmatch(r"[0-9A-Fa-f:.]+/[0-9]{1,3}", item):
            raise ValueError(f"{item!r}: a network with its prefix length, e.g. 192.168.50.0/24")
        try:
            network = ipaddress.ip_network(item, strict=False)
        except ValueError:
            raise ValueError(f"{item!r} is not a network (CIDR), e.g. 192.168.50.0/24") from None
        if isinstance(network, ipaddress.IPv6Network) and network.network_address.ipv4_mapped is not None:
            # Kubernetes's cidr() refuses IPv4-mapped networks: the admission check would deny all.
            raise ValueError(f"{item!r}: an IPv4-mapped network; write the IPv4 network")
    return value


class ExposeRule(_Policy):
    """What the namespaces may expose as Services (a rule's ``expose``). Left out: ClusterIP Services on
    any port, with any annotation, their endpoints where the rule's addressCIDRs allow; an empty
    serviceTypes list refuses spec.expose altogether."""

    service_types: list[ServiceType] | None = Field(
        None,
        description=(
            "The Service types spec.expose.type may be (ClusterIP, NodePort, LoadBalancer); [] refuses "
            "spec.expose. Default: ClusterIP (NodePort and LoadBalancer only where a rule allows them)."
        ),
    )
    ports: list[PortRange] | None = Field(
        None, description="The ports spec.expose.ports[].port may be (the Service's ports). Default: any."
    )
    annotation_keys: list[Annotated[str, Field(pattern=r"^[A-Za-z0-9*?./_-]{1,317}$")]] | None = Field(
        None,
        description=(
            "Globs of the keys spec.expose.annotations may set, e.g. 'metallb.universe.tf/address-pool'; [] "
            "allows none. Annotations drive other controllers (load balancers, external-dns, meshes). Default: any."
        ),
    )
    endpoint_cidrs: list[Annotated[str, Field(max_length=49)]] | None = Field(
        None,
        alias="endpointCIDRs",
        description=(
            "Networks an address must lie in to become one of the Service's endpoints, whatever its source "
            "(a guest can give itself any address: TrueNAS reports it). Default: the rule's addressCIDRs when "
            "set, else any. The NAS's own address (the connection's URL) never becomes an endpoint."
        ),
    )

    @field_validator("endpoint_cidrs")
    @classmethod
    def _endpoint_networks(cls, value: list[str] | None) -> list[str] | None:
        return network_list(value)

    def allowed_types(self) -> tuple[str, ...]:
        return DEFAULT_SERVICE_TYPES if self.service_types is None else tuple(str(t) for t in self.service_types)


class Rule(Grant):
    """What the namespaces may do on the connections. A field left out (null) takes the built-in
    default: every device type but USB, GPU and PCI; any host path, NIC parent, pool, PROXY port
    and instance name; snapshots, restores and clones open. An empty list allows nothing."""

    device_types: list[DeviceType] | None = Field(
        None,
        description="Device types allowed in spec.devices (NIC also covers spec.nics). Default: all but USB, GPU, PCI.",
    )
    host_path_prefixes: list[Annotated[str, Field(pattern=HOST_PATH_PREFIX_PATTERN, max_length=1024)]] | None = Field(
        None,
        description=(
            "DISK and CDROM sources must lie under one of these paths, compared by path components; "
            "{namespace} stands for the resource's namespace. Default: any path."
        ),
    )
    nic_parents: list[Annotated[str, Field(pattern=NIC_PARENT_PATTERN)]] | None = Field(
        None,
        description=(
            "Host interfaces and bridges spec.nics[].parent may name (a NIC without a parent uses "
            "TrueNAS's default network and is always allowed). Default: any."
        ),
    )
    storage_pools: list[Annotated[str, Field(min_length=1, max_length=200)]] | None = Field(
        None,
        description=(
            "Pools spec.storagePool may name; '<default>' allows omitting it (TrueNAS's default pool). Default: any."
        ),
    )
    proxy_ports: list[PortRange] | None = Field(
        None, description="Host ports (extra.source_port) a PROXY device may listen on. Default: any."
    )
    address_cidrs: list[Annotated[str, Field(max_length=49)]] | None = Field(
        None,
        alias="addressCIDRs",
        description=(
            "Networks the addresses a resource declares (spec.nics[].addresses) must lie in, e.g. "
            "192.168.50.0/24: give each tenant its own range, and leave the NAS's and the routers' "
            "addresses out of every range. Default: any address (single-tenant setups)."
        ),
    )
    instance_name_prefix: Annotated[str, Field(pattern=NAME_PREFIX_PATTERN)] | None = Field(
        None,
        description=(
            "The instance name (spec.name, else metadata.name) must start with this; "
            "{namespace} stands for the namespace, e.g. '{namespace}-'. With {namespace}, the rest of the "
            "name may not contain '-': namespace names contain '-' too, so 'team-b-web' would otherwise "
            "fit both 'team-' and 'team-b-'. Default: any name."
        ),
    )

    vm_image_servers: list[Annotated[str, Field(max_length=2048)]] | None = Field(
        None,
        description=(
            "Image servers a TrueNASConnection's spec.vmImageServer may name: 'https://host[:port]/path' "
            "(that URL and below, by path components), 'host' or 'host:port' (https on that host), "
            "'file:///dir' or '/dir' (that local mirror exactly), or '*' (any https server at public "
            "addresses only). The ones named here are trusted: they may be internal. Default: only the "
            "operator's own (TIO_VM_IMAGE_SERVER)."
        ),
    )
    max_root_disk_size: int | str | None = Field(
        None, description="Largest spec.rootDiskSize (bytes or a quantity such as 100Gi). Default: no cap."
    )
    max_memory: int | str | None = Field(
        None,
        description=(
            "Largest spec.memory (bytes or a quantity); an omitted memory is a VM's 1Gi, and no limit "
            "(so refused) for a container. Default: no cap."
        ),
    )
    memory_overcommit: bool = Field(
        False,
        description=(
            "Whether spec.memoryOvercommit may be true: VMs that start although TrueNAS cannot guarantee their "
            "memory (it shrinks the ZFS cache; guests may then compete for memory). Default: false."
        ),
    )
    max_vcpus: Annotated[int, Field(ge=1, le=4096)] | None = Field(
        None,
        alias="maxVCPUs",
        description=(
            "Most CPUs spec.cpu may give (a count, or the size of a CPU set); an omitted cpu is a VM's one "
            "vCPU, and no limit (so refused) for a container. Default: no cap."
        ),
    )

    expose: ExposeRule = Field(
        default_factory=ExposeRule,
        description=(
            "spec.expose's Services: the types allowed (serviceTypes) and their ports (ports). Default: "
            "ClusterIP on any port, any annotation key, endpoints where addressCIDRs allows; NodePort and "
            "LoadBalancer off."
        ),
    )
    snapshots: SnapshotRule = Field(
        default_factory=SnapshotRule,
        description=(
            "Snapshots, restores and clones of the instances, a cap per instance and the shortest schedule "
            "(fields: snapshot, restore, clone, maxPerInstance, minScheduleMinutes). Default: all open."
        ),
    )

    @field_validator("address_cidrs")
    @classmethod
    def _networks(cls, value: list[str] | None) -> list[str] | None:
        return network_list(value)

    @field_validator("snapshots", "expose", mode="before")
    @classmethod
    def _open_snapshots(cls, value: Any) -> Any:
        return {} if value is None else value

    @field_validator("vm_image_servers")
    @classmethod
    def _image_server_entries(cls, value: list[str] | None) -> list[str] | None:
        for entry in value or []:
            if not IMAGE_SERVER_ENTRY.fullmatch(entry) or "/../" in f"{entry}/" or "/./" in f"{entry}/":
                raise ValueError(
                    f"{entry!r}: write 'https://host[:port]/path', 'host[:port]', 'file:///dir', '/dir' or '*'"
                )
        return value

    @field_validator("max_root_disk_size", "max_memory")
    @classmethod
    def _sizes(cls, value: int | str | None) -> int | str | None:
        if value is not None and parse_bytes(value) <= 0:
            raise ValueError("must be a positive size")
        return value

    @field_validator("host_path_prefixes")
    @classmethod
    def _plain_paths(cls, value: list[str] | None) -> list[str] | None:
        for prefix in value or []:
            parts = prefix.split("/")[1:]
            if "//" in prefix or any(part in (".", "..") for part in parts):
                raise ValueError(f"{prefix!r}: write prefixes without '//', '.' or '..'")
        return value

    def allowed_device_types(self) -> tuple[str, ...]:
        return DEFAULT_DEVICE_TYPES if self.device_types is None else tuple(str(t) for t in self.device_types)


@dataclass(frozen=True)
class Violation:
    """A refusal: the policy rule (``policy.rules[0].hostPathPrefixes``) and the spec field
    (``spec.devices[data].source``) it refuses, and why."""

    rule: str
    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.rule}: {self.field}: {self.message}"


class Quota(_Policy):
    """How much one namespace may hold; the first entry of ``quotas`` whose namespaces match applies."""

    namespaces: list[Glob] = Field(default_factory=lambda: ["*"], description="Namespace globs.")
    max_connections: Annotated[int, Field(ge=0)] | None = Field(
        None,
        description=(
            "TrueNASConnections a namespace may have in use (each holds a client and a WebSocket); the ones "
            "beyond are refused (Ready=False, QuotaExceeded). Null: no cap."
        ),
    )
    max_vms: Annotated[int, Field(ge=0)] | None = Field(
        None, alias="maxVMs", description="IncusInstances of type VM a namespace may have. Null: no cap."
    )


@dataclass(frozen=True)
class ImageServerDecision:
    """What a TrueNASConnection's ``spec.vmImageServer`` comes to: the server to use and whether it is
    trusted (the administrator named it: it may be local or internal), or the violation."""

    url: str
    trusted: bool
    violation: Violation | None = None


class Policy(_Policy):
    default_connection_namespaces: list[Glob] = Field(
        default_factory=lambda: ["*"],
        description="Namespaces whose IncusInstances may use the operator's default connection (its own key).",
    )
    adoption: list[Grant] = Field(
        default_factory=list,
        description=(
            "Where a resource may take over an instance that exists on TrueNAS and that no resource created "
            "(with the incus.truenas.io/adopt annotation). Empty: nowhere."
        ),
    )
    observation: list[Grant] = Field(
        default_factory=list,
        description=(
            "Where a resource with spec.managementPolicy ObserveOnly may observe an instance that exists on "
            "TrueNAS and that no resource created (its status then shows the instance's configuration, "
            "environment keys included). Empty: nowhere."
        ),
    )
    rules: list[Rule] = Field(
        default_factory=list, description="Per namespace and connection; the first that matches applies."
    )
    default_rule: Rule = Field(
        default_factory=Rule, description="Applies where no rule matches (its namespaces and connections are ignored)."
    )
    quotas: list[Quota] = Field(
        default_factory=list, description="Per namespace; the first whose namespaces match applies."
    )
    default_quota: Quota = Field(
        default_factory=lambda: Quota(max_connections=DEFAULT_MAX_CONNECTIONS),
        description=f"Applies where no quota matches. Default: {DEFAULT_MAX_CONNECTIONS} TrueNASConnections.",
    )

    def quota_for(self, namespace: str) -> tuple[str, Quota]:
        for index, quota in enumerate(self.quotas):
            if any(fnmatchcase(namespace, p) for p in quota.namespaces):
                return f"policy.quotas[{index}]", quota
        return "policy.defaultQuota", self.default_quota

    def image_server(self, namespace: str, connection: str, named: str | None, own: str) -> ImageServerDecision:
        """Whether a TrueNASConnection (``connection``, in ``namespace``) may take its VM images from
        ``named`` (its spec.vmImageServer); ``own`` is the operator's (TIO_VM_IMAGE_SERVER or the default).
        The operator's own is always allowed and trusted."""
        if named is None or _server_key(named) == _server_key(own):
            return ImageServerDecision(_normal(own), True)
        label, rule = self.rule_for(namespace, connection)
        entries = rule.vm_image_servers or []
        for entry in entries:
            if entry != ANY_PUBLIC_SERVER and _entry_covers(entry, named):
                return ImageServerDecision(_normal(named), True)
        scheme = urlsplit(named).scheme.lower()
        if ANY_PUBLIC_SERVER in entries and scheme == "https" and _server_key(named)[1]:
            return ImageServerDecision(_normal(named), False)
        # The operator's own server is not shown: it may be a path on the operator's filesystem.
        shown = ", ".join(entries) if entries else "only the operator's own, TIO_VM_IMAGE_SERVER"
        why = "is not an allowed image server"
        if scheme not in ("http", "https"):
            why = "is a local path or file:// URL, which only the administrator may choose"
        elif ANY_PUBLIC_SERVER in entries:
            why = "is not an allowed image server ('*' allows https only)"
        return ImageServerDecision(
            _normal(named),
            False,
            Violation(f"{label}.vmImageServers", "spec.vmImageServer", f"{named} {why} (allowed: {shown})"),
        )

    def may_use_default_connection(self, namespace: str) -> bool:
        return any(fnmatchcase(namespace, p) for p in self.default_connection_namespaces)

    def may_adopt(self, namespace: str, connection: str) -> bool:
        return any(grant.covers(namespace, connection) for grant in self.adoption)

    def may_observe(self, namespace: str, connection: str) -> bool:
        return any(grant.covers(namespace, connection) for grant in self.observation)

    def rule_for(self, namespace: str, connection: str) -> tuple[str, Rule]:
        """The rule that applies, and its name in the policy (``policy.rules[1]``, ``policy.defaultRule``)."""
        for index, rule in enumerate(self.rules):
            if rule.covers(namespace, connection):
                return f"policy.rules[{index}]", rule
        return "policy.defaultRule", self.default_rule

    def snapshot_violation(self, namespace: str, connection: str, verb: SnapshotVerb) -> Violation | None:
        """Whether the rule for ``namespace`` on ``connection`` (the connection of the IncusInstance
        concerned) refuses ``verb``: ``snapshot`` (an IncusInstanceSnapshot), ``restore`` (an
        IncusInstanceRestore) or ``clone`` (an IncusInstance with spec.source.snapshotRef). None: allowed."""
        label, rule = self.rule_for(namespace, connection)
        if getattr(rule.snapshots, verb):
            return None
        field, what = SNAPSHOT_VERBS[verb]
        return Violation(
            f"{label}.snapshots.{verb}", field, f"namespace {namespace} may not {what} on connection {connection}"
        )

    def snapshot_cap(self, namespace: str, connection: str) -> tuple[str, int | None]:
        """The most IncusInstanceSnapshots one IncusInstance in ``namespace`` on ``connection`` may have,
        and the rule that says so (``policy.rules[0].snapshots.maxPerInstance``); None: no cap."""
        label, rule = self.rule_for(namespace, connection)
        return f"{label}.snapshots.maxPerInstance", rule.snapshots.max_per_instance

    def schedule_violation(self, namespace: str, connection: str, schedule: str) -> Violation | None:
        """Whether an IncusInstance in ``namespace`` on ``connection`` may snapshot on ``schedule`` (its
        spec.snapshots.schedule, a 5-field cron): refused where the rule forbids snapshots, where the
        shortest gap between two consecutive firings (``shortest_interval``) is below the rule's
        minScheduleMinutes, and always when the schedule is not one (nothing could be judged). None: allowed."""
        label, rule = self.rule_for(namespace, connection)
        if not rule.snapshots.snapshot:
            why = f"namespace {namespace} may not take snapshots on connection {connection} (a schedule takes them)"
            return Violation(f"{label}.snapshots.snapshot", "spec.snapshots", why)
        minimum = rule.snapshots.min_schedule_minutes
        # Unparsable: refused even without a minimum (nothing could be judged), naming the rule's snapshots.
        where = f"{label}.snapshots" + (".minScheduleMinutes" if minimum is not None else "")
        try:
            interval = shortest_interval(schedule)
        except ScheduleError as exc:
            return Violation(where, SCHEDULE_FIELD, f"{schedule!r} {exc}")
        if minimum is not None and interval < timedelta(minutes=minimum):
            return Violation(
                where,
                SCHEDULE_FIELD,
                f"{schedule!r} snapshots as little as {_minutes(interval)} apart (allowed: at least "
                f"{_minutes(timedelta(minutes=minimum))})",
            )
        return None

    def violations(
        self, namespace: str, connection: str, spec: IncusInstanceSpec, instance_name: str | None = None
    ) -> list[Violation]:
        """Everything in ``spec`` the policy refuses for a resource in ``namespace`` on ``connection``
        (``<default>`` or ``namespace/name``). ``instance_name``: the resource's metadata.name, the
        instance name when spec.name is omitted. Empty: allowed."""
        found: list[Violation] = []
        if connection == DEFAULT_CONNECTION and not self.may_use_default_connection(namespace):
            found.append(
                Violation(
                    "policy.defaultConnectionNamespaces",
                    "spec.connectionRef",
                    f"namespace {namespace} may not use the operator's default connection: name a TrueNASConnection",
                )
            )
        label, rule = self.rule_for(namespace, connection)
        found += _device_types(label, rule, spec)
        found += _host_paths(label, rule, spec, namespace)
        found += _nic_parents(label, rule, spec)
        found += _storage_pool(label, rule, spec)
        found += _proxy_ports(label, rule, spec)
        found += _addresses(label, rule, spec)
        found += _name_prefix(label, rule, spec, namespace, instance_name)
        found += _caps(label, rule, spec)
        found += _expose(label, rule, spec)
        return found

    def expose_violations(self, namespace: str, connection: str, spec: IncusInstanceSpec) -> list[Violation]:
        """What the policy refuses of spec.expose alone (its Service goes when a rule is tightened)."""
        return _expose(*self.rule_for(namespace, connection), spec)

    def endpoint_networks(self, namespace: str, connection: str) -> tuple[str, list[str]] | None:
        """(the rule's field, its networks) an endpoint address must lie in; None: any address."""
        label, rule = self.rule_for(namespace, connection)
        if rule.expose.endpoint_cidrs is not None:
            return f"{label}.expose.endpointCIDRs", list(rule.expose.endpoint_cidrs)
        if rule.address_cidrs is not None:
            return f"{label}.addressCIDRs", list(rule.address_cidrs)
        return None


class ScheduleError(ValueError):
    """A schedule ``shortest_interval`` cannot judge; the message says why (after the schedule)."""


CRON_SHAPE = (
    "is not a 5-field cron schedule (minute hour day-of-month month day-of-week, e.g. '0 */6 * * *', "
    "or @hourly, @daily, @weekly, @monthly, @yearly)"
)


@lru_cache(maxsize=512)
def shortest_interval(schedule: str) -> timedelta:
    """The shortest time between two consecutive firings of ``schedule``, a 5-field cron as TrueNAS's
    periodic snapshot tasks evaluate it (croniter's, with the day of month and the day of week
    or-ed when both are restricted; the macros @hourly, @daily, @weekly, @monthly, @yearly,
    @annually and @midnight are their 5-field forms), in wall-clock minutes (a DST change is not
    counted). Raises ``ScheduleError`` for anything else: not cron, seconds or year fields, random
    (R) or hashed (H) fields, which fire at times no one chose, or a schedule that never fires
    ('0 0 30 2 *').

    Every day a schedule fires on, it fires at the same times (the minute and hour fields), so the
    shortest gap is the shortest one within a day, or, between the last firing of one day and the
    first of the next firing day, the closest two firing days make (``SCHEDULE_WINDOW``): exact for
    irregular schedules such as '*/7 * * * *' (4 minutes, 56 to 60), '0 0,1 * * *' (1 hour) or
    '0 0 1,31 * *' (a day, from the 31st to the 1st)."""
    fields = _cron_fields(schedule)
    minute, hour, day, month, weekday = fields
    midnight = SCHEDULE_WINDOW[0]
    day_after = midnight + timedelta(days=1)
    times = [t.hour * 60 + t.minute for t in _firings(f"{minute} {hour} * * *", midnight, day_after) if t < day_after]
    gaps = [b - a for a, b in pairwise(times)]
    span = times[-1] - times[0]
    if gaps and min(gaps) <= 24 * 60 - span:
        return timedelta(minutes=min(gaps))  # firing days one day apart at the closest make no shorter gap
    closest: int | None = None  # the fewest days between two consecutive firing days
    previous: datetime | None = None
    for firing in _firings(f"0 0 {day} {month} {weekday}", *SCHEDULE_WINDOW):
        if previous is not None:
            apart = (firing - previous).days
            closest = apart if closest is None else min(closest, apart)
            if closest == 1:
                break
        previous = firing
    if closest is not None:
        gaps.append(closest * 24 * 60 - span)
    if not gaps:
        raise ScheduleError("fires at most once in 29 years")
    return timedelta(minutes=min(gaps))


def _cron_fields(schedule: str) -> list[str]:
    if not isinstance(schedule, str) or not schedule.strip() or len(schedule) > MAX_SCHEDULE_LENGTH:
        raise ScheduleError(CRON_SHAPE)
    try:
        fields = [str(f) for f in croniter(schedule.strip(), SCHEDULE_WINDOW[0]).expressions]
    except (ValueError, TypeError) as exc:  # croniter's errors are either
        raise ScheduleError(f"{CRON_SHAPE}: {exc}") from None
    if len(fields) != 5:
        raise ScheduleError(f"{CRON_SHAPE}: it has {len(fields)} fields (no seconds or years)")
    for field in fields:
        if any(re.match(r"^[hr](\(|/|$)", token, re.IGNORECASE) for token in field.split(",")):
            raise ScheduleError(f"{CRON_SHAPE}: random (R) and hashed (H) fields fire at times no one chose")
    return fields


def _firings(expression: str, start: datetime, end: datetime) -> Iterator[datetime]:
    """The firings of ``expression`` from ``start`` (included) until ``end``, and the first one after."""
    cron = croniter(expression, start - timedelta(minutes=1))
    firing = start - timedelta(minutes=1)
    while firing < end:
        try:
            firing = cron.get_next(datetime)
        except CroniterBadDateError:  # no day of the month fits the months (0 0 30 2 *)
            raise ScheduleError("never fires (no such day)") from None
        yield firing


def _minutes(interval: timedelta) -> str:
    minutes = int(interval.total_seconds() // 60)
    return "1 minute" if minutes == 1 else f"{minutes} minutes"


def _normal(url: str) -> str:
    return url.rstrip("/") + "/" if "://" in url and not url.startswith("file://") else url


def _server_key(url: str) -> tuple[str, str, int, tuple[str, ...]]:
    """(scheme, host, port, path components) of an http(s) URL; ('local', '', 0, parts) for a local
    mirror; a URL that does not parse has no host (and matches nothing)."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme in ("http", "https"):
        try:
            port = parts.port or (443 if scheme == "https" else 80)
        except ValueError:
            return scheme, "", 0, ()
        host = (parts.hostname or "").rstrip(".").lower()
        segments = tuple(p for p in parts.path.split("/") if p)
        if any(p in (".", "..") or "%" in p for p in segments):  # dot segments, written or encoded: under no prefix
            segments = ("<not a plain path>",)
        return scheme, host, port, segments
    path = parts.path if scheme == "file" and not parts.netloc else url if not scheme else ""
    if not path.startswith("/") or any(p in (".", "..") for p in path.split("/")):
        return "local", "", 0, ("<not a plain absolute path>",)
    return "local", "", 0, tuple(p for p in path.split("/") if p)


def _entry_covers(entry: str, named: str) -> bool:
    wanted = _server_key(named)
    if not wanted[1] and wanted[0] != "local":
        return False
    if "://" not in entry and not entry.startswith("/"):  # host or host:port: https on that host
        host, _, port = entry.rpartition(":") if entry.count(":") == 1 else (entry, "", "")
        return wanted[0] == "https" and wanted[1] == host.lower() and (not port or wanted[2] == int(port))
    allowed = _server_key(entry)
    if allowed[0] == "local":
        return wanted == allowed  # a local mirror exactly, never below it
    return wanted[:3] == allowed[:3] and wanted[3][: len(allowed[3])] == allowed[3]


def cpu_count(cpu: str) -> int:
    """CPUs a ``spec.cpu`` gives: a count, or the size of a set such as ``0-3,8``."""
    if cpu.isdigit():
        return int(cpu)
    total = 0
    for item in cpu.split(","):
        low, _, high = item.partition("-")
        total += int(high) - int(low) + 1 if high else 1
    return total


def _caps(label: str, rule: Rule, spec: IncusInstanceSpec) -> list[Violation]:
    found = []
    is_vm = spec.type == InstanceType.VM
    cap = rule.max_root_disk_size
    if cap is not None and spec.root_disk_size is not None and parse_bytes(spec.root_disk_size) > parse_bytes(cap):
        found.append(
            Violation(
                f"{label}.maxRootDiskSize", "spec.rootDiskSize", f"{spec.root_disk_size} is larger than allowed ({cap})"
            )
        )
    if rule.max_memory is not None:
        memory = parse_bytes(spec.memory) if spec.memory is not None else VM_DEFAULT_MEMORY if is_vm else None
        if memory is None or memory > parse_bytes(rule.max_memory):
            said = "omitted (no limit)" if memory is None else f"{spec.memory or '1Gi (the VM default)'}"
            found.append(
                Violation(f"{label}.maxMemory", "spec.memory", f"{said} is more than allowed ({rule.max_memory})")
            )
    if spec.memory_overcommit and not rule.memory_overcommit:
        found.append(
            Violation(f"{label}.memoryOvercommit", "spec.memoryOvercommit", "memory overcommit is not allowed")
        )
    if rule.max_vcpus is not None:
        cpus = cpu_count(spec.cpu) if spec.cpu is not None else 1 if is_vm else None
        if cpus is None or cpus > rule.max_vcpus:
            said = "omitted (no limit)" if cpus is None else f"{spec.cpu} ({cpus} CPUs)"
            found.append(Violation(f"{label}.maxVCPUs", "spec.cpu", f"{said} is more than allowed ({rule.max_vcpus})"))
    return found


def _device_types(label: str, rule: Rule, spec: IncusInstanceSpec) -> list[Violation]:
    allowed = rule.allowed_device_types()
    where = f"{label}.deviceTypes"
    listed = ", ".join(allowed) or "none"
    found = [
        Violation(where, f"spec.devices[{d.name}].type", f"{d.type} devices are not allowed (allowed: {listed})")
        for d in spec.devices or []
        if str(d.type) not in allowed
    ]
    if DeviceType.NIC not in allowed:
        found += [
            Violation(where, f"spec.nics[{n.name}]", f"NIC devices are not allowed (allowed: {listed})")
            for n in spec.nics or []
        ]
    return found


def _host_paths(label: str, rule: Rule, spec: IncusInstanceSpec, namespace: str) -> list[Violation]:
    if rule.host_path_prefixes is None:
        return []
    prefixes = [p.replace(NAMESPACE_PLACEHOLDER, namespace) for p in rule.host_path_prefixes]
    found = []
    for device in spec.devices or []:
        if device.type not in (DeviceType.DISK, DeviceType.CDROM) or device.source is None:
            continue
        if not any(path_under(device.source, prefix) for prefix in prefixes):
            shown = ", ".join(prefixes) or "none"
            why = "is not under an allowed path"
            if ".." in device.source.split("/"):
                why = "has a '..' component, so it is under no allowed path"
            found.append(
                Violation(
                    f"{label}.hostPathPrefixes",
                    f"spec.devices[{device.name}].source",
                    f"{device.source} {why} ({shown})",
                )
            )
    return found


def path_under(path: str, prefix: str) -> bool:
    """Whether ``path`` lies at or below ``prefix``, by path components. A relative path or one with
    a ``..`` component never does ('.' and repeated '/' are ignored, as the kernel ignores them)."""
    if not path.startswith("/") or path.startswith("//") or ".." in path.split("/"):
        return False
    parts = PurePosixPath(path).parts
    wanted = PurePosixPath(prefix).parts
    return parts[: len(wanted)] == wanted


def _nic_parents(label: str, rule: Rule, spec: IncusInstanceSpec) -> list[Violation]:
    if rule.nic_parents is None:
        return []
    shown = ", ".join(rule.nic_parents) or "none"
    return [
        Violation(
            f"{label}.nicParents", f"spec.nics[{n.name}].parent", f"{n.parent} is not an allowed parent ({shown})"
        )
        for n in spec.nics or []
        if n.parent is not None and n.parent not in rule.nic_parents
    ]


def _storage_pool(label: str, rule: Rule, spec: IncusInstanceSpec) -> list[Violation]:
    if rule.storage_pools is None:
        return []
    pool = spec.storage_pool or DEFAULT_POOL
    if pool in rule.storage_pools:
        return []
    shown = ", ".join(rule.storage_pools) or "none"
    what = f"pool {pool}" if spec.storage_pool else f"TrueNAS's default pool ({DEFAULT_POOL}): set spec.storagePool"
    return [Violation(f"{label}.storagePools", "spec.storagePool", f"{what} is not allowed (allowed: {shown})")]


def _addresses(label: str, rule: Rule, spec: IncusInstanceSpec) -> list[Violation]:
    """Each declared address inside one of the rule's networks (the address, not its prefix: that is
    what another host on the LAN would collide with)."""
    if rule.address_cidrs is None:
        return []
    networks = [ipaddress.ip_network(c, strict=False) for c in rule.address_cidrs]
    shown = ", ".join(rule.address_cidrs) or "none"
    found = []
    if spec.cloud_init is not None and spec.cloud_init.network_config is not None:
        # A network-config of the tenant's own could name any address: where addresses are bounded,
        # they are declared in spec.nics[].addresses, where the rule can see them.
        message = "a network-config of its own is not allowed where addresses are bounded: use spec.nics[].addresses"
        found.append(Violation(f"{label}.addressCIDRs", "spec.cloudInit.networkConfig", message))
    for nic in spec.nics or []:
        for item in nic.addresses or []:
            address = ipaddress.ip_interface(item).ip
            if not any(address.version == n.version and address in n for n in networks):
                message = f"{item} is not in an allowed network ({shown})"
                found.append(Violation(f"{label}.addressCIDRs", f"spec.nics[{nic.name}].addresses", message))
    return found


def _expose(label: str, rule: Rule, spec: IncusInstanceSpec) -> list[Violation]:
    expose = spec.expose
    if expose is None:
        return []
    found = []
    allowed = rule.expose.allowed_types()
    if expose.service_type not in allowed:
        shown = ", ".join(allowed) or "none: this rule refuses spec.expose"
        message = f"a {expose.service_type} Service is not allowed (allowed: {shown})"
        found.append(Violation(f"{label}.expose.serviceTypes", "spec.expose.type", message))
    keys = rule.expose.annotation_keys
    if keys is not None:
        for key in expose.annotations or {}:
            if not any(fnmatchcase(key, glob) for glob in keys):
                shown = ", ".join(keys) or "none"
                message = f"annotation {key} is not allowed (allowed: {shown})"
                found.append(Violation(f"{label}.expose.annotationKeys", "spec.expose.annotations", message))
    ranges = rule.expose.ports
    if ranges is not None:
        shown = ", ".join(map(str, ranges)) or "none"
        for index, port in enumerate(expose.ports):
            if not any(port.port in allowed_range for allowed_range in ranges):
                what = f"spec.expose.ports[{port.name or index}].port"
                found.append(Violation(f"{label}.expose.ports", what, f"port {port.port} is not allowed ({shown})"))
    return found


def _proxy_ports(label: str, rule: Rule, spec: IncusInstanceSpec) -> list[Violation]:
    if rule.proxy_ports is None:
        return []
    shown = ", ".join(map(str, rule.proxy_ports)) or "none"
    found = []
    for device in spec.devices or []:
        if device.type != DeviceType.PROXY:
            continue
        raw = (device.extra or {}).get("source_port")
        port = _port(raw)
        if port is None or not any(port in allowed for allowed in rule.proxy_ports):
            said = "no host port" if raw is None else f"host port {raw}"
            found.append(
                Violation(
                    f"{label}.proxyPorts",
                    f"spec.devices[{device.name}].extra.source_port",
                    f"{said} is not an allowed port ({shown})",
                )
            )
    return found


def _port(value: int | str | None) -> int | None:
    if isinstance(value, int):
        return value
    if isinstance(value, str) and re.fullmatch(r"[0-9]{1,5}", value):
        return int(value)
    return None


def _name_prefix(
    label: str, rule: Rule, spec: IncusInstanceSpec, namespace: str, instance_name: str | None
) -> list[Violation]:
    if rule.instance_name_prefix is None:
        return []
    prefix = rule.instance_name_prefix.replace(NAMESPACE_PLACEHOLDER, namespace)
    name, field = (spec.name, "spec.name") if spec.name else (instance_name or "", "metadata.name")
    per_namespace = NAMESPACE_PLACEHOLDER in rule.instance_name_prefix
    if name.startswith(prefix) and not (per_namespace and "-" in name[len(prefix) :]):
        return []
    wanted = f"must start with {prefix!r}" + (" and continue without '-'" if per_namespace else "")
    return [Violation(f"{label}.instanceNamePrefix", field, f"instance name {name!r} {wanted}")]


class PolicyError(ValueError):
    """The policy file cannot be used; the message names the file and what is wrong."""


def load_policy(path: Path | None) -> Policy:
    """The policy in ``path`` (YAML), or the default one (no file): every namespace may use the
    default connection, nothing may be adopted, passthrough devices are off and everything else is
    open. Raises ``PolicyError`` naming the file and what is wrong."""
    if path is None:
        return Policy()
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise PolicyError(f"cannot read the policy file {path}: {exc}") from None
    if not isinstance(data, dict):
        raise PolicyError(f"{path}: the policy must be a mapping")
    try:
        return Policy.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or '(top)'}: {e['msg']}" for e in exc.errors())
        raise PolicyError(f"invalid policy file {path}: {problems}") from None
