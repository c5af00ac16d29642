"""Holds (instances/holds.py): who holds an instance's power state, from the controllers, the holders'
status as events bring it, and a LIST before a start. The cases the kill test found are pinned here:
a holder's own status coming back stale after it moved on, and a gap between what the status held and
what the controller holds once it runs again."""

from __future__ import annotations

from typing import Any

from truenas_incus_operator.instances.holds import HOLDERS, Holds
from truenas_incus_operator.reconcile import Hold
from truenas_incus_operator.snapshots import RESTORES, SNAPSHOTS  # registers the holders' rules

KEY = ("apps", "db")


def restore(phase: str | None, uid: str = "r-1", instance: str = "db", namespace: str = "apps") -> dict[str, Any]:
    body: dict[str, Any] = {
        "metadata": {"namespace": namespace, "name": "undo", "uid": uid},
        "spec": {"instanceRef": {"name": instance}, "truenasSnapshot": "s"},
    }
    if phase is not None:
        body["status"] = {"phase": phase}
    return body


def holds() -> tuple[Holds, list[tuple[str, str]]]:
    woken: list[tuple[str, str]] = []
    return Holds(woken.append), woken


def test_the_rules_are_registered_for_both_kinds() -> None:
    assert set(HOLDERS) == {SNAPSHOTS, RESTORES}


def test_a_restore_stopping_or_rolling_back_holds_its_instance_stopped_and_nothing_else() -> None:
    registry, woken = holds()
    for phase in (None, "Pending", "Starting", "Succeeded", "Failed"):
        registry.observe(RESTORES, restore(phase))
        assert registry.get(KEY) is None, phase
    for phase in ("Stopping", "RollingBack"):
        registry.observe(RESTORES, restore(phase))
        assert registry.get(KEY) == Hold("Stopped", "IncusInstanceRestore undo"), phase
        assert registry.get(("apps", "other")) is None and registry.get(("other", "db")) is None
    registry.observe(RESTORES, restore("Succeeded"))
    assert registry.get(KEY) is None
    assert KEY in woken


def test_a_holders_status_does_not_count_once_its_controller_runs_here() -> None:
    """A finished restore's stale RollingBack event (kopf delivers its events after the handler ran)
    must not stop the instance again; the controller's own release is the truth."""
    registry, _ = holds()
    registry.claim("r-1")
    registry.hold(KEY, "r-1", Hold("Stopped", "IncusInstanceRestore undo"))
    registry.release(KEY, "r-1")
    registry.observe(RESTORES, restore("RollingBack"))
    assert registry.get(KEY) is None


def test_claiming_takes_over_what_the_status_held_without_a_gap() -> None:
    """After a restart: the status holds the instance stopped; the controller claims it before it
    holds anything itself, and the instance must stay held in between."""
    registry, _ = holds()
    registry.observe(RESTORES, restore("Stopping"))
    registry.claim("r-1")
    assert registry.get(KEY) == Hold("Stopped", "IncusInstanceRestore undo")
    registry.release(KEY, "r-1")
    assert registry.get(KEY) is None


def test_a_deleted_holder_lets_go_of_everything() -> None:
    registry, _ = holds()
    registry.claim("r-1")
    registry.hold(KEY, "r-1", Hold("Stopped", "IncusInstanceRestore undo"))
    registry.observe(RESTORES, restore("Stopping"), deleted=True)
    assert registry.get(KEY) is None
    registry.observe(RESTORES, restore("Stopping", uid="r-2"))
    registry.observe(RESTORES, restore("Stopping", uid="r-2"), deleted=True)
    assert registry.get(KEY) is None


def test_stopped_wins_over_running() -> None:
    registry, _ = holds()
    registry.hold(KEY, "s-1", Hold("Running", "IncusInstanceSnapshot restarting it"))
    registry.hold(KEY, "r-1", Hold("Stopped", "IncusInstanceRestore undo"))
    assert registry.get(KEY) == Hold("Stopped", "IncusInstanceRestore undo")


def test_a_snapshot_holds_only_while_it_stops_for_consistency() -> None:
    registry, _ = holds()
    body: dict[str, Any] = {
        "metadata": {"namespace": "apps", "name": "cold", "uid": "s-1"},
        "spec": {"instanceRef": {"name": "db"}, "consistency": "Stopped"},
        "status": {"phase": "Creating"},
    }
    registry.observe(SNAPSHOTS, body)
    assert registry.get(KEY) is None  # not stopping yet (wasRunning not recorded)
    body["status"]["wasRunning"] = True
    registry.observe(SNAPSHOTS, body)
    assert registry.get(KEY) == Hold("Stopped", "IncusInstanceSnapshot cold")
    body["status"]["phase"] = "Ready"
    registry.observe(SNAPSHOTS, body)
    assert registry.get(KEY) is None
    body["spec"]["consistency"] = "Crash"
    body["status"]["phase"] = "Creating"
    registry.observe(SNAPSHOTS, body)
    assert registry.get(KEY) is None


async def test_confirm_reads_the_holders_from_the_api_server_before_a_start() -> None:
    class Kube:
        def __init__(self) -> None:
            self.asked: list[tuple[str, str]] = []

        async def list_objects(self, plural: str, namespace: str) -> list[dict[str, Any]]:
            self.asked.append((plural, namespace))
            return [restore("RollingBack")] if plural == RESTORES else []

    kube = Kube()
    registry = Holds(lambda _: None, kube)  # type: ignore[arg-type]
    assert registry.get(KEY) is None
    assert await registry.confirm(KEY) == Hold("Stopped", "IncusInstanceRestore undo")
    assert sorted(kube.asked) == sorted([(RESTORES, "apps"), (SNAPSHOTS, "apps")])


def test_a_deleted_holders_late_handler_holds_nothing() -> None:
    """Hostile review F4: a restore deleted while its handler waited on TrueNAS held again afterwards,
    and nothing was left to release it."""
    registry, _ = holds()
    registry.observe(RESTORES, restore("Stopping"), deleted=True)
    registry.hold(KEY, "r-1", Hold("Stopped", "IncusInstanceRestore undo"))
    assert registry.get(KEY) is None


def test_the_loops_actions_in_flight_are_known() -> None:
    """Hostile review F3: on 25.04.0 a container reads STOPPED while its start job runs; a restore
    rolls back only when the instance's loop has no action in flight."""
    registry, _ = holds()
    assert not registry.acting(KEY)
    with registry.action(KEY):
        assert registry.acting(KEY) and not registry.acting(("apps", "other"))
        with registry.action(KEY):
            assert registry.acting(KEY)
        assert registry.acting(KEY)
    assert not registry.acting(KEY)
