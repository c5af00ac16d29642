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
from enum import StrEnum

from .truenas.errors import (
    AlreadyExists,
    APIUnavailable,
    AuthenticationFailed,
    CallFailed,
    ImageNotFound,
    ImageServerError,
    InsufficientMemory,
    InsufficientSpace,
    JobFailed,
    MalformedAnswer,
    NotAuthorized,
    TransportError,
    TrueNASError,
    ValidationFailed,
)


class Reason(StrEnum):
    """Every reason the operator writes into a condition: an IncusInstance's Ready and Synced, a
    TrueNASConnection's Ready and Secure. The README's status table lists exactly these
    (tests/test_configuration_docs.py), and each problem has an entry in docs/troubleshooting.md."""

    # Ready=True
    AVAILABLE = "Available"
    STOPPED = "Stopped"
    MANUAL = "Manual"
    OBSERVED = "Observed"
    """spec.managementPolicy ObserveOnly: the instance exists and is observed (nothing is written)."""
    # Ready=False (Creating, Starting, Stopping, Deleting: the operator is doing it now, as the phase)
    CREATING = "Creating"
    STARTING = "Starting"
    STOPPING = "Stopping"
    DELETING = "Deleting"
    PROGRESSING = "Progressing"
    TRANSITIONING = "Transitioning"
    NOT_RUNNING = "NotRunning"
    NOT_STOPPED = "NotStopped"
    NO_ADDRESS = "NoAddress"
    ADDRESS_CONFLICT = "AddressConflict"
    NOT_FOUND = "NotFound"
    NOT_OBSERVED = "NotObserved"
    NOT_SYNCED = "NotSynced"
    HELD = "Held"
    """A snapshot or restore holds the power state (the instance is stopped for it)."""
    # Synced=True
    RECONCILE_SUCCESS = "ReconcileSuccess"
    OBSERVING = "Observing"
    """ObserveOnly: the last observation succeeded; the InSync condition says what Full would change."""
    # InSync (ObserveOnly only): True Matches; False Differs (what Full would change) or NotFound
    MATCHES = "Matches"
    DIFFERS = "Differs"
    # Paused=True, and Synced=False: the incus.truenas.io/paused annotation stops every write
    RECONCILIATION_PAUSED = "ReconciliationPaused"
    PARTIALLY_APPLIED = "PartiallyApplied"
    # Synced=False: what the plan refuses
    ALREADY_EXISTS = "AlreadyExists"
    ADOPTION_NOT_ALLOWED = "AdoptionNotAllowed"
    OBSERVE_NOT_ALLOWED = "ObserveNotAllowed"
    CONFLICT = "Conflict"
    INSTANCE_GONE = "InstanceGone"
    OWNS_ELSEWHERE = "OwnsElsewhere"
    NOT_OWNER = "NotOwner"
    TYPE_MISMATCH = "TypeMismatch"
    IMMUTABLE_FIELD_CHANGED = "ImmutableFieldChanged"
    UNSUPPORTED = "Unsupported"
    POLICY_DENIED = "PolicyDenied"
    INVALID_SPEC = "InvalidSpec"
    NOT_CONVERGED = "NotConverged"
    CREATE_IN_PROGRESS = "CreateInProgress"
    DELETE_FAILED = "DeleteFailed"
    # Synced=False: what TrueNAS answered (REASON_BY_ERROR)
    VALIDATION_FAILED = "ValidationFailed"
    IMAGE_NOT_FOUND = "ImageNotFound"
    IMAGE_SERVER_ERROR = "ImageServerError"
    JOB_FAILED = "JobFailed"
    CALL_FAILED = "CallFailed"
    AUTHENTICATION_FAILED = "AuthenticationFailed"
    NOT_AUTHORIZED = "NotAuthorized"
    INSUFFICIENT_MEMORY = "InsufficientMemory"
    INSUFFICIENT_SPACE = "InsufficientSpace"
    API_UNAVAILABLE = "APIUnavailable"
    MALFORMED_ANSWER = "MalformedAnswer"
    UNREACHABLE = "Unreachable"
    # Synced=False (and a TrueNASConnection's Ready=False): the connection and its configuration
    CONNECTING = "Connecting"
    CONNECTION_NOT_FOUND = "ConnectionNotFound"
    NO_CONNECTION = "NoConnection"
    QUOTA_EXCEEDED = "QuotaExceeded"
    CONFIGURATION_ERROR = "ConfigurationError"
    SECRET_NOT_FOUND = "SecretNotFound"
    SECRET_UNREADABLE = "SecretUnreadable"
    SECRET_NOT_ALLOWED = "SecretNotAllowed"
    HOST_NOT_ALLOWED = "HostNotAllowed"
    INSECURE_TRANSPORT = "InsecureTransport"
    INVALID_API_KEY = "InvalidAPIKey"
    # Synced=False: the operator's own footing
    KUBERNETES_ERROR = "KubernetesError"
    LEDGER_UNAVAILABLE = "LedgerUnavailable"
    LEASE_NOT_HELD = "LeaseNotHeld"
    INTERNAL_ERROR = "InternalError"
    # An IncusInstanceSnapshot's or IncusInstanceRestore's Ready
    TAKEN = "Taken"
    RESTORED = "Restored"
    PENDING = "Pending"
    ROLLING_BACK = "RollingBack"
    GONE = "Gone"
    NEWER_SNAPSHOTS = "NewerSnapshots"
    SNAPSHOT_NOT_FOUND = "SnapshotNotFound"
    INSTANCE_NOT_FOUND = "InstanceNotFound"
    HAS_CLONES = "HasClones"
    """A snapshot (or the instance it is of) cannot go while instances cloned from it exist."""
    SOURCE_NOT_READY = "SourceNotReady"
    """(An IncusInstance's Synced) spec.source's IncusInstanceSnapshot is missing or not Ready yet."""
    # The Exposed condition (spec.expose: the Service and its EndpointSlices, instances/exposure.py)
    EXPOSED = "Exposed"
    NOT_EXPOSED = "NotExposed"
    EXPOSE_CONFLICT = "ExposeConflict"
    EXPOSE_FAILED = "ExposeFailed"
    # A TrueNASConnection's Ready=True, and its Secure condition
    CONNECTED = "Connected"
    VERIFIED = "Verified"
    NOT_VERIFIED = "NotVerified"
    PLAIN_TRANSPORT = "PlainTransport"
    INSECURE_SKIP_VERIFY = "InsecureSkipVerify"


@dataclass(frozen=True)
class Problem:
    """Why the last reconcile failed: the Synced=False reason and TrueNAS's (or our) message."""

    reason: Reason
    message: str


class OperatorError(Exception):
    """A failure the operator reports as ``problem``; ``retry_after`` overrides the backoff."""

    def __init__(self, problem: Problem, retry_after: float | None = None) -> None:
        super().__init__(problem.message)
        self.problem = problem
        self.retry_after = retry_after


def fail(reason: Reason, message: str, retry_after: float | None = None) -> OperatorError:
    """``raise fail(Reason.NOT_CONVERGED, "...")``."""
    return OperatorError(Problem(reason, message), retry_after)


# Most specific first: the first matching class names the reason.
REASON_BY_ERROR: tuple[tuple[type[TrueNASError], Reason], ...] = (
    (AlreadyExists, Reason.VALIDATION_FAILED),
    (ValidationFailed, Reason.VALIDATION_FAILED),
    (ImageNotFound, Reason.IMAGE_NOT_FOUND),
    (ImageServerError, Reason.IMAGE_SERVER_ERROR),
    (JobFailed, Reason.JOB_FAILED),
    (InsufficientMemory, Reason.INSUFFICIENT_MEMORY),
    (InsufficientSpace, Reason.INSUFFICIENT_SPACE),
    (AuthenticationFailed, Reason.AUTHENTICATION_FAILED),
    (NotAuthorized, Reason.NOT_AUTHORIZED),
    (APIUnavailable, Reason.API_UNAVAILABLE),
    (MalformedAnswer, Reason.MALFORMED_ANSWER),
    (TransportError, Reason.UNREACHABLE),
    (CallFailed, Reason.CALL_FAILED),
    (TrueNASError, Reason.CALL_FAILED),
)

INTERNAL_ERROR = Reason.INTERNAL_ERROR
"""The reason of anything outside both error trees (``problem_of``)."""

# Problems that mean "not there yet" rather than "wrong": the connection is still being set up.
WAITING_REASONS = frozenset({Reason.CONNECTING, Reason.CONNECTION_NOT_FOUND, Reason.UNREACHABLE, Reason.NO_CONNECTION})


def problem_of(exc: BaseException) -> Problem:
    """The Problem an exception reports, from its kind alone."""
    if isinstance(exc, OperatorError):
        return exc.problem
    if isinstance(exc, TrueNASError):
        reason = next(reason for kind, reason in REASON_BY_ERROR if isinstance(exc, kind))
        return Problem(reason, str(exc) if isinstance(exc, ValidationFailed) else exc.message)
    return Problem(INTERNAL_ERROR, f"{type(exc).__name__}: {exc}")
