"""Crash safety: SIGKILL the operator at random points of create, update and delete."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from .conftest import Cluster
from .harness import Chaos, Harness, OperatorProcess, operator_env, start_simulator, unique, wait_until

pytestmark = pytest.mark.e2e  # needs the local control plane (kube-apiserver + etcd, helm)


def test_sigkill_at_random_points_never_duplicates_or_leaks(cluster: Cluster, namespace: str, tmp_path: Path) -> None:
    # Jobs take 0.4 s so that kills land inside create, update and delete jobs, not only between them.
    sim = start_simulator("25.10", job_duration=0.4)
    operator = OperatorProcess(
        cluster, operator_env(sim, tmp_path, resync=2.0), tmp_path / "operator.log", args=["-n", namespace]
    ).start()
    harness = Harness(cluster, sim, operator, tmp_path)
    chaos = Chaos(operator, seed=20261126)

    try:
        names = [unique("crash") for _ in range(6)]
        for name in names:
            harness.apply(namespace, name, {"cpu": "1"})
        chaos.rounds(8)  # during creation
        for name in names:
            harness.apply(namespace, name, {"cpu": "2", "memory": "1Gi"})
        chaos.rounds(6)  # during updates
        deleted = names[:3]
        for name in deleted:
            harness.delete(namespace, name, wait=False)
        late = [unique("late") for _ in range(2)]
        for name in late:
            harness.apply(namespace, name, {"powerState": "Stopped"})
        chaos.rounds(7)  # during deletes and more creates
        assert chaos.kills >= 20

        alive = names[3:] + late
        for name in alive:
            harness.wait_status(
                namespace,
                name,
                "converged",
                lambda s: any(c["type"] == "Ready" and c["status"] == "True" for c in s.get("conditions", [])),
                timeout=90,
            )
        wait_until(lambda: not any(harness.exists(namespace, n) for n in deleted), timeout=90, what="deletions")
        wait_until(lambda: harness.instance_names() == set(alive), timeout=30, what="exactly the live set on TrueNAS")

        for name in names[3:]:
            instance = harness.instance(name)
            assert (instance.cpu, instance.memory, instance.status) == ("2", 2**30, "RUNNING")
        for name in late:
            assert harness.instance(name).status == "STOPPED"
        created = sim.run(
            lambda: Counter(
                j.arguments[0]["name"]
                for j in sim.sim.jobs.jobs.values()
                if j.method == "virt.instance.create" and j.state == "SUCCESS"
            )
        )
        assert all(created[n] == 1 for n in names + late), created
        assert set(created) == set(names + late)
    finally:
        operator.stop()
        sim.stop()
