"""The operator's one problem vocabulary: what went wrong, as the Synced condition says it.

- ``Problem``: a Synced=False reason and a message (TrueNAS's own words where TrueNAS refused).
- ``OperatorError``: the one exception the operator's own code raises; it carries a ``Problem`` and,
  when the caller should try again at a set time, ``retry_after`` seconds.
- ``problem_of(exc)``: the one table from an error's kind to its reason. The TrueNAS client raises
  the specific error (``ImageNotFound``, ``AlreadyExists``, ...); nothing here reads messages.
  Anything else (a bug: neither the Kubernetes edge, ``kube.py``, nor the TrueNAS client lets a
  foreign exception out) is ``InternalError``, which the instance loop reports and retries.
"""

from __future__ import annotations

from dataclasses import dataclass

from .truenas.errors import (
    AlreadyExists,
    APIUnavailable,
    AuthenticationFailed,
    CallFailed,
    ImageNotFound,
    ImageServerError,
    JobFailed,
    MalformedAnswer,
    NotAuthorized,
    TransportError,
    TrueNASError,
    ValidationFailed,
)


@dataclass(frozen=True)
class Problem:
    """Why the last reconcile failed: the Synced=False reason and TrueNAS's (or our) message."""

    reason: str
    message: str


class OperatorError(Exception):
    """A failure the operator reports as ``problem``; ``retry_after`` overrides the backoff."""

    def __init__(self, problem: Problem, retry_after: float | None = None) -> None:
        super().__init__(problem.message)
        self.problem = problem
        self.retry_after = retry_after


def fail(reason: str, message: str, retry_after: float | None = None) -> OperatorError:
    """``raise fail("NotConverged", "...")``."""
    return OperatorError(Problem(reason, message), retry_after)


# Most specific first: the first matching class names the reason.
REASON_BY_ERROR: tuple[tuple[type[TrueNASError], str], ...] = (
    (AlreadyExists, "ValidationFailed"),
    (ValidationFailed, "ValidationFailed"),
    (ImageNotFound, "ImageNotFound"),
    (ImageServerError, "ImageServerError"),
    (JobFailed, "JobFailed"),
    (AuthenticationFailed, "AuthenticationFailed"),
    (NotAuthorized, "NotAuthorized"),
    (APIUnavailable, "APIUnavailable"),
    (MalformedAnswer, "MalformedAnswer"),
    (TransportError, "Unreachable"),
    (CallFailed, "CallFailed"),
    (TrueNASError, "CallFailed"),
)

INTERNAL_ERROR = "InternalError"
"""The reason of anything outside both error trees (``problem_of``)."""

# Problems that mean "not there yet" rather than "wrong": the connection is still being set up.
WAITING_REASONS = frozenset({"Connecting", "ConnectionNotFound", "Unreachable", "NoConnection"})


def problem_of(exc: BaseException) -> Problem:
    """The Problem an exception reports, from its kind alone."""
    if isinstance(exc, OperatorError):
        return exc.problem
    if isinstance(exc, TrueNASError):
        reason = next(reason for kind, reason in REASON_BY_ERROR if isinstance(exc, kind))
        return Problem(reason, str(exc) if isinstance(exc, ValidationFailed) else exc.message)
    return Problem(INTERNAL_ERROR, f"{type(exc).__name__}: {exc}")
