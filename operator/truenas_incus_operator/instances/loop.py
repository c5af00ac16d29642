"""The reconcile loop of one IncusInstance, run by a kopf daemon: observe (the connection's
cache), plan (``reconcile.plan``), act (``Executor``), report (``Reporter``); then sleep until
something it acts on changes."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Mapping
from dataclasses import replace
from typing import Any, Protocol

from pydantic import ValidationError

from ..connections import Connection, ConnectionManager
from ..kube import KUBE_REASON
from ..metrics import Metrics
from ..models import PAUSED_ANNOTATION
from ..netconfig import nas_address_clash
from ..policy import POLICY_REASON, Policy, Violation
from ..problems import OperatorError, Problem, Reason, fail, problem_of
from ..reconcile import (
    Blocked,
    Create,
    Desired,
    Ownership,
    Plan,
    Start,
    Unobserve,
    instance_config,
    plan,
    plan_observe,
)
from ..settings import Settings
from ..status import Exposure, clip
from ..truenas import CloneSource, DeviceConfig, ObservedInstance, TrueNASError
from .executor import Executor, WritesStopped, describe_device_action, is_device_action
from .exposure import EndpointBounds, Exposer
from .holds import Holds
from .ledger import Ledger
from .ownership import ownership_of
from .reporter import Reporter
from .resource import (
    LoopState,
    Settled,
    Wake,
    about,
    adopt_requested,
    connection_key,
    desired_from,
    resource_key,
    writes_stopped_since,
)
from .schedules import Schedules
from .wakeups import Wakeups, signature

log = logging.getLogger(__name__)
MAX_STEPS_PER_PASS = 12
EXPOSE_EVENTS = frozenset({Reason.EXPOSED, Reason.EXPOSE_CONFLICT, Reason.EXPOSE_FAILED, Reason.INVALID_SPEC})


class CloneSources(Protocol):
    """spec.source's snapshot, proven (snapshots/cloning.py): asked just before a create."""

    async def resolve(self, desired: Desired, connection: Connection) -> CloneSource: ...


class InstanceLoops:
    def __init__(
        self,
        settings: Settings,
        connections: ConnectionManager,
        wakeups: Wakeups,
        ledger: Ledger,
        reporter: Reporter,
        executor: Executor,
        policy: Policy | None = None,
        metrics: Metrics | None = None,
        holds: Holds | None = None,
        schedules: Schedules | None = None,
        sources: CloneSources | None = None,
        exposer: Exposer | None = None,
    ) -> None:
        self.settings = settings
        self.exposer = exposer
        """spec.expose's Service and EndpointSlices (instances/exposure.py); None: not managed (tests)."""
        self.sources = sources
        """Resolves spec.source before a clone's create; None: clones are not made (reported)."""
        self.schedules = schedules
        """spec.snapshots's periodic snapshot tasks (instances/schedules.py); None: not managed (tests)."""
        self.holds = holds if holds is not None else Holds(wakeups.wake)
        self.metrics = metrics if metrics is not None else Metrics()
        self.connections = connections
        self.wakeups = wakeups
        self.ledger = ledger
        self.reporter = reporter
        self.executor = executor
        self.policy = policy or Policy()
        self._vm_slots: dict[str, set[str]] = {}
        """Per namespace, the UIDs of the VM resources that count against the policy's maxVMs."""

    async def run(self, body: Mapping[str, Any], stopped: Any) -> None:
        """Reconciles one IncusInstance until the daemon is stopped. ``body`` is kopf's live view."""
        key = resource_key(body)
        event = self.wakeups.register(key)
        wake = event.set
        state = LoopState(status=dict(body.get("status") or {}))
        loop = asyncio.get_running_loop()
        try:
            while not stopped:
                event.clear()
                with self.metrics.reconcile_pass(key, state):
                    delay = await self.reconcile_once(body, state, wake)
                # Until woken or due (no task of its own: one sleeping loop is its daemon's task and a
                # timer, 1.3 KB; waiting on kopf's ``stopped`` as well took three tasks more, 5.9 KB).
                # kopf cancels the daemon at once when it stops it (cancellation_timeout without a
                # backoff), so nothing here waits for ``stopped``.
                state.timer = loop.call_later(delay, self._due, body, state, event)
                try:
                    await event.wait()
                finally:
                    state.timer.cancel()  # the one armed last (``_due`` arms the next)
        finally:
            if state.listening is not None:
                connection, instance = state.listening
                connection.cache.unlisten(instance, wake)
            if state.watching_key is not None:
                self.connections.unwatch_key(state.watching_key, wake)
            self.wakeups.forget(key)
            self.metrics.forget_resource(key)
            meta = body.get("metadata") or {}
            self._vm_slots.get(str(meta.get("namespace")), set()).discard(str(meta.get("uid", "")))

    async def reconcile_once(self, body: Mapping[str, Any], state: LoopState, wake: Wake) -> float:
        """One pass; returns the seconds until the next unprompted pass."""
        state.unchanged = self._unchanged(body, state)
        if state.unchanged:
            return self.settings.resync_seconds * random.uniform(0.9, 1.1)  # no parse, plan nor render
        state.settled, state.clean = None, False
        try:
            desired = desired_from(body)
        except ValidationError as exc:
            # Admission refuses this; an older CRD might not have. Report and wait for a change.
            message = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            await self.reporter.invalid_spec(body, state, Problem(Reason.INVALID_SPEC, message))
            return self.settings.retry_max_seconds
        if desired.deleting:
            return self.settings.resync_seconds
        key = connection_key(desired.namespace, desired.spec)
        inputs = self.inputs(body, key, desired.instance_name)  # before anything is observed
        self._watch_key(state, key, wake)
        connection: Connection | None = None
        try:
            denied = self._policy_denial(desired, key)
            if denied is not None:
                # Refused before the connection is even looked at: no TrueNAS call, no write, no delete.
                observed = self._owned_observation(desired, body, key)  # keeps instanceId: the instance stays ours
                known = self.connections.connections.get(key)
                connected = known is not None and known.ready.is_set()
                await self._expose_denied(body, desired, state, key, denied)
                await self.reporter.write(state, desired, observed, plan=Plan(blocked=denied), connected=connected)
                self.reporter.post_once(body, state, "Warning", denied.reason, denied.message)
                return self.settings.resync_seconds
            connection = self.connections.get(key)
            self._listen(state, connection, desired.instance_name, wake)
            if not connection.ready.is_set():
                raise OperatorError(connection.problem or Problem(Reason.CONNECTING, "connecting to TrueNAS"))
            await self._converge(desired, body, state, connection)
        except (OperatorError, TrueNASError) as exc:
            problem = problem_of(exc)
            if problem.reason == KUBE_REASON:
                log.warning("%s", problem.message, extra=about(desired.namespace, desired.name))
                return self.reporter.backoff(state)  # the status write would fail the same way
            observed = None
            connected = connection is not None and connection.ready.is_set()
            if connection is not None and connected and self.desired(desired, body, connection).owns:
                observed = connection.cache.get(desired.instance_name)  # never report a foreign instance
            version = connection.version if connection is not None else None
            # Not connected: TrueNAS was not asked, so nothing is known to be gone (status keeps what it saw).
            return await self.reporter.failed(body, state, desired, problem, observed, version, connected)
        except Exception as exc:
            # The last resort: a bug or an edge nobody mapped. Reported (status, one Event, the log
            # with its traceback) and retried with backoff; the loop never dies of it. Nothing is
            # known about the instance from this pass, so the status keeps its last observation.
            log.exception("unexpected failure", extra=about(desired.namespace, desired.name))
            problem = Problem(Reason.INTERNAL_ERROR, clip(f"{type(exc).__name__}: {exc}", 512))
            version = connection.version if connection is not None else None
            return await self.reporter.failed(body, state, desired, problem, None, version, connected=False)
        state.failures = 0
        woken = self.wakeups.events.get(resource_key(body))  # run() clears it before every pass
        if (
            state.clean
            and inputs is not None
            and not (woken is not None and woken.is_set())
            and self.inputs(body, key, desired.instance_name) == inputs
        ):
            # Nothing moved while it ran (its own actions would have), and nothing woke it meanwhile (an
            # input can move and move back: a restore's hold found by the pass and released since).
            state.settled = Settled(key, desired.instance_name, inputs)
        return self.settings.resync_seconds * random.uniform(0.9, 1.1)

    def inputs(self, body: Mapping[str, Any], key: str, instance: str) -> tuple[Any, ...] | None:
        """Everything a pass acts on, short of what the spec says (its generation stands for it): what
        kopf's live body says, the connection (which one, its epoch, up or not, the device audit's
        mark), what the cache holds of the instance (its revision), the ledger's records, a restore's
        hold and the policy. None: no connection yet. O(1) in the number of resources."""
        connection = self.connections.connections.get(key)
        if connection is None:
            return None
        meta = body.get("metadata") or {}
        uid = str(meta.get("uid", ""))
        binding = (body.get("status") or {}).get("binding")
        return (
            signature(body),
            repr(binding),
            connection,
            connection.epoch,
            connection.ready.is_set(),
            connection.audit_marks.get(instance, 0),
            connection.cache.revision(instance),
            self.ledger.get(connection.identity, instance),
            tuple(self.ledger.owned_by(uid)),
            self.holds.get(resource_key(body)),
            self.policy,
        )

    def _due(self, body: Mapping[str, Any], state: LoopState, event: asyncio.Event) -> None:
        """The timer's pass. One that would change nothing (``_unchanged``) is made right here, in the
        timer's callback: the loop's task is not woken, and the next one is armed (idle work is a
        comparison per resource and interval, no task switch). Otherwise, or on any error, the loop
        wakes for a full pass."""
        try:
            started = time.monotonic()
            if not event.is_set() and self._unchanged(body, state):
                self.metrics.unchanged_pass(time.monotonic() - started)
                delay = self.settings.resync_seconds * random.uniform(0.9, 1.1)
                state.timer = asyncio.get_running_loop().call_later(delay, self._due, body, state, event)
                return
        except Exception:  # never a loop left asleep for good: the full pass reports what is wrong
            log.exception("the idle check failed", extra=about(*resource_key(body)))
        event.set()

    def _unchanged(self, body: Mapping[str, Any], state: LoopState) -> bool:
        """The last pass settled with nothing to do, and nothing it acts on moved since (``inputs``), nor
        is spec.expose's or spec.snapshots's own check of what they made due: this pass would settle
        the same way, so it is not made (idle work stays flat in the number of resources)."""
        settled = state.settled
        if settled is None or state.failures:
            return False
        spec = body.get("spec") or {}
        if spec.get("expose") is not None and self.exposer is not None and self.exposer.due(state.expose):
            return False
        if spec.get("snapshots") is not None and self.schedules is not None and self.schedules.due(state.schedule):
            return False
        return self.inputs(body, settled.key, settled.instance) == settled.inputs

    def _policy_denial(self, desired: Desired, key: str) -> Blocked | None:
        """The administrator's policy (policy.py), checked again here: admission can be off or bypassed."""
        found = self.policy.violations(desired.namespace, key, desired.spec, desired.name)
        if desired.spec.snapshots is not None:
            refused = self.policy.schedule_violation(desired.namespace, key, desired.spec.snapshots.schedule)
            found += [refused] if refused is not None else []
        if not found:
            found = self._vm_quota(desired)
        if found:
            return Blocked(POLICY_REASON, "; ".join(map(str, found)), ours=True)
        known = self.connections.connections.get(key)
        clash = nas_address_clash(desired.spec.nics, known.config.url) if known is not None else None
        return Blocked(Reason.ADDRESS_CONFLICT, clash, ours=True) if clash else None

    def _vm_quota(self, desired: Desired) -> list[Violation]:
        """The namespace's maxVMs: a VM resource takes a slot when it first passes; one that owns an
        instance already (the ledger says so) always keeps its slot, so a restart refuses only new ones."""
        slots = self._vm_slots.setdefault(desired.namespace, set())
        if desired.spec.type != "VM":
            slots.discard(desired.uid)
            return []
        label, quota = self.policy.quota_for(desired.namespace)
        if quota.max_vms is None or desired.uid in slots or self.ledger.owned_by(desired.uid):
            slots.add(desired.uid)
            return []
        if len(slots) < quota.max_vms:
            slots.add(desired.uid)
            return []
        message = f"namespace {desired.namespace} has {len(slots)} VMs, the most the policy allows ({quota.max_vms})"
        return [Violation(f"{label}.maxVMs", "spec.type", message)]

    def _owned_observation(self, parsed: Desired, body: Mapping[str, Any], key: str) -> ObservedInstance | None:
        """What the cache holds of the resource's instance, if the ledger gives it to the resource."""
        connection = self.connections.connections.get(key)
        if connection is None or not connection.ready.is_set() or not self.desired(parsed, body, connection).owns:
            return None
        return connection.cache.get(parsed.instance_name)

    def _watch_key(self, state: LoopState, key: str, wake: Wake) -> None:
        if state.watching_key == key:
            return
        if state.watching_key is not None:
            self.connections.unwatch_key(state.watching_key, wake)
        self.connections.watch_key(key, wake)
        state.watching_key = key

    def _listen(self, state: LoopState, connection: Connection, instance: str, wake: Wake) -> None:
        if state.listening == (connection, instance):
            return
        if state.listening is not None:
            old, old_name = state.listening
            old.cache.unlisten(old_name, wake)
        connection.cache.listen(instance, wake)
        state.listening = (connection, instance)

    def desired(self, parsed: Desired, body: Mapping[str, Any], connection: Connection) -> Desired:
        """The resource as the planner sees it, with what the ledger and the policy say of it now
        (``parsed``: the pass's one parse of the body; the ledger may change between steps)."""
        identity = connection.identity
        ownership = ownership_of(
            parsed,
            identity,
            self.ledger.get(identity, parsed.instance_name),
            self.ledger.owned_by(parsed.uid),
            adopt_requested=adopt_requested(body),
            adopt_allowed=self.policy.may_adopt(parsed.namespace, connection.key),
            observe_allowed=self.policy.may_observe(parsed.namespace, connection.key),
        )
        if ownership.observing and not ownership.observe_allowed:
            # The observation grant was taken back: nothing of the instance is this resource's any more,
            # in every path (Full, a policy refusal, an error), until the record is released.
            ownership = Ownership(
                adopt_requested=ownership.adopt_requested, adopt_allowed=ownership.adopt_allowed, revoked=True
            )
        hold = self.holds.get((parsed.namespace, parsed.name)) if ownership.mine else None
        return replace(parsed, ownership=ownership, hold=hold)

    async def _converge(
        self, parsed: Desired, body: Mapping[str, Any], state: LoopState, connection: Connection
    ) -> None:
        client = connection.client
        if client is None:
            raise OperatorError(connection.problem or Problem(Reason.CONNECTING, "connecting to TrueNAS"))
        backend = client.instances
        await self.ledger.migrate(connection.config.identity, connection.identity)
        await self._recheck_holder(parsed, connection)
        confirmed = False
        stopped_writes = parsed.paused
        self._announce_pause(body, state, stopped_writes)
        for _ in range(MAX_STEPS_PER_PASS):
            if (body.get("metadata") or {}).get("deletionTimestamp"):
                return  # deleted during the pass: the delete handler takes over; kopf stops this loop
            if not stopped_writes and writes_stopped_since(parsed, body):
                return  # paused or ObserveOnly since the pass began: the next pass (woken by it) reports it
            desired = self.desired(parsed, body, connection)
            if desired.ownership.revoked:  # a ledger write, no TrueNAS call: done even while paused
                await self.executor.execute(body, state, desired, connection, None, Unobserve())
                continue
            wanted = instance_config(desired)
            observed = connection.cache.get(desired.instance_name)
            unsupported = (*backend.unsupported_fields(wanted, observed), *backend.deferred_fields(wanted, observed))
            if desired.observe_only:
                if stopped_writes:  # paused: the devices as last read (no listing while paused)
                    devices = list(state.observed_devices[1]) if state.observed_devices is not None else None
                else:
                    devices = await self._observed_devices(desired, state, connection, observed)
                current = plan_observe(
                    desired,
                    observed,
                    devices if desired.manages_devices else None,  # Full would leave unlisted ones alone
                    unsupported,
                    config=backend.honoured(wanted, observed),
                    identity=backend.device_identity,
                )
                if stopped_writes:
                    if current.actions:  # not observed yet (or no longer allowed): nothing of it is shown
                        waiting = "paused before the instance was observed: nothing of it is shown until resumed"
                        current = Plan(blocked=Blocked(Reason.RECONCILIATION_PAUSED, waiting), observing=True)
                    await self._settled(body, state, desired, observed, replace(current, paused=True), connection)
                    return
                if current.actions:  # Observe: the ledger records the observer (no TrueNAS call)
                    await self.executor.execute(body, state, desired, connection, observed, current.actions[0])
                    continue
                await self._settled(body, state, desired, observed, current, connection)
                self._announce(body, state, current, client.system_version)
                return
            devices = None
            seen = self._devices_key(desired, connection)
            if state.devices_seen is None and not desired.lists_devices:
                state.devices_seen = seen  # nothing to compare at start: audits and spec changes look
            listing = desired.owns and desired.manages_devices and state.devices_seen != seen
            if observed is not None and listing and not stopped_writes:
                devices = await backend.list_devices(desired.instance_name)
            current = plan(
                desired,
                observed,
                devices,
                unsupported,
                config=backend.honoured(wanted, observed),
                identity=backend.device_identity,
            )
            if stopped_writes:
                # Paused: what the plan would do is reported, nothing of it is done (no schedule either).
                await self._settled(body, state, desired, observed, replace(current, paused=True), connection)
                return
            if devices is not None and not any(is_device_action(a) for a in current.actions):
                state.devices_seen = seen
            if (
                current.blocked is None
                and not current.actions
                and observed is not None
                and self.schedules
                and not writes_stopped_since(parsed, body)
            ):
                notes = await self.schedules.sync(body, desired, connection, observed, state)
                current = replace(current, unsupported=(*current.unsupported, *notes)) if notes else current
            if current.blocked is not None or not current.actions:
                await self._settled(body, state, desired, observed, current, connection)
                self._announce(body, state, current, client.system_version)
                return
            fixes = [a for a in current.actions if is_device_action(a)]
            if fixes and state.devices_seen is not None and state.devices_seen[0] == desired.generation:
                # Compared before for this very spec: someone changed the devices on TrueNAS.
                changes = ", ".join(describe_device_action(a) for a in fixes)
                self.reporter.post_event(body, "Normal", "DriftCorrected", f"devices changed on TrueNAS; {changes}")
            if (
                parsed.spec.source is not None
                and parsed.clone is None
                and any(isinstance(a, Create) for a in current.actions)
            ):
                parsed = replace(parsed, clone=await self._clone_source(parsed, connection))
                continue  # planned again with the snapshot to clone
            if any(isinstance(a, Start) for a in current.actions) and not confirmed:
                confirmed = True  # once per pass: a restore in flight (status read now) holds it stopped
                if await self.holds.confirm((desired.namespace, desired.name)) is not None:
                    continue
            for action in current.actions:
                if writes_stopped_since(parsed, body):
                    return  # checked before every write, a job's end included (a create takes minutes)
                with self.holds.action((desired.namespace, desired.name)):
                    try:
                        replan = await self.executor.execute(body, state, desired, connection, observed, action)
                    except WritesStopped:
                        return  # paused or ObserveOnly while it waited for a job slot: nothing was sent
                if replan:
                    break  # the ledger said more than the plan knew: plan again
        raise fail(Reason.NOT_CONVERGED, "the instance did not converge after repeated changes; will retry")

    async def _settled(
        self,
        body: Mapping[str, Any],
        state: LoopState,
        desired: Desired,
        observed: ObservedInstance | None,
        current: Plan,
        connection: Connection,
    ) -> None:
        """A pass that acts no more: spec.expose's Service made to show it (a Kubernetes write, never a
        TrueNAS one: also while paused or observing), then the status written."""
        if self.exposer is not None and not (body.get("metadata") or {}).get("deletionTimestamp"):
            shown = observed if current.blocked is None or current.blocked.ours else None  # never another's
            await self._expose(body, state, desired, shown, current, connection.key, connection.config.url)
        await self.reporter.write(state, desired, observed, plan=current, version=connection.version)
        exposure = state.exposure.condition if state.exposure is not None else None
        # A Service that could not be written or removed is tried again at the next pass, with or
        # without spec.expose (a removal that failed once must not wait for another input to move).
        state.clean = current.blocked is None and (exposure is None or exposure[1] != Reason.EXPOSE_FAILED)

    async def _expose(
        self,
        body: Mapping[str, Any],
        state: LoopState,
        desired: Desired,
        observed: ObservedInstance | None,
        current: Plan,
        key: str,
        url: str | None,
    ) -> None:
        assert self.exposer is not None
        bounds = EndpointBounds.of(self.policy.endpoint_networks(desired.namespace, key), url)
        previous = state.exposure
        state.exposure = await self.exposer.sync(
            desired, observed, current, state.expose, previous, state.status, bounds
        )
        self._announce_exposure(body, state, previous)

    async def _expose_denied(
        self, body: Mapping[str, Any], desired: Desired, state: LoopState, key: str, denied: Blocked
    ) -> None:
        """The policy refuses the resource: where it refuses spec.expose (a rule tightened since) the
        Service goes; else its endpoints stay, not ready (nothing of the instance is reported)."""
        if self.exposer is None or (desired.spec.expose is None and state.exposure is not None):
            return
        if self.policy.expose_violations(desired.namespace, key, desired.spec):
            state.exposure = await self.exposer.withdraw(desired, state.status)
            state.expose.applied = None
            return
        known = self.connections.connections.get(key)
        url = known.config.url if known is not None else None
        await self._expose(body, state, desired, None, Plan(blocked=denied), key, url)

    def _announce_exposure(self, body: Mapping[str, Any], state: LoopState, previous: Exposure | None) -> None:
        """An Event when the Service is made, refused or cannot be written (once per change of reason)."""
        now = state.exposure.condition if state.exposure is not None else None
        before = previous.condition if previous is not None else None
        if now is None or now[1] not in EXPOSE_EVENTS or (before is not None and before[1] == now[1]):
            return
        kind = "Normal" if now[1] == Reason.EXPOSED else "Warning"
        self.reporter.post_event(body, kind, now[1], now[2])

    async def _clone_source(self, desired: Desired, connection: Connection) -> CloneSource:
        if self.sources is None:
            raise fail(Reason.UNSUPPORTED, "spec.source: this operator makes no clones (no snapshot support)")
        return await self.sources.resolve(desired, connection)

    async def _recheck_holder(self, desired: Desired, connection: Connection) -> None:
        """A record held by another UID is read again before it blocks this resource: the ledger is
        loaded at startup, and a stale record an administrator deleted (or one released by another
        operator) must stop blocking without a restart. One read per pass of a blocked resource."""
        held = self.ledger.get(connection.identity, desired.instance_name)
        if held is not None and held.owner_uid != desired.uid:
            await self.ledger.reread(held.truenas, held.instance)
        elif held is not None and not held.observed_only:
            # What a reaper does with the instance if this resource ever vanishes unseen (docs/security.md):
            # while paused, nothing (the resource's own deletion waits for the resume instead).
            policy = "Orphan" if desired.paused else desired.deletion_policy
            if held.deletion_policy != policy:
                await self.ledger.set_deletion_policy(held, policy)

    async def _observed_devices(
        self, desired: Desired, state: LoopState, connection: Connection, observed: ObservedInstance | None
    ) -> list[DeviceConfig] | None:
        """ObserveOnly: the instance's devices (the status mirrors them; InSync compares them where Full
        would), read again when the devices key moves (a spec change, a reconnect, the audit rotation)
        and kept in between, so every pass compares them (InSync must not forget a difference)."""
        if observed is None or not desired.owns or desired.ownership.holder:
            return None
        seen = self._devices_key(desired, connection)
        if state.observed_devices is None or state.observed_devices[0] != seen:
            client = connection.client
            if client is None:
                return None
            state.observed_devices = (seen, await client.instances.list_devices(desired.instance_name))
        return list(state.observed_devices[1])

    def _announce_pause(self, body: Mapping[str, Any], state: LoopState, now_paused: bool) -> None:
        """ReconciliationPaused when the annotation appears, ReconciliationResumed when it goes (once each)."""
        if now_paused and state.paused is not True:
            self.reporter.post_event(
                body,
                "Normal",
                Reason.RECONCILIATION_PAUSED,
                f"{PAUSED_ANNOTATION} is set: the operator writes nothing to TrueNAS for this resource until it is "
                "removed",
            )
        elif not now_paused and state.paused:
            self.reporter.post_event(body, "Normal", "ReconciliationResumed", f"{PAUSED_ANNOTATION} removed")
        state.paused = now_paused

    @staticmethod
    def _devices_key(desired: Desired, connection: Connection) -> tuple[int, int, int]:
        """When devices are compared with TrueNAS: on a spec change, after a reconnect (when the spec
        lists devices), and when the connection's audit rotation reaches the instance."""
        epoch = connection.epoch if desired.lists_devices else 0
        return desired.generation, epoch, connection.audit_marks.get(desired.instance_name, 0)

    def _announce(self, body: Mapping[str, Any], state: LoopState, current: Plan, system_version: str) -> None:
        """Events for a settled pass: why it is blocked, or which fields this TrueNAS cannot honour."""
        if current.blocked is not None:
            self.reporter.post_once(body, state, "Warning", current.blocked.reason, current.blocked.message)
            return
        state.posted = None
        if current.unsupported and current.unsupported != state.unsupported_posted:
            fields = ", ".join(current.unsupported)
            self.reporter.post_event(body, "Warning", "Unsupported", f"{system_version} cannot honour: {fields}")
        state.unsupported_posted = current.unsupported
