"""Reaps ownership records whose resource is gone without the operator seeing it delete (its
finalizer removed by hand while no operator ran, or the operator removed first): the instance is
deleted when the record says the resource's ``deletionPolicy`` was ``Delete``, else (``Orphan``, or
a record of an earlier version that does not know) only the record is released, so nothing is
deleted on a guess. docs/security.md, "Records whose resource vanished".

A sweep runs once the operator is up (after ``START_DELAY_SECONDS``, for the connections) and then
every ``INTERVAL_SECONDS``: one GET per record, read only from the ledger's own namespace and the
owners' namespaces."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from ..connections import ConnectionManager
from ..kube import Kube
from ..problems import OperatorError
from ..truenas import InstanceStatus, NotFound, TrueNASError
from .executor import Executor
from .ledger import Ledger, Record, RecordState

log = logging.getLogger(__name__)
START_DELAY_SECONDS = 30.0
INTERVAL_SECONDS = 600.0


class Reaper:
    def __init__(self, kube: Kube, connections: ConnectionManager, ledger: Ledger, executor: Executor) -> None:
        self.kube = kube
        self.connections = connections
        self.ledger = ledger
        self.executor = executor

    async def run(self) -> None:
        """Sweeps until cancelled (a failed sweep is logged and tried again next interval)."""
        await asyncio.sleep(START_DELAY_SECONDS)
        while True:
            try:
                await self.sweep()
            except (OperatorError, TrueNASError) as exc:
                log.warning("ownership ledger: sweep for vanished owners failed: %s", exc)
            except Exception:  # a bug must not end the sweeps for the life of the process
                log.exception("ownership ledger: sweep for vanished owners failed unexpectedly")
            await asyncio.sleep(INTERVAL_SECONDS)

    async def sweep(self) -> int:
        """Reaps every record whose owner is gone; returns how many were reaped."""
        reaped = 0
        for record in list(self.ledger.records.values()):
            if await self._owner_exists(record):
                continue
            fresh = await self.ledger.reread(record.truenas, record.instance)
            if fresh is None or fresh.owner_uid != record.owner_uid:
                continue  # released or taken meanwhile
            try:
                if await self._reap(fresh):
                    reaped += 1
            except (OperatorError, TrueNASError) as exc:
                log.warning("ownership ledger: cannot reap %s on %s yet: %s", fresh.instance, fresh.truenas, exc)
        return reaped

    async def _owner_exists(self, record: Record) -> bool:
        namespace, _, name = record.owner.partition("/")
        if not namespace or not name:
            return True  # not a record this operator wrote: leave it
        try:
            body = await self.kube.read_incus_instance(namespace, name)
            if body is None and not await self.kube.incus_instances_served(namespace):
                return True  # no IncusInstance is served (the CRD is missing): that proves nothing
        except OperatorError:
            return True  # cannot tell (forbidden, unreachable): never reap on doubt
        return body is not None and (body.get("metadata") or {}).get("uid") == record.owner_uid

    async def _reap(self, record: Record) -> bool:
        if record.observed_only or record.deletion_policy != "Delete":
            await self.ledger.release(record)
            log.info(
                "ownership ledger: %s on %s released, the instance left: its owner %s (UID %s) is gone and %s",
                record.instance, record.truenas, record.owner, record.owner_uid,
                "only observed it" if record.observed_only
                else "its deletionPolicy was Orphan" if record.deletion_policy
                else "its deletionPolicy is not known (a record of an earlier version)",
            )  # fmt: skip
            return True
        connection = self.connections.connections.get(record.connection)
        if connection is None or not connection.ready.is_set() or connection.client is None:
            return False  # its connection is not up (yet): the next sweep tries again
        if connection.identity != record.truenas:
            return False  # the connection reaches another NAS now: never delete there
        backend = connection.client.instances
        observed = await connection.refresh_one(record.instance)
        self.executor.fence.check()  # no delete on TrueNAS without a proven Lease (election on)
        if observed is not None:
            if observed.status == InstanceStatus.RUNNING:
                await self.executor.stop(connection, record.owner.partition("/")[0], record.instance, timeout=30)
                self.executor.fence.check()  # the stop may have outlasted the renew deadline
            with contextlib.suppress(NotFound):
                await backend.delete(record.instance)
            connection.remember_gone(record.instance)
        elif record.state == RecordState.CREATING:
            await backend.discard_unfinished(record.instance)
        await self.ledger.release(record)
        log.info(
            "ownership ledger: %s on %s deleted: its owner %s (UID %s) is gone, its deletionPolicy was Delete",
            record.instance, record.truenas, record.owner, record.owner_uid,
        )  # fmt: skip
        return True
