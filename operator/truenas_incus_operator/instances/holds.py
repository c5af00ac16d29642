"""Who holds an instance's power state: a snapshot taken stopped, or a restore (snapshots/). The
instance's own loop acts on the hold (one actor per instance): it stops the instance, or starts it
again, as if the spec said so, and reports ``Ready=False, Held``.

Two sources, both keyed by the IncusInstance (namespace, name):
- the holds the controllers set in this process, at once (``hold`` / ``release``);
- kopf indexes over the snapshot and restore resources (``attach``), computed from their status:
  a restore whose status says it is stopping or rolling back holds the instance stopped from the
  moment the operator starts again, before any loop runs (kopf fills indexes before it starts any
  handler), so a restart never starts an instance in the middle of its restore.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from ..reconcile import Hold
from .resource import ResourceKey

__all__ = ["Hold", "Holds"]


class Holds:
    def __init__(self, wake: Callable[[ResourceKey], None]) -> None:
        self._wake = wake
        self._held: dict[ResourceKey, dict[str, Hold]] = {}
        self._indexes: list[Mapping[Any, Any]] = []

    def attach(self, indexes: Iterable[Mapping[Any, Any]]) -> None:
        """kopf's live indexes (``key -> store of Hold``); the same objects on every call."""
        for index in indexes:
            if not any(index is known for known in self._indexes):
                self._indexes.append(index)

    def hold(self, key: ResourceKey, holder: str, hold: Hold) -> None:
        """``holder``: the holding resource's UID."""
        holds = self._held.setdefault(key, {})
        if holds.get(holder) != hold:
            holds[holder] = hold
            self._wake(key)

    def release(self, key: ResourceKey, holder: str) -> None:
        holds = self._held.get(key)
        if holds is not None and holds.pop(holder, None) is not None:
            if not holds:
                del self._held[key]
            self._wake(key)

    def changed(self, key: ResourceKey) -> None:
        """A holding resource changed (its index entry may have): the instance's loop looks again."""
        self._wake(key)

    def get(self, key: ResourceKey) -> Hold | None:
        """The hold in force: Stopped wins over Running (a restore's rollback over a start)."""
        found = list(self._held.get(key, {}).values())
        for index in self._indexes:
            store = index.get(key)
            if store is not None:
                found.extend(h for h in store if isinstance(h, Hold))
        if not found:
            return None
        return min(found, key=lambda h: (h.power != "Stopped", h.by))
