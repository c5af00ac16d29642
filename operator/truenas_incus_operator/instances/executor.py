"""Carries out one planned action on TrueNAS, and records what it did (in the connection's cache,
in the ownership ledger, in an Event). Every write to TrueNAS is checked against the ledger first."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import replace
from typing import Any

from ..connections import Connection
from ..kube import FENCE, Fence
from ..metrics import Metrics
from ..models import JobStatus, Phase
from ..problems import OperatorError, Reason, fail
from ..reconcile import (
    Action,
    AddDevice,
    Adopt,
    Claim,
    Create,
    Delete,
    Desired,
    Observe,
    Plan,
    RemoveDevice,
    Start,
    Stop,
    Unobserve,
    Update,
    UpdateDevice,
)
from ..status import clip
from ..truenas import (
    AlreadyExists,
    CallFailed,
    InstanceBackend,
    JobFailed,
    ObservedInstance,
    TransportError,
    TrueNASError,
)
from .ledger import Ledger, Record, RecordState, describe_holder
from .reporter import Reporter
from .resource import LoopState, ResourceKey, writes_stopped_since

log = logging.getLogger(__name__)


JOB_REPORT_SECONDS = 1.0


class JobReport:
    """The latest progress TrueNAS sent for a job (``on_progress`` callbacks), as ``status.job``."""

    def __init__(self) -> None:
        self.status: JobStatus | None = None

    def update(self, job: dict[str, Any]) -> None:
        raw = job.get("progress")
        progress: dict[str, Any] = raw if isinstance(raw, dict) else {}
        ident = job.get("id")
        if not isinstance(ident, int):
            return
        percent = progress.get("percent")
        previous = self.status
        self.status = JobStatus(
            id=ident,
            method=str(job.get("method") or (previous.method if previous else "")),
            state=str(job.get("state") or (previous.state if previous else "RUNNING")),
            progress=int(percent) if isinstance(percent, int | float) else None,
            description=clip(str(progress["description"]), 1024) if progress.get("description") else None,
        )


def is_device_action(action: Action) -> bool:
    return isinstance(action, AddDevice | UpdateDevice | RemoveDevice)


def describe_device_action(action: Action) -> str:
    if isinstance(action, AddDevice):
        return f"adding {action.device.name}"
    if isinstance(action, UpdateDevice):
        return f"restoring {action.device.name}"
    if isinstance(action, RemoveDevice):
        return f"removing {action.name}"
    return type(action).__name__


class Executor:
    def __init__(
        self, ledger: Ledger, reporter: Reporter, metrics: Metrics | None = None, fence: Fence = FENCE
    ) -> None:
        self.ledger = ledger
        self.fence = fence
        """Checked before every action: no write to TrueNAS without a proven Lease (election on)."""
        self.reporter = reporter
        self.metrics = metrics if metrics is not None else Metrics()
        self.creating: set[ResourceKey] = set()
        """Resources whose create call is in flight in this process (deletion waits for them)."""
        self._claimed: dict[ResourceKey, Record] = {}
        """The record a Claim of the current plan created, for the Create that follows it (only that
        call may release it)."""

    async def execute(
        self,
        body: Mapping[str, Any],
        state: LoopState,
        desired: Desired,
        connection: Connection,
        observed: ObservedInstance | None,
        action: Action,
    ) -> bool:
        """Carries out ``action``; True when the rest of the plan is void and the caller must re-plan
        (a claim found this resource's own record: another actor, or an earlier pass, made it)."""
        self.fence.check()
        with self.metrics.action(action):
            return await self._execute(body, state, desired, connection, observed, action)

    async def _execute(
        self,
        body: Mapping[str, Any],
        state: LoopState,
        desired: Desired,
        connection: Connection,
        observed: ObservedInstance | None,
        action: Action,
    ) -> bool:
        backend = _backend(connection)
        name = desired.instance_name
        version = connection.version
        key = (desired.namespace, desired.name)
        claimed = self._claimed.pop(key, None)
        if isinstance(action, Observe):
            record = await self.ledger.claim(
                connection.identity,
                name,
                owner_uid=desired.uid,
                owner=f"{desired.namespace}/{desired.name}",
                connection=connection.key,
                state=RecordState.OBSERVED,
                deletion_policy="Orphan",
            )
            if record.fresh:
                self.reporter.post_event(body, "Normal", "Observing", f"observing {name} on TrueNAS ({record.truenas})")
            return True  # observed (or this resource's own record found): plan again
        held = self.ledger.get(connection.identity, name)
        if isinstance(action, Unobserve):
            if held is not None and held.owner_uid == desired.uid and held.observed_only:
                await self.ledger.release(held)
                message = f"stopped observing {name} on TrueNAS: the policy no longer allows it"
                self.reporter.post_event(body, "Normal", "Released", message)
            return True
        if isinstance(action, Adopt) and held is not None and held.owner_uid == desired.uid and held.observed_only:
            # ObserveOnly -> Full: the observer takes the instance over (the adoption rules applied).
            adopter = replace(desired, ownership=replace(desired.ownership, observing=False))
            await self.ledger.set_deletion_policy(
                await self.ledger.set_state(held, RecordState.ADOPTED), adopter.deletion_policy
            )  # the policy of the owner it becomes (while observing, the effective one is Orphan)
            self.reporter.post_event(body, "Normal", "Adopted", f"took over {name} on TrueNAS ({held.truenas})")
            return True
        if isinstance(action, Claim | Adopt):
            record = await self.ledger.claim(
                connection.identity,
                name,
                owner_uid=desired.uid,
                owner=f"{desired.namespace}/{desired.name}",
                connection=connection.key,
                state=RecordState.ADOPTED if isinstance(action, Adopt) else RecordState.CREATING,
                deletion_policy=desired.deletion_policy,
            )
            if not record.fresh:
                return True  # joined this resource's own record: owned (and maybe unfinished); plan again
            if isinstance(action, Adopt):
                self.reporter.post_event(body, "Normal", "Adopted", f"took over {name} on TrueNAS ({record.truenas})")
            else:
                self._claimed[key] = record
            return False
        record = self.owned(desired, connection)
        stopped = functools.partial(writes_stopped_since, desired, body)
        if isinstance(action, Create):
            if claimed is None:
                # A record this plan did not claim (read at startup, an earlier pass's, another
                # actor's of this resource): joined first, so whoever claimed it cannot release it
                # while this create runs.
                joined = await self.ledger.join(record)
                if joined is None:
                    return True  # released or taken meanwhile: plan again
                record = joined
            await self._create(body, state, desired, connection, action, record, claimed)
        elif isinstance(action, Update):
            # Ready=False (Progressing) for the new generation before the job: `kubectl wait
            # --for=condition=Ready` after a spec change must not return on the old generation's True.
            await self.reporter.write(state, desired, observed, plan=Plan(actions=(action,)), version=version)
            async with self._slot(connection, desired.namespace, stopped):
                connection.remember(await backend.update(name, action.changes))
        elif isinstance(action, AddDevice):
            await backend.add_device(name, action.device)
        elif isinstance(action, UpdateDevice):
            await backend.update_device(name, action.device, action.target)
        elif isinstance(action, RemoveDevice):
            await backend.delete_device(name, action.name)
        elif isinstance(action, Start):
            await self.reporter.write(state, desired, observed, activity=Phase.STARTING, version=version)
            async with self._slot(connection, desired.namespace, stopped):
                await backend.start(name, action.overcommit)
            await connection.refresh_one(name)
        elif isinstance(action, Stop):
            await self.reporter.write(state, desired, observed, activity=Phase.STOPPING, version=version)
            await self.stop(connection, desired.namespace, name, action.timeout, stopped)
            await connection.refresh_one(name)
        elif isinstance(action, Delete):
            async with self._slot(connection, desired.namespace, stopped):
                await backend.delete(name)
            connection.remember_gone(name)
        if is_device_action(action):
            if not record.manages_devices:
                await self.ledger.mark_devices_managed(record)  # removing them from the spec now removes them
            await connection.refresh_one(name)
        return False

    @contextlib.asynccontextmanager
    async def _slot(
        self, connection: Connection, namespace: str, stopped: Callable[[], bool] | None = None
    ) -> AsyncIterator[None]:
        """A job slot, then the Lease fence again: the wait for a slot (and the status write before
        it) can outlast the renew deadline, so the check at the action's start is not enough. So can a
        tenant's pause or ObserveOnly (``stopped``): checked here too, after the wait."""
        async with connection.job_slots.slot(namespace):
            self.fence.check()
            if stopped is not None and stopped():
                raise WritesStopped()
            yield

    def owned(self, desired: Desired, connection: Connection) -> Record:
        """The ledger record that lets ``desired`` write to its instance; raises otherwise."""
        record = self.ledger.get(connection.identity, desired.instance_name)
        if record is None or record.owner_uid != desired.uid:
            holder = f" ({describe_holder(record, f'{desired.namespace}/{desired.name}')} owns it)" if record else ""
            raise fail(Reason.NOT_OWNER, f"this resource does not own the instance {desired.instance_name!r}{holder}")
        return record

    async def _create(
        self,
        body: Mapping[str, Any],
        state: LoopState,
        desired: Desired,
        connection: Connection,
        action: Create,
        record: Record,
        claimed: Record | None = None,
    ) -> None:
        """``claimed``: the record the Claim just before this Create created (None when the record
        predates this plan: an earlier pass, a crash, another actor of this resource)."""
        key = (desired.namespace, desired.name)
        name = desired.instance_name
        stopped = functools.partial(writes_stopped_since, desired, body)
        await self.reporter.write(state, desired, None, activity=Phase.CREATING, version=connection.version)
        self.creating.add(key)
        job = JobReport()
        reporting = asyncio.create_task(self._report_job(job, state, desired, connection), name=f"job {name}")
        try:
            async with self._slot(connection, desired.namespace, stopped):
                created = await _backend(connection).create(action.config, on_progress=job.update)
        except AlreadyExists:
            if claimed is not None and await self.ledger.release_own_claim(claimed):
                # Our claim of a moment ago, joined by nobody: someone else's instance took the name
                # between our look and our create.
                await connection.refresh_one(name)
                raise
            # The record predates this call (an earlier pass before a crash, or another actor of this
            # very resource joined it): the create call that holds the name is ours.
            if await connection.refresh_one(name) is not None:
                await self.ledger.set_state(record, RecordState.CREATED)
                return
            raise fail(
                Reason.CREATE_IN_PROGRESS,
                f"another create call for {name} (of this resource) is running",
                retry_after=2.0,
            ) from None
        except WritesStopped:
            # Paused (or ObserveOnly) while waiting for a slot: nothing was sent; the claim goes back.
            if claimed is not None:
                await self.ledger.release_own_claim(claimed)
            raise
        except CallFailed:
            # TrueNAS answered: nothing was created. Give the name back so a corrected spec can go on,
            # when this call claimed it and no other actor joined (else the record stays ours, and
            # the next pass creates again).
            if (
                claimed is not None
                and await connection.refresh_one(name) is None
                and await self.ledger.release_own_claim(claimed)
            ):
                # Released: nothing of this create may stay on TrueNAS (vm.*: its per-VM dataset).
                with contextlib.suppress(TrueNASError):
                    await _backend(connection).discard_unfinished(name)
            raise
        # A transport error or a timeout is not an answer: the job may still run, the record stays.
        finally:
            self.creating.discard(key)
            await _stop_reporting(reporting)
        connection.remember(created)
        await self.ledger.set_state(record, RecordState.CREATED)
        self.reporter.post_event(body, "Normal", "Created", f"created {created.type} {name} on TrueNAS")

    async def _report_job(self, job: JobReport, state: LoopState, desired: Desired, connection: Connection) -> None:
        """Shows the running TrueNAS job in status.job (at most once per JOB_REPORT_SECONDS)."""
        shown: JobStatus | None = None
        while True:
            await asyncio.sleep(JOB_REPORT_SECONDS)
            current = job.status
            if current is not None and current != shown:
                try:
                    await self.reporter.write(
                        state, desired, None, activity=Phase.CREATING, job=current, version=connection.version
                    )
                    shown = current
                except OperatorError:
                    pass  # a report only; tried again with the next progress
                except Exception:
                    log.exception("%s/%s: cannot show the job's progress", desired.namespace, desired.name)

    async def stop(
        self, connection: Connection, namespace: str, name: str, timeout: int, stopped: Callable[[], bool] | None = None
    ) -> None:
        """Graceful within ``timeout`` seconds, then forced (unless ``stopped`` says writes stopped meanwhile)."""
        self.fence.check()
        backend = _backend(connection)
        async with self._slot(connection, namespace, stopped):
            try:
                await backend.stop(name, timeout=timeout)
                return
            except JobFailed as exc:
                log.info("graceful stop of %s failed (%s); forcing", name, exc.message)
            if stopped is not None and stopped():
                raise WritesStopped()
            await backend.stop(name, force=True)


class WritesStopped(Exception):
    """The resource was paused or switched to ObserveOnly while an action waited for its job slot (or
    for a graceful stop): nothing more is sent; the caller ends the pass (or the deletion waits)."""


async def _stop_reporting(reporting: asyncio.Task[None]) -> None:
    """Stops the progress reporter; whatever it ended with never replaces the create's own outcome
    (a failed progress write masked a successful create: the ledger stayed ``creating``)."""
    reporting.cancel()
    try:
        await reporting
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if current is not None and current.cancelling():
            raise  # the create itself is being cancelled (the daemon stops): let that through
    except Exception:
        log.exception("the job progress reporter failed")


def _backend(connection: Connection) -> InstanceBackend:
    if connection.client is None:
        raise TransportError(connection.problem.message if connection.problem else "not connected")
    return connection.client.instances
