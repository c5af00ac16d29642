"""The image-server fixture: the test images a simplestreams mirror serves (served by the control
API at ``/_simulator/simplestreams/`` or written to a directory), the qcow2 header TrueNAS reads
before converting, and a reader for the NoCloud seed ISOs a guest would mount
(truenas-vm-container.md §2.6). None of it is a TrueNAS endpoint.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Any

from .state import GIB, Image

QCOW2_MAGIC = b"QFI\xfb"
TEST_IMAGE_VIRTUAL_SIZE = 4 * GIB


# ----- test images (what a simplestreams mirror serves) ---------------------------------------------
def qcow2_image(virtual_size: int, payload: bytes) -> bytes:
    """A qcow2 header (version 3, 64 KiB clusters) announcing ``virtual_size``, then ``payload``.

    Enough for what TrueNAS reads before converting (the format and the virtual size); not a bootable
    disk: the simulator boots nothing.
    """
    header = QCOW2_MAGIC + struct.pack(">IQIIQ", 3, 0, 0, 16, virtual_size)
    return header + b"\0" * (104 - len(header)) + payload


def qcow2_virtual_size(data: bytes) -> int | None:
    if len(data) < 32 or data[:4] != QCOW2_MAGIC:
        return None
    return int(struct.unpack(">Q", data[24:32])[0])


def vm_image_bytes(image: Image) -> bytes:
    return qcow2_image(TEST_IMAGE_VIRTUAL_SIZE, f"test image {image.alias} {image.serial}\n".encode())


def simplestreams_index(images: list[Image], arch: str = "amd64") -> tuple[dict[str, Any], dict[str, Any]]:
    """``streams/v1/index.json`` and ``streams/v1/images.json`` for the VM-capable ``images``.

    The shape of the Incus image server's index: products keyed ``os:release:arch:variant`` with
    ``aliases`` (comma separated), ``versions`` keyed by serial, and a ``disk.qcow2`` item
    (``ftype: disk-kvm.img``) in each version that has a VM image.
    """
    products: dict[str, Any] = {}
    for image in images:
        if "VM" not in image.instance_types or arch not in image.archs:
            continue
        os_ = image.alias.split("/")[0]
        key = f"{os_}:{image.release}:{arch}:{image.variant}"
        data = vm_image_bytes(image)
        path = f"images/{os_}/{image.release}/{arch}/{image.variant}/{image.serial}/disk.qcow2"
        aliases = [image.alias, f"{os_}/{image.release}/{image.variant}"]
        products[key] = {
            "aliases": ",".join(dict.fromkeys(aliases)),
            "arch": arch,
            "os": image.os,
            "release": image.release,
            "variant": image.variant,
            "versions": {
                image.serial: {
                    "items": {
                        "disk.qcow2": {
                            "ftype": "disk-kvm.img",
                            "path": path,
                            "sha256": hashlib.sha256(data).hexdigest(),
                            "size": len(data),
                        }
                    }
                }
            },
        }
    images_json = {
        "content_id": "images",
        "datatype": "image-downloads",
        "format": "products:1.0",
        "products": products,
    }
    index = {
        "format": "index:1.0",
        "index": {
            "images": {"datatype": "image-downloads", "path": "streams/v1/images.json", "products": sorted(products)}
        },
    }
    return index, images_json


def simplestreams_file(images: list[Image], path: str) -> bytes | None:
    """The bytes a mirror serves at ``path`` (index, products, or an image), or None."""
    index, products = simplestreams_index(images)
    if path == "streams/v1/index.json":
        return json.dumps(index).encode()
    if path == "streams/v1/images.json":
        return json.dumps(products).encode()
    for image in images:
        data = vm_image_bytes(image)
        for product in products["products"].values():
            for version in product["versions"].values():
                item = version["items"]["disk.qcow2"]
                if item["path"] == path and item["sha256"] == hashlib.sha256(data).hexdigest():
                    return data
    return None


# ----- ISO 9660 (Joliet) reader: what a guest's cloud-init would find on a CDROM --------------------
def read_iso(data: bytes) -> tuple[str, dict[str, bytes]] | None:
    """The volume label and the root directory's files (Joliet names when present), or None.

    Written independently of the operator's ISO writer, from ECMA-119 and the Joliet specification,
    so a broken seed ISO fails here as it would in a guest.
    """
    sector = 2048
    if len(data) < 17 * sector or data[16 * sector + 1 : 16 * sector + 6] != b"CD001":
        return None
    label = data[16 * sector + 40 : 16 * sector + 72].decode("ascii", "replace").strip()
    root_record: bytes | None = None
    joliet = False
    position = 16
    while (position + 1) * sector <= len(data):
        descriptor = data[position * sector : (position + 1) * sector]
        kind = descriptor[0]
        if kind == 255 or descriptor[1:6] != b"CD001":
            break
        if kind == 1 and root_record is None:
            root_record = descriptor[156:190]
        if kind == 2 and descriptor[88:91] in (b"%/@", b"%/C", b"%/E"):
            root_record, joliet = descriptor[156:190], True
        position += 1
    if root_record is None:
        return None
    extent, size = struct.unpack("<I", root_record[2:6])[0], struct.unpack("<I", root_record[10:14])[0]
    directory = data[extent * sector : extent * sector + size]
    files: dict[str, bytes] = {}
    offset = 0
    while offset < len(directory):
        length = directory[offset]
        if length == 0:  # records do not cross sectors: skip to the next one
            offset = (offset // sector + 1) * sector
            continue
        record = directory[offset : offset + length]
        offset += length
        flags, name_length = record[25], record[32]
        raw = record[33 : 33 + name_length]
        if raw in (b"\0", b"\1") or flags & 2:
            continue
        name = raw.decode("utf-16-be" if joliet else "ascii", "replace").split(";")[0].rstrip(".")
        start, length_ = struct.unpack("<I", record[2:6])[0], struct.unpack("<I", record[10:14])[0]
        files[name if joliet else name.lower()] = data[start * sector : start * sector + length_]
    return label, files


def write_mirror(images: list[Image], directory: Path) -> Path:
    """The simplestreams fixture as files: a local mirror (``TIO_VM_IMAGE_SERVER=<directory>``)."""
    _, products = simplestreams_index(images)
    paths = ["streams/v1/index.json", "streams/v1/images.json"]
    paths += [
        item["path"]
        for product in products["products"].values()
        for version in product["versions"].values()
        for item in version["items"].values()
    ]
    for path in paths:
        data = simplestreams_file(images, path)
        assert data is not None
        target = directory / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    return directory
