"""ZFS as the VM path needs it: datasets and volumes (``pool.dataset.*``), snapshots and clones
(``zfs.snapshot.*`` on 25.04.2, ``pool.snapshot.*`` on 25.10/26), files uploaded through
``/_upload`` + ``filesystem.put`` (truenas-vm-container.md §2.6). The test images and the ISO
reader are in ``images.py``.

Wording [SRC] where the reference or the middleware source gives it; the ``pool.dataset`` messages
marked [INF] follow ``plugins/pool_/dataset.py`` from memory of its shape, not an exact copy.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..context import CallContext, Handler, Middleware
from ..errors import CallError, InstanceNotFound, ValidationErrors
from ..filters import check_query_args, filter_list
from ..jobs import Job
from .base import Methods, Service


# ----- datasets, snapshots, files ----------------------------------------------------------------------
@dataclass
class Dataset:
    name: str
    type: str = "FILESYSTEM"
    volsize: int | None = None
    sparse: bool = False
    """A volume without a reservation: it takes no space until written (clones are sparse)."""
    origin: str | None = None
    """The snapshot a clone was made from."""
    content: str | None = None
    """What a volume holds: the sha256 of the disk image written into it (clones inherit it)."""

    @property
    def pool(self) -> str:
        return self.name.split("/")[0]

    @property
    def mountpoint(self) -> str | None:
        return f"/mnt/{self.name}" if self.type == "FILESYSTEM" else None

    def entry(self, available: int | None = None) -> dict[str, Any]:
        def prop(value: Any) -> dict[str, Any]:
            text = "" if value is None else str(value)
            return {"parsed": value, "rawvalue": text, "value": text, "source": "LOCAL"}

        return {
            "id": self.name,
            "type": self.type,
            "name": self.name,
            "pool": self.pool,
            "encrypted": False,
            "mountpoint": self.mountpoint,
            "volsize": prop(self.volsize) if self.type == "VOLUME" else None,
            "origin": prop(self.origin or ""),
            "available": prop(available),
            "children": [],
        }


@dataclass
class Snapshot:
    dataset: str
    name: str
    content: str | None = None

    @property
    def id(self) -> str:
        return f"{self.dataset}@{self.name}"

    def entry(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.id,
            "pool": self.dataset.split("/")[0],
            "type": "SNAPSHOT",
            "snapshot_name": self.name,
            "dataset": self.dataset,
            "createtxg": "1",
            "properties": {},
        }


class StorageService(Service):
    def __init__(self, mw: Middleware, in_use: Callable[[str], str | None]) -> None:
        """``in_use(name)``: the RUNNING VM with a disk on dataset ``name`` or below it, if any (the VM
        family answers it; storage does not reach into it)."""
        super().__init__(mw)
        self.in_use = in_use
        self.datasets: dict[str, Dataset] = {}
        self.snapshots: dict[str, Snapshot] = {}
        self.files: dict[str, bytes] = {}
        self.modes: dict[str, int] = {}
        """Each file's permission bits: ``filesystem.put``'s ``mode``, else 0o644 (the middleware's umask)."""
        for pool in mw.global_config.storage_pools:
            self.datasets[pool] = Dataset(pool)

    def methods(self) -> Methods:
        """``pool.dataset.*`` and the snapshot namespace of the profile; ``filesystem.put`` is reached
        through ``/_upload`` only (``put_job``)."""
        snapshots = self.mw.profile.snapshot_namespace
        plain: dict[str, Handler] = {
            "pool.dataset.query": self.dataset_query,
            "pool.dataset.create": self.dataset_create,
            "pool.dataset.update": self.dataset_update,
            "pool.dataset.delete": self.dataset_delete,
            f"{snapshots}.query": self.snapshot_query,
            f"{snapshots}.create": self.snapshot_create,
            f"{snapshots}.clone": self.snapshot_clone,
            f"{snapshots}.delete": self.snapshot_delete,
        }
        return {name: (handler, False) for name, handler in plain.items()}

    # ----- helpers -------------------------------------------------------------------------------
    def dataset(self, name: str) -> Dataset:
        found = self.datasets.get(name)
        if found is None:
            raise InstanceNotFound("Dataset", name)
        return found

    def zvol_of(self, path: str) -> Dataset | None:
        """``/dev/zvol/tank/x`` -> the volume, or None."""
        if not path.startswith("/dev/zvol/"):
            return None
        found = self.datasets.get(path.removeprefix("/dev/zvol/"))
        return found if found is not None and found.type == "VOLUME" else None

    def directory_exists(self, path: str) -> bool:
        return any(d.mountpoint == path for d in self.datasets.values())

    # ----- pool.dataset ------------------------------------------------------------------------
    def dataset_query(self, ctx: CallContext, params: list[Any]) -> Any:
        filters, options = check_query_args(params, ctx.schema)
        return filter_list([d.entry(self.available(d.name)) for d in self.datasets.values()], filters, options)

    def dataset_create(self, ctx: CallContext, params: list[Any]) -> Any:
        data = params[0] if params else None
        if not isinstance(data, dict) or not isinstance(data.get("name"), str) or not data["name"]:
            raise ValidationErrors([("pool_dataset_create.name", "Field required", errno.EINVAL)])
        name, kind = data["name"], data.get("type", "FILESYSTEM")
        errors = ValidationErrors()
        if kind not in ("FILESYSTEM", "VOLUME"):
            errors.add("pool_dataset_create.type", "Input should be 'FILESYSTEM' or 'VOLUME'")
        if name in self.datasets:
            errors.add("pool_dataset_create.name", f"Path {name} already exists", errno.EEXIST)  # [INF]
        parent = name.rpartition("/")[0]
        if not parent or parent not in self.datasets:
            errors.add("pool_dataset_create.name", "Parent dataset does not exist for specified name")  # [INF]
        elif self.datasets[parent].type == "VOLUME":
            errors.add("pool_dataset_create.name", "Parent dataset must not be a volume")  # [INF]
        volsize = data.get("volsize")
        if kind == "VOLUME" and (not isinstance(volsize, int) or isinstance(volsize, bool) or volsize <= 0):
            errors.add("pool_dataset_create.volsize", "This field is required")  # [INF]
        elif kind == "VOLUME" and parent in self.datasets:
            self._volume_rules(errors, "pool_dataset_create", data, self.available(parent))
        errors.check()
        created = Dataset(name, kind, volsize if kind == "VOLUME" else None, sparse=bool(data.get("sparse")))
        self.datasets[name] = created
        return created.entry(self.available(name))

    def dataset_update(self, ctx: CallContext, params: list[Any]) -> Any:
        found = self.dataset(params[0] if params else None)  # type: ignore[arg-type]
        data = params[1] if len(params) > 1 and isinstance(params[1], dict) else {}
        if "volsize" in data:
            size = data["volsize"]
            if found.type != "VOLUME":
                raise ValidationErrors([("pool_dataset_update.volsize", "This field is only valid for volumes", 22)])
            if found.volsize is not None and size < found.volsize:
                raise ValidationErrors(
                    [
                        (
                            "pool_dataset_update.volsize",
                            "You cannot shrink a zvol from GUI as this may lead to data loss.",
                            22,
                        )
                    ]
                )  # [INF]
            errors = ValidationErrors()
            own = 0 if found.sparse or found.volsize is None else found.volsize  # what it reserves already
            self._volume_rules(errors, "pool_dataset_update", data, self.available(found.name) + own)
            errors.check()
            found.volsize = size
        return found.entry(self.available(found.name))

    def available(self, name: str) -> int:
        """The free space under ``name``: the pool's, less what volumes with a reservation hold."""
        pool = name.split("/")[0]
        reserved = sum(
            d.volsize or 0 for d in self.datasets.values() if d.pool == pool and d.type == "VOLUME" and not d.sparse
        )
        return max(0, self.mw.knobs.pool_available - reserved)

    @staticmethod
    def _volume_rules(errors: ValidationErrors, schema: str, data: dict[str, Any], available: int) -> None:
        """plugins/pool_/dataset.py (__common_validation): a volume larger than 80% of the parent's
        available space (an update: plus the volume's own use) is refused unless ``force_size``, sparse
        or not; a volsize that is not a multiple of a given ``volblocksize`` is refused."""
        size = data.get("volsize")
        if not isinstance(size, int) or isinstance(size, bool):
            return
        if size > available * 0.80 and not data.get("force_size", False):
            errors.add(
                f"{schema}.volsize", "It is not recommended to use more than 80% of your available space for VOLUME"
            )
        block = data.get("volblocksize")
        if isinstance(block, str) and block:
            block_size = 512 if block[:3] == "512" else int(block[:-1]) * 1024 if block[:-1].isdigit() else 0
            if block_size and size % block_size:
                errors.add(f"{schema}.volsize", "Volume size should be a multiple of volume block size")

    def dataset_delete(self, ctx: CallContext, params: list[Any]) -> Any:
        name = params[0] if params else None
        found = self.dataset(name)  # type: ignore[arg-type]
        options = params[1] if len(params) > 1 and isinstance(params[1], dict) else {}
        children = [d for d in self.datasets if d.startswith(f"{found.name}/")]
        if children and not options.get("recursive"):
            raise CallError(
                f"Failed to delete dataset: cannot destroy '{found.name}': filesystem has children", errno.EBUSY
            )  # [INF]
        doomed = [found.name, *children]
        if options.get("recursive") and self.mw.profile.name == "26.0":
            # 26: plugins/zfs/destroy_impl.py runs truenas_pylibzfs's DESTROY_RESOURCES channel program
            # ("recursive: Recursively destroy all descendants as well as release any holds and destroy
            # any clones or snapshots"): the clones of every snapshot in the tree go too, wherever they
            # live, and theirs in turn. 25.x (libzfs, zfs destroy -r) refuses below.
            doomed = self._with_clones(doomed)
        for item in doomed:
            for snap in [s for s in self.snapshots.values() if s.dataset == item]:
                clones = [d.name for d in self.datasets.values() if d.origin == snap.id and d.name not in doomed]
                if clones:
                    raise CallError(
                        f"Failed to delete dataset: cannot destroy '{item}': filesystem has dependent clones\n"
                        f"use '-R' to destroy the following datasets:\n" + "\n".join(clones),
                        errno.EBUSY,
                    )  # zfs destroy's wording
        snapshots = [s.id for s in self.snapshots.values() if s.dataset == found.name]
        if snapshots and not options.get("recursive"):
            # ZFS destroys no dataset that has snapshots unless recursively (zfs destroy without -r;
            # 26: destroy_nonrecursive_impl's destroy_resource) [INF]
            raise CallError(
                f"Failed to delete dataset: cannot destroy '{found.name}': filesystem has children\n"
                f"use '-r' to destroy the following datasets:\n" + "\n".join(snapshots),
                errno.EBUSY,
            )
        for item in doomed:
            if self.in_use(item) is not None:
                raise CallError(f"Failed to delete dataset: cannot destroy '{item}': dataset is busy", errno.EBUSY)
        for item in doomed:
            self.datasets.pop(item, None)
            for snap_id in [s for s, snap in self.snapshots.items() if snap.dataset == item]:
                del self.snapshots[snap_id]
            prefix = f"/mnt/{item}/"
            for path in [p for p in self.files if p.startswith(prefix)]:
                del self.files[path]
        return True

    def _with_clones(self, names: list[str]) -> list[str]:
        """``names``, their descendants, the clones of any of their snapshots, and so on (26's recursive delete)."""
        doomed = list(names)
        for item in doomed:  # grows while it is walked
            for snap in [s for s in self.snapshots.values() if s.dataset == item]:
                for clone in [d.name for d in self.datasets.values() if d.origin == snap.id]:
                    for name in [clone, *(d for d in self.datasets if d.startswith(f"{clone}/"))]:
                        if name not in doomed:
                            doomed.append(name)
        return doomed

    # ----- snapshots and clones ------------------------------------------------------------------
    def snapshot_query(self, ctx: CallContext, params: list[Any]) -> Any:
        filters, options = check_query_args(params, ctx.schema)
        return filter_list([s.entry() for s in self.snapshots.values()], filters, options)

    def snapshot_create(self, ctx: CallContext, params: list[Any]) -> Any:
        data = params[0] if params else None
        prefix = "snapshot_create" if self.mw.profile.snapshot_namespace == "zfs.snapshot" else "pool_snapshot_create"
        if not isinstance(data, dict) or not data.get("dataset") or not data.get("name"):
            raise ValidationErrors([(f"{prefix}.name", "You must specify either name or naming schema", 22)])
        dataset = self.datasets.get(data["dataset"])
        snap_id = f"{data['dataset']}@{data['name']}"
        if dataset is None:
            raise CallError(f"Failed to snapshot {snap_id}: dataset does not exist", errno.ENOENT)
        if snap_id in self.snapshots:
            raise CallError(f"Failed to snapshot {snap_id}: dataset already exists", errno.EEXIST)
        snap = Snapshot(dataset.name, data["name"], dataset.content)
        self.snapshots[snap_id] = snap
        return snap.entry()

    def snapshot_clone(self, ctx: CallContext, params: list[Any]) -> Any:
        data = params[0] if params else None
        if not isinstance(data, dict) or not data.get("snapshot") or not data.get("dataset_dst"):
            raise ValidationErrors([("snapshot_clone.snapshot", "Field required", 22)])
        snap = self.snapshots.get(data["snapshot"])
        target = data["dataset_dst"]
        if snap is None:
            raise CallError(f"Failed to clone snapshot: dataset does not exist: {data['snapshot']}", errno.ENOENT)
        if target in self.datasets:
            raise CallError(f"Failed to clone snapshot: dataset already exists: {target}", errno.EEXIST)
        if target.rpartition("/")[0] not in self.datasets:
            raise CallError(f"Failed to clone snapshot: parent does not exist: {target}", errno.ENOENT)
        source = self.datasets[snap.dataset]
        self.datasets[target] = Dataset(
            target, source.type, source.volsize, sparse=True, origin=snap.id, content=snap.content
        )
        return True

    def snapshot_delete(self, ctx: CallContext, params: list[Any]) -> Any:
        snap_id = params[0] if params else None
        snap = self.snapshots.get(snap_id) if isinstance(snap_id, str) else None
        if snap is None:
            raise InstanceNotFound("Snapshot", snap_id)
        clones = [d.name for d in self.datasets.values() if d.origin == snap.id]
        if clones:
            raise ValidationErrors(
                [
                    (
                        "options.defer",
                        f"Please set this attribute as {snap.id!r} snapshot has dependent clones: {', '.join(clones)}",
                        22,
                    )
                ]
            )
        del self.snapshots[snap.id]
        return True

    # ----- filesystem.put (through /_upload only) -------------------------------------------------
    def put_job(self, ctx: CallContext, params: list[Any], content: bytes) -> Job:
        """``filesystem.put [path, {mode?, append?}]`` fed by the upload's ``file`` part."""

        async def body(job: Job) -> Any:
            path = params[0] if params else None
            if not isinstance(path, str) or not path.startswith("/mnt/"):
                raise ValidationErrors([("filesystem.put.path", "Path must reside within /mnt", 22)])  # [INF]
            parent = path.rpartition("/")[0]
            if not self.directory_exists(parent):
                raise CallError(f"{parent}: No such file or directory", errno.ENOENT)  # [INF]
            options = params[1] if len(params) > 1 and isinstance(params[1], dict) else {}
            previous = self.files.get(path, b"") if options.get("append") else b""
            await self.work(job, "Uploading")
            self.files[path] = previous + content
            mode = options.get("mode")
            self.modes[path] = mode if isinstance(mode, int) and not isinstance(mode, bool) else 0o644
            return True

        return self.submit(ctx, "filesystem.put", params, body)
