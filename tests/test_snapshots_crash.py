"""A restore survives SIGKILLs of the operator at any moment (issue 24 item 2): 20 kills across five
restores, on a 25.x and a 26 profile, proven with the simulator's ordered log of writes: never a
rollback once the instance started again after the first rollback, never an instance left stopped,
the data as the snapshot had it."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from .conftest import Cluster, module_prefix
from .harness import Chaos, Harness, operator_with_simulator, unique, wait_until
from .test_snapshots_e2e import ROLLBACKS, START_WRITES, apply, content, status, write, writes

pytestmark = pytest.mark.e2e  # needs the local control plane (kube-apiserver + etcd)

RESTORES = 5
KILLS_PER_RESTORE = 4


@pytest.fixture(scope="module", params=["25.10", "26.0"])
def harness(
    cluster: Cluster, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[Harness]:
    profile = str(request.param)
    prefix = f"{module_prefix(request)}{profile.replace('.', '')}-"
    # Stop and start jobs that take a while, so kills land inside the restore's steps too.
    running = operator_with_simulator(
        cluster, tmp_path_factory.mktemp(f"crash{profile}"), profile, job_duration=0.6, args=["-n", f"{prefix}*"]
    )
    running.prefix = prefix  # type: ignore[attr-defined]
    try:
        yield running
    finally:
        running.operator.stop()
        running.sim.stop()


def test_a_restore_survives_twenty_kills(harness: Harness, cluster: Cluster) -> None:
    ns = f"{harness.prefix}{unique('kills')}"  # type: ignore[attr-defined]
    cluster.kubectl("create", "namespace", ns)
    name = unique("db")
    harness.apply(ns, name, {})
    harness.wait_ready(ns, name, timeout=60)
    apply(harness, ns, "IncusInstanceSnapshot", "good", {"instanceRef": {"name": name}})
    taken: dict[str, Any] = wait_until(
        lambda: (s := status(harness, ns, "incusinstancesnapshots", "good")).get("phase") == "Ready" and s,
        timeout=60,
        what="the snapshot",
    )
    root = taken["datasets"][0]
    saved = content(harness, root)
    chaos = Chaos(harness.operator, seed=2412)
    for round_ in range(RESTORES):
        write(harness, root, f"damage {round_}")
        since = len(writes(harness, name))
        restore = f"undo-{round_}"
        apply(
            harness,
            ns,
            "IncusInstanceRestore",
            restore,
            {"instanceRef": {"name": name}, "snapshotRef": {"name": "good"}},
        )
        chaos.rounds(KILLS_PER_RESTORE)

        def finished(restore: str = restore) -> dict[str, Any] | None:
            found = status(harness, ns, "incusinstancerestores", restore)
            return found if found.get("phase") in ("Succeeded", "Failed") else None

        try:
            done: dict[str, Any] = wait_until(finished, timeout=180, what=f"{restore} to finish")
        except AssertionError:
            found = status(harness, ns, "incusinstancerestores", restore)
            instance = harness.get(ns, name).get("status")
            state = harness.sim.run(lambda: harness.sim.sim.find(name).status)
            raise AssertionError(f"{restore}: {found}\n{instance}\nTrueNAS: {state}\n{writes(harness, name)}") from None
        assert done["phase"] == "Succeeded", done
        methods = [method for method, _ in writes(harness, name)[since:]]
        assert any(m in ROLLBACKS for m in methods), f"round {round_}: no rollback at all: {methods}"
        first = next(i for i, m in enumerate(methods) if m in ROLLBACKS)
        started = next((i for i, m in enumerate(methods) if i > first and m in START_WRITES), None)
        assert started is not None, f"round {round_}: never started again after the rollback: {methods}"
        assert not any(m in ROLLBACKS for m in methods[started:]), (
            f"round {round_}: rolled back after a start: {methods}"
        )
        assert content(harness, root) == saved, f"round {round_}: the data is not the snapshot's"
        print(f"round {round_}: {methods}")  # which steps the kills cut (pytest -s)
        harness.wait_ready(ns, name, timeout=60)
        assert harness.instance(name) is not None
        assert harness.sim.run(lambda: list(harness.sim.sim.storage.changed_under)) == []
    assert chaos.kills == RESTORES * KILLS_PER_RESTORE == 20
    harness.delete(ns, name)
