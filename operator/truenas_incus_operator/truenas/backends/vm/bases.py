"""The cached bases of VM root disks: one volume per image content, written once, snapshotted as
``@base`` when proven whole, cloned for each VM, collected when unused (backends/vm's docstring).

    <pool>/incus-operator/images/<product>_<serial>_sha256-<hex>         the cached base (@base once converted)
    <pool>/incus-operator/images/<product>_<serial>_sha256-<hex>-upload  the uploaded file (deleted after)
    <pool>/incus-operator/vms/<vm>/root                                  a VM's root disk, a clone of @base
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import re
from collections.abc import Callable, Iterator
from typing import Any

from ...errors import CallFailed, InsufficientSpace, MalformedAnswer, NotFound, ValidationFailed
from ...images import ImageServer, VMImage, file_virtual_size
from ...jobs import is_finished
from ...observe import Observer
from ...transports.base import Transport
from ..snapshots import origin_of
from .progress import Progress, job_percent

log = logging.getLogger(__name__)
ROOT = "incus-operator"
BASE_GRACE_SECONDS = 24 * 3600.0
"""How long an unused cached base stays (``TIO_VM_BASE_GRACE_SECONDS``): a VM of the same image made
within it needs no download."""
FILE_MODE = 0o600
"""Seeds and uploaded images on the pool: readable by their owner only (a tenant's host-path grant on
the pool must not read another VM's seed); libvirt's dynamic ownership hands them to the VM's qemu."""
CONVERT_ATTEMPTS = 3
"""Conversions into one base before the create fails (each answered with another call's job)."""


def dataset_key(image: VMImage) -> str:
    """The cached base's name: keyed by content. The sha256 the image was checked against before it was
    converted is part of the name, so a base is reused only for the same bytes, whichever server (or
    tenant) names the same product and version; its ``@base`` snapshot, taken only after a successful
    conversion, is the proof that it is whole."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", f"{image.product}_{image.version}") + f"_sha256-{image.sha256}"


def round_up(size: int, unit: int = 2**20) -> int:
    return -(-size // unit) * unit


TOO_LARGE = "more than 80% of your available space"
"""plugins/pool_/dataset.py's refusal of a volume over 80% of its parent's free space."""


def too_large(exc: ValidationFailed) -> bool:
    return any(TOO_LARGE in e.message for e in exc.errors)


def gib(size: int) -> str:
    return f"{size / 2**30:.12g}Gi"


class BaseImages:
    """The bases on one connection's NAS, and the datasets around them."""

    def __init__(
        self, transport: Transport, version: tuple[int, ...], images: ImageServer, observer: Observer | None = None
    ) -> None:
        self.transport = transport
        self.observer = observer
        """Told of each base collected (the operator's metrics: tio_vm_bases_collected)."""
        self.images = images
        self.base_grace_seconds = BASE_GRACE_SECONDS
        """A cached base no VM clones is deleted once it has been unused this long (``collect_bases``)."""
        self.convert_method = "vm.device.convert" if version >= (25, 10) else "vm.import_disk_image"
        self.snapshot_namespace = "pool.snapshot" if version >= (25, 10) else "zfs.snapshot"
        self._base_locks: dict[str, asyncio.Lock] = {}
        self._disk_sizes: dict[str, int] = {}
        """Each image's disk size by sha256, learnt from its download: a base refused for space is then
        refused again before downloading and uploading it, until the pool has the room."""
        self._convert_lock = asyncio.Lock()
        """One conversion at a time on this connection: TrueNAS runs ``vm.device.convert`` under one lock
        with a queue of one and answers a further call with the waiting job, whatever its arguments."""
        self._unused_since: dict[str, float] = {}
        self._in_use: dict[str, int] = {}
        """Per base snapshot, the creates between ``ensure_base`` and the clone (never collected meanwhile)."""

    @contextlib.contextmanager
    def using(self, snapshot: str) -> Iterator[None]:
        """A create that will clone ``snapshot``: the base is not collected meanwhile."""
        self._in_use[snapshot] = self._in_use.get(snapshot, 0) + 1
        try:
            yield
        finally:
            self._in_use[snapshot] -= 1
            if not self._in_use[snapshot]:
                del self._in_use[snapshot]

    async def collect_bases(self, now: float) -> list[str]:
        """Deletes the cached bases (``<pool>/incus-operator/images/*`` with ``@base``) that no dataset has
        cloned for ``base_grace_seconds``, measured on this process's clock from when it first saw them
        unused (a restart starts the wait over: later, never sooner). The ``@base`` snapshot is deleted on
        its own before the volume, never with a recursive delete (on 26 that destroys its clones): TrueNAS
        refuses to delete a snapshot that has clones on every version, so a clone made meanwhile, or one
        outside the operator's datasets, keeps its base. Returns the bases deleted."""
        images = await self.transport.call(
            "pool.dataset.query", [["id", "~", f"^[^/]+/{ROOT}/images/[^/]+$"]], {}, idempotent=True
        )
        clones = await self.transport.call(
            "pool.dataset.query", [["id", "~", f"^[^/]+/{ROOT}/vms/"]], {}, idempotent=True
        )
        origins = {origin_of(e) for e in clones}
        collected = []
        seen = set()
        for entry in images:
            base = str(entry["id"])
            snapshot = f"{base}@base"
            if base.endswith("-upload") or self._in_use.get(snapshot) or snapshot in origins:
                self._unused_since.pop(base, None)
                continue
            seen.add(base)
            since = self._unused_since.setdefault(base, now)
            if now - since < self.base_grace_seconds or not await self._snapshot_exists(snapshot):
                continue
            lock = self._base_locks.setdefault(snapshot, asyncio.Lock())
            if lock.locked():
                continue
            async with lock:
                try:
                    # The snapshot first, never recursively: a clone anywhere (one made meanwhile, another
                    # VM's, a copy made in the TrueNAS UI) makes TrueNAS refuse, on every version.
                    await self.delete_dataset(base)
                except CallFailed as exc:  # a clone appeared, or the dataset is busy: next time
                    log.info("kept the VM base %s: %s", base, exc)
                    continue
            self._unused_since.pop(base, None)
            seen.discard(base)
            collected.append(base)
            log.info("collected the VM base %s (unused for %.0f s)", base, now - since)
            if self.observer is not None:
                self.observer.base_collected()
        for base in set(self._unused_since) - seen:
            self._unused_since.pop(base, None)
        return collected

    async def datasets(self, prefix: str) -> dict[str, dict[str, Any]]:
        entries = await self.transport.call("pool.dataset.query", [["id", "^", prefix]], {}, idempotent=True)
        return {e["id"]: e for e in entries}

    async def _ensure_dataset(self, name: str, **extra: Any) -> None:
        if name in await self.datasets(name):
            return
        try:
            await self.transport.call("pool.dataset.create", {"name": name, **extra})
        except ValidationFailed as exc:
            if not any(e.errno == errno.EEXIST for e in exc.errors):
                raise

    async def _snapshot_exists(self, snapshot: str) -> bool:
        found = await self.transport.call(
            f"{self.snapshot_namespace}.query", [["id", "=", snapshot]], {}, idempotent=True
        )
        return bool(found)

    async def ensure_base(
        self, pool: str, image: VMImage, on_progress: Callable[[dict[str, Any]], None] | None = None
    ) -> str:
        """The snapshot of the cached base volume for ``image``; made (upload + convert) only once."""
        key = dataset_key(image)
        base = f"{pool}/{ROOT}/images/{key}"
        snapshot = f"{base}@base"
        lock = self._base_locks.setdefault(snapshot, asyncio.Lock())
        async with lock:
            upload_dir = f"{base}-upload"
            if await self._snapshot_exists(snapshot):
                if upload_dir in await self.datasets(base):  # the operator stopped right after snapshotting
                    await self.delete_dataset(upload_dir)
                return snapshot
            report = Progress(on_progress, image)
            earlier = await self._earlier_conversion(base)
            if earlier is not None:
                # A conversion started before the operator stopped: follow it, never convert twice.
                report("convert", job_percent(earlier), "Writing the image into the base volume (resumed)")
                if not is_finished(earlier):
                    async with self._convert_lock:
                        await self.transport.wait_job(
                            int(earlier["id"]),
                            None,
                            lambda job: report("convert", job_percent(job), "Converting", job),
                            method=self.convert_method,
                        )
                # The job named this volume when it was found; it must also have ended well.
                if not await self._proven(base, None, int(earlier["id"]) - 1):
                    await self._convert(pool, base, image, upload_dir, report)
            else:
                await self._convert(pool, base, image, upload_dir, report)
            await self.transport.call(f"{self.snapshot_namespace}.create", {"dataset": base, "name": "base"})
            await self.delete_dataset(upload_dir)
            report("convert", 100, "Base image ready")
            return snapshot

    @staticmethod
    def _no_room(image: VMImage, size: int, pool: str) -> InsufficientSpace:
        return InsufficientSpace(
            f"TrueNAS will not make the cached base for {image.product} ({gib(round_up(size))}, the image's "
            f"disk size): it is more than 80% of the free space on pool {pool} (under {ROOT}/images, quotas "
            "included). Free space there, or use another pool (spec.storagePool, where the policy allows it)",
            errno.ENOSPC,
        )

    async def _earlier_conversion(self, base: str) -> dict[str, Any] | None:
        """The newest conversion into ``base`` that TrueNAS runs or finished successfully, if the base
        volume exists (a failed one is redone). A finished one counts only while the upload it read is
        still there (the operator stopped between the conversion and ``@base``): a volume left without
        ``@base`` by an interrupted collection may be named by an older job of an earlier volume."""
        datasets = await self.datasets(base)
        if base not in datasets:
            return None
        uploaded = f"{base}-upload" in datasets
        jobs = await self.transport.call("core.get_jobs", [["method", "=", self.convert_method]], {}, idempotent=True)
        target = f"/dev/zvol/{base}" if self.convert_method == "vm.device.convert" else base
        for job in sorted(jobs, key=lambda j: int(j.get("id") or 0), reverse=True):
            arguments = job.get("arguments") or [{}]
            args = arguments[0] if arguments and isinstance(arguments[0], dict) else {}
            if target in (args.get("destination"), args.get("zvol")):
                running = job.get("state") in ("WAITING", "RUNNING")
                return job if running or (job.get("state") == "SUCCESS" and uploaded) else None
        return None

    async def _convert(self, pool: str, base: str, image: VMImage, upload_dir: str, report: Progress) -> None:
        """Download, upload and write the image into the base volume."""
        await self._ensure_dataset(f"{pool}/{ROOT}")
        await self._ensure_dataset(f"{pool}/{ROOT}/images")
        await self._ensure_dataset(f"{pool}/{ROOT}/vms")
        path = f"/mnt/{upload_dir}/disk.qcow2"
        known = self._disk_sizes.get(image.sha256)
        if known is not None and base not in await self.datasets(base):
            # A base this image could not have for room: judged as TrueNAS will judge its volume (by the
            # free space of its parent, quotas included), before the image moves again. An existing base
            # volume is converted again without any new volume.
            parent = base.rpartition("/")[0]
            entries = await self.transport.call(
                "pool.dataset.query", [["id", "=", parent]], {"extra": {"retrieve_children": False}}, idempotent=True
            )
            available = ((entries[0] if entries else {}).get("available") or {}).get("parsed")
            if isinstance(available, int) and round_up(known) > available * 0.80:
                raise self._no_room(image, known, pool)
        report("download", 0, f"Downloading {image.product} {image.version}")
        # Streamed into the scratch directory (TIO_SCRATCH_DIR, free space checked first), size and sha256
        # checked; a local mirror's own file otherwise.
        local = await self.images.download(image)
        try:
            report("download", 100, "Downloaded")
            await self._ensure_dataset(upload_dir)
            report("upload", 0, "Uploading the image to TrueNAS")
            await self.transport.upload(
                path,
                local,
                mode=FILE_MODE,
                on_progress=lambda job: report("upload", job_percent(job), "Uploading", job),
            )
            size = file_virtual_size(local)
            self._disk_sizes[image.sha256] = size
        finally:
            if self.images.downloaded(local):
                with contextlib.suppress(OSError):
                    os.unlink(local)
        volumes = await self.datasets(base)
        if base not in volumes:
            try:
                await self.transport.call(
                    "pool.dataset.create", {"name": base, "type": "VOLUME", "volsize": round_up(size), "sparse": True}
                )
            except ValidationFailed as exc:
                if not too_large(exc):
                    raise
                await self.delete_dataset(upload_dir)  # the upload takes room too
                raise self._no_room(image, size, pool) from None
        if self.convert_method == "vm.device.convert":
            args: dict[str, Any] = {"source": path, "destination": f"/dev/zvol/{base}"}
        else:
            args = {"diskimg": path, "zvol": base}
        for attempt in range(CONVERT_ATTEMPTS):
            report("convert", 0, "Writing the image into the base volume")
            async with self._convert_lock:
                # 25.10+/26: vm.device.convert has one lock for every conversion and a queue of one; a call
                # beyond it is answered with the waiting job, whoever made it (another client, the UI).
                # 25.04.2: vm.import_disk_image's lock is per volume, another client's call into this
                # volume merges the same way. So the answer proves nothing: a job that names this volume
                # and this image, newer than the call, and successful, does.
                floor = await self._newest_job_id()
                await self.transport.call_job(
                    self.convert_method,
                    args,
                    on_progress=lambda job: report("convert", job_percent(job), "Converting", job),
                )
                if await self._proven(base, path, floor):
                    return
            log.warning(
                "TrueNAS answered the conversion into %s with another call's job (attempt %d of %d): converting again",
                base,
                attempt + 1,
                CONVERT_ATTEMPTS,
            )
        raise CallFailed(
            f"{self.convert_method} into {base}: TrueNAS answered {CONVERT_ATTEMPTS} calls with other conversions'"
            " jobs (its queue of one on the conversion lock; another client is converting): the base is not used"
            " until a conversion of its own succeeds",
            method=self.convert_method,
        )

    async def _newest_job_id(self) -> int:
        jobs = await self.transport.call("core.get_jobs", [], {"order_by": ["-id"], "limit": 1}, idempotent=True)
        return int(jobs[0]["id"]) if jobs else 0

    def _names_volume(self, job: dict[str, Any], base: str, source: str | None) -> bool:
        """Whether ``job``'s arguments name the volume ``base`` (and the image file ``source``, if given)."""
        arguments = job.get("arguments") or [{}]
        args = arguments[-1] if arguments and isinstance(arguments[-1], dict) else {}
        if self.convert_method == "vm.device.convert":
            target, image = args.get("destination"), args.get("source")
            wanted = f"/dev/zvol/{base}"
        else:
            target, image = args.get("zvol"), args.get("diskimg")
            wanted = base
        return target == wanted and (source is None or image == source)

    async def _proven(self, base: str, source: str | None, after: int) -> bool:
        """Whether TrueNAS holds a successful conversion into ``base`` (from ``source``) with an id above
        ``after``: the only proof that the volume was written (the answer to the call is none)."""
        jobs = await self.transport.call(
            "core.get_jobs",
            [["method", "=", self.convert_method], ["state", "=", "SUCCESS"], ["id", ">", after]],
            {},
            idempotent=True,
        )
        return any(self._names_volume(job, base, source) for job in jobs)

    async def refuse_foreign_root(
        self, home: str, base: str, existing: dict[str, dict[str, Any]] | None = None
    ) -> None:
        """A root disk under ``home`` that is not a clone of ``base`` was left by someone else's create cut
        short (VM names are one namespace on the NAS): it may hold another tenant's data, a clone of
        their snapshot. Never booted as this VM's disk, and never deleted by this create either."""
        root = f"{home}/root"
        existing = existing if existing is not None else await self.datasets(root)
        if root in existing and origin_of(existing[root]) != base:
            raise CallFailed(
                f"{root} exists and is not a clone of {base}: not used as this VM's root disk (delete it on "
                "the NAS if nothing needs it)",
                errno=errno.EEXIST,
                method=f"{self.snapshot_namespace}.clone",
            )

    async def root_disk(self, home: str, base: str, size: int | None) -> str:
        await self._ensure_dataset(home)
        root = f"{home}/root"
        existing = await self.datasets(root)
        if root not in existing:
            await self.transport.call(f"{self.snapshot_namespace}.clone", {"snapshot": base, "dataset_dst": root})
            existing = await self.datasets(root)
        else:
            await self.refuse_foreign_root(home, base, existing)
        volsize = ((existing.get(root) or {}).get("volsize") or {}).get("parsed")
        if size is not None and isinstance(volsize, int) and size > volsize:
            try:
                await self.transport.call("pool.dataset.update", root, {"volsize": round_up(size)})
            except ValidationFailed as exc:
                if not too_large(exc):
                    raise
                raise InsufficientSpace(
                    f"spec.rootDiskSize {gib(size)}: TrueNAS will not grow the root disk beyond 80% of the "
                    f"free space on pool {root.split('/')[0]} (the disk is thin, but TrueNAS counts its full size). "
                    "Lower spec.rootDiskSize, or free space on the pool",
                    exc.errno,
                    exc.method,
                ) from None
        return f"/dev/zvol/{root}"

    async def clones_of(self, name: str) -> list[str]:
        """The datasets cloned from a snapshot of ``name`` or of a dataset under it, outside that tree."""
        pattern = f"^{re.escape(name)}[/@]"
        entries = await self.transport.call(
            "pool.dataset.query", [["origin.value", "~", pattern]], {"select": ["id", "origin"]}, idempotent=True
        )
        if not isinstance(entries, list):  # never read as "no clones": that would let a delete go on
            raise MalformedAnswer("pool.dataset.query: the answer is not a list")
        return sorted(
            str(e.get("id"))
            for e in entries or []
            if re.match(pattern, origin_of(e)) and not re.match(f"{re.escape(name)}(/|\\Z)", str(e.get("id")))
        )

    async def delete_dataset(self, name: str) -> None:
        """Deletes ``name`` and the datasets under it, deepest first, each snapshot on its own, and never
        recursively: on 26 ``pool.dataset.delete(..., {recursive: true})`` destroys the clones of every
        snapshot in the tree wherever they live (plugins/zfs/destroy_impl.py), so one call on a base or a
        VM's home could take another VM's disk with it; 25.x refuses. A snapshot that has a clone is
        refused on every version, and the refusal is raised, naming it: nothing outside ``name`` goes."""
        tree = [n for n in await self.datasets(name) if n == name or n.startswith(f"{name}/")]
        for dataset in sorted(tree, key=lambda n: n.count("/"), reverse=True):
            snapshots = await self.transport.call(
                f"{self.snapshot_namespace}.query", [["dataset", "=", dataset]], {}, idempotent=True
            )
            for snapshot in snapshots:
                try:
                    await self.transport.call(f"{self.snapshot_namespace}.delete", str(snapshot["id"]))
                except NotFound:
                    continue
                except CallFailed as exc:
                    raise CallFailed(
                        f"{name} was not deleted: its snapshot {snapshot['id']} could not be deleted (TrueNAS: "
                        f"{exc.message}). A clone of it elsewhere (another VM's disk) is never destroyed by the "
                        "operator: delete or promote that clone first",
                        errno=exc.errno,
                        method=exc.method,
                    ) from None
            with contextlib.suppress(NotFound):
                await self.transport.call("pool.dataset.delete", dataset)
