"""Clones: an IncusInstance whose ``spec.source.snapshotRef`` names an IncusInstanceSnapshot is made
from that snapshot instead of an image (docs/snapshots.md).

``CloneSources.resolve`` is asked by the instance's loop just before a create, and answers with the
snapshot as the operator's snapshot ledger proves it: the IncusInstanceSnapshot of that name in the
IncusInstance's own namespace (a tenant names nothing else), Ready, with a ledger record under its
UID on the TrueNAS the clone's connection reaches. The snapshot's status is never trusted for the
instance or the snapshot's name: the ledger record says both.

Where it cannot be done it says why, once per create attempt: a container (no public TrueNAS API makes
a container from a dataset: 25.x's virt.instance.create and 26's container.create take an image; 26's
dataset-based create is private), a VM on virt.instance (25.04.0/25.04.1 take an image only), or a
snapshot of something that is not a vm.* VM.
"""

from __future__ import annotations

from collections.abc import Callable

from ..connections import Connection
from ..instances.ledger import Ledger, RecordState
from ..instances.resource import ResourceKey
from ..kube import Kube
from ..models import SnapshotPhase
from ..policy import Policy
from ..problems import OperatorError, Problem, Reason
from ..reconcile import Desired
from ..truenas import CloneSource
from .taking import PLURAL

RETRY_SECONDS = 5.0
"""How soon a clone waiting for its snapshot asks again (the snapshot's Ready also wakes it)."""


def _problem(reason: Reason, message: str, retry_after: float | None = None) -> OperatorError:
    return OperatorError(Problem(reason, f"spec.source.snapshotRef: {message}"), retry_after=retry_after)


def unsupported(desired: Desired, connection: Connection) -> str | None:
    """Why this connection cannot clone the spec's instance from a snapshot; None: it can."""
    version = connection.version or "this TrueNAS"
    client = connection.client
    families = client.instances.family.split("+") if client is not None else []
    if str(desired.spec.type) != "VM":
        return (
            f"TrueNAS {version} has no public API that creates a container from a snapshot or a dataset "
            "(virt.instance.create on 25.x and container.create on 26 and later build from an image; 26's "
            "dataset-based create is private): only VMs on the vm.* API can be cloned. Use spec.image, or clone "
            "the container's data on the NAS"
        )
    if "vm" not in families:
        return (
            f"TrueNAS {version} creates VMs through virt.instance, which builds from an image only: clones are "
            "made on the vm.* API, TrueNAS 25.04.2 and later"
        )
    return None


class CloneSources:
    def __init__(
        self,
        kube: Kube,
        ledger: Ledger,
        policy: Policy | None = None,
        wake: Callable[[ResourceKey], None] | None = None,
        instances: Ledger | None = None,
    ) -> None:
        self.kube = kube
        self.instances = instances
        """The ownership ledger of instances: the snapshot's instance must be owned in the clone's
        namespace now (an instance left with Orphan and adopted elsewhere is no longer this one's)."""
        self.wake = wake
        """Wakes an IncusInstance's loop (instances/wakeups.py)."""
        self._waiting: dict[ResourceKey, set[ResourceKey]] = {}
        """Per IncusInstanceSnapshot not Ready yet, the clones waiting for it."""
        self.ledger = ledger
        """The snapshot ledger (snapshots/taking.py's records: ``<instance>@<snapshot>`` by the
        IncusInstanceSnapshot's UID)."""
        self.policy = policy or Policy()

    def snapshot_ready(self, key: ResourceKey) -> None:
        """An IncusInstanceSnapshot became Ready (or was created): its waiting clones try again now
        rather than at the end of their backoff."""
        for clone in self._waiting.pop(key, set()):
            if self.wake is not None:
                self.wake(clone)

    async def resolve(self, desired: Desired, connection: Connection) -> CloneSource:
        """Raises ``OperatorError``: with ``retry_after`` while the snapshot is not there or not Ready
        yet; without (the loop's backoff) where it cannot be used."""
        source = desired.spec.source
        if source is None:
            raise _problem(Reason.INVALID_SPEC, "not set")
        name = source.snapshot_ref.name
        key, clone = (desired.namespace, name), (desired.namespace, desired.name)
        self._waiting.setdefault(key, set()).add(clone)
        try:
            found = await self._resolve(desired, connection, name)
        except OperatorError as exc:
            if exc.retry_after is None:  # not waiting for the snapshot: nothing to wake it for
                self._forget(key, clone)
            raise
        except BaseException:
            self._forget(key, clone)
            raise
        self._forget(key, clone)
        return found

    def _forget(self, key: ResourceKey, clone: ResourceKey) -> None:
        waiting = self._waiting.get(key)
        if waiting is not None:
            waiting.discard(clone)
            if not waiting:
                del self._waiting[key]

    async def _resolve(self, desired: Desired, connection: Connection, name: str) -> CloneSource:
        violation = self.policy.snapshot_violation(desired.namespace, connection.key, "clone")
        if violation is not None:
            raise OperatorError(Problem(Reason.POLICY_DENIED, str(violation)))
        why = unsupported(desired, connection)
        if why is not None:
            raise _problem(Reason.UNSUPPORTED, why)
        body = await self.kube.read_object(PLURAL, desired.namespace, name)
        if body is None:
            raise _problem(
                Reason.SOURCE_NOT_READY,
                f"no IncusInstanceSnapshot {name} in namespace {desired.namespace}; the clone waits for it",
                RETRY_SECONDS,
            )
        phase = (body.get("status") or {}).get("phase") or SnapshotPhase.PENDING
        if (body.get("metadata") or {}).get("deletionTimestamp"):
            raise _problem(Reason.SOURCE_NOT_READY, f"IncusInstanceSnapshot {name} is being deleted")
        if phase != SnapshotPhase.READY:
            raise _problem(
                Reason.SOURCE_NOT_READY,
                f"IncusInstanceSnapshot {name} is {phase}; the clone is made once it is Ready",
                RETRY_SECONDS if phase != SnapshotPhase.FAILED else None,
            )
        uid = str((body.get("metadata") or {}).get("uid") or "")
        records = [r for r in self.ledger.owned_by(uid) if r.state == RecordState.CREATED] if uid else []
        if not records:
            raise _problem(
                Reason.SOURCE_NOT_READY,
                f"IncusInstanceSnapshot {name} has no record in the operator's snapshot ledger: it was not taken "
                "by this operator, and is not cloned",
            )
        record = records[0]
        if record.truenas != connection.identity:
            raise _problem(
                Reason.INVALID_SPEC,
                f"IncusInstanceSnapshot {name} is on the TrueNAS {record.truenas}; this IncusInstance's connection "
                f"reaches {connection.identity}: a clone is made on its snapshot's NAS (set spec.connectionRef "
                "as the snapshot's instance has it)",
            )
        instance, _, snapshot = record.instance.partition("@")
        owned = self.instances.get(connection.identity, instance) if self.instances is not None else None
        if self.instances is not None and (
            owned is None
            or owned.owner.partition("/")[0] != desired.namespace
            or owned.state not in (RecordState.CREATED, RecordState.ADOPTED)  # observed: not the namespace's
        ):
            raise _problem(
                Reason.SOURCE_NOT_READY,
                f"IncusInstanceSnapshot {name} is of an instance no IncusInstance of namespace {desired.namespace} "
                "owns now: it is not cloned",
            )
        observed = connection.cache.get(instance)
        if observed is not None and (observed.type != "VM" or observed.family != "vm"):
            raise _problem(
                Reason.UNSUPPORTED,
                f"IncusInstanceSnapshot {name} is of the {observed.type} {instance!r} ({observed.family}): only "
                "snapshots of vm.* VMs can be cloned",
            )
        return CloneSource(instance=instance, snapshot=snapshot, owner=uid)
