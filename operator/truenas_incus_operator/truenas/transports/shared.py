"""One transport per URL, key and TLS settings, however many connections would open it.

Every TrueNASConnection used to open its own WebSocket: 600 connections to one NAS were 601
sockets, 601 logins and 601 call limits (issue 19, item 4). A ``TransportPool`` hands out
``SharedTransport`` views instead; the views of one key share one inner transport:

- the first view's ``connect`` connects it (one login); the last view's ``close`` closes it;
- each view keeps its own event callbacks and reconnect listeners, dropped when it closes, so a
  closed connection hears nothing more and leaves nothing behind;
- a view whose holder saw it fail calls ``retire``: the inner transport leaves the pool, later
  connects open a fresh one, and the views still holding it keep it until they fail or close
  themselves (a hung socket is never handed on for ever);
- an inner connect that fails retires it too (its next user starts afresh).

What is shared is exactly what the key says: the URL as written, the API key, the CA, the
verification switch, the call limit and the timeouts. Two spellings of one NAS's address open two
sockets (the NAS's identity is known only after connecting); their ledger identity is still one
(``system.global.id``). Nothing of one holder's configuration reaches another holder: a view with
other TLS settings or another key has another key here.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import TransportError
from .base import EventCallback, Transport

PoolKey = tuple[Hashable, ...]
Listener = Callable[[], Awaitable[None] | None]


@dataclass(eq=False)
class _Shared:
    key: PoolKey
    inner: Transport
    users: int = 0
    connected: bool = False
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    views: set[SharedTransport] = field(default_factory=set)


class TransportPool:
    """The open transports, by key (what ``truenas.connect`` builds from its arguments)."""

    def __init__(self) -> None:
        self._open: dict[PoolKey, _Shared] = {}

    def __len__(self) -> int:
        """How many inner transports new views would share (retired ones are not counted)."""
        return len(self._open)

    def view(self, key: PoolKey, factory: Callable[[], Transport]) -> SharedTransport:
        """A view of the transport under ``key``; ``factory`` makes it when none is open."""
        shared = self._open.get(key)
        if shared is None:
            shared = _Shared(key, factory())
            self._open[key] = shared
            listeners = getattr(shared.inner, "on_reconnect", None)
            if isinstance(listeners, list):
                listeners.append(lambda: _reconnected(shared))
        shared.users += 1
        view = SharedTransport(self, shared)
        shared.views.add(view)
        return view

    def _retire(self, shared: _Shared) -> None:
        if self._open.get(shared.key) is shared:
            del self._open[shared.key]

    async def _release(self, view: SharedTransport) -> None:
        shared = view.shared
        shared.views.discard(view)
        shared.users -= 1
        if shared.users <= 0:
            self._retire(shared)
            await shared.inner.close()


async def _reconnected(shared: _Shared) -> None:
    """The inner transport reconnected by itself: every view's listeners hear it."""
    for view in list(shared.views):
        for listener in list(view.on_reconnect):
            with contextlib.suppress(Exception):
                result = listener()
                if asyncio.iscoroutine(result):
                    await result


class SharedTransport:
    """One holder's view of a shared transport (a ``Transport``; extras such as ``wait_job`` are the
    inner transport's)."""

    def __init__(self, pool: TransportPool, shared: _Shared) -> None:
        self.pool = pool
        self.shared = shared
        self.on_reconnect: list[Listener] = []
        self._subscribed: list[tuple[str, EventCallback]] = []
        self._closed = False

    # The inner transport's facts (set by its connect).
    @property
    def name(self) -> str:
        return self.shared.inner.name

    @name.setter
    def name(self, value: str) -> None:
        self.shared.inner.name = value

    @property
    def system_version(self) -> str | None:
        return self.shared.inner.system_version

    @system_version.setter
    def system_version(self, value: str | None) -> None:
        self.shared.inner.system_version = value

    @property
    def api_version(self) -> str | None:
        return self.shared.inner.api_version

    @api_version.setter
    def api_version(self, value: str | None) -> None:
        self.shared.inner.api_version = value

    @property
    def login_mechanism(self) -> str | None:
        return getattr(self.shared.inner, "login_mechanism", None)

    @property
    def supports_events(self) -> bool:
        return self.shared.inner.supports_events

    @supports_events.setter
    def supports_events(self, value: bool) -> None:
        self.shared.inner.supports_events = value

    def __getattr__(self, attribute: str) -> Any:
        return getattr(self.shared.inner, attribute)

    def _check_open(self) -> Transport:
        if self._closed:
            raise TransportError("connection closed")
        return self.shared.inner

    async def connect(self) -> None:
        """Connects the inner transport unless another view did; a failure retires it."""
        inner = self._check_open()
        shared = self.shared
        async with shared.lock:
            if shared.connected:
                return
            try:
                await inner.connect()
            except BaseException:
                self.pool._retire(shared)
                raise
            shared.connected = True

    def retire(self) -> None:
        """This holder saw the transport fail: nobody new gets it (see the module's docstring)."""
        self.pool._retire(self.shared)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        inner = self.shared.inner
        for collection, callback in self._subscribed:
            inner.unsubscribe(collection, callback)
        self._subscribed.clear()
        self.on_reconnect.clear()
        await self.pool._release(self)

    async def call(self, method: str, *params: Any, timeout: float | None = None, idempotent: bool = False) -> Any:
        return await self._check_open().call(method, *params, timeout=timeout, idempotent=idempotent)

    async def call_job(
        self,
        method: str,
        *params: Any,
        on_progress: Callable[[dict[str, Any]], None] | None = None,
        timeout: float | None = None,
    ) -> Any:
        return await self._check_open().call_job(method, *params, on_progress=on_progress, timeout=timeout)

    async def wait_job(
        self,
        job_id: int,
        timeout: float | None = None,
        on_progress: Callable[[dict[str, Any]], None] | None = None,
        *,
        method: str = "",
    ) -> Any:
        return await self._check_open().wait_job(job_id, timeout, on_progress, method=method)

    async def upload(
        self,
        path: str,
        data: bytes | Path,
        *,
        mode: int,
        on_progress: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        await self._check_open().upload(path, data, mode=mode, on_progress=on_progress)

    async def subscribe(self, collection: str, callback: EventCallback) -> None:
        inner = self._check_open()
        self._subscribed.append((collection, callback))
        await inner.subscribe(collection, callback)

    def unsubscribe(self, collection: str, callback: EventCallback) -> None:
        with contextlib.suppress(ValueError):
            self._subscribed.remove((collection, callback))
        self.shared.inner.unsubscribe(collection, callback)
