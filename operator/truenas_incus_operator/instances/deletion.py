"""Deleting an IncusInstance: stop and delete the instances the ledger says it owns (or leave them,
with ``deletionPolicy: Orphan``), then release the ledger records. kopf keeps the finalizer until
this succeeds. A resource that owns nothing is done at once, whatever state its connection is in.
spec.snapshots's periodic snapshot task goes before its instance (instances/schedules.py)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from ..connections import Connection, ConnectionManager
from ..models import PAUSED_ANNOTATION, Phase
from ..problems import OperatorError, Problem, Reason, fail, problem_of
from ..reconcile import Delete, Desired, Ownership, plan_delete
from ..settings import Settings
from ..truenas import APIUnavailable, NotFound, TrueNASError
from ..truenas.backends.snapshots import parses
from ..truenas.backends.vm import instance_of_dataset
from .executor import Executor, WritesStopped
from .exposure import Exposer, had_exposure
from .ledger import Ledger, Record, RecordState
from .reporter import Reporter, backoff_delay
from .resource import LoopState, ResourceKey, about, deletion_view, paused, resource_key, writes_stopped_since
from .schedules import Schedules, naming_schema

log = logging.getLogger(__name__)
CONNECT_WAIT_SECONDS = 10.0
DELETE_ATTEMPTS = 4
PAUSE_RECHECK_SECONDS = 5.0
"""How often a paused resource's deletion looks at the annotation again."""


def clones_named(ledger: Ledger, identity: str, clones: list[str], namespace: str) -> str:
    """The clones of a snapshot as a message in ``namespace`` names them: the IncusInstance whose disk
    each is, where the ownership ledger gives it to a resource of that namespace; else the dataset
    alone (a clone made outside the operator, or another namespace's: never named to this one)."""
    named = []
    for dataset in clones:
        instance = instance_of_dataset(dataset)
        record = ledger.get(identity, instance) if instance is not None else None
        if record is not None and record.owner.partition("/")[0] == namespace:
            named.append(f"IncusInstance {record.owner} ({dataset})")
        else:
            named.append(dataset)
    return ", ".join(named)


class Deletion:
    def __init__(
        self,
        settings: Settings,
        connections: ConnectionManager,
        ledger: Ledger,
        reporter: Reporter,
        executor: Executor,
        schedules: Schedules | None = None,
        exposer: Exposer | None = None,
    ) -> None:
        self.settings = settings
        self.exposer = exposer
        """spec.expose's Service and slices go first (no garbage collector may run: the operator deletes them)."""
        self.connections = connections
        self.ledger = ledger
        self.reporter = reporter
        self.executor = executor
        self.schedules = schedules
        self._posted: dict[ResourceKey, LoopState] = {}
        """Per resource being deleted: which problem was posted last (one Event per distinct problem)."""

    def forget(self, key: ResourceKey) -> None:
        self._posted.pop(key, None)

    async def delete(self, body: Mapping[str, Any], retry: int) -> None:
        """Raises ``OperatorError`` (with ``retry_after``) when deletion cannot finish yet."""
        desired = deletion_view(body)
        key = resource_key(body)
        state = LoopState(status=dict(body.get("status") or {}))
        version = None
        try:
            if key in self.executor.creating:
                raise fail(Reason.CREATE_IN_PROGRESS, f"{desired.instance_name} is being created", retry_after=1.0)
            await self._unexpose(body, desired, state)
            records = self.ledger.owned_by(desired.uid)
            for record in [r for r in records if r.observed_only]:
                # Observed, never owned: the record goes, the instance is never touched.
                await self.ledger.release(record)
                self.reporter.post_event(body, "Normal", "Released", f"stopped observing {record.instance} on TrueNAS")
            records = [r for r in records if not r.observed_only]
            orphan = desired.deletion_policy == "Orphan"
            if records and not orphan and paused(body):
                await self._wait_for_resume(body, key, state, desired)
            if not records:
                if self.schedules is not None:
                    await self.schedules.forget_owner(body, desired.uid, orphan)
                self.forget(key)
                return  # it never created nor adopted anything: nothing to do on TrueNAS
            if orphan:
                for record in records:
                    await self.ledger.release(record)
                    self.reporter.post_event(
                        body, "Normal", "Orphaned", f"left {record.instance} on TrueNAS (deletionPolicy: Orphan)"
                    )
                if self.schedules is not None:
                    await self.schedules.forget_owner(body, desired.uid, orphan)
                self.forget(key)
                return
            for record in records:
                connection = await self._connection(record.connection)
                version = connection.version
                if record.truenas == connection.config.identity != connection.identity:
                    await self.ledger.migrate(connection.config.identity, connection.identity)
                    moved = self.ledger.get(connection.identity, record.instance)
                    record = moved if moved is not None and moved.owner_uid == record.owner_uid else record
                if record.truenas != connection.identity:
                    raise fail(
                        Reason.DELETE_FAILED,
                        f"this resource owns {record.instance!r} on {record.truenas}, but its connection now reaches "
                        f"{connection.identity}; restore the connection's URL to delete it",
                    )
                await self._delete_one(body, state, desired, connection, record)
                self.reporter.post_event(body, "Normal", "Deleted", f"deleted {record.instance} on TrueNAS")
            if self.schedules is not None:
                await self.schedules.forget_owner(body, desired.uid, orphan)
            self.forget(key)
            return
        except OperatorError as exc:
            if exc.retry_after is not None:
                raise  # waiting for something that will end by itself (a create in flight): no report
            problem = exc.problem
        except TrueNASError as exc:
            reason = problem_of(exc)
            problem = Problem(Reason.DELETE_FAILED, f"{reason.reason}: {reason.message}")
        delay = backoff_delay(self.settings, retry)
        with contextlib.suppress(OperatorError):  # the status is a report; deletion goes on either way
            # Nothing was observed here (None is "not looked at", not "gone"): the status keeps what it saw.
            await self.reporter.write(state, desired, None, problem=problem, version=version, connected=False)
        self.reporter.post_once(body, self._posted.setdefault(key, state), "Warning", problem.reason, problem.message)
        raise OperatorError(problem, retry_after=delay)

    async def _unexpose(self, body: Mapping[str, Any], desired: Desired, state: LoopState) -> None:
        """spec.expose's Service and slices go first, best effort: a failure (the operator's RBAC lacks
        services there, a webhook refuses) never holds the deletion; it is logged and said once, and the
        owner references let a garbage collector finish."""
        if self.exposer is None or not ((body.get("spec") or {}).get("expose") or had_exposure(state.status)):
            return
        try:
            await self.exposer.remove(desired.namespace, desired.name, desired.uid)
        except OperatorError as exc:
            log.warning("spec.expose: %s", exc.problem.message, extra=about(desired.namespace, desired.name))
            message = (
                f"the Service {desired.name} could not be removed ({exc.problem.message}); its owner reference "
                "lets the garbage collector remove it"
            )
            self.reporter.post_once(
                body, self._posted.setdefault(resource_key(body), state), "Warning", "ExposeFailed", message
            )

    async def _still_to_delete(self, body: Mapping[str, Any], desired: Desired) -> None:
        """The resource read again before each step of the deletion (a stop can take an hour): a pause,
        ObserveOnly or Orphan set meanwhile stops it there; the next attempt does what they say."""
        meta = body.get("metadata") or {}
        current = await self.reporter.kube.read_incus_instance(str(meta.get("namespace")), str(meta.get("name")))
        if current is None or (current.get("metadata") or {}).get("uid") != desired.uid:
            return  # gone already (the finalizer is kopf's): nothing new to read
        if writes_stopped_since(desired, current) or deletion_view(current).deletion_policy != desired.deletion_policy:
            raise self._switched()

    @staticmethod
    def _switched() -> OperatorError:
        return fail(
            Reason.RECONCILIATION_PAUSED,
            "the resource was paused, or switched to ObserveOnly or Orphan, during its deletion: looking again",
            retry_after=1.0,
        )

    async def _wait_for_resume(
        self, body: Mapping[str, Any], key: ResourceKey, state: LoopState, desired: Desired
    ) -> None:
        """A paused resource's instance is not deleted: the deletion waits, said in the status and one
        Event, and looks again every few seconds (removing the annotation, or deletionPolicy Orphan, ends it)."""
        problem = Problem(
            Reason.RECONCILIATION_PAUSED,
            f"the deletion waits: {PAUSED_ANNOTATION} is set, so the operator does not delete "
            f"{desired.instance_name} on TrueNAS; remove the annotation to delete it, or set "
            "spec.deletionPolicy Orphan to leave it",
        )
        with contextlib.suppress(OperatorError):
            await self.reporter.write(state, desired, None, problem=problem, connected=False)
        self.reporter.post_once(body, self._posted.setdefault(key, state), "Normal", problem.reason, problem.message)
        raise OperatorError(problem, retry_after=PAUSE_RECHECK_SECONDS)

    async def _connection(self, key: str) -> Connection:
        """The connection the owner used when it claimed the instance (recorded in the ledger)."""
        connection = self.connections.get(key)
        if not connection.ready.is_set():
            try:
                await asyncio.wait_for(connection.ready.wait(), CONNECT_WAIT_SECONDS)
            except TimeoutError:
                problem = connection.problem or Problem(Reason.UNREACHABLE, "TrueNAS is not connected")
                raise OperatorError(problem) from None
        return connection

    async def _delete_one(
        self, body: Mapping[str, Any], state: LoopState, desired: Desired, connection: Connection, record: Record
    ) -> None:
        fresh = await self.ledger.reread(record.truenas, record.instance)
        if fresh is None or fresh.owner_uid != desired.uid:
            return  # not (or no longer) ours: never touch it
        await self._refuse_if_cloned(connection, fresh.instance, desired.uid, desired.namespace)
        if self.schedules is not None:
            # The periodic snapshot task first: it would run on a vanished dataset (its snapshots go
            # with the operator's own, just before the instance).
            self.executor.fence.check()
            await self.schedules.before_delete(body, connection, fresh.instance, desired.uid)
        # The instance the record names (spec.name cannot change once it exists).
        ours = replace(
            desired, spec=desired.spec.model_copy(update={"name": fresh.instance}), ownership=Ownership(mine=True)
        )
        waited: str | None = None
        for _ in range(DELETE_ATTEMPTS):
            observed = await connection.refresh_one(fresh.instance)
            current = plan_delete(ours, observed)
            if current.waiting:
                waited = current.waiting
                await asyncio.sleep(1)
                continue
            waited = None
            if not current.actions:
                client = connection.client
                if (
                    observed is None
                    and fresh.state == RecordState.CREATING
                    and client is not None
                    and await client.instances.create_in_progress(fresh.instance)
                ):
                    # Started before a crash: it would leave an instance behind once it ends.
                    raise fail(
                        Reason.CREATE_IN_PROGRESS,
                        f"a create job for {fresh.instance} is still running",
                        retry_after=2.0,
                    )
                if observed is None and fresh.state == RecordState.CREATING and client is not None:
                    # Its create never finished: what it made before the instance existed goes too.
                    self.executor.fence.check()
                    await client.instances.discard_unfinished(fresh.instance)
                await self.ledger.release(fresh)
                return
            await self.reporter.write(state, ours, observed, activity=Phase.DELETING, version=connection.version)
            if any(isinstance(a, Delete) for a in current.actions):
                await self._drop_snapshots(connection, fresh.instance, desired.uid)
            for action in current.actions:
                await self._still_to_delete(body, ours)
                try:
                    await self.executor.execute(body, state, ours, connection, observed, action)
                except NotFound:
                    connection.remember_gone(fresh.instance)
                except WritesStopped:
                    raise self._switched() from None
        if waited is not None:
            # Nothing was deleted: TrueNAS was busy with the instance the whole time.
            raise fail(Reason.DELETE_FAILED, f"waiting to delete the instance: {waited}; will retry")
        raise fail(Reason.DELETE_FAILED, "the instance is still there after deleting it")

    async def _ours(self, connection: Connection, instance: str, uid: str) -> tuple[Any, list[Any]]:
        """The instance's snapshot target and the operator's own snapshots of it (IncusInstanceSnapshots:
        they carry the owner property; spec.snapshots's task: its naming schema, the resource's ``uid``'s)."""
        client = connection.client
        if client is None:
            return None, []
        target = await client.instances.snapshot_target(instance)
        if target is None:
            return None, []
        try:
            found = await client.snapshots.of(target)
        except APIUnavailable:
            # REST (25.x only) has no snapshot calls: the operator took none over it, and Incus
            # destroys an instance's datasets with their snapshots on 25.x.
            return target, []
        schema = naming_schema(uid)
        return target, [s for s in found if s.owner is not None or parses(s.name, schema)]

    async def _refuse_if_cloned(self, connection: Connection, instance: str, uid: str, namespace: str) -> None:
        """Before anything (the schedule's task, a stop, a snapshot) goes: while one of the operator's
        snapshots of the instance has clones, the instance stays whole and the deletion waits."""
        target, ours = await self._ours(connection, instance, uid)
        client = connection.client
        for snapshot in ours:
            clones = await client.snapshots.clones(snapshot) if client is not None else []
            if clones:
                named = clones_named(self.ledger, connection.identity, clones, namespace)
                raise fail(
                    Reason.HAS_CLONES,
                    f"{target.root}@{snapshot.name} has clones: {named}; "
                    "the instance is deleted once they are (the operator never destroys or promotes another "
                    "instance's disk)",
                )

    async def _drop_snapshots(self, connection: Connection, instance: str, uid: str) -> None:
        """The operator's own snapshots of the instance go before the instance: ZFS destroys a dataset's
        snapshots with it, and TrueNAS 26's container.delete refuses a dataset that has any
        (docs/snapshots.md). Snapshots someone else took are left: where they block the delete,
        TrueNAS's refusal is reported (a clone made since ``_refuse_if_cloned``: refused by ZFS)."""
        target, ours = await self._ours(connection, instance, uid)
        client = connection.client
        if client is None:
            return
        snapshots = client.snapshots
        schema = naming_schema(uid)
        for snapshot in ours:
            if snapshot.owner is not None:
                self.executor.fence.check()
                await snapshots.delete(target, snapshot.name, owner=snapshot.owner)
            elif parses(snapshot.name, schema):
                self.executor.fence.check()
                await snapshots.delete_scheduled(target, snapshot.name, schema)
