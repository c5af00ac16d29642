"""Connections by key: the operator's default one and one per TrueNASConnection."""

from __future__ import annotations

import weakref
from collections.abc import Callable, Hashable

from ..metrics import Metrics
from ..problems import OperatorError, Problem, Reason, fail
from ..truenas import DEFAULT_TIMINGS, Timings, TransportPool
from .config import DEFAULT_KEY, ConnectionConfig, Loader
from .connection import Connection
from .slots import JobSlots

Wake = Callable[[], None]


class ConnectionManager:
    def __init__(
        self,
        resync_seconds: float,
        retry_max_seconds: float,
        timings: Timings = DEFAULT_TIMINGS,
        on_state: Callable[[Connection], None] | None = None,
        device_audits_per_resync: int = 10,
        metrics: Metrics | None = None,
    ) -> None:
        self.metrics = metrics
        self.resync_seconds = resync_seconds
        self.device_audits_per_resync = device_audits_per_resync
        self.retry_max_seconds = retry_max_seconds
        self.timings = timings
        self.on_state = on_state
        self.connections: dict[str, Connection] = {}
        self.transports = TransportPool()
        """One transport per URL, key and TLS settings, shared by the connections that name them."""
        self._job_slots: weakref.WeakValueDictionary[Hashable, JobSlots] = weakref.WeakValueDictionary()
        """The job slots of each shared transport (gone with its last connection)."""
        self.problems: dict[str, Problem] = {}
        """Keys whose configuration is unusable (e.g. a missing Secret), with the reason."""
        self._waiters: dict[str, set[Wake]] = {}

    def watch_key(self, key: str, wake: Wake) -> None:
        """Wakes ``wake`` when the connection under ``key`` is (re)configured or removed."""
        self._waiters.setdefault(key, set()).add(wake)

    def unwatch_key(self, key: str, wake: Wake) -> None:
        waiters = self._waiters.get(key)
        if waiters is not None:
            waiters.discard(wake)
            if not waiters:
                del self._waiters[key]

    def _wake_key(self, key: str) -> None:
        for wake in list(self._waiters.get(key, ())):
            wake()

    async def configure(self, key: str, config: ConnectionConfig, reload: Loader | None = None) -> Connection:
        current = self.connections.get(key)
        if current is not None and current.config == config:
            current.reload = reload
            return current
        if current is not None:
            await current.close()
        connection = Connection(
            key,
            config,
            resync_seconds=self.resync_seconds,
            retry_max_seconds=self.retry_max_seconds,
            timings=self.timings,
            reload=reload,
            on_state=self.on_state,
            device_audits_per_resync=self.device_audits_per_resync,
            metrics=self.metrics,
            pool=self.transports,
            job_slots=self.job_slots_for(config),
        )
        self.connections[key] = connection
        self.problems.pop(key, None)
        connection.start()
        self._wake_key(key)
        return connection

    def job_slots_for(self, config: ConnectionConfig) -> JobSlots:
        """The job slots of ``config``'s transport: one per URL, key, TLS settings and call limit, as
        the transport pool shares them (a namespace's half is of the socket, not of each connection)."""
        key = config.share_key
        slots = self._job_slots.get(key)
        if slots is None:
            slots = JobSlots(config.max_concurrent_calls)
            self._job_slots[key] = slots
        return slots

    async def unusable(self, key: str, problem: Problem) -> None:
        current = self.connections.pop(key, None)
        if current is not None:
            await current.close()
        self.problems[key] = problem
        self._wake_key(key)

    async def remove(self, key: str) -> None:
        await self.unusable(key, Problem(Reason.CONNECTION_NOT_FOUND, f"TrueNASConnection {key} does not exist"))

    def get(self, key: str) -> Connection:
        """The connection for ``key``; raises ``OperatorError`` when there is none."""
        connection = self.connections.get(key)
        if connection is not None:
            return connection
        problem = self.problems.get(key)
        if problem is not None:
            raise OperatorError(problem)
        if key == DEFAULT_KEY:
            raise fail(
                Reason.NO_CONNECTION,
                "no spec.connectionRef and the operator has no default connection (set TIO_TRUENAS_URL)",
            )
        raise fail(Reason.CONNECTION_NOT_FOUND, f"TrueNASConnection {key} does not exist (yet)")

    async def close(self) -> None:
        for connection in list(self.connections.values()):
            await connection.close()
        self.connections.clear()
