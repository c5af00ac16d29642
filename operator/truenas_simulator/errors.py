"""Exceptions as TrueNAS's middleware raises them, and how each is put on the wire.

``str()`` of each matches the middleware (``"[EINVAL] attr: message\\n"``), because that string is
what appears in a job's ``error`` and in JSON-RPC ``data.reason``.
"""

from __future__ import annotations

import errno as _errno
from typing import Any

ENOMETHOD = 201
ENOTAUTHENTICATED = 207

_ERRNAMES = {
    _errno.EINVAL: "EINVAL",
    _errno.ENOENT: "ENOENT",
    _errno.EFAULT: "EFAULT",
    _errno.EACCES: "EACCES",
    _errno.EEXIST: "EEXIST",
    _errno.ENOMEM: "ENOMEM",
    ENOMETHOD: "ENOMETHOD",
    ENOTAUTHENTICATED: "ENOTAUTHENTICATED",
}


def errname(code: int) -> str:
    return _ERRNAMES.get(code, _errno.errorcode.get(code, f"E{code}"))


class CallError(Exception):
    """A failed call: JSON-RPC -32001, REST 422 ``{"message", "errno"}``."""

    def __init__(self, errmsg: str, errno: int = _errno.EFAULT, extra: Any = None) -> None:
        super().__init__(errmsg)
        self.errmsg = errmsg
        self.errno = errno
        self.extra = extra

    def __str__(self) -> str:
        return f"[{errname(self.errno)}] {self.errmsg}"


class ValidationErrors(Exception):
    """Field errors collected by validation: JSON-RPC -32602, REST 422 keyed by attribute."""

    def __init__(self, errors: list[tuple[str | None, str, int]] | None = None) -> None:
        super().__init__()
        self.errors: list[tuple[str | None, str, int]] = list(errors or [])

    def add(self, attribute: str | None, message: str, errno: int = _errno.EINVAL) -> None:
        self.errors.append((attribute, message, errno))

    def check(self) -> None:
        if self.errors:
            raise self

    def __bool__(self) -> bool:
        return bool(self.errors)

    def __str__(self) -> str:
        return "".join(f"[{errname(e)}] {attr}: {msg}\n" for attr, msg, e in self.errors)

    def extra(self) -> list[list[Any]]:
        return [[attr, msg, e] for attr, msg, e in self.errors]


class InstanceNotFound(ValidationErrors):
    """``get_instance`` on a missing id: attribute null, errno ENOENT."""

    def __init__(self, verbose_name: str, ident: Any) -> None:
        super().__init__([(None, f"{verbose_name} {ident} does not exist", _errno.ENOENT)])

    def __str__(self) -> str:
        attr, msg, e = self.errors[0]
        return f"[{errname(e)}] {attr}: {msg}"


class MatchNotFound(Exception):
    """``query`` with ``get: true`` and no match (REST 404)."""

    def __str__(self) -> str:
        return "MatchNotFound()"


class MethodNotFound(Exception):
    """JSON-RPC -32601 "Method does not exist"."""
