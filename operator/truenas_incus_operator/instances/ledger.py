"""The ownership ledger: which IncusInstance (by UID) owns which instance on which TrueNAS.

One ConfigMap per owned instance, in the operator's own namespace, where tenants cannot write:
named after a hash of (TrueNAS identity, instance name), so the API server itself refuses a second
owner (409 on create). Written before the create call (crash safety: never a second create, never
someone else's instance), checked before every write and every delete, read back at startup
(durable across restarts). Annotations and status never count: tenants write those.

The TrueNAS identity is what the NAS says about itself (``system.global.id``, as ``nas-<uuid>``):
every connection that reaches one NAS, by whatever URL spelling, shares one ledger entry per
instance name. Records an earlier version keyed by the URL's ``host:port`` are moved on the first
connect through that address (``migrate``).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

from ..connections import truenas_identity
from ..kube import Kube
from ..models import API_GROUP
from ..problems import OperatorError, Reason, fail

log = logging.getLogger(__name__)
LEDGER_LABEL = f"{API_GROUP}/ownership"
SNAPSHOT_LEDGER_LABEL = f"{API_GROUP}/snapshot-ownership"
"""Snapshots' records (``instance@snapshot``) are a ledger of their own: the instance ledger, its
reaper and its ownership rules never see them."""
SCHEDULE_LEDGER_LABEL = f"{API_GROUP}/schedule-ownership"
"""Periodic snapshot tasks' records (``schedule_key``: one per instance, with the task's id): a third
ledger, so that a task the operator did not create is never taken for one it did."""
CLAIM_ATTEMPTS = 5

__all__ = [
    "LEDGER_LABEL",
    "SCHEDULE_LEDGER_LABEL",
    "SNAPSHOT_LEDGER_LABEL",
    "Ledger",
    "Record",
    "RecordState",
    "describe_holder",
    "record_name",
    "schedule_key",
    "truenas_identity",
]


def schedule_key(instance: str) -> str:
    """The schedule ledger's key of an instance's periodic snapshot task ('#' is in no instance name,
    so no record name is another ledger's)."""
    return f"{instance}#schedule"


def record_name(truenas: str, instance: str) -> str:
    digest = hashlib.sha256(f"{truenas}\n{instance}".encode()).hexdigest()[:40]
    return f"tio-owner-{digest}"


class RecordState(StrEnum):
    CREATING = "creating"
    """Claimed before the create call; the create may not have finished."""
    CREATED = "created"
    ADOPTED = "adopted"
    """Taken over (``incus.truenas.io/adopt``): the operator did not create it and never re-creates it."""
    OBSERVED = "observed"
    """Observed for an ObserveOnly resource that did not create it: never written to, never deleted
    (not by the resource's deletion, not by the reaper); a second resource cannot observe or take it.
    An earlier version reads an unknown state as created (``_state``): downgrading below the version
    that wrote it needs those resources deleted first (docs/security.md)."""


@dataclass(frozen=True)
class Record:
    truenas: str
    instance: str
    owner_uid: str
    owner: str
    """``namespace/name`` of the owning IncusInstance (for messages; the UID decides)."""
    connection: str
    """The connection key the owner used (``<default>`` or ``namespace/name``)."""
    state: RecordState
    devices_managed: bool = False
    """Set once the operator applied the spec's devices to an adopted instance."""
    deletion_policy: str = ""
    """The owner's spec.deletionPolicy as last seen (Delete or Orphan; empty: not known, a record of
    an earlier version): what a reaped record's instance gets when its resource vanished."""
    joins: int = 0
    """How many times another actor of the same owner found this record on its own claim (409)."""
    task_id: int | None = None
    """The schedule ledger's: the id of the periodic snapshot task the operator created (None while
    ``creating``: the create call may not have returned)."""
    resource_version: str = ""
    fresh: bool = field(default=False, compare=False)
    """Created by the claim that returned it (never read back from the API server)."""

    @property
    def manages_devices(self) -> bool:
        return self.state in (RecordState.CREATING, RecordState.CREATED) or self.devices_managed

    @property
    def observed_only(self) -> bool:
        return self.state == RecordState.OBSERVED

    @property
    def name(self) -> str:
        return record_name(self.truenas, self.instance)

    def manifest(self, namespace: str, label: str = LEDGER_LABEL) -> dict[str, Any]:
        metadata: dict[str, Any] = {
            "name": self.name,
            "namespace": namespace,
            "labels": {label: "true", "app.kubernetes.io/managed-by": "truenas-incus-operator"},
        }
        if self.resource_version:
            metadata["resourceVersion"] = self.resource_version
        return {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": metadata,
            "data": {
                "truenas": self.truenas,
                "instance": self.instance,
                "ownerUID": self.owner_uid,
                "owner": self.owner,
                "connection": self.connection,
                "state": self.state,
                **({"devices": "managed"} if self.devices_managed else {}),
                **({"deletionPolicy": self.deletion_policy} if self.deletion_policy else {}),
                **({"joins": str(self.joins)} if self.joins else {}),
                **({"taskId": str(self.task_id)} if self.task_id is not None else {}),
            },
        }

    @classmethod
    def from_manifest(cls, body: dict[str, Any]) -> Record | None:
        data = body.get("data") or {}
        try:
            record = cls(
                truenas=data["truenas"],
                instance=data["instance"],
                owner_uid=data["ownerUID"],
                owner=data["owner"],
                connection=data.get("connection", ""),
                state=_state(data.get("state")),
                devices_managed=data.get("devices") == "managed",
                deletion_policy=str(data.get("deletionPolicy") or ""),
                joins=int(joins) if (joins := str(data.get("joins", "0"))).isdigit() else 0,
                task_id=int(task) if (task := str(data.get("taskId", ""))).isdigit() else None,
                resource_version=str(body.get("metadata", {}).get("resourceVersion", "")),
            )
        except KeyError:
            return None
        return record if record.name == body.get("metadata", {}).get("name") else None


class Ledger:
    def __init__(self, kube: Kube, namespace: str, label: str = LEDGER_LABEL) -> None:
        self.kube = kube
        self.namespace = namespace
        self.label = label
        self.records: dict[tuple[str, str], Record] = {}
        """By (TrueNAS, instance); read freely, changed only through ``remember`` / ``_forget``."""
        self._by_owner: dict[str, dict[tuple[str, str], Record]] = {}
        """The same records by owner UID: every loop asks for its own at every pass (O(1), not O(N))."""
        self._migrated: set[tuple[str, str]] = set()

    def remember(self, record: Record) -> None:
        key = (record.truenas, record.instance)
        self._forget(key)
        self.records[key] = record
        self._by_owner.setdefault(record.owner_uid, {})[key] = record

    def _forget(self, key: tuple[str, str]) -> None:
        old = self.records.pop(key, None)
        if old is None:
            return
        owned = self._by_owner.get(old.owner_uid)
        if owned is not None:
            owned.pop(key, None)
            if not owned:
                del self._by_owner[old.owner_uid]

    async def load(self) -> None:
        """Reads every record (at startup, before any loop acts)."""
        items = await self.kube.list_configmaps(self.namespace, f"{self.label}=true")
        records = [r for r in (Record.from_manifest(item) for item in items) if r is not None]
        self.records, self._by_owner = {}, {}
        for record in records:
            self.remember(record)
        log.info("ownership ledger (%s): %d records in namespace %s", self.label, len(self.records), self.namespace)

    async def migrate(self, address: str, nas: str) -> None:
        """Moves the records an earlier version keyed by the connection's address (``host:port``) to
        the NAS's own identity, once per (address, NAS) in this process. The address reached this
        NAS when the record was written (the only NAS it reached from here), so the record is this
        NAS's. A record already under the NAS's identity for the same instance wins: a different
        owner there is logged and the old record left (it then blocks nothing new; see
        docs/security.md)."""
        if address == nas or (address, nas) in self._migrated:
            return
        for old in [r for r in self.records.values() if r.truenas == address]:
            moved = replace(old, truenas=nas, resource_version="", fresh=False)
            created = await self.kube.create_configmap(self.namespace, moved.manifest(self.namespace, self.label))
            if created is None:
                held = await self.reread(nas, old.instance)
                if held is None or held.owner_uid != old.owner_uid:
                    log.warning(
                        "ownership ledger: %s on %s has another owner under %s; record %s left as it is",
                        old.instance, address, nas, old.name,
                    )  # fmt: skip
                    continue
            else:
                self.remember(Record.from_manifest(created) or moved)
            await self.release(old)
            log.info("ownership ledger: %s moved from %s to %s", old.instance, address, nas)
        self._migrated.add((address, nas))

    def get(self, truenas: str, instance: str) -> Record | None:
        return self.records.get((truenas, instance))

    def owned_by(self, owner_uid: str) -> list[Record]:
        return list(self._by_owner.get(owner_uid, {}).values())

    async def claim(
        self,
        truenas: str,
        instance: str,
        *,
        owner_uid: str,
        owner: str,
        connection: str,
        state: RecordState,
        deletion_policy: str = "",
    ) -> Record:
        """Records ``owner_uid`` as the owner; raises ``OperatorError`` (Conflict) if another holds it.

        The record returned is ``fresh`` only when this call created it. A 409 from the same UID (a
        second actor for the same resource: another operator without an election, or this one
        before a restart) is no fresh claim: this call *joins* the record (bumps ``joins``, so the
        creator can no longer release it) and the caller re-plans as owned and unfinished."""
        wanted = Record(truenas, instance, owner_uid, owner, connection, state, deletion_policy=deletion_policy)
        for _ in range(CLAIM_ATTEMPTS):
            created = await self.kube.create_configmap(self.namespace, wanted.manifest(self.namespace, self.label))
            if created is not None:
                record = replace(Record.from_manifest(created) or wanted, fresh=True)
                self.remember(record)
                return record
            held = await self.reread(truenas, instance)
            if held is None:
                continue  # released between our create and our read: try again
            if held.owner_uid != owner_uid:
                raise fail(
                    Reason.CONFLICT, f"the instance {instance!r} is already managed by {describe_holder(held, owner)}"
                )
            joined = await self.join(held)
            if joined is None:
                continue  # released or taken meanwhile: try again
            return joined
        raise fail(Reason.CONFLICT, f"the ownership record of {instance!r} kept changing; will retry")

    async def join(self, record: Record) -> Record | None:
        """Marks ``record`` as joined by one more actor of its owner (bumps ``joins``): done before
        every create call that did not claim the record itself (a record read at startup, an
        earlier pass's), so the actor that did claim it can no longer release it (its release is
        conditional on the version it created). None when the record is gone or held by another
        owner now: the caller plans again."""
        current: Record | None = record
        for _ in range(CLAIM_ATTEMPTS):
            if current is None or current.owner_uid != record.owner_uid:
                return None
            joined = await self.kube.replace_configmap(
                self.namespace, replace(current, joins=current.joins + 1).manifest(self.namespace, self.label)
            )
            if joined is not None:
                fresh = Record.from_manifest(joined) or replace(current, joins=current.joins + 1)
                self.remember(fresh)
                return fresh
            current = await self.reread(record.truenas, record.instance)
        raise fail(Reason.CONFLICT, f"the ownership record of {record.instance!r} kept changing; will retry")

    async def set_state(self, record: Record, state: RecordState) -> Record:
        return await self._update(record, lambda r: replace(r, state=state))

    async def set_deletion_policy(self, record: Record, policy: str) -> Record:
        return await self._update(record, lambda r: replace(r, deletion_policy=policy))

    async def set_task(self, record: Record, task_id: int) -> Record:
        """Records the periodic snapshot task the operator created (the schedule ledger's records)."""
        return await self._update(record, lambda r: replace(r, task_id=task_id, state=RecordState.CREATED))

    async def mark_devices_managed(self, record: Record) -> Record:
        return await self._update(record, lambda r: replace(r, devices_managed=True))

    async def _update(self, record: Record, change: Callable[[Record], Record]) -> Record:
        """Optimistic; when another actor of the same owner changed the record meanwhile (a join, its
        own state change), the change is applied again on what the API server has."""
        current = record
        for _ in range(CLAIM_ATTEMPTS):
            wanted = change(current)
            if wanted == current:
                return current
            updated = await self.kube.replace_configmap(self.namespace, wanted.manifest(self.namespace, self.label))
            if updated is not None:
                fresh = Record.from_manifest(updated) or wanted
                self.remember(fresh)
                return fresh
            reread = await self.reread(record.truenas, record.instance)
            if reread is None or reread.owner_uid != record.owner_uid:
                break
            current = reread
        raise fail(Reason.CONFLICT, f"the ownership record of {record.instance!r} changed meanwhile")

    async def reread(self, truenas: str, instance: str) -> Record | None:
        """The record as the API server has it now (before a delete, and after a lost race)."""
        body = await self.kube.read_configmap(self.namespace, record_name(truenas, instance))
        record = Record.from_manifest(body) if body is not None else None
        if record is None:
            self._forget((truenas, instance))
        else:
            self.remember(record)
        return record

    async def release(self, record: Record) -> None:
        """Forgets an owner (its instance is gone, or left on TrueNAS with Orphan)."""
        await self.kube.delete_configmap(self.namespace, record.name, record.resource_version or None)
        self._forget((record.truenas, record.instance))

    async def release_own_claim(self, claimed: Record) -> bool:
        """Releases a record this very call created, unless another actor joined it since (then the
        record stays, as that actor's create may be running): True when released. Only the version
        ``claimed`` was created as is deleted (a precondition), so a join and this release cannot
        both win."""
        try:
            await self.release(claimed)
        except OperatorError:
            current = await self.reread(claimed.truenas, claimed.instance)
            if current is not None and current.resource_version != claimed.resource_version:
                return False
            raise
        return True


def _state(written: object) -> RecordState:
    """A record's state as written; one this version does not know (an administrator's edit, a newer
    version's) counts as created: owned and finished, so nothing is created again on a guess."""
    try:
        return RecordState(str(written or RecordState.CREATED))
    except ValueError:
        return RecordState.CREATED


def describe_holder(held: Record, asking: str) -> str:
    """Who holds a record, as told to another resource: never the holder's namespace or name (that
    is another tenant's business), except that the very resource asking is told it is an earlier
    one of its name (deleted and re-created while the record stayed)."""
    if held.owner == asking:
        return f"an earlier resource with this name (UID {held.owner_uid})"
    return "another IncusInstance"
