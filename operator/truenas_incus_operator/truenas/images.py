"""VM disk images from a simplestreams index (the Incus image server's format), for ``vm.*``.

TrueNAS's ``vm.*`` has no image concept (truenas-vm-container.md §2.6), so the client finds the image
itself: ``streams/v1/index.json`` names the products file, whose products carry ``aliases`` and, for
VM images, a ``disk.qcow2`` item (``ftype: disk-kvm.img``) in each version. The server is an
``http(s)://`` URL or, when the administrator chose it, a local mirror (``file://`` or a directory).

The server is outside the operator, so everything it says is bounded and checked here, and every
failure leaves as one ``ImageServerError`` (docs/security.md, "VM images"):

- the index and the products file are read in pieces up to ``max_index_bytes``; images are streamed
  to a file, never beyond the size the index gives, and that size is capped (``max_image_bytes``);
- every item needs a sha256 (64 hex digits) and a size; the download must match both;
- paths from the index are relative, without ``..``, and joined under the server's URL (never
  ``urljoin``: an absolute URL in the index would win); redirects only within the same origin;
- an untrusted server (a tenant's ``spec.vmImageServer``) reaches no loopback, private, link-local
  or otherwise special address (checked on every address the name resolves to, by the connector's
  resolver, so a rebinding name cannot switch after the check) and is never a local path;
- a local mirror's files must resolve inside the mirror (no symlink out), and a missing file reads
  the same as an unreadable one.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import json
import os
import re
import shutil
import socket
import struct
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver
from yarl import URL

from .errors import ImageNotFound, ImageServerError

DEFAULT_IMAGE_SERVER = "https://images.linuxcontainers.org"
INDEX_TTL = 600.0
CHUNK = 1 << 20
"""Downloads and checksums go in pieces of 1 MiB: an image never sits in memory whole."""
MAX_INDEX_BYTES = 32 * 2**20
MAX_IMAGE_BYTES = 64 * 2**30
MAX_REDIRECTS = 3
SCRATCH_MARGIN = 64 * 2**20
"""Free space kept beyond the image in the scratch directory."""
_SHA256 = re.compile(r"[0-9a-f]{64}")
_PATH = re.compile(r"[A-Za-z0-9._~:@+,=/-]{1,1024}")


@dataclass(frozen=True)
class ImageSource:
    """Where a connection's VM images come from, and the bounds on what that server may send."""

    url: str = DEFAULT_IMAGE_SERVER
    trusted: bool = True
    """Chosen by the administrator (``TIO_VM_IMAGE_SERVER`` or named in the policy): may be a local
    mirror or an internal address. False: https at public addresses only."""
    max_index_bytes: int = MAX_INDEX_BYTES
    max_image_bytes: int = MAX_IMAGE_BYTES
    scratch_dir: Path | None = None
    """Where downloads go (``TIO_SCRATCH_DIR``); None: the system's temporary directory."""
    base_grace_seconds: float = 24 * 3600.0
    """How long a cached base no VM uses stays on the pool (``TIO_VM_BASE_GRACE_SECONDS``)."""

    def server(self, arch: str = "amd64") -> ImageServer:
        return ImageServer(
            self.url,
            arch,
            trusted=self.trusted,
            max_index_bytes=self.max_index_bytes,
            max_image_bytes=self.max_image_bytes,
            scratch_dir=self.scratch_dir,
        )


@dataclass(frozen=True)
class VMImage:
    product: str
    """``debian:bookworm:amd64:default``."""
    version: str
    """The build serial, e.g. ``20251120_05:24``."""
    path: str
    sha256: str
    size: int


def qcow2_virtual_size(data: bytes) -> int:
    """The disk size a qcow2 image announces (its header), or the file's size for raw images."""
    if len(data) >= 32 and data[:4] == b"QFI\xfb":
        return int(struct.unpack(">Q", data[24:32])[0])
    return len(data)


def file_virtual_size(path: Path) -> int:
    """``qcow2_virtual_size`` of a file, reading only its header."""
    with path.open("rb") as stream:
        header = stream.read(32)
    if len(header) == 32 and header[:4] == b"QFI\xfb":
        return int(struct.unpack(">Q", header[24:32])[0])
    return path.stat().st_size


def file_sha256(path: Path, limit: int | None = None) -> tuple[str, int]:
    """The sha256 and size of a file, read in pieces; stops after ``limit + 1`` bytes."""
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as stream:
        while chunk := stream.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
            if limit is not None and size > limit:
                break
    return digest.hexdigest(), size


def check_sha256(image: VMImage, actual: str, source: str) -> None:
    if actual != image.sha256:
        raise ImageServerError(
            f"VM image {image.product} {image.version} from {source}: sha256 {actual} does not match the "
            f"simplestreams index ({image.sha256}); refused (a damaged download or a tampered mirror)"
        )


def relative_path(path: Any, what: str) -> str:
    """A path from the index, refused unless plainly relative: no scheme, no leading ``/``, no ``..``."""
    text = path if isinstance(path, str) else ""
    parts = text.split("/")
    if not _PATH.fullmatch(text) or text.startswith("/") or ":" in parts[0] or any(p in ("", ".", "..") for p in parts):
        shown = repr(path)[:120]
        raise ImageServerError(f"the index's {what} path {shown} is not a plain relative path: refused")
    return text


def is_special_address(address: str) -> bool:
    """Loopback, private, link-local, multicast, reserved or unspecified (also as IPv4-mapped IPv6)."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return not ip.is_global or ip.is_multicast


def _refuse_special_literal(host: str) -> None:
    """An IP literal is never resolved (so ``PublicResolver`` never sees it): checked here."""
    try:
        special = is_special_address(host.strip("[]"))
    except ValueError:
        return  # a name: PublicResolver checks what it resolves to
    if special:
        raise ImageServerError(
            f"image server host {host} is a loopback, private or link-local address: refused (only the "
            f"administrator's image servers may be internal)"
        )


class PublicResolver(AbstractResolver):
    """Resolves as usual, then refuses a name with any special address (``is_special_address``)."""

    def __init__(self) -> None:
        self._resolver = DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        found = await self._resolver.resolve(host, port, family)
        special = [r["host"] for r in found if is_special_address(r["host"])]
        if special:
            raise ImageServerError(
                f"image server host {host} resolves to {special[0]}, a loopback, private or link-local "
                f"address: refused (only the administrator's image servers may be internal)"
            )
        return found

    async def close(self) -> None:
        await self._resolver.close()


class ImageServer:
    """One simplestreams server. ``trusted``: chosen by the administrator (``TIO_VM_IMAGE_SERVER`` or
    a host the policy names), so it may be a local mirror or an internal address."""

    def __init__(
        self,
        url: str = DEFAULT_IMAGE_SERVER,
        arch: str = "amd64",
        timeout: float = 60.0,
        *,
        trusted: bool = True,
        max_index_bytes: int = MAX_INDEX_BYTES,
        max_image_bytes: int = MAX_IMAGE_BYTES,
        scratch_dir: Path | None = None,
    ) -> None:
        self.url = url.rstrip("/") + "/"
        self.arch = arch
        self.timeout = timeout
        self.trusted = trusted
        self.max_index_bytes = max_index_bytes
        self.max_image_bytes = max_image_bytes
        self.scratch_dir = scratch_dir
        self._products: dict[str, Any] = {}
        self._read_at = 0.0

    # ----- where and how ---------------------------------------------------------------------------
    def _local(self) -> Path | None:
        parts = urlsplit(self.url)
        if parts.scheme in ("http", "https"):
            return None
        if not self.trusted:
            raise ImageServerError(
                f"image server {self.url}: local mirrors and schemes other than https are the administrator's "
                f"choice (TIO_VM_IMAGE_SERVER or the policy's vmImageServers): refused"
            )
        if parts.scheme == "file":
            return Path(parts.path)
        if parts.scheme == "" or len(parts.scheme) == 1:
            return Path(self.url)
        raise ImageServerError(f"image server {self.url}: unknown scheme {parts.scheme!r} (use https://)")

    def _session(self) -> aiohttp.ClientSession:
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=min(self.timeout, 30.0), sock_read=self.timeout)
        connector = aiohttp.TCPConnector(resolver=None if self.trusted else PublicResolver(), limit=4)
        return aiohttp.ClientSession(timeout=timeout, connector=connector, auto_decompress=False)

    def _origin(self, url: str) -> tuple[str, str, int | None]:
        parts = urlsplit(url)
        try:
            return parts.scheme, (parts.hostname or "").lower(), parts.port
        except ValueError:
            raise ImageServerError(f"image server URL {url[:200]!r} has an invalid port") from None

    @contextlib.asynccontextmanager
    async def _get(self, path: str) -> Any:
        """A response for ``path`` under the server's URL (status 200), following only same-origin redirects."""
        origin = self._origin(self.url)
        if not self.trusted:
            _refuse_special_literal(origin[1])
        target = self.url + path
        try:
            async with self._session() as http:
                for _ in range(MAX_REDIRECTS + 1):
                    async with http.get(target, allow_redirects=False) as response:
                        if response.status in (301, 302, 303, 307, 308):
                            location = response.headers.get("Location", "")
                            following = str(response.url.join(URL(location)))
                            if self._origin(following) != origin:
                                raise ImageServerError(
                                    f"image server {self.url}: {path} redirects to another host or scheme: refused"
                                )
                            target = following
                            continue
                        if response.status != 200:
                            raise ImageServerError(f"image server {self.url}: HTTP {response.status} for {path}")
                        yield response
                        return
                raise ImageServerError(f"image server {self.url}: more than {MAX_REDIRECTS} redirects for {path}")
        except ImageServerError:
            raise
        except TimeoutError:
            raise ImageServerError(f"image server {self.url}: timed out reading {path}") from None
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            raise ImageServerError(
                f"image server {self.url}: connection failed for {path} ({type(exc).__name__})"
            ) from None

    def _mirror_file(self, local: Path, path: str) -> Path:
        """``path`` inside the mirror, refused if it resolves outside (a symlink out of the mirror)."""
        root = local.resolve()
        target = (root / path).resolve()
        if not target.is_relative_to(root):
            raise ImageServerError(f"image mirror: {path} resolves outside the mirror: refused")
        return target

    def _unreadable(self, path: str) -> ImageServerError:
        # The same words whether the file is missing, a directory or unreadable: status tells nothing of the host.
        return ImageServerError(f"image mirror: {path} cannot be read as a mirror file")

    async def fetch(self, path: str) -> bytes:
        """An index file, at most ``max_index_bytes``."""
        path = relative_path(path, "file")
        local = self._local()
        if local is not None:
            target = self._mirror_file(local, path)
            try:
                with target.open("rb") as stream:
                    data = stream.read(self.max_index_bytes + 1)
            except OSError:
                raise self._unreadable(path) from None
            if len(data) > self.max_index_bytes:
                raise ImageServerError(f"image mirror: {path} is larger than {self.max_index_bytes} bytes: refused")
            return data
        async with self._get(path) as response:
            declared = response.content_length
            if declared is not None and declared > self.max_index_bytes:
                raise ImageServerError(
                    f"image server {self.url}: {path} is larger than {self.max_index_bytes} bytes: refused"
                )
            chunks: list[bytes] = []
            size = 0
            async for chunk in response.content.iter_chunked(CHUNK):
                size += len(chunk)
                if size > self.max_index_bytes:
                    raise ImageServerError(
                        f"image server {self.url}: {path} is larger than {self.max_index_bytes} bytes: refused"
                    )
                chunks.append(chunk)
            return b"".join(chunks)

    # ----- the image ---------------------------------------------------------------------------------
    def _check_scratch(self, directory: Path, image: VMImage) -> None:
        try:
            free = shutil.disk_usage(directory).free
        except OSError as exc:
            raise ImageServerError(
                f"the scratch directory {directory} cannot be used ({exc.strerror}): set TIO_SCRATCH_DIR to a "
                f"writable directory (the chart's scratch volume)"
            ) from None
        if free < image.size + SCRATCH_MARGIN:
            raise ImageServerError(
                f"the scratch directory {directory} has {free // 2**20} MiB free; VM image {image.product} "
                f"{image.version} needs {(image.size + SCRATCH_MARGIN) // 2**20} MiB: give TIO_SCRATCH_DIR a "
                f"larger volume (the chart's scratch volume)"
            )

    async def download(self, image: VMImage, directory: Path | None = None) -> Path:
        """The image as a file whose size and sha256 match the index: a local mirror's own file, or a
        download streamed into ``directory`` (default: ``scratch_dir``, else the system's temporary
        directory); memory stays bounded by ``CHUNK`` whatever the image's size."""
        path = relative_path(image.path, "image")
        if image.size > self.max_image_bytes:
            raise ImageServerError(f"VM image {image.product} {image.version} is larger than the cap: refused")
        local = self._local()
        if local is not None:
            source = self._mirror_file(local, path)
            try:
                actual, size = await asyncio.to_thread(file_sha256, source, image.size)
            except OSError:
                raise self._unreadable(path) from None
            self._check_size(image, size, str(local))
            check_sha256(image, actual, str(local))
            return source
        directory = directory or self.scratch_dir or Path(tempfile.gettempdir())
        self._check_scratch(directory, image)
        try:
            handle, name = tempfile.mkstemp(prefix="tio-vm-image-", suffix=".qcow2", dir=directory)
        except OSError as exc:
            raise ImageServerError(
                f"the scratch directory {directory} cannot be written ({exc.strerror}): set TIO_SCRATCH_DIR to a "
                f"writable directory (the chart's scratch volume)"
            ) from None
        target = Path(name)
        digest = hashlib.sha256()
        size = 0
        try:
            with os.fdopen(handle, "wb") as out:
                async with self._get(path) as response:
                    async for chunk in response.content.iter_chunked(CHUNK):
                        size += len(chunk)
                        if size > image.size:
                            break
                        digest.update(chunk)
                        await asyncio.to_thread(out.write, chunk)
            self._check_size(image, size, self.url)
            check_sha256(image, digest.hexdigest(), self.url)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(name)
            raise
        return target

    def downloaded(self, path: Path) -> bool:
        """Whether ``path`` is a download of ours (the caller removes it), not a local mirror's file."""
        return self._local() is None and path.name.startswith("tio-vm-image-")

    def _check_size(self, image: VMImage, size: int, source: str) -> None:
        if size != image.size:
            said = "more than the" if size > image.size else f"{size} bytes, not the"
            raise ImageServerError(
                f"VM image {image.product} {image.version} from {source}: {said} {image.size} bytes the "
                f"simplestreams index says; refused"
            )

    # ----- the index -----------------------------------------------------------------------------------
    def _json(self, data: bytes, what: str) -> Any:
        try:
            return json.loads(data)
        except (ValueError, RecursionError):
            raise ImageServerError(f"image server {self.url}: {what} is not JSON") from None

    async def products(self, refresh: bool = False) -> dict[str, Any]:
        """The VM products (alias list, arch, and per version the ``disk.qcow2`` item as given), kept
        small: the rest of the products file is dropped as soon as it is parsed."""
        if refresh or not self._products or time.monotonic() - self._read_at > INDEX_TTL:
            index = self._json(await self.fetch("streams/v1/index.json"), "streams/v1/index.json")
            entries = index.get("index") if isinstance(index, dict) else None
            if not isinstance(entries, dict):
                raise ImageServerError(f"image server {self.url}: streams/v1/index.json has no index mapping")
            path = next(
                (
                    e.get("path")
                    for e in entries.values()
                    if isinstance(e, dict) and e.get("datatype") == "image-downloads"
                ),
                "streams/v1/images.json",
            )
            path = relative_path(path, "products")
            document = self._json(await self.fetch(path), path)
            found = document.get("products") if isinstance(document, dict) else None
            if not isinstance(found, dict):
                raise ImageServerError(f"image server {self.url}: {path} has no products mapping")
            self._products = {str(k): _vm_product(v) for k, v in found.items() if isinstance(v, dict)}
            self._read_at = time.monotonic()
        return self._products

    def _image(self, key: str, version: str, item: Any) -> VMImage:
        where = f"image server {self.url}: {key} {version}"
        if not isinstance(item, dict):
            raise ImageServerError(f"{where}: the disk.qcow2 item is not a mapping")
        sha256 = item.get("sha256")
        if not isinstance(sha256, str) or not _SHA256.fullmatch(sha256.lower()):
            raise ImageServerError(f"{where}: the disk.qcow2 item has no sha256 (64 hex digits): refused")
        size = item.get("size")
        if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
            raise ImageServerError(f"{where}: the disk.qcow2 item has no size: refused")
        if size > self.max_image_bytes:
            raise ImageServerError(f"{where}: the image is larger than {self.max_image_bytes} bytes: refused")
        return VMImage(key, version, relative_path(item.get("path"), "image"), sha256.lower(), size)

    async def resolve(self, alias: str) -> VMImage:
        """The newest VM image for an alias (``debian/bookworm``) or product key."""
        for refresh in (False, True):
            products = await self.products(refresh)
            for key, product in sorted(products.items()):
                if product["arch"] not in (None, self.arch) or (alias != key and alias not in product["aliases"]):
                    continue
                versions = product["versions"]
                if not isinstance(versions, dict):
                    raise ImageServerError(f"image server {self.url}: {key} has no versions mapping")
                for version in sorted(versions, reverse=True):
                    items = versions[version].get("items") if isinstance(versions[version], dict) else None
                    item = items.get("disk.qcow2") if isinstance(items, dict) else None
                    if item is not None:
                        return self._image(key, str(version), item)
        raise ImageNotFound(f"no VM image (disk.qcow2) for {alias!r} on {self.url} ({self.arch})")


def _vm_product(product: dict[str, Any]) -> dict[str, Any]:
    raw = product.get("aliases")
    aliases = [a.strip() for a in raw.split(",") if a.strip()] if isinstance(raw, str) else []
    versions = product.get("versions")
    if isinstance(versions, dict):
        versions = {
            str(v): {"items": {"disk.qcow2": entry["items"]["disk.qcow2"]}}
            for v, entry in versions.items()
            if isinstance(entry, dict) and isinstance(entry.get("items"), dict) and "disk.qcow2" in entry["items"]
        }
    return {"aliases": aliases, "arch": product.get("arch"), "versions": versions}
