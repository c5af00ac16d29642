"""An IncusInstance as its loop holds it: the desired state read from kopf's live body, and what
the loop remembers between passes."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from ..connections import DEFAULT_KEY
from ..models import ADOPT_ANNOTATION, PAUSED_ANNOTATION, IncusInstanceSpec, InstanceBinding
from ..reconcile import Desired, Ownership
from ..status import Exposure, SnapshotsView

if TYPE_CHECKING:
    from ..connections import Connection
    from ..truenas import SnapshotTarget

PLURAL = "incusinstances"
ResourceKey = tuple[str, str]
"""(namespace, name) of an IncusInstance."""
EventPoster = Callable[[Mapping[str, Any], str, str, str], None]
"""``(body, type, reason, message)``: posts a Kubernetes Event about the object."""
Wake = Callable[[], None]


def resource_key(body: Mapping[str, Any]) -> ResourceKey:
    meta = body.get("metadata", {})
    return meta.get("namespace", ""), meta.get("name", "")


def about(namespace: str, name: str, kind: str = "IncusInstance") -> dict[str, Any]:
    """``log.warning(..., extra=about(ns, name))``: the log line names the object as kopf's own lines do
    (text: a ``[namespace/name]`` prefix; JSON: an ``object`` field)."""
    return {"k8s_ref": {"apiVersion": "incus.truenas.io/v1alpha1", "kind": kind, "namespace": namespace, "name": name}}


def desired_from(body: Mapping[str, Any], ownership: Ownership | None = None) -> Desired:
    """Raises pydantic's ``ValidationError`` for a spec the models refuse. ``ownership`` comes from
    the ledger and the policy (``InstanceLoops``), never from the body."""
    meta = body.get("metadata", {})
    return Desired(
        namespace=meta.get("namespace", ""),
        name=meta.get("name", ""),
        generation=int(meta.get("generation") or 0),
        spec=IncusInstanceSpec.model_validate(dict(body.get("spec") or {})),
        uid=str(meta.get("uid", "")),
        deleting=bool(meta.get("deletionTimestamp")),
        ownership=ownership or Ownership(),
        bound=_binding(body),
        paused=paused(body),
    )


def _binding(body: Mapping[str, Any]) -> InstanceBinding | None:
    raw = (body.get("status") or {}).get("binding")
    try:
        return InstanceBinding.model_validate(raw) if isinstance(raw, Mapping) else None
    except ValidationError:
        return None


def deletion_view(body: Mapping[str, Any]) -> Desired:
    """The resource as deletion needs it. Never refused because the spec does not parse (an outdated
    CRD, a model stricter than admission): deletion needs only the name, the deletion and management
    policies and the stop timeout; which TrueNAS to call comes from the ledger records. Each field is
    kept on its own when it parses; a deletion or management policy that does not read as Delete and
    Full (ObserveOnly, Orphan, or a value this operator cannot read) deletes nothing."""
    try:
        return desired_from(body)
    except ValidationError:
        raw = dict(body.get("spec") or {})
        kind = raw.get("type") if raw.get("type") in ("VM", "CONTAINER") else "CONTAINER"
        fields: dict[str, Any] = {"type": kind, "image": "unparsed"}
        for key in ("name", "stopTimeoutSeconds", "managementPolicy", "deletionPolicy"):
            if key in raw:
                try:
                    IncusInstanceSpec.model_validate({**fields, key: raw[key]})
                    fields[key] = raw[key]
                except ValidationError:
                    continue
        if raw.get("deletionPolicy", "Delete") != "Delete" or raw.get("managementPolicy", "Full") != "Full":
            fields["deletionPolicy"] = "Orphan"  # what cannot be read as Delete is never taken for it
        spec = IncusInstanceSpec.model_validate(fields)
        meta = body.get("metadata", {})
        return Desired(
            namespace=meta.get("namespace", ""),
            name=meta.get("name", ""),
            generation=int(meta.get("generation") or 0),
            spec=spec,
            uid=str(meta.get("uid", "")),
            deleting=True,
            paused=paused(body),
        )


def writes_stopped_since(parsed: Desired, body: Mapping[str, Any]) -> bool:
    """Whether ``body`` (kopf's live view, or the resource read again) now says to stop writing: the
    pause annotation, or ObserveOnly where ``parsed`` was Full. The tenant's switch takes effect at
    the next write, not at the next pass."""
    if paused(body) and not parsed.paused:
        return True
    spec = body.get("spec")
    return not parsed.observe_only and isinstance(spec, Mapping) and spec.get("managementPolicy") == "ObserveOnly"


def adopt_requested(body: Mapping[str, Any]) -> bool:
    annotations = body.get("metadata", {}).get("annotations") or {}
    return str(annotations.get(ADOPT_ANNOTATION, "")).lower() == "true"


def paused(body: Mapping[str, Any]) -> bool:
    """``incus.truenas.io/paused: "true"``: the operator writes nothing to TrueNAS for the resource (a
    tenant may pause its own resources: it only ever stops writes)."""
    annotations = body.get("metadata", {}).get("annotations") or {}
    return str(annotations.get(PAUSED_ANNOTATION, "")).lower() == "true"


def connection_key(namespace: str, spec: IncusInstanceSpec) -> str:
    return f"{namespace}/{spec.connection_ref.name}" if spec.connection_ref else DEFAULT_KEY


@dataclass
class ScheduleMemo:
    """What a loop remembers of spec.snapshots between passes (instances/schedules.py)."""

    applied: tuple[Any, ...] | None = None
    """The task TrueNAS was last found (or made) to match: (NAS, connection epoch, wanted task)."""
    accepted: tuple[Any, ...] | None = None
    """The task as TrueNAS returned it after the last update, where it differs from what was sent
    (TrueNAS normalised a field): counts as matching, so no update is sent again."""
    refused: tuple[tuple[Any, ...], tuple[str, ...]] | None = None
    """(what was asked, the notes): TrueNAS refused that task; not asked again until it changes or
    the connection comes up again."""
    checked_at: float = -math.inf
    """When (monotonic) the task and the snapshots were last read."""
    target: tuple[tuple[Any, ...], SnapshotTarget | None] | None = None
    """(NAS, epoch, instance, its id) -> the instance's datasets, read once per connect."""


@dataclass
class ExposeMemo:
    """What a loop remembers of spec.expose between passes."""

    applied: tuple[Any, ...] | None = None
    """The objects last found (or made) to be as wanted: not read again until they change or a resync passes."""
    checked_at: float = -math.inf
    endpoints: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """Per family, the addresses last put in its slice: kept (not ready) while the instance is not Running."""


@dataclass(frozen=True)
class Settled:
    """What a pass that ended with nothing to do saw before it began (``InstanceLoops.inputs``): while
    all of it stays the same, the next pass would find nothing to do either, and is not made."""

    key: str
    """The connection key the spec named."""
    instance: str
    """The instance name the spec gave."""
    inputs: tuple[Any, ...]


@dataclass
class LoopState:
    """What one resource's loop remembers between passes."""

    status: dict[str, Any]
    """The status as last written (or read)."""
    failures: int = 0
    posted: tuple[str, str] | None = None
    """The last problem posted as an Event (one Event per distinct problem)."""
    devices_seen: tuple[int, int, int] | None = None
    """(generation, connection epoch, audit round) whose devices were compared with TrueNAS."""
    unsupported_posted: tuple[str, ...] = ()
    listening: tuple[Connection, str] | None = None
    watching_key: str | None = None
    snapshots_view: SnapshotsView | None = None
    """What the status says of spec.snapshots and the snapshots; None: what it said before stays."""
    schedule: ScheduleMemo = field(default_factory=ScheduleMemo)
    paused: bool | None = None
    """Whether the last pass found the resource paused (None: no pass yet): the Events say each change once."""
    observed_devices: tuple[tuple[int, int, int], list[Any]] | None = None
    """ObserveOnly: the devices last read from TrueNAS and when (the devices key): compared on every pass."""
    exposure: Exposure | None = None
    """What the status says of spec.expose (instances/exposure.py); None: what it said before stays."""
    expose: ExposeMemo = field(default_factory=ExposeMemo)
    settled: Settled | None = None
    """The last pass that settled with nothing to do (no action, nothing blocked), and what it saw."""
    clean: bool = False
    """This pass settled with nothing to do (set by ``InstanceLoops._settled``)."""
    unchanged: bool = False
    """This pass found ``settled`` still true and did nothing else (counted apart in the metrics)."""
    timer: asyncio.TimerHandle | None = None
    """The sleeping loop's next unprompted pass (``InstanceLoops._due``)."""
