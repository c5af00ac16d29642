"""Which IncusInstances name which TrueNASConnection: a connection in use keeps its finalizer
(``handlers.connection_deleted``), so its instances' teardown still has the credentials.

Not a kopf index: kopf holds every handler until its indexes are filled, and fills them with one
toggle per object, each waking every worker that waits for the indexes: O(N^2) at startup (at 5000
resources, minutes at a full core before the first loop ran). Fed instead by the instances' watch
events (``observe`` / ``forget``) and, for what existed before, by one paged LIST after startup
(``load``), in the background: until it is in, a connection keeps the finalizer it has (and gains
one as soon as an instance seen names it), so nothing is let go on a guess.

What the LIST says never overrides an event seen since it began. A deletion that happened between
that LIST and kopf's own (or during a watch's re-list) brings no event: such a ghost keeps a
connection's finalizer, and ``confirm`` (a LIST of the connection's namespace) forgets it before a
connection being deleted is held for it.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
from collections.abc import Awaitable, Callable, Sequence

from ..problems import OperatorError
from .resource import ResourceKey

__all__ = ["ConnectionUsers", "Listing"]
log = logging.getLogger(__name__)

Listing = Callable[[str | None], Awaitable[list[tuple[str, str, str | None]]]]
"""Every IncusInstance in a namespace (None: in every namespace) as (namespace, name, the
TrueNASConnection it names or None): ``Kube.list_instance_connections``."""


class ConnectionUsers:
    def __init__(self, listing: Listing) -> None:
        self._listing = listing
        self._entries: dict[ResourceKey, tuple[str | None, int]] = {}
        """Instance -> (the connection it names, the sequence number of what said so)."""
        self._users: dict[ResourceKey, set[str]] = {}
        """(namespace, connection) -> the instances there that name it."""
        self._seq = 0
        self._gone: dict[ResourceKey, int] = {}
        """Instances deleted while a LIST was under way, and when: that LIST must not bring them back."""
        self._lists = 0
        self.complete = False
        """Whether every instance that existed before the operator started has been seen."""
        self.finalized: set[ResourceKey] = set()
        """Connections last seen with the finalizer (``handlers._hold_connection`` asks once for one)."""

    # ----- the watch ---------------------------------------------------------------------------------
    def observe(self, key: ResourceKey, connection: str | None) -> ResourceKey | None:
        """An instance's event: it names ``connection`` (None: none, or not a name). Returns the
        connection it named before if nothing names that one any more."""
        self._seq += 1
        before = self._entries.get(key, (None, 0))[0]
        self._set(key, connection, self._seq)
        return self._released(key[0], before) if before != connection else None

    def forget(self, key: ResourceKey) -> ResourceKey | None:
        """An instance's DELETED event. Returns its connection if nothing names that one any more."""
        self._seq += 1
        before = self._entries.get(key, (None, 0))[0]
        self._drop(key)
        if self._lists:
            self._gone[key] = self._seq
        return self._released(key[0], before)

    def _released(self, namespace: str, connection: str | None) -> ResourceKey | None:
        key = (namespace, connection) if connection else None
        return key if key is not None and not self._users.get(key) else None

    # ----- the questions -----------------------------------------------------------------------------
    def count(self, connection: ResourceKey) -> int:
        return len(self._users.get(connection, ()))

    def holds(self, connection: ResourceKey, finalized: bool) -> bool:
        """Whether the connection must keep (or get) its finalizer: an instance names it, or, before the
        startup LIST is in, it has the finalizer already (``finalized``)."""
        return bool(self._users.get(connection)) or (finalized and not self.complete)

    # ----- the LISTs ---------------------------------------------------------------------------------
    async def load(self, namespaces: Sequence[str] | None, retry_max: float = 300.0) -> None:
        """Every instance in ``namespaces`` (None: in every namespace), until one LIST of each succeeds."""
        delay = min(1.0, retry_max)
        for attempt in itertools.count(1):
            try:
                for namespace in namespaces if namespaces is not None else [None]:
                    await self._merge(namespace)
            except OperatorError as exc:
                level = logging.WARNING if attempt == 1 else logging.DEBUG
                log.log(level, "cannot list the IncusInstances yet (%s); connections keep their finalizers", exc)
                await asyncio.sleep(delay * random.uniform(0.8, 1.2))
                delay = min(retry_max, delay * 2)
                continue
            self.complete = True
            log.debug("every IncusInstance seen: %d name a connection", sum(map(len, self._users.values())))
            return

    async def confirm(self, connection: ResourceKey) -> int:
        """How many instances name ``connection``, after a LIST of its namespace: the instances seen
        before the LIST began and absent from it are forgotten (their deletion brought no event); one
        listed but not seen yet counts. Raises ``OperatorError`` when the LIST fails."""
        namespace, name = connection
        began = self._seq
        listed = await self._listing(namespace)  # no tombstones needed: it forgets only, never adds
        present = {(ns, instance) for ns, instance, _ in listed}
        for key, (_, seq) in list(self._entries.items()):
            if key[0] == namespace and key not in present and seq <= began:
                log.debug("IncusInstance %s/%s is gone without an event: forgotten", *key)
                self._drop(key)
        users = self._users.get(connection, set()) | {i for ns, i, c in listed if ns == namespace and c == name}
        return len(users)

    async def _merge(self, namespace: str | None) -> None:
        began = self._seq
        self._lists += 1
        try:
            listed = await self._listing(namespace)
        finally:
            self._lists -= 1
        for ns, name, connection in listed:
            key = (ns, name)
            entry = self._entries.get(key)
            if (entry is not None and entry[1] > began) or self._gone.get(key, 0) > began:
                continue  # an event since the LIST began says more
            self._set(key, connection, began)
        self._prune_gone()

    def _prune_gone(self) -> None:
        if not self._lists:
            self._gone.clear()

    def _set(self, key: ResourceKey, connection: str | None, seq: int) -> None:
        self._drop(key)
        self._entries[key] = (connection, seq)
        if connection:
            self._users.setdefault((key[0], connection), set()).add(key[1])

    def _drop(self, key: ResourceKey) -> None:
        entry = self._entries.pop(key, None)
        if entry is None or not entry[0]:
            return
        users = self._users.get((key[0], entry[0]))
        if users is not None:
            users.discard(key[1])
            if not users:
                del self._users[(key[0], entry[0])]
