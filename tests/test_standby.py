"""A standby that takes over: two operator processes with leader election (TIO_LEADER_ELECTION),
the active one SIGKILLed 10 times. Only one ever acts, and the other takes over in time.

What "acts" means is checked where it lands: on TrueNAS (the simulator's WebSocket sessions never
overlap, and every instance was created exactly once) and in each process's own log (nothing of the
operator starts before that process logged that it leads).
"""

from __future__ import annotations

import itertools
import json
import os
import socket
import statistics
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from .conftest import Cluster
from .harness import Harness, OperatorProcess, operator_env, start_simulator, unique, wait_until

pytestmark = pytest.mark.e2e  # needs the local control plane (kube-apiserver + etcd)

KILLS = 10
TAKEOVER_TARGET = 30.0
LEASE = "tio-standby-test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def health(port: int) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return exc.code, {}
    except OSError:
        return 0, {}


def holder(cluster: Cluster, namespace: str) -> str:
    found = cluster.kubectl("get", "lease", LEASE, "-n", namespace, "-o", "json", check=False)
    if found.returncode != 0:
        return ""
    return str(json.loads(found.stdout)["spec"].get("holderIdentity") or "")


def acted_before_leading(log: str) -> list[str]:
    """Lines of operator work (kopf, the ledger, TrueNAS) logged by a process start before it led."""
    found = []
    for start in log.split("leader election: candidate ")[1:]:
        before, *led = start.split("leader election: leading as ", 1)
        lines = before.splitlines()[1:]
        if led and lines and not before.endswith("\n"):
            lines = lines[:-1]  # the "leading as" line's own prefix ([time] logger [level])
        for line in lines:
            if "leader election:" not in line and line.strip():
                found.append(line)
    return found


@pytest.mark.timeout(900)
def test_two_replicas_never_both_act_and_the_standby_takes_over(
    cluster: Cluster, namespace: str, tmp_path: Path
) -> None:
    sim = start_simulator("25.10", job_duration=0.2)
    ledger = unique("tio-ledger")  # the release namespace: one ledger and one Lease for both replicas
    cluster.kubectl("create", "namespace", ledger)
    env = {
        **operator_env(sim, tmp_path, resync=2.0),
        "TIO_LEDGER_NAMESPACE": ledger,
        "TIO_LEADER_ELECTION": "true",
        "TIO_LEASE_NAME": LEASE,
    }
    ports = {"op-a": free_port(), "op-b": free_port()}
    replicas = {
        name: OperatorProcess(
            cluster,
            {**env, "TIO_POD_NAME": name},
            tmp_path / f"{name}.log",
            args=["-n", namespace, f"--liveness=http://127.0.0.1:{port}/healthz"],
        ).start()
        for name, port in ports.items()
    }
    harness = Harness(cluster, sim, replicas["op-a"], tmp_path)

    def leader() -> str:
        """The replica (op-a, op-b) that holds the Lease."""
        return holder(cluster, ledger).partition("_")[0]

    try:
        wait_until(lambda: leader() in replicas, timeout=60, what="a leader")
        first = leader()
        standby = next(n for n in replicas if n != first)
        base = [unique("sb") for _ in range(3)]
        names = list(base)
        for name in names:
            harness.apply(namespace, name, {"cpu": "1"})
        for name in names:
            harness.wait_ready(namespace, name, timeout=60)

        # The standby: alive for Kubernetes, but it neither watches nor talks to TrueNAS.
        wait_until(lambda: health(ports[standby])[0] == 200, timeout=30, what="the standby's liveness")
        assert health(ports[standby])[1]["leaderElection"] == "standby"
        assert wait_until(lambda: health(ports[first])[0] == 200, timeout=30, what="the leader's liveness (kopf)")
        assert sim.run(lambda: len(sim.sim.sessions)) == 1
        assert "leading as" not in replicas[standby].logs()

        takeovers: list[float] = []
        lease_moves: list[float] = []
        for round_ in range(KILLS):
            active = leader()
            assert active in replicas, holder(cluster, ledger)
            old_holder = holder(cluster, ledger)
            started = time.monotonic()
            replicas[active].kill()
            # What the new leader must do: create an instance, and update one it did not create.
            new = unique(f"k{round_}")
            harness.apply(namespace, new, {"cpu": "1"})
            harness.apply(namespace, base[round_ % len(base)], {"cpu": str(2 + round_ % 2)})
            replicas[active].start()  # the killed pod's container restarts, as a candidate
            wait_until(
                lambda old=old_holder: holder(cluster, ledger) not in ("", old), timeout=60, interval=0.1, what="lease"
            )
            lease_moves.append(time.monotonic() - started)
            wait_until(lambda n=new: harness.instance(n) is not None, timeout=60, interval=0.1, what=f"{new} created")
            takeovers.append(time.monotonic() - started)
            names.append(new)
            harness.wait_ready(namespace, new, timeout=60)

        # Every instance exists once, with the spec's last word, created by exactly one create job.
        for i, name in enumerate(base):
            last = max(r for r in range(KILLS) if r % len(base) == i)
            cpu = str(2 + last % 2)
            harness.wait_status(namespace, name, f"cpu {cpu}", lambda s, c=cpu: s.get("cpu") == c, timeout=60)
            assert harness.instance(name).cpu == cpu
        assert harness.instance_names() == set(names)
        created = sim.run(
            lambda: Counter(
                j.arguments[0]["name"] for j in sim.sim.jobs.jobs.values() if j.method == "virt.instance.create"
            )
        )
        assert created == Counter(names), created
        assert harness.calls()["virt.instance.create"] == len(names)

        # Two replicas never talked to TrueNAS at once: each session closed before the next opened.
        spans = sim.run(lambda: sorted(sim.sim.session_spans, key=lambda s: s.opened))
        assert len(spans) >= KILLS + 1
        for before, after in itertools.pairwise(spans):
            assert before.closed is not None and before.closed <= after.opened, (before, after)
        # And nothing of the operator ran in a process before it led.
        for name, replica in replicas.items():
            assert replica.logs().count("leader election: candidate ") == replica.starts, name
            assert acted_before_leading(replica.logs()) == [], name

        figures = {
            "kills": KILLS,
            "takeover_seconds": [round(t, 2) for t in takeovers],
            "takeover_median": round(statistics.median(takeovers), 2),
            "takeover_max": round(max(takeovers), 2),
            "lease_moved_median": round(statistics.median(lease_moves), 2),
            "lease_moved_max": round(max(lease_moves), 2),
            "cpus": os.cpu_count(),
        }
        print("standby takeover:", json.dumps(figures))
        (tmp_path / "takeover.json").write_text(json.dumps(figures))
        assert max(takeovers) < TAKEOVER_TARGET, figures
    finally:
        for replica in replicas.values():
            replica.stop()
        sim.stop()
