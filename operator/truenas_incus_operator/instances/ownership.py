"""What the ownership ledger and the policy say about one resource's instance: one pure function.

The ledger record (held by this resource's UID, by another, or by nobody), the records this
resource holds elsewhere, the administrator's adoption grant and the resource's adoption request
make an ``Ownership`` (reconcile.py), which the planner decides on (the observation grant too, for
ObserveOnly resources). Never derived from annotations
or status: tenants write those (the adoption request is a request, not a right).
"""

from __future__ import annotations

from collections.abc import Iterable

from ..reconcile import Desired, Ownership
from .ledger import Record, RecordState, describe_holder


def ownership_of(
    desired: Desired,
    identity: str,
    record: Record | None,
    owned: Iterable[Record],
    *,
    adopt_requested: bool,
    adopt_allowed: bool,
    observe_allowed: bool = False,
) -> Ownership:
    """``record``: the ledger's record of ``desired``'s instance name on the TrueNAS ``identity``;
    ``owned``: every record that names ``desired``'s UID (wherever)."""
    mine = record is not None and record.owner_uid == desired.uid
    held = record is not None and not mine
    # A record of this resource under another name or NAS: one it created (a claim still ``creating``
    # made no instance yet, so it blocks nothing), or one it adopted.
    elsewhere = next(
        (
            f"{r.instance!r} on {r.truenas}"
            for r in owned
            if (r.truenas, r.instance) != (identity, desired.instance_name) and r.state != RecordState.CREATING
        ),
        None,
    )
    return Ownership(
        mine=mine,
        holder=describe_holder(record, f"{desired.namespace}/{desired.name}") if held and record else None,
        adopt_requested=adopt_requested,
        adopt_allowed=adopt_allowed,
        devices_managed=mine and record is not None and record.manages_devices,
        unfinished=mine and record is not None and record.state == RecordState.CREATING,
        adopted=mine and record is not None and record.state == RecordState.ADOPTED,
        elsewhere=elsewhere,
        observing=mine and record is not None and record.state == RecordState.OBSERVED,
        observe_allowed=observe_allowed,
    )
