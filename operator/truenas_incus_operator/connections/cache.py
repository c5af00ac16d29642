"""What one connection knows of its TrueNAS's instances, and who to wake when that changes.

No I/O: the connection feeds it query results and ``collection_update`` events; where an event
does not carry enough, the cache asks for a lookup through ``request_lookup``.

Reads race events: TrueNAS can answer a query, then send an event for a change made after it,
and the event can be applied before the answer is. A read therefore starts with ``begin_read``
and hands its answer over with the sequence number it got; whatever changed after that number
is newer than the answer and stays (and is read again, in case the answer knew more).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import Any

from ..truenas import InstanceStatus, ObservedInstance

Wake = Callable[[], None]
FromEvent = Callable[[dict[str, Any]], ObservedInstance | None]


class InstanceCache:
    def __init__(self, request_lookup: Callable[[str], None]) -> None:
        self.instances: dict[str, ObservedInstance] = {}
        self._request_lookup = request_lookup
        self._listeners: dict[str, set[Wake]] = {}
        self._all_listeners: set[Wake] = set()
        self.seq = 0
        """Counts changes applied from events and job results."""
        self._changed_at: dict[str, int] = {}
        self._reads = 0
        self._revisions: dict[str, int] = {}
        self._revision = 0

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

    def revision(self, name: str) -> int:
        """Moves whenever what the cache holds of ``name`` changes (appears, differs, goes); a query
        that finds it as it was leaves it: a loop compares it to see that nothing changed (O(1))."""
        return self._revisions.get(name, 0)

    def _changed(self, name: str) -> None:
        self._revision += 1
        if name in self.instances:
            self._revisions[name] = self._revision
        else:
            self._revisions.pop(name, None)  # gone is gone, however it was before (0: never seen)
        self.notify(name)

    def begin_read(self) -> int:
        """Before a query or lookup is sent: what its answer is newer than. Pair with ``end_read``."""
        self._reads += 1
        return self.seq

    def end_read(self) -> None:
        self._reads -= 1
        if self._reads == 0:
            self._changed_at.clear()  # every later read starts after these changes

    def _newer_than(self, name: str, since: int) -> bool:
        return self._changed_at.get(name, 0) > since

    def replace_all(self, listed: Iterable[ObservedInstance], since: int | None = None) -> None:
        """A full query (begun at ``since``): wakes the loops of the instances that changed, appeared
        or went. Instances changed after ``since`` keep what the cache knows and are read again."""
        fresh = {instance.name: instance for instance in listed}
        before = self.instances
        if since is not None:
            for name in [n for n in self._changed_at if self._newer_than(n, since)]:
                fresh.pop(name, None)
                if name in before:
                    fresh[name] = before[name]
                self._request_lookup(name)
        self.instances = fresh
        for name in set(before) | set(fresh):
            if before.get(name) != fresh.get(name):
                self._changed(name)

    def read_one(self, name: str, instance: ObservedInstance | None, since: int) -> None:
        """A lookup's answer (begun at ``since``); an event that came after it wins, and asks again."""
        if self._newer_than(name, since):
            self._request_lookup(name)
            return
        self.store(name, instance)

    def store(self, name: str, instance: ObservedInstance | None) -> None:
        """Records one observation newer than any read in flight (an event, a job's result); wakes
        only when it changed (else a failing loop wakes itself)."""
        self.seq += 1
        if self._reads:
            self._changed_at[name] = self.seq
        before = self.instances.get(name)
        if instance is None:
            self.instances.pop(name, None)
        else:
            self.instances[name] = instance
        if before != instance:
            self._changed(name)

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
            state = InstanceStatus.of(status)
            addresses = current.addresses if state == InstanceStatus.RUNNING else ()
            self.store(name, replace(current, status=state, addresses=addresses))
        if current is None or status == "RUNNING" or not isinstance(status, str):
            # addresses (and new instances) only come with a full read; so does a state the event
            # cannot say: 25.x's libvirt domain events carry libvirt's names (SHUTOFF) in a partial
            # vm.query entry (plugins/vm/events.py), and they are the only events a stop sends
            self._request_lookup(name)
