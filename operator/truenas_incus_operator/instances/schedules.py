"""spec.snapshots: a periodic snapshot task on TrueNAS (``pool.snapshottask``), so that snapshots go on
while the cluster or the operator is down (issue 24 item 4; docs/snapshots.md).

- The task snapshots the instance's datasets (the backend's ``SnapshotTarget``) on the spec's cron
  schedule. TrueNAS keeps snapshots for a lifetime (value and unit), not a count: ``keep`` times the
  schedule's shortest gap becomes the lifetime, rounded up to whole hours (``Lifetime``); the status
  says so.
- Its naming schema, ``tio-auto-<12 hex of the resource's UID>-%Y%m%d-%H%M``, is the operator's mark:
  TrueNAS's retention destroys only what a task's schema parses, so no other task's snapshots (nor
  hand-made ones) are ever its to destroy, and the operator deletes only snapshots that schema names.
- Ownership: the schedule ledger (``SCHEDULE_LEDGER_LABEL``) records the claim before the create call
  and the task's id after it; a task the operator did not create is never read as its own, changed or
  deleted. After a crash between the two, the task is found again by its dataset and naming schema.
- Created when the field appears, updated when it changes (or when someone changed the task on
  TrueNAS), deleted when it goes (its snapshots stay, listed) and before the instance is deleted (a
  task on a vanished dataset fails on every run; TrueNAS 26 refuses to delete a container whose
  dataset still has snapshots, so the task's own snapshots go first).
- Where TrueNAS refuses the task (25.x keeps its internal datasets, the Incus instances' among them,
  out of ``pool.filesystem_choices``: "Dataset not found"), the refusal is reported as an unsupported
  field and not asked again until the spec changes or the connection comes up again: never a hot loop.
- The task and the snapshots (``status.snapshots``: the newest ``MAX_LISTED_SNAPSHOTS``, whoever made
  them) are read again at most once per resync interval, never on every pass; only instances with
  spec.snapshots cost these reads, so an idle operator's calls still do not grow with the others.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from itertools import pairwise
from typing import Any

from croniter import croniter
from pydantic import ValidationError

from ..connections import Connection, ConnectionManager
from ..kube import FENCE, Fence
from ..models import MAX_LISTED_SNAPSHOTS, SnapshotEntry, SnapshotSchedule, SnapshotScheduleStatus
from ..policy import ScheduleError, shortest_interval
from ..problems import Reason, fail
from ..reconcile import Desired
from ..status import SnapshotsView, clip
from ..truenas import (
    SCHEDULE_PREFIX,
    APIUnavailable,
    CallFailed,
    ObservedInstance,
    SnapshotInfo,
    SnapshotTarget,
    TransportError,
    TrueNASClient,
    TrueNASError,
    ValidationFailed,
)
from ..truenas.backends.snapshots import parses
from .ledger import Ledger, Record, RecordState, schedule_key
from .resource import EventPoster, LoopState, ScheduleMemo

log = logging.getLogger(__name__)

MIN_CHECK_SECONDS = 5.0
"""The task and the snapshots are read at most once per resync interval, and never more often than this."""
UNITS = (("WEEK", 7 * 24 * 60), ("DAY", 24 * 60), ("HOUR", 60))
"""The lifetime units used, in minutes, largest first (MONTH and YEAR are zettarepl's 30 and 365 days:
never needed, a lifetime in days or weeks says the same exactly)."""
SAMPLED_FIRINGS = 1000
"""Firings read to tell whether a schedule's gaps vary (and the longest one), from a fixed day."""
WHOLE_DAY = {"begin": "00:00", "end": "23:59"}
"""The task runs at every time its schedule says (TrueNAS's begin/end window: the whole day)."""


# ----- pure: lifetime, naming, payload, listing ------------------------------------------------------------
def naming_schema(uid: str) -> str:
    """The naming schema of the resource's task: the operator's prefix and the UID's first 12 hex digits,
    then the time (zettarepl's rules: %Y %m %d %H %M, ZFS's characters only)."""
    return f"{SCHEDULE_PREFIX}{uid.replace('-', '')[:12]}-%Y%m%d-%H%M"


def cron_fields(schedule: str) -> tuple[str, str, str, str, str]:
    """The five fields of a spec's schedule (admission and the model accept nothing else)."""
    minute, hour, dom, month, dow = schedule.split()
    return minute, hour, dom, month, dow


def _duration(minutes: int) -> str:
    parts = []
    for name, size in (("week", 7 * 24 * 60), ("day", 24 * 60), ("hour", 60), ("minute", 1)):
        count, minutes = divmod(minutes, size)
        if count:
            parts.append(f"{count} {name}" + ("s" if count != 1 else ""))
    return " ".join(parts) or "0 minutes"


@lru_cache(maxsize=512)
def longest_gap(schedule: str) -> timedelta:
    """The longest gap between two consecutive firings among the first ``SAMPLED_FIRINGS`` from a fixed
    day (what the shortest gap alone does not say: a weekday schedule skips the weekend)."""
    cron = croniter(" ".join(cron_fields(schedule)), datetime(2001, 1, 1))
    firings = [cron.get_next(datetime) for _ in range(SAMPLED_FIRINGS)]
    return max((b - a for a, b in pairwise(firings)), default=timedelta(0))


@dataclass(frozen=True)
class Lifetime:
    """How long TrueNAS keeps each snapshot of the task: ``keep`` times the schedule's shortest gap,
    rounded up to whole hours (TrueNAS's smallest unit), in the largest unit that says it exactly."""

    value: int
    unit: str
    keep: int
    gap: timedelta
    """The shortest gap between two consecutive firings (``policy.shortest_interval``)."""
    longest: timedelta

    @property
    def minutes(self) -> int:
        return self.value * dict(UNITS)[self.unit]

    def describe(self) -> str:
        gap = int(self.gap.total_seconds() // 60)
        wanted = self.keep * gap
        text = (
            f"TrueNAS keeps snapshots for a lifetime, not a count: keep {self.keep} x every {_duration(gap)} "
            f"(the schedule's shortest gap) = {_duration(wanted)}"
        )
        if self.minutes != wanted:
            text += f", rounded up to {_duration(self.minutes)} (whole hours): about {self.minutes // gap} are kept"
        text += f"; lifetime {self.value} {self.unit}"
        if self.longest > self.gap:
            text += (
                f". The schedule's firings are up to {_duration(int(self.longest.total_seconds() // 60))} apart: "
                "fewer are kept where they are further apart"
            )
        return text


def lifetime_for(schedule: str, keep: int) -> Lifetime:
    """Raises ``ScheduleError`` for a schedule that is not one (``policy.shortest_interval``)."""
    gap = shortest_interval(" ".join(cron_fields(schedule)))
    wanted = keep * int(gap.total_seconds() // 60)
    hours = max(1, math.ceil(wanted / 60))
    for unit, size in UNITS:
        if (hours * 60) % size == 0:
            return Lifetime(hours * 60 // size, unit, keep, gap, longest_gap(schedule))
    raise AssertionError("HOUR divides every whole number of hours")  # pragma: no cover


def task_payload(target: SnapshotTarget, wanted: SnapshotSchedule, uid: str, lifetime: Lifetime) -> dict[str, Any]:
    """``pool.snapshottask.create``'s argument for the resource's task (also what an update sends)."""
    minute, hour, dom, month, dow = cron_fields(wanted.schedule)
    return {
        "dataset": target.root,
        "recursive": target.recursive,
        "exclude": [],
        "lifetime_value": lifetime.value,
        "lifetime_unit": lifetime.unit,
        "naming_schema": naming_schema(uid),
        "schedule": {"minute": minute, "hour": hour, "dom": dom, "month": month, "dow": dow, **WHOLE_DAY},
        "allow_empty": True,
        "enabled": True,
    }


def signature(task: Mapping[str, Any]) -> tuple[Any, ...]:
    """What makes a task the one wanted (a payload, or an entry as TrueNAS lists it)."""
    raw = task.get("schedule")
    schedule: Mapping[str, Any] = raw if isinstance(raw, Mapping) else {}
    return (
        task.get("dataset"),
        bool(task.get("recursive")),
        tuple(sorted(str(e) for e in task.get("exclude") or [])),
        task.get("lifetime_value"),
        task.get("lifetime_unit"),
        task.get("naming_schema"),
        bool(task.get("enabled")),
        bool(task.get("allow_empty")),
        tuple(str(schedule.get(k, "")) for k in ("minute", "hour", "dom", "month", "dow", "begin", "end")),
    )


def listed(snapshots: list[SnapshotInfo], schema: str | None) -> tuple[tuple[SnapshotEntry, ...], int]:
    """The newest ``MAX_LISTED_SNAPSHOTS`` snapshots, newest first, and how many there are. ``schema``:
    the naming schema of the resource's task (what it made is ``scheduled``)."""
    entries: list[SnapshotEntry] = []
    for info in sorted(snapshots, key=lambda s: s.txg, reverse=True):
        if len(entries) == MAX_LISTED_SNAPSHOTS:
            break
        try:
            entries.append(
                SnapshotEntry(
                    name=info.name,
                    created=datetime.fromtimestamp(info.created, UTC) if info.created is not None else None,
                    used_bytes=info.used,
                    operator=info.owner is not None,
                    scheduled=schema is not None and info.owner is None and parses(info.name, schema),
                )
            )
        except (ValidationError, ValueError, OverflowError, OSError):
            continue  # a name or a time the status cannot hold: left out
    return tuple(entries), len(snapshots)


def refusal_note(version: str | None, target: SnapshotTarget, exc: TrueNASError) -> str:
    """The unsupported field's note when TrueNAS refused the task (or cannot be asked for it)."""
    where = version or "this TrueNAS"
    if isinstance(exc, APIUnavailable):
        return f"spec.snapshots (periodic snapshot tasks cannot be used over this connection: {exc.message})"
    if isinstance(exc, ValidationFailed) and any((e.attribute or "").endswith("dataset") for e in exc.errors):
        return (
            f"spec.snapshots ({where} offers no periodic snapshot task on {target.root}, one of its internal "
            f"datasets: pool.snapshottask.create answered {exc.message!r}; IncusInstanceSnapshots work)"
        )
    return f"spec.snapshots ({where} refused the periodic snapshot task: {exc.message})"


def _refused(exc: TrueNASError) -> bool:
    """TrueNAS answered no (not a dropped connection): asking again the same is answered the same."""
    return isinstance(exc, APIUnavailable) or (isinstance(exc, CallFailed) and not isinstance(exc, TransportError))


# ----- the loop's part ------------------------------------------------------------------------------------
class Schedules:
    def __init__(
        self,
        ledger: Ledger,
        connections: ConnectionManager,
        post_event: EventPoster,
        resync_seconds: float,
        fence: Fence = FENCE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ledger = ledger
        self.connections = connections
        self.post_event = post_event
        self.interval = max(resync_seconds, MIN_CHECK_SECONDS)
        self.fence = fence
        self.clock = clock

    def due(self, memo: ScheduleMemo) -> bool:
        """Whether ``sync`` would read the task and the snapshots again now (once per interval)."""
        return self.clock() - memo.checked_at >= 0.9 * self.interval

    async def sync(
        self,
        body: Mapping[str, Any],
        desired: Desired,
        connection: Connection,
        observed: ObservedInstance,
        state: LoopState,
    ) -> tuple[str, ...]:
        """One settled pass of an instance this resource owns: the task as the spec says, and the view
        the status shows. Returns the notes for fields TrueNAS cannot honour."""
        client = connection.client
        if client is None or not desired.owns:
            return ()
        memo = state.schedule
        wanted = desired.spec.snapshots
        record = self.ledger.get(connection.identity, schedule_key(desired.instance_name))
        if wanted is None:
            if record is not None and record.owner_uid == desired.uid:
                await self._remove(body, client, record, naming_schema(desired.uid), "spec.snapshots was removed")
            state.schedule = ScheduleMemo()
            state.snapshots_view = SnapshotsView()
            return ()
        target = await self._target(client, connection, desired.instance_name, observed, memo)
        if target is None:
            return ()  # gone meanwhile: the next pass plans for that
        now = self.clock()
        due = self.due(memo)
        if record is not None and record.owner_uid != desired.uid and due:
            record = await self.ledger.reread(record.truenas, record.instance)
        if record is not None and record.owner_uid != desired.uid:
            note = (
                f"spec.snapshots (the ledger records the periodic snapshot task of {desired.instance_name!r} for "
                f"another resource, UID {record.owner_uid}: left alone; its record is ConfigMap {record.name})"
            )
            state.snapshots_view = SnapshotsView(SnapshotScheduleStatus(dataset=target.root, message=note))
            return (note,)
        try:
            lifetime = lifetime_for(wanted.schedule, wanted.keep)
        except ScheduleError as exc:  # the policy refuses these before any pass gets here
            note = f"spec.snapshots ({wanted.schedule!r} {exc})"
            state.snapshots_view = SnapshotsView(SnapshotScheduleStatus(dataset=target.root, message=clip(note)))
            return (note,)
        payload = task_payload(target, wanted, desired.uid, lifetime)
        asked = (connection.identity, connection.epoch, signature(payload))
        view = state.snapshots_view or SnapshotsView()
        schedule = view.schedule
        notes: tuple[str, ...] = ()
        changed = False
        if memo.refused is not None and memo.refused[0] == asked:
            notes = memo.refused[1]  # TrueNAS said no to this very task: not asked again
        elif memo.applied != asked or due:
            try:
                entry = await self._ensure(body, desired, client, connection, record, payload, memo)
            except TrueNASError as exc:
                if not _refused(exc):
                    raise
                note = refusal_note(connection.version, target, exc)
                log.info("%s/%s: %s", desired.namespace, desired.name, note)
                memo.refused, memo.applied = (asked, (note,)), None
                schedule, notes = SnapshotScheduleStatus(dataset=target.root, message=clip(note)), (note,)
            else:
                changed = memo.applied != asked
                memo.applied, memo.refused = asked, None
                schedule = _schedule_status(entry, payload, lifetime)
        snapshots, count = view.snapshots, view.count
        if due or changed:  # at most once an interval, and after the task changed
            try:
                snapshots, count = listed(await client.snapshots.of(target), payload["naming_schema"])
            except APIUnavailable as exc:
                note = f"status.snapshots (the snapshots cannot be listed over this connection: {exc.message})"
                notes = tuple(dict.fromkeys((*notes, note)))  # the same note once, whatever the passes
                memo.refused = (asked, notes)
            memo.checked_at = now
        state.snapshots_view = SnapshotsView(schedule, snapshots, count)
        return notes

    async def _target(
        self, client: TrueNASClient, connection: Connection, name: str, observed: ObservedInstance, memo: ScheduleMemo
    ) -> SnapshotTarget | None:
        key = (connection.identity, connection.epoch, name, observed.id)
        if memo.target is None or memo.target[0] != key or memo.target[1] is None:
            memo.target = (key, await client.instances.snapshot_target(name))
        return memo.target[1]

    async def _ensure(
        self,
        body: Mapping[str, Any],
        desired: Desired,
        client: TrueNASClient,
        connection: Connection,
        record: Record | None,
        payload: dict[str, Any],
        memo: ScheduleMemo,
    ) -> dict[str, Any]:
        """The resource's task, made to match ``payload``: created (claimed in the ledger first), found
        again after a crash, re-created when someone deleted it, updated when it differs."""
        tasks = client.snapshot_tasks
        schema = str(payload["naming_schema"])
        if record is None:
            self.fence.check()
            record = await self.ledger.claim(
                connection.identity,
                schedule_key(desired.instance_name),
                owner_uid=desired.uid,
                owner=f"{desired.namespace}/{desired.name}",
                connection=connection.key,
                state=RecordState.CREATING,
            )
        entry = await tasks.get(record.task_id) if record.task_id is not None else None
        if entry is not None and entry.get("naming_schema") != schema:
            entry = None  # the id names another task now (TrueNAS reuses the highest id): not ours
        if entry is None:
            # Never recorded (a crash between the create and the record), or gone from TrueNAS.
            try:
                found = sorted(await tasks.find(schema, str(payload["dataset"])), key=lambda t: int(t["id"]))
            except APIUnavailable:
                if record.task_id is None:
                    await self.ledger.release(record)  # no task can be made over this transport either
                raise
            entry = found[0] if found else await self._create(body, record, tasks, payload)
            if record.task_id is not None and not found:
                self.post_event(
                    body, "Normal", "DriftCorrected",
                    f"the periodic snapshot task {record.task_id} was deleted on TrueNAS; created it again as "
                    f"task {entry['id']}",
                )  # fmt: skip
            record = await self.ledger.set_task(record, int(entry["id"]))
            memo.accepted = None
        if signature(entry) not in (signature(payload), memo.accepted):
            self.fence.check()
            updated = await tasks.update(int(entry["id"]), payload)
            memo.accepted = signature(updated) if signature(updated) != signature(payload) else None
            if memo.applied is not None and memo.applied[2] == signature(payload):
                message = (
                    f"the periodic snapshot task {entry['id']} was changed on TrueNAS; set it back to spec.snapshots"
                )
                self.post_event(body, "Normal", "DriftCorrected", message)
            else:
                message = f"updated the periodic snapshot task {entry['id']} to spec.snapshots"
                self.post_event(body, "Normal", "ScheduleUpdated", message)
            entry = updated
        return entry

    async def _create(
        self, body: Mapping[str, Any], record: Record, tasks: Any, payload: dict[str, Any]
    ) -> dict[str, Any]:
        self.fence.check()
        try:
            entry: dict[str, Any] = await tasks.create(payload)
        except TrueNASError as exc:
            if _refused(exc) and record.task_id is None:
                await self.ledger.release(record)  # TrueNAS made nothing: nothing to own
            raise
        if not isinstance(entry.get("id"), int):
            raise fail(Reason.INTERNAL_ERROR, "pool.snapshottask.create answered without a task id")
        self.post_event(
            body, "Normal", "ScheduleCreated",
            f"created the periodic snapshot task {entry['id']} on {payload['dataset']} "
            f"({payload['lifetime_value']} {payload['lifetime_unit']} lifetime)",
        )  # fmt: skip
        return entry

    async def _remove(
        self, body: Mapping[str, Any], client: TrueNASClient, record: Record, schema: str, why: str
    ) -> list[int]:
        """Deletes the resource's task (the recorded one, and any a crash left unrecorded: its naming
        schema is the resource's) and releases the record. The task's snapshots stay."""
        tasks = client.snapshot_tasks
        ids: set[int] = set()
        try:
            if record.task_id is not None:
                entry = await tasks.get(record.task_id)
                if entry is not None and entry.get("naming_schema") == schema:
                    ids.add(record.task_id)
            ids |= {int(t["id"]) for t in await tasks.find(schema)}
        except APIUnavailable:
            if record.task_id is not None:
                raise  # a task made over another transport: deleted only where it can be
            await self.ledger.release(record)
            return []
        for task_id in sorted(ids):
            self.fence.check()
            await tasks.delete(task_id)
        await self.ledger.release(record)
        if ids:
            shown = ", ".join(map(str, sorted(ids)))
            self.post_event(body, "Normal", "ScheduleDeleted", f"deleted the periodic snapshot task {shown} ({why})")
        return sorted(ids)

    # ----- deletion -----------------------------------------------------------------------------------------
    async def before_delete(self, body: Mapping[str, Any], connection: Connection, instance: str, uid: str) -> None:
        """Before the instance goes: its task (a task on a vanished dataset fails on every run; the
        snapshots it made go with the operator's own, deletion.py). No call unless the ledger records
        a task of the resource."""
        client = connection.client
        record = self.ledger.get(connection.identity, schedule_key(instance))
        if client is not None and record is not None and record.owner_uid == uid:
            await self._remove(body, client, record, naming_schema(uid), "the instance is being deleted")

    async def forget_owner(self, body: Mapping[str, Any], uid: str, orphan: bool) -> None:
        """The resource's schedule records left once its instances are gone, or left on TrueNAS
        (``orphan``: deletionPolicy Orphan; the task stays with its instance)."""
        for record in self.ledger.owned_by(uid):
            if orphan:
                await self.ledger.release(record)
                shown = f" {record.task_id}" if record.task_id is not None else ""
                message = f"left the periodic snapshot task{shown} on TrueNAS (deletionPolicy: Orphan)"
                self.post_event(body, "Normal", "Orphaned", message)
                continue
            connection = self.connections.get(record.connection)
            client = connection.client
            if client is None or not connection.ready.is_set() or connection.identity != record.truenas:
                waiting = f"waiting for the TrueNAS that holds the task of {record.instance}"
                raise fail(Reason.DELETE_FAILED, waiting, retry_after=5.0)
            await self._remove(body, client, record, naming_schema(uid), "its IncusInstance is being deleted")


def _schedule_status(
    entry: Mapping[str, Any], payload: Mapping[str, Any], lifetime: Lifetime
) -> SnapshotScheduleStatus:
    """The status of the task: what was asked and TrueNAS holds (``payload``, as matched), its id and
    its last run as TrueNAS reports it."""
    raw = entry.get("state")
    run: Mapping[str, Any] = raw if isinstance(raw, Mapping) else {}
    state = str(run.get("state") or "") or None
    message = lifetime.describe()
    if state == "ERROR" and run.get("error"):
        message += f". TrueNAS's last run failed: {clip(str(run['error']), 512)}"
    task_id = entry.get("id")
    return SnapshotScheduleStatus(
        task_id=task_id if isinstance(task_id, int) and task_id >= 0 else None,
        dataset=str(payload["dataset"]),
        recursive=bool(payload["recursive"]),
        naming_schema=str(payload["naming_schema"]),
        lifetime_value=int(payload["lifetime_value"]),
        lifetime_unit=str(payload["lifetime_unit"]),
        state=state[:32] if state else None,
        message=clip(message),
    )


__all__ = [
    "MIN_CHECK_SECONDS",
    "Lifetime",
    "ScheduleError",
    "Schedules",
    "cron_fields",
    "lifetime_for",
    "listed",
    "longest_gap",
    "naming_schema",
    "refusal_note",
    "signature",
    "task_payload",
]
