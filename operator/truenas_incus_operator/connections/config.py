"""A connection's configuration, resolved: where TrueNAS is and the credentials to use.

Two sources: the operator's settings (the default connection) and a TrueNASConnection with its
Secrets. Both are read again after TrueNAS refuses a key, so a rotated key needs no restart.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

from ..kube import Kube
from ..models import EFFECTIVE_DEFAULTS, TrueNASConnectionSpec
from ..problems import fail
from ..settings import Settings
from ..truenas import Secret

DEFAULT_KEY = "<default>"
"""The key of the operator's default connection (TrueNASConnections are ``namespace/name``)."""
DEFAULT_PORTS = {"wss": 443, "https": 443, "ws": 80, "http": 80}


def truenas_identity(url: str) -> str:
    """Which TrueNAS a URL reaches, for the ownership ledger: ``wss://NAS.example/api`` -> ``nas.example:443``."""
    parts = urlsplit(url)
    port = parts.port or DEFAULT_PORTS.get(parts.scheme, 0)
    return f"{(parts.hostname or '').lower()}:{port}"


@dataclass(frozen=True)
class ConnectionConfig:
    url: str
    api_key: Secret
    transport: str = "websocket"
    ca_pem: str | None = None
    insecure_skip_verify: bool = False
    max_concurrent_calls: int = 20

    @property
    def identity(self) -> str:
        return truenas_identity(self.url)


Loader = Callable[[], Awaitable[ConnectionConfig]]
"""Reads a connection's configuration (again); raises ``OperatorError``."""


def settings_loader(settings: Settings) -> Loader:
    """The default connection from ``TIO_TRUENAS_*``; key and CA files are re-read on each load."""

    async def load() -> ConnectionConfig:
        try:
            api_key = settings.default_api_key()
            ca_pem = settings.default_ca()
        except OSError as exc:
            raise fail("ConfigurationError", f"{exc.filename}: {exc.strerror}") from None
        if not api_key:
            raise fail(
                "ConfigurationError", "TIO_TRUENAS_URL is set but there is no API key (TIO_TRUENAS_API_KEY_FILE)"
            )
        return ConnectionConfig(
            url=str(settings.truenas_url),
            api_key=Secret(api_key),
            transport=str(settings.truenas_transport),
            ca_pem=ca_pem,
            insecure_skip_verify=settings.truenas_insecure_skip_verify,
            max_concurrent_calls=settings.truenas_max_concurrent_calls,
        )

    return load


def resource_loader(kube: Kube, namespace: str, spec: TrueNASConnectionSpec) -> Loader:
    """A TrueNASConnection: its key (and CA) from Secrets in its namespace."""

    async def load() -> ConnectionConfig:
        ref = spec.api_key_secret_ref
        api_key = await kube.read_secret_key(namespace, ref.name, ref.key)
        ca_pem = None
        if spec.tls and spec.tls.ca_secret_ref:
            ca_ref = spec.tls.ca_secret_ref
            ca_pem = await kube.read_secret_key(namespace, ca_ref.name, ca_ref.key)
        return ConnectionConfig(
            url=spec.url,
            api_key=Secret(api_key),
            transport=str(spec.transport or EFFECTIVE_DEFAULTS["transport"]),
            ca_pem=ca_pem,
            insecure_skip_verify=bool(spec.tls and spec.tls.insecure_skip_verify),
            max_concurrent_calls=spec.max_concurrent_calls or EFFECTIVE_DEFAULTS["max_concurrent_calls"],
        )

    return load
