"""What a transport offers the backends: calls, jobs, events, the server's version."""

from __future__ import annotations

import errno
import hashlib
import hmac
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from ..errors import (
    AuthenticationFailed,
    CallFailed,
    FieldError,
    JobFailed,
    NotAuthorized,
    TrueNASError,
    strip_errno_prefix,
    validation_error,
)

EventCallback = Callable[[str, Any, dict[str, Any] | None], None]
"""``(msg, id, fields)`` for each ``collection_update``: msg is added, changed or removed."""

ENOTAUTHENTICATED = 207


class Secret:
    """Holds the API key; its ``repr``/``str`` never show it."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('********')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and hmac.compare_digest(self._value, other._value)

    def __hash__(self) -> int:
        return hash(hashlib.sha256(self._value.encode()).digest())


@dataclass
class ConnectionOptions:
    url: str
    """``wss://host`` / ``https://host`` (``ws://``/``http://`` for loopback simulators)."""
    api_key: Secret
    ssl_context: ssl.SSLContext | None = None
    max_concurrent_calls: int = 20
    call_timeout: float = 60.0
    read_timeout: float = 20.0  # reads (queries) answer fast; a longer wait only hides a hung TrueNAS
    job_timeout: float = 15 * 60.0
    connect_timeout: float = 10.0
    api_version: str = "current"


class Transport(Protocol):
    """A connection to one TrueNAS."""

    name: str
    system_version: str | None
    supports_events: bool

    async def connect(self) -> None: ...

    async def close(self) -> None: ...

    async def call(self, method: str, *params: Any, timeout: float | None = None, idempotent: bool = False) -> Any:
        """A plain (non-job) call; ``idempotent`` reads are retried once after a reconnect."""
        ...

    async def call_job(
        self,
        method: str,
        *params: Any,
        on_progress: Callable[[dict[str, Any]], None] | None = None,
        timeout: float | None = None,
    ) -> Any:
        """Calls a job method and returns the job's result once it ends (raises if it fails)."""
        ...

    async def subscribe(self, collection: str, callback: EventCallback) -> None:
        """Follows ``collection_update`` events; re-established after reconnects."""
        ...


def error_from_jsonrpc(error: dict[str, Any], method: str) -> TrueNASError:
    """Maps a JSON-RPC error object (truenas-api.md §2.1) to the client's hierarchy."""
    code = error.get("code")
    data = error.get("data") or {}
    reason = strip_errno_prefix(str(data.get("reason") or error.get("message") or "error"))
    err = int(data.get("error") or errno.EFAULT)
    if code == -32602 and isinstance(data.get("extra"), list):
        return validation_error(_field_errors(data["extra"]), method)
    if code == -32601:
        return CallFailed(f"{method}: Method does not exist", errno.ENOSYS, method)
    if err == ENOTAUTHENTICATED:
        return AuthenticationFailed(f"{method}: Not authenticated")
    if err == errno.EACCES and "Not authorized" in reason:
        return NotAuthorized(f"{method}: Not authorized")
    return CallFailed(reason, err, method)


def error_from_job(job: dict[str, Any]) -> TrueNASError:
    """Maps a FAILED or ABORTED job object (truenas-api.md §6) to the client's hierarchy."""
    info = job.get("exc_info") or {}
    method = job.get("method")
    if info.get("type") == "VALIDATION" and isinstance(info.get("extra"), list):
        return validation_error(_field_errors(info["extra"]), method, job.get("id"))
    message = strip_errno_prefix(str(job.get("error") or f"job {job.get('state', 'FAILED').lower()}"))
    err = info.get("errno")
    return JobFailed(
        message, int(job.get("id") or 0), job.get("state", "FAILED"), int(err) if err else errno.EFAULT, method
    )


def _field_errors(extra: list[Any]) -> list[FieldError]:
    errors = []
    for item in extra:
        if isinstance(item, list | tuple) and len(item) >= 2:
            errors.append(
                FieldError(item[0], str(item[1]), int(item[2]) if len(item) > 2 and item[2] else errno.EINVAL)
            )
    return errors
