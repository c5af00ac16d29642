"""The operator on TrueNAS 26 with its own operator per test: SIGKILLs, and the 25.10 -> 26 upgrade.

Kept apart from test_operator_26.py on purpose: each test here runs its own operator (killed, or
across an upgrade); module operators watch only their module's namespaces (``-n 'prefix*'``), so
no two operators ever run the deletion of one resource.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from .conftest import Cluster
from .harness import (
    ADOPT_ANYWHERE,
    Chaos,
    Harness,
    OperatorProcess,
    operator_env,
    start_simulator,
    unique,
    wait_until,
    write_policy,
)

pytestmark = pytest.mark.e2e  # needs the local control plane (kube-apiserver + etcd, helm)


def conditions(status: dict[str, object]) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["reason"]) for c in status["conditions"]}  # type: ignore[attr-defined]


# ----- crash safety on 26 ------------------------------------------------------------------------------
def test_sigkill_on_26_never_duplicates_or_leaks(cluster: Cluster, namespace: str, tmp_path: Path) -> None:
    sim = start_simulator("26.0", job_duration=0.4)
    operator = OperatorProcess(
        cluster, operator_env(sim, tmp_path), tmp_path / "operator.log", args=["-n", namespace]
    ).start()
    harness = Harness(cluster, sim, operator, tmp_path)
    chaos = Chaos(operator, seed=2026)

    try:
        names = [unique("c26") for _ in range(5)]
        for name in names:
            harness.apply(namespace, name, {"environment": {"V": "1"}})
        chaos.rounds(8)
        for name in names:
            harness.apply(namespace, name, {"environment": {"V": "2"}})
        chaos.rounds(6)
        for name in names[:2]:
            harness.delete(namespace, name, wait=False)
        chaos.rounds(6)
        assert chaos.kills >= 20
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
    env = {**operator_env(sim, tmp_path), **write_policy(tmp_path, ADOPT_ANYWHERE)}  # the legacy VM is adopted
    operator = OperatorProcess(cluster, env, tmp_path / "operator.log", args=["-n", namespace]).start()
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
        # 26 has no Incus VMs: the adopted one did not survive, and the operator does not re-create what it
        # did not create (26 could: new VMs go through vm.*).
        vm = harness.wait_synced_false(namespace, legacy_vm, "InstanceGone", timeout=60)
        assert "not carried over by a TrueNAS upgrade" in vm["message"]
        # Nothing duplicated, nothing deleted, nothing created on 26.
        assert harness.instance_names() == {web, idle}
        assert harness.calls().get("vm.create", 0) == 0
        assert harness.calls().get("container.create", 0) == 0 and harness.calls().get("container.delete", 0) == 0
    finally:
        operator.stop()
        sim.stop()
