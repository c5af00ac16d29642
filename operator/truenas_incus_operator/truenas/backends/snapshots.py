"""ZFS snapshots of an instance's datasets, over each version's calls (docs/snapshots.md): what the
snapshot, restore and clone work (issue 24) builds on, family-agnostic. A family says which datasets
an instance owns (``SnapshotTarget``); this module takes, lists, rolls back and deletes snapshots
of them.

- 25.04: ``zfs.snapshot.*`` (public there); 25.10: ``pool.snapshot.*``; 26 and 27: ``pool.snapshot.*``
  over zfs.resource.snapshot, whose user properties show only with ``extra.retention``.
- Every snapshot the operator takes carries the user property ``OWNER_PROPERTY`` (the owning
  resource's UID); ``delete`` refuses a snapshot without it, whoever asks.
- ``rollback`` refuses past newer snapshots, naming them, unless told to destroy them; it never
  passes ``recursive_clones`` (a clone of a newer snapshot is another instance's disk).
- ``SnapshotTasks``: periodic snapshot tasks, ``pool.snapshottask.*`` (the same calls on every version),
  which TrueNAS runs on its own schedule (spec.snapshots). Their snapshots carry no user property: they
  are known by their task's naming schema, and ``delete_scheduled`` deletes only a name that schema
  (the operator's, ``SCHEDULE_PREFIX``) parses.
"""

from __future__ import annotations

import errno
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from ..errors import CallFailed, FieldError, MalformedAnswer, NotFound
from ..transports.base import Transport
from ..types import Calls, SnapshotTarget

__all__ = [
    "OWNER_PROPERTY",
    "SCHEDULE_PREFIX",
    "NewerSnapshots",
    "NotOurs",
    "SnapshotInfo",
    "SnapshotTarget",
    "SnapshotTasks",
    "Snapshots",
    "origin_of",
    "parses",
]

OWNER_PROPERTY = "io.truenas.incus-operator:owner"
"""The ZFS user property naming the resource (its UID) a snapshot was taken for."""
SNAPSHOT_NAME = re.compile(r"^[A-Za-z0-9_.:-]{1,200}$")
"""What a snapshot name may be here: ZFS's component characters, bounded."""
SCHEDULE_PREFIX = "tio-auto-"
"""How the naming schema of every periodic snapshot task the operator creates begins."""


def parses(name: str, naming_schema: str) -> bool:
    """Whether ``naming_schema`` (strftime, as zettarepl reads it) parses the snapshot name ``name``."""
    try:
        datetime.strptime(name, naming_schema)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class SnapshotInfo:
    """One snapshot name across the target's datasets."""

    name: str
    datasets: tuple[str, ...]
    txg: int
    created: int | None
    """Seconds since the epoch, as TrueNAS reports ``creation`` (None where it did not say)."""
    used: int | None
    """Bytes only this snapshot holds, summed over its datasets (None where not reported)."""
    referenced: int | None
    owner: str | None
    """``OWNER_PROPERTY``'s value: the resource it was taken for, or None (not the operator's)."""


class NotOurs(CallFailed):
    """A snapshot the operator did not take (no owner property, or another resource's): never deleted."""


class NewerSnapshots(CallFailed):
    """A rollback would destroy newer snapshots; ``newer`` names them, oldest first."""

    def __init__(self, message: str, newer: list[str]) -> None:
        super().__init__(message)
        self.newer = newer


def origin_of(entry: Any) -> str:
    """A ``pool.dataset.query`` entry's ``origin.value`` (the snapshot it is a clone of); "" for none, or
    for an answer not of that shape."""
    origin = entry.get("origin") if isinstance(entry, dict) else None
    value = origin.get("value") if isinstance(origin, dict) else None
    return value if isinstance(value, str) else ""


def _number(prop: Any) -> int | None:
    if not isinstance(prop, dict):
        return None
    for key in ("parsed", "rawvalue", "value"):
        value = prop.get(key)
        if isinstance(value, bool):
            continue
        if isinstance(value, int):
            return value
        if isinstance(value, str) and value.isdigit():
            return int(value)
    return None


def _txg(value: Any, namespace: str) -> int:
    """``createtxg`` orders snapshots (which are newer): a value that is not a number is not TrueNAS's
    answer, and is refused at this edge rather than guessed."""
    text = str(value if value is not None else 0)
    if not text.isdigit() or len(text) > 20:
        raise MalformedAnswer(f"{namespace}.query: a snapshot's createtxg is not a number")
    return int(text)


class Snapshots:
    @staticmethod
    def calls(version: tuple[int, ...]) -> Calls:
        """What taking, listing, rolling back and deleting snapshots calls on ``version`` (doctor checks them)."""
        namespace = "pool.snapshot" if version >= (25, 10) else "zfs.snapshot"
        return Calls(
            reads=(f"{namespace}.query", "pool.dataset.query"),
            writes=tuple(f"{namespace}.{v}" for v in ("create", "rollback", "delete")),
        )

    def __init__(self, transport: Transport, version: tuple[int, ...]) -> None:
        self.transport = transport
        self.namespace = "pool.snapshot" if version >= (25, 10) else "zfs.snapshot"
        self.user_properties_apart = version >= (26,)
        """26 and later report user properties apart (``user_properties``), only with ``extra.retention``."""

    async def _entries(self, target: SnapshotTarget) -> list[dict[str, Any]]:
        extra: dict[str, Any] = {"retention": True, "properties": ["used", "referenced", "creation"]}
        if not self.user_properties_apart:
            extra = {}  # 25.x: every property, the user ones among them
        filters: list[Any] = [["dataset", "=", target.root]]
        if target.recursive:
            filters = [["OR", [["dataset", "=", target.root], ["dataset", "^", f"{target.root}/"]]]]
        entries = await self.transport.call(f"{self.namespace}.query", filters, {"extra": extra}, idempotent=True)
        return [e for e in entries if isinstance(e, dict) and target.owns(str(e.get("dataset")))]

    def _owner(self, entry: dict[str, Any]) -> str | None:
        if self.user_properties_apart:
            value = (entry.get("user_properties") or {}).get(OWNER_PROPERTY)
        else:
            value = ((entry.get("properties") or {}).get(OWNER_PROPERTY) or {}).get("value")
        return str(value) if value not in (None, "", "-") else None

    def _missing(self, target: SnapshotTarget, name: str, verb: str) -> NotFound:
        error = FieldError(None, f"Snapshot {target.root}@{name} does not exist", errno.ENOENT)
        return NotFound([error], f"{self.namespace}.{verb}")

    async def of(self, target: SnapshotTarget) -> list[SnapshotInfo]:
        """The snapshots of the target's root, oldest first, each with what its name holds across the
        target's datasets (a recursive snapshot is one name in every dataset)."""
        entries = await self._entries(target)
        by_name: dict[str, list[dict[str, Any]]] = {}
        for entry in entries:
            by_name.setdefault(str(entry.get("snapshot_name")), []).append(entry)
        found = []
        for name, group in by_name.items():
            top = next((e for e in group if e.get("dataset") == target.root), None)
            if top is None:
                continue  # a child's own snapshot, not one of the instance
            props = top.get("properties") or {}
            used = [_number((e.get("properties") or {}).get("used")) for e in group]
            found.append(
                SnapshotInfo(
                    name=name,
                    datasets=tuple(sorted(str(e.get("dataset")) for e in group)),
                    txg=_txg(top.get("createtxg"), self.namespace),
                    created=_number(props.get("creation")),
                    used=sum(u for u in used if u is not None) if any(u is not None for u in used) else None,
                    referenced=_number(props.get("referenced")),
                    owner=self._owner(top),
                )
            )
        return sorted(found, key=lambda s: s.txg)

    async def clones(self, snapshot: SnapshotInfo) -> list[str]:
        """The datasets cloned from ``snapshot`` (in any of its datasets), wherever they live: while one
        exists, TrueNAS refuses to destroy the snapshot (and the operator never destroys or promotes
        another instance's disk)."""
        origins = [f"{dataset}@{snapshot.name}" for dataset in snapshot.datasets]
        entries = await self.transport.call(
            "pool.dataset.query", [["origin.value", "in", origins]], {"select": ["id", "origin"]}, idempotent=True
        )
        if not isinstance(entries, list):  # never read as "no clones": a delete would go on
            raise MalformedAnswer("pool.dataset.query: the answer is not a list")
        return sorted(str(e.get("id")) for e in entries if origin_of(e) in origins)

    async def take(self, target: SnapshotTarget, name: str, owner: str) -> SnapshotInfo:
        if not SNAPSHOT_NAME.match(name):
            raise ValueError(f"snapshot name {name!r}: letters, digits and _.:- only, at most 200")
        payload = {"dataset": target.root, "name": name, "recursive": target.recursive}
        payload["properties"] = {OWNER_PROPERTY: owner}
        await self.transport.call(f"{self.namespace}.create", payload)
        for snapshot in await self.of(target):
            if snapshot.name == name:
                return snapshot
        raise self._missing(target, name, "create")  # taken, then gone before it could be read

    async def rollback(self, target: SnapshotTarget, name: str, destroy_newer: bool = False) -> list[str]:
        """Rolls every dataset of the target back to ``name``; the newer snapshots it destroyed (none
        unless ``destroy_newer``). The instance must be stopped: ZFS rolls back under a running guest."""
        snapshots = await self.of(target)
        chosen = next((s for s in snapshots if s.name == name), None)
        if chosen is None:
            raise self._missing(target, name, "rollback")
        newer = [f"{target.root}@{s.name}" for s in snapshots if s.txg > chosen.txg]
        if newer and not destroy_newer:
            raise NewerSnapshots(
                f"rolling back to {target.root}@{name} would destroy the newer snapshots {', '.join(newer)}", newer
            )
        options: dict[str, Any] = {"recursive": bool(newer)}
        if target.recursive:
            options["recursive_rollback"] = True
        await self.transport.call(f"{self.namespace}.rollback", f"{target.root}@{name}", options)
        return newer

    async def delete(self, target: SnapshotTarget, name: str, owner: str) -> bool:
        """Deletes the operator's snapshot ``name`` taken for ``owner``, deepest dataset first; False when
        it is already gone. A snapshot with clones is refused by TrueNAS (raised): never ``defer`` here."""
        snapshot = next((s for s in await self.of(target) if s.name == name), None)
        if snapshot is None:
            return False
        if snapshot.owner != owner:
            raise NotOurs(f"{target.root}@{name} was not taken by the operator for this resource: left as it is")
        await self._destroy(snapshot)
        return True

    async def _destroy(self, snapshot: SnapshotInfo) -> None:
        """One snapshot name in every dataset that has it, deepest dataset first."""
        for dataset in sorted(snapshot.datasets, key=lambda d: d.count("/"), reverse=True):
            try:
                await self.transport.call(f"{self.namespace}.delete", f"{dataset}@{snapshot.name}")
            except NotFound:
                continue

    async def delete_scheduled(self, target: SnapshotTarget, name: str, naming_schema: str) -> bool:
        """Deletes snapshot ``name`` that the operator's periodic task with ``naming_schema`` made (the
        schema is the operator's and parses the name; the snapshot carries no owner property); False
        when it is already gone. Anything else is refused (``NotOurs``)."""
        snapshot = next((s for s in await self.of(target) if s.name == name), None)
        if snapshot is None:
            return False
        if not naming_schema.startswith(SCHEDULE_PREFIX) or not parses(name, naming_schema) or snapshot.owner:
            raise NotOurs(f"{target.root}@{name} was not made by the operator's periodic task: left as it is")
        await self._destroy(snapshot)
        return True


class SnapshotTasks:
    """Periodic snapshot tasks (``pool.snapshottask.*``, plugins/snapshot.py; every version): TrueNAS
    snapshots ``dataset`` on ``schedule`` under ``naming_schema`` and destroys what that schema names
    once older than ``lifetime_value`` ``lifetime_unit``, whether or not anyone is connected."""

    NAMESPACE = "pool.snapshottask"

    @staticmethod
    def calls(version: tuple[int, ...]) -> Calls:
        """The same on every version (doctor checks them)."""
        return Calls(
            reads=(f"{SnapshotTasks.NAMESPACE}.query",),
            writes=tuple(f"{SnapshotTasks.NAMESPACE}.{v}" for v in ("create", "update", "delete")),
        )

    def __init__(self, transport: Transport) -> None:
        self.transport = transport

    async def get(self, task_id: int) -> dict[str, Any] | None:
        """The task ``task_id`` as TrueNAS lists it, or None when there is none of that id."""
        entries = await self.transport.call(f"{self.NAMESPACE}.query", [["id", "=", task_id]], {}, idempotent=True)
        found = [e for e in entries or [] if isinstance(e, dict) and e.get("id") == task_id]
        return found[0] if found else None

    async def find(self, naming_schema: str, dataset: str | None = None) -> list[dict[str, Any]]:
        """The tasks whose naming schema is ``naming_schema`` (on ``dataset`` only, when given)."""
        filters: list[Any] = [["naming_schema", "=", naming_schema]]
        if dataset is not None:
            filters.append(["dataset", "=", dataset])
        entries = await self.transport.call(f"{self.NAMESPACE}.query", filters, {}, idempotent=True)
        return [e for e in entries or [] if isinstance(e, dict) and isinstance(e.get("id"), int)]

    async def create(self, payload: dict[str, Any]) -> dict[str, Any]:
        entry: dict[str, Any] = await self.transport.call(f"{self.NAMESPACE}.create", payload)
        return entry

    async def update(self, task_id: int, payload: dict[str, Any]) -> dict[str, Any]:
        entry: dict[str, Any] = await self.transport.call(f"{self.NAMESPACE}.update", task_id, payload)
        return entry

    async def delete(self, task_id: int) -> bool:
        """Deletes the task (its snapshots stay, as TrueNAS leaves them); False when it was gone."""
        try:
            await self.transport.call(f"{self.NAMESPACE}.delete", task_id)
        except NotFound:
            return False
        return True
