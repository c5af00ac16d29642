"""Job slots: how many TrueNAS jobs the operator runs at once on one connection, shared fairly.

TrueNAS admits 20 calls a socket but runs only 10 of them at once; the others wait for one of the
10 to end (``SoftHardSemaphore(10, 20)``: utils/lock.py, api/base/server/ws_handler/rpc.py).
Jobs (create, start, stop, delete) can last minutes: a graceful
stop waits out ``stopTimeoutSeconds``. If one namespace could take every slot, every other
namespace on the connection would wait behind it, deletions included. So each namespace holds at
most half of the job slots (at least one): the rest stay free for the others. Half, not less: the
10 calls TrueNAS runs leave 6 for jobs, and a quarter of them (1) made the common case, one
namespace applying a few instances at once, create them one after the other. And jobs never
take the last ``READ_RESERVE`` of the calls TrueNAS runs at once (a 25.10 job holds its call, and
so one of the 10, until it ends): the resync query and the reads of every holder go on while jobs
run, instead of queueing behind them.

Connections that share one transport (one URL, key and TLS settings: transports/shared.py) share
one ``JobSlots`` too (``ConnectionManager``): the namespace's half is of the socket, so a tenant
gets no more by making more TrueNASConnections with the same key.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

READ_RESERVE = 4
"""Calls of those TrueNAS runs at once that jobs never take."""
RUNNING_CALLS = 10
"""Calls TrueNAS runs at once on one socket (the soft limit of its ``SoftHardSemaphore(10, 20)``)."""


class JobSlots:
    def __init__(self, total: int) -> None:
        self.total = total
        running = min(total, RUNNING_CALLS)
        self.jobs = max(1, running - min(READ_RESERVE, running // 2))
        """Jobs at once: the calls TrueNAS runs at once (10, or the call limit if lower) less what stays
        for reads (6 of 20)."""
        self.per_namespace = max(1, self.jobs // 2)
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
