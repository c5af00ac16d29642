"""A connection's configuration, resolved: where TrueNAS is and the credentials to use.

Two sources: the operator's settings (the default connection) and a TrueNASConnection with its
Secrets. Both are read again after TrueNAS refuses a key, so a rotated key needs no restart.

Whoever may create a TrueNASConnection chooses the URL, so the credentials are guarded here, where
the operator decides what to send where (docs/security.md):

- a Secret is used only when it opts in with the label ``incus.truenas.io/credentials: "true"``
  (RBAC cannot grant ``get`` on Secrets by label, so the operator's own check is the gate);
- an API key Secret annotated ``incus.truenas.io/allowed-hosts`` goes only to the hosts it lists
  (written by the Secret's owner, whom the connection's author cannot override);
- plain ``ws://``/``http://`` only to loopback, unless the connection (or the settings) allows it;
- a key with whitespace or control characters inside is refused before it reaches a transport.
"""

from __future__ import annotations

import contextlib
import ipaddress
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

from ..kube import Kube, SecretObject
from ..models import EFFECTIVE_DEFAULTS, TrueNASConnectionSpec
from ..policy import DEFAULT_CONNECTION, POLICY_REASON, Policy
from ..problems import Reason, fail
from ..settings import Settings
from ..truenas import Endpoint, Secret
from ..truenas.images import DEFAULT_IMAGE_SERVER, ImageSource

DEFAULT_KEY = DEFAULT_CONNECTION
"""The key of the operator's default connection (TrueNASConnections are ``namespace/name``)."""
DEFAULT_PORTS = {"wss": 443, "https": 443, "ws": 80, "http": 80}


def truenas_identity(url: str) -> str:
    """Which address a URL reaches (the ledger's key before the NAS's own identity was used; records
    under it are migrated, ``Ledger.migrate``): ``wss://NAS.example./api`` ->
    ``nas.example:443``. One spelling per host: lower case, no trailing dot, IDNA for names,
    canonical IP literals (so ``[0:0::1]`` and ``[::1]`` are one TrueNAS)."""
    parts = urlsplit(url)
    port = parts.port or DEFAULT_PORTS.get(parts.scheme, 0)
    host = (parts.hostname or "").rstrip(".").lower()
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        with contextlib.suppress(UnicodeError):
            host = host.encode("idna").decode("ascii")
    else:
        host = f"[{address.compressed}]" if address.version == 6 else address.compressed
    return f"{host}:{port}"


def nas_identity(system_id: str) -> str:
    """Which TrueNAS a connection reaches, as the NAS says (``system.global.id``): the ownership
    ledger's key, the same however a URL spells the address."""
    return f"nas-{system_id}"


CREDENTIALS_LABEL = "incus.truenas.io/credentials"
"""A Secret the operator may read for a TrueNASConnection carries this label with value ``"true"``."""
ALLOWED_HOSTS_ANNOTATION = "incus.truenas.io/allowed-hosts"
"""Optional, on the API key Secret: the hosts (``host`` or ``host:port``, comma-separated) its key
may be sent to."""
PLAIN_SCHEMES = ("ws", "http")
API_KEY_SHAPE = "<id>-<64 letters and digits>"
_PRINTABLE = re.compile(r"[!-~]+")


@dataclass(frozen=True)
class ConnectionConfig(Endpoint):
    """A connection's TrueNAS as the operator configured it (``TIO_TRUENAS_*`` or a TrueNASConnection):
    what ``truenas.connect`` takes. ``vm_image_server`` is an ``ImageSource`` with the policy's bounds
    (or None: the client's default)."""

    @property
    def identity(self) -> str:
        """The address's identity (``truenas_identity``); ownership uses ``Connection.identity``."""
        return truenas_identity(self.url)


Loader = Callable[[], Awaitable[ConnectionConfig]]
"""Reads a connection's configuration (again); raises ``OperatorError``."""


def settings_loader(settings: Settings) -> Loader:
    """The default connection from ``TIO_TRUENAS_*``; key and CA files are re-read on each load."""

    async def load() -> ConnectionConfig:
        url = str(settings.truenas_url)
        check_transport(url, settings.truenas_allow_insecure_transport, "TIO_TRUENAS_ALLOW_INSECURE_TRANSPORT=true")
        try:
            api_key = settings.default_api_key()
            ca_pem = settings.default_ca()
        except OSError as exc:
            raise fail(Reason.CONFIGURATION_ERROR, f"{exc.filename}: {exc.strerror}") from None
        if not api_key:
            raise fail(
                Reason.CONFIGURATION_ERROR, "TIO_TRUENAS_URL is set but there is no API key (TIO_TRUENAS_API_KEY_FILE)"
            )
        source = f"{settings.truenas_api_key_file}" if settings.truenas_api_key_file else "TIO_TRUENAS_API_KEY"
        check_api_key(api_key, source)
        return ConnectionConfig(
            url=url,
            api_key=Secret(api_key),
            transport=str(settings.truenas_transport),
            ca_pem=ca_pem,
            insecure_skip_verify=settings.truenas_insecure_skip_verify,
            max_concurrent_calls=settings.truenas_max_concurrent_calls,
            username=settings.truenas_username,
            vm_image_server=image_source(settings, settings.vm_image_server, trusted=True),
        )

    return load


def image_source(settings: Settings, url: str | None, trusted: bool) -> ImageSource:
    return ImageSource(
        url or DEFAULT_IMAGE_SERVER,
        trusted=trusted,
        max_index_bytes=settings.vm_image_index_max_bytes,
        max_image_bytes=settings.vm_image_max_bytes,
        scratch_dir=settings.scratch_dir,
        base_grace_seconds=settings.vm_base_grace_seconds,
    )


def vm_image_source(
    settings: Settings, policy: Policy, namespace: str, name: str, spec: TrueNASConnectionSpec
) -> ImageSource:
    """A TrueNASConnection's image server: its ``vmImageServer`` where the policy allows it (trusted when
    the policy names it), else the operator's own; refused (PolicyDenied) otherwise."""
    own = settings.vm_image_server or DEFAULT_IMAGE_SERVER
    decision = policy.image_server(namespace, f"{namespace}/{name}", spec.vm_image_server, own)
    if decision.violation is not None:
        raise fail(POLICY_REASON, str(decision.violation))
    return image_source(settings, decision.url, decision.trusted)


def resource_loader(
    kube: Kube,
    namespace: str,
    spec: TrueNASConnectionSpec,
    settings: Settings | None = None,
    policy: Policy | None = None,
    name: str = "",
) -> Loader:
    """A TrueNASConnection ``namespace/name``: its key (and CA) from Secrets in its namespace that opt in;
    VM images from its ``vmImageServer`` where the policy allows it, else from the operator's
    (``TIO_VM_IMAGE_SERVER``)."""
    settings = settings or Settings.model_construct()
    policy = policy or Policy()

    async def load() -> ConnectionConfig:
        images = vm_image_source(settings, policy, namespace, name, spec)  # before any Secret is read
        check_transport(spec.url, bool(spec.allow_insecure_transport), "spec.allowInsecureTransport: true")
        ref = spec.api_key_secret_ref
        key_secret = await _credentials(kube, namespace, ref.name)
        check_allowed_host(key_secret, spec.url)
        api_key = key_secret.text(ref.key)
        check_api_key(api_key, f"Secret {namespace}/{ref.name} key {ref.key!r}")
        ca_pem = None
        if spec.tls and spec.tls.ca_secret_ref:
            ca_ref = spec.tls.ca_secret_ref
            ca_pem = (await _credentials(kube, namespace, ca_ref.name)).text(ca_ref.key)
        return ConnectionConfig(
            url=spec.url,
            api_key=Secret(api_key),
            transport=str(spec.transport or EFFECTIVE_DEFAULTS["transport"]),
            ca_pem=ca_pem,
            insecure_skip_verify=bool(spec.tls and spec.tls.insecure_skip_verify),
            max_concurrent_calls=spec.max_concurrent_calls or EFFECTIVE_DEFAULTS["max_concurrent_calls"],
            username=spec.username or EFFECTIVE_DEFAULTS["username"],
            vm_image_server=images,
        )

    return load


async def _credentials(kube: Kube, namespace: str, name: str) -> SecretObject:
    """A Secret that opted in; refused (SecretNotAllowed) before its data is looked at otherwise."""
    secret = await kube.read_secret(namespace, name)
    if secret.labels.get(CREDENTIALS_LABEL) != "true":
        raise fail(
            Reason.SECRET_NOT_ALLOWED,
            f"Secret {namespace}/{name} is not labelled {CREDENTIALS_LABEL}=true: the operator uses only "
            f"Secrets that opt in. If this Secret is meant for TrueNAS, its owner can run "
            f"kubectl label secret {name} -n {namespace} {CREDENTIALS_LABEL}=true",
        )
    return secret


def check_transport(url: str, allow_insecure: bool, how_to_allow: str) -> None:
    """Plain ``ws://``/``http://`` only to loopback unless explicitly allowed (InsecureTransport)."""
    parts = urlsplit(url)
    if parts.scheme not in PLAIN_SCHEMES or allow_insecure or is_loopback(parts.hostname):
        return
    raise fail(
        Reason.INSECURE_TRANSPORT,
        f"{parts.scheme}://{parts.hostname} would send the API key unencrypted (and TrueNAS revokes a key "
        f"it receives that way): use {'wss' if parts.scheme == 'ws' else 'https'}://, or set {how_to_allow} "
        f"if the network path is trusted",
    )


def is_loopback(host: str | None) -> bool:
    if not host:
        return False
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def allowed_hosts(secret: SecretObject) -> list[str] | None:
    """The annotation's entries (lower case), or None when the Secret does not restrict hosts."""
    value = secret.annotations.get(ALLOWED_HOSTS_ANNOTATION)
    if value is None:
        return None
    return [entry.lower() for entry in re.split(r"[\s,]+", value) if entry]


def check_allowed_host(secret: SecretObject, url: str) -> None:
    """The Secret's owner may bind its key to hosts: ``host`` (any port) or ``host:port``."""
    entries = allowed_hosts(secret)
    if entries is None:
        return
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    try:
        port = parts.port or (443 if parts.scheme in ("wss", "https") else 80)
    except ValueError:
        port = 0
    shown = f"[{host}]" if ":" in host else host
    if host in entries or f"{shown}:{port}" in entries:
        return
    raise fail(
        Reason.HOST_NOT_ALLOWED,
        f"Secret {secret.namespace}/{secret.name} may not be sent to {shown}:{port}: its annotation "
        f"{ALLOWED_HOSTS_ANNOTATION} does not list that host",
    )


def check_api_key(api_key: str, source: str) -> None:
    """Refuses a key that could not travel as one header or login value (InvalidAPIKey). The
    message names where the key came from, never the key."""
    if not api_key:
        raise fail(Reason.INVALID_API_KEY, f"{source} is empty")
    if not _PRINTABLE.fullmatch(api_key):
        raise fail(
            Reason.INVALID_API_KEY,
            f"{source} holds whitespace, a line break, a control or non-ASCII character inside the key; "
            f"TrueNAS API keys look like {API_KEY_SHAPE}",
        )
