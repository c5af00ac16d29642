"""``truenas-incus-operator doctor`` against the simulator on every profile: a full key, a read-only key,
virtualization not configured, REST, an unreachable NAS; it never writes (the simulator's counters)."""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from truenas_incus_operator.doctor import FAIL, OK, WARN, Report, run_doctor
from truenas_incus_operator.settings import Settings
from truenas_simulator import SimulatorThread
from truenas_simulator.images import write_mirror
from truenas_simulator.profiles import get_profile
from truenas_simulator.state import CallCounters, GlobalConfig
from truenas_simulator.tls import CertificateAuthority

from .harness import start_simulator

PROFILES = ["25.04.0", "25.04.2", "25.10", "26.0", "27.0"]
# From 25.04.2 on, VMs go through vm.* next to the container family (backends/routing.py).
FAMILY = {
    "25.04.0": "virt.instance",
    "25.04.2": "virt.instance+vm",
    "25.10": "virt.instance+vm",
    "26.0": "container+vm",
    "27.0": "container+vm",
}
UNSUPPORTED = {
    "25.04.0": ["nics[].hwaddr"],
    "25.04.2": ["nics[].hwaddr"],
    "25.10": [],
    "26.0": ["memory", "devices[].name"],
    "27.0": ["memory", "devices[].name"],
}
"""What each generation cannot honour of MANIFEST (a container with a memory limit and a NIC's MAC)."""
MANIFEST = {
    "apiVersion": "incus.truenas.io/v1alpha1",
    "kind": "IncusInstance",
    "metadata": {"name": "web01", "namespace": "apps"},
    "spec": {
        "type": "CONTAINER",
        "image": "debian/bookworm",
        "memory": "1Gi",
        "nics": [{"name": "eth1", "type": "macvlan", "parent": "enp1s0", "hwaddr": "10:66:6A:01:02:03"}],
    },
}


@pytest.fixture
def manifest(tmp_path: Path) -> Path:
    path = tmp_path / "instance.yaml"
    path.write_text(yaml.safe_dump(MANIFEST))
    return path


@pytest.fixture(params=PROFILES)
def sim(request: pytest.FixtureRequest) -> Iterator[SimulatorThread]:
    running = start_simulator(request.param)
    try:
        yield running
    finally:
        running.stop()


def settings_for(sim: SimulatorThread, transport: str = "websocket", **extra: Any) -> Settings:
    assert sim.ca_file is not None
    values: dict[str, Any] = {
        "truenas_url": sim.ws_url if transport == "websocket" else sim.url,
        "truenas_transport": transport,
        "truenas_api_key": sim.api_key,
        "truenas_ca_file": sim.ca_file,
        **extra,
    }
    return Settings(**values)


def by_name(report: Report) -> dict[str, Any]:
    return {check.name: check for check in report.checks}


def assert_only_reads(sim: SimulatorThread, report: Report) -> None:
    counted = sim.run(lambda: dict(sim.sim.counters.by_method))
    writes = [method for method in counted if CallCounters.is_write(method)]
    assert writes == [], f"doctor wrote: {writes}"
    assert counted, "doctor talked to the simulator"
    assert report.calls and not [m for m in report.calls if CallCounters.is_write(m)], "doctor only tried reads"


async def test_a_ready_nas_passes_and_the_manifest_shows_what_it_cannot_honour(
    sim: SimulatorThread, manifest: Path
) -> None:
    profile = get_profile(sim.sim.profile.name)
    mirror = str(write_mirror(list(sim.sim.images.values()), manifest.parent / "mirror"))
    report = await run_doctor(settings_for(sim, vm_image_server=mirror), [manifest])
    checks = by_name(report)
    assert not report.blocked, report.as_text()
    others = [c.status for c in report.checks if c.name not in ("manifest web01", "TLS")]
    vms = "vm" in FAMILY[profile.name].split("+")
    assert others == [OK] * (8 if vms else 6), report.as_text()  # VM memory and image server where VMs use vm.*
    assert ("VM image server" in checks) == vms
    assert checks["login and version"].details == {
        "version": profile.system_version,
        "api_family": FAMILY[profile.name],
        "transport": "websocket",
        # TrueNAS 26 and 27 offer SCRAM: the key never crosses the wire, the exchange bound to the TLS channel.
        "login": "SCRAM-SHA-512+tls-server-end-point" if profile.has_container else "API_KEY_PLAIN",
    }
    assert f"logged in with {checks['login and version'].details['login']}" in checks["login and version"].summary
    tls = checks["TLS"].details
    assert tls["ca"].startswith("TIO_TRUENAS_CA_FILE") and "CN=" in tls["issuer"]
    # The simulator's certificates live a week: doctor warns under 30 days left.
    assert checks["TLS"].status == (WARN if tls["days_left"] < 30 else OK)
    assert f"expires in {tls['days_left']} days" in checks["TLS"].summary
    assert checks["key roles"].details["roles"] == ["FULL_ADMIN"]
    assert checks["virtualization"].details["pool"] == "tank"
    unsupported = UNSUPPORTED[profile.name]
    honour = checks["manifest web01"]
    assert (honour.status, honour.details.get("unsupported", [])) == (WARN if unsupported else OK, unsupported)
    assert_only_reads(sim, report)
    assert sim.api_key not in report.as_text() and sim.api_key not in json.dumps(report.as_json())


@pytest.mark.parametrize("profile", ["25.04.2", "26.0"])
async def test_a_read_only_key_is_a_blocking_problem_and_says_which_calls_it_refuses(profile: str) -> None:
    sim = start_simulator(profile)
    try:
        sim.run(lambda: setattr(next(iter(sim.sim.api_keys.values())), "readonly", True))
        report = await run_doctor(settings_for(sim))
        assert_only_reads(sim, report)
    finally:
        sim.stop()
    roles = by_name(report)["key roles"]
    assert report.blocked and roles.status == FAIL, report.as_text()
    assert roles.details["roles"] == ["READONLY_ADMIN"]
    create = "container.create" if profile == "26.0" else "virt.instance.create"
    assert create in roles.details["refused"] and create not in roles.details["allowed"]
    assert [c.name for c in report.checks if c.status == FAIL] == ["key roles"], "the rest still reads fine"


@pytest.mark.parametrize("profile", ["25.04.0", "25.10", "26.0"])
async def test_virtualization_not_configured_is_a_blocking_problem(profile: str) -> None:
    sim = start_simulator(profile)
    try:
        sim.run(lambda: setattr(sim.sim, "global_config", GlobalConfig(pool=None, storage_pools=[], state="NO_POOL")))
        report = await run_doctor(settings_for(sim))
        assert_only_reads(sim, report)
    finally:
        sim.stop()
    virtualization = by_name(report)["virtualization"]
    assert report.blocked and virtualization.status == FAIL, report.as_text()
    assert virtualization.details["pool"] is None and "not configured" in virtualization.summary


async def test_rest_reports_what_it_can_and_says_it_cannot_read_roles() -> None:
    sim = start_simulator("25.04.2")
    try:
        report = await run_doctor(settings_for(sim, transport="rest"))
        assert_only_reads(sim, report)
    finally:
        sim.stop()
    checks = by_name(report)
    assert not report.blocked, report.as_text()
    assert checks["login and version"].details["transport"] == "rest"
    assert checks["key roles"].status == WARN and "websocket" in checks["key roles"].summary
    assert checks["image registry"].status == OK


async def test_an_unreachable_nas_and_an_untrusted_certificate_stop_early(tmp_path: Path) -> None:
    sim = start_simulator("25.10")
    try:
        url = sim.ws_url
        other_ca = tmp_path / "other.pem"
        other_ca.write_bytes(CertificateAuthority.create("someone else").cert_pem)
        untrusted = await run_doctor(settings_for(sim, truenas_ca_file=other_ca))
    finally:
        sim.stop()
    checks = by_name(untrusted)
    assert checks["TLS"].status == FAIL and "not trusted" in checks["TLS"].summary
    assert "login and version" not in checks, "the key is never sent to an untrusted server"
    gone = await run_doctor(Settings(truenas_url=url, truenas_api_key="1-" + "a" * 64))
    assert by_name(gone)["reachability"].status == FAIL and gone.blocked


def test_the_command_line_prints_json_and_exits_non_zero_when_blocked(tmp_path: Path) -> None:
    sim = start_simulator("25.10")
    try:
        sim.run(lambda: setattr(next(iter(sim.sim.api_keys.values())), "readonly", True))
        key_file = tmp_path / "key"
        key_file.write_text(sim.api_key)
        assert sim.ca_file is not None
        env = {
            **os.environ,
            "TIO_TRUENAS_URL": sim.ws_url,
            "TIO_TRUENAS_API_KEY_FILE": str(key_file),
            "TIO_TRUENAS_CA_FILE": str(sim.ca_file),
        }
        command = [sys.executable, "-m", "truenas_incus_operator", "doctor"]
        as_json = subprocess.run([*command, "--json"], env=env, capture_output=True, text=True, timeout=60)
        as_text = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
        unset = subprocess.run(
            command, env={k: v for k, v in env.items() if k != "TIO_TRUENAS_URL"}, capture_output=True, text=True
        )
    finally:
        sim.stop()
    assert as_json.returncode == 1, as_json.stderr
    result = json.loads(as_json.stdout)
    assert result["ok"] is False and {c["name"]: c["status"] for c in result["checks"]}["key roles"] == FAIL
    assert as_text.returncode == 1 and "[FAIL] key roles: read-only" in as_text.stdout
    assert "doctor: blocking problems found" in as_text.stdout
    for output in (as_json.stdout, as_json.stderr, as_text.stdout, as_text.stderr):
        assert sim.api_key.partition("-")[2] not in output
    assert unset.returncode == 1 and "TIO_TRUENAS_URL is not set" in unset.stdout


# ----- doctor agrees with the operator (issue 21 item 6) ---------------------------------------------------
def instance_manifest(tmp_path: Path, name: str, **spec: Any) -> Path:
    document = {
        "apiVersion": "incus.truenas.io/v1alpha1",
        "kind": "IncusInstance",
        "metadata": {"name": name, "namespace": "apps"},
        "spec": {"type": "CONTAINER", "image": "debian/bookworm", **spec},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


def mirror_for(sim: SimulatorThread, tmp_path: Path) -> str:
    return str(write_mirror(list(sim.sim.images.values()), tmp_path / "mirror"))


async def test_a_vm_over_rest_is_refused_as_the_operator_refuses_it(tmp_path: Path) -> None:
    sim = start_simulator("25.10")
    try:
        vm = instance_manifest(tmp_path, "vm01", type="VM", rootDiskSize="10Gi")
        report = await run_doctor(settings_for(sim, transport="rest"), [vm])
        assert_only_reads(sim, report)
    finally:
        sim.stop()
    check = by_name(report)["manifest vm01"]
    assert check.status == FAIL and report.blocked, report.as_text()
    assert check.details["reason"] == "Unsupported" and "vm.*" in check.summary


@pytest.mark.parametrize("profile", ["25.10", "26.0"])
async def test_a_missing_image_and_memory_no_nas_has_are_refused(profile: str, tmp_path: Path) -> None:
    sim = start_simulator(profile)
    try:
        mirror = mirror_for(sim, tmp_path)
        missing = instance_manifest(tmp_path, "typo", image="debian/bookwrm")
        huge = instance_manifest(tmp_path, "huge", type="VM", memory="4Ti", rootDiskSize="10Gi")
        vm_missing = instance_manifest(tmp_path, "vmtypo", type="VM", image="debian/bookwrm", rootDiskSize="10Gi")
        fine = instance_manifest(tmp_path, "fine", type="VM", memory="2Gi", rootDiskSize="10Gi")
        report = await run_doctor(settings_for(sim, vm_image_server=mirror), [missing, huge, vm_missing, fine])
        assert_only_reads(sim, report)
    finally:
        sim.stop()
    checks = by_name(report)
    assert checks["manifest typo"].status == FAIL and "debian/bookwrm" in checks["manifest typo"].summary
    assert checks["manifest typo"].details["reason"] == "ImageNotFound"
    assert checks["manifest vmtypo"].status == FAIL and checks["manifest vmtypo"].details["reason"] == "ImageNotFound"
    assert checks["manifest huge"].status == FAIL and "memory" in checks["manifest huge"].summary
    assert checks["manifest fine"].status != FAIL, report.as_text()
    assert checks["VM image server"].status == OK and checks["VM image server"].details["url"] == mirror


async def test_an_unreachable_vm_image_server_is_reported(tmp_path: Path) -> None:
    sim = start_simulator("25.10")
    try:
        report = await run_doctor(settings_for(sim, vm_image_server=str(tmp_path / "no-mirror-here")))
    finally:
        sim.stop()
    check = by_name(report)["VM image server"]
    assert check.status == WARN and "VMs cannot be created" in check.summary, report.as_text()
    assert "TIO_VM_IMAGE_SERVER" in check.summary


async def test_an_untrusted_certificate_is_shown_with_what_to_set(tmp_path: Path) -> None:
    sim = start_simulator("25.10")
    try:
        other_ca = tmp_path / "other.pem"
        other_ca.write_bytes(CertificateAuthority.create("someone else").cert_pem)
        report = await run_doctor(settings_for(sim, truenas_ca_file=other_ca))
        assert sim.ca_file is not None
        presented = ssl.get_server_certificate(("127.0.0.1", int(sim.ws_url.rsplit(":", 1)[1])))
    finally:
        sim.stop()
    tls = by_name(report)["TLS"]
    assert tls.status == FAIL
    fingerprint = x509.load_pem_x509_certificate(presented.encode()).fingerprint(hashes.SHA256()).hex(":").upper()
    assert tls.details["sha256_fingerprint"] == fingerprint
    assert "CN=" in tls.details["subject"] and "CN=" in tls.details["issuer"]
    assert "TIO_TRUENAS_CA_FILE" in tls.details["fix"]
    assert "login and version" not in by_name(report), "the key is never sent to an untrusted server"


async def test_a_manifests_connection_ref_is_said_to_be_checked_against_the_environments_nas(
    tmp_path: Path,
) -> None:
    sim = start_simulator("25.10")
    try:
        other = instance_manifest(tmp_path, "elsewhere", connectionRef={"name": "lab-nas"})
        report = await run_doctor(settings_for(sim, vm_image_server=mirror_for(sim, tmp_path)), [other])
    finally:
        sim.stop()
    check = by_name(report)["manifest elsewhere"]
    assert "lab-nas" in check.summary and "TIO_TRUENAS_URL" in check.summary, check.summary
    assert check.details["checked_against"] == sim.ws_url


async def test_a_key_without_full_admin_is_told_it_can_manage_containers_but_not_create_vms() -> None:
    """Issue 23 item 4: filesystem.put (every VM's image and seed upload) is FULL_ADMIN only."""
    sim = start_simulator("25.10")
    roles = ("READONLY_ADMIN", "VIRT_INSTANCE_WRITE", "VIRT_IMAGE_WRITE", "VM_DEVICE_WRITE")
    try:
        sim.run(lambda: setattr(next(iter(sim.sim.api_keys.values())), "roles", roles))
        report = await run_doctor(settings_for(sim))
        assert_only_reads(sim, report)
    finally:
        sim.stop()
    uploads = by_name(report)["VM uploads"]
    assert uploads.status == WARN and "FULL_ADMIN" in uploads.summary, report.as_text()
    assert sorted(uploads.details["roles"]) == sorted(roles)


async def test_doctor_reports_the_memory_a_vm_can_get_with_and_without_overcommit() -> None:
    """Issue 23 item 2: vm.get_available_memory, as vm.start judges a VM's memory (plugins/vm/memory.py)."""
    sim = start_simulator("25.10")
    gib = 2**30
    try:
        sim.run(lambda: setattr(sim.sim.knobs, "mem_available", 10 * gib))
        report = await run_doctor(settings_for(sim))
        assert_only_reads(sim, report)
    finally:
        sim.stop()
    memory = by_name(report)["VM memory"]
    assert memory.status == OK, report.as_text()
    assert memory.details == {"guaranteed": 9 * gib, "overcommitted": 9 * gib}
    assert "9Gi" in memory.summary and "spec.memoryOvercommit" in memory.summary


def test_the_text_report_escapes_what_a_server_said() -> None:
    """A NAS's message with a line break or a terminal escape cannot forge a check or drive the terminal."""
    from truenas_incus_operator.doctor import FAIL, Report

    report = Report()
    report.add("truenas", FAIL, "refused: \x1b]0;owned\x07\n[ok  ] forged: fine", reply=["a\nb", "\u202e"])
    text = report.as_text()
    assert "\x1b" not in text and "\u202e" not in text
    assert not any(line.startswith("[ok  ] forged") for line in text.splitlines()), text
    assert len(text.splitlines()) == 3, text
