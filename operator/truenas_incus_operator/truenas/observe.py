"""Watching the client from outside: an ``Observer`` hears of every call, job and event that goes
through a transport, without the transports knowing (``connect(observer=...)`` wraps the transport
in ``ObservedTransport``).

The client never imports the operator: the operator's metrics implement ``Observer`` (metrics.py).
What an observer is told is bounded and holds no secret: method names (literals in the backends),
an outcome from the error's class, a job's final state, a collection name, and durations.

Where TrueNAS gives a time: job objects carry ``time_started``/``time_finished``
(``{"$date": ms}``); instance change events (``virt.instance.query``, ``container.query``) and the
``collection_update`` message itself carry none. So ``event_received`` gets a lag only for the
event that reports a job's end (its arrival vs ``time_finished``), and only over a transport with
events (WebSocket): REST polls, so its "lag" would be the poll interval, not an event's.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

from .errors import CallTimeout, JobFailed, TransportError, TrueNASError
from .jobs import is_finished
from .transports.base import EventCallback, Transport


class Observer(Protocol):
    """Told of a transport's traffic; every method must be quick and must not raise."""

    def call_started(self) -> None:
        """A call or a job call is in flight (until ``call_finished`` or ``job_finished``)."""
        ...

    def call_finished(self, method: str, outcome: str, seconds: float) -> None:
        """A plain call ended: ``outcome`` is ``ok`` or the error's kind (``outcome_of``)."""
        ...

    def job_finished(self, method: str, state: str, seconds: float) -> None:
        """A job call ended: ``SUCCESS``, ``FAILED`` (TrueNAS refused it or it failed), ``ABORTED``,
        ``TIMEOUT`` (we stopped waiting), ``LOST`` (the connection went before an answer),
        ``CANCELLED`` or ``ERROR`` (anything else)."""
        ...

    def event_received(self, collection: str, lag: float | None) -> None:
        """An event arrived; ``lag`` (seconds, >= 0) when TrueNAS stamped the change it reports."""
        ...

    def reconnected(self) -> None:
        """The transport re-established its connection by itself (WebSocket)."""
        ...

    def base_collected(self) -> None:
        """The VM backend deleted an unused cached base (backends/vm/bases.py ``collect_bases``)."""
        ...


def outcome_of(exc: BaseException) -> str:
    """A bounded label for how a call ended: the client's error class, never its message."""
    if isinstance(exc, TrueNASError):
        return type(exc).__name__
    if isinstance(exc, asyncio.CancelledError):
        return "Cancelled"
    return "Error"


def job_state_of(exc: BaseException) -> str:
    if isinstance(exc, JobFailed):
        return exc.state if exc.state in ("FAILED", "ABORTED") else "FAILED"
    if isinstance(exc, CallTimeout):
        return "TIMEOUT"
    if isinstance(exc, TransportError):
        return "LOST"
    if isinstance(exc, asyncio.CancelledError):
        return "CANCELLED"
    return "FAILED" if isinstance(exc, TrueNASError) else "ERROR"


def finished_at(job: dict[str, Any]) -> float | None:
    """When TrueNAS says a finished job ended (epoch seconds), if it says."""
    stamp = job.get("time_finished")
    if isinstance(stamp, dict) and isinstance(stamp.get("$date"), int | float):
        return float(stamp["$date"]) / 1000.0
    return None


class ObservedTransport:
    """A transport that tells an ``Observer`` of its calls; everything else goes to the inner one."""

    def __init__(self, inner: Transport, observer: Observer, clock: Callable[[], float] = time.time) -> None:
        self.inner = inner
        self.observer = observer
        self._clock = clock
        self._relays: list[tuple[str, EventCallback, EventCallback]] = []
        reconnect = getattr(inner, "on_reconnect", None)
        if isinstance(reconnect, list):
            reconnect.append(observer.reconnected)

    @property
    def name(self) -> str:
        return self.inner.name

    @name.setter
    def name(self, value: str) -> None:
        self.inner.name = value

    @property
    def system_version(self) -> str | None:
        return self.inner.system_version

    @system_version.setter
    def system_version(self, value: str | None) -> None:
        self.inner.system_version = value

    @property
    def api_version(self) -> str | None:
        return self.inner.api_version

    @api_version.setter
    def api_version(self, value: str | None) -> None:
        self.inner.api_version = value

    @property
    def login_mechanism(self) -> str | None:
        return getattr(self.inner, "login_mechanism", None)

    @property
    def supports_events(self) -> bool:
        return self.inner.supports_events

    @supports_events.setter
    def supports_events(self, value: bool) -> None:
        self.inner.supports_events = value

    def __getattr__(self, attribute: str) -> Any:
        # Transport-specific extras (on_reconnect, wait_job, ...) stay reachable.
        return getattr(self.inner, attribute)

    async def connect(self) -> None:
        await self.inner.connect()

    async def close(self) -> None:
        await self.inner.close()

    async def call(self, method: str, *params: Any, timeout: float | None = None, idempotent: bool = False) -> Any:
        self.observer.call_started()
        started = time.monotonic()
        outcome = "ok"
        try:
            return await self.inner.call(method, *params, timeout=timeout, idempotent=idempotent)
        except BaseException as exc:
            outcome = outcome_of(exc)
            raise
        finally:
            self.observer.call_finished(method, outcome, time.monotonic() - started)

    async def call_job(
        self,
        method: str,
        *params: Any,
        on_progress: Callable[[dict[str, Any]], None] | None = None,
        timeout: float | None = None,
    ) -> Any:
        seen_end = False

        def progress(job: dict[str, Any]) -> None:
            nonlocal seen_end
            if not seen_end and self.inner.supports_events and is_finished(job):
                seen_end = True
                ended = finished_at(job)
                lag = max(0.0, self._clock() - ended) if ended is not None else None
                self.observer.event_received("core.get_jobs", lag)
            if on_progress is not None:
                on_progress(job)

        self.observer.call_started()
        started = time.monotonic()
        state = "SUCCESS"
        try:
            return await self.inner.call_job(method, *params, on_progress=progress, timeout=timeout)
        except BaseException as exc:
            state = job_state_of(exc)
            raise
        finally:
            self.observer.job_finished(method, state, time.monotonic() - started)

    async def wait_job(
        self,
        job_id: int,
        timeout: float | None = None,
        on_progress: Callable[[dict[str, Any]], None] | None = None,
        *,
        method: str = "",
    ) -> Any:
        """Counted as a job of ``method`` (the caller's name for it: never the server's text, which
        would make a label of whatever a NAS sends)."""
        return await self._job(
            method or "job", lambda: self.inner.wait_job(job_id, timeout, on_progress, method=method)
        )

    async def upload(
        self,
        path: str,
        data: bytes | Path,
        *,
        mode: int,
        on_progress: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        """Counted as a ``filesystem.put`` job."""
        await self._job("filesystem.put", lambda: self.inner.upload(path, data, mode=mode, on_progress=on_progress))

    async def _job(self, method: str, run: Callable[[], Awaitable[Any]]) -> Any:
        self.observer.call_started()
        started = time.monotonic()
        state = "SUCCESS"
        try:
            return await run()
        except BaseException as exc:
            state = job_state_of(exc)
            raise
        finally:
            self.observer.job_finished(method, state, time.monotonic() - started)

    async def subscribe(self, collection: str, callback: EventCallback) -> None:
        def relay(msg: str, ident: Any, fields: dict[str, Any] | None) -> None:
            self.observer.event_received(collection, None)  # instance events carry no time
            callback(msg, ident, fields)

        self._relays.append((collection, callback, relay))
        await self.inner.subscribe(collection, relay)

    def unsubscribe(self, collection: str, callback: EventCallback) -> None:
        for entry in [e for e in self._relays if e[0] == collection and e[1] is callback]:
            self._relays.remove(entry)
            self.inner.unsubscribe(collection, entry[2])
