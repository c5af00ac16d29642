"""The operator against TrueNAS 26 (container.*), and across the upgrade from 25.10."""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import Cluster
from .harness import Harness, OperatorProcess, operator_env, start_simulator, unique, wait_until


@pytest.fixture(scope="module")
def harness(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    workdir = tmp_path_factory.mktemp("operator26")
    sim = start_simulator("26.0", job_duration=0.05)
    operator = OperatorProcess(cluster, operator_env(sim, workdir), workdir / "operator.log").start()
    try:
        yield Harness(cluster, sim, operator, workdir)
    finally:
        operator.stop()
        sim.stop()


def conditions(status: dict[str, object]) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["reason"]) for c in status["conditions"]}  # type: ignore[attr-defined, index]


def test_container_lifecycle_on_26(harness: Harness, namespace: str) -> None:
    name = unique("web")
    harness.apply(namespace, name, {"cpu": "0-1", "environment": {"TZ": "UTC"}})
    status = harness.wait_ready(namespace, name)
    container = harness.instance(name)
    assert container.state == "RUNNING" and container.initenv == {"TZ": "UTC"} and container.cpuset == "0-1"
    assert status["phase"] == "Running" and status["instanceId"] == str(container.id)
    assert conditions(status)["Synced"] == ("True", "ReconcileSuccess")
    harness.apply(namespace, name, {"cpu": "0-1", "environment": {"TZ": "Europe/Berlin"}, "autostart": False})
    wait_until(lambda: harness.instance(name).initenv == {"TZ": "Europe/Berlin"}, what="initenv updated")
    harness.wait_status(
        namespace, name, "autostart off", lambda s: s.get("autostart") is False and s.get("observedGeneration") == 2
    )
    harness.apply(namespace, name, {"powerState": "Stopped"})
    harness.wait_status(namespace, name, "Stopped", lambda s: s.get("phase") == "Stopped")
    assert harness.instance(name).state == "STOPPED" and harness.instance(name).cpuset is None
    harness.apply(namespace, name, {"powerState": "Running"})
    harness.wait_status(namespace, name, "Running", lambda s: s.get("phase") == "Running")
    assert harness.delete(namespace, name).returncode == 0
    assert name not in harness.instance_names() and not harness.exists(namespace, name)


def test_fields_26_cannot_honour_are_reported(harness: Harness, namespace: str) -> None:
    name = unique("part")
    harness.apply(
        namespace,
        name,
        {
            "cpu": "2",
            "memory": "1Gi",
            "devices": [
                {"name": "data", "type": "DISK", "source": "/mnt/tank/data", "destination": "/data", "readonly": True},
                {
                    "name": "http",
                    "type": "PROXY",
                    "extra": {"source_proto": "TCP", "source_port": 8080, "dest_proto": "TCP", "dest_port": 80},
                },
            ],
            "nics": [{"name": "eth1", "parent": "br0"}],
        },
    )
    status = harness.wait_ready(namespace, name)
    synced = next(c for c in status["conditions"] if c["type"] == "Synced")
    assert (synced["status"], synced["reason"]) == ("True", "PartiallyApplied")
    for field in ("memory", "cpu", "devices[data].readonly", "devices[http] (PROXY)", "devices[].name"):
        assert field in synced["message"]
    event = harness.wait_event(namespace, name, "Unsupported")
    assert "memory" in event["message"] and event["type"] == "Warning"
    container = harness.instance(name)
    kinds = sorted(d["dtype"] for d in container.devices.values())
    assert kinds == ["FILESYSTEM", "NIC"] and container.cpuset is None
    writes = harness.sim.run(lambda: harness.sim.sim.counters.snapshot()["writes"])
    time.sleep(3)  # settled: nothing is retried for the unsupported fields
    assert harness.sim.run(lambda: harness.sim.sim.counters.snapshot()["writes"]) == writes


def test_drift_and_power_on_26(harness: Harness, namespace: str) -> None:
    manual, running = unique("man"), unique("run")
    harness.apply(namespace, manual, {"powerState": "Manual"})
    harness.apply(namespace, running, {})
    harness.wait_ready(namespace, manual)
    harness.wait_ready(namespace, running)
    harness.sim.run(lambda: harness.sim.sim.set_power(manual, "STOPPED"))
    harness.wait_status(namespace, manual, "Stopped", lambda s: s.get("phase") == "Stopped", timeout=2.0)
    harness.sim.run(lambda: harness.sim.sim.set_power(running, "STOPPED"))
    wait_until(lambda: harness.instance(running).state == "RUNNING", timeout=10, what="restarted by the operator")
    assert harness.instance(manual).state == "STOPPED"


def test_adoption_safety_on_26(harness: Harness, namespace: str) -> None:
    name = unique("adopt")
    harness.sim.run(lambda: harness.sim.sim.seed_instance(name=name, status="RUNNING"))
    harness.apply(namespace, name, {"environment": {"A": "1"}})
    harness.wait_synced_false(namespace, name, "AlreadyExists")
    assert harness.instance(name).initenv == {}
    creates = harness.calls().get("container.create", 0)
    harness.apply(namespace, name, {"environment": {"A": "1"}}, annotations={"incus.truenas.io/adopt": "true"})
    harness.wait_ready(namespace, name)
    assert harness.instance(name).initenv == {"A": "1"}
    assert harness.calls().get("container.create", 0) == creates


def test_vm_on_26_says_why_and_what_to_do(harness: Harness, namespace: str) -> None:
    name = unique("vm")
    harness.apply(namespace, name, {"type": "VM", "image": "ubuntu/noble"})
    status = harness.wait_synced_false(namespace, name, "Unsupported")
    assert "TrueNAS 26 has no Incus VMs" in status["message"] and "type CONTAINER" in status["message"]
    assert name not in harness.instance_names()


def test_bad_image_alias_on_26(harness: Harness, namespace: str) -> None:
    name = unique("img")
    harness.apply(namespace, name, {"image": "plan9/4th"})
    status = harness.wait_synced_false(namespace, name, "ImageNotFound")
    assert "no image in the TrueNAS registry matches 'plan9/4th'" in status["message"]


# ----- crash safety on 26 ------------------------------------------------------------------------------
def test_sigkill_on_26_never_duplicates_or_leaks(cluster: Cluster, namespace: str, tmp_path: Path) -> None:
    sim = start_simulator("26.0", job_duration=0.4)
    operator = OperatorProcess(
        cluster, operator_env(sim, tmp_path), tmp_path / "operator.log", args=["-n", namespace]
    ).start()
    harness = Harness(cluster, sim, operator, tmp_path)
    rng = random.Random(2026)
    kills = 0

    def chaos(rounds: int) -> None:
        nonlocal kills
        for _ in range(rounds):
            time.sleep(rng.uniform(0.2, 2.5))
            operator.kill()
            kills += 1
            operator.start()

    try:
        names = [unique("c26") for _ in range(5)]
        for name in names:
            harness.apply(namespace, name, {"environment": {"V": "1"}})
        chaos(8)
        for name in names:
            harness.apply(namespace, name, {"environment": {"V": "2"}})
        chaos(6)
        for name in names[:2]:
            harness.delete(namespace, name, wait=False)
        chaos(6)
        assert kills >= 20
        alive = names[2:]
        for name in alive:
            harness.wait_ready(namespace, name, timeout=90)
        wait_until(lambda: not any(harness.exists(namespace, n) for n in names[:2]), timeout=90, what="deletions")
        try:
            wait_until(
                lambda: harness.instance_names() == set(alive), timeout=30, what=f"exactly {set(alive)} on TrueNAS"
            )
        except AssertionError:
            extra = harness.instance_names() - set(alive)
            jobs = sim.run(
                lambda: [
                    (j.id, j.method, j.state, j.error)
                    for j in sim.sim.jobs.jobs.values()
                    if any(n in str(j.arguments) for n in extra)
                ]
            )
            calls = sim.run(lambda: dict(sim.sim.counters.by_method))
            raise AssertionError(f"left behind on TrueNAS: {extra}; jobs: {jobs}; calls: {calls}") from None
        assert all(harness.instance(n).initenv == {"V": "2"} for n in alive)
    finally:
        operator.stop()
        sim.stop()


# ----- the upgrade -------------------------------------------------------------------------------------------
def test_instances_survive_the_upgrade_from_25_10_to_26(cluster: Cluster, namespace: str, tmp_path: Path) -> None:
    sim = start_simulator("25.10", job_duration=0.05)
    operator = OperatorProcess(
        cluster, operator_env(sim, tmp_path), tmp_path / "operator.log", args=["-n", namespace]
    ).start()
    harness = Harness(cluster, sim, operator, tmp_path)
    try:
        web, idle, legacy_vm = unique("web"), unique("idle"), unique("vm")
        proxy = {"source_proto": "TCP", "source_port": 18080, "dest_proto": "TCP", "dest_port": 80}
        harness.apply(namespace, web, {
            "cpu": "2", "memory": "1Gi", "environment": {"TZ": "UTC"},
            "devices": [{"name": "data", "type": "DISK", "source": "/mnt/tank/data", "destination": "/data"},
                        {"name": "http", "type": "PROXY", "extra": proxy}],
        })  # fmt: skip
        harness.apply(namespace, idle, {"powerState": "Stopped", "autostart": False})
        sim.run(lambda: sim.sim.seed_instance(name=legacy_vm, type="VM", image="ubuntu/noble", status="RUNNING"))
        harness.apply(
            namespace,
            legacy_vm,
            {"type": "VM", "image": "ubuntu/noble"},
            annotations={"incus.truenas.io/adopt": "true"},
        )
        for name in (web, idle, legacy_vm):
            harness.wait_ready(namespace, name)
        old_ids = {n: harness.get(namespace, n)["status"]["instanceId"] for n in (web, idle)}
        assert old_ids == {web: web, idle: idle}

        migration = sim.run(lambda: sim.sim.upgrade("26.0"))
        assert f"{legacy_vm}: Incus VM, not migrated" in migration
        sim.submit(sim.server.drop_connections()).result(10)  # type: ignore[union-attr]

        def found_again(status: dict[str, object]) -> bool:
            return str(status.get("instanceId", "")).isdigit() and status.get("phase") == "Running"

        status = harness.wait_status(namespace, web, "found under its new id", found_again, timeout=60)
        container = harness.instance(web)
        assert status["instanceId"] == str(container.id)
        # What the migration dropped and 26 can express comes back; the rest is reported.
        wait_until(lambda: harness.instance(web).initenv == {"TZ": "UTC"}, timeout=30, what="environment re-applied")
        wait_until(lambda: harness.instance(web).cpuset is None, timeout=30, what="the mistaken CPU pin cleared")
        synced = harness.wait_status(
            namespace,
            web,
            "PartiallyApplied",
            lambda s: conditions(s).get("Synced") == ("True", "PartiallyApplied"),
            timeout=30,
        )
        message = next(c["message"] for c in synced["conditions"] if c["type"] == "Synced")
        assert "memory" in message and "cpu" in message and "devices[http] (PROXY)" in message
        assert sorted(d["dtype"] for d in harness.instance(web).devices.values()) == ["FILESYSTEM"]
        idle_status = harness.wait_status(
            namespace, idle, "idle found", lambda s: str(s.get("instanceId", "")).isdigit(), timeout=60
        )
        assert idle_status["phase"] == "Stopped" and harness.instance(idle).state == "STOPPED"
        vm = harness.wait_synced_false(namespace, legacy_vm, "Unsupported", timeout=60)
        assert "TrueNAS 26 has no Incus VMs" in vm["message"]
        # Nothing duplicated, nothing deleted, nothing created on 26.
        assert harness.instance_names() == {web, idle}
        assert harness.calls().get("container.create", 0) == 0 and harness.calls().get("container.delete", 0) == 0
    finally:
        operator.stop()
        sim.stop()
