"""Two resources must never drive one instance: per connection and instance name, the older
resource holds the claim and the others report Conflict."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ..reconcile import Blocked, Desired
from .resource import ResourceKey


@dataclass(frozen=True)
class Claim:
    created: str
    uid: str
    owner: ResourceKey


Slot = tuple[str, str]
"""(connection key, instance name)."""


class Claims:
    def __init__(self, wake: Callable[[ResourceKey], None]) -> None:
        self.held: dict[Slot, Claim] = {}
        self._wake = wake

    def claim(self, connection_key: str, desired: Desired, body: Mapping[str, Any]) -> Blocked | None:
        """None when ``desired`` may drive its instance, else why not."""
        meta = body.get("metadata", {})
        mine = Claim(
            str(meta.get("creationTimestamp", "")), str(meta.get("uid", "")), (desired.namespace, desired.name)
        )
        slot = (connection_key, desired.instance_name)
        held = self.held.get(slot)
        if held is None or held.owner == mine.owner or (mine.created, mine.uid) < (held.created, held.uid):
            if held is not None and held.owner != mine.owner:
                self._wake(held.owner)  # it lost the claim: let it say so
            self.held[slot] = mine
            return None
        owner = f"{held.owner[0]}/{held.owner[1]}"
        return Blocked(
            "Conflict", f"the instance {desired.instance_name!r} is already managed by IncusInstance {owner}"
        )

    def release(self, owner: ResourceKey) -> None:
        for slot, claim in list(self.held.items()):
            if claim.owner == owner:
                del self.held[slot]
