"""Every ``status`` the operator writes, rendered through the models. Pure: no kopf, no I/O, no clock
(the caller passes ``now``).

``render_*`` return the status models; ``as_patch`` turns one into the JSON merge patch to send
(fields set to None are sent as null, which removes them).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, ValidationError

from .models import (
    Condition,
    ConditionStatus,
    ImageStatus,
    IncusInstanceStatus,
    JobStatus,
    Phase,
    PowerState,
    TrueNASConnectionStatus,
)
from .problems import WAITING_REASONS, Problem
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

ConditionUpdate = tuple[str, str, str]
"""(status, reason, message) of one condition."""

MAX_MESSAGE = 4096
"""TrueNAS's messages can be long (tracebacks); status and Events carry at most this many characters."""


TRUNCATED = " ... (truncated)"


def clip(message: str, limit: int = MAX_MESSAGE) -> str:
    """At most ``limit`` characters, the mark included."""
    return message if len(message) <= limit else message[: limit - len(TRUNCATED)] + TRUNCATED


def utc_now() -> datetime:
    """The clock the I/O side passes in (whole seconds, as Kubernetes stores them)."""
    return datetime.now(UTC).replace(microsecond=0)


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
) -> ConditionUpdate:
    """Ready: exists, power state as desired, spec applied."""
    if observed is None:
        if activity == Phase.CREATING:
            return "False", "Creating", "the instance is being created on TrueNAS"
        if activity == Phase.DELETING:
            return "False", "Deleting", "the instance is being deleted on TrueNAS"
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


def synced_condition(plan: Plan | None, problem: Problem | None) -> ConditionUpdate:
    if problem is not None:
        return "False", problem.reason, problem.message
    if plan is not None and plan.blocked is not None:
        return "False", plan.blocked.reason, plan.blocked.message
    if plan is not None and plan.unsupported:
        fields = ", ".join(plan.unsupported)
        return "True", "PartiallyApplied", f"this TrueNAS cannot honour: {fields}"
    return "True", "ReconcileSuccess", "in sync with TrueNAS"


def previous_conditions(previous: Mapping[str, Any] | None) -> list[Condition]:
    """The conditions of a status as read from the API server (unparseable entries are dropped)."""
    conditions = []
    for raw in (previous or {}).get("conditions") or []:
        try:
            conditions.append(Condition.model_validate(raw))
        except ValidationError:
            continue
    return conditions


def merge_conditions(
    previous: list[Condition], updates: dict[str, ConditionUpdate], generation: int, now: datetime
) -> list[Condition]:
    """Standard conditions; lastTransitionTime moves only when the status changes."""
    old = {c.type: c for c in previous}
    merged = []
    for kind, (status, reason, message) in updates.items():
        before = old.get(kind)
        changed = before is None or before.status != status
        merged.append(
            Condition(
                type=kind,
                status=ConditionStatus(status),
                reason=reason,
                message=clip(message),
                last_transition_time=now if changed or before is None else before.last_transition_time,
                observed_generation=generation,
            )
        )
    return merged


def render_instance(
    desired: Desired,
    observed: ObservedInstance | None,
    *,
    previous: Mapping[str, Any] | None,
    now: datetime,
    plan: Plan | None,
    problem: Problem | None = None,
    activity: Phase | None = None,
    job: JobStatus | None = None,
    version: str | None = None,
) -> IncusInstanceStatus:
    """The whole status of an IncusInstance."""
    if plan is not None and plan.blocked is not None and not plan.blocked.ours:
        observed = None  # not ours (AlreadyExists, Conflict, ...): report nothing of it as ours
    current_phase = phase(desired, observed, activity, problem or _blocked_problem(plan))
    ready = ready_condition(desired, observed, plan, activity, problem)
    synced = synced_condition(plan, problem)
    return IncusInstanceStatus(
        phase=current_phase,
        instance_id=observed.id if observed else None,
        observed_generation=desired.generation,
        conditions=merge_conditions(
            previous_conditions(previous), {"Ready": ready, "Synced": synced}, desired.generation, now
        ),
        cpu=observed.cpu if observed else None,
        memory=format_bytes(observed.memory) if observed and observed.memory is not None else None,
        autostart=observed.autostart if observed else None,
        ip_addresses=list(observed.addresses) if observed else None,
        image=_image(observed),
        job=job,
        message=_message(current_phase, synced, observed, version),
    )


def render_invalid_spec(
    previous: Mapping[str, Any] | None, problem: Problem, generation: int, now: datetime
) -> IncusInstanceStatus:
    """The spec does not parse (only possible with an outdated CRD): say so, change nothing else."""
    return IncusInstanceStatus(
        phase=Phase.ERROR,
        observed_generation=generation,
        conditions=merge_conditions(
            previous_conditions(previous),
            {
                "Ready": ("False", "InvalidSpec", problem.message),
                "Synced": ("False", problem.reason, problem.message),
            },
            generation,
            now,
        ),
        message=clip(f"{problem.reason}: {problem.message}"),
    )


def secure_condition(url: str, insecure_skip_verify: bool) -> ConditionUpdate:
    """Secure: whether the key and the traffic travel encrypted to a server whose certificate is verified."""
    scheme = url.split("://", 1)[0].lower()
    if scheme in ("ws", "http"):
        return (
            "False",
            "PlainTransport",
            f"{scheme}:// sends the API key and all traffic unencrypted (allowed only to loopback or with "
            "allowInsecureTransport)",
        )
    if insecure_skip_verify:
        return (
            "False",
            "InsecureSkipVerify",
            "tls.insecureSkipVerify: TrueNAS's certificate is not verified, so whoever can intercept the "
            "connection can pose as TrueNAS and receive the API key",
        )
    return ("True", "Verified", f"{scheme}:// with TrueNAS's certificate verified")


def render_connection(
    previous: Mapping[str, Any] | None,
    problem: Problem | None,
    *,
    generation: int,
    now: datetime,
    version: str | None = None,
    api_version: str | None = None,
    api_family: str | None = None,
    secure: ConditionUpdate | None = None,
    transport: str | None = None,
) -> TrueNASConnectionStatus:
    """A TrueNASConnection's status; what was learned while connected stays while it is not.
    ``secure`` (from ``secure_condition``) adds the Secure condition."""
    ready = ("False", problem.reason, problem.message) if problem else ("True", "Connected", "logged in to TrueNAS")
    before = previous or {}
    updates = {"Ready": ready} if secure is None else {"Ready": ready, "Secure": secure}
    return TrueNASConnectionStatus(
        conditions=merge_conditions(previous_conditions(previous), updates, generation, now),
        version=version or before.get("version"),
        api_version=api_version or before.get("apiVersion"),
        api_family=api_family or before.get("apiFamily"),
        transport=transport or before.get("transport"),
        observed_generation=generation,
    )


def as_patch(status: BaseModel) -> dict[str, Any]:
    """The status as a JSON merge patch: camelCase, JSON values, None kept (it removes a field)."""
    return status.model_dump(by_alias=True, mode="json")


def differs(previous: Mapping[str, Any], patch: Mapping[str, Any]) -> bool:
    """Whether sending ``patch`` would change anything (``lastSyncTime`` alone does not count)."""
    return any(previous.get(key) != value for key, value in patch.items() if key != "lastSyncTime")


def applied(previous: Mapping[str, Any], patch: Mapping[str, Any]) -> dict[str, Any]:
    """``previous`` after the merge patch (top level: a None removes the field)."""
    merged = {**previous, **patch}
    return {key: value for key, value in merged.items() if value is not None}


def _blocked_problem(plan: Plan | None) -> Problem | None:
    if plan is not None and plan.blocked is not None:
        return Problem(plan.blocked.reason, plan.blocked.message)
    return None


def _image(observed: ObservedInstance | None) -> ImageStatus | None:
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
    present = {k: v for k, v in fields.items() if v is not None}
    return ImageStatus(**present) if present else None


def _message(current: Phase, synced: ConditionUpdate, observed: ObservedInstance | None, version: str | None) -> str:
    if synced[0] == "False":
        return clip(f"{synced[1]}: {synced[2]}")
    where = f" on {version}" if version else ""
    if observed is not None and observed.addresses and current == Phase.RUNNING:
        return f"{current.value}{where} at {observed.addresses[0]}"
    return f"{current.value}{where}"
