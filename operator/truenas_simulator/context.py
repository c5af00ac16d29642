"""What a call runs in, and what the API families may reach of the middleware.

``Session`` and ``CallContext`` are built by the transports and the dispatcher; ``Middleware`` is the
narrow view of the simulated middleware the services (``services/``) are given, so that they never
import the dispatcher (``simulator.py``), which imports them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from .events import EventBus
from .jobs import JobManager
from .profiles import Profile
from .scram import ClientFirst, ScramSecrets, ServerFirst
from .state import ApiKey, GlobalConfig, Image, Instance, Knobs


@dataclass(eq=False)
class Session:
    """One WebSocket connection, or one REST request."""

    transport: str = "websocket"
    api_version: str = "current"
    secure: bool = True
    loopback: bool = True
    authenticated: bool = False
    api_key: ApiKey | None = None
    legacy_jobs: bool = True
    send_event: Callable[[dict[str, Any]], None] | None = None
    subscriptions: set[str] = field(default_factory=set)
    close: Callable[[], None] | None = None
    private_methods: bool = False
    py_exceptions: bool = False
    scram: tuple[ClientFirst, ServerFirst, ScramSecrets] | None = None
    """A SCRAM exchange between its first and final message: (client-first, server-first, secrets)."""
    span: SessionSpan | None = None
    """When it was open and what it called (``Simulator.session_spans``)."""


@dataclass
class SessionSpan:
    """One WebSocket session's life, for tests of who talked to TrueNAS when (monotonic seconds)."""

    transport: str
    opened: float
    closed: float | None = None
    calls: int = 0
    writes: int = 0
    first_write: float | None = None
    last_write: float | None = None


@dataclass
class CallContext:
    session: Session
    message_id: Any
    schema: str
    prevalidated: bool

    @property
    def credentials(self) -> dict[str, Any] | None:
        key = self.session.api_key
        if key is None:
            return None
        return {
            "type": "API_KEY",
            "data": {
                "username": key.username,
                "login_id": f"sim-{key.id}",
                "api_key": {"id": key.id, "name": key.name},
            },
        }


Handler = Callable[[CallContext, list[Any]], Any]


class Middleware(Protocol):
    """What a service may reach: the version it behaves as, its knobs, events, jobs and shared state.

    ``Simulator`` provides it; ``profile`` and ``instances`` are replaced by an upgrade, so services
    read them through this object every time instead of keeping their own reference.
    """

    profile: Profile
    knobs: Knobs
    events: EventBus
    jobs: JobManager
    global_config: GlobalConfig
    images: dict[str, Image]
    instances: dict[str, Instance]
    """The 25.x Incus instances (virt.instance), by name."""
    host_interfaces: set[str]
