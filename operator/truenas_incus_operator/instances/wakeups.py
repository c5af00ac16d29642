"""Which loop to wake, and when: a loop sleeps until its resource, its instance or its connection
changes, or until its next unprompted pass."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from ..models import ADOPT_ANNOTATION, PAUSED_ANNOTATION
from .resource import ResourceKey, Wake, resource_key


def signature(body: Mapping[str, Any]) -> tuple[Any, ...]:
    """What a loop acts on. The operator's own writes (status, its annotations) come back as watch
    events too; waking on those would cut every backoff short and loop hot."""
    meta = body.get("metadata", {})
    annotations = meta.get("annotations") or {}
    return (
        meta.get("generation"),
        annotations.get(ADOPT_ANNOTATION),
        annotations.get(PAUSED_ANNOTATION),
        bool(meta.get("deletionTimestamp")),
    )


class Wakeups:
    def __init__(self) -> None:
        self.events: dict[ResourceKey, asyncio.Event] = {}
        self.signatures: dict[ResourceKey, tuple[Any, ...]] = {}

    def register(self, key: ResourceKey) -> asyncio.Event:
        """The event a resource's loop sleeps on (created for the loop's lifetime)."""
        return self.events.setdefault(key, asyncio.Event())

    def waker(self, key: ResourceKey) -> Wake:
        return self.register(key).set

    def wake(self, key: ResourceKey) -> None:
        event = self.events.get(key)
        if event is not None:
            event.set()

    def resource_changed(self, body: Mapping[str, Any]) -> None:
        """A watch event: wakes the loop only if something it acts on changed."""
        key = resource_key(body)
        current = signature(body)
        if self.signatures.get(key) != current:
            self.signatures[key] = current
            self.wake(key)

    def resource_deleted(self, key: ResourceKey) -> None:
        self.signatures.pop(key, None)

    def forget(self, key: ResourceKey) -> None:
        self.events.pop(key, None)
        self.signatures.pop(key, None)
