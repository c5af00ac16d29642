"""Every ``status`` the operator writes, rendered through the models. Pure: no kopf, no I/O, no clock
(the caller passes ``now``).

``render_*`` return the status models; ``as_patch`` turns one into the JSON merge patch to send
(fields set to None are sent as null, which removes them).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, ValidationError

from .models import (
    MAX_LISTED_ADDRESSES,
    MAX_OBSERVED_DEVICES,
    PAUSED_ANNOTATION,
    AddressFamily,
    AddressSource,
    Condition,
    ConditionStatus,
    ImageStatus,
    IncusInstanceStatus,
    InstanceAddress,
    InstanceBinding,
    JobStatus,
    ObservedDevice,
    Phase,
    PowerState,
    SnapshotEntry,
    SnapshotScheduleStatus,
    TrueNASConnectionStatus,
)
from .netconfig import declared_addresses
from .problems import WAITING_REASONS, Problem, Reason
from .quantity import format_bytes
from .reconcile import Desired, Plan, describe_action
from .truenas.addresses import global_text
from .truenas.types import DeviceConfig, InstanceStatus, ObservedInstance

PHASE_BY_TRUENAS_STATUS = {
    InstanceStatus.RUNNING: Phase.RUNNING,
    InstanceStatus.STOPPED: Phase.STOPPED,
    InstanceStatus.STARTING: Phase.STARTING,
    InstanceStatus.STOPPING: Phase.STOPPING,
    InstanceStatus.FROZEN: Phase.FROZEN,
    InstanceStatus.FREEZING: Phase.FROZEN,
    InstanceStatus.THAWED: Phase.RUNNING,
    InstanceStatus.ERROR: Phase.ERROR,
}

ConditionUpdate = tuple[str, Reason, str]
ACTIVITY_REASONS = {
    Phase.CREATING: Reason.CREATING,
    Phase.STARTING: Reason.STARTING,
    Phase.STOPPING: Reason.STOPPING,
    Phase.DELETING: Reason.DELETING,
}
"""Ready=False while the operator does that (the reason is the phase's name)."""
KNOWN_REASONS = frozenset(Reason)
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


OBSERVED_FIELDS = ("instanceId", "binding", "cpu", "memory", "autostart", "ipAddresses", "addresses", "image")
"""What a status knows of the instance on TrueNAS: kept, as last observed, while TrueNAS cannot be asked."""
SNAPSHOT_FIELDS = ("snapshotSchedule", "snapshots", "snapshotCount")
"""What a status says of spec.snapshots and the instance's snapshots: read at a bounded rate, so
kept as last written by every write that did not read them (``SnapshotsView``)."""


@dataclass(frozen=True)
class SnapshotsView:
    """What the status says of spec.snapshots's task and of the instance's snapshots (all None: nothing)."""

    schedule: SnapshotScheduleStatus | None = None
    snapshots: tuple[SnapshotEntry, ...] | None = None
    count: int | None = None


@dataclass(frozen=True)
class Exposure:
    """What the status says of spec.expose: the Service the operator owns (None: none) and the Exposed
    condition (None: the resource has none, spec.expose is not set)."""

    service: str | None = None
    condition: ConditionUpdate | None = None


def phase(
    desired: Desired,
    observed: ObservedInstance | None,
    activity: Phase | None,
    problem: Problem | None,
    connected: bool = True,
    known: bool = False,
) -> Phase:
    """``connected``: TrueNAS could be asked; ``known``: the status holds an earlier observation."""
    if desired.deleting:
        return Phase.DELETING
    if activity is not None:
        return activity
    if not connected:
        return Phase.UNKNOWN if known else Phase.PENDING
    if observed is None:
        if problem is None or problem.reason in WAITING_REASONS:
            return Phase.PENDING
        return Phase.ERROR
    return PHASE_BY_TRUENAS_STATUS.get(observed.status, Phase.UNKNOWN)


def unobserved_condition(
    previous: Sequence[Condition], problem: Problem | None, known: bool, now: datetime
) -> ConditionUpdate:
    """Ready while TrueNAS cannot be asked: Unknown, since when, and why (the status keeps the last observation)."""
    why = f"{problem.reason}: {problem.message}" if problem is not None else "not connected"
    if not known:
        return "False", Reason.NOT_OBSERVED, clip(f"TrueNAS cannot be asked yet ({why})")
    before = next((c for c in previous if c.type == "Ready"), None)
    since = before.last_transition_time if before is not None and before.status == ConditionStatus.UNKNOWN else now
    return (
        "Unknown",
        Reason.NOT_OBSERVED,
        clip(
            f"TrueNAS has not been observed since {since.isoformat().replace('+00:00', 'Z')} ({why}); the rest of "
            "the status is the last observation"
        ),
    )


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
            return "False", Reason.CREATING, "the instance is being created on TrueNAS"
        if activity == Phase.DELETING:
            return "False", Reason.DELETING, "the instance is being deleted on TrueNAS"
        return "False", Reason.NOT_FOUND, "the instance does not exist on TrueNAS"
    if activity is not None:
        reason = ACTIVITY_REASONS.get(activity, Reason.PROGRESSING)
        return "False", reason, f"the operator is {activity.value.lower()} the instance"
    if problem is not None:
        return "False", Reason.NOT_SYNCED, "the last reconcile failed; see the Synced condition"
    if plan is not None and plan.blocked is not None:
        # The spec cannot be followed (changed immutable field, policy, ...): whatever runs is not it.
        return "False", Reason.NOT_SYNCED, f"the spec is not applied ({plan.blocked.reason}); see the Synced condition"
    if plan is not None and plan.observing:
        return (
            "True",
            Reason.OBSERVED,
            f"observed on TrueNAS (ObserveOnly: nothing is written); it is {observed.status}",
        )
    if plan is not None and plan.paused and (plan.actions or plan.waiting):
        return "False", Reason.NOT_SYNCED, f"the spec is not applied: reconciliation is paused ({PAUSED_ANNOTATION})"
    if plan is not None and plan.waiting:
        return "False", Reason.TRANSITIONING, plan.waiting
    if plan is not None and plan.actions:
        return "False", Reason.PROGRESSING, "changes are being applied"
    if desired.hold is not None:
        return (
            "False",
            Reason.HELD,
            f"{desired.hold.power.lower()} for {desired.hold.by}; TrueNAS reports {observed.status}",
        )
    power = desired.power_state
    if power == PowerState.RUNNING and observed.status != InstanceStatus.RUNNING:
        return "False", Reason.NOT_RUNNING, f"TrueNAS reports {observed.status}"
    if power == PowerState.STOPPED and observed.status != InstanceStatus.STOPPED:
        return "False", Reason.NOT_STOPPED, f"TrueNAS reports {observed.status}"
    if power == PowerState.MANUAL:
        return "True", Reason.MANUAL, f"power is managed outside the operator; TrueNAS reports {observed.status}"
    if observed.status == InstanceStatus.STOPPED:
        return "True", Reason.STOPPED, "the instance is stopped, as the spec asks"
    readiness = desired.spec.readiness
    if readiness is not None and readiness.address and not instance_addresses(observed, desired, plan):
        where = (
            "; this TrueNAS reports no address for it (see the Synced condition)"
            if plan is not None and READINESS_ADDRESS in plan.unsupported
            else ""
        )
        return "False", Reason.NO_ADDRESS, f"running; waiting for an address (spec.readiness.address){where}"
    return "True", Reason.AVAILABLE, "the instance is running and matches the spec"


READINESS_ADDRESS = "readiness.address"
"""The field named in Synced (PartiallyApplied) where TrueNAS reports no address for the instance."""


def instance_addresses(
    observed: ObservedInstance | None, desired: Desired | None = None, plan: Plan | None = None
) -> list[InstanceAddress]:
    """status.addresses: what TrueNAS reports for the running instance, each checked to be an address
    (a server's answer is not trusted to be one), then the spec's declared addresses where they were
    applied (the family delivers them and the instance's seed holds them: nothing in Synced says
    otherwise), IPv4 first, at most MAX_LISTED_ADDRESSES."""
    if observed is None or observed.status != InstanceStatus.RUNNING:
        return []
    found = _reported_addresses(observed)
    if desired is not None and plan is not None and not found and _declared_applied(desired, observed, plan):
        reported = {a.address for a in found}
        for text, _nic in declared_addresses(desired.spec.nics):
            if text not in reported:
                reported.add(text)
                family = AddressFamily.IPV4 if ipaddress.ip_address(text).version == 4 else AddressFamily.IPV6
                found.append(InstanceAddress(address=text, family=family, source=AddressSource.DECLARED))
    found.sort(key=lambda a: a.family != AddressFamily.IPV4)
    return found[:MAX_LISTED_ADDRESSES]


def _declared_applied(desired: Desired, observed: ObservedInstance, plan: Plan) -> bool:
    """Declared addresses count as applied only where the operator wrote them into the instance's seed
    (a vm.* VM it built: its seed marks are there; never an adopted or an observed one) and Synced does
    not name them (not deliverable, or changed since: first boot only). Shown only while TrueNAS
    reports no address of its own (``instance_addresses``): what the guest reports wins."""
    if desired.observe_only or desired.ownership.observing or observed.seed is None:
        return False
    return not any(item.startswith("nics[].addresses") for item in plan.unsupported)


def _reported_addresses(observed: ObservedInstance) -> list[InstanceAddress]:
    named = dict(observed.interfaces)
    found: list[InstanceAddress] = []
    seen: set[str] = set()
    for raw in observed.addresses[: MAX_LISTED_ADDRESSES * 4]:
        text = global_text(raw)
        if text is None or text in seen:
            continue
        seen.add(text)
        family = AddressFamily.IPV6 if ":" in text else AddressFamily.IPV4
        interface = named.get(str(raw)) or None
        found.append(InstanceAddress(address=text, family=family, interface=interface, source=AddressSource.TRUENAS))
    return found[:MAX_LISTED_ADDRESSES]


def synced_condition(
    plan: Plan | None, problem: Problem | None, activity: Phase | None = None, previous: Sequence[Condition] = ()
) -> ConditionUpdate:
    """Whether the last reconcile succeeded. Starting an action (a create, a start, a stop) is not a
    success: until it succeeds Synced keeps what it said (a retry of a failing create does not flap)."""
    if problem is None and activity is not None:
        before = next((c for c in previous if c.type == "Synced"), None)
        if before is not None and before.reason in KNOWN_REASONS:  # one an earlier version wrote is not kept
            return str(before.status), Reason(before.reason), before.message
    if problem is not None:
        return "False", problem.reason, problem.message
    if plan is not None and plan.blocked is not None:
        return "False", plan.blocked.reason, plan.blocked.message
    if plan is not None and plan.observing:
        return (
            "True",
            Reason.OBSERVING,
            "observing only (spec.managementPolicy ObserveOnly): nothing is written to TrueNAS",
        )
    if plan is not None and plan.unsupported:
        fields = ", ".join(plan.unsupported)
        return "True", Reason.PARTIALLY_APPLIED, f"this TrueNAS cannot honour: {fields}"
    return "True", Reason.RECONCILE_SUCCESS, "in sync with TrueNAS"


def paused_synced(plan: Plan | None, observed: ObservedInstance | None) -> ConditionUpdate:
    """Synced while incus.truenas.io/paused is set: not reconciled, and what a reconcile would do."""
    message = f"reconciliation is paused ({PAUSED_ANNOTATION}): nothing is written to TrueNAS"
    if plan is not None and plan.observing and plan.blocked is None:
        message += "; the resource only observes its instance (ObserveOnly): InSync says what Full would change"
    elif plan is not None and plan.blocked is not None:
        message += f"; a reconcile would refuse ({plan.blocked.reason}): {plan.blocked.message}"
    elif plan is not None and plan.actions:
        message += "; a reconcile would " + "; ".join(describe_action(a, observed) for a in plan.actions)
    elif plan is not None:
        message += "; a reconcile would change nothing"
    return "False", Reason.RECONCILIATION_PAUSED, message


def insync_condition(
    observed: ObservedInstance | None, plan: Plan | None, before: Sequence[Condition]
) -> ConditionUpdate:
    """ObserveOnly's dry run: whether the instance matches the spec, else what Full would change."""
    if plan is None or not plan.observing:
        kept = next((c for c in before if c.type == "InSync"), None)
        if kept is not None and kept.reason in KNOWN_REASONS:
            return str(kept.status), Reason(kept.reason), kept.message  # not compared this time: as it was
        return "Unknown", Reason.NOT_OBSERVED, "not compared with TrueNAS yet"
    if plan.blocked is not None:
        return "Unknown", plan.blocked.reason, "not compared: see the Synced condition"
    if observed is None:
        return "False", Reason.NOT_FOUND, "the instance does not exist on TrueNAS; Full would create it"
    if plan.differences:
        return "False", Reason.DIFFERS, "Full would: " + "; ".join(plan.differences)
    return "True", Reason.MATCHES, "the instance matches the spec: Full would change nothing"


def _mode_conditions(
    desired: Desired,
    observed: ObservedInstance | None,
    plan: Plan | None,
    before: Sequence[Condition],
    exposure: Exposure | None = None,
) -> dict[str, ConditionUpdate]:
    """The conditions only some resources have: Paused (incus.truenas.io/paused), InSync (ObserveOnly),
    Exposed (spec.expose; ``exposure`` None: as it was)."""
    extra: dict[str, ConditionUpdate] = {}
    if exposure is not None and exposure.condition is not None:
        extra["Exposed"] = exposure.condition
    elif exposure is None:
        kept = next((c for c in before if c.type == "Exposed"), None)
        if kept is not None and kept.reason in KNOWN_REASONS:
            extra["Exposed"] = (str(kept.status), Reason(kept.reason), kept.message)
    if desired.paused:
        extra["Paused"] = (
            "True",
            Reason.RECONCILIATION_PAUSED,
            f"{PAUSED_ANNOTATION} is set: the operator writes nothing to TrueNAS for this resource (deletion "
            "waits too, unless spec.deletionPolicy is Orphan); remove the annotation to resume",
        )
    if desired.observe_only:
        extra["InSync"] = insync_condition(observed, plan, before)
    return extra


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
    connected: bool = True,
    snapshots: SnapshotsView | None = None,
    devices: list[DeviceConfig] | None = None,
    exposure: Exposure | None = None,
) -> IncusInstanceStatus:
    """The whole status of an IncusInstance.

    ``connected`` False: TrueNAS could not be asked (no connection, a refused key, ...), so ``observed``
    says nothing; what the status knew of the instance stays, phase Unknown, Ready Unknown since then.
    Only TrueNAS's answer (connected, no such instance) removes it. ``snapshots`` None: what the
    previous status said of spec.snapshots and the snapshots stays. ``devices``: an ObserveOnly
    resource's mirror of its instance's devices (None: not read, what the status said stays).
    ``exposure``: what spec.expose's Service is (instances/exposure.py; None: what the status said stays)."""
    before = previous_conditions(previous)
    view = snapshots if snapshots is not None else _kept_snapshots(previous or {})
    if plan is not None and plan.blocked is not None and not plan.blocked.ours:
        observed = None  # not ours (AlreadyExists, Conflict, ...): report nothing of it as ours
        view = SnapshotsView()
    if not connected and activity is None:
        unobserved = _unobserved(
            desired, previous or {}, before, now, problem or _blocked_problem(plan), job, version, exposure
        )
        return unobserved.model_copy(update=_snapshot_fields(view))
    current_phase = phase(desired, observed, activity, problem or _blocked_problem(plan))
    ready = ready_condition(desired, observed, plan, activity, problem)
    synced = synced_condition(plan, problem, activity, before)
    if desired.paused and problem is None and activity is None:
        synced = paused_synced(plan, observed)
    updates = {"Ready": ready, "Synced": synced, **_mode_conditions(desired, observed, plan, before, exposure)}
    return IncusInstanceStatus(
        phase=current_phase,
        instance_id=observed.id if observed else None,
        binding=_binding(desired, observed, activity, previous or {}),
        observed_generation=desired.generation,
        conditions=merge_conditions(before, updates, desired.generation, now),
        cpu=observed.cpu if observed else None,
        memory=format_bytes(observed.memory) if observed and observed.memory is not None else None,
        autostart=observed.autostart if observed else None,
        ip_addresses=[a.address for a in _reported_addresses(observed)] if observed else None,
        addresses=instance_addresses(observed, desired, plan) if observed else None,
        service=_service(exposure, previous or {}),
        image=_image(observed),
        devices=_devices(desired, observed, devices, previous or {}),
        job=job,
        message=_message(current_phase, synced, observed, version),
        **_snapshot_fields(view),
    )


def _devices(
    desired: Desired, observed: ObservedInstance | None, devices: list[DeviceConfig] | None, previous: Mapping[str, Any]
) -> list[ObservedDevice] | None:
    """ObserveOnly's mirror of the instance's own devices; text from TrueNAS is made printable and bounded."""
    if not desired.observe_only or observed is None:
        return None
    if devices is None:
        try:
            kept = IncusInstanceStatus.model_validate({"devices": previous.get("devices")}).devices
        except ValidationError:
            return None
        return kept
    shown = [d for d in devices if not d.inherited][:MAX_OBSERVED_DEVICES]
    return [
        ObservedDevice(
            name=printable(d.name)[:128] or "?",
            type=printable(d.type)[:16] or "?",
            source=printable(d.source)[:1024] if d.source else None,
            destination=printable(d.destination)[:1024] if d.destination else None,
        )
        for d in shown
    ]


def _snapshot_fields(view: SnapshotsView) -> dict[str, Any]:
    return {
        "snapshot_schedule": view.schedule,
        "snapshots": list(view.snapshots) if view.snapshots is not None else None,
        "snapshot_count": view.count,
    }


def _kept_snapshots(previous: Mapping[str, Any]) -> SnapshotsView:
    """What a status as read back says of spec.snapshots and the snapshots (what does not parse is dropped)."""
    try:
        fields = {key: previous[key] for key in SNAPSHOT_FIELDS if previous.get(key) is not None}
        kept = IncusInstanceStatus.model_validate(fields)
    except ValidationError:
        return SnapshotsView()
    listed = tuple(kept.snapshots) if kept.snapshots is not None else None
    return SnapshotsView(kept.snapshot_schedule, listed, kept.snapshot_count)


def _unobserved(
    desired: Desired,
    previous: Mapping[str, Any],
    before: list[Condition],
    now: datetime,
    problem: Problem | None,
    job: JobStatus | None,
    version: str | None,
    exposure: Exposure | None = None,
) -> IncusInstanceStatus:
    kept = _last_observation(previous)
    known = kept.instance_id is not None or kept.binding is not None
    current_phase = phase(desired, None, None, problem, connected=False, known=known)
    ready = unobserved_condition(before, problem, known, now)
    if desired.deleting:
        ready = ("False", Reason.DELETING, "the resource is being deleted; see the Synced condition")
    synced = synced_condition(None, problem) if problem is not None else ("Unknown", Reason.NOT_OBSERVED, ready[2])
    return kept.model_copy(
        update={
            "phase": current_phase,
            "observed_generation": desired.generation,
            "conditions": merge_conditions(
                before,
                {"Ready": ready, "Synced": synced, **_mode_conditions(desired, None, None, before, exposure)},
                desired.generation,
                now,
            ),
            "job": job,
            "service": _service(exposure, previous),
            "message": _message(current_phase, synced, None, version),
        }
    )


def _service(exposure: Exposure | None, previous: Mapping[str, Any]) -> str | None:
    """status.service: the Service spec.expose made (``exposure`` None: as the status said)."""
    if exposure is not None:
        return exposure.service
    kept = previous.get("service")
    return kept if isinstance(kept, str) and 0 < len(kept) <= 63 else None


def _last_observation(previous: Mapping[str, Any]) -> IncusInstanceStatus:
    """The observation fields of a status as read back (one that does not parse is dropped, not the rest)."""
    kept: dict[str, Any] = {}
    for key in OBSERVED_FIELDS:
        if previous.get(key) is None:
            continue
        try:
            IncusInstanceStatus.model_validate({key: previous[key]})
        except ValidationError:
            continue
        kept[key] = previous[key]
    return IncusInstanceStatus.model_validate(kept)


def _binding(
    desired: Desired, observed: ObservedInstance | None, activity: Phase | None, previous: Mapping[str, Any]
) -> InstanceBinding | None:
    """Set once (a create under way, or the instance seen as ours); removed only when TrueNAS answered
    that the very instance it names is gone."""
    kept = _last_observation(previous).binding
    if kept is not None:
        if observed is not None or activity is not None:
            return kept
        if (kept.name, kept.connection_ref) != (desired.instance_name, desired.connection_ref):
            return kept  # the spec names another instance (refused as ImmutableFieldChanged): this one is not gone
        return None
    if observed is not None or activity == Phase.CREATING:
        return desired.binding()
    return None


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
                "Ready": ("False", Reason.INVALID_SPEC, problem.message),
                "Synced": ("False", problem.reason, problem.message),
            },
            generation,
            now,
        ),
        message=clip(f"{problem.reason}: {problem.message}"),
    )


def secure_condition(url: str, insecure_skip_verify: bool, verified: bool = True) -> ConditionUpdate:
    """Secure: whether the key and the traffic travel encrypted to a server whose certificate is verified.
    ``verified``: a connection was made (so TrueNAS's certificate was verified); until then a secure
    configuration is Unknown, not True."""
    scheme = url.split("://", 1)[0].lower()
    if scheme in ("ws", "http"):
        return (
            "False",
            Reason.PLAIN_TRANSPORT,
            f"{scheme}:// sends the API key and all traffic unencrypted (allowed only to loopback or with "
            "allowInsecureTransport)",
        )
    if insecure_skip_verify:
        return (
            "False",
            Reason.INSECURE_SKIP_VERIFY,
            "tls.insecureSkipVerify: TrueNAS's certificate is not verified, so whoever can intercept the "
            "connection can pose as TrueNAS and receive the API key",
        )
    if not verified:
        return (
            "Unknown",
            Reason.NOT_VERIFIED,
            f"{scheme}:// with certificate verification; no connection has been made yet, so TrueNAS's "
            "certificate has not been verified",
        )
    return ("True", Reason.VERIFIED, f"{scheme}:// with TrueNAS's certificate verified")


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
    ready = (
        ("False", problem.reason, problem.message) if problem else ("True", Reason.CONNECTED, "logged in to TrueNAS")
    )
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
    """The status as a JSON merge patch: camelCase, JSON values, None kept (it removes a field).
    Every string is ``printable``: texts and names from TrueNAS are hostile input."""
    escaped: dict[str, Any] = _printable_values(status.model_dump(by_alias=True, mode="json"))
    return escaped


def printable(text: str) -> str:
    """``text`` with every control and format character (C0, DEL, C1, bidirectional overrides, zero-width
    characters; line breaks and tabs too) escaped as ``\\xNN``/``\\uNNNN``: what a server sends can
    neither forge lines nor drive a terminal in ``kubectl describe``, and stays readable."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() or ch == " " else _escape(ch) for ch in text)


def _escape(ch: str) -> str:
    code = ord(ch)
    named = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}.get(ch)
    if named:
        return named
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def _printable_values(value: Any) -> Any:
    if isinstance(value, str):
        escaped = printable(value)
        # An escape is up to 10 characters for one: clipped again, so that a string never grows past
        # what it was or MAX_MESSAGE (the CRD's maxLength held for the original; a refused patch would
        # stop every status write of the resource).
        return escaped if escaped is value else clip(escaped, max(len(value), MAX_MESSAGE))
    if isinstance(value, dict):
        return {key: _printable_values(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_printable_values(item) for item in value]
    return value


def differs(previous: Mapping[str, Any], patch: Mapping[str, Any]) -> bool:
    """Whether sending ``patch`` would change anything (``lastSyncTime`` alone does not count).
    ``previous`` as the API server keeps it: without the nulls a patch sent (``stored``)."""
    return any(previous.get(key) != stored(value) for key, value in patch.items() if key != "lastSyncTime")


def applied(previous: Mapping[str, Any], patch: Mapping[str, Any]) -> dict[str, Any]:
    """``previous`` after the merge patch, as the API server keeps it (a None removes the field)."""
    merged = {**previous, **{key: stored(value) for key, value in patch.items()}}
    return {key: value for key, value in merged.items() if value is not None}


def stored(value: Any) -> Any:
    """What the API server keeps of a value sent in a JSON merge patch: no null at any depth (in a map
    a null removes the field; the API server's merge drops those inside lists' objects as well, even
    where the schema says nullable: addresses[].interface). Compared with what it sent instead, every
    status read back after a restart looked changed (one write per resource at every restart)."""
    if isinstance(value, dict):
        return {key: stored(item) for key, item in value.items() if item is not None}
    if isinstance(value, list):
        return [stored(item) for item in value]
    return value


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
