"""IncusInstanceRestore: roll an IncusInstance's datasets back to one of its snapshots, once, in place.
The IncusInstance's spec is never touched (Argo CD stays in sync).

Each step is recorded in the restore's status before it is taken, and the status decides after a
restart (docs/snapshots.md):

- Pending: nothing done. The snapshot is checked (it exists, it is of this instance; newer ones
  are refused, naming them, unless allowDestroyingNewerSnapshots).
- Stopping: the instance is held stopped (instances/holds.py: its own loop stops it). From here
  on, kopf's index of restores holds it stopped across restarts too.
- RollingBack: TrueNAS confirmed it stopped; the rollback is called. A crash here repeats the
  rollback on a stopped instance that never started again: the same data, nothing lost.
- Starting: rolled back; the hold is let go and the instance's loop brings it back to what its
  powerState says (a Manual instance that was running is started again). Never a second rollback.
- Succeeded / Failed: done.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from pydantic import ValidationError

from ..instances.deletion import clones_named
from ..instances.holds import Holds
from ..kube import Kube
from ..metrics import Metrics
from ..models import IncusInstanceRestoreSpec, PowerState, RestorePhase, SnapshotPhase
from ..policy import Policy
from ..problems import OperatorError, Reason, problem_of
from ..reconcile import Hold
from ..truenas import InstanceStatus, TrueNASError
from .subject import (
    RETRY_SECONDS,
    START_WAIT_SECONDS,
    Refused,
    StatusWriter,
    Subject,
    Subjects,
    key_of,
    refused,
    uid_of,
    wait_for_state,
    waiting,
)
from .taking import PLURAL as SNAPSHOTS
from .taking import permanent

log = logging.getLogger(__name__)
PLURAL = "incusinstancerestores"
KIND = "IncusInstanceRestore"
MAX_LISTED_DESTROYED = 100
"""status.destroyedSnapshots names at most this many (destroyedSnapshotCount counts them all)."""
IN_FLIGHT = (RestorePhase.STOPPING, RestorePhase.ROLLING_BACK)
"""Phases in which the instance must stay stopped, whatever else happens (the index holds it)."""


class Cancelled(Exception):
    """The restore was deleted before its rollback: nothing is rolled back, the hold goes."""


def newer_refused(subject: Subject, name: str, newer: list[str], since: str = "") -> Refused:
    return refused(
        Reason.NEWER_SNAPSHOTS,
        f"rolling back to {subject.target.root}@{name} would destroy the newer snapshots {', '.join(newer)}{since}; "
        "set allowDestroyingNewerSnapshots: true to allow it",
    )


class Restorer:
    def __init__(
        self,
        kube: Kube,
        subjects: Subjects,
        holds: Holds,
        writer: StatusWriter,
        post_event: Any,
        policy: Policy | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.policy = policy or Policy()
        self.metrics = metrics
        self.kube = kube
        self.subjects = subjects
        self.holds = holds
        self.writer = writer
        self.post_event = post_event

    async def restore(self, body: Mapping[str, Any]) -> None:
        """Raises ``OperatorError`` with ``retry_after`` while it cannot finish yet; returns when the
        restore Succeeded or Failed."""
        status = dict(body.get("status") or {})
        phase = status.get("phase")
        if phase in (RestorePhase.SUCCEEDED, RestorePhase.FAILED):
            return
        namespace, _ = key_of(body)
        uid = uid_of(body)
        self.holds.claim(uid)  # from here, this process's holds are the truth (instances/holds.py)
        ref = str(((body.get("spec") or {}).get("instanceRef") or {}).get("name") or "")
        try:
            try:
                spec = IncusInstanceRestoreSpec.model_validate(dict(body.get("spec") or {}))
            except ValidationError as exc:
                raise refused(Reason.INVALID_SPEC, str(exc.errors()[0]["msg"])) from None
            pinned = (status.get("source") or {}).get("uid")
            subject = await self.subjects.resolve(namespace, spec.instance_ref.name, pinned)
            await self._restore(body, status, spec, subject, uid)
        except Cancelled as exc:
            self.holds.release((namespace, ref), uid)
            log.info("%s %s was deleted before its rollback: cancelled, nothing rolled back", KIND, exc)
        except Refused as exc:
            await self._fail(body, status, (namespace, ref), uid, exc.problem.reason, exc.problem.message)
        except OperatorError as exc:
            await self._pending(body, status, exc.problem.reason, exc.problem.message)
            raise
        except TrueNASError as exc:
            problem = problem_of(exc)
            if permanent(exc) and status.get("phase") in (None, RestorePhase.PENDING, *IN_FLIGHT):
                # TrueNAS refused (newer snapshots appeared meanwhile, a clone, a hold): asking again is
                # the same, and the instance must not stay stopped for a restore that cannot happen.
                await self._fail(body, status, (namespace, ref), uid, problem.reason, problem.message)
                return
            await self._pending(body, status, problem.reason, problem.message)
            raise OperatorError(problem, retry_after=RETRY_SECONDS) from None

    async def _fail(
        self,
        body: Mapping[str, Any],
        status: dict[str, Any],
        key: tuple[str, str],
        uid: str,
        reason: Reason,
        message: str,
    ) -> None:
        if status.get("phase") == RestorePhase.STOPPING:
            # Stopped for this restore and not rolled back: it goes back to what its spec says.
            message = f"{message}; the instance was not rolled back"
        elif status.get("phase") == RestorePhase.ROLLING_BACK:
            message = (
                f"{message}; the rollback did not finish (check the datasets on TrueNAS); the instance goes "
                "back to its powerState"
            )
        self.holds.release(key, uid)
        fields = {"phase": RestorePhase.FAILED, "completionTime": self.writer.now()}
        await self.writer.write(body, status, fields, ("False", reason, message))
        self.post_event(body, "Warning", reason, message)

    async def _pending(self, body: Mapping[str, Any], status: dict[str, Any], reason: Reason, message: str) -> None:
        phase = status.get("phase") or RestorePhase.PENDING
        await self.writer.write(body, status, {"phase": phase}, ("False", reason, message))

    async def _snapshot_name(self, namespace: str, spec: IncusInstanceRestoreSpec, subject: Subject) -> str:
        if spec.truenas_snapshot is not None:
            return spec.truenas_snapshot
        assert spec.snapshot_ref is not None
        name = spec.snapshot_ref.name
        snapshot = await self.kube.read_object(SNAPSHOTS, namespace, name)
        if snapshot is None:
            raise waiting(Reason.SNAPSHOT_NOT_FOUND, f"IncusInstanceSnapshot {name} does not exist in {namespace}")
        found = dict(snapshot.get("status") or {})
        source = found.get("source") or {}
        if source.get("uid") not in (None, subject.uid):
            raise refused(
                Reason.SNAPSHOT_NOT_FOUND,
                f"IncusInstanceSnapshot {name} is of another instance than IncusInstance {subject.key[1]}",
            )
        if found.get("phase") == SnapshotPhase.FAILED:
            raise refused(Reason.SNAPSHOT_NOT_FOUND, f"IncusInstanceSnapshot {name} failed; nothing to restore")
        if found.get("phase") != SnapshotPhase.READY or not found.get("snapshotName"):
            raise waiting(Reason.PENDING, f"waiting for IncusInstanceSnapshot {name} to be Ready")
        return str(found["snapshotName"])

    async def _restore(
        self,
        body: Mapping[str, Any],
        status: dict[str, Any],
        spec: IncusInstanceRestoreSpec,
        subject: Subject,
        uid: str,
    ) -> None:
        namespace = subject.key[0]
        me = f"{KIND} {(body.get('metadata') or {}).get('name')}"
        phase = status.get("phase") or RestorePhase.PENDING
        snapshots = subject.client.snapshots
        name = str(status.get("snapshotName") or "") or await self._snapshot_name(namespace, spec, subject)
        if phase == RestorePhase.PENDING:
            violation = self.policy.snapshot_violation(namespace, subject.connection.key, "restore")
            if violation is not None:
                raise refused(Reason.POLICY_DENIED, str(violation))
            listed = await snapshots.of(subject.target)
            chosen = next((s for s in listed if s.name == name), None)
            if chosen is None:
                raise refused(Reason.SNAPSHOT_NOT_FOUND, f"{subject.target.root}@{name} does not exist on TrueNAS")
            newer = [f"{subject.target.root}@{s.name}" for s in listed if s.txg > chosen.txg]
            if newer and not spec.allow_destroying_newer_snapshots:
                raise newer_refused(subject, name, newer)
            for later in (s for s in listed if s.txg > chosen.txg):
                clones = await snapshots.clones(later)
                if clones:  # ZFS would refuse the rollback; refused here, before anything is stopped
                    named = clones_named(self.subjects.ledger, subject.connection.identity, clones, namespace)
                    raise refused(
                        Reason.HAS_CLONES,
                        f"rolling back to {subject.target.root}@{name} would destroy "
                        f"{subject.target.root}@{later.name}, which has clones: {named}; "
                        "the operator never destroys another instance's disk: delete the clones first",
                    )
        if phase == RestorePhase.PENDING:
            observed = subject.observed()
            fields = {
                "phase": RestorePhase.STOPPING,
                "source": {"name": subject.key[1], "uid": subject.uid, "instance": subject.instance},
                "snapshotName": name,
                "wasRunning": observed is not None and observed.status == InstanceStatus.RUNNING,
                "startTime": self.writer.now(),
            }
            await self.writer.write(body, status, fields, ("False", Reason.STOPPING, f"stopping {subject.instance}"))
            phase = RestorePhase.STOPPING
        if phase in IN_FLIGHT:
            self.holds.hold(subject.key, uid, Hold(PowerState.STOPPED, me))
            seconds = subject.desired.stop_timeout + 60.0
            stopped = await wait_for_state(
                subject, lambda s: s == InstanceStatus.STOPPED, seconds, idle=lambda: not self.holds.acting(subject.key)
            )
            if not stopped:
                raise waiting(Reason.STOPPING, f"waiting for the instance {subject.instance!r} to stop")
            listed = await snapshots.of(subject.target)
            chosen = next((s for s in listed if s.name == name), None)
            if chosen is None:
                raise refused(Reason.SNAPSHOT_NOT_FOUND, f"{subject.target.root}@{name} does not exist on TrueNAS")
            doomed = [f"{subject.target.root}@{s.name}" for s in listed if s.txg > chosen.txg]
            if doomed and not spec.allow_destroying_newer_snapshots and phase == RestorePhase.STOPPING:
                # Taken since the check at Pending (a snapshot applied with the restore, a periodic task).
                raise newer_refused(subject, name, doomed, since=", taken since the restore began")
            await self._still_wanted(body)
            await self.subjects.recheck(subject)  # paused or ObserveOnly during the stop: no rollback
            recorded = list(status.get("destroyedSnapshots") or [])
            every = sorted({*recorded, *doomed})
            fields = {
                "phase": RestorePhase.ROLLING_BACK,
                "destroyedSnapshots": every[:MAX_LISTED_DESTROYED],
                "destroyedSnapshotCount": max(len(every), int(status.get("destroyedSnapshotCount") or 0)),
            }
            await self.writer.write(body, status, fields, ("False", Reason.ROLLING_BACK, f"rolling back to {name}"))
            await snapshots.rollback(subject.target, name, destroy_newer=bool(spec.allow_destroying_newer_snapshots))
            await self.writer.write(
                body, status, {"phase": RestorePhase.STARTING},
                ("False", Reason.STARTING, f"rolled back to {name}; bringing the instance back"),
            )  # fmt: skip
            self.post_event(
                body, "Normal", "RolledBack", f"rolled {subject.instance} back to {subject.target.root}@{name}"
            )
            await self._report_destroyed(namespace, subject, list(status.get("destroyedSnapshots") or []))
            phase = RestorePhase.STARTING
        # Starting: never a rollback again from here.
        await self._bring_back(subject, uid, bool(status.get("wasRunning")))
        fields = {"phase": RestorePhase.SUCCEEDED, "completionTime": self.writer.now()}
        self._measure(str(status.get("startTime") or ""))
        message = f"{subject.instance} restored to {subject.target.root}@{name}"
        await self.writer.write(body, status, fields, ("True", Reason.RESTORED, message))
        self.post_event(body, "Normal", "Restored", message)

    async def _still_wanted(self, body: Mapping[str, Any]) -> None:
        """Read again just before the rollback: a restore deleted meanwhile is cancelled, never carried
        out (kopf brings its deletion only after this handler returns)."""
        namespace, name = key_of(body)
        current = await self.kube.read_object(PLURAL, namespace, name)
        meta = (current or {}).get("metadata") or {}
        if current is None or meta.get("uid") != uid_of(body) or meta.get("deletionTimestamp"):
            raise Cancelled(f"{namespace}/{name}")

    def _measure(self, started: str) -> None:
        """tio_restore_seconds, from the recorded start (so a restore a restart interrupted counts whole)."""
        if self.metrics is None or not started:
            return
        try:
            begun = datetime.fromisoformat(started)
        except ValueError:
            return
        self.metrics.restore_seconds.observe(max(0.0, (self.writer.clock() - begun).total_seconds()))

    async def _bring_back(self, subject: Subject, uid: str, was_running: bool) -> None:
        power = subject.desired.spec.power_state or PowerState.RUNNING
        if power == PowerState.MANUAL:
            if not was_running:
                self.holds.release(subject.key, uid)
                return
            self.holds.hold(subject.key, uid, Hold(PowerState.RUNNING, f"{KIND} restarting it"))
            power = PowerState.RUNNING
        else:
            self.holds.release(subject.key, uid)
        wanted = InstanceStatus.RUNNING if power == PowerState.RUNNING else InstanceStatus.STOPPED
        try:
            if not await wait_for_state(subject, lambda s: s == wanted, START_WAIT_SECONDS):
                raise waiting(Reason.STARTING, f"waiting for the instance {subject.instance!r} to be {wanted}")
        finally:
            self.holds.release(subject.key, uid)

    async def _report_destroyed(self, namespace: str, subject: Subject, destroyed: list[str]) -> None:
        """IncusInstanceSnapshots whose ZFS snapshot the rollback destroyed say so (Failed, Gone)."""
        if not destroyed:
            return
        names = {d.rpartition("@")[2] for d in destroyed}
        for item in await self.kube.list_objects(SNAPSHOTS, namespace):
            found = item.get("status") or {}
            if (found.get("source") or {}).get("uid") != subject.uid or found.get("snapshotName") not in names:
                continue
            message = (
                f"{subject.target.root}@{found.get('snapshotName')} was destroyed by a restore to an older snapshot"
            )
            fields = {"phase": SnapshotPhase.FAILED}
            await self.writer.write(item, dict(found), fields, ("False", Reason.GONE, message), plural=SNAPSHOTS)


def restore_holds(body: Mapping[str, Any]) -> dict[tuple[str, str], Hold]:
    """kopf's index of restores (handlers.py): a restore stopping or rolling back holds its instance
    stopped, from the operator's first moment after a restart."""
    status = body.get("status") or {}
    if status.get("phase") not in IN_FLIGHT:
        return {}
    namespace, name = key_of(body)
    ref = ((body.get("spec") or {}).get("instanceRef") or {}).get("name")
    return {(namespace, str(ref)): Hold(PowerState.STOPPED, f"{KIND} {name}")} if ref else {}
