"""The image server boundary (truenas/images.py) against a fake aiohttp server that hangs, resets and
lies: every failure is one ``ImageServerError``, reads are capped and streamed, paths stay relative and
same-origin, sha256 is required, tenants' servers reach no private address and no local path."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from truenas_incus_operator.truenas.errors import ImageServerError
from truenas_incus_operator.truenas.images import ImageServer, VMImage

DISK = b"QFI\xfb" + b"\0" * 100 + b"a disk image"
SHA = hashlib.sha256(DISK).hexdigest()


def products(path: str = "images/debian/disk.qcow2", **item: Any) -> dict[str, Any]:
    entry = {"ftype": "disk-kvm.img", "path": path, "sha256": SHA, "size": len(DISK), **item}
    entry = {k: v for k, v in entry.items() if v is not None}
    return {
        "products": {
            "debian:bookworm:amd64:default": {
                "aliases": "debian/bookworm",
                "arch": "amd64",
                "versions": {"20250101_00:00": {"items": {"disk.qcow2": entry}}},
            }
        }
    }


INDEX = {"index": {"images": {"datatype": "image-downloads", "path": "streams/v1/images.json"}}}


class Fake:
    """One fake image server; ``mode`` says how it lies."""

    def __init__(self) -> None:
        self.mode = "ok"
        self.products: dict[str, Any] = products()
        self.index: dict[str, Any] = INDEX
        self.hits: list[str] = []
        self.port = 0

    async def handle(self, request: web.Request) -> web.StreamResponse:
        path = request.match_info["path"]
        self.hits.append(path)
        if self.mode == "hang":
            await asyncio.sleep(3600)
        if self.mode == "reset":
            assert request.transport is not None
            request.transport.close()
            await asyncio.sleep(1)
        if self.mode == "redirect":
            raise web.HTTPFound(f"http://localhost:{self.port}/{path}")
        if self.mode == "huge" and path.endswith(".json"):
            response = web.StreamResponse()
            await response.prepare(request)
            for _ in range(64):  # 64 MiB without Content-Length: the reader must stop on its own
                await response.write(b" " * 2**20)
            await response.write_eof()
            return response
        if path == "streams/v1/index.json":
            return web.Response(text="not json {" if self.mode == "nonjson" else json.dumps(self.index))
        if path == "streams/v1/images.json":
            return web.Response(text=json.dumps(self.products))
        if path == "images/debian/disk.qcow2":
            return web.Response(body=DISK + (b"more bytes than the index said" if self.mode == "longer" else b""))
        return web.Response(status=404)


@pytest.fixture
async def fake() -> AsyncIterator[Fake]:
    server = Fake()
    app = web.Application()
    app.router.add_get("/{path:.*}", server.handle)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    server.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield server
    finally:
        await runner.cleanup()


def url(fake: Fake) -> str:
    return f"http://127.0.0.1:{fake.port}/"


async def test_a_good_server_resolves_and_downloads_with_the_checksum(fake: Fake, tmp_path: Path) -> None:
    server = ImageServer(url(fake))
    image = await server.resolve("debian/bookworm")
    assert (image.sha256, image.size, image.path) == (SHA, len(DISK), "images/debian/disk.qcow2")
    path = await server.download(image, tmp_path)
    assert path.read_bytes() == DISK


@pytest.mark.parametrize(
    ("mode", "said"),
    [
        ("nonjson", "not JSON"),
        ("hang", "timed out"),
        ("reset", "connection"),
        ("huge", "larger than"),
        ("redirect", "redirect"),
    ],
)
async def test_every_failure_of_the_index_is_one_image_server_error(fake: Fake, mode: str, said: str) -> None:
    fake.mode = mode
    server = ImageServer(url(fake), timeout=1.0, max_index_bytes=8 * 2**20)
    with pytest.raises(ImageServerError, match=said):
        await asyncio.wait_for(server.resolve("debian/bookworm"), 20)


@pytest.mark.parametrize(
    "shape",
    [
        [1, 2, 3],
        {"products": "nope"},
        {"products": {"debian:bookworm:amd64:default": {"aliases": "debian/bookworm", "versions": []}}},
        products(sha256=None),
        products(sha256="abc"),
        products(size=None),
        products(size="12"),
    ],
    ids=["list", "products-string", "versions-list", "no-sha256", "short-sha256", "no-size", "size-string"],
)
async def test_an_ill_shaped_or_unchecked_index_is_refused(fake: Fake, shape: Any) -> None:
    fake.products = shape
    with pytest.raises(ImageServerError):
        await ImageServer(url(fake)).resolve("debian/bookworm")


@pytest.mark.parametrize(
    "path",
    ["/etc/passwd", "../../etc/passwd", "images/../../../etc/passwd", "http://169.254.169.254/latest", "//evil/x"],
)
async def test_index_paths_must_be_relative_and_stay_on_the_server(fake: Fake, tmp_path: Path, path: str) -> None:
    fake.products = products(path=path)
    server = ImageServer(url(fake))
    with pytest.raises(ImageServerError, match="path"):
        image = await server.resolve("debian/bookworm")
        await server.download(image, tmp_path)
    assert all(".." not in hit and "etc" not in hit for hit in fake.hits)


async def test_the_products_path_of_the_index_must_be_relative(fake: Fake) -> None:
    fake.index = {"index": {"images": {"datatype": "image-downloads", "path": "http://localhost:1/images.json"}}}
    with pytest.raises(ImageServerError, match="path"):
        await ImageServer(url(fake)).resolve("debian/bookworm")


async def test_an_image_longer_than_the_index_says_is_refused(fake: Fake, tmp_path: Path) -> None:
    fake.mode = "longer"
    server = ImageServer(url(fake))
    image = await server.resolve("debian/bookworm")
    with pytest.raises(ImageServerError, match="more than the"):
        await server.download(image, tmp_path)
    assert os.listdir(tmp_path) == []  # nothing left in the scratch directory


async def test_an_image_larger_than_the_cap_is_refused_before_downloading(fake: Fake, tmp_path: Path) -> None:
    server = ImageServer(url(fake), max_image_bytes=16)
    with pytest.raises(ImageServerError, match="larger than"):
        await server.resolve("debian/bookworm")


async def test_a_tenants_server_reaches_no_loopback_or_private_address(fake: Fake) -> None:
    for where in (url(fake), f"http://localhost:{fake.port}/", f"http://[::ffff:127.0.0.1]:{fake.port}/"):
        with pytest.raises(ImageServerError, match="loopback, private or link-local"):
            await ImageServer(where, trusted=False).resolve("debian/bookworm")
    assert fake.hits == []


async def test_a_tenants_server_names_no_local_path(tmp_path: Path) -> None:
    for where in (str(tmp_path), f"file://{tmp_path}"):
        with pytest.raises(ImageServerError, match="local"):
            await ImageServer(where, trusted=False).resolve("debian/bookworm")


async def test_a_local_mirror_keeps_item_paths_inside_and_says_nothing_of_what_exists(tmp_path: Path) -> None:
    mirror = tmp_path / "mirror"
    (mirror / "streams/v1").mkdir(parents=True)
    (tmp_path / "secret").write_bytes(b"the operator's key")
    (mirror / "streams/v1/index.json").write_text(json.dumps(INDEX))
    (mirror / "streams/v1/images.json").write_text(json.dumps(products(path="../secret")))
    server = ImageServer(str(mirror))
    with pytest.raises(ImageServerError, match="path"):
        await server.resolve("debian/bookworm")
    (mirror / "link").symlink_to(tmp_path / "secret")
    (mirror / "streams/v1/images.json").write_text(json.dumps(products(path="link")))
    server = ImageServer(str(mirror))
    image = await server.resolve("debian/bookworm")
    with pytest.raises(ImageServerError, match="outside the mirror"):
        await server.download(image, tmp_path)
    missing = VMImage(image.product, image.version, "nothing/here", SHA, len(DISK))
    present = VMImage(image.product, image.version, "streams/v1", SHA, len(DISK))  # there, but no file
    messages = []
    for candidate in (missing, present):
        with pytest.raises(ImageServerError) as caught:
            await server.download(candidate, tmp_path)
        messages.append(str(caught.value).replace(candidate.path, "<path>"))
    assert messages[0] == messages[1]  # a missing path and an existing directory read the same


async def test_the_scratch_directory_must_hold_the_image(fake: Fake, tmp_path: Path) -> None:
    server = ImageServer(url(fake), max_image_bytes=2**63)
    image = await server.resolve("debian/bookworm")
    huge = VMImage(image.product, image.version, image.path, image.sha256, 2**62)
    with pytest.raises(ImageServerError, match=r"TIO_SCRATCH_DIR"):
        await server.download(huge, tmp_path)
    assert fake.hits.count(image.path) == 0


async def test_a_missing_scratch_directory_is_named_not_a_crash(fake: Fake, tmp_path: Path) -> None:
    server = ImageServer(url(fake), scratch_dir=tmp_path / "absent")
    image = await server.resolve("debian/bookworm")
    with pytest.raises(ImageServerError, match=r"scratch directory .*absent.*TIO_SCRATCH_DIR"):
        await server.download(image)
