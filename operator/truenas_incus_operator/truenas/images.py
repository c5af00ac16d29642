"""VM disk images from a simplestreams index (the Incus image server's format), for ``vm.*``.

TrueNAS's ``vm.*`` has no image concept (truenas-vm-container.md §2.6), so the client finds the image
itself: ``streams/v1/index.json`` names the products file, whose products carry ``aliases`` and, for
VM images, a ``disk.qcow2`` item (``ftype: disk-kvm.img``) in each version. The server is an
``http(s)://`` URL or a local mirror (``file://`` or a directory path) for sites without internet.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

import httpx

from .errors import ImageNotFound, TransportError

DEFAULT_IMAGE_SERVER = "https://images.linuxcontainers.org"
INDEX_TTL = 600.0
CHUNK = 1 << 20
"""Downloads and checksums go in pieces of 1 MiB: an image never sits in memory whole."""


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


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while chunk := stream.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def check_sha256(image: VMImage, actual: str, source: str) -> None:
    if image.sha256 and actual != image.sha256.lower():
        raise TransportError(
            f"VM image {image.product} {image.version} from {source}: sha256 {actual} does not match the "
            f"simplestreams index ({image.sha256}); refused (a damaged download or a tampered mirror)"
        )


class ImageServer:
    def __init__(self, url: str = DEFAULT_IMAGE_SERVER, arch: str = "amd64", timeout: float = 60.0) -> None:
        self.url = url.rstrip("/") + "/"
        self.arch = arch
        self.timeout = timeout
        self._products: dict[str, Any] = {}
        self._read_at = 0.0

    def _local(self) -> Path | None:
        parts = urlsplit(self.url)
        if parts.scheme == "file":
            return Path(parts.path)
        if parts.scheme in ("", None) or len(parts.scheme) == 1:
            return Path(self.url)
        return None

    async def fetch(self, path: str) -> bytes:
        local = self._local()
        if local is not None:
            try:
                return (local / path).read_bytes()
            except OSError as exc:
                raise TransportError(f"image mirror {local}: cannot read {path}: {exc.strerror}") from None
        try:
            async with httpx.AsyncClient(timeout=self.timeout, follow_redirects=True) as http:
                response = await http.get(urljoin(self.url, path))
        except httpx.HTTPError as exc:
            raise TransportError(f"image server {self.url}: {type(exc).__name__}") from None
        if response.status_code != 200:
            raise TransportError(f"image server {self.url}: HTTP {response.status_code} for {path}")
        return response.content

    async def download(self, image: VMImage, directory: Path) -> Path:
        """The image as a file whose sha256 matches the index: a local mirror's own file, or a download
        streamed into ``directory`` (memory stays bounded by ``CHUNK`` whatever the image's size)."""
        local = self._local()
        if local is not None:
            path = local / image.path
            try:
                actual = await asyncio.to_thread(file_sha256, path)
            except OSError as exc:
                raise TransportError(f"image mirror {local}: cannot read {image.path}: {exc.strerror}") from None
            check_sha256(image, actual, str(local))
            return path
        target = directory / "disk.qcow2"
        digest = hashlib.sha256()
        try:
            async with (
                httpx.AsyncClient(timeout=self.timeout, follow_redirects=True) as http,
                http.stream("GET", urljoin(self.url, image.path)) as response,
            ):
                if response.status_code != 200:
                    raise TransportError(f"image server {self.url}: HTTP {response.status_code} for {image.path}")
                with target.open("wb") as out:
                    async for chunk in response.aiter_bytes(CHUNK):
                        digest.update(chunk)
                        out.write(chunk)
        except httpx.HTTPError as exc:
            raise TransportError(f"image server {self.url}: {type(exc).__name__}") from None
        check_sha256(image, digest.hexdigest(), self.url)
        return target

    async def products(self, refresh: bool = False) -> dict[str, Any]:
        if refresh or not self._products or time.monotonic() - self._read_at > INDEX_TTL:
            index = json.loads(await self.fetch("streams/v1/index.json"))
            path = next(
                (e["path"] for e in (index.get("index") or {}).values() if e.get("datatype") == "image-downloads"),
                "streams/v1/images.json",
            )
            self._products = json.loads(await self.fetch(path)).get("products") or {}
            self._read_at = time.monotonic()
        return self._products

    async def resolve(self, alias: str) -> VMImage:
        """The newest VM image for an alias (``debian/bookworm``) or product key."""
        for refresh in (False, True):
            products = await self.products(refresh)
            for key, product in sorted(products.items()):
                aliases = [a.strip() for a in str(product.get("aliases") or "").split(",") if a.strip()]
                if product.get("arch", self.arch) != self.arch or (alias != key and alias not in aliases):
                    continue
                for version in sorted(product.get("versions") or {}, reverse=True):
                    item = (product["versions"][version].get("items") or {}).get("disk.qcow2")
                    if item is not None:
                        return VMImage(key, version, item["path"], item.get("sha256", ""), int(item.get("size", 0)))
        raise ImageNotFound(f"no VM image (disk.qcow2) for {alias!r} on {self.url} ({self.arch})")
