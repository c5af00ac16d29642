"""``collection_update`` events, fanned out to the sessions that subscribed (core.subscribe)."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

Sink = Callable[[dict[str, Any]], None]


@dataclass
class Subscription:
    id: str
    name: str
    sink: Sink


@dataclass
class EventBus:
    subscriptions: dict[str, Subscription] = field(default_factory=dict)

    def subscribe(self, name: str, sink: Sink) -> str:
        ident = str(uuid.uuid4())
        self.subscriptions[ident] = Subscription(ident, name, sink)
        return ident

    def unsubscribe(self, ident: str) -> None:
        self.subscriptions.pop(ident, None)

    def emit(
        self,
        collection: str,
        msg: str,
        ident: Any,
        fields: dict[str, Any] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        """``msg`` is ``added``, ``changed`` or ``removed``, as TrueNAS sends them. ``extra``: the other
        keyword arguments of the middleware's ``send_event``, which its JSON-RPC server puts under
        ``extra`` (api/base/server/ws_handler/rpc.py ``send_event``)."""
        params: dict[str, Any] = {"msg": msg, "collection": collection, "id": ident}
        if fields is not None:
            params["fields"] = fields
        if extra:
            params["extra"] = extra
        notification = {"jsonrpc": "2.0", "method": "collection_update", "params": params}
        for subscription in list(self.subscriptions.values()):
            if subscription.name in (collection, "*"):
                subscription.sink(notification)
