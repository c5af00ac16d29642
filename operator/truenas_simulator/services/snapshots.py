"""ZFS snapshots as TrueNAS serves them, per version: ``zfs.snapshot.*`` on 25.04 (plugins/zfs_/snapshot.py
and snapshot_actions.py, libzfs and the ``zfs`` command), ``pool.snapshot.*`` on 25.10 (plugins/pool_/
snapshot.py over the now private ``zfs.snapshot.*``), and 26's ``pool.snapshot.*`` over
``zfs.resource.snapshot`` (plugins/zfs/snapshot_*_impl.py, truenas_pylibzfs), whose exceptions are not
CallErrors (plugins/zfs/exceptions.py) and so reach the client as "Method call error", EINVAL.

ZFS's own rules, the same on every version: a snapshot belongs to one dataset and has a creation txg
(a recursive snapshot gives every dataset of the tree the same name and txg, atomically); a rollback
goes to the newest snapshot only, unless the newer ones are destroyed (``recursive``), and their
clones too (``recursive_clones``); a snapshot with clones or holds is not destroyed (``defer`` marks
it, and it goes with its last clone or hold); a clone pins its origin until it is promoted, which
moves the origin snapshot (and the older ones) to the clone. ``used`` is what the snapshot alone
holds (the data overwritten since), ``referenced`` what the dataset held when it was taken.

Wording: [SRC] where the middleware source gives it; [ZFS] the ``zfs`` command's (OpenZFS zfs_main.c /
libzfs), which 25.x passes on, from its documented output rather than a copy; [INF] inferred.
"""

from __future__ import annotations

import errno
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from ..context import CallContext, Handler
from ..errors import CallError, InstanceNotFound, ValidationErrors
from ..filters import check_query_args, filter_list
from .base import Methods, Service

if TYPE_CHECKING:
    from .storage import StorageService

SNAPSHOT_NAME = re.compile(r"^[A-Za-z0-9_.:-]+$")
"""ZFS's component characters (zfs_namecheck.c): what validate_snapshot_name accepts after the ``@``."""


class ZFSPathNotFoundException(Exception):
    """26's plugins/zfs/exceptions.py: not a CallError, so the JSON-RPC server answers it as
    "Method call error", EINVAL, with this text (api/base/server/ws_handler/rpc.py)."""

    def __init__(self, path: str) -> None:
        super().__init__(f"{path!r} not found")


class ZFSPathAlreadyExistsException(Exception):
    """26's plugins/zfs/exceptions.py, like ``ZFSPathNotFoundException``."""

    def __init__(self, path: str) -> None:
        super().__init__(f"{path!r} already exists")


class ZFSPathInvalidException(Exception):
    """26's promote of a dataset that is no clone (rename_promote_clone_impl.promote_impl): no text, so
    the client reads its repr."""

    def __str__(self) -> str:
        return ""


@dataclass
class Snapshot:
    dataset: str
    name: str
    txg: int = 0
    created: float = 0.0
    content: str | None = None
    """What the dataset held when it was taken (a volume's image digest); a rollback brings it back."""
    referenced: int = 0
    used: int = 0
    user_properties: dict[str, str] = field(default_factory=dict)
    holds: set[str] = field(default_factory=set)
    defer_destroy: bool = False

    @property
    def id(self) -> str:
        return f"{self.dataset}@{self.name}"

    def properties(self, wanted: set[str] | None) -> dict[str, Any]:
        """Native properties, and (25.x) the user properties; only ``wanted`` ones when given."""

        def prop(value: Any, parsed: Any = None, source: str = "NONE") -> dict[str, Any]:
            text = str(value)
            return {"value": text, "rawvalue": text, "source": source, "parsed": value if parsed is None else parsed}

        native: dict[str, Any] = {
            "used": prop(self.used),
            "referenced": prop(self.referenced),
            "createtxg": prop(self.txg),
            "creation": {
                "value": datetime.fromtimestamp(self.created, UTC).strftime("%a %b %d %H:%M %Y"),
                "rawvalue": str(int(self.created)),
                "source": "NONE",
                "parsed": {"$date": int(self.created * 1000)},
            },
            "defer_destroy": prop("on" if self.defer_destroy else "off", self.defer_destroy),
            "userrefs": prop(len(self.holds)),
        }
        user = {key: prop(value, source="LOCAL") for key, value in self.user_properties.items()}
        everything = {**native, **user}
        return everything if wanted is None else {k: v for k, v in everything.items() if k in wanted}


class SnapshotService(Service):
    """The profile's snapshot namespace, and ``pool.dataset.promote``; the datasets are storage's."""

    def __init__(self, storage: StorageService) -> None:
        super().__init__(storage.mw)
        self.storage = storage
        self.snapshots: dict[str, Snapshot] = {}

    @property
    def namespace(self) -> str:
        return self.mw.profile.snapshot_namespace

    @property
    def pylibzfs(self) -> bool:
        """26 and later: pool.snapshot.* go through zfs.resource.snapshot (truenas_pylibzfs), not libzfs."""
        return self.mw.profile.pylibvirt

    @property
    def schema(self) -> str:
        """The create call's validation prefix: 25.04's accepts() names it ``snapshot_create``."""
        return "snapshot_create" if self.namespace == "zfs.snapshot" else "pool_snapshot_create"

    def methods(self) -> Methods:
        ns = self.namespace
        plain: dict[str, Handler] = {
            f"{ns}.query": self.query,
            f"{ns}.create": self.create,
            f"{ns}.update": self.update,
            f"{ns}.delete": self.delete,
            f"{ns}.clone": self.clone,
            f"{ns}.rollback": self.rollback,
            f"{ns}.hold": self.hold,
            f"{ns}.release": self.release,
            "pool.dataset.promote": self.promote,
        }
        return {name: (handler, False) for name, handler in plain.items()}

    # ----- helpers -------------------------------------------------------------------------------
    def of(self, dataset: str) -> list[Snapshot]:
        """``dataset``'s snapshots, oldest first (by creation txg)."""
        return sorted((s for s in self.snapshots.values() if s.dataset == dataset), key=lambda s: s.txg)

    def newest(self, dataset: str) -> Snapshot | None:
        found = self.of(dataset)
        return found[-1] if found else None

    def clones_of(self, snap: Snapshot) -> list[str]:
        return [d.name for d in self.storage.datasets.values() if d.origin == snap.id]

    def tree(self, dataset: str) -> list[str]:
        """``dataset`` and its descendants, parents first."""
        return sorted(
            (n for n in self.storage.datasets if n == dataset or n.startswith(f"{dataset}/")),
            key=lambda n: n.count("/"),
        )

    def written(self, dataset: str, nbytes: int) -> None:
        """``nbytes`` written into ``dataset`` (for tests): what they overwrite is now held by its newest
        snapshot alone (copy on write), and the dataset references more."""
        found = self.storage.dataset(dataset)
        snap = self.newest(dataset)
        if snap is not None:
            snap.used = min(snap.referenced, snap.used + nbytes)
        found.referenced += nbytes

    def forget(self, snap: Snapshot) -> None:
        self.snapshots.pop(snap.id, None)
        self.mw.events.emit(f"{self.namespace}.query", "removed", snap.id)

    def dataset_gone(self, name: str) -> None:
        """Storage deleted ``name``: its snapshots go, and a snapshot marked ``defer_destroy`` goes with
        its last clone (zfs destroy -d)."""
        for snap in self.of(name):
            self.snapshots.pop(snap.id, None)
        for snap in [s for s in self.snapshots.values() if s.defer_destroy]:
            if not self.clones_of(snap) and not snap.holds:
                self.forget(snap)

    def _get(self, snap_id: Any) -> Snapshot:
        """The snapshot ``snap_id``, or the version's not-found."""
        found = self.snapshots.get(snap_id) if isinstance(snap_id, str) else None
        if found is not None:
            return found
        if self.pylibzfs:
            raise ZFSPathNotFoundException(str(snap_id))
        raise CallError(f"cannot open '{snap_id}': dataset does not exist", errno.ENOENT)  # [ZFS]

    def _with_descendants(self, snap: Snapshot, recursive: bool) -> list[Snapshot]:
        """``snap`` and, when ``recursive``, the snapshots of its name in the dataset's descendants."""
        if not recursive:
            return [snap]
        found = [self.snapshots.get(f"{name}@{snap.name}") for name in self.tree(snap.dataset)]
        return [s for s in found if s is not None]

    # ----- query -----------------------------------------------------------------------------------
    def entry(self, snap: Snapshot, extra: dict[str, Any]) -> dict[str, Any]:
        wanted = extra.get("properties")
        if self.pylibzfs:
            # plugins/pool_/snapshot.py _transform_snapshot_entry: only the properties asked for; user
            # properties only with ``retention`` (as ``user_properties``); holds always present
            asked = set(wanted) if isinstance(wanted, list) else set()
            properties = {k: v for k, v in snap.properties(asked).items() if k not in snap.user_properties}
        else:
            properties = snap.properties(set(wanted) if isinstance(wanted, list) else None)
        result: dict[str, Any] = {
            "id": snap.id,
            "name": snap.id,
            "pool": snap.dataset.split("/")[0],
            "type": "SNAPSHOT",
            "snapshot_name": snap.name,
            "dataset": snap.dataset,
            "createtxg": str(snap.txg),
            "properties": properties,
        }
        if self.pylibzfs:
            result["holds"] = {"truenas": 1} if "truenas" in snap.holds else {}
            if extra.get("retention"):
                result["user_properties"] = dict(snap.user_properties)
        elif extra.get("holds"):
            result["holds"] = {tag: 1 for tag in sorted(snap.holds)}
        return result

    def query(self, ctx: CallContext, params: list[Any]) -> Any:
        filters, options = check_query_args(params, ctx.schema)
        extra = options.get("extra") if isinstance(options.get("extra"), dict) else {}
        ordered = sorted(self.snapshots.values(), key=lambda s: (s.dataset, s.txg))
        return filter_list([self.entry(s, extra or {}) for s in ordered], filters, options)

    # ----- create / update -------------------------------------------------------------------------
    def create(self, ctx: CallContext, params: list[Any]) -> Any:
        data = params[0] if params else None
        if not isinstance(data, dict) or not data.get("dataset") or not data.get("name"):
            raise ValidationErrors([(f"{self.schema}.name", "You must specify either name or naming schema", 22)])
        dataset, name = str(data["dataset"]), str(data["name"])
        snap_id = f"{dataset}@{name}"
        recursive = bool(data.get("recursive"))
        properties = data.get("properties") or {}
        if not SNAPSHOT_NAME.match(name):
            if self.pylibzfs:
                raise ValidationErrors([("zfs.resource.snapshot.create", f"invalid snapshot name: {name!r}", 22)])
            raise ValidationErrors([(f"{self.schema}.name", "Invalid snapshot name", 22)])  # [SRC] 25.04
        if data.get("exclude") and not recursive and not self.pylibzfs:
            raise ValidationErrors(
                [(f"{self.schema}.exclude", "This option has no sense for non-recursive snapshots", 22)]
            )  # [SRC] 25.04 zfs.snapshot do_create
        if dataset not in self.storage.datasets:
            if self.pylibzfs:  # create_snapshots_impl's, let through by plugins/pool_/snapshot.py do_create
                raise ZFSPathNotFoundException(dataset)
            # 25.x: a libzfs error; do_create's errno is EFAULT unless the text says "already exists" [SRC]
            raise CallError(f"Failed to snapshot {snap_id}: dataset does not exist", errno.EFAULT)
        excluded = {str(e) for e in data.get("exclude") or []}
        targets = [n for n in self.tree(dataset) if n not in excluded] if recursive else [dataset]
        taken = [f"{n}@{name}" for n in targets if f"{n}@{name}" in self.snapshots]
        if taken:
            if self.pylibzfs:  # plugins/pool_/snapshot.py do_create turns this one into a ValidationError
                raise ValidationErrors([("pool.snapshot.create", f"{name} already exists.", errno.EEXIST)])
            raise CallError(f"Failed to snapshot {snap_id}: dataset already exists", errno.EEXIST)
        self.storage.txg += 1  # one txg for the whole tree: atomic
        now = self.storage.clock()
        for target in targets:
            source = self.storage.datasets[target]
            snap = Snapshot(
                target,
                name,
                txg=self.storage.txg,
                created=now,
                content=source.content,
                referenced=source.referenced,
                user_properties={str(k): str(v) for k, v in properties.items()},
            )
            self.snapshots[snap.id] = snap
        created = self.snapshots[snap_id]
        entry = self.entry(created, {})
        self.mw.events.emit(f"{self.namespace}.query", "added", snap_id, entry)
        return entry

    def update(self, ctx: CallContext, params: list[Any]) -> Any:
        """``[id, {user_properties_update: [{key, value} | {key, remove: true}]}]`` (25.04 do_update [SRC])."""
        snap = self._get(params[0] if params else None)
        data = params[1] if len(params) > 1 and isinstance(params[1], dict) else {}
        errors = ValidationErrors()
        for index, prop in enumerate(data.get("user_properties_update") or []):
            key = prop.get("key") if isinstance(prop, dict) else None
            if not isinstance(key, str) or ":" not in key:
                errors.add(
                    f"snapshot_update.user_properties_update.{index}.key", "Value does not match '.*:.*' pattern"
                )
            elif prop.get("remove") and "value" in prop:
                errors.add(
                    f"snapshot_update.user_properties_update.{index}.remove", "Must not be set when value is specified"
                )
        errors.check()
        for prop in data.get("user_properties_update") or []:
            if prop.get("remove"):
                snap.user_properties.pop(prop["key"], None)
            else:
                snap.user_properties[prop["key"]] = str(prop.get("value", ""))
        return self.entry(snap, {})

    # ----- delete ------------------------------------------------------------------------------------
    def delete(self, ctx: CallContext, params: list[Any]) -> Any:
        snap_id = params[0] if params else None
        options = params[1] if len(params) > 1 and isinstance(params[1], dict) else {}
        defer, recursive = bool(options.get("defer")), bool(options.get("recursive"))
        if self.pylibzfs and isinstance(snap_id, str) and "@" not in snap_id:
            raise ValidationErrors([("pool.snapshot.delete", f"Invalid snapshot name: {snap_id!r}", 22)])  # [SRC]
        snap = self.snapshots.get(snap_id) if isinstance(snap_id, str) else None
        if snap is None:
            if self.pylibzfs:  # zfs.resource.snapshot.destroy's ENOENT becomes InstanceNotFound(its text)
                raise ValidationErrors([(None, f"{snap_id!r} not found", errno.ENOENT)])
            raise InstanceNotFound("Snapshot", snap_id)
        doomed = self._with_descendants(snap, recursive)
        for item in doomed:
            clones = self.clones_of(item)
            if clones and not defer:
                if self.pylibzfs:  # plugins/zfs/snapshot_crud.py destroy: ZFSPathHasClonesException
                    message = f"{item.id!r} has the following clones: {','.join(clones)}"
                    raise ValidationErrors([("zfs.resource.snapshot.destroy", message, errno.EBUSY)])
                raise ValidationErrors(  # 25.x do_delete [SRC]
                    [
                        (
                            "options.defer",
                            f"Please set this attribute as {item.id!r} snapshot has dependent clones: "
                            + ", ".join(clones),
                            22,
                        )
                    ]
                )
            if item.holds and not defer:
                if self.pylibzfs:  # ZFSPathHasHoldsException
                    message = f"{item.id!r} has the following holds: {','.join(sorted(item.holds))}"
                    raise ValidationErrors([("zfs.resource.snapshot.destroy", message, errno.EBUSY)])
                raise CallError(f"cannot destroy snapshot {item.id}: dataset is busy")  # [ZFS], EFAULT
        for item in doomed:
            if self.clones_of(item) or item.holds:
                item.defer_destroy = True  # zfs destroy -d: it goes with its last clone or hold
            else:
                self.forget(item)
        return None if self.pylibzfs else True

    # ----- clone / promote -------------------------------------------------------------------------
    def clone(self, ctx: CallContext, params: list[Any]) -> Any:
        data = params[0] if params else None
        if not isinstance(data, dict) or not data.get("snapshot") or not data.get("dataset_dst"):
            raise ValidationErrors([("snapshot_clone.snapshot", "Field required", 22)])
        snap = self.snapshots.get(data["snapshot"])
        target = str(data["dataset_dst"])
        datasets = self.storage.datasets
        if self.pylibzfs:
            # plugins/pool_/snapshot.py clone -> zfs.resource.snapshot.clone_impl ->
            # rename_promote_clone_impl.clone_impl, whose exceptions nothing turns into CallErrors
            if snap is None:
                raise ZFSPathNotFoundException(str(data["snapshot"]))
            if target in datasets:
                raise ZFSPathAlreadyExistsException(target)
        if snap is None:
            raise CallError(f"Failed to clone snapshot: dataset does not exist: {data['snapshot']}", errno.EFAULT)
        if target in datasets:
            raise CallError(f"Failed to clone snapshot: dataset already exists: {target}", errno.EFAULT)
        if target.rpartition("/")[0] not in datasets:
            raise CallError(f"Failed to clone snapshot: parent does not exist: {target}", errno.EFAULT)
        source = datasets[snap.dataset]
        self.storage.add_dataset(
            target, source.type, source.volsize, origin=snap.id, content=snap.content, referenced=snap.referenced
        )
        return True

    def promote(self, ctx: CallContext, params: list[Any]) -> Any:
        """``pool.dataset.promote(id)``: the clone takes its origin snapshot and every older snapshot of
        the origin's dataset; that dataset becomes a clone of the moved snapshot (``zfs promote``)."""
        name = params[0] if params else None
        found = self.storage.datasets.get(name) if isinstance(name, str) else None
        if found is None:
            if self.pylibzfs:
                raise ZFSPathNotFoundException(str(name))
            raise CallError(f'Dataset "{name}" does not exist.', errno.ENOENT)  # [SRC] 25.x promote
        if not found.origin:
            if self.pylibzfs:
                raise ZFSPathInvalidException()
            raise CallError("Only cloned datasets can be promoted.", errno.EBADMSG)  # [SRC]
        origin = self.snapshots[found.origin]
        former = self.storage.datasets[origin.dataset]
        moved = [s for s in self.of(origin.dataset) if s.txg <= origin.txg]
        for snap in moved:
            del self.snapshots[snap.id]
            snap.dataset = found.name
            self.snapshots[snap.id] = snap
        for other in self.storage.datasets.values():  # other clones of the moved snapshots follow them
            if other.origin and other.origin.split("@")[0] == origin.dataset:
                snap_name = other.origin.split("@", 1)[1]
                if f"{found.name}@{snap_name}" in self.snapshots and other is not former:
                    other.origin = f"{found.name}@{snap_name}"
        former.origin, found.origin = f"{found.name}@{origin.name}", None
        return None if self.pylibzfs else True

    # ----- rollback ----------------------------------------------------------------------------------
    def rollback(self, ctx: CallContext, params: list[Any]) -> Any:
        """``[id, {recursive, recursive_clones, force, recursive_rollback}]``: 25.x runs ``zfs rollback``
        and raises ``Failed to rollback snapshot: <stderr>`` (snapshot_actions.py [SRC]); 26 runs
        snapshot_rollback_impl.rollback_impl, whose ValueErrors carry its own text [SRC]."""
        snap_id = params[0] if params else None
        options = params[1] if len(params) > 1 and isinstance(params[1], dict) else {}
        recursive, clones = bool(options.get("recursive")), bool(options.get("recursive_clones"))
        if self.pylibzfs and isinstance(snap_id, str) and "@" not in snap_id:
            raise ValidationErrors(
                [("pool.snapshot.rollback", f"{snap_id!r} must be a snapshot path (containing '@')", 22)]
            )
        snap = self._get(snap_id) if self.pylibzfs else self.snapshots.get(snap_id)  # type: ignore[arg-type]
        if snap is None:
            raise CallError(f"Failed to rollback snapshot: cannot open '{snap_id}': dataset does not exist")  # [ZFS]
        targets = [snap]
        if options.get("recursive_rollback"):
            for name in self.tree(snap.dataset)[1:]:
                child = self.snapshots.get(f"{name}@{snap.name}")
                if child is None:
                    if self.pylibzfs:  # every child must have it [SRC]
                        raise ZFSPathNotFoundException(f"{name}@{snap.name}")
                    continue  # 25.x rolls back the children that have it [SRC]
                targets.append(child)
        for target in targets:
            self._rollback_one(target, recursive or clones, clones)
        return None

    def _rollback_one(self, snap: Snapshot, destroy_newer: bool, destroy_clones: bool) -> None:
        newer = [s for s in self.of(snap.dataset) if s.txg > snap.txg]
        if self.pylibzfs:
            if destroy_newer:  # newest first; a failure (clones without recursive_clones) is passed over [SRC]
                for item in reversed(newer):
                    if destroy_clones:
                        for clone in self.clones_of(item):
                            self.storage.drop_tree(clone)
                    if not self.clones_of(item) and not item.holds:
                        self.forget(item)
            left = [s.id for s in self.of(snap.dataset) if s.txg > snap.txg]
            if left:
                raise ValueError(
                    "Cannot rollback: more recent snapshots or bookmarks exist. Please pass `recursive: true` to "
                    "delete the following snapshots and bookmarks recursively:\n" + "\n".join(f"  {s}" for s in left)
                )
        else:
            if newer and not destroy_newer:
                raise CallError(
                    f"Failed to rollback snapshot: cannot rollback to {snap.id!r}: more recent snapshots or bookmarks "
                    "exist\nuse '-r' to force deletion of the following snapshots and bookmarks:\n"
                    + "\n".join(s.id for s in newer)
                )  # [ZFS]
            dependents = [c for s in newer for c in self.clones_of(s)]
            if dependents and not destroy_clones:
                raise CallError(
                    f"Failed to rollback snapshot: cannot rollback to {snap.id!r}: clones of previous snapshots "
                    "exist\nuse '-R' to force deletion of the following clones and dependents:\n"
                    + "\n".join(dependents)
                )  # [ZFS]
            held = [s.id for s in newer if s.holds]
            if held:
                raise CallError(f"Failed to rollback snapshot: cannot destroy snapshot {held[0]}: dataset is busy")
            for clone in dependents:
                self.storage.drop_tree(clone)
            for item in reversed(newer):
                self.forget(item)
        dataset = self.storage.datasets[snap.dataset]
        dataset.content, dataset.referenced, snap.used = snap.content, snap.referenced, 0
        guest = self.storage.running_on(snap.dataset)
        if guest is not None:  # allowed: zfs_ioc_rollback suspends a mounted filesystem or an open zvol
            self.storage.changed_under.append((snap.dataset, guest))

    # ----- holds ---------------------------------------------------------------------------------------
    def hold(self, ctx: CallContext, params: list[Any]) -> Any:
        snap = self._get_for("hold", params)
        options = params[1] if len(params) > 1 and isinstance(params[1], dict) else {}
        targets = self._with_descendants(snap, bool(options.get("recursive")))
        if any("truenas" in t.holds for t in targets) and not self.pylibzfs:
            raise CallError(
                f"Failed to hold snapshot: cannot hold snapshot '{snap.id}': tag already exists on this dataset"
            )
        for target in targets:
            target.holds.add("truenas")
        return None

    def release(self, ctx: CallContext, params: list[Any]) -> Any:
        snap = self._get_for("release", params)
        options = params[1] if len(params) > 1 and isinstance(params[1], dict) else {}
        tags = set(snap.holds)  # 25.x: only the tags the named snapshot has [SRC]
        for target in self._with_descendants(snap, bool(options.get("recursive"))):
            target.holds -= tags
            if target.defer_destroy and not target.holds and not self.clones_of(target):
                self.forget(target)
        return None

    def _get_for(self, verb: str, params: list[Any]) -> Snapshot:
        snap_id = params[0] if params else None
        try:
            return self._get(snap_id)
        except CallError as exc:
            raise CallError(f"Failed to {verb} snapshot: {exc.errmsg}") from None
