"""What a transport offers the backends: calls, jobs, events, the server's version."""

from __future__ import annotations

import dataclasses
import errno
import functools
import hashlib
import hmac
import json
import re
import ssl
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, Protocol, TypeVar

from ..errors import (
    AuthenticationFailed,
    CallFailed,
    CallTimeout,
    FieldError,
    JobFailed,
    MalformedAnswer,
    NotAuthorized,
    TransportError,
    TrueNASError,
    ValidationFailed,
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

    def scrub(self, text: str) -> str:
        """``text`` with every form of the key it may carry replaced by ``********``."""
        for form in _forms(self._value):
            text = text.replace(form, REDACTED)
        return text


REDACTED = "********"
_KEY_CHARACTERS = re.compile(r"[!-~]+")


def refuse_malformed_key(secret: Secret) -> None:
    """A key with whitespace, control or non-ASCII characters never leaves the client: HTTP
    libraries refuse it in a header, and say so with the header in their error and debug logs."""
    if not _KEY_CHARACTERS.fullmatch(secret.reveal()):
        raise AuthenticationFailed(
            "the API key is empty or holds whitespace, a line break, a control or non-ASCII character; "
            "TrueNAS API keys look like <id>-<64 letters and digits>"
        )


_BREAKS = re.compile(r"[\s\x00-\x1f\x7f]+")
_MIN_FRAGMENT = 6


def _forms(value: str) -> list[str]:
    """The key as error texts may carry it: raw, escaped (Python ``repr`` of str or bytes, JSON),
    the secret part after ``<id>-``, and each piece between whitespace or control characters (an
    HTTP library's "Illegal header value b'Bearer 1-ab\\ncd'" escapes the break it refuses).
    Longest first, so a fragment never breaks a longer match."""
    if not value:
        return []
    forms = {
        value,
        value.encode("unicode_escape").decode("ascii"),
        repr(value.encode("utf-8", "backslashreplace"))[2:-1],
        json.dumps(value)[1:-1],
    }
    _, dash, secret = value.partition("-")
    if dash and len(secret) >= _MIN_FRAGMENT:
        forms.add(secret)
    forms.update(part for part in _BREAKS.split(value) if len(part) >= _MIN_FRAGMENT)
    return sorted((f for f in forms if f), key=len, reverse=True)


@contextmanager
def scrubbing(secret: Secret) -> Iterator[None]:
    """Defence in depth around everything a transport does: no exception leaves it with the key in
    its text, whatever library produced it. A ``TrueNASError`` is cleaned in place (message, args,
    field errors) and loses a chained cause that carried the key; any other exception whose text
    carries the key becomes a ``TransportError`` with the key replaced."""
    try:
        yield
    except TrueNASError as exc:
        _scrub_error(exc, secret)
        raise
    except Exception as exc:
        raise map_exception(exc, secret) from None


def map_exception(exc: Exception, secret: Secret) -> TrueNASError:
    """The one boundary of the TrueNAS edge (as httpx's ``map_exceptions``): whatever a library or a
    malformed answer raised inside a transport leaves it as the client's own error, its text
    scrubbed of the key. A timeout is ``CallTimeout``; a socket error ``TransportError``; an answer
    that could not be read (``ValueError``, ``KeyError``, ``TypeError``, ... while taking it apart)
    ``MalformedAnswer``; anything else ``TransportError``."""
    text = secret.scrub(f"{type(exc).__name__}: {exc}".splitlines()[0] if str(exc) else type(exc).__name__)
    if isinstance(exc, TimeoutError):
        return CallTimeout(f"no answer from TrueNAS within the timeout ({text})")
    if isinstance(exc, OSError):
        return TransportError(f"cannot reach TrueNAS: {text}")
    if isinstance(exc, ValueError | LookupError | TypeError | AttributeError | UnicodeError):
        return MalformedAnswer(f"TrueNAS sent an answer the client cannot read: {text}")
    return TransportError(text)


class _HasOptions(Protocol):
    options: ConnectionOptions


_T = TypeVar("_T", bound=_HasOptions)
_P = ParamSpec("_P")
_R = TypeVar("_R")


def scrubbed(
    method: Callable[Concatenate[_T, _P], Coroutine[Any, Any, _R]],
) -> Callable[Concatenate[_T, _P], Coroutine[Any, Any, _R]]:
    """A transport method under ``scrubbing(self.options.api_key)``."""

    @functools.wraps(method)
    async def wrapper(self: _T, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        with scrubbing(self.options.api_key):
            return await method(self, *args, **kwargs)

    return wrapper


def _scrub_error(exc: TrueNASError, secret: Secret) -> None:
    exc.message = secret.scrub(exc.message)
    exc.args = tuple(secret.scrub(arg) if isinstance(arg, str) else arg for arg in exc.args)
    if isinstance(exc, ValidationFailed):
        exc.errors = [dataclasses.replace(e, message=secret.scrub(e.message)) for e in exc.errors]
    if _chain_leaks(exc, secret):
        exc.__cause__ = None
        exc.__context__ = None
        exc.__suppress_context__ = True


def _chain_leaks(exc: BaseException, secret: Secret) -> bool:
    """Whether an exception this one was raised from (or while handling) carries the key."""
    seen: set[int] = set()
    link = exc.__cause__ or exc.__context__
    while link is not None and id(link) not in seen:
        seen.add(id(link))
        text = f"{link} {link.args!r}"
        if secret.scrub(text) != text:
            return True
        link = link.__cause__ or link.__context__
    return False


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
    username: str = "root"
    """The API key's owner: SCRAM (TrueNAS 26) names it with the key's id."""


class Transport(Protocol):
    """A connection to one TrueNAS."""

    name: str
    system_version: str | None
    api_version: str | None
    """The API version spoken: ``v25.10.1`` (JSON-RPC), ``v2.0`` (REST); None when not known."""
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

    def unsubscribe(self, collection: str, callback: EventCallback) -> None:
        """``callback`` hears no more events (a shared transport's holder closed); unknown ones are ignored."""
        ...

    async def wait_job(
        self,
        job_id: int,
        timeout: float | None = None,
        on_progress: Callable[[dict[str, Any]], None] | None = None,
        *,
        method: str = "",
    ) -> Any:
        """Follows a job started elsewhere (by an upload, before a restart) to its end: its result, or
        raises as ``call_job`` does. ``method``: what the job is, for metrics (the caller's name for
        it, never the server's text)."""
        ...

    async def upload(
        self,
        path: str,
        data: bytes | Path,
        *,
        mode: int,
        on_progress: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        """Writes ``data`` (bytes, or a file streamed from disk) to ``path`` on the NAS with ``mode``
        (``POST /_upload`` + ``filesystem.put``, upload.py) and waits for its job."""
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
