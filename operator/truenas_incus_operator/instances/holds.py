"""Who holds an instance's power state: a snapshot taken stopped, or a restore (snapshots/). The
instance's own loop acts on the hold (one actor per instance): it stops the instance, or starts it
again, as if the spec said so, and reports ``Ready=False, Held``.

Holds come from three places, all keyed by the IncusInstance (namespace, name):
- the controllers in this process, at once (``hold`` / ``release``);
- the holding resources' status, as their watch events bring it (``observe``): a restore stopping or
  rolling back holds its instance stopped, whichever process wrote that status;
- the same status read from the API server (``confirm``) before the loop starts an instance: after a
  restart, the loop may run before the restore's first event, and it must never start an instance in
  the middle of its restore.

Not kopf indexes: kopf holds every handler until every index is filled again, so a snapshot CRD
deleted (or missing) would stall the whole operator; a LIST per start answers the same question.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from ..kube import Kube
from ..reconcile import Hold
from .resource import ResourceKey

__all__ = ["HOLDERS", "Hold", "HolderRule", "Holds"]
log = logging.getLogger(__name__)

HolderRule = Callable[[Mapping[str, Any]], dict[ResourceKey, Hold]]
"""A holding kind's rule: the holds its object's status asks for (``snapshots.restore_holds``)."""
HOLDERS: dict[str, HolderRule] = {}
"""plural -> rule, registered by the snapshots package (which sits above this one)."""


class Holds:
    def __init__(self, wake: Callable[[ResourceKey], None], kube: Kube | None = None) -> None:
        self._wake = wake
        self._kube = kube
        self._held: dict[ResourceKey, dict[str, Hold]] = {}
        """Set by the controllers in this process, by holder UID."""
        self._seen: dict[ResourceKey, dict[str, Hold]] = {}
        """From the holders' status (events, or ``confirm``), by holder UID."""
        self._seen_by_holder: dict[str, set[ResourceKey]] = {}
        self._acting: dict[ResourceKey, int] = {}
        self._gone: set[str] = set()
        """Holders deleted (their DELETED event came): a handler still running for one holds nothing."""
        self._claimed: set[str] = set()
        """Holders whose controller runs in this process: what it holds is the truth, and their status
        as events bring it is stale (kopf delivers an object's events only between its handler's runs,
        so a restore's own status writes come back after it moved on)."""

    @contextlib.contextmanager
    def action(self, key: ResourceKey) -> Iterator[None]:
        """Around one action of the instance's loop: a restore rolls back only when none is in flight."""
        self._acting[key] = self._acting.get(key, 0) + 1
        try:
            yield
        finally:
            self._acting[key] -= 1
            if not self._acting[key]:
                del self._acting[key]

    def acting(self, key: ResourceKey) -> bool:
        return key in self._acting

    def hold(self, key: ResourceKey, holder: str, hold: Hold) -> None:
        """``holder``: the holding resource's UID. A deleted holder's late handler holds nothing."""
        if holder in self._gone:
            return
        holds = self._held.setdefault(key, {})
        if holds.get(holder) != hold:
            holds[holder] = hold
            log.info("%s/%s: %s for %s", *key, hold.power.lower(), hold.by)
            self._wake(key)

    def release(self, key: ResourceKey, holder: str) -> None:
        holds = self._held.get(key)
        if holds is not None and (gone := holds.pop(holder, None)) is not None:
            log.info("%s/%s: %s lets go", *key, gone.by)
            if not holds:
                del self._held[key]
            self._wake(key)

    def claim(self, holder: str) -> None:
        """The holder's controller runs here from now on: only its own ``hold``/``release`` count. What
        its status held is taken over as its own (released by the controller), never dropped: a gap
        between the two would let the loop start an instance in the middle of its restore."""
        if holder not in self._claimed:
            self._claimed.add(holder)
            for key in self._seen_by_holder.get(holder, set()):
                seen = self._seen.get(key, {}).get(holder)
                if seen is not None:
                    self._held.setdefault(key, {})[holder] = seen
            self._replace_seen(holder, {})

    def observe(self, plural: str, body: Mapping[str, Any], deleted: bool = False) -> None:
        """A holder's watch event: what its status holds now replaces what it held before (unless its
        controller runs here). A holder deleted lets go of everything, whoever held."""
        rule = HOLDERS.get(plural)
        holder = str((body.get("metadata") or {}).get("uid") or "")
        if rule is None or not holder:
            return
        if deleted:
            self._claimed.discard(holder)
            self._gone.add(holder)
            for key in [k for k, holds in self._held.items() if holder in holds]:
                self.release(key, holder)
            self._replace_seen(holder, {})
            return
        if holder in self._claimed:
            return
        self._replace_seen(holder, rule(body))

    def _replace_seen(self, holder: str, wanted: dict[ResourceKey, Hold]) -> None:
        touched = self._seen_by_holder.pop(holder, set()) | set(wanted)
        for key in touched:
            holds = self._seen.setdefault(key, {})
            before = holds.pop(holder, None)
            if key in wanted:
                holds[holder] = wanted[key]
            if before != holds.get(holder):
                log.debug("%s/%s: the status of %s holds %s", *key, holder, holds.get(holder))
            if not holds:
                del self._seen[key]
            self._wake(key)
        if wanted:
            self._seen_by_holder[holder] = set(wanted)

    async def confirm(self, key: ResourceKey) -> Hold | None:
        """Reads the holders of ``key``'s namespace from the API server (raises ``OperatorError`` when
        it cannot be asked: never start on doubt) and returns the hold in force."""
        if self._kube is not None:
            for plural in HOLDERS:
                for body in await self._kube.list_objects(plural, key[0]):
                    self.observe(plural, body)
        return self.get(key)

    def get(self, key: ResourceKey) -> Hold | None:
        """The hold in force: Stopped wins over Running (a restore's rollback over a start)."""
        found = [*self._held.get(key, {}).values(), *self._seen.get(key, {}).values()]
        if not found:
            return None
        return min(found, key=lambda h: (h.power != "Stopped", h.by))
