"""``connect()``: one TrueNAS, its transport, its detected version and the backend chosen for it."""

from __future__ import annotations

import re
import ssl
from collections.abc import Callable, Hashable
from dataclasses import dataclass

from .backends.container import ContainerBackend
from .backends.routing import RoutingBackend
from .backends.snapshots import Snapshots, SnapshotTasks
from .backends.virt import VirtInstanceBackend
from .backends.vm import VMBackend
from .errors import APIUnavailable, AuthenticationFailed, CallFailed, NotAuthorized, TransportError, TrueNASError
from .images import ImageSource
from .observe import ObservedTransport, Observer
from .transports.base import ConnectionOptions, Secret, Transport
from .transports.jsonrpc import JsonRpcTransport
from .transports.readonly import ReadOnlyTransport
from .transports.rest import RestTransport
from .transports.shared import SharedTransport, TransportPool
from .types import InstanceBackend


def parse_version(text: str | None) -> tuple[int, ...]:
    """``TrueNAS-25.10.1`` / ``25.04.2.6`` -> ``(25, 10, 1)`` / ``(25, 4, 2, 6)``."""
    match = re.search(r"(\d+)\.(\d+)(?:\.(\d+))?(?:\.(\d+))?", text or "")
    if not match:
        return ()
    return tuple(int(part) for part in match.groups() if part is not None)


def ssl_context(ca_pem: str | None = None, insecure_skip_verify: bool = False) -> ssl.SSLContext:
    """Verification on by default: against ``ca_pem`` when given, else the system CAs."""
    context = ssl.create_default_context(cadata=ca_pem) if ca_pem else ssl.create_default_context()
    if insecure_skip_verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


@dataclass
class TrueNASClient:
    """An open connection with the backend for the server's API family."""

    transport: Transport
    instances: InstanceBackend
    version: tuple[int, ...]
    system_version: str
    system_id: str = ""
    """The NAS's own identity (``system.global.id``, see ``read_system_id``); empty only in fakes."""
    shared: SharedTransport | None = None
    """This client's view of a pooled transport (``connect(pool=...)``), else None."""

    @property
    def api_family(self) -> str:
        return self.instances.family

    @property
    def snapshots(self) -> Snapshots:
        """ZFS snapshots of the instances' datasets (backends/snapshots.py)."""
        return Snapshots(self.transport, self.version)

    @property
    def snapshot_tasks(self) -> SnapshotTasks:
        """Periodic snapshot tasks (backends/snapshots.py): TrueNAS's own schedules."""
        return SnapshotTasks(self.transport)

    @property
    def login_mechanism(self) -> str | None:
        """How the transport logged in (``SCRAM-SHA-512[+tls-server-end-point]``, ``API_KEY_PLAIN``);
        None where it does not say (REST sends the key with every request)."""
        mechanism = getattr(self.transport, "login_mechanism", None)
        return mechanism if isinstance(mechanism, str) else None

    async def close(self, *, broken: bool = False) -> None:
        """``broken``: the holder saw this client fail; a pooled transport is then not handed to
        anyone new (transports/shared.py)."""
        if broken and self.shared is not None:
            self.shared.retire()
        await self.transport.close()


@dataclass(frozen=True)
class Timings:
    """How long a client waits, in seconds: for one call's answer, for a read (at most ``call``), for a
    job, and for the connection itself."""

    call: float = 60.0
    read: float = 20.0
    job: float = 15 * 60.0
    connect: float = 10.0


DEFAULT_TIMINGS = Timings()


@dataclass(frozen=True)
class Endpoint:
    """One TrueNAS and how to reach it: what ``connect()`` needs besides its timings."""

    url: str
    api_key: Secret
    transport: str = "websocket"
    """``websocket`` (JSON-RPC 2.0) or ``rest`` (REST v2.0, 25.x only)."""
    ca_pem: str | None = None
    insecure_skip_verify: bool = False
    max_concurrent_calls: int = 20
    username: str = "root"
    """The API key's owner, which SCRAM login (TrueNAS 26) names with the key."""
    vm_image_server: ImageSource | None = None
    """The simplestreams server (or local mirror) VM images come from on ``vm.*``; None: the Linux
    Containers image server."""

    @property
    def share_key(self) -> tuple[Hashable, ...]:
        """What clients must have in common to share one transport (``connect(pool=...)`` adds the
        timings): the URL as written, the key and its user, the CA (a file's last newline is no other CA), the
        verification switch and the call limit. The operator keys its job slots on it too."""
        ca = self.ca_pem.strip() if self.ca_pem else None
        return (
            self.transport,
            self.url,
            self.api_key,
            self.username,
            ca,
            self.insecure_skip_verify,
            self.max_concurrent_calls,
        )


async def connect(
    endpoint: Endpoint,
    timings: Timings = DEFAULT_TIMINGS,
    *,
    observer: Observer | None = None,
    may_write: Callable[[], bool] = lambda: True,
    pool: TransportPool | None = None,
    read_only: bool = False,
) -> TrueNASClient:
    """Connects, logs in, detects the version and picks the backend; raises ``TrueNASError``.

    ``observer`` (observe.py) is told of every call, job and event through this client.
    ``may_write``: asked before the client writes on its own (the VM backend's base collection during
    the resync query); the operator passes its Lease fence.
    ``pool``: share one transport with every other client of the pool that has the same
    ``endpoint.share_key`` and timings (transports/shared.py); the backend and the observer stay
    this client's.
    ``read_only``: every call but a read is refused before it is sent (``import``); the client makes
    no write of its own either (``may_write`` is then never asked).
    """
    if endpoint.transport not in ("websocket", "rest"):
        raise ValueError(f"unknown transport {endpoint.transport!r}: use websocket or rest")

    def open_transport() -> Transport:
        secure = endpoint.url.startswith(("wss://", "https://"))
        options = ConnectionOptions(
            url=endpoint.url,
            api_key=endpoint.api_key,
            ssl_context=ssl_context(endpoint.ca_pem, endpoint.insecure_skip_verify) if secure else None,
            max_concurrent_calls=endpoint.max_concurrent_calls,
            call_timeout=timings.call,
            read_timeout=min(timings.read, timings.call),
            job_timeout=timings.job,
            connect_timeout=timings.connect,
            username=endpoint.username,
        )
        return JsonRpcTransport(options) if endpoint.transport == "websocket" else RestTransport(options)

    shared: SharedTransport | None = None
    chosen: Transport
    if pool is not None:
        chosen = shared = pool.view((endpoint.share_key, timings), open_transport)
    else:
        chosen = open_transport()
    if observer is not None:
        chosen = ObservedTransport(chosen, observer)
    if read_only:
        chosen = ReadOnlyTransport(chosen)
        may_write = lambda: False  # noqa: E731
    try:
        await chosen.connect()
        version = parse_version(chosen.system_version)
        system_id = await read_system_id(chosen)
        backend = await choose_backend(chosen, version, endpoint.vm_image_server, may_write, observer)
    except BaseException as exc:
        if shared is not None and isinstance(exc, TransportError | AuthenticationFailed):
            shared.retire()  # no answer, or the key refused: nobody new joins this transport
        await chosen.close()
        raise
    return TrueNASClient(chosen, backend, version, chosen.system_version or "", system_id, shared)


_SYSTEM_UUID = re.compile(r"[0-9a-f]{32}")


async def read_system_id(transport: Transport) -> str:
    """Which NAS this is, as the NAS says: ``system.global.id``, the 128-bit UUID TrueNAS keeps in its
    configuration database (plugins/system/globalid.py; READONLY_ADMIN; the same method and answer
    on 25.04.0, 25.04.2, 25.10 and 26.0). Unlike the URL, every spelling of the address gives the
    same answer; unlike ``system.host_id`` (from /etc/hostid, per machine) it stays the same across
    an HA failover and a reinstall that restores the configuration. Hostile input: only 32 hex
    digits are accepted."""
    try:
        answer = await transport.call("system.global.id", idempotent=True)
    except NotAuthorized:
        raise NotAuthorized(
            "system.global.id: not authorized; the operator keys ownership on the NAS's own identity, which "
            "TrueNAS shows to the role READONLY_ADMIN: add that role to the API key's user (docs/security.md)"
        ) from None
    text = answer.strip().lower().replace("-", "") if isinstance(answer, str) else ""
    if not _SYSTEM_UUID.fullmatch(text):
        raise CallFailed("system.global.id did not answer a system UUID (32 hexadecimal digits)")
    return text


async def choose_backend(
    transport: Transport,
    version: tuple[int, ...],
    vm_image_server: str | ImageSource | None = None,
    may_write: Callable[[], bool] = lambda: True,
    observer: Observer | None = None,
) -> InstanceBackend:
    """The API family for instances on this server (product.md §4); from 25.04.2 on, VMs go to ``vm.*``
    (truenas-vm-container.md §1) through a routing backend beside the containers' family."""
    containers = await choose_container_backend(transport, version)
    if version >= (25, 4, 2) and transport.name == "websocket":  # the REST facade maps no vm.* routes
        return RoutingBackend(
            containers, VMBackend(transport, version, vm_image_server, may_write=may_write, observer=observer)
        )
    return containers


async def choose_container_backend(transport: Transport, version: tuple[int, ...]) -> InstanceBackend:
    shown = ".".join(map(str, version)) or "unknown"
    if version and version >= (26,):
        try:
            await transport.call("lxc.config", idempotent=True)
        except CallFailed as exc:
            if "Method does not exist" in exc.message:
                raise APIUnavailable(f"TrueNAS {shown} offers neither virt.* nor container.*") from None
            raise
        return ContainerBackend(transport, version)
    try:
        await transport.call("virt.global.config", idempotent=True)
    except CallFailed as exc:
        if "Method does not exist" in exc.message:
            raise APIUnavailable(f"TrueNAS {shown} does not offer virt.instance (virt.* is removed there)") from None
        raise
    except TrueNASError:
        raise
    return VirtInstanceBackend(transport, version)
