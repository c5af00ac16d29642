"""ZFS as the operator needs it: datasets and volumes (``pool.dataset.*``), files uploaded through
``/_upload`` + ``filesystem.put`` (truenas-vm-container.md §2.6); snapshots, clones, rollback and
promote per version are in ``snapshots.py``. The test images and the ISO reader are in ``images.py``.

Wording [SRC] where the reference or the middleware source gives it; the ``pool.dataset`` messages
marked [INF] follow ``plugins/pool_/dataset.py`` from memory of its shape, not an exact copy.
"""

from __future__ import annotations

import errno
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..context import CallContext, Handler, Middleware
from ..errors import CallError, InstanceNotFound, ValidationErrors
from ..filters import check_query_args, filter_list
from ..jobs import Job
from .base import Methods, Service
from .snapshots import Snapshot, SnapshotService
from .snapshottasks import SnapshotTaskService


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
    referenced: int = 0
    """The bytes of data it holds (tests write them: ``SnapshotService.written``)."""

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


class StorageService(Service):
    def __init__(self, mw: Middleware, in_use: Callable[[str], str | None]) -> None:
        """``in_use(name)``: the RUNNING VM with a disk on dataset ``name`` or below it, if any (the VM
        family answers it; storage does not reach into it)."""
        super().__init__(mw)
        self.in_use = in_use
        self.datasets: dict[str, Dataset] = {}
        self.txg = 1
        """The pool's transaction group counter: every snapshot records the one it was taken in."""
        self.clock: Callable[[], float] = time.time
        """Snapshot creation times (tests may set another clock)."""
        self.snaps = SnapshotService(self)
        self.tasks = SnapshotTaskService(self)
        self.running_on: Callable[[str], str | None] = in_use
        """The running guest whose disk or root filesystem is dataset ``name``, if any (any family)."""
        self.changed_under: list[tuple[str, str]] = []
        """(dataset, guest) for every rollback ZFS did under a running guest: ZFS allows it (a mounted
        filesystem and an open zvol are suspended and resumed, zfs_ioc_rollback), the guest sees its
        disk change beneath it. Tests assert the operator never lets that happen."""
        self.files: dict[str, bytes] = {}
        self.directories: set[str] = set()
        """Directories ``filesystem.put`` made (``os.makedirs``), besides the datasets' mountpoints."""
        self.modes: dict[str, int] = {}
        """Each file's permission bits: ``filesystem.put``'s ``mode``, else 0o644 (the middleware's umask)."""
        for pool in mw.global_config.storage_pools:
            self.datasets[pool] = Dataset(pool)

    def methods(self) -> Methods:
        """``pool.dataset.*``, ``pool.dataset.promote`` and the snapshot namespace of the profile
        (snapshots.py); ``filesystem.put`` is reached through ``/_upload`` only (``put_job``)."""
        plain: dict[str, Handler] = {
            "pool.dataset.query": self.dataset_query,
            "pool.dataset.create": self.dataset_create,
            "pool.dataset.update": self.dataset_update,
            "pool.dataset.delete": self.dataset_delete,
        }
        return {
            **{name: (handler, False) for name, handler in plain.items()},
            **self.snaps.methods(),
            **self.tasks.methods(),
        }

    @property
    def snapshots(self) -> dict[str, Snapshot]:
        return self.snaps.snapshots

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
        return path in self.directories or any(d.mountpoint == path for d in self.datasets.values())

    def add_dataset(self, name: str, kind: str = "FILESYSTEM", volsize: int | None = None, **fields: Any) -> Dataset:
        """A dataset made by something other than ``pool.dataset.create`` (a clone, an instance's own)."""
        created = Dataset(name, kind, volsize, sparse=kind == "VOLUME", **fields)
        self.datasets[name] = created
        return created

    def ensure_tree(self, name: str, kind: str = "FILESYSTEM", volsize: int | None = None) -> Dataset:
        """``name`` with its missing parents, as a service makes its own datasets (Incus, containers)."""
        parts = name.split("/")
        for depth in range(1, len(parts)):
            parent = "/".join(parts[:depth])
            if parent not in self.datasets:
                self.add_dataset(parent)
        return self.datasets.get(name) or self.add_dataset(name, kind, volsize)

    def rename_tree(self, old: str, new: str) -> None:
        """``zfs rename``: the dataset, its descendants and their snapshots take the new name."""
        for item in sorted(n for n in self.datasets if n == old or n.startswith(f"{old}/")):
            moved = self.datasets.pop(item)
            moved.name = new + item[len(old) :]
            self.datasets[moved.name] = moved
            for snap in self.snaps.of(item):
                del self.snaps.snapshots[snap.id]
                snap.dataset = moved.name
                self.snaps.snapshots[snap.id] = snap
        for other in self.datasets.values():
            if other.origin and (other.origin.startswith(f"{old}@") or other.origin.startswith(f"{old}/")):
                other.origin = new + other.origin[len(old) :]

    def drop_tree(self, name: str) -> None:
        """``name`` and its descendants go, with their snapshots and files (a rollback's ``-R``)."""
        for item in sorted((n for n in self.datasets if n == name or n.startswith(f"{name}/")), reverse=True):
            self.datasets.pop(item, None)
            self.snaps.dataset_gone(item)
            prefix = f"/mnt/{item}/"
            for path in [p for p in self.files if p.startswith(prefix)]:
                del self.files[path]
            self.directories -= {d for d in self.directories if d == f"/mnt/{item}" or d.startswith(prefix)}

    # ----- pool.dataset ------------------------------------------------------------------------
    def internal(self, name: str) -> bool:
        """What pool.dataset.query hides: 25.x's internal_datasets_filters / INTERNAL_DATASETS (with
        ``.ix-virt``), 26's INTERNAL_DATASETS (with the containers' CONTAINER_DS_NAME) [SRC]."""
        names = (
            ".system",
            "ix-applications",
            "ix-apps",
            ".truenas_containers" if self.mw.profile.pylibvirt else ".ix-virt",
        )
        return any(f"/{i}" in name for i in names)

    def dataset_query(self, ctx: CallContext, params: list[Any]) -> Any:
        filters, options = check_query_args(params, ctx.schema)
        extra = options.get("extra") if isinstance(options.get("extra"), dict) else {}
        # 25.10 and 26 take extra.exclude_internal_datasets (dataset.py query); 25.04 always appends the filters
        hide = self.mw.profile.name.startswith("25.04") or (extra or {}).get("exclude_internal_datasets", True)
        shown = [d for d in self.datasets.values() if not (hide and self.internal(d.name))]
        return filter_list([d.entry(self.available(d.name)) for d in shown], filters, options)

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
            # plugins/pool_/dataset.py do_delete, every version [SRC]
            raise CallError(
                f"Failed to delete dataset: cannot destroy {found.name!r}: filesystem has children", errno.ENOTEMPTY
            )
        doomed = [found.name, *children]
        if options.get("recursive") and self.mw.profile.pylibvirt:
            # 26: plugins/zfs/destroy_impl.py runs truenas_pylibzfs's DESTROY_RESOURCES channel program
            # ("recursive: Recursively destroy all descendants as well as release any holds and destroy
            # any clones or snapshots"): the clones of every snapshot in the tree go too, wherever they
            # live, and theirs in turn. 25.x (libzfs, zfs destroy -r) refuses below.
            doomed = self.with_clones(doomed)
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
            self.drop_tree(item)
        return True

    def with_clones(self, names: list[str]) -> list[str]:
        """``names``, their descendants, the clones of any of their snapshots, and so on (26's recursive delete)."""
        doomed = list(names)
        for item in doomed:  # grows while it is walked
            for snap in [s for s in self.snapshots.values() if s.dataset == item]:
                for clone in [d.name for d in self.datasets.values() if d.origin == snap.id]:
                    for name in [clone, *(d for d in self.datasets if d.startswith(f"{clone}/"))]:
                        if name not in doomed:
                            doomed.append(name)
        return doomed

    # ----- filesystem.put (through /_upload only) -------------------------------------------------
    def put_job(self, ctx: CallContext, params: list[Any], content: bytes) -> Job:
        """``filesystem.put [path, {mode?, append?}]`` fed by the upload's ``file`` part."""

        async def body(job: Job) -> Any:
            path = params[0] if params else None
            if not isinstance(path, str) or not path:
                raise ValidationErrors([("filesystem.put.path", "String should have at least 1 character", 22)])
            # plugins/filesystem.py put(): ``os.makedirs(dirname)`` when it is missing, wherever it is
            # (FULL_ADMIN only; the path is any non-empty string, FilesystemPutArgs)
            parent = path.rpartition("/")[0]
            while parent and not self.directory_exists(parent):
                self.directories.add(parent)
                parent = parent.rpartition("/")[0]
            options = params[1] if len(params) > 1 and isinstance(params[1], dict) else {}
            previous = self.files.get(path, b"") if options.get("append") else b""
            await self.work(job, "Uploading")
            self.files[path] = previous + content
            mode = options.get("mode")
            self.modes[path] = mode if isinstance(mode, int) and not isinstance(mode, bool) else 0o644
            return True

        return self.submit(ctx, "filesystem.put", params, body)
