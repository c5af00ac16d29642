"""The reconcile loops: observe (from the connection's cache), plan (``reconcile.py``), act
(the TrueNAS client), report (``status.py``). One loop per IncusInstance, run by a kopf daemon.

Nothing here imports kopf: the handlers pass in how to post Events and hand over live bodies.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from .connections import (
    DEFAULT_KEY,
    Connection,
    ConnectionManager,
    ConnectionProblem,
    ConnectionSpec,
    problem_from,
)
from .kube import Kube, KubeError
from .models import ADOPT_ANNOTATION, IncusInstanceSpec, Phase, TrueNASConnectionSpec
from .reconcile import (
    CREATED_ANNOTATION,
    Action,
    AddDevice,
    Blocked,
    Create,
    Delete,
    Desired,
    MarkCreating,
    Plan,
    RemoveDevice,
    Start,
    Stop,
    Update,
    UpdateDevice,
    instance_config,
    plan,
    plan_delete,
)
from .settings import OperatorSettings
from .status import Problem, build_status, differs, merge_conditions, now
from .truenas import ImageNotFound, JobFailed, NotFound, ObservedInstance, TrueNASError, ValidationFailed
from .truenas.transports.base import Secret

log = logging.getLogger(__name__)
PLURAL = "incusinstances"
CONNECTION_PLURAL = "truenasconnections"
EventPoster = Callable[[Mapping[str, Any], str, str, str], None]
"""``(body, type, reason, message)``: posts a Kubernetes Event about the object."""
MAX_STEPS_PER_PASS = 12
STATUS_HEARTBEAT_SECONDS = 300.0


class RetryLater(Exception):
    """Deletion could not finish; retry after ``delay`` seconds."""

    def __init__(self, problem: Problem, delay: float) -> None:
        super().__init__(problem.message)
        self.problem = problem
        self.delay = delay


@dataclass
class LoopState:
    status: dict[str, Any]
    failures: int = 0
    posted: tuple[str, str] | None = None
    devices_seen: tuple[int, int] | None = None
    """(generation, connection epoch) whose devices were compared with TrueNAS."""
    unsupported_posted: tuple[str, ...] = ()
    written_at: float = 0.0
    listening: tuple[Connection, str] | None = None
    watching_key: str | None = None
    annotations: dict[str, str | None] = field(default_factory=dict)
    """Annotations patched by this loop (kopf's view catches up with the next watch event)."""


@dataclass
class Claim:
    created: str
    uid: str
    owner: tuple[str, str]


def desired_from(body: Mapping[str, Any], written: Mapping[str, str | None] | None = None) -> Desired:
    """``written``: annotations this operator patched that the watch may not have delivered yet."""
    meta = body.get("metadata", {})
    annotations = dict(meta.get("annotations") or {})
    for key, value in (written or {}).items():
        if value is None:
            annotations.pop(key, None)
        else:
            annotations[key] = value
    return Desired(
        namespace=meta.get("namespace", ""),
        name=meta.get("name", ""),
        generation=int(meta.get("generation") or 0),
        spec=IncusInstanceSpec.model_validate(dict(body.get("spec") or {})),
        annotations=annotations,
        deleting=bool(meta.get("deletionTimestamp")),
    )


def connection_key(namespace: str, spec: IncusInstanceSpec) -> str:
    return f"{namespace}/{spec.connection_ref.name}" if spec.connection_ref else DEFAULT_KEY


def classify(exc: TrueNASError) -> Problem:
    """Synced reason for a failed TrueNAS call, with TrueNAS's own message."""
    if isinstance(exc, ValidationFailed):
        return Problem("ValidationFailed", str(exc))
    if isinstance(exc, ImageNotFound):
        return Problem("ImageNotFound", exc.message)
    if isinstance(exc, JobFailed):
        if "image" in exc.message.lower():
            return Problem("ImageNotFound", exc.message)
        return Problem("JobFailed", exc.message)
    return problem_from(exc)


@dataclass
class Controller:
    settings: OperatorSettings
    kube: Kube
    connections: ConnectionManager
    post_event: EventPoster
    wakes: dict[tuple[str, str], asyncio.Event] = field(default_factory=dict)
    claims: dict[tuple[str, str], Claim] = field(default_factory=dict)
    signatures: dict[tuple[str, str], tuple[Any, ...]] = field(default_factory=dict)
    creating: set[tuple[str, str]] = field(default_factory=set)
    """Resources whose create call is in flight in this process (deletion waits for them)."""

    # ----- wake-ups ------------------------------------------------------------------------------------
    def wake(self, namespace: str, name: str) -> None:
        event = self.wakes.get((namespace, name))
        if event is not None:
            event.set()

    def resource_changed(self, body: Mapping[str, Any]) -> None:
        """A watch event: wakes the loop only if something it acts on changed.

        The operator's own writes (status, its annotations) come back as events too; waking on those
        would cut every backoff short and loop hot.
        """
        meta = body.get("metadata", {})
        key = (meta.get("namespace", ""), meta.get("name", ""))
        annotations = meta.get("annotations") or {}
        signature = (meta.get("generation"), annotations.get(ADOPT_ANNOTATION), bool(meta.get("deletionTimestamp")))
        if self.signatures.get(key) != signature:
            self.signatures[key] = signature
            self.wake(*key)

    def _waker(self, key: tuple[str, str]) -> Callable[[], None]:
        event = self.wakes.setdefault(key, asyncio.Event())
        return event.set

    # ----- the loop --------------------------------------------------------------------------------------
    async def run_instance(self, body: Mapping[str, Any], stopped: Any) -> None:
        """Reconciles one IncusInstance until the daemon is stopped. ``body`` is kopf's live view."""
        meta = body.get("metadata", {})
        key = (meta.get("namespace", ""), meta.get("name", ""))
        wake = self._waker(key)
        event = self.wakes[key]
        state = LoopState(status=dict(body.get("status") or {}))
        try:
            while not stopped:
                event.clear()
                delay = await self.reconcile_once(body, state, wake)
                await _sleep(event, stopped, delay)
        finally:
            self._forget(key, state, wake)

    def _forget(self, key: tuple[str, str], state: LoopState, wake: Callable[[], None]) -> None:
        if state.listening is not None:
            connection, instance = state.listening
            connection.unlisten(instance, wake)
        if state.watching_key is not None:
            self.connections.unwatch_key(state.watching_key, wake)
        for claim_key, claim in list(self.claims.items()):
            if claim.owner == key:
                del self.claims[claim_key]
        self.wakes.pop(key, None)
        self.signatures.pop(key, None)

    async def reconcile_once(self, body: Mapping[str, Any], state: LoopState, wake: Callable[[], None]) -> float:
        """One pass; returns the seconds until the next unprompted pass."""
        try:
            desired = desired_from(body, state.annotations)
        except ValidationError as exc:
            # Admission refuses this; an older CRD might not have. Report and wait for a change.
            problem = Problem(
                "InvalidSpec", "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            )
            await self._report_problem(body, state, problem, generation=int(body["metadata"].get("generation") or 0))
            return self.settings.retry_max_seconds
        if desired.deleting:
            return self.settings.resync_seconds
        key = connection_key(desired.namespace, desired.spec)
        if state.watching_key != key:
            if state.watching_key is not None:
                self.connections.unwatch_key(state.watching_key, wake)
            self.connections.watch_key(key, wake)
            state.watching_key = key
        try:
            connection = self.connections.get(key)
            self._listen(state, connection, desired.instance_name, wake)
            if not connection.ready.is_set():
                raise ConnectionProblem(connection.problem or Problem("Connecting", "connecting to TrueNAS"))
            conflict = self._claim(key, desired, body)
            if conflict is not None:
                await self._write(body, state, desired, None, plan=Plan(blocked=conflict), version=connection.version)
                self._post_once(body, state, "Warning", conflict.reason, conflict.message)
                return self.settings.resync_seconds
            await self._converge(body, state, desired, connection)
        except ConnectionProblem as exc:
            return await self._failed(body, state, desired, exc.problem)
        except TrueNASError as exc:
            return await self._failed(body, state, desired, classify(exc))
        except KubeError as exc:
            log.warning("%s/%s: %s", desired.namespace, desired.name, exc)
            return self._backoff(state)
        state.failures = 0
        return self.settings.resync_seconds * random.uniform(0.9, 1.1)

    def _listen(self, state: LoopState, connection: Connection, instance: str, wake: Callable[[], None]) -> None:
        if state.listening == (connection, instance):
            return
        if state.listening is not None:
            old, old_name = state.listening
            old.unlisten(old_name, wake)
        connection.listen(instance, wake)
        state.listening = (connection, instance)

    def _claim(self, key: str, desired: Desired, body: Mapping[str, Any]) -> Blocked | None:
        """Two resources must never drive one instance: the older resource keeps it."""
        meta = body.get("metadata", {})
        mine = Claim(
            str(meta.get("creationTimestamp", "")), str(meta.get("uid", "")), (desired.namespace, desired.name)
        )
        slot = (key, desired.instance_name)
        held = self.claims.get(slot)
        if held is None or held.owner == mine.owner or (mine.created, mine.uid) < (held.created, held.uid):
            if held is not None and held.owner != mine.owner:
                self.wake(*held.owner)
            self.claims[slot] = mine
            return None
        owner = f"{held.owner[0]}/{held.owner[1]}"
        return Blocked(
            "Conflict", f"the instance {desired.instance_name!r} is already managed by IncusInstance {owner}"
        )

    async def _converge(
        self, body: Mapping[str, Any], state: LoopState, desired: Desired, connection: Connection
    ) -> None:
        client = connection.client
        assert client is not None
        backend = client.instances
        for _ in range(MAX_STEPS_PER_PASS):
            desired = desired_from(body, state.annotations)
            if desired.deleting:
                return  # the delete handler takes over; kopf stops this loop
            wanted = instance_config(desired)
            unsupported = tuple(backend.unsupported_fields(wanted))
            observed = connection.instances.get(desired.instance_name)
            devices = None
            seen = (desired.generation, connection.epoch)
            if observed is not None and desired.manages_devices and state.devices_seen != seen:
                devices = await backend.list_devices(desired.instance_name)
            current = plan(
                desired,
                observed,
                devices,
                unsupported,
                config=backend.honoured(wanted),
                identity=backend.device_identity,
            )
            if devices is not None and not any(_is_device_action(a) for a in current.actions):
                state.devices_seen = seen
            if current.blocked is not None or not current.actions:
                await self._write(body, state, desired, observed, plan=current, version=connection.version)
                if current.blocked is not None:
                    self._post_once(body, state, "Warning", current.blocked.reason, current.blocked.message)
                else:
                    state.posted = None
                    if current.unsupported and current.unsupported != state.unsupported_posted:
                        fields = ", ".join(current.unsupported)
                        self.post_event(
                            body, "Warning", "Unsupported", f"{client.system_version} cannot honour: {fields}"
                        )
                    state.unsupported_posted = current.unsupported
                return
            for action in current.actions:
                await self._execute(body, state, desired, connection, observed, action)
        raise TrueNASError("the instance did not converge after repeated changes; will retry")

    async def _execute(
        self,
        body: Mapping[str, Any],
        state: LoopState,
        desired: Desired,
        connection: Connection,
        observed: ObservedInstance | None,
        action: Action,
    ) -> None:
        client = connection.client
        assert client is not None
        backend = client.instances
        name = desired.instance_name
        if isinstance(action, MarkCreating):
            await self.kube.patch_annotations(PLURAL, desired.namespace, desired.name, {CREATED_ANNOTATION: name})
            state.annotations[CREATED_ANNOTATION] = name
            return
        if isinstance(action, Create):
            key = (desired.namespace, desired.name)
            if desired_from(body, state.annotations).deleting:
                return  # kopf may run the delete handler while this loop winds down: never create then
            await self._write(body, state, desired, None, activity=Phase.CREATING, version=connection.version)
            self.creating.add(key)
            try:
                async with connection.job_slots:
                    created = await backend.create(action.config)
            except ValidationFailed as exc:
                if any("already exists" in e.message for e in exc.errors):
                    if desired.created_by_us and await connection.refresh_one(name) is not None:
                        return  # an earlier attempt (before a crash) created it: it is ours
                    # Someone else's instance took the name between our look and our create.
                    await self._forget_creation(desired, state)
                    await connection.refresh_one(name)
                raise
            except TrueNASError:
                if await connection.refresh_one(name) is None:
                    await self._forget_creation(desired, state)
                raise
            finally:
                self.creating.discard(key)
            connection.remember(created)
            self.post_event(body, "Normal", "Created", f"created {created.type} {name} on TrueNAS")
        elif isinstance(action, Update):
            async with connection.job_slots:
                connection.remember(await backend.update(name, action.changes))
        elif isinstance(action, AddDevice):
            await backend.add_device(name, action.device)
        elif isinstance(action, UpdateDevice):
            await backend.update_device(name, action.device, action.target)
        elif isinstance(action, RemoveDevice):
            await backend.delete_device(name, action.name)
        elif isinstance(action, Start):
            await self._write(body, state, desired, observed, activity=Phase.STARTING, version=connection.version)
            async with connection.job_slots:
                await backend.start(name)
            await connection.refresh_one(name)
        elif isinstance(action, Stop):
            await self._write(body, state, desired, observed, activity=Phase.STOPPING, version=connection.version)
            await self._stop(connection, name, action.timeout)
            await connection.refresh_one(name)
        elif isinstance(action, Delete):
            async with connection.job_slots:
                await backend.delete(name)
            connection.remember_gone(name)
        if _is_device_action(action):
            await connection.refresh_one(name)

    async def _stop(self, connection: Connection, name: str, timeout: int) -> None:
        """Graceful within ``timeout`` seconds, then forced."""
        backend = connection.client.instances  # type: ignore[union-attr]
        async with connection.job_slots:
            try:
                await backend.stop(name, timeout=timeout)
                return
            except JobFailed as exc:
                log.info("graceful stop of %s failed (%s); forcing", name, exc.message)
            await backend.stop(name, force=True)

    async def _forget_creation(self, desired: Desired, state: LoopState) -> None:
        await self.kube.patch_annotations(PLURAL, desired.namespace, desired.name, {CREATED_ANNOTATION: None})
        state.annotations[CREATED_ANNOTATION] = None

    # ----- reporting ---------------------------------------------------------------------------------------
    async def _write(
        self,
        body: Mapping[str, Any],
        state: LoopState,
        desired: Desired,
        observed: ObservedInstance | None,
        *,
        plan: Plan | None = None,
        problem: Problem | None = None,
        activity: Phase | None = None,
        version: str | None = None,
    ) -> None:
        status = build_status(
            desired, observed, previous=state.status, plan=plan, problem=problem, activity=activity, version=version
        )
        heartbeat = time.monotonic() - state.written_at > STATUS_HEARTBEAT_SECONDS
        if not differs(state.status, status) and not heartbeat:
            return
        status["lastSyncTime"] = now()
        await self.kube.patch_status(PLURAL, desired.namespace, desired.name, status)
        state.status = {k: v for k, v in status.items() if v is not None}
        state.written_at = time.monotonic()

    async def _failed(self, body: Mapping[str, Any], state: LoopState, desired: Desired, problem: Problem) -> float:
        connection = None
        with contextlib.suppress(ConnectionProblem):
            connection = self.connections.get(connection_key(desired.namespace, desired.spec))
        observed = connection.instances.get(desired.instance_name) if connection and connection.ready.is_set() else None
        try:
            await self._write(
                body, state, desired, observed, problem=problem, version=connection.version if connection else None
            )
        except KubeError as exc:
            log.warning("%s/%s: cannot write status: %s", desired.namespace, desired.name, exc)
        self._post_once(body, state, "Warning", problem.reason, problem.message)
        return self._backoff(state)

    async def _report_problem(
        self, body: Mapping[str, Any], state: LoopState, problem: Problem, generation: int
    ) -> None:
        status = {
            "phase": Phase.ERROR.value,
            "observedGeneration": generation,
            "conditions": merge_conditions(
                state.status.get("conditions"),
                {
                    "Ready": ("False", "InvalidSpec", problem.message),
                    "Synced": ("False", problem.reason, problem.message),
                },
                generation,
            ),
            "message": f"{problem.reason}: {problem.message}",
        }
        meta = body["metadata"]
        if differs(state.status, status):
            with contextlib.suppress(KubeError):
                await self.kube.patch_status(PLURAL, meta["namespace"], meta["name"], status)
                state.status = status
        self._post_once(body, state, "Warning", problem.reason, problem.message)

    def _post_once(self, body: Mapping[str, Any], state: LoopState, kind: str, reason: str, message: str) -> None:
        """One Event per distinct problem, not one per retry."""
        if state.posted == (reason, message):
            return
        state.posted = (reason, message)
        self.post_event(body, kind, reason, message)

    def _backoff(self, state: LoopState) -> float:
        state.failures += 1
        delay = min(self.settings.retry_max_seconds, self.settings.retry_min_seconds * 2.0 ** (state.failures - 1))
        return delay * random.uniform(0.8, 1.2)

    # ----- deletion ------------------------------------------------------------------------------------------
    async def delete_instance(self, body: Mapping[str, Any], retry: int) -> None:
        """Stops and deletes the instance (or leaves it, with Orphan); raises ``RetryLater`` on failure."""
        desired = desired_from(body)
        state = LoopState(status=dict(body.get("status") or {}))
        key = connection_key(desired.namespace, desired.spec)
        try:
            if desired.deletion_policy == "Orphan":
                self.post_event(
                    body, "Normal", "Orphaned", f"left {desired.instance_name} on TrueNAS (deletionPolicy: Orphan)"
                )
                return
            connection = self.connections.get(key)
            if not connection.ready.is_set():
                await asyncio.wait_for(connection.ready.wait(), 10)
            if (desired.namespace, desired.name) in self.creating:
                raise RetryLater(Problem("CreateInProgress", f"{desired.instance_name} is being created"), 1.0)
            for _ in range(4):
                observed = await connection.refresh_one(desired.instance_name)
                current = plan_delete(desired, observed)
                if current.waiting:
                    await asyncio.sleep(1)
                    continue
                if not current.actions:
                    client = connection.client
                    if (
                        observed is None
                        and desired.created_by_us
                        and client is not None
                        and await client.instances.create_in_progress(desired.instance_name)
                    ):
                        # Started before a crash: it would leave an instance behind once it ends.
                        problem = Problem(
                            "CreateInProgress", f"a create job for {desired.instance_name} is still running"
                        )
                        raise RetryLater(problem, 2.0)
                    if observed is None and desired.may_manage_existing:
                        self.post_event(body, "Normal", "Deleted", f"deleted {desired.instance_name} on TrueNAS")
                    return
                await self._write(body, state, desired, observed, activity=Phase.DELETING, version=connection.version)
                for action in current.actions:
                    try:
                        await self._execute(body, state, desired, connection, observed, action)
                    except NotFound:
                        connection.remember_gone(desired.instance_name)
            raise TrueNASError("the instance is still there after deleting it")
        except (ConnectionProblem, TimeoutError) as exc:
            problem = (
                exc.problem
                if isinstance(exc, ConnectionProblem)
                else Problem("Unreachable", "TrueNAS is not connected")
            )
        except TrueNASError as exc:
            problem = classify(exc)
            problem = Problem("DeleteFailed", f"{problem.reason}: {problem.message}")
        except KubeError as exc:
            problem = Problem("KubernetesError", str(exc))
        delay = min(self.settings.retry_max_seconds, self.settings.retry_min_seconds * 2.0**retry)
        with contextlib.suppress(KubeError):
            await self._write(body, state, desired, None, problem=problem)
        self.post_event(body, "Warning", problem.reason, problem.message)
        raise RetryLater(problem, delay)

    # ----- TrueNASConnection ------------------------------------------------------------------------------
    async def sync_connection(self, body: Mapping[str, Any]) -> None:
        """(Re)configures the connection a TrueNASConnection describes, and reports on it."""
        meta = body["metadata"]
        namespace, name = meta["namespace"], meta["name"]
        key = f"{namespace}/{name}"
        if meta.get("deletionTimestamp"):
            await self.connections.remove(key)
            return
        spec = TrueNASConnectionSpec.model_validate(dict(body.get("spec") or {}))

        async def load() -> ConnectionSpec:
            api_key = await self.kube.read_secret_key(
                namespace, spec.api_key_secret_ref.name, spec.api_key_secret_ref.key
            )
            ca_pem = None
            if spec.tls and spec.tls.ca_secret_ref:
                ref = spec.tls.ca_secret_ref
                ca_pem = await self.kube.read_secret_key(namespace, ref.name, ref.key)
            return ConnectionSpec(
                url=spec.url,
                api_key=Secret(api_key),
                transport=str(spec.transport or "websocket"),
                ca_pem=ca_pem,
                insecure_skip_verify=bool(spec.tls and spec.tls.insecure_skip_verify),
                max_concurrent_calls=spec.max_concurrent_calls or 20,
            )

        try:
            connection_spec = await load()
        except KubeError as exc:
            problem = Problem("SecretNotFound" if exc.status == 404 else "SecretUnreadable", str(exc))
            await self.connections.unusable(key, problem)
            await self._connection_status(body, problem, None)
            return
        connection = await self.connections.configure(key, connection_spec, reload=load)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(connection.ready.wait(), 15)
        await self._connection_status(body, connection.problem, connection)

    async def _connection_status(
        self, body: Mapping[str, Any], problem: Problem | None, connection: Connection | None
    ) -> None:
        meta = body["metadata"]
        generation = int(meta.get("generation") or 0)
        ready = ("False", problem.reason, problem.message) if problem else ("True", "Connected", "logged in to TrueNAS")
        previous = dict(body.get("status") or {})
        client = connection.client if connection and problem is None else None
        status = {
            "conditions": merge_conditions(previous.get("conditions"), {"Ready": ready}, generation),
            "version": client.system_version if client else previous.get("version"),
            "apiVersion": client.transport.name if client else previous.get("apiVersion"),
            "apiFamily": client.api_family if client else previous.get("apiFamily"),
            "observedGeneration": generation,
        }
        if differs(previous, status):
            with contextlib.suppress(KubeError):
                await self.kube.patch_status(CONNECTION_PLURAL, meta["namespace"], meta["name"], status)

    async def configure_default(self) -> None:
        """The connection from the operator's settings (``TIO_TRUENAS_*``), if any."""
        if not self.settings.truenas_url:
            return
        try:
            spec = await self._default_spec()
        except ConfigurationProblem as exc:
            await self.connections.unusable(DEFAULT_KEY, exc.problem)
            return
        await self.connections.configure(DEFAULT_KEY, spec, reload=self._default_spec)

    async def _default_spec(self) -> ConnectionSpec:
        """Reads the key (and CA) files again each time: a mounted Secret changes in place."""
        settings = self.settings
        try:
            api_key = settings.default_api_key()
            ca_pem = settings.default_ca()
        except OSError as exc:
            raise ConfigurationProblem(Problem("ConfigurationError", f"{exc.filename}: {exc.strerror}")) from None
        if not api_key:
            raise ConfigurationProblem(
                Problem(
                    "ConfigurationError", "TIO_TRUENAS_URL is set but there is no API key (TIO_TRUENAS_API_KEY_FILE)"
                )
            )
        return ConnectionSpec(
            url=str(settings.truenas_url),
            api_key=Secret(api_key),
            transport=str(settings.truenas_transport),
            ca_pem=ca_pem,
            insecure_skip_verify=settings.truenas_insecure_skip_verify,
            max_concurrent_calls=settings.truenas_max_concurrent_calls,
        )


class ConfigurationProblem(Exception):
    def __init__(self, problem: Problem) -> None:
        super().__init__(problem.message)
        self.problem = problem


def _is_device_action(action: Action) -> bool:
    return isinstance(action, AddDevice | UpdateDevice | RemoveDevice)


async def _sleep(event: asyncio.Event, stopped: Any, delay: float) -> None:
    waits: list[asyncio.Future[Any]] = [asyncio.ensure_future(event.wait())]
    stopper: Awaitable[Any] | None = stopped.wait() if hasattr(stopped, "wait") else None
    if stopper is not None:
        waits.append(asyncio.ensure_future(stopper))
    try:
        await asyncio.wait(waits, timeout=delay, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waits:
            waiter.cancel()
