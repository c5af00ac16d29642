"""Job slots: how many TrueNAS jobs the operator runs at once on one connection, shared fairly.

TrueNAS serves 20 calls at a time. Jobs (create, start, stop, delete) can last minutes: a graceful
stop waits out ``stopTimeoutSeconds``. If one namespace could take every slot, every other
namespace on the connection would wait behind it, deletions included. So each namespace holds at
most a quarter of the slots (at least one); the rest stay free for the others.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


class JobSlots:
    def __init__(self, total: int) -> None:
        self.total = total
        self.per_namespace = max(1, total // 4)
        self._all = asyncio.Semaphore(total)
        self._by_namespace: dict[str, asyncio.Semaphore] = {}
        self._holders: dict[str, int] = {}

    @asynccontextmanager
    async def slot(self, namespace: str) -> AsyncIterator[None]:
        own = self._by_namespace.setdefault(namespace, asyncio.Semaphore(self.per_namespace))
        self._holders[namespace] = self._holders.get(namespace, 0) + 1
        try:
            async with own, self._all:
                yield
        finally:
            self._holders[namespace] -= 1
            if not self._holders[namespace]:  # forget idle namespaces: memory stays bounded by activity
                del self._holders[namespace]
                del self._by_namespace[namespace]
