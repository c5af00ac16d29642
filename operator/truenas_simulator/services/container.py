"""TrueNAS 26 and 27 ``container.*`` (LXC through libvirt), ``container.device.*``, ``container.image.*``
and ``lxc.config``, as truenas-vm-container.md §3-§6 describes them (27: ``container.delete`` is a job
with ``{force, recursive}``); and the boot-time migration from 25.x Incus containers (§3.7) behind the
simulator's upgrade knob."""

from __future__ import annotations

import errno
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from ..context import CallContext, Middleware
from ..errors import CallError, ValidationErrors
from ..jobs import Job
from ..state import Image, Instance
from ..validation import load_schema, validated
from .base import GuestService, Methods
from .storage import StorageService

HOSTNAME = re.compile(
    r"(?i)^(?!\d{1,3}(\.\d{1,3}){3}$)(?=.{1,100}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)*[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"
)
HOSTNAME_MESSAGE = (
    "Name must be a valid hostname (up to 100 characters total): 1-63 characters per label, only letters, digits, "
    "and hyphens within each label, labels separated by dots, and must not be an IPv4 address."
)
BRIDGE = "truenasbr0"
CREATE_FIELDS = (
    "description", "cpuset", "autostart", "time", "shutdown_timeout", "init", "initdir", "initenv",
    "inituser", "initgroup", "idmap", "capabilities_policy", "capabilities_state",
)  # fmt: skip


def registry_name(image: Image, arch: str = "amd64") -> str:
    """The simplestreams product key TrueNAS 26 lists for an image: ``os:release:arch:variant``."""
    return f"{image.alias.split('/')[0]}:{image.release}:{arch}:{image.variant}"


def previous_serial(serial: str) -> str:
    return serial.replace("_05:24", "_04:11") if "_05:24" in serial else serial + "-old"


@dataclass
class Container:
    id: int
    name: str
    image: str
    version: str
    pool: str = "tank"
    uuid: str = field(default_factory=lambda: str(uuid.uuid4()))
    description: str = ""
    cpuset: str | None = None
    autostart: bool = True
    time: str = "LOCAL"
    shutdown_timeout: int = 90
    init: str = "/sbin/init"
    initdir: str | None = None
    initenv: dict[str, str] = field(default_factory=dict)
    inituser: str | None = None
    initgroup: str | None = None
    idmap: dict[str, Any] | None = field(default_factory=lambda: {"type": "DEFAULT"})
    capabilities_policy: str = "DEFAULT"
    capabilities_state: dict[str, bool] = field(default_factory=dict)
    state: str = "STOPPED"
    pid: int | None = None
    devices: dict[int, dict[str, Any]] = field(default_factory=dict)
    ignores_shutdown: bool = False

    def device_entry(self, ident: int) -> dict[str, Any]:
        return {"id": ident, "attributes": dict(self.devices[ident]), "container": self.id}

    def entry(self) -> dict[str, Any]:
        has_nic = any(d.get("dtype") == "NIC" for d in self.devices.values())
        return {
            "id": self.id,
            "uuid": self.uuid,
            "name": self.name,
            "description": self.description,
            "devices": [self.device_entry(i) for i in self.devices],
            "cpuset": self.cpuset,
            "autostart": self.autostart,
            "time": self.time,
            "shutdown_timeout": self.shutdown_timeout,
            "dataset": f"{self.pool}/.truenas_containers/containers/{self.name}",
            "init": self.init,
            "initdir": self.initdir,
            "initenv": dict(self.initenv),
            "inituser": self.inituser,
            "initgroup": self.initgroup,
            "idmap": self.idmap,
            "capabilities_policy": self.capabilities_policy,
            "capabilities_state": dict(self.capabilities_state),
            "default_network": None if has_nic else BRIDGE,
            "status": {
                "state": self.state,
                "pid": self.pid,
                "domain_state": self.state if self.state == "RUNNING" else ("SHUTOFF" if self.pid is None else None),
            },
        }


class ContainerService(GuestService[Container]):
    COLLECTION = "container.query"
    DEVICE_COLLECTION = "container.device.query"
    VERBOSE_NAME = "Container"
    DEVICE_VERBOSE_NAME = "Container Device"
    KIND = "CONTAINER"
    ACTIVE_STATES = ("RUNNING",)
    FIRST_PID = 4000

    def __init__(self, mw: Middleware, storage: StorageService) -> None:
        super().__init__(mw)
        self.storage = storage

    def running_on(self, dataset: str) -> str | None:
        for container in self.containers.values():
            if container.state == "RUNNING" and container.entry()["dataset"] == dataset:
                return container.name
        return None

    def methods(self) -> Methods:
        plain = {
            "container.query": self.query,
            "container.get_instance": self.get_instance,
            "container.update": self.update,
            "container.start": self.start,
            "container.device.query": self.device_query,
            "container.device.create": self.device_create,
            "container.device.update": self.device_update,
            "container.device.delete": self.device_delete,
            "container.image.query_registry": self.query_registry,
            "lxc.config": self.lxc_config,
        }
        return {
            "container.create": (self.create, True),
            "container.stop": (self.stop, True),
            "container.delete": (self.delete_job, True) if self.mw.profile.api27 else (self.delete, False),
            **{name: (handler, False) for name, handler in plain.items()},
        }

    @property
    def containers(self) -> dict[int, Container]:
        return self.guests

    def entry(self, guest: Container) -> dict[str, Any]:
        return guest.entry()

    # ----- helpers ----------------------------------------------------------------------------------
    def registry(self) -> dict[str, list[str]]:
        return {
            registry_name(i): [previous_serial(i.serial), i.serial]
            for i in self.mw.images.values()
            if "CONTAINER" in i.instance_types
        }

    @property
    def schema(self) -> str:
        """``v26_0_0`` on 26, ``v27_0_0`` on 27."""
        return self.mw.profile.schema_version

    def _validated(self, kind: str, value: Any, attribute: str) -> Any:
        return validated(load_schema(f"{self.schema}.{kind}"), value, attribute)

    # ----- reads ------------------------------------------------------------------------------------------
    def query_registry(self, ctx: CallContext, params: list[Any]) -> Any:
        return [
            {"name": name, "versions": [{"version": v} for v in versions]} for name, versions in self.registry().items()
        ]

    def lxc_config(self, ctx: CallContext, params: list[Any]) -> Any:
        return {
            "id": 1,
            "preferred_pool": self.mw.global_config.pool,
            "bridge": None,
            "v4_network": "172.200.0.0/24",
            "v6_network": "fd42:4c58:43ae::/64",
        }

    # ----- create / update / delete ----------------------------------------------------------------------
    def create(self, ctx: CallContext, params: list[Any]) -> Job:
        raw = self.lock_argument(params)

        async def body(job: Job) -> Any:
            data = self._validated("container.create.args", raw, "container_create")
            errors = ValidationErrors()
            name = data["name"]
            if self.by_name(name) is not None:
                errors.add("container_create.name", "A container with this name already exists.", errno.EEXIST)
            elif not HOSTNAME.match(name):
                errors.add("container_create.name", HOSTNAME_MESSAGE)
            pool = data.get("pool") or self.mw.global_config.pool
            if pool is None:
                errors.add(
                    "container_create.pool", "Either configure a preferred pool in lxc settings or provide a pool name."
                )
            elif pool not in self.mw.global_config.storage_pools:
                errors.add("container_create.pool", "Pool not found.")
            errors.check()
            versions = self.registry().get(data["image"]["name"])
            if versions is None:
                raise ValidationErrors(
                    [("container_create.image.name", "Image does not exist in the registry.", errno.EINVAL)]
                )
            if data["image"]["version"] not in versions:
                raise ValidationErrors(
                    [("container_create.image.version", "Version does not exist in the registry.", errno.EINVAL)]
                )
            job.set_progress(0, "Downloading image")
            await self.work(job, "Downloading image")
            if self.by_name(name) is not None:
                raise ValidationErrors(
                    [("container_create.name", "A container with this name already exists.", errno.EEXIST)]
                )
            container = Container(
                id=self.next_id,
                name=name,
                image=data["image"]["name"],
                version=data["image"]["version"],
                pool=pool or "tank",
                **{k: data[k] for k in CREATE_FIELDS if k in data},
            )
            if data.get("uuid"):
                container.uuid = data["uuid"]
            self.next_id += 1
            self.containers[container.id] = container
            # plugins/container/container.py do_create: <pool>/.truenas_containers/containers/<name>, a
            # clone of the image's snapshot (the image datasets are not modelled) [SRC]
            self.storage.ensure_tree(container.entry()["dataset"])
            self.emit("added", container)
            return container.entry()

        return self.submit(ctx, "container.create", params, body, lock=f"container_create:{raw.get('name')}")

    def update(self, ctx: CallContext, params: list[Any]) -> Any:
        container = self.get(params[0] if params else None)
        data = self._validated("container.update.args", params[1] if len(params) > 1 else {}, "container_update")
        if "name" in data and data["name"] != container.name:
            if container.state == "RUNNING":
                raise CallError("Container must be stopped before renaming.")
            if self.by_name(data["name"]) is not None:
                raise ValidationErrors(
                    [("container_update.name", "A container with this name already exists.", errno.EEXIST)]
                )
        cpuset = data.get("cpuset")
        if isinstance(cpuset, str):
            if "_" in cpuset:
                raise ValidationErrors(
                    [("container_update.cpuset", "Underscores are not allowed in CPU set values", 22)]
                )
            if not re.match(r"^\d+(-\d+)?(,\d+(-\d+)?)*$", cpuset):
                raise ValidationErrors([("container_update.cpuset", f"Invalid cpuset format: {cpuset}", 22)])
        before = container.entry()["dataset"]
        for key, value in data.items():
            setattr(container, key, value)
        if container.entry()["dataset"] != before and before in self.storage.datasets:
            self.storage.rename_tree(before, container.entry()["dataset"])  # do_update: zfs.resource.rename [SRC]
        self.emit("changed", container)
        return container.entry()

    def delete(self, ctx: CallContext, params: list[Any]) -> Any:
        container = self.get(params[0] if params else None)
        del self.containers[container.id]
        self.emit("removed", container.id)
        # do_delete: the container leaves the database and libvirt first, then its dataset goes through
        # zfs.resource.destroy_impl, not recursively (plugins/container/container.py, zfs/resource_crud.py):
        # a dataset with snapshots stays behind and the call fails [SRC]
        dataset = container.entry()["dataset"]
        if dataset in self.storage.datasets:
            if any(n.startswith(f"{dataset}/") for n in self.storage.datasets):
                message = f"{dataset!r} has children. Set recursive=True to remove them."
                raise ValidationErrors([("zfs.resource.destroy", message, errno.ENOTEMPTY)])
            if self.storage.snaps.of(dataset):
                message = f"{dataset!r} has snapshots. Set recursive=True to remove them."
                raise ValidationErrors([("zfs.resource.destroy", message, errno.ENOTEMPTY)])
            self.storage.drop_tree(dataset)
        return None

    def delete_job(self, ctx: CallContext, params: list[Any]) -> Job:
        """27 ``container.delete [id, {force=false, recursive=false}]``: a job (lock ``container_delete:<id>``,
        plugins/container/__init__.py) that refuses an active container without ``force`` and a dataset
        with child datasets or snapshots without ``recursive`` (plugins/container/crud.py do_delete)."""
        ident = params[0] if params else None
        options = params[1] if len(params) > 1 else {}
        if not isinstance(options, dict):
            raise ValidationErrors(
                [("options", "Input should be a valid dictionary or instance of ContainerDeleteOptions", 22)]
            )
        errors = ValidationErrors()
        for key, value in options.items():
            if key not in ("force", "recursive"):
                errors.add(f"options.{key}", "Extra inputs are not permitted")
            elif not isinstance(value, bool):
                errors.add(f"options.{key}", "Input should be a valid boolean")
        errors.check()

        async def body(job: Job) -> Any:
            container = self.get(ident)
            if container.state in ("RUNNING", "SUSPENDED") and not options.get("force"):
                raise ValidationErrors(
                    [
                        (
                            "container_delete.force",
                            f"Container {container.name!r} is {container.state.lower()}. Stop it first, "
                            "or pass force=True to stop and delete it.",
                            errno.EBUSY,
                        )
                    ]
                )
            dataset = container.entry()["dataset"]
            storage = self.storage
            children = [d for d in storage.datasets if d.startswith(f"{dataset}/")]
            snapshots = storage.snaps.of(dataset)
            if not options.get("recursive"):
                if children:
                    raise ValidationErrors(
                        [
                            (
                                "container_delete.recursive",
                                f"Container {container.name!r} dataset {dataset!r} has child datasets. "
                                "Set `recursive` to delete the container together with them.",
                                errno.ENOTEMPTY,
                            )
                        ]
                    )
                if snapshots:
                    raise ValidationErrors(
                        [
                            (
                                "container_delete.recursive",
                                f"Container {container.name!r} dataset {dataset!r} has {len(snapshots)} snapshot(s). "
                                "Set `recursive` to delete the container together with them.",
                                errno.ENOTEMPTY,
                            )
                        ]
                    )
            if dataset in storage.datasets:
                # destroy_impl(recursive=True): the children, snapshots and their clones wherever they live
                for name in storage.with_clones([dataset, *children]):
                    storage.drop_tree(name)
            container.state, container.pid = "STOPPED", None  # the domain is destroyed first
            del self.containers[container.id]
            self.emit("removed", container.id)
            return None

        return self.submit(ctx, "container.delete", params, body, lock=f"container_delete:{ident}")

    # ----- power -------------------------------------------------------------------------------------------
    def start(self, ctx: CallContext, params: list[Any]) -> Any:
        container = self.get(params[0] if params else None)
        if container.state == "RUNNING":
            raise CallError(f"Domain '{container.name}' is already started (<DomainState.RUNNING: 'RUNNING'>).")
        self.set_state(container, "RUNNING")
        return None

    def stop(self, ctx: CallContext, params: list[Any]) -> Job:
        ident = params[0] if params else None

        async def body(job: Job) -> Any:
            data = self._validated(
                "container.stop.args", {"id": ident, "options": params[1] if len(params) > 1 else {}}, ""
            )
            container = self.get(data["id"])
            options = data["options"]
            if container.state != "RUNNING":
                raise CallError(f"Domain '{container.name}' is not active")
            await self.work(job, "Stopping")
            if container.ignores_shutdown and not options["force"] and not options["force_after_timeout"]:
                return None  # succeeds after shutdown_timeout although the guest is still up (§7.5)
            self.set_state(container, "STOPPED")
            return None

        return self.submit(ctx, "container.stop", params, body, lock=f"container_stop_{ident}")

    # ----- devices -------------------------------------------------------------------------------------------
    def _device_attributes(self, raw: Any, attribute: str, container: Container, exclude: int | None) -> dict[str, Any]:
        schema = load_schema(f"{self.schema}.container.device.entry")["properties"]["attributes"]
        result = validated(schema, raw, attribute)
        if result["dtype"] == "FILESYSTEM":
            problems = ValidationErrors()
            source, target = result["source"], result["target"]
            if not any(source.startswith(f"/mnt/{pool}/") for pool in self.mw.global_config.storage_pools):
                problems.add(f"{attribute}.path", "The path must reside within a pool mount point")
            if not target.startswith("/") or target == "/":
                problems.add(f"{attribute}.target", "Target must be an absolute path other than /")
            for ident, other in container.devices.items():
                if ident != exclude and other.get("dtype") == "FILESYSTEM" and other.get("target") == target:
                    problems.add(f"{attribute}.target", f"{container.name} has '{target}' target already configured")
            problems.check()
        if result["dtype"] == "NIC" and result.get("mac") is None:
            result["mac"] = f"00:a0:98:{container.id % 256:02x}:{self.next_device_id % 256:02x}:10"
        return dict(result)

    def device_create(self, ctx: CallContext, params: list[Any]) -> Any:
        data = params[0] if params else None
        if not isinstance(data, dict) or set(data) - {"container", "attributes"}:
            raise ValidationErrors(
                [("container_device_create", "Input should be a valid dictionary with container and attributes", 22)]
            )
        container = self.get(data.get("container"))
        attributes = self._device_attributes(
            data.get("attributes"), "container_device_create.attributes", container, None
        )
        ident = self.new_device_id()
        container.devices[ident] = attributes
        return self.emit_device("added", container, ident)

    def device_update(self, ctx: CallContext, params: list[Any]) -> Any:
        ident = params[0] if params else None
        container = self.device_owner(ident)
        assert isinstance(ident, int)
        data = params[1] if len(params) > 1 else {}
        raw = {**container.devices[ident], **(data.get("attributes") or {})} if isinstance(data, dict) else data
        if (
            self.mw.profile.api27
            and isinstance(raw, dict)
            and raw.get("dtype") != container.devices[ident].get("dtype")
        ):
            # 27 plugins/container/container_device_crud.py _validate_device
            raise ValidationErrors([("attributes.dtype", "Device type cannot be changed", errno.EINVAL)])
        container.devices[ident] = self._device_attributes(raw, "container_device_update.attributes", container, ident)
        return self.emit_device("changed", container, ident)

    def device_delete(self, ctx: CallContext, params: list[Any]) -> Any:
        ident = params[0] if params else None
        container = self.device_owner(ident)
        self.check_device_removable(container)
        assert isinstance(ident, int)
        del container.devices[ident]
        self.mw.events.emit(self.DEVICE_COLLECTION, "removed", ident)
        return True

    # ----- migration (the upgrade knob) -----------------------------------------------------------------
    def migrate(self, legacy: dict[str, Instance]) -> list[str]:
        """What 26's boot-time ``container.migrate`` does with 25.x Incus containers; returns log lines."""
        log = []
        for instance in legacy.values():
            if instance.type != "CONTAINER":
                log.append(f"{instance.name}: Incus VM, not migrated")
                continue
            if self.by_name(instance.name) is not None:
                log.append(f"{instance.name}: name clash, skipped")
                continue
            container = Container(
                id=self.next_id,
                name=instance.name,
                image=registry_name(instance.image),
                version=instance.image.serial,
                pool=instance.storage_pool,
                autostart=instance.autostart,
                cpuset=instance.cpu,  # copied verbatim: a count becomes a pin (§3.7)
            )
            self.next_id += 1
            for device in instance.devices.values():
                kind = device.get("dev_type")
                if kind == "DISK" and str(device.get("source") or "").startswith("/mnt"):
                    container.devices[self.next_device_id] = {
                        "dtype": "FILESYSTEM",
                        "source": device["source"],
                        "target": device.get("destination"),
                    }
                elif kind == "NIC" and device.get("parent") in self.mw.host_interfaces:
                    container.devices[self.next_device_id] = {
                        "dtype": "NIC", "nic_attach": device["parent"], "type": "VIRTIO",
                        "mac": device.get("mac") or f"00:16:3e:00:00:{self.next_device_id % 256:02x}",
                        "trust_guest_rx_filters": False,
                    }  # fmt: skip
                else:
                    log.append(f"{instance.name}: device {device.get('name')} ({kind}) skipped")
                    continue
                self.next_device_id += 1
            if instance.autostart:
                container.state = "RUNNING"  # start_on_boot
                self.pid += 1
                container.pid = self.pid
            self.containers[container.id] = container
            log.append(f"{instance.name}: migrated as container {container.id}")
        return log
