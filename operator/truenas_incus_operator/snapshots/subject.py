"""What a snapshot or restore acts on, resolved at one place: the IncusInstance its ``instanceRef``
names (in its own namespace only), the connection that instance uses, and proof from the ownership
ledger that the instance on TrueNAS is that resource's. Status and annotations never count.

Failures are ``OperatorError``: ``Refused`` when retrying cannot help (the resource ends Failed),
otherwise with ``retry_after`` (the resource stays Pending and kopf calls again).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pydantic import ValidationError

from ..connections import Connection, ConnectionManager
from ..instances.ledger import Ledger, RecordState
from ..instances.resource import EventPoster, ResourceKey, connection_key, desired_from, paused
from ..kube import Kube
from ..models import PAUSED_ANNOTATION, Condition
from ..problems import OperatorError, Problem, Reason, fail
from ..reconcile import Desired
from ..status import merge_conditions, previous_conditions, utc_now
from ..truenas import InstanceStatus, ObservedInstance, SnapshotTarget, TrueNASClient

CONNECT_WAIT_SECONDS = 10.0
RETRY_SECONDS = 5.0
START_WAIT_SECONDS = 180.0
"""How long a restore (or a snapshot taken stopped) waits for the instance to run again per attempt."""


class Refused(OperatorError):
    """Retrying cannot help: the resource ends Failed with this problem."""


def refused(reason: Reason, message: str) -> Refused:
    return Refused(Problem(reason, message))


def waiting(reason: Reason, message: str, delay: float = RETRY_SECONDS) -> OperatorError:
    return fail(reason, message, retry_after=delay)


@dataclass(frozen=True)
class Subject:
    """The IncusInstance a snapshot or restore names, proven to own its instance on TrueNAS."""

    key: ResourceKey
    uid: str
    desired: Desired
    connection: Connection
    client: TrueNASClient
    target: SnapshotTarget

    @property
    def instance(self) -> str:
        return self.desired.instance_name

    def observed(self) -> ObservedInstance | None:
        return self.connection.cache.get(self.instance)


def uid_of(body: Mapping[str, Any]) -> str:
    return str((body.get("metadata") or {}).get("uid") or "")


def key_of(body: Mapping[str, Any]) -> ResourceKey:
    meta = body.get("metadata") or {}
    return str(meta.get("namespace") or ""), str(meta.get("name") or "")


async def ready_connection(connections: ConnectionManager, key: str) -> Connection:
    """The connection for ``key`` once it is up (a short wait); else its problem, to retry later."""
    connection = connections.get(key)
    if not connection.ready.is_set():
        try:
            await asyncio.wait_for(connection.ready.wait(), CONNECT_WAIT_SECONDS)
        except TimeoutError:
            problem = connection.problem or Problem(Reason.CONNECTING, "connecting to TrueNAS")
            raise OperatorError(problem, retry_after=RETRY_SECONDS) from None
    return connection


class Subjects:
    def __init__(self, kube: Kube, connections: ConnectionManager, ledger: Ledger) -> None:
        self.kube = kube
        self.connections = connections
        self.ledger = ledger

    async def resolve(self, namespace: str, name: str, pinned_uid: str | None) -> Subject:
        """``pinned_uid``: the UID recorded when the work began; a re-created IncusInstance of the same
        name is another resource, never the one this snapshot or restore is about."""
        body = await self.kube.read_incus_instance(namespace, name)
        if body is None and pinned_uid:
            raise refused(
                Reason.INSTANCE_NOT_FOUND,
                f"IncusInstance {name} (UID {pinned_uid}) was deleted; this resource was about it",
            )
        if body is None:
            raise waiting(Reason.INSTANCE_NOT_FOUND, f"IncusInstance {name} does not exist in namespace {namespace}")
        uid = uid_of(body)
        if pinned_uid and uid != pinned_uid:
            raise refused(
                Reason.INSTANCE_NOT_FOUND,
                f"IncusInstance {name} was deleted and created again (UID {uid}); this resource is about the "
                f"earlier one (UID {pinned_uid})",
            )
        if (body.get("metadata") or {}).get("deletionTimestamp"):
            raise refused(Reason.INSTANCE_NOT_FOUND, f"IncusInstance {name} is being deleted")
        try:
            parsed = desired_from(body)
        except ValidationError:
            raise waiting(Reason.INVALID_SPEC, f"IncusInstance {name} has a spec the operator cannot read") from None
        connection = await ready_connection(self.connections, connection_key(namespace, parsed.spec))
        client = connection.client
        if client is None:
            raise waiting(Reason.CONNECTING, "connecting to TrueNAS")
        record = self.ledger.get(connection.identity, parsed.instance_name)
        if parsed.observe_only or (record is not None and record.owner_uid == uid and record.observed_only):
            raise refused(
                Reason.NOT_OWNER,
                f"IncusInstance {name} only observes its instance (spec.managementPolicy ObserveOnly, or an instance "
                "it observed and did not adopt): a snapshot or restore writes to TrueNAS, so none is made through it",
            )
        if parsed.paused:
            raise waiting(
                Reason.RECONCILIATION_PAUSED,
                f"IncusInstance {name} is paused ({PAUSED_ANNOTATION}): this waits until the annotation is removed",
            )
        if record is not None and record.owner_uid != uid:
            raise refused(
                Reason.NOT_OWNER,
                f"the instance {parsed.instance_name!r} on TrueNAS is not managed by IncusInstance {name}",
            )
        if record is None or record.state == RecordState.CREATING:
            raise waiting(Reason.PENDING, f"IncusInstance {name} has not created its instance yet")
        target = await client.instances.snapshot_target(parsed.instance_name)
        if target is None:
            raise waiting(Reason.INSTANCE_NOT_FOUND, f"the instance {parsed.instance_name!r} does not exist on TrueNAS")
        return Subject((namespace, name), uid, parsed, connection, client, target)

    async def recheck(self, subject: Subject) -> Subject:
        """``resolve`` again, just before the write (a take after the stop, a rollback): a pause or
        ObserveOnly set while the instance stopped stops the write there, not at the next attempt."""
        return await self.resolve(subject.key[0], subject.key[1], subject.uid)

    async def writes_stopped(self, namespace: str, name: str, uid: str | None = None) -> str | None:
        """What keeps the operator from writing to the IncusInstance ``name``'s instance now (its
        ``deletionPolicy`` aside): ``"paused"``, ``"observe-only"``, or None (it is Full, or gone: a
        snapshot of an instance whose resource went is the snapshot's own). Read from the raw body, so
        a spec the models refuse cannot hide either switch."""
        body = await self.kube.read_incus_instance(namespace, name)
        if body is None or (uid and uid_of(body) != uid):
            return None  # gone, or another resource of the name since (``uid``: the one the snapshot was of)
        if paused(body):
            return "paused"
        spec = body.get("spec")
        policy = spec.get("managementPolicy") if isinstance(spec, Mapping) else None
        if policy not in (None, "Full"):
            return "observe-only"  # ObserveOnly, or a value this operator does not know: the safe side
        return None


async def wait_for_state(
    subject: Subject,
    wanted: Callable[[InstanceStatus], bool],
    seconds: float,
    idle: Callable[[], bool] = lambda: True,
) -> bool:
    """Polls the connection's cache (kept fresh by TrueNAS's events and the resync) until the
    instance's state is ``wanted`` and ``idle`` (the instance's loop has no action in flight: 25.04.0
    reports a container STOPPED while its start job runs), then reads it once from TrueNAS to be
    sure. False on timeout."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        observed = subject.observed()
        if observed is not None and wanted(observed.status) and idle():
            fresh = await subject.connection.refresh_one(subject.instance)
            if fresh is not None and wanted(fresh.status):
                return True
        await asyncio.sleep(0.5)
    return False


class StatusWriter:
    """Writes a snapshot's or restore's status (merge patch) and keeps the body's view in step, so a
    later write in the same call sees what the earlier one said."""

    def __init__(self, kube: Kube, plural: str, post_event: EventPoster, clock: Callable[[], datetime] = utc_now):
        self.kube = kube
        self.plural = plural
        self.post_event = post_event
        self.clock = clock

    def now(self) -> str:
        """The writer's clock as Kubernetes writes a time (whole seconds, UTC, ``Z``)."""
        return self.clock().strftime("%Y-%m-%dT%H:%M:%SZ")

    async def write(
        self,
        body: Mapping[str, Any],
        status: dict[str, Any],
        fields: dict[str, Any],
        ready: tuple[str, Reason, str] | None = None,
        plural: str | None = None,
    ) -> None:
        """``plural``: another kind than the writer's own (a restore marks the snapshots it destroyed)."""
        meta = body.get("metadata") or {}
        generation = int(meta.get("generation") or 0)
        patch = dict(fields)
        patch["observedGeneration"] = generation
        if ready is not None:
            conditions = merge_conditions(previous_conditions(status), {"Ready": ready}, generation, self.clock())
            patch["conditions"] = [_wire(c) for c in conditions]
        await self.kube.patch_status(plural or self.plural, str(meta.get("namespace")), str(meta.get("name")), patch)
        status.update(patch)


def _wire(condition: Condition) -> dict[str, Any]:
    return condition.model_dump(mode="json", by_alias=True, exclude_none=True)
