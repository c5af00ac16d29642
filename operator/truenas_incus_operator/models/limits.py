"""Limits and patterns of every field: one place for the numbers admission and the models share."""

from __future__ import annotations

from ..quantity import MIB

API_GROUP = "incus.truenas.io"
API_VERSION = "v1alpha1"

# Incus instance names are hostnames: letters, digits and '-', 1-63 characters, a letter first.
SERVICE_NAME_PATTERN = r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$"
"""spec.expose's Service is named after the IncusInstance: a DNS label (RFC 1035), as Services need."""
INSTANCE_NAME_PATTERN = r"^[A-Za-z](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?$"
# Incus limits.cpu: a count ("2") or a set of CPUs ("0-3", "1,3", "0-1,6").
_CPU_ITEM = r"[0-9]{1,4}(?:-[0-9]{1,4})?"
CPU_PATTERN = rf"^(?:[1-9][0-9]{{0,3}}|[0-9]{{1,4}}-[0-9]{{1,4}}(?:,{_CPU_ITEM})*|[0-9]{{1,4}}(?:,{_CPU_ITEM})+)$"
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
# spec.snapshots.schedule: five cron fields (minute hour day-of-month month day-of-week) of the characters
# cron uses (digits, names such as MON or JAN, * , - / and croniter's ? L W #), apart by spaces. What
# they mean is judged by the operator (policy.shortest_interval), as TrueNAS's croniter reads them.
SNAPSHOT_SCHEDULE_PATTERN = r"^ *[0-9A-Za-z*,/?#-]+( +[0-9A-Za-z*,/?#-]+){4} *$"
SNAPSHOT_SCHEDULE_MAX_LENGTH = 128
SNAPSHOT_KEEP_MAX = 1000
USERNAME_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_.@$\\-]{0,255}$"
"""An API key's owner: a TrueNAS local user (letters, digits, ``_ . -``; api/base/types/user.py
``validate_local_username``) or a directory user (``user@domain``, ``DOMAIN\\user``); never the
``,``, ``=`` or ``:`` that SCRAM's ``n=<user>:<key id>`` cannot carry."""

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
PAUSED_ANNOTATION = f"{API_GROUP}/paused"
"""``"true"``: the operator writes nothing to TrueNAS for the resource until it is removed."""
