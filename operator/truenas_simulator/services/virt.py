"""``virt.instance.*`` and ``virt.global.*`` as TrueNAS 25.04/25.10 implement them (truenas-api.md §3-§5)."""

from __future__ import annotations

import asyncio
import errno
import re
from typing import Any

from ..context import CallContext, Handler, Middleware
from ..errors import CallError, InstanceNotFound, ValidationErrors
from ..filters import check_query_args, filter_list
from ..jobs import Job
from ..state import MIB, Instance
from ..validation import load_schema, validate, validated
from .base import Methods, Service
from .storage import StorageService

INCUS_NAME = re.compile(r"^[A-Za-z](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")
VERBOSE_NAME = "VirtInstance"
GENERATED_PREFIX = {
    "DISK": "disk",
    "NIC": "eth",
    "PROXY": "proxy",
    "TPM": "tpm",
    "USB": "usb",
    "GPU": "gpu",
    "PCI": "pci",
    "CDROM": "ix_cdrom",
}


def incus_name_error(name: str) -> str | None:
    """The Incus hostname check, with Incus's wording."""
    if not 1 <= len(name) <= 63:
        return "Name must be 1-63 characters long"
    if name.startswith("-"):
        return 'Name must not start with "-" character'
    if name.endswith("-"):
        return 'Name must not end with "-" character'
    if name[0].isdigit():
        return "Name must not start with a number"
    if not INCUS_NAME.match(name):
        return "Name can only contain alphanumeric and hyphen characters"
    return None


class VirtService(Service):
    def __init__(self, mw: Middleware, storage: StorageService) -> None:
        super().__init__(mw)
        self.storage = storage

    @staticmethod
    def datasets_of(instance: Instance) -> list[str]:
        """Incus's ZFS storage driver on the virt pool's ``.ix-virt`` (plugins/virt/global.py names it):
        a container's root filesystem; a VM's configuration filesystem and its ``.block`` volume."""
        root = f"{instance.storage_pool}/.ix-virt"
        if instance.type == "VM":
            return [f"{root}/virtual-machines/{instance.name}", f"{root}/virtual-machines/{instance.name}.block"]
        return [f"{root}/containers/{instance.name}"]

    def running_on(self, dataset: str) -> str | None:
        for instance in self.instances.values():
            if instance.status == "RUNNING" and dataset in self.datasets_of(instance):
                return instance.name
        return None

    def methods(self) -> Methods:
        jobs: dict[str, Handler] = {
            "virt.instance.create": self.create,
            "virt.instance.update": self.update,
            "virt.instance.delete": self.delete,
            "virt.instance.start": self.start,
            "virt.instance.stop": self.stop,
            "virt.instance.restart": self.restart,
        }
        plain: dict[str, Handler] = {
            "virt.instance.query": self.query,
            "virt.instance.get_instance": self.get_instance,
            "virt.instance.image_choices": self.image_choices,
            "virt.instance.device_list": self.device_list,
            "virt.instance.device_add": self.device_add,
            "virt.instance.device_update": self.device_update,
            "virt.instance.device_delete": self.device_delete,
            "virt.global.config": self.global_config,
        }
        if self.mw.profile.set_bootable_disk:
            plain["virt.instance.set_bootable_disk"] = self.set_bootable_disk
        return {
            **{name: (handler, True) for name, handler in jobs.items()},
            **{name: (handler, False) for name, handler in plain.items()},
        }

    # ----- helpers -------------------------------------------------------------------------
    @property
    def instances(self) -> dict[str, Instance]:
        return self.mw.instances

    def _schema(self, ctx: CallContext, kind: str) -> dict[str, Any]:
        return load_schema(f"{ctx.schema}.{kind}")

    def check_initialized(self) -> None:
        if self.mw.global_config.state != "INITIALIZED":
            raise CallError("Virtualization not initialized.")

    def get(self, ident: Any) -> Instance:
        instance = self.instances.get(ident) if isinstance(ident, str) else None
        if instance is None:
            raise InstanceNotFound(VERBOSE_NAME, ident)
        return instance

    def emit(self, msg: str, ident: str, fields: dict[str, Any] | None = None) -> None:
        self.mw.events.emit("virt.instance.query", msg, ident, fields)

    def set_status(self, instance: Instance, status: str) -> None:
        """A status change; only a finished Incus start/stop is announced, as TrueNAS's Incus
        listener does (plugins/virt/websocket.py): ``changed`` with ``{"status": RUNNING|STOPPED}``."""
        instance.status = status
        if status in ("RUNNING", "STOPPED"):
            self.emit("changed", instance.name, {"status": status})

    def _args(self, ctx: CallContext, schema_kind: str, value: Any, attribute: str) -> Any:
        if ctx.prevalidated:
            return value
        return validated(self._schema(ctx, schema_kind), value, attribute)

    # ----- reads -------------------------------------------------------------------------------
    def query(self, ctx: CallContext, params: list[Any]) -> Any:
        schema = ctx.schema if ctx is not None else self.mw.profile.schema_version  # tests call it bare
        filters, options = check_query_args(params, schema)
        if self.mw.global_config.state != "INITIALIZED" and not (options.get("extra") or {}).get("skip_state"):
            return filter_list([], filters, options)
        entries = [i.entry(self.mw.profile) for i in self.instances.values()]
        return filter_list(entries, filters, options)

    def get_instance(self, ctx: CallContext, params: list[Any]) -> Any:
        if not params:
            raise ValidationErrors([("id", "Field required", errno.EINVAL)])
        ident = params[0]
        entries = self.query(ctx, [[["id", "=", ident]], {}])
        if not entries:
            raise InstanceNotFound(VERBOSE_NAME, ident)
        return entries[0]

    def image_choices(self, ctx: CallContext, params: list[Any]) -> Any:
        return {
            image.alias: {
                "label": image.label,
                "os": image.os,
                "release": image.release,
                "archs": list(image.archs),
                "variant": image.variant,
                "instance_types": list(image.instance_types),
                "secureboot": image.secureboot,
            }
            for image in self.mw.images.values()
        }

    def global_config(self, ctx: CallContext, params: list[Any]) -> Any:
        return self.mw.global_config.entry()

    # ----- jobs ------------------------------------------------------------------------------
    def create(self, ctx: CallContext, params: list[Any]) -> Job:
        raw = self.lock_argument(params)

        async def body(job: Job) -> Any:
            data = self._args(ctx, "virt.instance.create.args", raw, "virt_instance_create")
            self.check_initialized()
            return await self._do_create(job, data)

        return self.submit(ctx, "virt.instance.create", params, body, lock=f"instance_action_{raw.get('name')}")

    async def _do_create(self, job: Job, data: dict[str, Any]) -> Any:
        profile = self.mw.profile
        errors = ValidationErrors()
        prefix = "virt_instance_create"
        name = data["name"]
        instance_type = data.get("instance_type") or "CONTAINER"
        pool = data.get("storage_pool") or self.mw.global_config.pool
        if data.get("storage_pool") and data["storage_pool"] not in self.mw.global_config.storage_pools:
            errors.add(f"{prefix}.storage_pool", "Not a valid ZFS pool")
        if name in self.instances:
            errors.add(f"{prefix}.name", f"Name {name!r} already exists")
        if data.get("secure_boot") and instance_type != "VM":
            errors.add(f"{prefix}.secure_boot", "Secure boot is only supported for VMs")
        self._check_limits(errors, prefix, data)
        if profile.vm_autostart_forbidden and instance_type == "VM" and data.get("autostart"):
            errors.add(f"{prefix}.autostart", "Autostart cannot be enabled for VM instances")
        devices = data.get("devices") or []
        self._validate_devices(errors, prefix, instance_type, devices, {})
        errors.check()

        incus_error = incus_name_error(name)
        if incus_error:
            raise CallError(f'Invalid instance name "{name}": {incus_error}')
        image = self.mw.images.get(data.get("image") or "")
        if image is None:
            raise CallError(
                f"Failed to create instance: Failed getting remote image info: Image not found: {data.get('image')}"
            )
        if instance_type not in image.instance_types:
            raise CallError(
                f"Failed to create instance: Image {image.alias!r} is not available for {instance_type} instances"
            )

        job.set_progress(0, "Downloading image")
        await self.work(job, "rootfs")
        named: dict[str, dict[str, Any]] = {}
        for device in devices:
            device = dict(device)
            device["name"] = device.get("name") or self._generate_name(device["dev_type"], named)
            self._device_to_incus(device)
            named[device["name"]] = device
        if name in self.instances:  # another create won the race while this one downloaded
            raise ValidationErrors([(f"{prefix}.name", f"Name {name!r} already exists", errno.EINVAL)])
        instance = Instance(
            name=name,
            type=instance_type,
            image=image,
            cpu=data.get("cpu"),
            memory=self._floor_mib(data.get("memory")),
            autostart=bool(data.get("autostart")) if data.get("autostart") is not None else False,
            environment=dict(data.get("environment") or {}),
            devices=named,
            storage_pool=pool or "tank",
            privileged_mode=bool(data.get("privileged_mode", False)),
            secure_boot=bool(data.get("secure_boot", False)),
            vnc_enabled=bool(data.get("enable_vnc", False)),
            vnc_port=data.get("vnc_port"),
            root_disk_size=(data.get("root_disk_size") or 10) * 2**30 if instance_type == "VM" else None,
            root_disk_io_bus=data.get("root_disk_io_bus") if instance_type == "VM" else None,
            leased=self.mw.knobs.dhcp,
        )
        self.instances[name] = instance
        for dataset in self.datasets_of(instance):
            volume = dataset.endswith(".block")
            self.storage.ensure_tree(
                dataset, "VOLUME" if volume else "FILESYSTEM", instance.root_disk_size if volume else None
            )
        if data.get("autostart"):
            await self._start(job, instance)
        entry = instance.entry(self.mw.profile)
        # The CRUD wrapper announces the instance only once do_create has returned, so after the
        # autostart (service/crud_service.py _get_crud_wrapper_func): its `changed` came first.
        self.emit("added", name, entry)
        return entry

    @staticmethod
    def _floor_mib(memory: int | None) -> int | None:
        return None if memory is None else (memory // MIB) * MIB

    def _check_limits(self, errors: ValidationErrors, prefix: str, data: dict[str, Any]) -> None:
        knobs = self.mw.knobs
        memory = data.get("memory")
        if isinstance(memory, int) and memory > knobs.host_memory:
            errors.add(f"{prefix}.memory", "Cannot reserve more than physical memory")
        cpu = data.get("cpu")
        if isinstance(cpu, str) and cpu.isdigit() and int(cpu) > knobs.host_cores:
            errors.add(f"{prefix}.cpu", "Cannot reserve more than system cores")

    def update(self, ctx: CallContext, params: list[Any]) -> Job:
        ident = params[0] if params else None
        raw = params[1] if len(params) > 1 else {}

        async def body(job: Job) -> Any:
            data = self._args(ctx, "virt.instance.update.args", raw, "virt_instance_update")
            self.check_initialized()
            instance = self.get(ident)
            errors = ValidationErrors()
            prefix = "virt_instance_update"
            self._check_limits(errors, prefix, data)
            vm = instance.type == "VM"
            if not vm and data.get("enable_vnc"):
                errors.add(f"{prefix}.enable_vnc", "This attribute is not supported for containers")
            if not vm and data.get("secure_boot"):
                errors.add(f"{prefix}.secure_boot", "Secure boot is only supported for VMs")
            if not vm and data.get("image_os") is not None:
                errors.add(f"{prefix}.image_os", "This attribute is only valid for VMs")
            if vm and (data.get("root_disk_size") is not None or data.get("root_disk_io_bus") is not None):
                if instance.status != "STOPPED":
                    errors.add(f"{prefix}.root_disk_size", "VM should be stopped before updating the root disk config")
                elif data.get("root_disk_size") is not None and data["root_disk_size"] * 2**30 <= (
                    instance.root_disk_size or 0
                ):
                    errors.add(
                        f"{prefix}.root_disk_size",
                        "Specified size if set should be greater than the current root disk size.",
                    )
            if self.mw.profile.vm_autostart_forbidden and vm and data.get("autostart"):
                errors.add(f"{prefix}.autostart", "Autostart cannot be enabled for VM instances")
            errors.check()
            await self.work(job)
            if "environment" in data:
                instance.environment = dict(data["environment"] or {})
            if "autostart" in data:
                instance.autostart = bool(data["autostart"])
            if "cpu" in data:
                instance.cpu = data["cpu"]
            if "memory" in data:
                instance.memory = self._floor_mib(data["memory"])
            if "privileged_mode" in data and not vm:
                instance.privileged_mode = bool(data["privileged_mode"])
            if vm and data.get("root_disk_size") is not None:
                instance.root_disk_size = data["root_disk_size"] * 2**30
            if vm and data.get("root_disk_io_bus") is not None:
                instance.root_disk_io_bus = data["root_disk_io_bus"]
            if vm and "secure_boot" in data:
                instance.secure_boot = bool(data["secure_boot"])
            entry = instance.entry(self.mw.profile)
            self.emit("changed", instance.name, entry)
            return entry

        return self.submit(ctx, "virt.instance.update", params, body, lock=f"instance_action_{ident}")

    def delete(self, ctx: CallContext, params: list[Any]) -> Job:
        ident = params[0] if params else None

        async def body(job: Job) -> Any:
            if not ctx.prevalidated and not isinstance(ident, str):
                raise ValidationErrors([("id", "Input should be a valid string", errno.EINVAL)])
            self.check_initialized()
            instance = self.get(ident)
            if instance.status != "STOPPED":
                await self._stop(job, instance, force=True, timeout=-1)
            await self.work(job)
            self.instances.pop(instance.name, None)
            for dataset in self.datasets_of(instance):  # Incus destroys its volumes with their snapshots [INF]
                self.storage.drop_tree(dataset)
            self.emit("removed", instance.name)
            return True

        return self.submit(ctx, "virt.instance.delete", params, body, lock=f"instance_action_{ident}")

    def start(self, ctx: CallContext, params: list[Any]) -> Job:
        ident = params[0] if params else None

        async def body(job: Job) -> Any:
            if not ctx.prevalidated and not isinstance(ident, str):
                raise ValidationErrors([("id", "Input should be a valid string", errno.EINVAL)])
            self.check_initialized()
            instance = self.get(ident)
            self._check_power_status(instance, "virt.instance.start.id", "started")
            await self._start(job, instance)
            return True

        return self.submit(ctx, "virt.instance.start", params, body, lock=f"instance_action_{ident}", logs=True)

    def _check_power_status(self, instance: Instance, attribute: str, verb: str) -> None:
        if self.mw.profile.name != "25.04.0" and instance.status not in ("RUNNING", "STOPPED"):
            raise ValidationErrors(
                [
                    (
                        attribute,
                        f"{instance.name}: instance may not be {verb} because current status is: {instance.status}",
                        22,
                    )
                ]
            )

    async def _start(self, job: Job, instance: Instance) -> None:
        if instance.status == "RUNNING":
            raise CallError("Failed to start instance: The instance is already running.")
        if self.mw.profile.transitional_statuses:
            self.set_status(instance, "STARTING")
        await self.work(job, "Starting")
        self.set_status(instance, "RUNNING")

    def _stop_args(self, ctx: CallContext, params: list[Any]) -> tuple[str, dict[str, Any]]:
        """Validates ``[id, stop_args]``; force=false with timeout=-1 is refused, as TrueNAS does."""
        raw_args = params[1] if len(params) > 1 else {}
        value: dict[str, Any] = {"id": params[0] if params else None, "stop_args": raw_args}
        if ctx.prevalidated:
            value["stop_args"] = {"timeout": -1, "force": False, **(raw_args or {})}
        else:
            value = self._args(ctx, "virt.instance.stop.args", value, "")
        stop_args: dict[str, Any] = value["stop_args"]
        if not stop_args["force"] and stop_args["timeout"] == -1:
            raise ValidationErrors([("", "Value error, Timeout should be set if force is disabled", errno.EINVAL)])
        return str(value["id"]), stop_args

    def stop(self, ctx: CallContext, params: list[Any]) -> Job:
        ident = params[0] if params else None

        async def body(job: Job) -> Any:
            name, stop_args = self._stop_args(ctx, params)
            if self.mw.global_config.state != "INITIALIZED":
                raise CallError("Virtualization service not started.")
            instance = self.instances.get(name)
            if instance is None:
                raise CallError("Failed to stop instance: Instance not found")
            if instance.status == "STOPPED":
                raise CallError("Failed to stop instance: The instance is already stopped")
            await self._stop(job, instance, force=stop_args["force"], timeout=stop_args["timeout"])
            return True

        return self.submit(ctx, "virt.instance.stop", params, body, lock=f"instance_action_{ident}")

    async def _stop(self, job: Job, instance: Instance, force: bool, timeout: int) -> None:
        if self.mw.profile.transitional_statuses:
            self.set_status(instance, "STOPPING")
        if instance.ignores_shutdown and not force:
            await asyncio.sleep(max(timeout, 0))
            instance.status = "RUNNING"  # a failed Incus stop task: the listener announces nothing
            raise CallError(
                'Failed to stop instance: Failed shutting down instance, status is "Running": context deadline exceeded'
            )
        await self.work(job, "Stopping")
        self.set_status(instance, "STOPPED")

    def restart(self, ctx: CallContext, params: list[Any]) -> Job:
        ident = params[0] if params else None

        async def body(job: Job) -> Any:
            name, stop_args = self._stop_args(ctx, params)
            self.check_initialized()
            instance = self.get(name)
            if self.mw.profile.name != "25.04.0" and instance.status not in ("RUNNING", "STOPPED"):
                raise ValidationErrors(
                    [
                        (
                            f"virt.instance.restart.{name}",
                            f"{name}: instance may not be restarted because current status is: {instance.status}",
                            22,
                        )
                    ]
                )
            if instance.status == "RUNNING":
                await self._stop(job, instance, force=stop_args["force"], timeout=stop_args["timeout"])
            await self._start(job, instance)
            return True

        return self.submit(ctx, "virt.instance.restart", params, body, lock=f"instance_action_{ident}")

    # ----- devices ----------------------------------------------------------------------------
    def _profile_devices(self, instance: Instance) -> list[dict[str, Any]]:
        nic: dict[str, Any] = {
            "name": "eth0",
            "description": "incusbr0",
            "readonly": True,
            "dev_type": "NIC",
            "network": "incusbr0",
            "nic_type": None,
            "parent": None,
        }
        if self.mw.profile.nic_mac:
            nic["mac"] = None
        root = {
            "name": "root",
            "description": "None -> /",
            "readonly": False,
            "dev_type": "DISK",
            "source": None,
            "storage_pool": instance.storage_pool,
            "destination": "/",
            "boot_priority": None,
            "io_bus": None,
        }
        return [nic, root]

    def device_list(self, ctx: CallContext, params: list[Any]) -> Any:
        instance = self.get(params[0] if params else None)
        schema = self._schema(ctx, "virt.device")
        listed = self._profile_devices(instance)
        for device in instance.devices.values():
            filled, _ = validate(schema, {k: v for k, v in device.items() if not k.startswith("_")}, "")
            listed.append(filled)
        return listed

    def _device_arg(self, ctx: CallContext, params: list[Any], attribute: str) -> tuple[Instance, dict[str, Any]]:
        instance = self.get(params[0] if params else None)
        raw = params[1] if len(params) > 1 else None
        return instance, validated(self._schema(ctx, "virt.device"), raw, attribute)

    def device_add(self, ctx: CallContext, params: list[Any]) -> Any:
        instance, device = self._device_arg(ctx, params, "virt_device_add")
        errors = ValidationErrors()
        self._validate_devices(errors, "virt_device_add", instance.type, [device], instance.devices)
        errors.check()
        device["name"] = device.get("name") or self._generate_name(device["dev_type"], instance.devices)
        if device["name"] in instance.devices or device["name"] in ("eth0", "root"):
            raise CallError(f"Failed to add device: Device {device['name']!r} already exists")
        self._device_to_incus(device)
        instance.devices[device["name"]] = device
        return True  # no virt.instance.query event: plugins/virt sends none for devices

    def device_update(self, ctx: CallContext, params: list[Any]) -> Any:
        instance, device = self._device_arg(ctx, params, "virt_device_update")
        name = device.get("name")
        if name not in instance.devices:
            raise CallError("Device does not exist.", errno.ENOENT)
        others = {k: v for k, v in instance.devices.items() if k != name}
        errors = ValidationErrors()
        self._validate_devices(errors, "virt_device_update", instance.type, [device], others)
        errors.check()
        self._device_to_incus(device)
        instance.devices[name] = device
        return True  # no virt.instance.query event: plugins/virt sends none for devices

    def device_delete(self, ctx: CallContext, params: list[Any]) -> Any:
        instance = self.get(params[0] if params else None)
        name = params[1] if len(params) > 1 else None
        if name not in instance.devices:
            raise CallError("Device not found.", errno.ENOENT)
        del instance.devices[name]
        return True  # no virt.instance.query event: plugins/virt sends none for devices

    def set_bootable_disk(self, ctx: CallContext, params: list[Any]) -> Any:
        instance = self.get(params[0] if params else None)
        disk = params[1] if len(params) > 1 else None
        if instance.type != "VM":
            raise CallError("Setting disk to boot from is only valid for VM instances.")
        if disk == "root":
            if instance.status != "STOPPED":
                raise CallError("Instance must be stopped before updating it's root disk configuration.")
            return True
        if disk not in instance.devices:
            raise CallError(f"{disk!r} device does not exist.", errno.ENOENT)
        if instance.devices[disk]["dev_type"] != "DISK":
            raise CallError(f"{disk!r} device type is not DISK.")
        return True

    @staticmethod
    def _generate_name(dev_type: str, existing: dict[str, Any]) -> str:
        prefix = GENERATED_PREFIX.get(dev_type, dev_type.lower())
        index = 1 if dev_type == "NIC" else 0  # eth0 comes from the default profile
        while f"{prefix}{index}" in existing:
            index += 1
        return f"{prefix}{index}"

    @staticmethod
    def _device_to_incus(device: dict[str, Any]) -> None:
        """TrueNAS's conversion to Incus config; a NIC without nic_type crashes it, as in TrueNAS."""
        if device["dev_type"] == "NIC":
            nic_type: Any = device.get("nic_type")
            device["_incus_nictype"] = nic_type.lower()

    def _validate_devices(
        self,
        errors: ValidationErrors,
        prefix: str,
        instance_type: str,
        devices: list[dict[str, Any]],
        existing: dict[str, dict[str, Any]],
    ) -> None:
        profile = self.mw.profile
        seen_source: set[tuple[str, int]] = set()
        seen_dest: set[tuple[str, int]] = set()
        for other in existing.values():
            if other.get("dev_type") == "PROXY":
                seen_source.add((other["source_proto"], other["source_port"]))
        container = instance_type == "CONTAINER"
        for device in devices:
            kind = device.get("dev_type")
            name = device.get("name")
            if profile.cdrom and name:
                if kind == "CDROM" and not name.startswith("ix_cdrom"):
                    errors.add(f"{prefix}.name", "CDROM device name must start with 'ix_cdrom' prefix")
                elif kind != "CDROM" and name.startswith("ix_cdrom"):
                    errors.add(f"{prefix}.name", "Device name must not start with 'ix_cdrom' prefix")
            if kind == "PROXY":
                source = (device["source_proto"], device["source_port"])
                dest = (device["dest_proto"], device["dest_port"])
                if source in seen_source:
                    errors.add(f"{prefix}.source_port", "Source proto/port already in use.")
                if dest in seen_dest:
                    errors.add(f"{prefix}.dest_port", "Destination proto/port already in use.")
                seen_source.add(source)
                seen_dest.add(dest)
            elif kind == "DISK":
                self._validate_disk(errors, prefix, container, device)
            elif kind == "PCI":
                if container:
                    errors.add(f"{prefix}.dev_type", "PCI passthrough is only supported for vms")
                elif not re.match(r"^[0-9a-fA-F]{4}:[0-9a-fA-F]{2}:[0-9a-fA-F]{2}\.[0-7]$", device.get("address", "")):
                    errors.add(f"{prefix}.address", f"Invalid PCI {device.get('address')!r} address.")
            elif kind == "CDROM":
                iso: str = device.get("source") or ""
                if container:
                    errors.add(f"{prefix}.dev_type", "Container instance type is not supported")
                elif not iso.startswith("/"):
                    errors.add(f"{prefix}.source", "Source must be an absolute path")
                elif not self._path_exists(iso):
                    errors.add(f"{prefix}.source", "Specified source path does not exist")
            elif kind == "NIC" and device.get("parent") and device["parent"] not in self.mw.host_interfaces:
                errors.add(f"{prefix}.parent", "Invalid parent interface")

    def _path_exists(self, path: str) -> bool:
        return any(
            path.startswith(f"/mnt/{pool}/") or path == f"/mnt/{pool}" for pool in self.mw.global_config.storage_pools
        )

    def _validate_disk(self, errors: ValidationErrors, prefix: str, container: bool, device: dict[str, Any]) -> None:
        source = device.get("source")
        destination = device.get("destination")
        if source and "/" in source:
            if not (source.startswith("/dev/zvol/") or source.startswith("/mnt/")):
                errors.add(f"{prefix}.source", "Only pool paths are allowed")
                return
            if source.startswith("/mnt/.ix-apps"):
                errors.add(f"{prefix}.source", "Invalid source")
                return
        if container:
            if device.get("io_bus"):
                errors.add(f"{prefix}.io_bus", "IO bus is only available for VMs")
            if not source:
                errors.add(f"{prefix}.source", "Source is required.")
            elif source.startswith("/dev/zvol/"):
                errors.add(f"{prefix}.source", "ZVOL are not allowed for containers")
            elif not source.startswith("/"):
                errors.add(f"{prefix}.source", "Source must be a filesystem path for CONTAINER")
            elif not self._path_exists(source):
                errors.add(f"{prefix}.source", "Source path does not exist.")
            if source and source.startswith("/mnt/"):
                if not destination:
                    errors.add(f"{prefix}.destination", "Destination is required for filesystem paths.")
                elif not destination.startswith("/"):
                    errors.add(f"{prefix}.destination", "Destination must be an absolute path.")
                elif destination == "/":
                    errors.add(f"{prefix}.destination", "Destination cannot be /")
                if device.get("boot_priority") is not None:
                    errors.add(f"{prefix}.boot_priority", "Boot priority is not valid for filesystem paths.")
        elif destination:
            errors.add(f"{prefix}.destination", "Destination is not valid for VM")
