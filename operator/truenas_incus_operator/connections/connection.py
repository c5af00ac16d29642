"""One TrueNAS: its client, its reconnect loop, and the query per resync interval that keeps the
instance cache fresh however many resources use it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable, Iterable

from ..kube import FENCE
from ..metrics import Metrics
from ..problems import Problem, Reason, problem_of
from ..truenas import (
    DEFAULT_TIMINGS,
    AuthenticationFailed,
    ObservedInstance,
    Timings,
    TransportError,
    TransportPool,
    TrueNASClient,
    TrueNASError,
    connect,
)
from .cache import InstanceCache
from .config import ConnectionConfig, Loader, nas_identity
from .slots import JobSlots

log = logging.getLogger(__name__)
LOOKUP_SETTLE_SECONDS = 0.05
"""Events for one instance come in bursts; one lookup after the burst is enough."""


class Connection:
    def __init__(
        self,
        key: str,
        config: ConnectionConfig,
        *,
        resync_seconds: float,
        retry_max_seconds: float = 300.0,
        timings: Timings = DEFAULT_TIMINGS,
        reload: Loader | None = None,
        on_state: Callable[[Connection], None] | None = None,
        device_audits_per_resync: int = 10,
        metrics: Metrics | None = None,
        pool: TransportPool | None = None,
        job_slots: JobSlots | None = None,
    ) -> None:
        self.key = key
        self.pool = pool
        """Where this connection's transport comes from: shared with every connection of the same
        URL, key and TLS settings (one socket per NAS and key, however many TrueNASConnections)."""
        self.metrics = metrics
        self.config = config
        self.reload = reload
        """Re-reads the configuration (e.g. the API key Secret) after an authentication failure."""
        self.on_state = on_state
        """Called when the connection is established or lost."""
        self.resync_seconds = resync_seconds
        self.retry_max_seconds = retry_max_seconds
        self.timings = timings
        self.client: TrueNASClient | None = None
        self._identity: str | None = None
        self.problem: Problem | None = Problem(Reason.CONNECTING, f"connecting to {config.url}")
        self.cache = InstanceCache(self._schedule_lookup)
        self.epoch = 0
        """Counts connects: what was read before a reconnect (say, across a TrueNAS upgrade) may be stale."""
        self.device_audits_per_resync = device_audits_per_resync
        self.audit_marks: dict[str, int] = {}
        """Per instance: the audit round in which its devices are due to be compared with TrueNAS again."""
        self._audit_round = 0
        self._audit_cursor = ""
        self.ready = asyncio.Event()
        self.job_slots = job_slots if job_slots is not None else JobSlots(config.max_concurrent_calls)
        """Shared with every connection of the same transport (``ConnectionManager``)."""
        self._task: asyncio.Task[None] | None = None
        self._refresh_lock = asyncio.Lock()
        self._refresh_requested = asyncio.Event()
        self._lookups: dict[str, asyncio.Task[None]] = {}
        self._lookup_again: set[str] = set()

    # ----- lifecycle ---------------------------------------------------------------------------------
    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"truenas-connection {self.key}")

    async def close(self) -> None:
        tasks = [t for t in (self._task, *self._lookups.values()) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._task = None
        self._lookups.clear()
        if self.client is not None:
            with contextlib.suppress(Exception):
                await self.client.close()
            self.client = None
        if self.metrics is not None:
            self.metrics.forget_connection(self.key)

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
                await self._lost(problem_of(exc))
                await asyncio.sleep(delay * random.uniform(0.8, 1.2))
                delay = min(delay * 2, self.retry_max_seconds)
                if isinstance(exc, AuthenticationFailed) and self.reload is not None:
                    with contextlib.suppress(Exception):
                        self.config = await self.reload()

    async def _lost(self, problem: Problem) -> None:
        log.warning("TrueNAS connection %s: %s", self.key, problem.message)
        client = self.detach(problem)
        if client is not None:
            with contextlib.suppress(Exception):
                await client.close(broken=True)  # a shared transport is not handed on after it failed

    def detach(self, problem: Problem | None = None) -> TrueNASClient | None:
        """The one way a connection stops being ready (``attach`` is the way back): ``problem`` says why
        (None: still connecting). Returns the client it held, for the caller to close."""
        client, self.client = self.client, None
        self.problem = problem
        self.ready.clear()
        self._state_changed()
        return client

    def _state_changed(self) -> None:
        self.cache.notify_all()
        if self.metrics is not None:
            self.metrics.connection_state(self.key, self.client)
        if self.on_state is not None:
            self.on_state(self)

    async def _connect(self) -> None:
        config = self.config
        self.client = await connect(
            config,
            self.timings,
            may_write=FENCE.is_open,
            observer=self.metrics.truenas(self.key, config.max_concurrent_calls) if self.metrics else None,
            pool=self.pool,
        )
        reconnect = getattr(self.client.transport, "on_reconnect", None)
        if isinstance(reconnect, list):
            reconnect.append(self.request_refresh)
        await self.client.instances.watch(self._on_event)
        await self.refresh()
        self.attach(self.client)
        log.info("TrueNAS connection %s: %s, %s", self.key, self.client.system_version, self.client.api_family)

    def attach(self, client: TrueNASClient, instances: Iterable[ObservedInstance] | None = None) -> None:
        """Takes ``client`` as this connection's, logged in and read (``instances``: what it listed,
        when the caller read them itself): ready from now on. The one way a connection becomes
        connected, for ``_connect`` and for tests that bring a client of their own."""
        self.client = client
        if instances is not None:
            self.cache.replace_all(instances)
        self.epoch += 1
        self.problem = None
        self.ready.set()
        self._state_changed()

    async def _observe(self) -> None:
        """One query per resync interval (sooner when asked, e.g. after a reconnect)."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._refresh_requested.wait(), self.resync_seconds)
            self._refresh_requested.clear()
            await self.refresh()
            self._schedule_device_audits()

    def _schedule_device_audits(self) -> None:
        """Devices changed outside the operator show in no query: each interval, the next few watched
        instances (in name order, round robin) read theirs. At most ``device_audits_per_resync`` device
        reads per interval, however many instances; each is audited every ceil(N / that) intervals."""
        names = sorted(name for name in self.cache.instances if self.cache.is_watched(name))
        if not names or self.device_audits_per_resync <= 0:
            return
        after = [name for name in names if name > self._audit_cursor]
        chosen = (after + [name for name in names if name <= self._audit_cursor])[: self.device_audits_per_resync]
        self._audit_round += 1
        self._audit_cursor = chosen[-1]
        for name in chosen:
            self.audit_marks[name] = self._audit_round
            self.cache.notify(name)

    # ----- observations -------------------------------------------------------------------------------
    def request_refresh(self) -> None:
        self._refresh_requested.set()

    async def refresh(self) -> None:
        """Re-reads every instance with one query and wakes the loops whose instance changed."""
        client = self._client()
        async with self._refresh_lock:
            since = self.cache.begin_read()
            try:
                listed = await client.instances.list_instances()
                self.cache.replace_all(listed, since)
            finally:
                self.cache.end_read()

    async def refresh_one(self, name: str) -> ObservedInstance | None:
        """Re-reads one instance (after the operator changed it): TrueNAS's answer, which the cache
        takes unless an event newer than the answer came in meanwhile."""
        client = self._client()
        since = self.cache.begin_read()
        try:
            instance = await client.instances.get_instance(name)
            self.cache.read_one(name, instance, since)
        finally:
            self.cache.end_read()
        return instance

    def remember(self, instance: ObservedInstance) -> None:
        """Records what a create/update job returned."""
        self.cache.store(instance.name, instance)

    def remember_gone(self, name: str) -> None:
        """Records that an instance was deleted."""
        self.cache.store(name, None)

    def _on_event(self, kind: str, name: str, fields: dict[str, object] | None) -> None:
        client = self.client
        if client is None:
            return
        self.cache.apply_event(kind, name, fields, client.instances.instance_from_event)

    def _schedule_lookup(self, name: str) -> None:
        if name in self._lookups:
            self._lookup_again.add(name)  # the one in flight may have been answered before this event
            return

        async def lookup() -> None:
            try:
                while True:
                    self._lookup_again.discard(name)
                    await asyncio.sleep(LOOKUP_SETTLE_SECONDS)
                    await self.refresh_one(name)
                    if name not in self._lookup_again:
                        break
            except TrueNASError as exc:
                log.info("TrueNAS connection %s: reading %s after an event failed: %s", self.key, name, exc.message)
            finally:
                self._lookups.pop(name, None)
                self._lookup_again.discard(name)

        self._lookups[name] = asyncio.get_running_loop().create_task(lookup(), name=f"lookup {name}")

    def _client(self) -> TrueNASClient:
        if self.client is None:
            raise TransportError(self.problem.message if self.problem else "not connected")
        return self.client

    @property
    def identity(self) -> str:
        """Which TrueNAS this is, for the ownership ledger: the NAS's own ``system.global.id`` as
        read when the connection last came up (kept while it is down), so every URL spelling of one
        NAS is one identity. Before the first connect (and for clients without one: fakes) the
        address's identity."""
        client = self.client
        if client is not None and client.system_id:
            self._identity = nas_identity(client.system_id)
        return self._identity or self.config.identity

    @property
    def version(self) -> str | None:
        return self.client.system_version if self.client else None
