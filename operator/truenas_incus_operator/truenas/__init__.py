"""The TrueNAS client: ``await connect(url, api_key)`` -> ``TrueNASClient`` with ``.instances``.

Transports: JSON-RPC over WebSocket (default) and REST v2.0 (25.x). Backends: ``virt.instance``.
Errors: see ``errors`` (one hierarchy under ``TrueNASError``).
"""

from .client import TrueNASClient, connect, parse_version, ssl_context
from .errors import (
    APIUnavailable,
    AuthenticationFailed,
    CallFailed,
    CallTimeout,
    FieldError,
    ImageNotFound,
    JobFailed,
    NotAuthorized,
    NotFound,
    TransportError,
    TrueNASError,
    ValidationFailed,
)
from .types import (
    UNSET,
    DeviceConfig,
    InstanceBackend,
    InstanceChanges,
    InstanceConfig,
    ObservedImage,
    ObservedInstance,
)

__all__ = [
    "UNSET",
    "APIUnavailable",
    "AuthenticationFailed",
    "CallFailed",
    "CallTimeout",
    "DeviceConfig",
    "FieldError",
    "ImageNotFound",
    "InstanceBackend",
    "InstanceChanges",
    "InstanceConfig",
    "JobFailed",
    "NotAuthorized",
    "NotFound",
    "ObservedImage",
    "ObservedInstance",
    "TransportError",
    "TrueNASClient",
    "TrueNASError",
    "ValidationFailed",
    "connect",
    "parse_version",
    "ssl_context",
]
