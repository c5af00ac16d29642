"""The libvirt ``vm.*`` API family (TrueNAS 25.04.2 and later): IncusInstances of type VM.

``vm.*`` has no images and no cloud-init (truenas-vm-container.md §2.6), so this backend builds both:

1. it finds the alias's VM image (``disk.qcow2``) in a simplestreams index (``images.ImageServer``);
2. once per image version it uploads the image (``/_upload`` + ``filesystem.put``) and writes it into
   a volume, the cached base (``vm.device.convert`` on 25.10+/26, ``vm.import_disk_image`` on 25.04.2),
   one conversion at a time per connection, then snapshots it (``@base``) once ``core.get_jobs`` shows a
   successful conversion of this image into this volume: the snapshot is the mark of a finished base;
3. each VM's root disk is a clone of that snapshot, grown to ``rootDiskSize`` if that is larger;
4. ``environment`` and ``cloudInit`` go into a NoCloud seed ISO (``seed.py``) attached as CDROM;
5. ``vm.create`` (memory in MiB, vcpus from ``cpu``, autostart), the root disk, the seed and the NICs.

Names are deterministic, so a create that is repeated after a crash finds what the first one made:

    <pool>/incus-operator/images/<product>_<serial>_sha256-<hex>         the cached base (@base once converted)
    <pool>/incus-operator/images/<product>_<serial>_sha256-<hex>-upload  the uploaded file (deleted after)
    <pool>/incus-operator/vms/<vm>                         per VM: seed.iso, and its root disk clone /root

VM names allow letters, digits and ``_`` only, so ``web-01`` is ``web_01`` on TrueNAS.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp

from ..errors import (
    AlreadyExists,
    CallFailed,
    FieldError,
    NotFound,
    TransportError,
    TrueNASError,
    ValidationFailed,
)
from ..images import DEFAULT_IMAGE_SERVER, ImageServer, ImageSource, VMImage, file_virtual_size
from ..jobs import is_finished, job_result
from ..seed import seed_iso, user_data
from ..transports.base import Transport
from ..types import (
    UNSET,
    DeviceConfig,
    InstanceChanges,
    InstanceConfig,
    InstanceEventCallback,
    ObservedImage,
    ObservedInstance,
)

log = logging.getLogger(__name__)

ROOT = "incus-operator"
DEFAULT_MEMORY = 1024 * 2**20
SUPPORTED_DEVICES = ("NIC",)
STATUS = {"RUNNING": "RUNNING", "STOPPED": "STOPPED", "SUSPENDED": "FROZEN", "ERROR": "ERROR"}
BASE_GRACE_SECONDS = 24 * 3600.0
"""How long an unused cached base stays (``TIO_VM_BASE_GRACE_SECONDS``): a VM of the same image made
within it needs no download."""
FILE_MODE = 0o600
"""Seeds and uploaded images on the pool: readable by their owner only."""
CONVERT_ATTEMPTS = 3
"""Conversions into one base before the create fails (each answered with another call's job)."""
PROGRESS_SPAN = {"download": (0, 10), "upload": (10, 30), "convert": (30, 95)}


def vm_name(name: str) -> str:
    """``web-01`` -> ``web_01`` (vm.* names are ``^[a-zA-Z_0-9]+$``; instance names have no ``_``)."""
    return name.replace("-", "_")


def instance_name(name: str) -> str:
    return name.replace("_", "-")


def dataset_key(image: VMImage) -> str:
    """The cached base's name: keyed by content. The sha256 the image was checked against before it was
    converted is part of the name, so a base is reused only for the same bytes, whichever server (or
    tenant) names the same product and version; its ``@base`` snapshot, taken only after a successful
    conversion, is the proof that it is whole."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", f"{image.product}_{image.version}") + f"_sha256-{image.sha256}"


def cpu_count(cpu: str | None) -> int:
    return int(cpu) if cpu is not None and cpu.isdigit() and int(cpu) > 0 else 1


def observed(entry: dict[str, Any]) -> ObservedInstance:
    total = int(entry.get("vcpus") or 1) * int(entry.get("cores") or 1) * int(entry.get("threads") or 1)
    return ObservedInstance(
        id=str(entry["id"]),
        name=instance_name(entry["name"]),
        type="VM",
        status=STATUS.get(str((entry.get("status") or {}).get("state")), "UNKNOWN"),
        cpu=str(total),
        memory=int(entry["memory"]) * 2**20 if entry.get("memory") is not None else None,
        autostart=bool(entry.get("autostart")),
        environment={},
        addresses=(),  # vm.query reports no guest addresses on any version (§5)
        image=ObservedImage(description=entry.get("description") or None),
        storage_pool=None,
    )


MANAGED_MARK = "managed by truenas-incus-operator"
SEED_MARK = re.compile(r"seed env=(\w+) cloud-init=(\w+)")
FIRST_BOOT_ONLY = "applies at first boot only"
NEXT_START = "takes effect at the next start"


def made_by_operator(entry: dict[str, Any]) -> bool:
    """The operator's own VMs say so in their description (``_create_vm``)."""
    return str(entry.get("description") or "").endswith(MANAGED_MARK)


def fingerprint(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:12]


def seed_marks(config: InstanceConfig) -> tuple[str, str]:
    """What the seed holds, as short digests kept in the VM's description (they outlive the operator)."""
    return fingerprint(config.environment), fingerprint(config.cloud_init_user_data, config.cloud_init_network_config)


def device_identity(device: DeviceConfig) -> str:
    return nic_key(device.extra.get("parent")) if device.type == "NIC" else device.name


def nic_key(parent: Any) -> str:
    """vm.device has no names: a NIC is known by what it attaches to, in every family's identity."""
    return f"nic-{parent or 'default'}"


def device_from_entry(entry: dict[str, Any], root_paths: tuple[str, ...]) -> DeviceConfig:
    attributes = entry.get("attributes") or {}
    kind = str(attributes.get("dtype"))
    name = str(entry["id"])
    if kind == "NIC":
        extra = {"parent": attributes.get("nic_attach"), "mac": attributes.get("mac")}
        return DeviceConfig(nic_key(extra["parent"]), "NIC", extra={k: v for k, v in extra.items() if v})
    path = str(attributes.get("path") or "")
    # The root disk and the seed are the operator's own (like a profile's devices): never managed as spec devices.
    inherited = path in root_paths
    return DeviceConfig(name, kind, source=path or None, extra={}, inherited=inherited)


class VMBackend:
    family = "vm"

    def __init__(
        self,
        transport: Transport,
        version: tuple[int, ...],
        image_server: str | ImageServer | ImageSource | None = None,
        arch: str = "amd64",
        may_write: Callable[[], bool] = lambda: True,
    ) -> None:
        self.transport = transport
        self.version = version
        self.may_write = may_write
        """Whether this process may write to TrueNAS outside an action (the operator's Lease fence): the
        resync query's base collection asks it first."""
        self.base_grace_seconds = BASE_GRACE_SECONDS
        """A cached base no VM clones is deleted once it has been unused this long (``collect_bases``)."""
        if isinstance(image_server, ImageSource):
            self.base_grace_seconds = image_server.base_grace_seconds
            image_server = image_server.server(arch)
        self.images = (
            image_server
            if isinstance(image_server, ImageServer)
            else ImageServer(image_server or DEFAULT_IMAGE_SERVER, arch)
        )
        self.supports_events = transport.supports_events
        self.convert_method = "vm.device.convert" if version >= (25, 10) else "vm.import_disk_image"
        self.snapshot_namespace = "pool.snapshot" if version >= (25, 10) else "zfs.snapshot"
        self._ids: dict[str, int] = {}
        self._names: dict[int, str] = {}
        self._base_locks: dict[str, asyncio.Lock] = {}
        self._convert_lock = asyncio.Lock()
        """One conversion at a time on this connection: TrueNAS runs ``vm.device.convert`` under one lock
        with a queue of one and answers a further call with the waiting job, whatever its arguments."""
        self._pool: str | None = None
        self._seeds: dict[str, tuple[str, str]] = {}
        """Per VM, the seed marks of its description (what cloud-init was given)."""
        self._restart_pending: dict[str, list[str]] = {}
        """Per running VM, the fields changed since it started (this process's memory only)."""
        self._environment: dict[str, dict[str, str]] = {}
        """What each VM's seed says (vm.query cannot show a guest's environment); this process's memory only."""
        self._unused_since: dict[str, float] = {}
        self._in_use: dict[str, int] = {}
        """Per base snapshot, the creates between ``ensure_base`` and the clone (never collected meanwhile)."""
        self._next_collect = 0.0

    # ----- what this family can do ------------------------------------------------------------------
    def unsupported_fields(self, config: InstanceConfig) -> list[str]:
        unsupported = []
        if config.type != "VM":
            unsupported.append("type")
        if config.cpu is not None and not config.cpu.isdigit():
            unsupported.append("cpu")  # a set of host CPUs: vm.* pins only with an equal vcpu count
        for device in config.devices:
            if device.type not in SUPPORTED_DEVICES:
                unsupported.append(f"devices[{device.name}] ({device.type})")
        nics = [d for d in config.devices if d.type == "NIC"]
        if nics:
            unsupported.append("nics[].name")
        if len({nic_key(d.extra.get("parent")) for d in nics}) < len(nics):
            unsupported.append("nics[].parent (one NIC per parent)")
        return unsupported

    def honoured(self, config: InstanceConfig) -> InstanceConfig:
        """What the VM gets: a vCPU count (1 unless given), whole MiB of memory (1 GiB unless given), NICs
        by parent (and MAC); the environment goes into the seed (read by cloud-init at first boot)."""
        memory = config.memory // 2**20 * 2**20 if config.memory is not None else DEFAULT_MEMORY
        return replace(
            config,
            cpu=str(cpu_count(config.cpu)),
            memory=memory,
            devices=tuple(
                replace(
                    d,
                    name=nic_key(d.extra.get("parent")),
                    extra={k: v for k, v in d.extra.items() if k in ("parent", "mac") and v},
                )
                for d in config.devices
                if d.type in SUPPORTED_DEVICES
            ),
        )

    device_identity = staticmethod(device_identity)

    def deferred_fields(self, config: InstanceConfig, observed: ObservedInstance | None) -> list[str]:
        """cloud-init reads the seed once: a later ``environment`` or ``cloudInit`` is never delivered. vm.update
        redefines nothing live: memory and vCPUs changed on a running VM apply at its next start."""
        if observed is None or observed.type != "VM":
            return []
        deferred = []
        seeded = self._seeds.get(config.name)
        if seeded is not None:
            env, cloud_init = seed_marks(config)
            if env != seeded[0]:
                deferred.append(f"environment ({FIRST_BOOT_ONLY})")
            if cloud_init != seeded[1]:
                deferred.append(f"cloudInit ({FIRST_BOOT_ONLY})")
        if observed.status == "RUNNING":
            deferred += [f"{field} ({NEXT_START})" for field in self._restart_pending.get(config.name, [])]
        return deferred

    # ----- bookkeeping -------------------------------------------------------------------------------------
    def _remember(self, entry: dict[str, Any]) -> ObservedInstance:
        name = instance_name(entry["name"])
        self._ids[name] = entry["id"]
        self._names[entry["id"]] = name
        marks = SEED_MARK.search(str(entry.get("description") or ""))
        if marks is not None:
            self._seeds[name] = (marks.group(1), marks.group(2))
        if (entry.get("status") or {}).get("state") != "RUNNING":
            self._restart_pending.pop(name, None)  # the next start takes them
        return replace(observed(entry), environment=dict(self._environment.get(name, {})))

    def _forget(self, name: str) -> None:
        ident = self._ids.pop(name, None)
        if ident is not None:
            self._names.pop(ident, None)

    async def _entry(self, name: str) -> dict[str, Any] | None:
        entries = await self.transport.call("vm.query", [["name", "=", vm_name(name)]], {}, idempotent=True)
        return entries[0] if entries else None

    async def _id(self, name: str) -> int:
        if name not in self._ids:
            await self.get_instance(name)
        if name not in self._ids:
            raise NotFound([FieldError(None, f"VM {vm_name(name)} does not exist", errno.ENOENT)], "vm.get_instance")
        return self._ids[name]

    async def pool(self, wanted: str | None) -> str:
        if wanted:
            return wanted
        if self._pool is None:
            for method, key in (("lxc.config", "preferred_pool"), ("virt.global.config", "pool")):
                try:
                    config = await self.transport.call(method, idempotent=True)
                except CallFailed:
                    continue
                if isinstance(config, dict) and config.get(key):
                    self._pool = str(config[key])
                    break
        if self._pool is None:
            raise ValidationFailed(
                [FieldError("storagePool", "no default pool on this TrueNAS: set spec.storagePool")], "vm.create"
            )
        return self._pool

    # ----- instances -------------------------------------------------------------------------------------------
    async def list_instances(self) -> list[ObservedInstance]:
        entries = await self.transport.call("vm.query", [], {}, idempotent=True)
        self._ids.clear()
        self._names.clear()
        observed = [self._remember(e) for e in entries]
        now = time.monotonic()
        if now >= self._next_collect and self.may_write():  # once per resync interval at most, bounded by the grace
            self._next_collect = now + max(60.0, min(self.base_grace_seconds / 4, 3600.0))
            try:
                await self.collect_bases(now)
            except TrueNASError as exc:
                log.warning("could not collect unused VM bases: %s", exc)
        return observed

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
        origins = {str(((e.get("origin") or {}).get("value")) or "") for e in clones}
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
                    await self._delete_dataset(base)
                except CallFailed as exc:  # a clone appeared, or the dataset is busy: next time
                    log.info("kept the VM base %s: %s", base, exc)
                    continue
            self._unused_since.pop(base, None)
            seen.discard(base)
            collected.append(base)
            log.info("collected the VM base %s (unused for %.0f s)", base, now - since)
            counted = getattr(getattr(self.transport, "observer", None), "base_collected", None)
            if callable(counted):  # the operator's metrics (tio_vm_bases_collected)
                counted()
        for base in set(self._unused_since) - seen:
            self._unused_since.pop(base, None)
        return collected

    async def get_instance(self, name: str) -> ObservedInstance | None:
        entry = await self._entry(name)
        if entry is None:
            self._forget(name)
            return None
        return self._remember(entry)

    async def create(
        self, config: InstanceConfig, on_progress: Callable[[dict[str, Any]], None] | None = None
    ) -> ObservedInstance:
        """Builds the VM; a VM of the operator's under the name whose create was cut short (the operator
        stopped between ``vm.create`` and its devices) is completed instead: the caller holds the
        ledger record that says the create never finished."""
        name = vm_name(config.name)
        existing = await self._entry(config.name)
        if existing is not None and not made_by_operator(existing):
            raise AlreadyExists([FieldError("vm_create.name", "This name already exists.", errno.EEXIST)], "vm.create")
        pool = await self.pool(config.storage_pool)
        image = await self.images.resolve(config.image)
        snapshot = f"{pool}/{ROOT}/images/{dataset_key(image)}@base"
        self._in_use[snapshot] = self._in_use.get(snapshot, 0) + 1
        try:
            return await self._build(config, name, existing, pool, image, on_progress)
        finally:
            self._in_use[snapshot] -= 1
            if not self._in_use[snapshot]:
                del self._in_use[snapshot]

    async def _build(
        self,
        config: InstanceConfig,
        name: str,
        existing: dict[str, Any] | None,
        pool: str,
        image: VMImage,
        on_progress: Callable[[dict[str, Any]], None] | None,
    ) -> ObservedInstance:
        base = await self.ensure_base(pool, image, on_progress)
        home = f"{pool}/{ROOT}/vms/{name}"
        if existing is not None:
            return await self._complete(existing, home, base, config)
        try:
            root = await self._root_disk(home, base, config.root_disk_size)
            seed = await self._seed(home, config)
            entry = await self._create_vm(config, name, image)
        except BaseException:
            # Nothing of this create may stay behind unless a VM of the name uses it.
            await self._discard_home(config.name, home)
            raise
        try:
            await self._attach(entry["id"], root, seed, config.devices)
        except BaseException:
            with contextlib.suppress(TrueNASError):
                await self.transport.call("vm.delete", entry["id"], {"zvols": False, "force": True})
            await self._discard_home(config.name, home)
            raise
        self._environment[config.name] = dict(config.environment)
        created = await self._entry(config.name)
        return self._remember(created or entry)

    async def _complete(self, entry: dict[str, Any], home: str, base: str, config: InstanceConfig) -> ObservedInstance:
        """Attaches what a half-built VM lacks: the root disk (cloned if missing), the seed, the NICs."""
        devices = [d.get("attributes") or {} for d in entry.get("devices") or []]
        paths = {str(a.get("path")) for a in devices if a.get("path")}
        nics = {nic_key(a.get("nic_attach")) for a in devices if a.get("dtype") == "NIC"}
        root = await self._root_disk(home, base, config.root_disk_size)
        if root not in paths:
            await self.transport.call(
                "vm.device.create", {"vm": entry["id"], "attributes": {"dtype": "DISK", "path": root, "type": "VIRTIO"}}
            )
        seed = f"/mnt/{home}/seed.iso"
        if seed not in paths:  # never attached, so never read: (re)written from the spec
            await self._seed(home, config)
            marked = SEED_MARK.sub(
                "seed env={} cloud-init={}".format(*seed_marks(config)), entry.get("description") or ""
            )
            await self.transport.call("vm.update", entry["id"], {"description": marked})
            await self.transport.call(
                "vm.device.create", {"vm": entry["id"], "attributes": {"dtype": "CDROM", "path": seed}}
            )
        for device in config.devices:
            if device.type == "NIC" and nic_key(device.extra.get("parent")) not in nics:
                await self.transport.call("vm.device.create", {"vm": entry["id"], "attributes": nic_attributes(device)})
        log.info("completed the half-built VM %s (root disk, seed, NICs)", entry["name"])
        self._environment[config.name] = dict(config.environment)
        completed = await self._entry(config.name)
        return self._remember(completed or entry)

    async def _discard_home(self, name: str, home: str | None = None) -> None:
        """Deletes the per-VM dataset(s) of ``name`` (every pool's) unless a VM of the name uses them.
        Best effort: a failure here must not hide the error that brought us here."""
        try:
            entry = await self._entry(name)
            used = " ".join(str((d.get("attributes") or {}).get("path")) for d in (entry or {}).get("devices") or [])
            homes = [home] if home is not None else await self._homes(name)
            for dataset in homes:
                if entry is None or f"{dataset}/" not in used:
                    await self._delete_dataset(dataset)
        except TrueNASError as exc:
            log.warning("could not remove what the create of %s left behind: %s", name, exc)

    async def _homes(self, name: str) -> list[str]:
        """``<pool>/incus-operator/vms/<vm>`` on every pool (a half-built VM's devices do not name its pool)."""
        suffix = f"/{ROOT}/vms/{vm_name(name)}"
        entries = await self.transport.call("pool.dataset.query", [["id", "$", suffix]], {}, idempotent=True)
        return [str(e["id"]) for e in entries if str(e["id"]).count("/") == 3]

    async def discard_unfinished(self, name: str) -> None:
        if await self._entry(name) is None:
            await self._discard_home(name)

    async def _create_vm(self, config: InstanceConfig, name: str, image: VMImage) -> dict[str, Any]:
        memory = config.memory if config.memory is not None else DEFAULT_MEMORY
        payload = {
            "name": name,
            "description": description(config, f"{image.product} {image.version}"),
            "memory": max(20, memory // 2**20),
            "vcpus": cpu_count(config.cpu),
            "autostart": config.autostart,
        }
        try:
            entry: dict[str, Any] = await self.transport.call("vm.create", payload)
        except ValidationFailed as exc:
            if any(e.errno == errno.EEXIST for e in exc.errors):
                raise AlreadyExists.from_validation(exc) from None
            raise
        return entry

    async def _attach(self, ident: int, root: str, seed: str, devices: tuple[DeviceConfig, ...]) -> None:
        await self.transport.call(
            "vm.device.create", {"vm": ident, "attributes": {"dtype": "DISK", "path": root, "type": "VIRTIO"}}
        )
        await self.transport.call("vm.device.create", {"vm": ident, "attributes": {"dtype": "CDROM", "path": seed}})
        for device in devices:
            if device.type == "NIC":
                await self.transport.call("vm.device.create", {"vm": ident, "attributes": nic_attributes(device)})

    # ----- the cached base, the root disk, the seed ------------------------------------------------------------
    async def _datasets(self, prefix: str) -> dict[str, dict[str, Any]]:
        entries = await self.transport.call("pool.dataset.query", [["id", "^", prefix]], {}, idempotent=True)
        return {e["id"]: e for e in entries}

    async def _ensure_dataset(self, name: str, **extra: Any) -> None:
        if name in await self._datasets(name):
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
                if upload_dir in await self._datasets(base):  # the operator stopped right after snapshotting
                    await self._delete_dataset(upload_dir)
                return snapshot
            report = Progress(on_progress, image)
            earlier = await self._earlier_conversion(base)
            if earlier is not None:
                # A conversion started before the operator stopped: follow it, never convert twice.
                report("convert", job_percent(earlier), "Writing the image into the base volume (resumed)")
                if not is_finished(earlier):
                    wait = getattr(self.transport, "wait_job", None)
                    if wait is None:
                        raise TransportError("this transport cannot follow jobs")
                    async with self._convert_lock:
                        await wait(
                            int(earlier["id"]),
                            None,
                            lambda job: report("convert", job_percent(job), "Converting", job),
                        )
                # The job named this volume when it was found; it must also have ended well.
                if not await self._proven(base, None, int(earlier["id"]) - 1):
                    await self._convert(pool, base, image, upload_dir, report)
            else:
                await self._convert(pool, base, image, upload_dir, report)
            await self.transport.call(f"{self.snapshot_namespace}.create", {"dataset": base, "name": "base"})
            await self._delete_dataset(upload_dir)
            report("convert", 100, "Base image ready")
            return snapshot

    async def _earlier_conversion(self, base: str) -> dict[str, Any] | None:
        """The newest conversion into ``base`` that TrueNAS runs or finished successfully, if the base
        volume exists (a failed one is redone). A finished one counts only while the upload it read is
        still there (the operator stopped between the conversion and ``@base``): a volume left without
        ``@base`` by an interrupted collection may be named by an older job of an earlier volume."""
        datasets = await self._datasets(base)
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
        report("download", 0, f"Downloading {image.product} {image.version}")
        # Streamed into the scratch directory (TIO_SCRATCH_DIR, free space checked first), size and sha256
        # checked; a local mirror's own file otherwise.
        local = await self.images.download(image)
        try:
            report("download", 100, "Downloaded")
            await self._ensure_dataset(upload_dir)
            report("upload", 0, "Uploading the image to TrueNAS")
            await self.upload(path, local, lambda job: report("upload", job_percent(job), "Uploading", job))
            size = file_virtual_size(local)
        finally:
            if self.images.downloaded(local):
                with contextlib.suppress(OSError):
                    os.unlink(local)
        volumes = await self._datasets(base)
        if base not in volumes:
            await self.transport.call(
                "pool.dataset.create", {"name": base, "type": "VOLUME", "volsize": round_up(size), "sparse": True}
            )
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

    async def _root_disk(self, home: str, base: str, size: int | None) -> str:
        await self._ensure_dataset(home)
        root = f"{home}/root"
        existing = await self._datasets(root)
        if root not in existing:
            await self.transport.call(f"{self.snapshot_namespace}.clone", {"snapshot": base, "dataset_dst": root})
            existing = await self._datasets(root)
        volsize = ((existing.get(root) or {}).get("volsize") or {}).get("parsed")
        if size is not None and isinstance(volsize, int) and size > volsize:
            await self.transport.call("pool.dataset.update", root, {"volsize": round_up(size)})
        return f"/dev/zvol/{root}"

    async def _seed(self, home: str, config: InstanceConfig) -> str:
        path = f"/mnt/{home}/seed.iso"
        data = seed_iso(
            instance_id=f"{config.name}",
            hostname=config.name,
            user=user_data(config.environment, config.cloud_init_user_data),
            network=config.cloud_init_network_config,
        )
        await self.upload(path, data)
        return path

    async def _delete_dataset(self, name: str) -> None:
        """Deletes ``name`` and the datasets under it, deepest first, each snapshot on its own, and never
        recursively: on 26 ``pool.dataset.delete(..., {recursive: true})`` destroys the clones of every
        snapshot in the tree wherever they live (plugins/zfs/destroy_impl.py), so one call on a base or a
        VM's home could take another VM's disk with it; 25.x refuses. A snapshot that has a clone is
        refused on every version, and the refusal is raised, naming it: nothing outside ``name`` goes."""
        tree = [n for n in await self._datasets(name) if n == name or n.startswith(f"{name}/")]
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

    async def upload(
        self, path: str, data: bytes | Path, on_progress: Callable[[dict[str, Any]], None] | None = None
    ) -> None:
        """``POST /_upload`` with ``filesystem.put`` (apps/file_app.py), then waits for its job."""
        options = getattr(self.transport, "options", None)
        if options is None:
            raise TransportError("this transport cannot upload files")
        parts = urlsplit(options.url)
        scheme = {"wss": "https", "ws": "http"}.get(parts.scheme, parts.scheme)
        url = urlunsplit((scheme, parts.netloc, "/_upload", "", ""))
        form = aiohttp.FormData()
        # Owner only: a seed holds the tenant's cloud-init and environment, and pool paths may be shared
        # with other tenants through host-path grants. libvirt (dynamic_ownership) hands the files to
        # the VM's qemu process when it starts.
        form.add_field("data", json.dumps({"method": "filesystem.put", "params": [path, {"mode": FILE_MODE}]}))
        headers = {"Authorization": f"Bearer {options.api_key.reveal()}"}
        ssl_option: Any = options.ssl_context if scheme == "https" and options.ssl_context is not None else None
        try:
            with contextlib.ExitStack() as files:
                # A file is streamed from disk by aiohttp in pieces, never read whole.
                content: Any = files.enter_context(data.open("rb")) if isinstance(data, Path) else data
                form.add_field(
                    "file", content, filename=path.rsplit("/", 1)[-1], content_type="application/octet-stream"
                )
                async with (
                    aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=options.job_timeout)) as http,
                    http.post(url, data=form, headers=headers, ssl=ssl_option) as response,
                ):
                    text = await response.text()
                    if response.status != 200:
                        raise CallFailed(
                            f"upload of {path} refused: HTTP {response.status} {text[:200]}", method="_upload"
                        )
                    job_id = int(json.loads(text)["job_id"])
        except aiohttp.ClientError as exc:
            raise TransportError(f"upload of {path}: {type(exc).__name__}") from None
        # The job may be over already (small files): its events went by before anyone listened for them.
        jobs = await self.transport.call("core.get_jobs", [["id", "=", job_id]], {}, idempotent=True)
        if jobs and is_finished(jobs[0]):
            if on_progress is not None:
                on_progress(jobs[0])
            job_result(jobs[0], job_id)
            return
        wait = getattr(self.transport, "wait_job", None)
        if wait is None:
            raise TransportError("this transport cannot follow jobs")
        await wait(job_id, None, on_progress)

    # ----- update / delete / power ---------------------------------------------------------------------------
    async def update(self, name: str, changes: InstanceChanges) -> ObservedInstance:
        payload: dict[str, Any] = {}
        if changes.cpu is UNSET:
            payload.update(vcpus=1, cores=1, threads=1)
        elif isinstance(changes.cpu, str):
            payload.update(vcpus=cpu_count(changes.cpu), cores=1, threads=1)
        if changes.memory is UNSET:
            payload["memory"] = DEFAULT_MEMORY // 2**20
        elif isinstance(changes.memory, int):
            payload["memory"] = max(20, changes.memory // 2**20)
        if changes.autostart is not None:
            payload["autostart"] = changes.autostart
        if changes.environment is not None:
            # cloud-init read the seed at first boot: a later environment is not delivered (deferred_fields
            # says so from the seed's mark). Remembered only, so that it is not planned again.
            self._environment[name] = dict(changes.environment)
        if not payload:  # e.g. the environment after an operator restart: nothing to write on TrueNAS
            entry = await self._entry(name)
            if entry is None:
                raise NotFound([FieldError(None, f"VM {vm_name(name)} does not exist", errno.ENOENT)], "vm.update")
            return self._remember(entry)
        entry = await self.transport.call("vm.update", await self._id(name), payload)
        if (entry.get("status") or {}).get("state") == "RUNNING":
            # Running VMs take memory and vCPU changes at their next start (vm.update redefines nothing live).
            changed = [
                f for f, keys in (("cpu", ("vcpus",)), ("memory", ("memory",))) if any(k in payload for k in keys)
            ]
            pending = self._restart_pending.setdefault(name, [])
            pending += [f for f in changed if f not in pending]
        return self._remember(entry)

    async def delete(self, name: str) -> None:
        """The VM, its root disk clone and its seed; never the cached base (other VMs clone it). The
        per-VM dataset is found by name on every pool: a half-built VM has no devices that name it."""
        entry = await self._entry(name)
        if entry is not None:
            if (entry.get("status") or {}).get("state") in ("RUNNING", "SUSPENDED"):
                await self.transport.call("vm.poweroff", entry["id"])
            await self.transport.call("vm.delete", entry["id"], {"zvols": False, "force": False})
        for home in await self._homes(name):
            await self._delete_dataset(home)
        self._forget(name)

    async def start(self, name: str) -> None:
        await self.transport.call("vm.start", await self._id(name))

    async def stop(self, name: str, timeout: int | None = None, force: bool = False) -> None:
        # vm.stop has no timeout: the VM's shutdown_timeout (5..300 s) applies, then force_after_timeout.
        ident = await self._id(name)
        if timeout is not None and not force:
            await self.transport.call("vm.update", ident, {"shutdown_timeout": min(300, max(5, timeout))})
        options = {"force": True} if force or timeout == 0 else {"force_after_timeout": True}
        await self.transport.call_job("vm.stop", ident, options)

    async def restart(self, name: str, timeout: int | None = None, force: bool = False) -> None:
        await self.stop(name, timeout, force)
        await self.start(name)

    async def create_in_progress(self, name: str) -> bool:
        return False  # the create is this client's own sequence of calls, not one TrueNAS job

    # ----- devices ----------------------------------------------------------------------------------------------
    async def list_devices(self, name: str) -> list[DeviceConfig]:
        ident = await self._id(name)
        entries = await self.transport.call("vm.device.query", [["vm", "=", ident]], {}, idempotent=True)
        own = f"/{ROOT}/vms/{vm_name(name)}/"
        roots = tuple(
            str((e.get("attributes") or {}).get("path"))
            for e in entries
            if own in str((e.get("attributes") or {}).get("path") or "")
        )
        return [device_from_entry(e, roots) for e in entries]

    async def add_device(self, name: str, device: DeviceConfig) -> None:
        await self.transport.call(
            "vm.device.create", {"vm": await self._id(name), "attributes": nic_attributes(device)}
        )

    async def _device_id(self, name: str, device_name: str) -> int:
        if device_name.isdigit():
            return int(device_name)
        ident = await self._id(name)
        entries = await self.transport.call("vm.device.query", [["vm", "=", ident]], {}, idempotent=True)
        for entry in entries:
            attributes = entry.get("attributes") or {}
            if attributes.get("dtype") == "NIC" and nic_key(attributes.get("nic_attach")) == device_name:
                return int(entry["id"])
        raise NotFound([FieldError(None, f"VM Device {device_name} does not exist", errno.ENOENT)], "vm.device")

    async def update_device(self, name: str, device: DeviceConfig, target: str | None = None) -> None:
        ident = await self._device_id(name, target or device.name)
        await self.transport.call("vm.device.update", ident, {"attributes": nic_attributes(device)})

    async def delete_device(self, name: str, device_name: str) -> None:
        await self.transport.call("vm.device.delete", await self._device_id(name, device_name))

    # ----- events ---------------------------------------------------------------------------------------------
    def instance_from_event(self, fields: dict[str, Any]) -> ObservedInstance | None:
        state = (fields.get("status") or {}).get("state")
        # 25.10's libvirt events overwrite status.state with libvirt names (SHUTOFF, ...): not a full entry.
        if {"id", "name", "memory", "status"} <= fields.keys() and state in STATUS:
            return self._remember(fields)
        return None

    async def watch(self, callback: InstanceEventCallback) -> bool:
        if not self.transport.supports_events:
            return False

        def relay(msg: str, ident: Any, fields: dict[str, Any] | None) -> None:
            name = self._names.get(ident)
            if fields and fields.get("name"):
                name = instance_name(str(fields["name"]))
            if name is not None:
                callback(msg, name, fields)

        await self.transport.subscribe("vm.query", relay)
        return True


def description(config: InstanceConfig, version: str) -> str:
    env, cloud_init = seed_marks(config)
    return f"{config.image} ({version}), seed env={env} cloud-init={cloud_init}, {MANAGED_MARK}"


def nic_attributes(device: DeviceConfig) -> dict[str, Any]:
    """A spec NIC on vm.*: VIRTIO on ``parent`` (bridge or macvtap, as TrueNAS decides from the parent)."""
    attributes: dict[str, Any] = {"dtype": "NIC", "type": "VIRTIO", "nic_attach": device.extra.get("parent")}
    if device.extra.get("mac"):
        attributes["mac"] = device.extra["mac"]
    return attributes


def round_up(size: int, unit: int = 2**20) -> int:
    return -(-size // unit) * unit


def job_percent(job: dict[str, Any]) -> int:
    return int(((job.get("progress") or {}).get("percent")) or 0)


class Progress:
    """Folds download, upload and conversion into one job-like progress for ``status.job``."""

    def __init__(self, sink: Callable[[dict[str, Any]], None] | None, image: VMImage) -> None:
        self.sink = sink
        self.image = image

    def __call__(self, phase: str, percent: int, description: str, job: dict[str, Any] | None = None) -> None:
        """``job``: the TrueNAS job of this phase (upload, conversion); the download is the client's own (id 0)."""
        if self.sink is None:
            return
        low, high = PROGRESS_SPAN[phase]
        overall = low + (high - low) * max(0, min(100, percent)) // 100
        self.sink(
            {
                "id": int((job or {}).get("id") or 0),
                "method": str((job or {}).get("method") or f"download {self.image.product} {self.image.version}"),
                "state": "RUNNING",
                "progress": {"percent": overall, "description": description, "extra": None},
            }
        )
