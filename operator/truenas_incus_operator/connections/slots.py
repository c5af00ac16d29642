"""Job slots: how many TrueNAS jobs the operator runs at once on one connection, shared fairly.

TrueNAS serves 20 calls at a time. Jobs (create, start, stop, delete) can last minutes: a graceful
stop waits out ``stopTimeoutSeconds``. If one namespace could take every slot, every other
namespace on the connection would wait behind it, deletions included. So each namespace holds at
most a quarter of the job slots (at least one); the rest stay free for the others. And jobs never
take the last ``READ_RESERVE`` calls of the limit (a 25.10 job holds its call until it ends): the
resync query and the reads of every holder go on while jobs run.

Connections that share one transport (one URL, key and TLS settings: transports/shared.py) share
one ``JobSlots`` too (``ConnectionManager``): the namespace's quarter is of the socket, so a tenant
gets no more by making more TrueNASConnections with the same key.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

READ_RESERVE = 4
"""Calls of the limit that jobs never take."""


class JobSlots:
    def __init__(self, total: int) -> None:
        self.total = total
        self.jobs = max(1, total - min(READ_RESERVE, total // 2))
        """Jobs at once: the call limit less what stays for reads (16 of 20)."""
        self.per_namespace = max(1, self.jobs // 4)
        self._all = asyncio.Semaphore(self.jobs)
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
