"""reconcile.py and status.py: pure planning and reporting, no I/O."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

import pytest

from truenas_incus_operator.models import IncusInstanceSpec, Phase
from truenas_incus_operator.problems import Problem, Reason
from truenas_incus_operator.reconcile import (
    AddDevice,
    Adopt,
    Claim,
    Create,
    Delete,
    Desired,
    Ownership,
    RemoveDevice,
    Start,
    Stop,
    Update,
    UpdateDevice,
    instance_config,
    plan,
    plan_delete,
)
from truenas_incus_operator.status import as_patch, render_instance
from truenas_incus_operator.truenas.backends.container import ContainerBackend
from truenas_incus_operator.truenas.types import UNSET, DeviceConfig, InstanceStatus, ObservedImage, ObservedInstance

MIB = 2**20


def desired(ownership: Ownership | None = None, **spec: Any) -> Desired:
    body = {"type": "CONTAINER", "image": "debian/bookworm", **spec}
    return Desired("ns", "web", 3, IncusInstanceSpec.model_validate(body), uid="u1", ownership=ownership or Ownership())


OURS = Ownership(mine=True)


def observed(**fields: Any) -> ObservedInstance:
    base = ObservedInstance(
        id="web", name="web", type="CONTAINER", status=InstanceStatus.RUNNING, cpu=None, memory=None, autostart=True,
        environment={}, addresses=("10.0.0.2",), image=ObservedImage(os="Debian"),
    )  # fmt: skip
    if "status" in fields:
        fields["status"] = InstanceStatus(fields["status"])
    return replace(base, **fields)


def test_missing_instance_is_created_after_claiming_it_in_the_ledger() -> None:
    result = plan(desired(cpu="2"), None)
    assert [type(a) for a in result.actions] == [Claim, Create]
    assert isinstance(result.actions[1], Create) and result.actions[1].config.cpu == "2"
    # Already claimed (e.g. a crash after claiming): create without claiming again.
    assert [type(a) for a in plan(desired(OURS), None).actions] == [Create]


def test_an_instance_whose_create_never_returned_is_created_again_so_the_backend_can_complete_it() -> None:
    # The ledger still says "creating" (the operator stopped inside the create call): a VM may be half-built.
    unfinished = Ownership(mine=True, unfinished=True)
    result = plan(desired(unfinished, cpu="2"), observed(status="STOPPED"))
    assert [type(a) for a in result.actions] == [Create]
    assert plan(desired(unfinished), observed(status="STARTING")).waiting is not None


def test_an_instance_another_resource_holds_is_never_touched() -> None:
    held = Ownership(holder="other/web", adopt_requested=True, adopt_allowed=True)
    for seen in (None, observed(cpu="1")):
        result = plan(desired(held, cpu="2"), seen)
        assert result.actions == () and result.blocked is not None
        assert result.blocked.reason == "Conflict" and "other/web" in result.blocked.message


def test_vm_that_the_backend_cannot_create_is_blocked_with_advice() -> None:
    result = plan(desired(type="VM", image="ubuntu/noble"), None, unsupported=("type",))
    assert result.actions == () and result.blocked is not None
    assert result.blocked.reason == "Unsupported" and "incus.truenas.io/adopt" in result.blocked.message


def test_foreign_instance_is_adopted_only_where_the_policy_allows() -> None:
    result = plan(desired(cpu="2"), observed(cpu="1"))
    assert result.blocked is not None and result.blocked.reason == "AlreadyExists" and result.actions == ()
    refused = plan(desired(Ownership(adopt_requested=True), cpu="2"), observed(cpu="1"))
    assert refused.blocked is not None and refused.blocked.reason == "AdoptionNotAllowed" and refused.actions == ()
    assert "policy" in refused.blocked.message
    allowed = plan(desired(Ownership(adopt_requested=True, adopt_allowed=True), cpu="2"), observed(cpu="1"))
    assert allowed.actions == (Adopt(),) and allowed.blocked is None
    # Allowed but not asked for: the policy alone adopts nothing.
    assert plan(desired(Ownership(adopt_allowed=True)), observed()).blocked.reason == "AlreadyExists"  # type: ignore[union-attr]
    # Once recorded as the owner it manages the instance like one it created.
    adopted = plan(desired(OURS, cpu="2"), observed(cpu="1"))
    assert isinstance(adopted.actions[0], Update) and adopted.actions[0].changes.cpu == "2"


def test_type_mismatch_and_transitions() -> None:
    assert plan(desired(OURS), observed(type="VM")).blocked.reason == "TypeMismatch"  # type: ignore[union-attr]
    waiting = plan(desired(OURS, cpu="4"), observed(status="STARTING"))
    assert waiting.waiting == "TrueNAS reports STARTING" and waiting.actions == ()


@pytest.mark.parametrize(
    "spec,seen,expected",
    [
        ({"cpu": "2"}, {"cpu": "1"}, {"cpu": "2"}),
        ({}, {"cpu": "1"}, {"cpu": UNSET}),
        ({"memory": "1Gi"}, {"memory": 512 * MIB}, {"memory": 1024 * MIB}),
        ({"memory": 100 * MIB + 5}, {"memory": 100 * MIB}, {}),
        ({}, {"memory": 100 * MIB}, {"memory": UNSET}),
        ({"autostart": False}, {}, {"autostart": False}),
        ({"environment": {"A": "1"}}, {"environment": {"A": "2", "B": "3"}}, {"environment": {"A": "1"}}),
        ({}, {"environment": {"A": "1"}}, {"environment": {}}),
    ],
)
def test_config_changes(spec: dict[str, Any], seen: dict[str, Any], expected: dict[str, Any]) -> None:
    result = plan(desired(OURS, **spec), observed(**seen))
    if not expected:
        assert result.actions == () and result.blocked is None and result.waiting is None
        return
    (update,) = result.actions
    assert isinstance(update, Update)
    changes = {k: v for k, v in vars(update.changes).items() if v is not None}
    assert changes == expected


def test_power() -> None:
    assert plan(desired(OURS), observed(status="STOPPED")).actions == (Start(),)
    assert plan(desired(OURS, powerState="Stopped", stopTimeoutSeconds=7), observed()).actions == (Stop(7),)
    assert plan(desired(OURS, powerState="Stopped"), observed()).actions == (Stop(30),)
    assert plan(desired(OURS, powerState="Manual"), observed(status="STOPPED")).actions == ()
    frozen = plan(desired(OURS), observed(status="FROZEN"))
    assert frozen.actions == () and "FROZEN" in frozen.notes[0]


def test_devices_by_name() -> None:
    spec = {
        "devices": [
            {"name": "data", "type": "DISK", "source": "/mnt/tank/a", "destination": "/a"},
            {"name": "tpm", "type": "TPM"},
        ],
        "nics": [{"name": "eth1", "parent": "br0"}],
    }
    seen = [
        DeviceConfig("eth0", "NIC", inherited=True, extra={"network": "incusbr0"}),
        DeviceConfig("data", "DISK", source="/mnt/tank/a", destination="/b", extra={"boot_priority": None}),
        DeviceConfig("old", "USB"),
        DeviceConfig("eth1", "NIC", extra={"nic_type": "BRIDGED", "parent": "br0", "mac": "10:66:6a:00:00:01"}),
    ]
    actions = plan(desired(OURS, **spec), observed(), seen).actions
    assert RemoveDevice("old") in actions
    assert AddDevice(DeviceConfig("tpm", "TPM")) in actions
    updates = [a for a in actions if isinstance(a, UpdateDevice)]
    assert [(u.device.name, u.target) for u in updates] == [("data", "data")]
    assert len(actions) == 3, "eth0 is inherited and eth1 matches: neither is touched"
    # Devices not read this time: no device actions at all.
    assert plan(desired(OURS, **spec), observed(), None).actions == ()


def test_container_backend_plan_leaves_out_what_26_cannot_do() -> None:
    backend = ContainerBackend(transport=SimpleNamespace(supports_events=False), version=(26, 0))
    want = desired(OURS, cpu="2", memory="1Gi", environment={"TZ": "UTC"}, devices=[
        {"name": "data", "type": "DISK", "source": "/mnt/tank/a", "destination": "/a", "readonly": True},
        {"name": "http", "type": "PROXY", "extra": {"source_port": 80}},
    ], nics=[{"name": "eth1", "parent": "br0", "type": "macvlan"}])  # fmt: skip
    config = instance_config(want)
    assert backend.unsupported_fields(config) == [
        "memory", "cpu", "devices[data].readonly", "devices[http] (PROXY)", "devices[].name"
    ]  # fmt: skip
    honoured = backend.honoured(config)
    # As migrated from 25.10: cpuset "2" pinned by mistake, environment dropped, devices without names.
    seen = observed(id="7", cpu="2", environment={})
    migrated = [
        DeviceConfig("11", "DISK", source="/mnt/tank/a", destination="/a"),
        DeviceConfig("12", "NIC", extra={"parent": "br0", "mac": "x"}),
    ]
    result = plan(want, seen, migrated, config=honoured, identity=backend.device_identity)
    (update,) = result.actions
    assert isinstance(update, Update)
    assert update.changes.cpu is UNSET and update.changes.memory is None and update.changes.environment == {"TZ": "UTC"}
    # Once applied, nothing more: no endless retries of memory or readonly.
    settled = plan(
        want,
        observed(id="7", cpu=None, environment={"TZ": "UTC"}),
        migrated,
        config=honoured,
        identity=backend.device_identity,
    )
    assert settled.actions == () and settled.unsupported == ()  # unsupported is reported by the caller


def test_delete_plans() -> None:
    assert plan_delete(desired(OURS, deletionPolicy="Orphan"), observed()).actions == ()
    assert plan_delete(desired(OURS), None).actions == ()
    foreign = plan_delete(desired(), observed())
    assert foreign.actions == () and "never managed" in foreign.notes[0]
    assert plan_delete(desired(OURS, stopTimeoutSeconds=5), observed()).actions == (Stop(5), Delete())
    assert plan_delete(desired(OURS), observed(status="STOPPED")).actions == (Delete(),)
    assert plan_delete(desired(OURS), observed(status="STOPPING")).waiting


# ----- status -------------------------------------------------------------------------------------------
NOW = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)


def build_status(*args: Any, **kwargs: Any) -> dict[str, Any]:
    """The status patch the operator would send, rendered at ``NOW``."""
    return as_patch(render_instance(*args, now=NOW, **kwargs))


def conditions(status: dict[str, Any]) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["reason"]) for c in status["conditions"]}


def test_status_running_in_sync() -> None:
    want = desired(OURS)
    status = build_status(want, observed(memory=2048 * MIB, cpu="2"), previous={}, plan=plan(want, observed()))
    assert status["phase"] == "Running" and status["memory"] == "2Gi" and status["cpu"] == "2"
    assert conditions(status) == {"Ready": ("True", "Available"), "Synced": ("True", "ReconcileSuccess")}
    assert status["observedGeneration"] == 3 and all(c["observedGeneration"] == 3 for c in status["conditions"])
    assert status["ipAddresses"] == ["10.0.0.2"]


def test_status_keeps_transition_time_while_unchanged() -> None:
    want = desired(OURS)
    first = build_status(want, observed(), previous={}, plan=plan(want, observed()))
    for condition in first["conditions"]:
        condition["lastTransitionTime"] = "2020-01-01T00:00:00Z"
    again = build_status(want, observed(), previous=first, plan=plan(want, observed()))
    assert {c["lastTransitionTime"] for c in again["conditions"]} == {"2020-01-01T00:00:00Z"}


@pytest.mark.parametrize(
    "problem,phase",
    [
        (Problem(Reason.UNREACHABLE, "x"), Phase.PENDING),
        (Problem(Reason.CONNECTION_NOT_FOUND, "x"), Phase.PENDING),
        (Problem(Reason.IMAGE_NOT_FOUND, "x"), Phase.ERROR),
    ],
)
def test_status_problem_without_instance(problem: Problem, phase: Phase) -> None:
    status = build_status(desired(), None, previous={}, plan=None, problem=problem)
    assert status["phase"] == phase.value
    assert conditions(status)["Synced"] == ("False", problem.reason)


def test_status_of_a_foreign_instance_reports_nothing_of_it() -> None:
    want = desired()
    status = build_status(want, observed(cpu="1"), previous={}, plan=plan(want, observed(cpu="1")))
    assert status["phase"] == "Error" and status["instanceId"] is None and status["cpu"] is None
    assert conditions(status)["Synced"] == ("False", "AlreadyExists")


def test_status_partially_applied_and_stopped() -> None:
    want = desired(OURS, powerState="Stopped")
    status = build_status(
        want,
        observed(status="STOPPED"),
        previous={},
        plan=plan(want, observed(status="STOPPED"), unsupported=("memory",)),
    )
    assert status["phase"] == "Stopped"
    assert conditions(status) == {"Ready": ("True", "Stopped"), "Synced": ("True", "PartiallyApplied")}
    assert "memory" in next(c["message"] for c in status["conditions"] if c["type"] == "Synced")


def test_a_resource_that_owns_an_instance_elsewhere_creates_no_second_one() -> None:
    moved = Ownership(elsewhere="'web' on nas-a:443")
    for seen in (None, observed()):
        result = plan(desired(moved), seen)
        assert result.actions == () and result.blocked is not None and result.blocked.reason == "OwnsElsewhere"
        assert "nas-a:443" in result.blocked.message


def test_an_adopted_instance_that_vanished_is_not_re_created() -> None:
    gone = plan(desired(Ownership(mine=True, adopted=True)), None)
    assert gone.actions == () and gone.blocked is not None and gone.blocked.reason == "InstanceGone"
    # One it created is put back (drift), as before.
    assert [type(a) for a in plan(desired(OURS), None).actions] == [Create]


def test_a_status_word_the_operator_does_not_know_is_unknown_and_left_alone() -> None:
    """TrueNAS's states are one enum (issue 22 item 4); a newer TrueNAS's word is UNKNOWN, never a crash."""
    assert InstanceStatus.of("RUNNING") is InstanceStatus.RUNNING
    assert InstanceStatus.of("HIBERNATED") is InstanceStatus.UNKNOWN
    assert InstanceStatus.of(None) is InstanceStatus.UNKNOWN
    assert InstanceStatus.STOPPING.transitional and not InstanceStatus.FROZEN.transitional
    result = plan(desired(OURS), observed(status=InstanceStatus.of("HIBERNATED")))
    assert result.actions == () and "UNKNOWN" in result.notes[0]


def test_a_clone_records_its_source_in_the_binding_and_a_changed_source_is_immutable() -> None:
    from truenas_incus_operator.models import InstanceBinding
    from truenas_incus_operator.truenas import CloneSource

    body = {"type": "VM", "source": {"snapshotRef": {"name": "gold"}}}
    spec = IncusInstanceSpec.model_validate(body)
    clone = Desired("ns", "web", 1, spec, uid="u1", ownership=OURS, clone=CloneSource("src", "tio-abc"))
    binding = clone.binding()
    assert binding.source == "gold" and binding.image is None
    assert instance_config(clone).source == CloneSource("src", "tio-abc") and instance_config(clone).image is None
    moved = replace(clone, bound=InstanceBinding(name="web", type="VM", source="silver"))
    assert moved.immutable_changes() == ("spec.source.snapshotRef.name is 'gold', the instance was made with 'silver'",)
    assert plan(moved, observed(type="VM")).blocked is not None
