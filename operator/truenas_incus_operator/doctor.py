"""``truenas-incus-operator doctor``: a read-only preflight against a real NAS, before installing.

Same connection settings as ``run`` (the ``TIO_TRUENAS_*`` environment). It reports reachability,
TLS (which CA, the certificate's expiry), the TrueNAS version, API family and transport, the key's
roles and which of the operator's calls they allow, the virtualization state, the image registry,
the VM image server (``TIO_VM_IMAGE_SERVER``) and, for manifests given with ``-f``, what the
operator would do with each: refuse it (a VM this NAS or transport cannot create, an image neither
TrueNAS's registry nor the VM image server has, more memory than the NAS has) or leave fields
unhonoured. A manifest is checked against the environment's NAS (``TIO_TRUENAS_URL``) even when it
names a TrueNASConnection: doctor says so. On a TLS failure it shows the certificate the server
presented (subject, issuer, SHA-256 fingerprint) and the variable to set.

It never writes: doctor's own calls go through ``read()``, which refuses anything but the reads
listed in ``READS`` before it leaves the process; ``connect()`` adds only its login, the version,
the NAS's identity and the family probe (all reads). The observer records every call for the
report. The key's roles are checked against the calls each backend declares (``calls(version)``),
with the snapshot and periodic snapshot task calls beside them (``declared_calls``).
Exit code: 0 when nothing blocks, 1 when a blocking problem was found, 2 on bad usage.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import sys
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from pydantic import ValidationError

from .connections.config import DEFAULT_PORTS, ConnectionConfig, settings_loader
from .instances.resource import desired_from
from .problems import OperatorError
from .quantity import format_bytes
from .reconcile import _vm_unsupported_message, instance_config
from .settings import Settings
from .status import printable
from .truenas import Timings, TrueNASClient, TrueNASError, connect, ssl_context
from .truenas.backends.container import ContainerBackend
from .truenas.backends.snapshots import Snapshots, SnapshotTasks
from .truenas.backends.virt import VirtInstanceBackend
from .truenas.backends.vm import VMBackend
from .truenas.errors import ImageNotFound
from .truenas.images import DEFAULT_IMAGE_SERVER, ImageServer

OK, WARN, FAIL, SKIP = "ok", "warn", "fail", "skip"
EXPIRY_WARN_DAYS = 30

READS = frozenset(
    {
        "auth.me",
        "virt.global.config",
        "virt.instance.image_choices",
        "lxc.config",
        "container.image.query_registry",
        "system.info",
        "vm.get_available_memory",
    }
)
"""The only calls doctor makes itself (connect() adds the family probe, also a read)."""

BACKENDS: dict[str, type[VirtInstanceBackend] | type[ContainerBackend] | type[VMBackend]] = {
    VirtInstanceBackend.family: VirtInstanceBackend,
    ContainerBackend.family: ContainerBackend,
    VMBackend.family: VMBackend,
}
"""The API families; each declares the calls it makes (``calls(version)``). A connection's family is
``virt.instance+vm`` or ``container+vm`` where VMs go through ``vm.*``."""


def families(client: TrueNASClient) -> list[str]:
    return client.api_family.split("+")


def declared_calls(client: TrueNASClient) -> dict[str, tuple[str, ...]]:
    """Every call the operator makes on this NAS, ``read`` and ``write``: each family's, and those of
    snapshots, restores and spec.snapshots (every family's instances have them)."""
    # Every connect reads the NAS's identity (client.read_system_id; ownership keys on it).
    calls: dict[str, tuple[str, ...]] = {"read": ("system.global.id",), "write": ()}
    declared = [BACKENDS[f].calls(client.version) for f in families(client) if f in BACKENDS]
    declared += [Snapshots.calls(client.version), SnapshotTasks.calls(client.version)]
    for found in declared:
        calls["read"] += tuple(m for m in found.reads if m not in calls["read"])
        calls["write"] += tuple(m for m in found.writes if m not in calls["write"])
    return calls


@dataclass
class Check:
    name: str
    status: str
    summary: str
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class Report:
    checks: list[Check] = field(default_factory=list)
    calls: list[str] = field(default_factory=list)
    """Every call made through the client, in order (reads only)."""
    images: Any = None
    """What TrueNAS's image registry listed (virt: alias -> image; 26: a list of names), if read."""
    host_memory: int | None = None
    """The NAS's physical memory in bytes (system.info physmem), if read."""
    vm_images: ImageServer | None = None
    """The VM image server, when its index could be read."""

    def add(self, name: str, status: str, summary: str, **details: Any) -> Check:
        check = Check(name, status, summary, details)
        self.checks.append(check)
        return check

    @property
    def blocked(self) -> bool:
        return any(c.status == FAIL for c in self.checks)

    def as_json(self) -> dict[str, Any]:
        return {"ok": not self.blocked, "checks": [asdict(c) for c in self.checks], "calls": sorted(set(self.calls))}

    def as_text(self) -> str:
        marks = {OK: "ok  ", WARN: "WARN", FAIL: "FAIL", SKIP: "skip"}
        lines = []
        for check in self.checks:
            # What a server said is escaped: a line break would forge a check, an escape drive the terminal.
            lines.append(printable(f"[{marks[check.status]}] {check.name}: {check.summary}"))
            for key, value in check.details.items():
                shown = ", ".join(map(str, value)) if isinstance(value, list | tuple) else value
                lines.append(printable(f"         {key}: {shown}"))
        verdict = "blocking problems found" if self.blocked else "nothing blocks installing the operator"
        lines.append(f"doctor: {verdict}")
        return "\n".join(lines) + "\n"


class WriteRefused(TrueNASError):
    """doctor tried a call outside its reads: refused before it left the process."""


class ReadOnlyObserver:
    """A ``truenas.Observer`` that records every call doctor's client makes."""

    def __init__(self, report: Report) -> None:
        self.report = report

    def call_started(self) -> None:
        return None

    def call_finished(self, method: str, outcome: str, seconds: float) -> None:
        self.report.calls.append(method)

    def job_finished(self, method: str, state: str, seconds: float) -> None:
        self.report.calls.append(method)

    def event_received(self, collection: str, lag: float | None) -> None:
        return None

    def reconnected(self) -> None:
        return None

    def base_collected(self) -> None:
        return None  # doctor's client only reads: it collects nothing


async def read(client: TrueNASClient, method: str, *params: Any) -> Any:
    """The one way doctor calls TrueNAS: only the reads in ``READS``."""
    if method not in READS:
        raise WriteRefused(f"doctor calls only reads; {method} is not one")
    return await client.transport.call(method, *params, idempotent=True)


# ----- the checks ----------------------------------------------------------------------------------------
async def run_doctor(settings: Settings, manifests: Iterable[Path] = (), timeout: float = 15.0) -> Report:
    report = Report()
    if not settings.truenas_url:
        report.add("configuration", FAIL, "TIO_TRUENAS_URL is not set (doctor checks the default connection)")
        return report
    try:
        config = await settings_loader(settings)()
    except OperatorError as exc:
        report.add("configuration", FAIL, exc.problem.message, reason=exc.problem.reason)
        return report
    report.add("configuration", OK, f"{config.url} over {config.transport}", url=config.url)
    if not await _reachability_and_tls(report, config, settings, timeout):
        return report
    try:
        client = await connect(
            replace(config, vm_image_server=None),  # doctor checks the image server itself, later
            Timings(call=timeout, connect=timeout),
            observer=ReadOnlyObserver(report),
        )
    except TrueNASError as exc:
        report.add("login and version", FAIL, f"{type(exc).__name__}: {config.api_key.scrub(exc.message)}")
        return report
    try:
        login = client.login_mechanism
        report.add(
            "login and version",
            OK,
            f"{client.system_version}: API family {client.api_family} over {client.transport.name}"
            + (f", logged in with {login}" if login else ""),
            version=client.system_version,
            api_family=client.api_family,
            transport=client.transport.name,
            login=login,
        )
        await _roles(report, client)
        await _virtualization(report, client)
        await _registry(report, client)
        await _host_memory(report, client)
        if "vm" in families(client):
            await _vm_memory(report, client)
            await _vm_image_server(report, settings, timeout)
        for path in manifests:
            await _manifest(report, client, path, config.url)
    finally:
        await client.close()
    return report


async def _reachability_and_tls(report: Report, config: ConnectionConfig, settings: Settings, timeout: float) -> bool:
    parts = urlsplit(config.url)
    host = parts.hostname or ""
    port = parts.port or DEFAULT_PORTS.get(parts.scheme, 443)
    secure = parts.scheme in ("wss", "https")
    if settings.truenas_ca_file:
        ca = f"TIO_TRUENAS_CA_FILE ({settings.truenas_ca_file})"
    else:
        ca = "the system's CA certificates"
    if config.insecure_skip_verify:
        ca = "none: verification is off (TIO_TRUENAS_INSECURE_SKIP_VERIFY)"
    context = ssl_context(config.ca_pem, config.insecure_skip_verify) if secure else None
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, ssl=context, server_hostname=host if context else None), timeout
        )
    except ssl.SSLCertVerificationError as exc:
        report.add("reachability", OK, f"{host}:{port} answers")
        presented = await _presented_certificate(host, port, timeout)
        fix = (
            "set TIO_TRUENAS_CA_FILE to the PEM file of the CA that signed this certificate (for a self-signed "
            "TrueNAS certificate: the certificate itself, System > Certificates > Download); check the "
            "fingerprint with the NAS first"
        )
        if exc.verify_code == 62:  # X509_V_ERR_HOSTNAME_MISMATCH: the CA is right, the name is not
            fix = f"the certificate does not name {host}: use a host name it lists in TIO_TRUENAS_URL"
        report.add("TLS", FAIL, f"the certificate is not trusted: {exc.verify_message}", ca=ca, **presented, fix=fix)
        return False
    except (OSError, TimeoutError) as exc:
        report.add("reachability", FAIL, f"cannot reach {host}:{port}: {exc.__class__.__name__}: {exc}")
        return False
    try:
        report.add("reachability", OK, f"{host}:{port} answers")
        if not secure:
            report.add("TLS", WARN, "plain transport: the API key travels unencrypted (loopback or allowed only)")
            return True
        ssl_object = writer.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        if not der:
            report.add("TLS", WARN, "no certificate to inspect", ca=ca)
            return True
        certificate = x509.load_der_x509_certificate(der)
        expires = certificate.not_valid_after_utc
        days = (expires - datetime.now(UTC)).days
        details = {"ca": ca, **_certificate_details(certificate), "expires": expires.isoformat(), "days_left": days}
        if days < 0:
            report.add("TLS", FAIL, f"the certificate expired on {expires:%Y-%m-%d}", **details)
        elif config.insecure_skip_verify:
            report.add("TLS", WARN, "the certificate is not verified (insecureSkipVerify)", **details)
        elif days < EXPIRY_WARN_DAYS:
            report.add("TLS", WARN, f"verified; the certificate expires in {days} days", **details)
        else:
            report.add("TLS", OK, f"verified against {ca}; expires in {days} days", **details)
        return True
    finally:
        writer.close()
        reader.feed_eof()


def _certificate_details(certificate: x509.Certificate) -> dict[str, Any]:
    return {
        "subject": certificate.subject.rfc4514_string(),
        "issuer": certificate.issuer.rfc4514_string(),
        "sha256_fingerprint": certificate.fingerprint(hashes.SHA256()).hex(":").upper(),
    }


async def _presented_certificate(host: str, port: int, timeout: float) -> dict[str, Any]:
    """The certificate the server presents, read without verification (nothing is sent but the TLS
    handshake; the key never goes to an untrusted server)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, ssl=context, server_hostname=host), timeout
        )
    except (OSError, TimeoutError):
        return {}
    try:
        ssl_object = writer.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        return _certificate_details(x509.load_der_x509_certificate(der)) if der else {}
    finally:
        writer.close()
        reader.feed_eof()


def _roles_of(me: dict[str, Any]) -> tuple[list[str], bool]:
    privilege = me.get("privilege") or {}
    roles = privilege.get("roles") or []
    if isinstance(roles, dict):
        roles = roles.get("$set") or []
    allowlist = privilege.get("allowlist") or []
    everything = any(isinstance(a, dict) and a.get("method") == "*" for a in allowlist)
    return sorted(str(r) for r in roles), everything


async def _roles(report: Report, client: TrueNASClient) -> None:
    calls = declared_calls(client)
    try:
        me = await read(client, "auth.me")
    except TrueNASError as exc:
        report.add(
            "key roles", WARN, f"cannot read the key's privileges ({type(exc).__name__}); use the websocket transport"
        )
        return
    roles, everything = _roles_of(me if isinstance(me, dict) else {})
    details: dict[str, Any] = {"user": str((me or {}).get("pw_name", "?")), "roles": roles}
    if "vm" in families(client) and not everything and "FULL_ADMIN" not in roles:
        report.add(
            "VM uploads",
            WARN,
            "VMs upload their image and seed with filesystem.put, which TrueNAS allows only to FULL_ADMIN: "
            "this key can manage containers but not create VMs (README, roles per feature)",
            **details,
        )
    if everything or "FULL_ADMIN" in roles:
        report.add("key roles", OK, "every operator call is allowed", **details, allowed=calls["read"] + calls["write"])
    elif "READONLY_ADMIN" in roles:
        report.add(
            "key roles",
            FAIL,
            "read-only: the operator could watch instances but not create, change or delete any",
            **details,
            allowed=calls["read"],
            refused=calls["write"],
        )
    else:
        report.add(
            "key roles",
            WARN,
            "doctor cannot tell from these roles which calls TrueNAS allows; try one instance first",
            **details,
            needed=calls["read"] + calls["write"],
        )


async def _virtualization(report: Report, client: TrueNASClient) -> None:
    try:
        if families(client)[0] == "container":
            config = await read(client, "lxc.config")
            pool, bridge = config.get("preferred_pool"), config.get("bridge")
            details = {"pool": pool, "bridge": bridge or "automatic", "v4_network": config.get("v4_network")}
            configured = bool(pool)
        else:
            config = await read(client, "virt.global.config")
            pool, bridge, state = config.get("pool"), config.get("bridge"), config.get("state")
            details = {
                "state": state,
                "pool": pool,
                "storage_pools": config.get("storage_pools") or [],
                "bridge": bridge or "automatic",
            }
            configured = bool(pool) and state == "INITIALIZED"
    except TrueNASError as exc:
        report.add("virtualization", FAIL, f"cannot read the configuration: {exc.message}")
        return
    if configured:
        report.add("virtualization", OK, f"configured on pool {pool}", **details)
    else:
        report.add(
            "virtualization",
            FAIL,
            "not configured: choose a pool in TrueNAS (Instances / Containers > Configuration) first",
            **details,
        )


async def _registry(report: Report, client: TrueNASClient) -> None:
    container = families(client)[0] == "container"
    method = "container.image.query_registry" if container else "virt.instance.image_choices"
    try:
        images = await read(client, method, *([] if method.startswith("container") else [{}]))
    except TrueNASError as exc:
        report.add("image registry", FAIL, f"TrueNAS cannot list images ({method}): {exc.message}")
        return
    report.images = images or ([] if container else {})
    count = len(images or [])
    if count:
        report.add("image registry", OK, f"TrueNAS reaches the image registry: {count} images", method=method)
    else:
        report.add("image registry", WARN, "the image registry lists no images", method=method)


def _documents(path: Path) -> Iterator[dict[str, Any]]:
    for document in yaml.safe_load_all(path.read_text()):
        if isinstance(document, dict) and document.get("kind") == "IncusInstance":
            yield document


async def _host_memory(report: Report, client: TrueNASClient) -> None:
    try:
        info = await read(client, "system.info")
    except TrueNASError:
        return  # only the manifests' memory check needs it: they say it was not checked
    physmem = info.get("physmem") if isinstance(info, dict) else None
    report.host_memory = int(physmem) if isinstance(physmem, int | float) and physmem > 0 else None


async def _vm_memory(report: Report, client: TrueNASClient) -> None:
    """What vm.start can promise a VM now (plugins/vm/memory.py: 90% of available memory plus the ZFS
    cache above its minimum, less what running VMs were promised), and with spec.memoryOvercommit."""
    try:
        guaranteed = await read(client, "vm.get_available_memory", False)
        overcommitted = await read(client, "vm.get_available_memory", True)
    except TrueNASError as exc:
        report.add("VM memory", WARN, f"vm.get_available_memory failed: {exc.message}")
        return
    if not isinstance(guaranteed, int) or not isinstance(overcommitted, int):
        report.add("VM memory", WARN, "vm.get_available_memory did not answer a number of bytes")
        return
    summary = (
        f"a VM started now can get {format_bytes(guaranteed // 2**20 * 2**20)} with TrueNAS's guarantee, "
        f"{format_bytes(overcommitted // 2**20 * 2**20)} with spec.memoryOvercommit (running VMs' unused memory "
        "included)"
    )
    status = OK if guaranteed > 0 else WARN
    if guaranteed <= 0:
        summary += "; without memoryOvercommit no VM starts until memory is freed"
    report.add("VM memory", status, summary, guaranteed=guaranteed, overcommitted=overcommitted)


async def _vm_image_server(report: Report, settings: Settings, timeout: float) -> None:
    """The index VM images come from (the operator downloads them itself: vm.* has no images)."""
    url = settings.vm_image_server or DEFAULT_IMAGE_SERVER
    server = ImageServer(url, timeout=timeout)
    try:
        products = await asyncio.wait_for(server.products(), timeout)
    except (TrueNASError, OSError, ValueError, TimeoutError) as exc:
        message = exc.message if isinstance(exc, TrueNASError) else f"{type(exc).__name__}: {exc}"
        report.add(
            "VM image server",
            WARN,
            f"cannot read {url}: {message}; VMs cannot be created until it is reachable (set TIO_VM_IMAGE_SERVER "
            "to a reachable simplestreams server or a local mirror)",
            url=url,
        )
        return
    vms = [key for key, product in products.items() if _has_vm_image(product)]
    report.vm_images = server
    if vms:
        report.add("VM image server", OK, f"{url} lists {len(vms)} VM images", url=url)
    else:
        report.add("VM image server", WARN, f"{url} lists no VM image (disk.qcow2)", url=url)


def _has_vm_image(product: Any) -> bool:
    versions = product.get("versions") if isinstance(product, dict) else None
    return isinstance(versions, dict) and any(
        isinstance(v, dict) and "disk.qcow2" in (v.get("items") or {}) for v in versions.values()
    )


async def _image_problem(report: Report, client: TrueNASClient, image: str, vm: bool) -> str | None:
    """Why the operator would find no image for ``image`` (None: found, or not checked)."""
    if vm and "vm" in families(client):
        if report.vm_images is None:
            return None  # the VM image server check already says why
        try:
            await report.vm_images.resolve(image)
        except ImageNotFound as exc:
            return exc.message
        except (TrueNASError, OSError, ValueError):
            return None
        return None
    backend = getattr(client.instances, "containers", client.instances)
    if isinstance(backend, ContainerBackend):
        try:
            await backend.resolve_image(image)  # container.image.query_registry: a read
        except ImageNotFound as exc:
            return exc.message
        except TrueNASError:
            return None
        return None
    if isinstance(report.images, dict) and report.images and image not in report.images:
        return f"TrueNAS's image registry has no image {image!r} (virt.instance.image_choices)"
    return None


async def _manifest(report: Report, client: TrueNASClient, path: Path, url: str) -> None:
    try:
        documents = list(_documents(path))
    except (OSError, yaml.YAMLError) as exc:
        report.add(f"manifest {path}", FAIL, f"cannot read it: {exc}")
        return
    if not documents:
        report.add(f"manifest {path}", WARN, "no IncusInstance in it")
    for document in documents:
        name = str((document.get("metadata") or {}).get("name", "?"))
        try:
            desired = desired_from(document)
        except ValidationError as exc:
            errors = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            report.add(f"manifest {name}", FAIL, f"the spec is invalid: {errors}")
            continue
        where: dict[str, Any] = {}
        against = ""
        reference = desired.spec.connection_ref
        if reference is not None:
            where = {"connection": reference.name, "checked_against": url}
            against = (
                f" (checked against the environment's NAS, TIO_TRUENAS_URL={url}, not the TrueNASConnection "
                f"{reference.name!r} the manifest names)"
            )
        config = instance_config(desired)
        unsupported = list(client.instances.unsupported_fields(config))
        vm = str(desired.spec.type) == "VM"
        if "type" in unsupported:
            message = _vm_unsupported_message(desired)
            if client.transport.name == "rest" and client.version >= (25, 4, 2):
                message = f"VMs need the websocket transport (the REST API has no vm.* calls): {message}"
            report.add(f"manifest {name}", FAIL, message + against, reason="Unsupported", **where)
            continue
        # A clone (spec.source) names a snapshot, not an image: the operator proves it at the create.
        image = await _image_problem(report, client, desired.spec.image, vm) if desired.spec.image else None
        if image is not None:
            report.add(f"manifest {name}", FAIL, image + against, reason="ImageNotFound", **where)
            continue
        memory = config.memory
        if memory is not None and report.host_memory is not None and memory > report.host_memory:
            report.add(
                f"manifest {name}",
                FAIL,
                f"memory {format_bytes(memory)} is more than this NAS has ({format_bytes(report.host_memory)})"
                + against,
                reason="InsufficientMemory",
                **where,
            )
            continue
        if unsupported:
            report.add(
                f"manifest {name}",
                WARN,
                f"{client.system_version} cannot honour some fields (status would say PartiallyApplied)" + against,
                unsupported=unsupported,
                **where,
            )
        else:
            report.add(f"manifest {name}", OK, f"{client.system_version} can honour every field" + against, **where)


def main(args: Any) -> int:
    try:
        settings = Settings()
    except ValidationError as exc:
        print(f"doctor: bad settings: {exc}", file=sys.stderr)
        return 2
    report = asyncio.run(run_doctor(settings, [Path(p) for p in args.file or []], args.timeout))
    if args.json:
        sys.stdout.write(json.dumps(report.as_json(), indent=2) + "\n")
    else:
        sys.stdout.write(report.as_text())
    return 1 if report.blocked else 0
