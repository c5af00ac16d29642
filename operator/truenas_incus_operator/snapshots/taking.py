"""IncusInstanceSnapshot: one atomic ZFS snapshot of everything an IncusInstance owns, taken once.

Order, so that a crash at any point neither loses nor doubles a snapshot: the snapshot ledger records
the claim (``creating``) before the create call; the snapshot carries the owner property (this
resource's UID), so after a restart the operator finds its own snapshot and does not take it again;
a snapshot of that name without the property is someone else's and is never touched.

``consistency: Stopped`` holds the instance stopped (its own loop stops it, instances/holds.py),
takes the snapshot once TrueNAS reports it stopped, then lets go: the loop brings it back to what
its powerState says (a Manual instance that was running is started again by a Running hold).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError

from ..connections import ConnectionManager
from ..instances.deletion import clones_named
from ..instances.holds import Holds
from ..instances.ledger import Ledger, RecordState
from ..instances.resource import EventPoster, ResourceKey
from ..models import (
    PAUSED_ANNOTATION,
    Consistency,
    IncusInstanceSnapshotSpec,
    PowerState,
    SnapshotDeletionPolicy,
    SnapshotPhase,
)
from ..policy import Policy
from ..problems import OperatorError, Reason, problem_of
from ..reconcile import Hold
from ..truenas import (
    APIUnavailable,
    CallFailed,
    InstanceStatus,
    NotOurs,
    SnapshotInfo,
    SnapshotTarget,
    TrueNASClient,
    TrueNASError,
)
from .subject import (
    RETRY_SECONDS,
    START_WAIT_SECONDS,
    Refused,
    StatusWriter,
    Subject,
    Subjects,
    key_of,
    ready_connection,
    refused,
    uid_of,
    wait_for_state,
    waiting,
)

PLURAL = "incusinstancesnapshots"
KIND = "IncusInstanceSnapshot"


def snapshot_name(uid: str) -> str:
    """The ZFS snapshot name of a resource: ``tio-`` and the first 12 hex digits of its UID."""
    return "tio-" + uid.replace("-", "")[:12]


def ledger_key(instance: str, name: str) -> str:
    """A snapshot's record in the snapshot ledger (instance names cannot contain '@')."""
    return f"{instance}@{name}"


def _timestamp(seconds: int | None) -> str | None:
    if seconds is None:
        return None
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def described(info: SnapshotInfo) -> dict[str, Any]:
    """The status fields of a snapshot as TrueNAS reports it."""
    return {
        "snapshotName": info.name,
        "datasets": list(info.datasets),
        "creationTime": _timestamp(info.created),
        "usedBytes": info.used,
        "referencedBytes": info.referenced,
    }


def permanent(exc: TrueNASError) -> bool:
    """TrueNAS refused the call itself (validation, not found, not ours), or the connection cannot make
    it (APIUnavailable: no such call or route on that TrueNAS): asking again is the same."""
    if isinstance(exc, APIUnavailable):
        return True
    return isinstance(exc, CallFailed) and exc.errno != 16  # EBUSY: a clone or a hold may go


class SnapshotTaker:
    def __init__(
        self,
        subjects: Subjects,
        connections: ConnectionManager,
        ledger: Ledger,
        holds: Holds,
        writer: StatusWriter,
        post_event: EventPoster,
        policy: Policy | None = None,
        on_ready: Callable[[ResourceKey], None] | None = None,
    ) -> None:
        self.policy = policy or Policy()
        self.on_ready = on_ready
        """Told of each snapshot that became Ready (the clones waiting for it: snapshots/cloning.py)."""
        self.subjects = subjects
        self.connections = connections
        self.ledger = ledger
        self.holds = holds
        self.writer = writer
        self.post_event = post_event

    # ----- create -------------------------------------------------------------------------------------
    async def take(self, body: Mapping[str, Any]) -> None:
        """Raises ``OperatorError`` with ``retry_after`` while it cannot finish yet; returns when the
        snapshot is Ready or Failed."""
        status = dict(body.get("status") or {})
        if status.get("phase") in (SnapshotPhase.READY, SnapshotPhase.FAILED):
            return
        key, uid = key_of(body), uid_of(body)
        self.holds.claim(uid)  # from here, this process's holds are the truth (instances/holds.py)
        try:
            try:
                spec = IncusInstanceSnapshotSpec.model_validate(dict(body.get("spec") or {}))
            except ValidationError as exc:
                raise refused(Reason.INVALID_SPEC, str(exc.errors()[0]["msg"])) from None
            pinned = (status.get("source") or {}).get("uid")
            subject = await self.subjects.resolve(key[0], spec.instance_ref.name, pinned)
            await self._take(body, status, spec, subject, uid)
        except Refused as exc:
            self.holds.release((key[0], _ref(body)), uid)
            await self.writer.write(
                body, status, {"phase": SnapshotPhase.FAILED}, ("False", exc.problem.reason, exc.problem.message)
            )
            self.post_event(body, "Warning", exc.problem.reason, exc.problem.message)
        except OperatorError as exc:
            phase = status.get("phase") or SnapshotPhase.PENDING
            await self.writer.write(body, status, {"phase": phase}, ("False", exc.problem.reason, exc.problem.message))
            raise
        except TrueNASError as exc:
            problem = problem_of(exc)
            if permanent(exc):
                self.holds.release((key[0], _ref(body)), uid)
                await self.writer.write(
                    body, status, {"phase": SnapshotPhase.FAILED}, ("False", problem.reason, problem.message)
                )
                self.post_event(body, "Warning", problem.reason, problem.message)
                return
            phase = status.get("phase") or SnapshotPhase.PENDING
            await self.writer.write(body, status, {"phase": phase}, ("False", problem.reason, problem.message))
            raise OperatorError(problem, retry_after=RETRY_SECONDS) from None

    async def _take(
        self,
        body: Mapping[str, Any],
        status: dict[str, Any],
        spec: IncusInstanceSnapshotSpec,
        subject: Subject,
        uid: str,
    ) -> None:
        name = snapshot_name(uid)
        snapshots = subject.client.snapshots
        source = {"name": subject.key[1], "uid": subject.uid, "instance": subject.instance}
        if status.get("phase") != SnapshotPhase.CREATING:
            await self.writer.write(
                body, status, {"phase": SnapshotPhase.CREATING, "source": source, "snapshotName": name},
                ("False", Reason.CREATING, f"taking {subject.target.root}@{name}"),
            )  # fmt: skip
        identity = subject.connection.identity
        record = self.ledger.get(identity, ledger_key(subject.instance, name))
        if record is None:
            self._check_policy(subject, uid, await snapshots.of(subject.target))
            record = await self.ledger.claim(
                identity,
                ledger_key(subject.instance, name),
                owner_uid=uid,
                owner=f"{subject.key[0]}/{(body.get('metadata') or {}).get('name')}",
                connection=subject.connection.key,
                state=RecordState.CREATING,
                deletion_policy=str(spec.deletion_policy or SnapshotDeletionPolicy.DELETE),
            )
        existing = next((s for s in await snapshots.of(subject.target) if s.name == name), None)
        if existing is not None and existing.owner != uid:
            raise refused(
                Reason.CONFLICT, f"{subject.target.root}@{name} exists and was not taken for this resource: left alone"
            )
        observed = subject.observed()
        was_running = bool(status.get("wasRunning")) if "wasRunning" in status else (
            observed is not None and observed.status == InstanceStatus.RUNNING
        )  # fmt: skip
        stopped = spec.consistency == Consistency.STOPPED
        if existing is None:
            if stopped:
                await self._stop(body, status, subject, uid, was_running)
                await self.subjects.recheck(subject)  # paused or ObserveOnly during the stop: not taken
            info = await snapshots.take(subject.target, name, owner=uid)
        else:
            info = existing  # taken before a restart: never a second one
        achieved = Consistency.STOPPED if stopped or not was_running else Consistency.CRASH
        await self.ledger.set_state(record, RecordState.CREATED)
        fields = {
            **described(info),
            "phase": SnapshotPhase.READY,
            "source": source,
            "consistency": achieved,
            "truenasVersion": subject.connection.version,
        }
        await self.writer.write(body, status, fields, ("True", Reason.TAKEN, f"{subject.target.root}@{name} taken"))
        self.post_event(body, "Normal", "Taken", f"took {subject.target.root}@{name} ({achieved})")
        if self.on_ready is not None:
            self.on_ready(key_of(body))
        if stopped:
            await self._start_again(subject, uid, was_running)

    def _check_policy(self, subject: Subject, uid: str, listed: list[SnapshotInfo]) -> None:
        """The administrator's policy (policy.py), before anything is claimed or taken."""
        namespace, connection = subject.key[0], subject.connection.key
        violation = self.policy.snapshot_violation(namespace, connection, "snapshot")
        if violation is not None:
            raise refused(Reason.POLICY_DENIED, str(violation))
        label, cap = self.policy.snapshot_cap(namespace, connection)
        if cap is None:
            return
        # The operator's snapshots of this very instance, as TrueNAS lists them (ledger records of an
        # earlier instance of the same name would count against another tenant).
        taken = [s for s in listed if s.owner is not None and s.owner != uid]
        if len(taken) >= cap:
            raise refused(
                Reason.POLICY_DENIED,
                f"{label}: kind IncusInstanceSnapshot: IncusInstance {subject.key[1]} has {len(taken)} snapshots, "
                f"the most the policy allows ({cap})",
            )

    async def _stop(
        self, body: Mapping[str, Any], status: dict[str, Any], subject: Subject, uid: str, was_running: bool
    ) -> None:
        if "wasRunning" not in status:
            await self.writer.write(body, status, {"wasRunning": was_running})
        by = f"{KIND} {(body.get('metadata') or {}).get('name')}"
        self.holds.hold(subject.key, uid, Hold(PowerState.STOPPED, by))
        seconds = subject.desired.stop_timeout + 60.0
        if not await wait_for_state(subject, lambda s: s == InstanceStatus.STOPPED, seconds):
            raise waiting(Reason.STOPPING, f"waiting for the instance {subject.instance!r} to stop")

    async def _start_again(self, subject: Subject, uid: str, was_running: bool) -> None:
        """The instance's loop brings it back as its powerState says; Manual brings it back as it was."""
        if subject.desired.spec.power_state == PowerState.MANUAL and was_running:
            self.holds.hold(subject.key, uid, Hold(PowerState.RUNNING, f"{KIND} restarting it"))
            try:
                await wait_for_state(subject, lambda s: s == InstanceStatus.RUNNING, START_WAIT_SECONDS)
            finally:
                self.holds.release(subject.key, uid)
        else:
            self.holds.release(subject.key, uid)

    # ----- delete -------------------------------------------------------------------------------------
    async def delete(self, body: Mapping[str, Any]) -> None:
        """Deletes the snapshot on TrueNAS (deletionPolicy Delete) and forgets it. Raises
        ``OperatorError`` with ``retry_after`` while it cannot yet (TrueNAS down, a clone depends on it)."""
        key, uid = key_of(body), uid_of(body)
        self.holds.release((key[0], _ref(body)), uid)
        records = self.ledger.owned_by(uid)
        policy = str((body.get("spec") or {}).get("deletionPolicy") or SnapshotDeletionPolicy.DELETE)
        source = (body.get("status") or {}).get("source")
        pinned = str(source.get("uid") or "") if isinstance(source, Mapping) else ""
        stopped = await self.subjects.writes_stopped(key[0], _ref(body), pinned) if records else None
        if stopped == "paused" and policy != SnapshotDeletionPolicy.RETAIN:
            raise waiting(
                Reason.RECONCILIATION_PAUSED,
                f"IncusInstance {_ref(body)} is paused ({PAUSED_ANNOTATION}): the snapshot is deleted once the "
                "annotation is removed",
            )
        for record in records:
            if policy == SnapshotDeletionPolicy.RETAIN or stopped == "observe-only":
                why = "deletionPolicy: Retain" if stopped is None else f"IncusInstance {_ref(body)} is ObserveOnly"
                await self.ledger.release(record)
                self.post_event(body, "Normal", "Retained", f"left {record.instance} on TrueNAS ({why})")
                continue
            connection = await ready_connection(self.connections, record.connection)
            client = connection.client
            if client is None or connection.identity != record.truenas:
                raise waiting(Reason.CONNECTING, f"waiting for the TrueNAS that holds {record.instance}")
            instance, _, name = record.instance.partition("@")
            target = await client.instances.snapshot_target(instance)
            if target is not None:
                await self._no_clones(body, client, target, name, uid, connection.identity)
                try:
                    await client.snapshots.delete(target, name, owner=uid)
                except NotOurs as exc:
                    self.post_event(body, "Warning", "NotOurs", exc.message)
                except CallFailed as exc:
                    problem = problem_of(exc)
                    self.post_event(body, "Warning", Reason.DELETE_FAILED, problem.message)
                    raise waiting(Reason.DELETE_FAILED, problem.message, delay=15.0) from None
            await self.ledger.release(record)
            self.post_event(body, "Normal", "Deleted", f"deleted {record.instance} on TrueNAS")

    async def _no_clones(
        self, body: Mapping[str, Any], client: TrueNASClient, target: SnapshotTarget, name: str, uid: str, identity: str
    ) -> None:
        """A snapshot with clones waits for them (TrueNAS cannot destroy it; the operator never destroys
        nor promotes another instance's disk): phase Deleting, Ready=False HasClones naming them."""
        info = next((s for s in await client.snapshots.of(target) if s.name == name), None)
        if info is None or info.owner != uid:
            return
        clones = await client.snapshots.clones(info)
        if not clones:
            return
        named = clones_named(self.subjects.ledger, identity, clones, key_of(body)[0])
        message = f"{target.root}@{name} has clones: {named}; it is deleted once they are"
        status = dict(body.get("status") or {})
        conditions = {c.get("type"): c for c in status.get("conditions") or [] if isinstance(c, Mapping)}
        if status.get("phase") != SnapshotPhase.DELETING or (conditions.get("Ready") or {}).get("message") != message:
            await self.writer.write(
                body, status, {"phase": SnapshotPhase.DELETING}, ("False", Reason.HAS_CLONES, message)
            )
            self.post_event(body, "Warning", Reason.HAS_CLONES, message)
        raise waiting(Reason.HAS_CLONES, message)


def _ref(body: Mapping[str, Any]) -> str:
    ref = (body.get("spec") or {}).get("instanceRef") or {}
    return str(ref.get("name") or "") if isinstance(ref, Mapping) else ""


def snapshot_holds(body: Mapping[str, Any]) -> dict[tuple[str, str], Hold]:
    """kopf's index of snapshots (handlers.py): one taken stopped that began stopping its instance
    (``wasRunning`` recorded) holds it stopped until it is Ready or Failed, across restarts."""
    status = body.get("status") or {}
    spec = body.get("spec") or {}
    if spec.get("consistency") != Consistency.STOPPED or status.get("phase") != SnapshotPhase.CREATING:
        return {}
    if "wasRunning" not in status:
        return {}
    namespace, name = key_of(body)
    ref = _ref(body)
    return {(namespace, ref): Hold(PowerState.STOPPED, f"{KIND} {name}")} if ref else {}
