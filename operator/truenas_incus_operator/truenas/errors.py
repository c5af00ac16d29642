"""The TrueNAS client's exceptions, one hierarchy::

    TrueNASError                       anything the client raises
    ├── TransportError                 could not reach TrueNAS, or the connection dropped
    │   ├── CallTimeout                no answer (or job end) within the timeout
    │   └── MalformedAnswer            an answer that is not the API's shape (a 200 that is not JSON)
    ├── AuthenticationFailed           the API key was refused (wrong, revoked, expired)
    ├── NotAuthorized                  logged in, but the key's role may not do this
    ├── APIUnavailable                 the server lacks the API family (virt.* on TrueNAS 26, REST on 26)
    ├── ImageServerError               a VM image server or mirror failed or was refused (images.py's one error)
    └── CallFailed                     TrueNAS answered with an error (CallError): ``errno``, ``message``
        ├── ValidationFailed           field errors: ``errors`` = [FieldError(attribute, message, errno)]
        │   ├── NotFound               the instance (or device) does not exist
        │   └── AlreadyExists          an instance with that name already exists (create)
        ├── ImageNotFound              no image on TrueNAS matches the alias (container.* registry)
        └── JobFailed                  a job ended FAILED or ABORTED: ``job_id``, ``state``, TrueNAS's ``message``

A job that fails with validation errors raises ``ValidationFailed`` (with ``job_id`` set), so callers
handle a field error the same way whether TrueNAS reported it up front or from inside a job.

Messages carry TrueNAS's own text and never the API key or request parameters.
"""

from __future__ import annotations

import errno as _errno
from dataclasses import dataclass


class TrueNASError(Exception):
    """Base class of every error the client raises."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class TransportError(TrueNASError):
    """TrueNAS could not be reached, or the connection dropped."""


class CallTimeout(TransportError):
    """No answer within the timeout."""


class MalformedAnswer(TransportError):
    """The server answered, but not in the API's shape (a 200 whose body is not JSON, a reply that
    is not an object, a job id that is not a number). A transport error, not ``CallFailed``: it
    does not prove that TrueNAS did nothing (a create whose answer was mangled may have run)."""


class AuthenticationFailed(TrueNASError):
    """The API key was refused."""


class NotAuthorized(TrueNASError):
    """The API key's role does not allow the call."""


class APIUnavailable(TrueNASError):
    """The server does not offer the API family or transport asked for."""


class ImageServerError(TrueNASError):
    """A VM image server (or local mirror) failed, lied or was refused: unreachable, hanging, reset,
    not JSON, ill-shaped, too large, redirected elsewhere, a bad path or checksum. Never TrueNAS's fault,
    so never a reason to reconnect to TrueNAS."""


class CallFailed(TrueNASError):
    """TrueNAS answered with an error."""

    def __init__(self, message: str, errno: int = _errno.EFAULT, method: str | None = None) -> None:
        super().__init__(message)
        self.errno = errno
        self.method = method


@dataclass(frozen=True)
class FieldError:
    attribute: str | None
    message: str
    errno: int = _errno.EINVAL

    def __str__(self) -> str:
        return f"{self.attribute}: {self.message}" if self.attribute else self.message


class ValidationFailed(CallFailed):
    """TrueNAS refused the arguments; ``errors`` lists each field and TrueNAS's message."""

    def __init__(self, errors: list[FieldError], method: str | None = None, job_id: int | None = None) -> None:
        super().__init__("; ".join(str(e) for e in errors) or "validation failed", _errno.EINVAL, method)
        self.errors = errors
        self.job_id = job_id


class NotFound(ValidationFailed):
    """The instance or device does not exist."""


class AlreadyExists(ValidationFailed):
    """An instance with the requested name already exists (the backend recognises TrueNAS's wording)."""

    @classmethod
    def from_validation(cls, exc: ValidationFailed) -> AlreadyExists:
        return cls(exc.errors, exc.method, exc.job_id)


class ImageNotFound(CallFailed):
    """No image in TrueNAS's registry matches the requested alias."""


class InsufficientMemory(CallFailed):
    """vm.start refused: TrueNAS cannot guarantee the VM's memory (plugins/vm/memory.py, ENOMEM)."""


class InsufficientSpace(CallFailed):
    """A volume TrueNAS will not make that large: more than 80% of the free space under its parent
    (plugins/pool_/dataset.py), which only ``force_size`` overrides and the operator never sends."""


class JobFailed(CallFailed):
    """A TrueNAS job ended FAILED or ABORTED."""

    def __init__(
        self,
        message: str,
        job_id: int,
        state: str = "FAILED",
        errno: int = _errno.EFAULT,
        method: str | None = None,
    ) -> None:
        super().__init__(message, errno, method)
        self.job_id = job_id
        self.state = state


def validation_error(
    errors: list[FieldError], method: str | None = None, job_id: int | None = None
) -> ValidationFailed:
    """``NotFound`` for TrueNAS's not-found shape (one ENOENT entry), else ``ValidationFailed``."""
    if errors and all(e.errno == _errno.ENOENT for e in errors):
        return NotFound(errors, method, job_id)
    return ValidationFailed(errors, method, job_id)


def strip_errno_prefix(reason: str) -> str:
    """``"[EFAULT] Virtualization not initialized."`` -> ``"Virtualization not initialized."``."""
    reason = reason.strip()
    if reason.startswith("[") and "] " in reason:
        return reason.split("] ", 1)[1]
    return reason
