"""What one connection knows of its TrueNAS's instances, and who to wake when that changes.

No I/O: the connection feeds it query results and ``collection_update`` events; where an event
does not carry enough, the cache asks for a lookup through ``request_lookup``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import Any

from ..truenas import ObservedInstance

Wake = Callable[[], None]
FromEvent = Callable[[dict[str, Any]], ObservedInstance | None]


class InstanceCache:
    def __init__(self, request_lookup: Callable[[str], None]) -> None:
        self.instances: dict[str, ObservedInstance] = {}
        self._request_lookup = request_lookup
        self._listeners: dict[str, set[Wake]] = {}
        self._all_listeners: set[Wake] = set()

    # ----- listeners ------------------------------------------------------------------------------
    def listen(self, instance_name: str, wake: Wake) -> None:
        self._listeners.setdefault(instance_name, set()).add(wake)
        self._all_listeners.add(wake)

    def unlisten(self, instance_name: str, wake: Wake) -> None:
        listeners = self._listeners.get(instance_name)
        if listeners is not None:
            listeners.discard(wake)
            if not listeners:
                del self._listeners[instance_name]
        self._all_listeners.discard(wake)

    def is_watched(self, instance_name: str) -> bool:
        return bool(self._listeners.get(instance_name))

    def notify(self, instance_name: str) -> None:
        for wake in list(self._listeners.get(instance_name, ())):
            wake()

    def notify_all(self) -> None:
        for wake in list(self._all_listeners):
            wake()

    # ----- observations ---------------------------------------------------------------------------
    def get(self, name: str) -> ObservedInstance | None:
        return self.instances.get(name)

    def replace_all(self, listed: Iterable[ObservedInstance]) -> None:
        """A full query: wakes the loops of the instances that changed, appeared or went."""
        fresh = {instance.name: instance for instance in listed}
        before = self.instances
        self.instances = fresh
        for name in set(before) | set(fresh):
            if before.get(name) != fresh.get(name):
                self.notify(name)

    def store(self, name: str, instance: ObservedInstance | None) -> None:
        """Records one observation; wakes only when it changed (else a failing loop wakes itself)."""
        before = self.instances.get(name)
        if instance is None:
            self.instances.pop(name, None)
        else:
            self.instances[name] = instance
        if before != instance:
            self.notify(name)

    def apply_event(self, kind: str, name: str, fields: dict[str, Any] | None, from_event: FromEvent) -> None:
        """``collection_update`` for instances: apply what it carries, look up what it lacks."""
        if kind == "removed":
            self.store(name, None)
            return
        full = from_event(fields) if fields else None
        if full is not None:
            self.store(name, full)
            return
        current = self.instances.get(name)
        status = (fields or {}).get("status")
        if current is not None and isinstance(status, str):
            addresses = current.addresses if status == "RUNNING" else ()
            self.store(name, replace(current, status=status, addresses=addresses))
        if current is None or status == "RUNNING":
            self._request_lookup(name)  # addresses (and new instances) only come with a full read
