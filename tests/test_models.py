"""The Pydantic side of the admission rules (the operator parses live objects with these models).

Each case here has an admission twin in tests/admission/ or tests/test_admission.py: both sides must
agree. No cluster needed.
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from pydantic import ValidationError

from truenas_incus_operator import models as m
from truenas_incus_operator.models import IncusInstanceSpec, TrueNASConnectionSpec
from truenas_incus_operator.quantity import parse_bytes

# A character that costs the most in kopf's annotation: ASCII JSON escapes it as a surrogate pair
# (\ud83d\ude00, 12 bytes) while maxLength and CEL size() count it once.
WIDE = "\U0001f600"


def spec(**fields: Any) -> dict[str, Any]:
    return {"type": "CONTAINER", "image": "debian/bookworm", **fields}


def valid(body: dict[str, Any]) -> bool:
    try:
        IncusInstanceSpec.model_validate(body)
    except ValidationError:
        return False
    return True


# ----- memory -----------------------------------------------------------------------------------------
# (value, accepted): the same list runs against the API server in test_admission.py.
MEMORY_CASES: list[tuple[Any, bool]] = [
    ("1.5Gi", True),
    ("64M", True),
    ("2048Mi", True),
    ("32Mi", True),
    (33554432, True),
    ("33554432", True),
    ("0.5Gi", True),
    ("1.25Gi", True),
    ("1e9", True),
    ("1E9", True),
    ("0.0625Gi", True),
    ("1Pi", True),
    ("100m", False),
    ("1.5", False),
    ("33554432.5", False),
    ("1.0000000001Gi", False),
    ("16Mi", False),
    (1000000, False),
    ("-1Gi", False),
    ("2Pi", False),
    (2**50 + 1, False),
    ("lots", False),
    (" 1Gi", False),
    ("1Gb", False),
]


@pytest.mark.parametrize("value,accepted", MEMORY_CASES, ids=[str(v) for v, _ in MEMORY_CASES])
def test_memory(value: Any, accepted: bool) -> None:
    assert valid(spec(memory=value)) is accepted


def test_memory_bytes_of_a_decimal_quantity() -> None:
    assert IncusInstanceSpec.model_validate(spec(memory="1.5Gi")).memory_bytes() == 1610612736
    assert IncusInstanceSpec.model_validate(spec(memory="64M")).memory_bytes() == 64_000_000


@pytest.mark.parametrize(
    "text,expected",
    [("0.9999999999", 1), ("1000000000n", 1), (".5Ki", 512), ("+1Gi", 2**30), ("1.", 1), ("1E", 10**18)],
)
def test_quantity_parses_like_the_api_server(text: str, expected: int) -> None:
    # ParseQuantity rounds below a nano-unit up, knows n and u, and takes "1." and ".5".
    assert parse_bytes(text) == expected


# ----- names and keys -------------------------------------------------------------------------------------
NAMES = [("nas01", True), ("nas-01.lan", True), ("a" * 253, True)]
NAMES += [("NAS01", False), ("nas_01", False), ("-nas", False), ("nas.", False), ("a" * 254, False), ("", False)]


@pytest.mark.parametrize("name,accepted", NAMES, ids=[n[:20] or "empty" for n, _ in NAMES])
def test_connection_ref_name_is_an_object_name(name: str, accepted: bool) -> None:
    assert valid(spec(connectionRef={"name": name})) is accepted


def connection(name: str = "nas01-key", key: str = "apiKey") -> dict[str, Any]:
    return {"url": "wss://nas.example", "apiKeySecretRef": {"name": name, "key": key}}


@pytest.mark.parametrize("name,accepted", NAMES, ids=[n[:20] or "empty" for n, _ in NAMES])
def test_secret_name_is_an_object_name(name: str, accepted: bool) -> None:
    accepted_here = True
    try:
        TrueNASConnectionSpec.model_validate(connection(name=name))
    except ValidationError:
        accepted_here = False
    assert accepted_here is accepted


KEYS = [("apiKey", True), ("ca.crt", True), (".hidden", True), ("a-b_c.d", True), ("k" * 253, True)]
KEYS += [(".", False), ("..", False), ("..x", False), ("a/b", False), ("a b", False), ("k" * 254, False)]


@pytest.mark.parametrize("key,accepted", KEYS, ids=[k[:20] for k, _ in KEYS])
def test_secret_key_as_kubernetes_allows(key: str, accepted: bool) -> None:
    accepted_here = True
    try:
        TrueNASConnectionSpec.model_validate(connection(key=key))
    except ValidationError:
        accepted_here = False
    assert accepted_here is accepted


# ----- device types per instance type --------------------------------------------------------------------
def device(kind: str, name: str = "d", **fields: Any) -> dict[str, Any]:
    extra = {"DISK": {"source": "/mnt/tank/d", "destination": "/d"}, "CDROM": {"source": "/mnt/tank/x.iso"}}
    return {"name": name, "type": kind, **extra.get(kind, {}), **fields}


TYPE_CASES = [
    (instance, kind, kind in m.DEVICE_TYPES_BY_INSTANCE_TYPE[instance])
    for instance in ("CONTAINER", "VM")
    for kind in [t.value for t in m.DeviceType]
]


@pytest.mark.parametrize("instance,kind,accepted", TYPE_CASES, ids=[f"{i}-{k}" for i, k, _ in TYPE_CASES])
def test_device_types_per_instance_type(instance: str, kind: str, accepted: bool) -> None:
    assert valid(spec(type=instance, devices=[device(kind)])) is accepted


def test_device_type_table() -> None:
    # What no TrueNAS version accepts (truenas-api.md §5, Incus proxy docs); TPM stays for 25.x containers.
    refused = {(i, k) for i, k, ok in TYPE_CASES if not ok}
    assert refused == {("CONTAINER", "PCI"), ("CONTAINER", "CDROM"), ("VM", "PROXY")}


# ----- extra ------------------------------------------------------------------------------------------
PROXY = {"source_proto": "TCP", "source_port": 8080, "dest_proto": "TCP", "dest_port": 80}


@pytest.mark.parametrize("key", m.EXTRA_OWNED_KEYS)
def test_extra_may_not_set_owned_keys(key: str) -> None:
    assert valid(spec(devices=[device("PROXY", extra=PROXY)]))
    assert not valid(spec(devices=[device("PROXY", extra={**PROXY, key: "DISK"})]))


@pytest.mark.parametrize("key", m.EXTRA_NIC_OWNED_KEYS)
def test_extra_of_a_nic_may_not_set_what_spec_nics_owns(key: str) -> None:
    assert valid(spec(devices=[device("NIC", extra={"boot_priority": 1})]))
    assert not valid(spec(devices=[device("NIC", extra={"boot_priority": 1, key: "br0"})]))


EXTRA_VALUES: list[tuple[Any, bool]] = [
    ("PHYSICAL", True),
    ("0000:01:00.0", True),
    (8080, True),
    (0, True),
    ("x" * 64, True),
    (2**31 - 1, True),
    ("x" * 65, False),
    (2**31, False),
    (True, False),
    (1.5, False),
    ({"nested": 1}, False),
    (["a"], False),
    ('say "hi"', False),
    ("back\\slash", False),
    ("caf\u00e9", False),
    ("new\nline", False),
]
# (None is refused here too; kubectl apply drops null map entries before the API server sees them.)


@pytest.mark.parametrize("value,accepted", EXTRA_VALUES, ids=[repr(v)[:20] for v, _ in EXTRA_VALUES])
def test_extra_values_are_flat_bounded_scalars(value: Any, accepted: bool) -> None:
    assert valid(spec(devices=[device("GPU", extra={"pci": value})])) is accepted


@pytest.mark.parametrize(
    "key,accepted", [("gpu_type", True), ("a" * 32, True), ("a" * 33, False), ("Pci", False), ("a-b", False)]
)
def test_extra_keys_are_truenas_field_names(key: str, accepted: bool) -> None:
    assert valid(spec(devices=[device("GPU", extra={key: "x"})])) is accepted


def test_extra_value_null_is_refused() -> None:
    assert not valid(spec(devices=[device("GPU", extra={"pci": None})]))


def test_extra_entry_count_is_bounded() -> None:
    entries = {f"k{i}": i for i in range(m.EXTRA_MAX_ENTRIES)}
    assert valid(spec(devices=[device("GPU", extra=entries)]))
    assert not valid(spec(devices=[device("GPU", extra={**entries, "one_more": 1})]))


# ----- counts and lengths -----------------------------------------------------------------------------------
def test_environment_bounds() -> None:
    full = {f"K{i}": "v" * (m.ENV_VALUES_TOTAL_MAX_LENGTH // m.ENV_MAX_ENTRIES) for i in range(m.ENV_MAX_ENTRIES)}
    assert valid(spec(environment=full))
    assert not valid(spec(environment={**full, "ONE_MORE": "v"}))  # entries
    assert not valid(spec(environment={"K0": "v" * 1024, "K1": "v" * 1024, "K2": "v" * 1024, "K3": "v" * 1025}))
    assert not valid(spec(environment={f"K{i}": "v" * 1024 for i in range(5)}))  # total 5120 > 4096
    assert valid(spec(environment={"K" * m.ENV_KEY_MAX_LENGTH: "v"}))
    assert not valid(spec(environment={"K" * (m.ENV_KEY_MAX_LENGTH + 1): "v"}))


def test_device_and_nic_counts_are_bounded() -> None:
    devices = [device("TPM", name=f"t{i}") for i in range(m.DEVICES_MAX_ITEMS)]
    assert valid(spec(devices=devices))
    assert not valid(spec(devices=[*devices, device("TPM", name="one-more")]))
    nics = [{"name": f"eth{i}", "parent": "br0"} for i in range(m.NICS_MAX_ITEMS)]
    assert valid(spec(nics=nics))
    assert not valid(spec(nics=[*nics, {"name": "eth99"}]))


def test_device_paths_together_are_bounded() -> None:
    half = m.DEVICE_PATHS_TOTAL_MAX_LENGTH // 4
    disks = [
        device("DISK", name=f"d{i}", source="/" + "s" * (half - 1), destination="/" + "d" * (half - 1)) for i in (0, 1)
    ]
    assert valid(spec(devices=disks))
    disks[1]["destination"] += "d"
    assert not valid(spec(devices=disks))


def test_nic_parent_is_an_interface_name() -> None:
    assert valid(spec(nics=[{"name": "eth1", "parent": "p" * 15}]))
    assert not valid(spec(nics=[{"name": "eth1", "parent": "p" * 16}]))


# ----- spec.snapshots: a 5-field cron schedule, keep 1..1000 (issue 24 item 4) --------------------------------
# (snapshots, accepted): the same list runs against the API server in test_admission.py. What a schedule
# means (does it ever fire, how often) is the operator's to judge (policy.shortest_interval).
SNAPSHOT_CASES: list[tuple[Any, bool]] = [
    ({"schedule": "0 * * * *", "keep": 24}, True),
    ({"schedule": "*/15 9-17 * * MON-FRI", "keep": 1}, True),
    ({"schedule": "30 2 1,15 * *", "keep": 1000}, True),
    ({"schedule": "  0  0 * * 0 ", "keep": 7}, True),
    ({"schedule": "0 0 L * ?", "keep": 12}, True),
    ({"schedule": "0 * * *", "keep": 3}, False),
    ({"schedule": "0 * * * * *", "keep": 3}, False),
    ({"schedule": "@hourly", "keep": 3}, False),
    ({"schedule": "0\t* * * *", "keep": 3}, False),
    ({"schedule": "0 * * * *;", "keep": 3}, False),
    ({"schedule": "0 * * * *", "keep": 0}, False),
    ({"schedule": "0 * * * *", "keep": 1001}, False),
    ({"schedule": "0 * * * *"}, False),
    ({"keep": 3}, False),
    ({"schedule": "0" * 120 + " * * * *", "keep": 3}, True),
    ({"schedule": "0" * 121 + " * * * *", "keep": 3}, False),
]


@pytest.mark.parametrize("snapshots,accepted", SNAPSHOT_CASES, ids=[str(v)[:40] for v, _ in SNAPSHOT_CASES])
def test_snapshot_schedules(snapshots: Any, accepted: bool) -> None:
    assert valid(spec(snapshots=snapshots)) is accepted


# ----- the largest admissible spec --------------------------------------------------------------------------
def _longest_cpu() -> str:
    cpu = "0000-0000"
    while len(cpu) + len(",0000-0000") <= 64:
        cpu += ",0000-0000"
    cpu += ",0000"[: 64 - len(cpu)]
    assert re.match(m.CPU_PATTERN, cpu) and len(cpu) == 64, cpu
    return cpu


def largest_spec() -> dict[str, Any]:
    """Every list and map full, every string as long as allowed, made of the characters that cost most
    in ASCII JSON (free text: a character outside the BMP, 12 bytes; patterned fields: their widest)."""
    env_value = m.ENV_VALUES_TOTAL_MAX_LENGTH // m.ENV_MAX_ENTRIES
    path = m.DEVICE_PATHS_TOTAL_MAX_LENGTH // m.DEVICES_MAX_ITEMS // 2
    return {
        "name": "v" + "0" * 62,
        "type": "VM",  # VMs may have CDROM, the longest device type
        "image": WIDE * m.IMAGE_MAX_LENGTH,
        "storagePool": WIDE * m.STORAGE_POOL_MAX_LENGTH,
        "cpu": _longest_cpu(),
        "memory": "0" * 56 + "33554432",
        "autostart": False,
        "environment": {
            f"K{i:03d}".ljust(m.ENV_KEY_MAX_LENGTH, "_"): WIDE * env_value for i in range(m.ENV_MAX_ENTRIES)
        },
        "devices": [
            {
                "name": f"d{i:02d}".ljust(63, "x"),
                "type": "CDROM",
                "source": WIDE * path,
                "destination": WIDE * path,
                "readonly": False,
                "extra": {f"k{j}".ljust(32, "_"): "~" * m.EXTRA_VALUE_MAX_LENGTH for j in range(m.EXTRA_MAX_ENTRIES)},
            }
            for i in range(m.DEVICES_MAX_ITEMS)
        ],
        "nics": [
            {
                "name": f"n{i:02d}".ljust(63, "x"),
                "type": "macvlan",
                "parent": WIDE * m.NIC_PARENT_MAX_LENGTH,
                "hwaddr": "10-66-6a-00-00-01",
            }
            for i in range(m.NICS_MAX_ITEMS)
        ],
        "powerState": "Running",
        "stopTimeoutSeconds": 3600,
        "deletionPolicy": "Delete",
        "connectionRef": {"name": "c" * 253},
        "snapshots": {"schedule": "0" * (m.SNAPSHOT_SCHEDULE_MAX_LENGTH - 8) + " * * * *", "keep": m.SNAPSHOT_KEEP_MAX},
    }


def spec_json_size(body: dict[str, Any]) -> int:
    """Bytes kopf writes into its last-handled-configuration annotation for this spec (json.dumps,
    ASCII, no spaces: kopf/_cogs/configs/diffbase.py)."""
    return len(json.dumps({"spec": body}, separators=(",", ":")).encode())


def test_largest_admissible_spec_fits_the_annotation_budget() -> None:
    body = largest_spec()
    assert valid(body), IncusInstanceSpec.model_validate(body)
    size = spec_json_size(body)
    assert size <= m.MAX_SPEC_JSON_BYTES, f"worst-case spec is {size} bytes"
    # And it is the largest: a little more of anything bounded is refused.
    longer_env = {**body["environment"], "K000".ljust(m.ENV_KEY_MAX_LENGTH, "_"): WIDE * 65}
    assert not valid({**body, "environment": longer_env})
    assert not valid({**body, "image": body["image"] + "x"})
    assert not valid({**body, "nics": [*body["nics"], {"name": "one-more"}]})


# ----- URLs: a port is 1-65535 digits only (issue 19 item 9: ':+1234' crashed the loop) ---------------------
URLS = [("wss://nas.example", True), ("wss://nas.example:8443/api", True), ("https://[::1]:443", True)]
URLS += [("ws://127.0.0.1:6000", True), ("wss://nas_01.lan", True)]
URLS += [("wss://nas.example:+1234", False), ("wss://nas.example:-1", False), ("wss://nas.example:65536", False)]
URLS += [("wss://nas.example:0", False), ("wss://nas.example:12a", False), ("wss://user@nas.example", False)]
URLS += [("wss://nas.example:", False), ("wss://[::1", False)]


@pytest.mark.parametrize("url,accepted", URLS, ids=[u for u, _ in URLS])
def test_connection_urls_have_a_host_and_a_plain_port(url: str, accepted: bool) -> None:
    for field in ("url", "vmImageServer"):
        candidate = url if field == "url" else url.replace("wss://", "https://").replace("ws://", "http://")
        try:
            TrueNASConnectionSpec.model_validate({**connection(), field: candidate})
        except ValidationError as exc:
            assert not accepted, exc
            assert exc.errors()[0]["loc"] == (field,)
        else:
            assert accepted, f"{field}={candidate} was accepted"


@pytest.mark.parametrize("server", ["/srv/mirror", "file:///srv/mirror", "https://images.example/x"])
def test_vm_image_server_is_a_url_or_an_absolute_path(server: str) -> None:
    TrueNASConnectionSpec.model_validate({**connection(), "vmImageServer": server})
    for bad in ("relative/dir", "ftp://x/", "file://host/x", "https://x y/"):
        with pytest.raises(ValidationError):
            TrueNASConnectionSpec.model_validate({**connection(), "vmImageServer": bad})


@pytest.mark.parametrize(
    "fields, ok",
    [
        ({"image": "debian/bookworm"}, True),
        ({"source": {"snapshotRef": {"name": "gold"}}}, True),
        ({"image": "debian/bookworm", "source": {"snapshotRef": {"name": "gold"}}}, False),
        ({}, False),
        ({"source": {"snapshotRef": {"name": "Not_A_Name"}}}, False),
        ({"source": {}}, False),
    ],
)
def test_exactly_one_of_image_and_source(fields: dict[str, Any], ok: bool) -> None:
    """Admission's twin: tests/test_snapshots_e2e.py::test_admission_takes_exactly_one_of_image_and_source."""
    body = {"type": "VM", **fields}
    assert valid(body) is ok
