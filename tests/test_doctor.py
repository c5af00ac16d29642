"""``truenas-incus-operator doctor`` against the simulator on every profile: a full key, a read-only key,
virtualization not configured, REST, an unreachable NAS; it never writes (the simulator's counters)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from truenas_incus_operator.doctor import FAIL, OK, WARN, Report, run_doctor
from truenas_incus_operator.settings import Settings
from truenas_simulator import SimulatorThread
from truenas_simulator.profiles import get_profile
from truenas_simulator.state import CallCounters, GlobalConfig
from truenas_simulator.tls import CertificateAuthority

from .harness import start_simulator

PROFILES = ["25.04.0", "25.04.2", "25.10", "26.0"]
# From 25.04.2 on, VMs go through vm.* next to the container family (backends/routing.py).
FAMILY = {
    "25.04.0": "virt.instance",
    "25.04.2": "virt.instance+vm",
    "25.10": "virt.instance+vm",
    "26.0": "container+vm",
}
UNSUPPORTED = {
    "25.04.0": ["nics[].hwaddr"],
    "25.04.2": ["nics[].hwaddr"],
    "25.10": [],
    "26.0": ["memory", "devices[].name"],
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
    report = await run_doctor(settings_for(sim), [manifest])
    checks = by_name(report)
    assert not report.blocked, report.as_text()
    others = [c.status for c in report.checks if c.name not in ("manifest web01", "TLS")]
    assert others == [OK] * 6, report.as_text()
    assert checks["login and version"].details == {
        "version": profile.system_version,
        "api_family": FAMILY[profile.name],
        "transport": "websocket",
    }
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
