"""The ``vm.*`` backend proper: VMs built from a cached base, a seed and ``vm.create`` (the
package's docstring), then updated, powered and deleted through ``vm.*``."""

from __future__ import annotations

import contextlib
import errno
import logging
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from ...errors import (
    AlreadyExists,
    CallFailed,
    CallTimeout,
    FieldError,
    InsufficientMemory,
    MalformedAnswer,
    NotAuthorized,
    NotFound,
    TrueNASError,
    ValidationFailed,
)
from ...images import DEFAULT_IMAGE_SERVER, ImageServer, ImageSource, VMImage
from ...observe import Observer
from ...transports.base import Transport
from ...types import (
    UNSET,
    Calls,
    DeviceConfig,
    InstanceChanges,
    InstanceConfig,
    InstanceEventCallback,
    InstanceStatus,
    ObservedInstance,
    SnapshotTarget,
)
from ..macs import mac_for
from ..snapshots import Snapshots
from .bases import BASE_GRACE_SECONDS, FILE_MODE, ROOT, BaseImages, dataset_key
from .entries import (
    DEFAULT_MEMORY,
    STATUS,
    SUPPORTED_DEVICES,
    cpu_count,
    device_from_entry,
    device_identity,
    guest_interfaces,
    instance_name,
    nic_attributes,
    nic_key,
    observed,
    vm_name,
)
from .marks import (
    FIRST_BOOT_ONLY,
    NEXT_START,
    SEED_MARK,
    description,
    made_by_operator,
    seed_mark_text,
    seed_marks,
)
from .seed import seed_iso, user_data

log = logging.getLogger(__name__)

GUEST_AGENT_RETRY = 60.0
"""Seconds before a running VM's guest agent is asked again (27), after an answer or a refusal."""
GUEST_AGENT_TIMEOUT = 35.0
"""27 polls the agent for up to 30 s (truenas_pylibvirt guest_agent_command); a little more for the call."""


class VMBackend:
    family = "vm"

    @staticmethod
    def calls(version: tuple[int, ...]) -> Calls:
        """The VMs' calls and the cached bases' (bases.py: its snapshot and conversion methods by version)."""
        snapshots = "pool.snapshot" if version >= (25, 10) else "zfs.snapshot"
        return Calls(
            reads=(
                "vm.query",
                "vm.device.query",
                "pool.dataset.query",
                f"{snapshots}.query",
                "core.get_jobs",
                "lxc.config",
                "virt.global.config",
                *(("vm.get_guest_network_interfaces",) if version >= (27,) else ()),
            ),
            writes=(
                "vm.create",
                "vm.update",
                "vm.start",
                "vm.stop",
                "vm.poweroff",
                "vm.delete",
                "vm.device.create",
                "vm.device.update",
                "vm.device.delete",
                "vm.device.convert" if version >= (25, 10) else "vm.import_disk_image",
                "pool.dataset.create",
                "pool.dataset.update",
                "pool.dataset.delete",
                f"{snapshots}.create",
                f"{snapshots}.clone",
                f"{snapshots}.delete",
                "filesystem.put",
            ),
        )

    def __init__(
        self,
        transport: Transport,
        version: tuple[int, ...],
        image_server: str | ImageServer | ImageSource | None = None,
        arch: str = "amd64",
        may_write: Callable[[], bool] = lambda: True,
        observer: Observer | None = None,
    ) -> None:
        self.transport = transport
        self.version = version
        self.may_write = may_write
        """Whether this process may write to TrueNAS outside an action (the operator's Lease fence): the
        resync query's base collection asks it first."""
        grace = BASE_GRACE_SECONDS
        if isinstance(image_server, ImageSource):
            grace = image_server.base_grace_seconds
            image_server = image_server.server(arch)
        images = (
            image_server
            if isinstance(image_server, ImageServer)
            else ImageServer(image_server or DEFAULT_IMAGE_SERVER, arch)
        )
        self.bases = BaseImages(transport, version, images, observer)
        self.bases.base_grace_seconds = grace
        self._ids: dict[str, int] = {}
        self._names: dict[int, str] = {}
        self._pool: str | None = None
        self._restart_pending: dict[str, list[str]] = {}
        """Per running VM, the fields changed since it started (this process's memory only)."""
        self._addresses: dict[str, tuple[tuple[str, str], ...]] = {}
        """Per running VM, what its guest agent last reported (27); events carry no addresses."""
        self._agent_next: dict[str, float] = {}
        self.guest_agent_retry = GUEST_AGENT_RETRY
        self._next_collect = 0.0

    # ----- the cached bases (bases.py), as this backend's callers see them ----------------------------------
    @property
    def images(self) -> ImageServer:
        return self.bases.images

    @images.setter
    def images(self, server: ImageServer) -> None:
        self.bases.images = server

    @property
    def base_grace_seconds(self) -> float:
        return self.bases.base_grace_seconds

    @base_grace_seconds.setter
    def base_grace_seconds(self, seconds: float) -> None:
        self.bases.base_grace_seconds = seconds

    @property
    def convert_method(self) -> str:
        return self.bases.convert_method

    @property
    def snapshot_namespace(self) -> str:
        return self.bases.snapshot_namespace

    async def collect_bases(self, now: float) -> list[str]:
        return await self.bases.collect_bases(now)

    async def ensure_base(
        self, pool: str, image: VMImage, on_progress: Callable[[dict[str, Any]], None] | None = None
    ) -> str:
        return await self.bases.ensure_base(pool, image, on_progress)

    # ----- what this family can do ------------------------------------------------------------------
    def unsupported_fields(self, config: InstanceConfig, observed: ObservedInstance | None = None) -> list[str]:
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
        if config.wants_address and self.version < (27,) and not config.network_declared:
            unsupported.append("readiness.address")  # vm.* reports guest addresses from 27 (the guest agent)
        return unsupported

    def honoured(self, config: InstanceConfig, observed: ObservedInstance | None = None) -> InstanceConfig:
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
                    extra={
                        k: mac_for(self.version, v) if k == "mac" else v
                        for k, v in d.extra.items()
                        if k in ("parent", "mac") and v
                    },
                )
                for d in config.devices
                if d.type in SUPPORTED_DEVICES
            ),
        )

    device_identity = staticmethod(device_identity)

    def deferred_fields(self, config: InstanceConfig, observed: ObservedInstance | None) -> list[str]:
        """cloud-init reads the seed once: a later ``environment`` or ``cloudInit`` is never delivered. vm.update
        redefines nothing live: memory and vCPUs changed on a running VM apply at its next start. Both
        from the observation alone (its seed marks and pending changes), not this backend's memory."""
        if observed is None or observed.type != "VM":
            return []
        deferred = []
        if observed.seed is not None:
            env, cloud_init, network = seed_marks(config)
            if env != observed.seed[0]:
                deferred.append(f"environment ({FIRST_BOOT_ONLY})")
            if cloud_init != observed.seed[1]:
                # Which part changed, where the seed's own network mark says (a VM made before it: either).
                moved = len(observed.seed) < 3 or network != observed.seed[2]
                field = "nics[].addresses" if config.network_declared and moved else "cloudInit"
                deferred.append(f"{field} ({FIRST_BOOT_ONLY})")
        if observed.status == InstanceStatus.RUNNING:
            deferred += [f"{field} ({NEXT_START})" for field in observed.pending]
        return deferred

    # ----- bookkeeping -------------------------------------------------------------------------------------
    def _remember(self, entry: dict[str, Any]) -> ObservedInstance:
        name = instance_name(entry["name"])
        self._ids[name] = entry["id"]
        self._names[entry["id"]] = name
        marks = SEED_MARK.search(str(entry.get("description") or ""))
        running = (entry.get("status") or {}).get("state") == "RUNNING"
        if not running:
            self._restart_pending.pop(name, None)  # the next start takes them
            self._addresses.pop(name, None)
            self._agent_next.pop(name, None)  # the next start asks the agent at the first read
        return replace(
            observed(entry),
            addresses=tuple(a for a, _ in self._addresses.get(name, ())) if running else (),
            interfaces=tuple(p for p in self._addresses.get(name, ()) if p[1]) if running else (),
            seed=tuple(m for m in marks.groups() if m is not None) if marks is not None else None,
            pending=tuple(self._restart_pending.get(name, ())),
        )

    async def _ask_guest_agent(self, entry: dict[str, Any]) -> None:
        """27: a running VM's addresses as its QEMU guest agent sees them (``vm.get_guest_network_interfaces``,
        VM_READ), at most once per ``guest_agent_retry`` per VM. No agent in the guest (most cloud images
        lack qemu-guest-agent) or one not up yet is CallFailed: no addresses until it answers; an agent that
        stops answering keeps the last ones until the VM stops."""
        if self.version < (27,) or (entry.get("status") or {}).get("state") != "RUNNING":
            return
        name = instance_name(entry["name"])
        now = time.monotonic()
        if now < self._agent_next.get(name, 0.0):
            return
        self._agent_next[name] = now + self.guest_agent_retry
        try:
            interfaces = await self.transport.call(
                "vm.get_guest_network_interfaces", entry["id"], timeout=GUEST_AGENT_TIMEOUT
            )
        except (CallFailed, NotAuthorized, CallTimeout) as exc:
            log.debug("no guest addresses for %s: %s", entry["name"], exc)
            return
        self._addresses[name] = guest_interfaces(interfaces)

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
        for entry in entries:
            await self._ask_guest_agent(entry)
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

    async def get_instance(self, name: str) -> ObservedInstance | None:
        entry = await self._entry(name)
        if entry is None:
            self._forget(name)
            return None
        await self._ask_guest_agent(entry)
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
        if config.source is not None:
            origin = await self._clone_origin(config)
            return await self._build(config, name, existing, origin.split("/")[0], origin, f"clone of {origin}")
        if not config.image:
            raise ValidationFailed([FieldError("image", "an image or a source is needed", errno.EINVAL)], "vm.create")
        pool = await self.pool(config.storage_pool)
        image = await self.images.resolve(config.image)
        with self.bases.using(f"{pool}/{ROOT}/images/{dataset_key(image)}@base"):
            base = await self.bases.ensure_base(pool, image, on_progress)
            return await self._build(config, name, existing, pool, base, f"{image.product} {image.version}")

    async def _clone_origin(self, config: InstanceConfig) -> str:
        """The root volume's snapshot ``config.source`` names (``<pool>/incus-operator/vms/<vm>/root@<name>``),
        once TrueNAS lists it; the clone lives on that pool (ZFS clones never cross pools)."""
        source = config.source
        assert source is not None
        found = []
        snapshots = Snapshots(self.transport, self.version)
        for home in await self._homes(source.instance):
            listed = await snapshots.of(SnapshotTarget(home, recursive=True))
            # The operator's snapshot for that very IncusInstanceSnapshot (its UID in the owner property);
            # one of the same name without it is someone else's, never cloned.
            if any(s.name == source.snapshot and s.owner == source.owner and source.owner for s in listed):
                found.append(f"{home}/root@{source.snapshot}")
        if not found:
            raise NotFound(
                [FieldError("source", f"the snapshot {source.snapshot} of {source.instance!r} is gone", errno.ENOENT)],
                f"{self.snapshot_namespace}.clone",
            )
        if len(found) > 1:
            raise ValidationFailed(
                [FieldError("source", f"the snapshot is on more than one pool ({', '.join(found)})", errno.EINVAL)],
                "vm.create",
            )
        origin = found[0]
        pool = origin.split("/")[0]
        if config.storage_pool and config.storage_pool != pool:
            raise ValidationFailed(
                [
                    FieldError(
                        "storagePool",
                        f"a clone lives on its snapshot's pool ({pool}), not {config.storage_pool}: leave "
                        "spec.storagePool out or set it to that pool",
                        errno.EINVAL,
                    )
                ],
                "vm.create",
            )
        return origin

    async def _build(
        self,
        config: InstanceConfig,
        name: str,
        existing: dict[str, Any] | None,
        pool: str,
        base: str,
        made_of: str,
    ) -> ObservedInstance:
        """``base``: the snapshot the root disk is cloned from (a cached base's ``@base``, or the snapshot
        of a clone's source); ``made_of``: what the description says it is."""
        home = f"{pool}/{ROOT}/vms/{name}"
        if existing is not None:
            return await self._complete(existing, home, base, config)
        await self.bases.refuse_foreign_root(home, base)  # before the try: what it refuses is not ours to discard
        try:
            root = await self.bases.root_disk(home, base, config.root_disk_size)
            seed = await self._seed(home, config)
            entry = await self._create_vm(config, name, made_of)
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
        created = await self._entry(config.name)
        return self._remember(created or entry)

    async def _complete(self, entry: dict[str, Any], home: str, base: str, config: InstanceConfig) -> ObservedInstance:
        """Attaches what a half-built VM lacks: the root disk (cloned if missing), the seed, the NICs."""
        devices = [d.get("attributes") or {} for d in entry.get("devices") or []]
        paths = {str(a.get("path")) for a in devices if a.get("path")}
        nics = {nic_key(a.get("nic_attach")) for a in devices if a.get("dtype") == "NIC"}
        root = await self.bases.root_disk(home, base, config.root_disk_size)
        if root not in paths:
            await self.transport.call(
                "vm.device.create", {"vm": entry["id"], "attributes": {"dtype": "DISK", "path": root, "type": "VIRTIO"}}
            )
        seed = f"/mnt/{home}/seed.iso"
        if seed not in paths:  # never attached, so never read: (re)written from the spec
            await self._seed(home, config)
            marked = SEED_MARK.sub(seed_mark_text(config), entry.get("description") or "")
            await self.transport.call("vm.update", entry["id"], {"description": marked})
            await self.transport.call(
                "vm.device.create", {"vm": entry["id"], "attributes": {"dtype": "CDROM", "path": seed}}
            )
        for device in config.devices:
            if device.type == "NIC" and nic_key(device.extra.get("parent")) not in nics:
                await self.transport.call(
                    "vm.device.create", {"vm": entry["id"], "attributes": nic_attributes(device, self.version)}
                )
        log.info("completed the half-built VM %s (root disk, seed, NICs)", entry["name"])
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
                    await self.bases.delete_dataset(dataset)
        except TrueNASError as exc:
            log.warning("could not remove what the create of %s left behind: %s", name, exc)

    async def _homes(self, name: str) -> list[str]:
        """``<pool>/incus-operator/vms/<vm>`` on every pool (a half-built VM's devices do not name its pool)."""
        suffix = f"/{ROOT}/vms/{vm_name(name)}"
        entries = await self.transport.call("pool.dataset.query", [["id", "$", suffix]], {}, idempotent=True)
        if not isinstance(entries, list):
            raise MalformedAnswer("pool.dataset.query: the answer is not a list")
        ids = [str(e.get("id")) for e in entries if isinstance(e, dict)]
        return [i for i in ids if i.endswith(suffix) and i.count("/") == 3]

    async def snapshot_target(self, name: str) -> SnapshotTarget | None:
        """The VM's home, recursively: its root volume and its seed, in one transaction group."""
        if await self._entry(name) is None:
            return None
        homes = await self._homes(name)
        return SnapshotTarget(homes[0], recursive=True) if homes else None

    async def discard_unfinished(self, name: str) -> None:
        if await self._entry(name) is None:
            await self._discard_home(name)

    async def _create_vm(self, config: InstanceConfig, name: str, made_of: str) -> dict[str, Any]:
        memory = config.memory if config.memory is not None else DEFAULT_MEMORY
        payload = {
            "name": name,
            "description": description(config, made_of),
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
                await self.transport.call(
                    "vm.device.create", {"vm": ident, "attributes": nic_attributes(device, self.version)}
                )

    # ----- the seed ------------------------------------------------------------------------------------------
    async def _seed(self, home: str, config: InstanceConfig) -> str:
        path = f"/mnt/{home}/seed.iso"
        data = seed_iso(
            instance_id=f"{config.name}",
            hostname=config.name,
            user=user_data(config.environment, config.cloud_init_user_data),
            network=config.cloud_init_network_config,
        )
        await self.transport.upload(path, data, mode=FILE_MODE)
        return path

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
        # ``changes.environment``: cloud-init read the seed at first boot; a later environment is not
        # delivered (deferred_fields says so from the seed's mark), and the planner never asks for it.
        if not payload:
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
        homes = await self._homes(name)
        for home in homes:
            clones = await self.bases.clones_of(home)
            if clones:  # before anything goes: the VM stays whole until its clones are gone
                raise CallFailed(
                    f"VM {vm_name(name)} was not deleted: {', '.join(clones)} "
                    f"{'is a clone' if len(clones) == 1 else 'are clones'} of its snapshots; delete "
                    f"{'it' if len(clones) == 1 else 'them'} first (the operator never destroys or promotes "
                    "another instance's disk)",
                    errno=errno.EBUSY,
                    method="vm.delete",
                )
        entry = await self._entry(name)
        if entry is not None:
            if (entry.get("status") or {}).get("state") in ("RUNNING", "SUSPENDED"):
                await self.transport.call("vm.poweroff", entry["id"])
            await self.transport.call("vm.delete", entry["id"], {"zvols": False, "force": False})
        for home in homes:
            await self.bases.delete_dataset(home)
        self._forget(name)

    async def start(self, name: str, overcommit: bool = False) -> None:
        ident = await self._id(name)
        try:
            await self.transport.call("vm.start", ident, *([{"overcommit": True}] if overcommit else []))
        except CallFailed as exc:
            if exc.errno != errno.ENOMEM:
                raise
            raise InsufficientMemory(
                f"TrueNAS: {exc.message}. vm.start promises a VM its memory only when it fits in 90% of the NAS's "
                "available memory plus the ZFS cache above its minimum, less what running VMs were promised "
                "(`truenas-incus-operator doctor` shows what a VM can get). Stop another VM, lower spec.memory, "
                "or set spec.memoryOvercommit: true (the administrator's policy must allow it): TrueNAS then "
                "shrinks the ZFS cache and starts the VM without the guarantee",
                exc.errno,
                exc.method,
            ) from None

    async def stop(self, name: str, timeout: int | None = None, force: bool = False) -> None:
        # vm.stop has no timeout: the VM's shutdown_timeout (5..300 s) applies, then force_after_timeout.
        ident = await self._id(name)
        if timeout is not None and not force:
            await self.transport.call("vm.update", ident, {"shutdown_timeout": min(300, max(5, timeout))})
        options = {"force": True} if force or timeout == 0 else {"force_after_timeout": True}
        await self.transport.call_job("vm.stop", ident, options)

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
            "vm.device.create", {"vm": await self._id(name), "attributes": nic_attributes(device, self.version)}
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
        await self.transport.call("vm.device.update", ident, {"attributes": nic_attributes(device, self.version)})

    async def delete_device(self, name: str, device_name: str) -> None:
        await self.transport.call("vm.device.delete", await self._device_id(name, device_name))

    # ----- events ---------------------------------------------------------------------------------------------
    def instance_from_event(self, fields: dict[str, Any]) -> ObservedInstance | None:
        state = (fields.get("status") or {}).get("state")
        # 25.10's libvirt events overwrite status.state with libvirt names (SHUTOFF, ...): not a full entry.
        if {"id", "name", "memory", "status"} <= fields.keys() and state in STATUS:
            return self._remember(fields)
        return None

    async def watch(self, callback: InstanceEventCallback) -> None:
        if not self.transport.supports_events:
            return

        def relay(msg: str, ident: Any, fields: dict[str, Any] | None) -> None:
            name = self._names.get(ident)
            if fields and fields.get("name"):
                name = instance_name(str(fields["name"]))
            if name is not None:
                callback(msg, name, fields)

        await self.transport.subscribe("vm.query", relay)
