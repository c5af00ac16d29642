"""A transport that only reads (``connect(read_only=True)``: ``import``): every call that is not a read
is refused before it leaves the process, jobs and uploads always. What counts as a read is the method's
name (TrueNAS's own convention): ``*.query``, ``*.get_instance``, ``*.config``, ``*_choices``, the
virt family's ``device_list`` and a few named reads."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import TrueNASError
from .base import EventCallback, Transport

READ_SUFFIXES = (".query", ".get_instance", ".config", "_choices", ".device_list", ".query_registry")
READ_METHODS = frozenset(
    {
        "system.version",
        "system.info",
        "system.global.id",
        "auth.me",
        "core.get_jobs",
        "vm.status",
        "vm.get_guest_network_interfaces",
    }
)


def is_read(method: str) -> bool:
    return method in READ_METHODS or method.endswith(READ_SUFFIXES)


class WriteRefused(TrueNASError):
    """A read-only client was about to write: refused before anything was sent."""


class ReadOnlyTransport:
    def __init__(self, inner: Transport) -> None:
        self.inner = inner

    @property
    def name(self) -> str:
        return self.inner.name

    @name.setter
    def name(self, value: str) -> None:
        self.inner.name = value

    @property
    def supports_events(self) -> bool:
        return self.inner.supports_events

    @supports_events.setter
    def supports_events(self, value: bool) -> None:
        self.inner.supports_events = value

    @property
    def system_version(self) -> str | None:
        return self.inner.system_version

    @system_version.setter
    def system_version(self, value: str | None) -> None:
        self.inner.system_version = value

    @property
    def api_version(self) -> str | None:
        return self.inner.api_version

    @api_version.setter
    def api_version(self, value: str | None) -> None:
        self.inner.api_version = value

    @property
    def login_mechanism(self) -> str | None:
        return getattr(self.inner, "login_mechanism", None)

    async def connect(self) -> None:
        await self.inner.connect()

    async def close(self) -> None:
        await self.inner.close()

    async def call(self, method: str, *params: Any, timeout: float | None = None, idempotent: bool = False) -> Any:
        if not is_read(method):
            raise WriteRefused(f"{method}: this client only reads; refused before it was sent")
        return await self.inner.call(method, *params, timeout=timeout, idempotent=idempotent)

    async def call_job(
        self,
        method: str,
        *params: Any,
        on_progress: Callable[[dict[str, Any]], None] | None = None,
        timeout: float | None = None,
    ) -> Any:
        raise WriteRefused(f"{method}: this client only reads (no jobs); refused before it was sent")

    async def wait_job(
        self,
        job_id: int,
        timeout: float | None = None,
        on_progress: Callable[[dict[str, Any]], None] | None = None,
        *,
        method: str = "",
    ) -> Any:
        raise WriteRefused(f"{method or 'job'}: this client only reads (no jobs)")

    async def upload(
        self,
        path: str,
        data: bytes | Path,
        *,
        mode: int,
        on_progress: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        raise WriteRefused(f"upload of {path}: this client only reads")

    async def subscribe(self, collection: str, callback: EventCallback) -> None:
        await self.inner.subscribe(collection, callback)

    def unsubscribe(self, collection: str, callback: EventCallback) -> None:
        self.inner.unsubscribe(collection, callback)
