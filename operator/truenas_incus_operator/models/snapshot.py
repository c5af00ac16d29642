"""IncusInstanceSnapshot and IncusInstanceRestore: a ZFS snapshot of what one IncusInstance owns, and
a one-shot rollback of the instance to one of its snapshots (docs/snapshots.md).

Both name an IncusInstance of their own namespace only (``instanceRef`` has no namespace), and both
specs are immutable: a snapshot is taken once, a restore runs once. Status is the operator's.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any

from pydantic import ConfigDict, Field, model_validator

from .common import Condition, _Model
from .limits import DNS1123_SUBDOMAIN_PATTERN

SNAPSHOT_NAME_PATTERN = r"^[A-Za-z0-9_.:-]{1,200}$"
"""A ZFS snapshot name (the part after ``@``): ZFS's component characters, bounded."""
MAX_LISTED_SNAPSHOTS = 20
"""At most this many of an instance's snapshots are listed in a status."""


class ObjectReference(_Model):
    """Names an object of the same namespace."""

    name: Annotated[str, Field(pattern=DNS1123_SUBDOMAIN_PATTERN, min_length=1, max_length=253)] = Field(
        description="The object's name, in this namespace."
    )


class Consistency(StrEnum):
    CRASH = "Crash"
    STOPPED = "Stopped"


class SnapshotDeletionPolicy(StrEnum):
    DELETE = "Delete"
    RETAIN = "Retain"


class SnapshotPhase(StrEnum):
    PENDING = "Pending"
    CREATING = "Creating"
    READY = "Ready"
    FAILED = "Failed"
    DELETING = "Deleting"


class RestorePhase(StrEnum):
    PENDING = "Pending"
    STOPPING = "Stopping"
    ROLLING_BACK = "RollingBack"
    STARTING = "Starting"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"


SNAPSHOT_DEFAULTS: dict[str, Any] = {"consistency": Consistency.CRASH, "deletion_policy": SnapshotDeletionPolicy.DELETE}


class IncusInstanceSnapshotSpec(_Model):
    """One atomic ZFS snapshot of everything an IncusInstance owns on TrueNAS."""

    instance_ref: ObjectReference = Field(description="The IncusInstance to snapshot, in this namespace.")
    consistency: Consistency | None = Field(
        None,
        description=(
            "Crash (default): snapshot the instance as it runs, as a power cut would leave its disks. Stopped: stop "
            "it (as its stopTimeoutSeconds says), snapshot, and start it again if it was running."
        ),
    )
    deletion_policy: SnapshotDeletionPolicy | None = Field(
        None,
        description="Delete (default): deleting this resource deletes the snapshot on TrueNAS. Retain: it stays.",
    )


class SnapshotEntry(_Model):
    """One snapshot of an instance as TrueNAS lists it."""

    name: Annotated[str, Field(max_length=256)] = Field(description="The snapshot's name (after '@').")
    created: datetime | None = Field(None, description="When ZFS took it.")
    used_bytes: Annotated[int, Field(ge=0)] | None = Field(None, description="Bytes only this snapshot holds.")
    operator: bool | None = Field(
        None, description="Taken by this operator for an IncusInstanceSnapshot (it carries the owner property)."
    )
    scheduled: bool | None = Field(None, description="Made by the periodic snapshot task of spec.snapshots.")


class SnapshotScheduleStatus(_Model):
    """The periodic snapshot task spec.snapshots became on TrueNAS, as TrueNAS reports it."""

    task_id: Annotated[int, Field(ge=0)] | None = Field(
        None, description="The task's id on TrueNAS (pool.snapshottask). Absent: there is no task (see message)."
    )
    dataset: Annotated[str, Field(max_length=512)] | None = Field(None, description="The dataset it snapshots.")
    recursive: bool | None = Field(None, description="With the dataset's descendants, atomically.")
    naming_schema: Annotated[str, Field(max_length=256)] | None = Field(
        None, description="How its snapshots are named (strftime, in the NAS's time zone)."
    )
    lifetime_value: Annotated[int, Field(ge=0)] | None = Field(
        None, description="How long TrueNAS keeps each of its snapshots, in lifetimeUnit."
    )
    lifetime_unit: Annotated[str, Field(max_length=16)] | None = Field(None, description="HOUR, DAY or WEEK.")
    state: Annotated[str, Field(max_length=32)] | None = Field(
        None, description="The task's last run as TrueNAS reports it: PENDING, RUNNING, FINISHED or ERROR."
    )
    message: Annotated[str, Field(max_length=4096)] | None = Field(
        None, description="How keep became the lifetime, or why there is no task."
    )


class InstanceOfSnapshot(_Model):
    """The IncusInstance a snapshot was taken of, as it was then."""

    name: Annotated[str, Field(max_length=253)] = Field(description="The IncusInstance's name.")
    uid: Annotated[str, Field(max_length=64)] = Field(description="Its UID: a re-created resource is another one.")
    instance: Annotated[str, Field(max_length=253)] | None = Field(None, description="The instance name on TrueNAS.")


class IncusInstanceSnapshotStatus(_Model):
    """What the operator took, as TrueNAS reports it."""

    phase: SnapshotPhase | None = Field(None, description="Pending, Creating, Ready, Failed or Deleting.")
    source: InstanceOfSnapshot | None = Field(None, description="The instance the snapshot is of.")
    snapshot_name: Annotated[str, Field(max_length=256)] | None = Field(
        None, description="The ZFS snapshot's name (after '@'), the same in every dataset."
    )
    datasets: Annotated[list[Annotated[str, Field(max_length=512)]], Field(max_length=64)] | None = Field(
        None, description="The datasets the snapshot holds (dataset@snapshotName on TrueNAS)."
    )
    creation_time: datetime | None = Field(None, description="When ZFS took it.")
    used_bytes: Annotated[int, Field(ge=0)] | None = Field(None, description="Bytes only this snapshot holds.")
    referenced_bytes: Annotated[int, Field(ge=0)] | None = Field(None, description="Bytes it refers to.")
    consistency: Consistency | None = Field(None, description="The consistency achieved.")
    was_running: bool | None = Field(
        None, description="consistency Stopped: the instance was running before it was stopped for the snapshot."
    )
    truenas_version: Annotated[str, Field(max_length=128)] | None = Field(None, description="TrueNAS that took it.")
    observed_generation: Annotated[int, Field(ge=0)] | None = Field(
        None, description="metadata.generation the status was computed for."
    )
    conditions: Annotated[list[Condition], Field(max_length=8)] | None = Field(
        None, description="Ready: True once done."
    )


class IncusInstanceRestoreSpec(_Model):
    """Rolls an IncusInstance's datasets back to one of its snapshots, once. The IncusInstance's spec is
    never changed: after the rollback, the instance is brought back to what its powerState says."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "has(self.snapshotRef) != has(self.truenasSnapshot)",
                    "message": "set exactly one of snapshotRef and truenasSnapshot",
                }
            ]
        }
    )

    instance_ref: ObjectReference = Field(description="The IncusInstance to restore, in this namespace.")
    snapshot_ref: ObjectReference | None = Field(
        None, description="An IncusInstanceSnapshot of that instance, in this namespace (or truenasSnapshot)."
    )
    truenas_snapshot: Annotated[str, Field(pattern=SNAPSHOT_NAME_PATTERN, max_length=200)] | None = Field(
        None,
        description=(
            "The name (after '@') of any snapshot of the instance on TrueNAS, e.g. one a periodic task made "
            "(listed in the IncusInstance's status.snapshots); or snapshotRef."
        ),
    )
    allow_destroying_newer_snapshots: bool | None = Field(
        None,
        description=(
            "ZFS destroys the snapshots newer than the one rolled back to. Without this, a restore to a snapshot "
            "that is not the newest is refused, naming them."
        ),
    )

    @model_validator(mode="after")
    def _one_source(self) -> IncusInstanceRestoreSpec:
        if (self.snapshot_ref is None) == (self.truenas_snapshot is None):
            raise ValueError("set exactly one of snapshotRef and truenasSnapshot")
        return self


class IncusInstanceRestoreStatus(_Model):
    """How far the restore got (each step is recorded before it is taken)."""

    phase: RestorePhase | None = Field(
        None, description="Pending, Stopping, RollingBack, Starting, Succeeded or Failed."
    )
    source: InstanceOfSnapshot | None = Field(None, description="The instance being restored.")
    snapshot_name: Annotated[str, Field(max_length=256)] | None = Field(
        None, description="The ZFS snapshot rolled back to (after '@')."
    )
    was_running: bool | None = Field(None, description="The instance was running when the restore began.")
    destroyed_snapshots: Annotated[list[Annotated[str, Field(max_length=512)]], Field(max_length=256)] | None = Field(
        None, description="Newer snapshots the rollback destroyed (allowDestroyingNewerSnapshots)."
    )
    destroyed_snapshot_count: Annotated[int, Field(ge=0)] | None = Field(
        None, description="How many newer snapshots the rollback destroyed (destroyedSnapshots names the first 100)."
    )
    start_time: datetime | None = Field(None, description="When the restore began.")
    completion_time: datetime | None = Field(None, description="When it succeeded or failed.")
    observed_generation: Annotated[int, Field(ge=0)] | None = Field(
        None, description="metadata.generation the status was computed for."
    )
    conditions: Annotated[list[Condition], Field(max_length=8)] | None = Field(
        None, description="Ready: True once done."
    )


def _immutable(what: str) -> list[Any]:
    return [{"rule": "self.spec == oldSelf.spec", "message": f"spec is immutable: {what}; create a new one instead"}]


SNAPSHOT_ROOT_RULES = _immutable("a snapshot is taken once")
RESTORE_ROOT_RULES = _immutable("a restore runs once")
