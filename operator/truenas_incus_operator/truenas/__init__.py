"""The TrueNAS client: ``await connect(Endpoint(url, Secret(api_key)))`` -> ``TrueNASClient`` with ``.instances``.

Transports: JSON-RPC over WebSocket (default) and REST v2.0 (25.x). Backends: ``virt.instance``
(25.x) and ``container.*`` (26), chosen from the server's version. Errors: see ``errors`` (one
hierarchy under ``TrueNASError``). Everything the operator uses is exported here.
"""

from .backends.snapshots import (
    OWNER_PROPERTY,
    SCHEDULE_PREFIX,
    NewerSnapshots,
    NotOurs,
    SnapshotInfo,
    Snapshots,
    SnapshotTasks,
)
from .client import DEFAULT_TIMINGS, Endpoint, Timings, TrueNASClient, connect, parse_version, ssl_context
from .errors import (
    AlreadyExists,
    APIUnavailable,
    AuthenticationFailed,
    CallFailed,
    CallTimeout,
    FieldError,
    ImageNotFound,
    ImageServerError,
    InsufficientMemory,
    InsufficientSpace,
    JobFailed,
    MalformedAnswer,
    NotAuthorized,
    NotFound,
    TransportError,
    TrueNASError,
    ValidationFailed,
)
from .observe import Observer
from .transports.base import Secret
from .transports.shared import TransportPool
from .types import (
    UNSET,
    CloneSource,
    DeviceConfig,
    InstanceBackend,
    InstanceChanges,
    InstanceConfig,
    InstanceStatus,
    ObservedImage,
    ObservedInstance,
    SnapshotTarget,
)

__all__ = [
    "DEFAULT_TIMINGS",
    "OWNER_PROPERTY",
    "SCHEDULE_PREFIX",
    "UNSET",
    "APIUnavailable",
    "AlreadyExists",
    "AuthenticationFailed",
    "CallFailed",
    "CallTimeout",
    "CloneSource",
    "DeviceConfig",
    "Endpoint",
    "FieldError",
    "ImageNotFound",
    "ImageServerError",
    "InstanceBackend",
    "InstanceChanges",
    "InstanceConfig",
    "InstanceStatus",
    "InsufficientMemory",
    "InsufficientSpace",
    "JobFailed",
    "MalformedAnswer",
    "NewerSnapshots",
    "NotAuthorized",
    "NotFound",
    "NotOurs",
    "ObservedImage",
    "ObservedInstance",
    "Observer",
    "Secret",
    "SnapshotInfo",
    "SnapshotTarget",
    "SnapshotTasks",
    "Snapshots",
    "Timings",
    "TransportError",
    "TransportPool",
    "TrueNASClient",
    "TrueNASError",
    "ValidationFailed",
    "connect",
    "parse_version",
    "ssl_context",
]
