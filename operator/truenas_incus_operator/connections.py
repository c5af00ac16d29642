"""Connections to TrueNAS systems and what each one observes.

A ``Connection`` owns one client, keeps a cache of every instance on that TrueNAS, refreshed by
one ``query`` per resync interval (however many resources use it) and by ``collection_update``
events where the transport has them, and wakes the reconcile loops whose instance changed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any

from .status import Problem
from .truenas import (
    APIUnavailable,
    AuthenticationFailed,
    NotAuthorized,
    ObservedInstance,
    TransportError,
    TrueNASClient,
    TrueNASError,
    connect,
)
from .truenas.transports.base import Secret

log = logging.getLogger(__name__)
DEFAULT_KEY = "<default>"
Wake = Callable[[], None]
Reload = Callable[[], Awaitable["ConnectionSpec"]]


@dataclass(frozen=True)
class ConnectionSpec:
    url: str
    api_key: Secret
    transport: str = "websocket"
    ca_pem: str | None = None
    insecure_skip_verify: bool = False
    max_concurrent_calls: int = 20


def problem_from(exc: BaseException) -> Problem:
    """The Synced reason for a failure to reach or use TrueNAS."""
    if isinstance(exc, AuthenticationFailed):
        return Problem("AuthenticationFailed", exc.message)
    if isinstance(exc, NotAuthorized):
        return Problem("NotAuthorized", exc.message)
    if isinstance(exc, APIUnavailable):
        return Problem("APIUnavailable", exc.message)
    if isinstance(exc, TransportError):
        return Problem("Unreachable", exc.message)
    if isinstance(exc, TrueNASError):
        return Problem("CallFailed", exc.message)
    return Problem("InternalError", f"{type(exc).__name__}: {exc}")


class Connection:
    def __init__(
        self,
        key: str,
        spec: ConnectionSpec,
        resync_seconds: float,
        retry_max_seconds: float = 300.0,
        call_timeout: float = 60.0,
        job_timeout: float = 900.0,
        reload: Reload | None = None,
    ) -> None:
        self.key = key
        self.spec = spec
        self.reload = reload
        """Re-reads the configuration (e.g. the API key Secret) after an authentication failure."""
        self.resync_seconds = resync_seconds
        self.retry_max_seconds = retry_max_seconds
        self.call_timeout = call_timeout
        self.job_timeout = job_timeout
        self.client: TrueNASClient | None = None
        self.problem: Problem | None = Problem("Connecting", f"connecting to {spec.url}")
        self.instances: dict[str, ObservedInstance] = {}
        self.epoch = 0
        """Counts connects: what was read before a reconnect (say, across a TrueNAS upgrade) may be stale."""
        self.ready = asyncio.Event()
        self.job_slots = asyncio.Semaphore(spec.max_concurrent_calls)
        self._listeners: dict[str, set[Wake]] = {}
        self._all_listeners: set[Wake] = set()
        self._task: asyncio.Task[None] | None = None
        self._refresh_lock = asyncio.Lock()
        self._refresh_requested = asyncio.Event()
        self._lookups: set[str] = set()

    # ----- listeners ------------------------------------------------------------------------------
    def listen(self, instance_name: str, wake: Wake) -> None:
        self._listeners.setdefault(instance_name, set()).add(wake)
        self._all_listeners.add(wake)

    def unlisten(self, instance_name: str, wake: Wake) -> None:
        self._listeners.get(instance_name, set()).discard(wake)
        self._all_listeners.discard(wake)

    def _notify(self, instance_name: str) -> None:
        for wake in list(self._listeners.get(instance_name, ())):
            wake()

    def _notify_all(self) -> None:
        for wake in list(self._all_listeners):
            wake()

    # ----- lifecycle ---------------------------------------------------------------------------------
    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"truenas-connection {self.key}")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self.client is not None:
            with contextlib.suppress(Exception):
                await self.client.close()
            self.client = None

    async def _run(self) -> None:
        delay = 1.0
        while True:
            try:
                await self._connect()
                delay = 1.0
                await self._observe()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.problem = problem_from(exc)
                self.ready.clear()
                log.warning("TrueNAS connection %s: %s", self.key, self.problem.message)
                if self.client is not None:
                    with contextlib.suppress(Exception):
                        await self.client.close()
                    self.client = None
                self._notify_all()
                await asyncio.sleep(delay * random.uniform(0.8, 1.2))
                delay = min(delay * 2, self.retry_max_seconds)
                if isinstance(exc, AuthenticationFailed) and self.reload is not None:
                    with contextlib.suppress(Exception):
                        self.spec = await self.reload()

    async def _connect(self) -> None:
        spec = self.spec
        self.client = await connect(
            spec.url,
            spec.api_key,
            transport=spec.transport,
            ca_pem=spec.ca_pem,
            insecure_skip_verify=spec.insecure_skip_verify,
            max_concurrent_calls=spec.max_concurrent_calls,
            call_timeout=self.call_timeout,
            job_timeout=self.job_timeout,
        )
        reconnect = getattr(self.client.transport, "on_reconnect", None)
        if isinstance(reconnect, list):
            reconnect.append(self.request_refresh)
        await self.client.instances.watch(self._on_event)
        await self.refresh()
        self.epoch += 1
        self.problem = None
        self.ready.set()
        log.info("TrueNAS connection %s: %s, %s", self.key, self.client.system_version, self.client.api_family)
        self._notify_all()

    async def _observe(self) -> None:
        """One query per resync interval (sooner when asked, e.g. after a reconnect)."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._refresh_requested.wait(), self.resync_seconds)
            self._refresh_requested.clear()
            await self.refresh()

    def request_refresh(self) -> None:
        self._refresh_requested.set()

    async def refresh(self) -> None:
        """Re-reads every instance with one query and wakes the loops whose instance changed."""
        client = self._client()
        async with self._refresh_lock:
            listed = await client.instances.list_instances()
        fresh = {instance.name: instance for instance in listed}
        before = self.instances
        self.instances = fresh
        for name in set(before) | set(fresh):
            if before.get(name) != fresh.get(name):
                self._notify(name)

    async def refresh_one(self, name: str) -> ObservedInstance | None:
        """Re-reads one instance (after the operator changed it)."""
        instance = await self._client().instances.get_instance(name)
        self._store(name, instance)
        return instance

    def remember(self, instance: ObservedInstance) -> None:
        """Records what a create/update job returned."""
        self._store(instance.name, instance)

    def remember_gone(self, name: str) -> None:
        """Records that an instance was deleted."""
        self._store(name, None)

    def _store(self, name: str, instance: ObservedInstance | None) -> None:
        """Records an observation; wakes the loops only when it changed (else a failing loop wakes itself)."""
        before = self.instances.get(name)
        if instance is None:
            self.instances.pop(name, None)
        else:
            self.instances[name] = instance
        if before != instance:
            self._notify(name)

    def _on_event(self, kind: str, name: str, fields: dict[str, Any] | None) -> None:
        """``collection_update`` for instances: apply what it carries, look up what it lacks."""
        if kind == "removed":
            self._store(name, None)
            return
        client = self.client
        full = client.instances.instance_from_event(fields) if client and fields else None
        if full is not None:
            self._store(name, full)
            return
        current = self.instances.get(name)
        status = (fields or {}).get("status")
        if current is not None and isinstance(status, str):
            addresses = current.addresses if status == "RUNNING" else ()
            self._store(name, replace(current, status=status, addresses=addresses))
        if current is None or status == "RUNNING":
            self._schedule_lookup(name)  # addresses (and new instances) only come with a full read

    def _schedule_lookup(self, name: str) -> None:
        if name in self._lookups:
            return
        self._lookups.add(name)

        async def lookup() -> None:
            try:
                await asyncio.sleep(0.05)  # let a burst of events for one instance settle
                await self.refresh_one(name)
            except TrueNASError as exc:
                log.info("TrueNAS connection %s: reading %s after an event failed: %s", self.key, name, exc.message)
            finally:
                self._lookups.discard(name)

        asyncio.get_running_loop().create_task(lookup())

    def _client(self) -> TrueNASClient:
        if self.client is None:
            raise TransportError(self.problem.message if self.problem else "not connected")
        return self.client

    @property
    def version(self) -> str | None:
        return self.client.system_version if self.client else None


class ConnectionManager:
    """Connections by key: the operator's default one and one per TrueNASConnection."""

    def __init__(
        self, resync_seconds: float, retry_max_seconds: float, call_timeout: float, job_timeout: float
    ) -> None:
        self.resync_seconds = resync_seconds
        self.retry_max_seconds = retry_max_seconds
        self.call_timeout = call_timeout
        self.job_timeout = job_timeout
        self.connections: dict[str, Connection] = {}
        self.problems: dict[str, Problem] = {}
        """Keys whose configuration is unusable (e.g. a missing Secret), with the reason."""
        self._waiters: dict[str, set[Wake]] = {}

    def watch_key(self, key: str, wake: Wake) -> None:
        """Wakes ``wake`` when the connection under ``key`` is (re)configured or removed."""
        self._waiters.setdefault(key, set()).add(wake)

    def unwatch_key(self, key: str, wake: Wake) -> None:
        self._waiters.get(key, set()).discard(wake)

    def _wake_key(self, key: str) -> None:
        for wake in list(self._waiters.get(key, ())):
            wake()

    async def configure(self, key: str, spec: ConnectionSpec, reload: Reload | None = None) -> Connection:
        current = self.connections.get(key)
        if current is not None and current.spec == spec:
            return current
        if current is not None:
            await current.close()
        connection = Connection(
            key, spec, self.resync_seconds, self.retry_max_seconds, self.call_timeout, self.job_timeout, reload
        )
        self.connections[key] = connection
        self.problems.pop(key, None)
        connection.start()
        self._wake_key(key)
        return connection

    async def unusable(self, key: str, problem: Problem) -> None:
        current = self.connections.pop(key, None)
        if current is not None:
            await current.close()
        self.problems[key] = problem
        self._wake_key(key)

    async def remove(self, key: str) -> None:
        await self.unusable(key, Problem("ConnectionNotFound", f"TrueNASConnection {key} does not exist"))

    def get(self, key: str) -> Connection:
        """The connection for ``key``; raises ``ConnectionProblem`` when there is none."""
        connection = self.connections.get(key)
        if connection is not None:
            return connection
        problem = self.problems.get(key)
        if problem is None:
            if key == DEFAULT_KEY:
                problem = Problem(
                    "NoConnection",
                    "no spec.connectionRef and the operator has no default connection (set TIO_TRUENAS_URL)",
                )
            else:
                problem = Problem("ConnectionNotFound", f"TrueNASConnection {key} does not exist (yet)")
        raise ConnectionProblem(problem)

    async def close(self) -> None:
        for connection in list(self.connections.values()):
            await connection.close()
        self.connections.clear()


class ConnectionProblem(Exception):
    def __init__(self, problem: Problem) -> None:
        super().__init__(problem.message)
        self.problem = problem
