"""Phase and conditions from what was observed and what the operator is doing. Pure functions."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from .models import Phase, PowerState
from .quantity import format_bytes
from .reconcile import Desired, Plan
from .truenas.types import ObservedInstance

PHASE_BY_TRUENAS_STATUS = {
    "RUNNING": Phase.RUNNING,
    "STOPPED": Phase.STOPPED,
    "STARTING": Phase.STARTING,
    "STOPPING": Phase.STOPPING,
    "FROZEN": Phase.FROZEN,
    "FREEZING": Phase.FROZEN,
    "THAWED": Phase.RUNNING,
    "ERROR": Phase.ERROR,
}


# Problems that mean "not there yet" rather than "wrong": the connection is still being set up.
WAITING_REASONS = frozenset({"Connecting", "ConnectionNotFound", "Unreachable", "NoConnection"})


@dataclass(frozen=True)
class Problem:
    """Why the last reconcile failed: the Synced=False reason and TrueNAS's (or our) message."""

    reason: str
    message: str


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def phase(
    desired: Desired, observed: ObservedInstance | None, activity: Phase | None, problem: Problem | None
) -> Phase:
    if desired.deleting:
        return Phase.DELETING
    if activity is not None:
        return activity
    if observed is None:
        if problem is None or problem.reason in WAITING_REASONS:
            return Phase.PENDING
        return Phase.ERROR
    return PHASE_BY_TRUENAS_STATUS.get(observed.status, Phase.UNKNOWN)


def ready_condition(
    desired: Desired,
    observed: ObservedInstance | None,
    plan: Plan | None,
    activity: Phase | None,
    problem: Problem | None,
) -> tuple[str, str, str]:
    """(status, reason, message) of Ready: exists, power state as desired, spec applied."""
    if observed is None:
        if activity == Phase.CREATING:
            return "False", "Creating", "the instance is being created on TrueNAS"
        return "False", "NotFound", "the instance does not exist on TrueNAS"
    if activity is not None:
        return "False", activity.value, f"the operator is {activity.value.lower()} the instance"
    if problem is not None:
        return "False", "NotSynced", "the last reconcile failed; see the Synced condition"
    if plan is not None and plan.waiting:
        return "False", "Transitioning", plan.waiting
    if plan is not None and plan.actions:
        return "False", "Progressing", "changes are being applied"
    power = desired.power_state
    if power == PowerState.RUNNING and observed.status != "RUNNING":
        return "False", "NotRunning", f"TrueNAS reports {observed.status}"
    if power == PowerState.STOPPED and observed.status != "STOPPED":
        return "False", "NotStopped", f"TrueNAS reports {observed.status}"
    if power == PowerState.MANUAL:
        return "True", "Manual", f"power is managed outside the operator; TrueNAS reports {observed.status}"
    if observed.status == "STOPPED":
        return "True", "Stopped", "the instance is stopped, as the spec asks"
    return "True", "Available", "the instance is running and matches the spec"


def synced_condition(plan: Plan | None, problem: Problem | None) -> tuple[str, str, str]:
    if problem is not None:
        return "False", problem.reason, problem.message
    if plan is not None and plan.blocked is not None:
        return "False", plan.blocked.reason, plan.blocked.message
    if plan is not None and plan.unsupported:
        fields = ", ".join(plan.unsupported)
        return "True", "PartiallyApplied", f"this TrueNAS cannot honour: {fields}"
    return "True", "ReconcileSuccess", "in sync with TrueNAS"


def merge_conditions(
    previous: list[dict[str, Any]] | None, updates: dict[str, tuple[str, str, str]], generation: int
) -> list[dict[str, Any]]:
    """Standard conditions; lastTransitionTime moves only when the status changes."""
    old = {c.get("type"): c for c in previous or []}
    merged = []
    for kind, (status, reason, message) in updates.items():
        before = old.get(kind)
        changed = before is None or before.get("status") != status
        merged.append(
            {
                "type": kind,
                "status": status,
                "reason": reason,
                "message": message,
                "lastTransitionTime": now() if changed else before["lastTransitionTime"],  # type: ignore[index]
                "observedGeneration": generation,
            }
        )
    return merged


def build_status(
    desired: Desired,
    observed: ObservedInstance | None,
    *,
    previous: dict[str, Any],
    plan: Plan | None,
    problem: Problem | None = None,
    activity: Phase | None = None,
    job: dict[str, Any] | None = None,
    version: str | None = None,
) -> dict[str, Any]:
    """The whole ``status`` (fields set to None are removed by the merge patch)."""
    if plan is not None and plan.blocked is not None:
        observed = None  # not ours (AlreadyExists, Conflict, ...): report nothing of it as ours
    current_phase = phase(desired, observed, activity, problem or _blocked_problem(plan))
    ready = ready_condition(desired, observed, plan, activity, problem)
    synced = synced_condition(plan, problem)
    status: dict[str, Any] = {
        "phase": current_phase.value,
        "instanceId": observed.id if observed else None,
        "observedGeneration": desired.generation,
        "conditions": merge_conditions(
            previous.get("conditions"), {"Ready": ready, "Synced": synced}, desired.generation
        ),
        "cpu": observed.cpu if observed else None,
        "memory": format_bytes(observed.memory) if observed and observed.memory is not None else None,
        "autostart": observed.autostart if observed else None,
        "ipAddresses": list(observed.addresses) if observed else None,
        "image": _image(observed),
        "job": job,
        "message": _message(current_phase, synced, observed, version),
    }
    return status


def _blocked_problem(plan: Plan | None) -> Problem | None:
    if plan is not None and plan.blocked is not None:
        return Problem(plan.blocked.reason, plan.blocked.message)
    return None


def _image(observed: ObservedInstance | None) -> dict[str, Any] | None:
    if observed is None:
        return None
    image = observed.image
    fields = {
        "os": image.os,
        "release": image.release,
        "serial": image.serial,
        "architecture": image.architecture,
        "variant": image.variant,
        "description": image.description,
    }
    return {k: v for k, v in fields.items() if v is not None} or None


def _message(
    current: Phase, synced: tuple[str, str, str], observed: ObservedInstance | None, version: str | None
) -> str:
    if synced[0] == "False":
        return f"{synced[1]}: {synced[2]}"
    where = f" on {version}" if version else ""
    if observed is not None and observed.addresses and current == Phase.RUNNING:
        return f"{current.value}{where} at {observed.addresses[0]}"
    return f"{current.value}{where}"


def differs(previous: dict[str, Any], status: dict[str, Any]) -> bool:
    """Whether writing ``status`` would change anything (ignores timestamps of unchanged conditions)."""
    return any(previous.get(key) != value for key, value in status.items())
