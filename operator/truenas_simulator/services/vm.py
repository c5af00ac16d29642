"""libvirt VMs: ``vm.*`` and ``vm.device.*`` as TrueNAS 25.04.2, 25.10, 26 and 27 implement them
(truenas-vm-container.md §2, §4, §6; 27's ``vm.reset`` and guest agent interfaces), with
``vm.device.convert`` (25.10+) and
``vm.import_disk_image`` (25.04.2/25.10) writing uploaded disk images into volumes.

What a guest would see at start is recorded per VM (``guest``): the image its root disk holds and
the NoCloud seed its cloud-init would read from a ``cidata`` CDROM.
"""

from __future__ import annotations

import errno
import hashlib
import re
import shlex
import uuid
from dataclasses import dataclass, field
from typing import Any, NoReturn

from ..context import CallContext, Handler, Middleware
from ..errors import CallError, ValidationErrors
from ..images import qcow2_virtual_size, read_iso
from ..jobs import Job
from ..profiles import get_profile
from ..validation import load_schema, validated
from .base import GuestService, Methods, is_id
from .storage import StorageService

VM_NAME = re.compile(r"^[a-zA-Z_0-9]+$")
DISK_IMAGE_EXTENSIONS = ("qcow2", "qed", "raw", "vdi", "vhdx", "vmdk")
DEFAULT_ORDER = {"CDROM": 1000, "DISK": 1001, "RAW": 1001}


@dataclass
class VM:
    id: int
    config: dict[str, Any]
    """The validated ``vm_create`` fields (defaults filled in)."""
    state: str = "STOPPED"
    pid: int | None = None
    defined: bool = False
    devices: dict[int, dict[str, Any]] = field(default_factory=dict)
    orders: dict[int, int | None] = field(default_factory=dict)
    ignores_shutdown: bool = False
    guest: dict[str, Any] = field(default_factory=dict)
    agent_interfaces: list[dict[str, Any]] | None = None
    """What the guest's QEMU agent answers to ``guest-network-get-interfaces`` (27), as the agent words it
    (``name``, ``hardware-address``, ``ip-addresses[]`` of ``ip-address``/``prefix``/``ip-address-type``);
    None: no agent in the guest."""
    resets: int = 0

    @property
    def name(self) -> str:
        return str(self.config["name"])

    def device_entry(self, ident: int) -> dict[str, Any]:
        attributes = self.devices[ident]
        order = self.orders.get(ident)
        if order is None:
            order = DEFAULT_ORDER.get(str(attributes.get("dtype")), 1002)
        return {"id": ident, "vm": self.id, "order": order, "attributes": dict(attributes)}

    def entry(self, profile_name: str) -> dict[str, Any]:
        data = dict(self.config)
        if data.get("bootloader_ovmf") is None:
            data["bootloader_ovmf"] = "OVMF_CODE_4M.secboot.fd" if data.get("enable_secure_boot") else "OVMF_CODE_4M.fd"
        domain_state: str | None
        if self.state == "RUNNING":
            domain_state = "RUNNING"
        elif self.state == "SUSPENDED":
            domain_state = "PAUSED"
        else:  # 25.x defines the domain at create (SHUTOFF); 26 only at the first start (null)
            domain_state = "SHUTOFF" if (self.defined or not get_profile(profile_name).pylibvirt) else None
        data.update(
            {
                "id": self.id,
                "devices": [self.device_entry(i) for i in self.devices],
                "display_available": any(a.get("dtype") == "DISPLAY" for a in self.devices.values()),
                "status": {"state": self.state, "pid": self.pid, "domain_state": domain_state},
            }
        )
        return data


LIBVIRT_EVENTS = {0: "DEFINED", 1: "UNDEFINED", 2: "STARTED", 3: "SUSPENDED", 4: "RESUMED", 5: "STOPPED", 6: "SHUTDOWN"}
"""libvirt's lifecycle event numbers, as plugins/vm/events.py lists them (25.x)."""
LIBVIRT_STATE_NAMES = {
    0: "NOSTATE",
    1: "RUNNING",
    2: "BLOCKED",
    3: "SUSPENDED",
    4: "SHUTDOWN",
    5: "SHUTOFF",
    6: "CRASHED",
    7: "PMSUSPENDED",
}
"""plugins/vm/events.py's ``vm_state_mapping`` (25.04.2, 25.10): meant for ``dom.state()``, and also
applied to the *event* number for ``extra.state`` (so a STARTED event says ``BLOCKED``)."""


class VMService(GuestService[VM]):
    COLLECTION = "vm.query"
    DEVICE_COLLECTION = "vm.device.query"
    VERBOSE_NAME = "VM"
    DEVICE_VERBOSE_NAME = "VM Device"
    KIND = "VM"
    ACTIVE_STATES = ("RUNNING", "SUSPENDED")
    FIRST_PID = 7000

    def __init__(self, mw: Middleware, storage: StorageService) -> None:
        super().__init__(mw)
        self.storage = storage

    def methods(self) -> Methods:
        plain: dict[str, Handler] = {
            "vm.query": self.query,
            "vm.get_instance": self.get_instance,
            "vm.create": self.create,
            "vm.update": self.update,
            "vm.delete": self.delete,
            "vm.start": self.start,
            "vm.poweroff": self.poweroff,
            "vm.status": self.status,
            "vm.device.query": self.device_query,
            "vm.device.create": self.device_create,
            "vm.device.update": self.device_update,
            "vm.device.delete": self.device_delete,
            "vm.device.nic_attach_choices": self.nic_attach_choices,
            "vm.get_available_memory": self.get_available_memory,
        }
        jobs: dict[str, Handler] = {"vm.stop": self.stop, "vm.restart": self.restart}
        if self.mw.profile.vm_convert:
            jobs["vm.device.convert"] = self.convert
        if self.mw.profile.vm_import_disk_image:
            jobs["vm.import_disk_image"] = self.import_disk_image
        if self.mw.profile.api27:
            plain["vm.reset"] = self.reset
            plain["vm.get_guest_network_interfaces"] = self.guest_network_interfaces
        return {
            **{name: (handler, False) for name, handler in plain.items()},
            **{name: (handler, True) for name, handler in jobs.items()},
        }

    @property
    def vms(self) -> dict[int, VM]:
        return self.guests

    def entry(self, guest: VM) -> dict[str, Any]:
        return guest.entry(self.mw.profile.name)

    # ----- helpers -------------------------------------------------------------------------------
    @property
    def schema(self) -> str:
        return self.mw.profile.schema_version

    def _validated(self, kind: str, value: Any, attribute: str) -> Any:
        return validated(load_schema(f"{self.schema}.{kind}"), value, attribute)

    def not_found(self, ident: Any) -> NoReturn:
        if not is_id(ident):
            raise ValidationErrors([("id", "Input should be a valid integer", errno.EINVAL)])
        super().not_found(ident)

    def started(self, guest: VM) -> None:
        guest.defined = True
        guest.guest = self._guest_view(guest)

    def ends_process(self, state: str) -> bool:
        return state == "STOPPED"  # a SUSPENDED domain keeps its process

    # ----- events --------------------------------------------------------------------------------
    def domain_event(self, vm: VM, event: int, state: str) -> None:
        """One libvirt domain event as 25.x's callback sends it (plugins/vm/events.py
        ``setup_libvirt_events``): the vm.query entry without ``devices``, ``status.state`` overwritten
        with ``state`` (a libvirt state name such as SHUTOFF, or "UPDATING CONFIGURATION" for an
        undefine), ``added`` for DEFINED, else ``changed``, and ``extra.state`` from the event number."""
        fields = self.entry(vm)
        fields.pop("devices", None)
        fields["status"] = {**fields["status"], "state": state}
        self.mw.events.emit(
            self.COLLECTION,
            "added" if event == 0 else "changed",
            vm.id,
            fields,
            extra={"state": LIBVIRT_STATE_NAMES.get(event, "UNKNOWN")},
        )

    def redefined(self, vm: VM) -> None:
        """25.x's supervisor ``update_domain``: an inactive domain is undefined and defined again (at
        every start and every update of a stopped VM), two domain events."""
        if self.mw.profile.vm_libvirt_events:
            self.domain_event(vm, 1, "UPDATING CONFIGURATION")
            self.domain_event(vm, 0, "SHUTOFF")

    def state_changed(self, vm: VM, before: str) -> None:
        """26: one ``changed`` with the full entry per domain event (plugins/vm/event.py). 25.x sends no
        CRUD event for a start or stop (plugins/vm/vm_lifecycle.py): only the domain events."""
        if not self.mw.profile.vm_libvirt_events:
            super().state_changed(vm, before)
        elif vm.state == "RUNNING" and before == "SUSPENDED":
            self.domain_event(vm, 4, "RUNNING")
        elif vm.state == "RUNNING":
            self.redefined(vm)  # supervisor start(): update_domain, then domain.create()
            self.domain_event(vm, 2, "RUNNING")
        elif vm.state == "SUSPENDED":
            self.domain_event(vm, 3, "SUSPENDED")
        else:
            self.domain_event(vm, 5, "SHUTOFF")

    def using(self, name: str) -> str | None:
        """The name of a RUNNING VM with a disk on dataset ``name`` (or a child of it)."""
        for vm in self.vms.values():
            if vm.state != "RUNNING":
                continue
            for attributes in vm.devices.values():
                path = str(attributes.get("path") or "")
                if path in (f"/dev/zvol/{name}",) or path.startswith((f"/dev/zvol/{name}/", f"/mnt/{name}/")):
                    return vm.name
        return None

    def _guest_view(self, vm: VM) -> dict[str, Any]:
        """What the guest finds at boot: its root disk's image and a NoCloud seed, if any."""
        storage = self.storage
        disks, seed = [], None
        for ident in sorted(vm.devices, key=lambda i: vm.device_entry(i)["order"]):
            attributes = vm.devices[ident]
            if attributes.get("dtype") == "DISK":
                zvol = storage.zvol_of(str(attributes.get("path")))
                disks.append({"path": attributes.get("path"), "image": zvol.content if zvol else None})
            elif attributes.get("dtype") == "CDROM":
                parsed = read_iso(storage.files.get(str(attributes.get("path")), b""))
                if parsed is not None and parsed[0].lower() == "cidata":  # cloud-init's NoCloud label
                    seed = {name: content.decode("utf-8", "replace") for name, content in parsed[1].items()}
        return {"disks": disks, "nocloud": seed}

    def _common_validation(self, data: dict[str, Any], schema: str, vm: VM | None) -> None:
        """vms.py common_validation (the subset a client can trip over) [SRC 25.10/26]."""
        errors = ValidationErrors()
        name = data.get("name")
        if name is not None:
            if not VM_NAME.match(name):
                errors.add(f"{schema}.name", "Only alphanumeric characters are allowed.")
            other = self.by_name(name)
            if other is not None and other is not vm:
                errors.add(f"{schema}.name", "This name already exists.", errno.EEXIST)
        memory = data.get("memory", vm.config["memory"] if vm else None)
        min_memory = data.get("min_memory", vm.config.get("min_memory") if vm else None)
        if min_memory is not None and memory is not None and min_memory > memory:
            errors.add(f"{schema}.min_memory", "Minimum memory should not be greater than defined/maximum memory")
        merged = {**(vm.config if vm else {}), **data}
        total = merged.get("vcpus", 1) * merged.get("cores", 1) * merged.get("threads", 1)
        maximum = self.mw.knobs.host_cores
        if total > maximum:
            errors.add(
                f"{schema}.vcpus",
                f'Maximum {maximum} vcpus are supported.Please ensure the product of "{schema}.vcpus", '
                f'"{schema}.cores" and "{schema}.threads" is less than {maximum}.',
            )
        if merged.get("pin_vcpus") and not merged.get("cpuset"):
            errors.add(f"{schema}.cpuset", f'Must be specified when "{schema}.pin_vcpus" is set.')
        if merged.get("cpu_model") and merged.get("cpu_mode", "CUSTOM") != "CUSTOM":
            errors.add(f"{schema}.cpu_model", 'This attribute should not be specified when "cpu_mode" is not "CUSTOM".')
        try:
            shlex.split(str(merged.get("command_line_args") or ""))
        except ValueError as exc:
            errors.add(f"{schema}.command_line_args", f"Parse error: {exc}")
        errors.check()

    # ----- reads ---------------------------------------------------------------------------------
    def status(self, ctx: CallContext, params: list[Any]) -> Any:
        return self.entry(self.get(params[0] if params else None))["status"]

    def nic_attach_choices(self, ctx: CallContext, params: list[Any]) -> Any:
        interfaces = sorted(self.mw.host_interfaces)
        if self.mw.profile.has_container:  # 26: grouped by mode
            return {
                "BRIDGE": [i for i in interfaces if i.startswith("br")],
                "MACVLAN": [i for i in interfaces if not i.startswith("br")],
            }
        return {i: i for i in interfaces}

    # ----- create / update / delete ----------------------------------------------------------------
    def create(self, ctx: CallContext, params: list[Any]) -> Any:
        data = self._validated("vm.create.args", params[0] if params else None, "vm_create")
        self._common_validation(data, "vm_create", None)
        if data.get("uuid") is None:
            data["uuid"] = str(uuid.uuid4())
        vm = VM(id=self.next_id, config=data, defined=not self.mw.profile.pylibvirt)
        self.next_id += 1
        self.vms[vm.id] = vm
        if self.mw.profile.vm_libvirt_events:
            self.domain_event(vm, 0, "SHUTOFF")  # 25.x defines the domain in do_create (vms.py ``_add``)
        self.emit("added", vm)
        return self.entry(vm)

    def update(self, ctx: CallContext, params: list[Any]) -> Any:
        vm = self.get(params[0] if params else None)
        data = self._validated("vm.update.args", params[1] if len(params) > 1 else {}, "vm_update")
        if "name" in data and data["name"] != vm.name and vm.state in ("RUNNING", "SUSPENDED"):
            raise CallError("VM name can only be changed when VM is inactive")
        self._common_validation(data, "vm_update", vm)
        vm.config.update(data)
        if vm.state == "STOPPED":
            self.redefined(vm)
        self.emit("changed", vm)
        return self.entry(vm)

    def delete(self, ctx: CallContext, params: list[Any]) -> Any:
        vm = self.get(params[0] if params else None)
        options = params[1] if len(params) > 1 and isinstance(params[1], dict) else {}
        if vm.state in ("RUNNING", "SUSPENDED") and self.mw.profile.api27 and not options.get("force"):
            # 27 plugins/vm/crud.py do_delete: an active VM only goes with force
            raise CallError(
                f"{vm.name!r} is {vm.state.lower()}; stop the VM first or pass force to delete it.", errno.EBUSY
            )
        if vm.state in ("RUNNING", "SUSPENDED"):
            vm.state, vm.pid = "STOPPED", None  # destroyed first
        if options.get("zvols"):
            for attributes in vm.devices.values():
                zvol = self.storage.zvol_of(str(attributes.get("path") or ""))
                if attributes.get("dtype") == "DISK" and zvol is not None:
                    self.storage.dataset_delete(ctx, [zvol.name, {"recursive": True}])
        for ident in list(vm.devices):
            self.mw.events.emit(self.DEVICE_COLLECTION, "removed", ident)
        del self.vms[vm.id]
        self.emit("removed", vm.id)
        return None if self.mw.profile.pylibvirt else True

    # ----- power ---------------------------------------------------------------------------------
    def start(self, ctx: CallContext, params: list[Any]) -> Any:
        vm = self.get(params[0] if params else None)
        twenty_six = self.mw.profile.pylibvirt
        if vm.state == "RUNNING" or (twenty_six and vm.state == "SUSPENDED"):
            raise CallError(f"VM {vm.name!r} is already running" if twenty_six else f"{vm.name!r} is already running")
        if vm.state == "SUSPENDED":
            raise CallError(f"{vm.name!r} VM is suspended and can only be resumed/powered off")
        missing = [
            str(a.get("path"))
            for a in vm.devices.values()
            if (a.get("dtype") == "DISK" and self.storage.zvol_of(str(a.get("path"))) is None)
            or (a.get("dtype") == "CDROM" and str(a.get("path")) not in self.storage.files)
        ]
        if missing:
            if twenty_six:
                raise CallError(f"Cannot start domain {vm.name!r}:\npath: {missing[0]} does not exist")
            raise CallError(f"VM will not start as {', '.join(missing)} device(s) are not available.")
        overcommit = bool((params[1] if len(params) > 1 and isinstance(params[1], dict) else {}).get("overcommit"))
        # plugins/vm/memory.py (init_guest_vmemory -> _set_guest_vmemory): the VM's minimum (else its
        # memory) must fit in what get_available_memory(False) reports; otherwise only overcommit starts
        # it, by lowering the ARC's maximum (the shrinkable ARC is counted either way).
        requested = int(vm.config.get("min_memory") or vm.config["memory"]) * 2**20
        available = self.available_memory(overcommit=False)
        if requested > available:
            if not overcommit:
                raise CallError(f"Cannot guarantee memory for guest {vm.name}", errno.ENOMEM)
            knobs = self.mw.knobs
            knobs.arc_size = max(knobs.arc_min, knobs.arc_size - (requested - available))
        self.set_state(vm, "RUNNING")
        return None

    def available_memory(self, overcommit: bool) -> int:
        """plugins/vm/memory.py get_available_memory: 90% of MemAvailable, plus the ARC above its floor,
        minus (without overcommit) what running VMs were promised and have not touched yet (a simulated
        guest touches nothing: its whole memory)."""
        knobs = self.mw.knobs
        free = int((knobs.host_memory if knobs.mem_available is None else knobs.mem_available) * 0.9)
        shrinkable = max(0, knobs.arc_size - knobs.arc_min)
        promised = 0
        if not overcommit:
            promised = sum(
                int(v.config["memory"]) * 2**20 for v in self.vms.values() if v.state in ("RUNNING", "SUSPENDED")
            )
        return max(0, free + shrinkable - promised)

    def get_available_memory(self, ctx: CallContext, params: list[Any]) -> Any:
        """``[overcommit=false]`` -> bytes (api/v25_04_2/vm.py VMGetAvailableMemoryArgs: ``overcommit: bool``)."""
        overcommit = params[0] if params else False
        if not isinstance(overcommit, bool):
            raise ValidationErrors([("overcommit", "Input should be a valid boolean", errno.EINVAL)])
        return self.available_memory(overcommit)

    def stop(self, ctx: CallContext, params: list[Any]) -> Job:
        ident = params[0] if params else None

        async def body(job: Job) -> Any:
            data = self._validated("vm.stop.args", {"id": ident, "options": params[1] if len(params) > 1 else {}}, "")
            vm = self.get(data["id"])
            options = data["options"]
            if vm.state != "RUNNING":
                if self.mw.profile.pylibvirt:
                    raise Exception(f"Domain {vm.name!r} is not active")  # pylibvirt Error: a plain exception
                raise CallError("VM state is currently not 'RUNNING'")
            if not options["force"]:
                await self.work(job, "Stopping")
            if vm.ignores_shutdown and not options["force"] and not options["force_after_timeout"]:
                return None  # succeeds after shutdown_timeout although the guest is still up (§2.4)
            if self.mw.profile.vm_libvirt_events and not options["force"]:
                self.domain_event(vm, 6, "SHUTDOWN")  # the guest finished shutting down, then STOPPED
            self.set_state(vm, "STOPPED")
            return None

        return self.submit(ctx, "vm.stop", params, body, lock=f"stop_vm_{ident}")

    def restart(self, ctx: CallContext, params: list[Any]) -> Job:
        """``vm.restart [id]``, a job (plugins/vm/vm_lifecycle.py ``restart``, the same on 25.04.2 .. 26):
        ``vm.get_instance``, then a ``vm.stop`` job with ``force_after_timeout`` whose failure fails the
        restart as ``Failed to stop '<name>' vm: <its error>``, then ``vm.start`` with ``overcommit``."""
        ident = params[0] if params else None

        async def body(job: Job) -> Any:
            vm = self.get(ident)
            stop = self.stop(ctx, [vm.id, {"force_after_timeout": True}])
            await stop.done.wait()
            if stop.state != "SUCCESS":
                raise CallError(f"Failed to stop {vm.name!r} vm: {stop.error}")
            self.start(ctx, [vm.id, {"overcommit": True}])
            return None

        return self.submit(ctx, "vm.restart", params, body, lock=f"restart_vm_{ident}")

    def poweroff(self, ctx: CallContext, params: list[Any]) -> Any:
        vm = self.get(params[0] if params else None)
        if vm.state not in ("RUNNING", "SUSPENDED"):
            if self.mw.profile.pylibvirt:
                raise CallError(f"Domain {vm.name!r} is not active")
            raise CallError("VM state is currently not 'RUNNING / SUSPENDED'")
        self.set_state(vm, "STOPPED")
        return None

    def reset(self, ctx: CallContext, params: list[Any]) -> Any:
        """27 ``vm.reset [id]`` (plugins/vm/lifecycle.py reset_vm -> pylibvirt ``vms.reset``): a hardware
        reset; the qemu process, so the pid and the RUNNING state, stay. An inactive domain: libvirt's
        error, through pylibvirt as for poweroff [INF]."""
        vm = self.get(params[0] if params else None)
        if vm.state != "RUNNING":
            raise CallError(f"Domain {vm.name!r} is not active")
        vm.resets += 1
        return None

    def guest_network_interfaces(self, ctx: CallContext, params: list[Any]) -> Any:
        """27 ``vm.get_guest_network_interfaces [id]`` (plugins/vm/info.py): the QEMU agent's
        ``guest-network-get-interfaces`` as VMGuestNetworkInterface items; CallError without a domain or
        an agent (libvirt's "QEMU guest agent is not connected" [INF])."""
        vm = self.get(params[0] if params else None)
        if vm.state not in ("RUNNING", "SUSPENDED"):
            raise CallError(f"VM {vm.id} is not running")
        interfaces = vm.agent_interfaces if vm.agent_interfaces is not None else self.mw.knobs.guest_agent_interfaces
        if interfaces is None or vm.state != "RUNNING":
            raise CallError(
                f"VM {vm.id}: Guest agent command failed: Guest agent is not responding: "
                "QEMU guest agent is not connected"
            )
        return [
            {
                "name": iface.get("name", ""),
                "hardware_address": iface.get("hardware-address", ""),
                "ip_addresses": [
                    {
                        "ip_address": a["ip-address"],
                        "prefix": a.get("prefix", 0),
                        "ip_address_type": str(a.get("ip-address-type", "ipv4")).upper(),
                    }
                    for a in iface.get("ip-addresses", [])
                    if a.get("ip-address")
                ],
            }
            for iface in interfaces
        ]

    # ----- devices -------------------------------------------------------------------------------
    def _device_attributes(self, raw: Any, vm: VM, exclude: int | None, prefix: str) -> dict[str, Any]:
        schema = load_schema(f"{self.schema}.vm.device.create.args")["properties"]["attributes"]
        result = validated(schema, raw, f"{prefix}.attributes")
        problems = ValidationErrors()
        kind = result["dtype"]
        storage = self.storage
        if kind == "DISK":
            if result.get("create_zvol"):
                if not result.get("zvol_name") or not result.get("zvol_volsize"):
                    problems.add("attributes.zvol_name", "This field is required.")
            elif not result.get("path"):
                problems.add("attributes.path", "Disk path is required.")
            elif not str(result["path"]).startswith("/dev/zvol/"):
                problems.add("attributes.path", 'Disk path must start with "/dev/zvol/"')
            elif storage.zvol_of(result["path"]) is None:
                if self.mw.profile.pylibvirt:
                    zvol = result["path"].removeprefix("/dev/zvol/")
                    problems.add("attributes.path", f"Zvol ({zvol}) path ({result['path']}) does not exist.")
                else:
                    problems.add("attributes.path", "Zvol referenced by path does not exist")
            for ident, other in vm.devices.items():
                if ident != exclude and other.get("dtype") == "DISK" and other.get("path") == result.get("path"):
                    problems.add("attributes.path", f'{vm.name} has "{result["path"]}" already configured')
        elif kind == "CDROM":
            path = str(result["path"])
            parent = path.rpartition("/")[0]
            if path not in storage.files:
                problems.add("attributes.path", f"{path} does not exist")  # [INF]
            elif parent.count("/") < 3 and self.mw.profile.pylibvirt:
                problems.add("attributes.path", "CDROM file must be in a child dataset of a pool")  # [INF]
        elif kind == "NIC":
            attach = result.get("nic_attach")
            if attach is not None and attach not in self.mw.host_interfaces:
                problems.add("attributes.nic_attach", "Not a valid choice.")
            mac = result.get("mac")
            if isinstance(mac, str) and mac.lower().startswith("ff"):
                problems.add("attributes.mac", "MAC address must not start with `ff`")
            if mac is None and self.mw.profile.pylibvirt:
                result["mac"] = f"00:a0:98:{vm.id % 256:02x}:{self.next_device_id % 256:02x}:7e"
        elif kind == "DISPLAY" and not result.get("password"):
            problems.add("attributes.password", "Password is required for display devices")
        problems.check()
        if kind == "DISK" and result.get("create_zvol"):
            storage.dataset_create(
                None,  # type: ignore[arg-type]
                [{"name": result["zvol_name"], "type": "VOLUME", "volsize": result["zvol_volsize"]}],
            )
            result["path"] = f"/dev/zvol/{result['zvol_name']}"
            result["create_zvol"] = False
        return dict(result)

    def device_create(self, ctx: CallContext, params: list[Any]) -> Any:
        data = self._validated("vm.device.create.args", params[0] if params else None, "vm_device_create")
        vm = self.get(data["vm"])
        raw = (params[0] or {}).get("attributes")
        attributes = self._device_attributes(raw, vm, None, "vm_device_create")
        ident = self.new_device_id()
        vm.devices[ident] = attributes
        vm.orders[ident] = data.get("order")
        return self.emit_device("added", vm, ident)

    def device_update(self, ctx: CallContext, params: list[Any]) -> Any:
        ident = params[0] if params else None
        vm = self.device_owner(ident)
        data = params[1] if len(params) > 1 and isinstance(params[1], dict) else {}
        assert isinstance(ident, int)
        merged = {**vm.devices[ident], **(data.get("attributes") or {})}
        if merged.get("dtype") != vm.devices[ident].get("dtype"):
            raise ValidationErrors([("attributes.dtype", "Device type cannot be changed", errno.EINVAL)])
        vm.devices[ident] = self._device_attributes(merged, vm, ident, "vm_device_update")
        if "order" in data:
            vm.orders[ident] = data["order"]
        return self.emit_device("changed", vm, ident)

    def device_delete(self, ctx: CallContext, params: list[Any]) -> Any:
        ident = params[0] if params else None
        vm = self.device_owner(ident)
        self.check_device_removable(vm)
        assert isinstance(ident, int)
        attributes = vm.devices.pop(ident)
        vm.orders.pop(ident, None)
        options = params[1] if len(params) > 1 and isinstance(params[1], dict) else {}
        zvol = self.storage.zvol_of(str(attributes.get("path") or ""))
        if options.get("zvol") and zvol is not None:
            self.storage.dataset_delete(ctx, [zvol.name, {"recursive": True}])
        self.mw.events.emit(self.DEVICE_COLLECTION, "removed", ident)
        return True

    # ----- disk images into volumes ------------------------------------------------------------------
    def _write_image(self, job: Job, source: str, zvol_name: str, attribute: str) -> Any:
        storage = self.storage
        data = storage.files[source]
        virtual = qcow2_virtual_size(data) or len(data)
        zvol = storage.datasets[zvol_name]
        if zvol.volsize is not None and zvol.volsize < virtual:
            have = max(1, round(zvol.volsize / 2**30))
            need = -(-virtual // 2**30)
            raise CallError(f"{zvol_name} too small (~{have}G). Minimum size must be {need}G", errno.ENOSPC)
        zvol.content = hashlib.sha256(data).hexdigest()
        return True

    def _in_running_vm(self, path: str) -> VM | None:
        for vm in self.vms.values():
            if vm.state == "RUNNING" and any(a.get("path") == path for a in vm.devices.values()):
                return vm
        return None

    def convert(self, ctx: CallContext, params: list[Any]) -> Job:
        """``vm.device.convert [{source, destination}]`` (25.10+/26; job, lock ``vm.device.convert``)."""

        async def body(job: Job) -> Any:
            data = params[0] if params else None
            if not isinstance(data, dict) or set(data) != {"source", "destination"}:
                raise ValidationErrors([("vm.device.convert", "Field required", errno.EINVAL)])
            source, destination = str(data["source"]), str(data["destination"])
            errors = ValidationErrors()
            image_side = [p for p in (source, destination) if p.rsplit(".", 1)[-1].lower() in DISK_IMAGE_EXTENSIONS]
            zvol_side = [p for p in (source, destination) if p.startswith("/dev/zvol/")]
            if len(image_side) != 1 or len(zvol_side) != 1:
                errors.add("vm.device.convert", "One path must be a disk image and the other must be a ZFS volume")
                errors.check()
            image, zvol_path = image_side[0], zvol_side[0]
            image_attr = "vm.device.convert.source" if image == source else "vm.device.convert.destination"
            zvol_attr = "vm.device.convert.destination" if image == source else "vm.device.convert.source"
            storage = self.storage
            if not re.match(r"^/mnt/[^/]+/", image):
                errors.add(image_attr, f"{image!r} is an invalid location")
            elif image == source and image not in storage.files:
                errors.add(image_attr, f"{image!r} does not exist")
            zvol = storage.zvol_of(zvol_path)
            if zvol is None:
                errors.add(zvol_attr, f"{zvol_path.removeprefix('/dev/zvol/')!r} is not a volume")
            errors.check()
            assert zvol is not None
            user = self._in_running_vm(zvol_path)
            if user is not None:
                zvol_name = zvol_path.removeprefix("/dev/zvol/")
                raise CallError(
                    f"{zvol_name!r} is part of running VM. {user.name!r} must be stopped first",
                    errno.EBUSY,
                )
            if image != source:  # zvol -> image file
                await self._progress(job)
                storage.files[image] = b"exported"
                return True
            self._write_image(job, image, zvol.name, zvol_attr)
            await self._progress(job)
            return True

        # plugins/vm/vm_devices.py (25.10.x, 26.0): ``@job(lock='vm.device.convert', lock_queue_size=1)``.
        # One lock for every conversion and a queue of one: with one conversion running and one waiting,
        # a third call (any source, any destination) is handed the waiting job (jobs.py, JobsQueue.add)
        # and its own volume is never written.
        return self.submit(ctx, "vm.device.convert", params, body, lock="vm.device.convert", lock_queue_size=1)

    def import_disk_image(self, ctx: CallContext, params: list[Any]) -> Job:
        """``vm.import_disk_image [{diskimg, zvol}]`` (25.04.2/25.10; zvol is a dataset name)."""

        async def body(job: Job) -> Any:
            data = params[0] if params else None
            if not isinstance(data, dict) or not {"diskimg", "zvol"} <= set(data):
                raise ValidationErrors([("vm.import_disk_image.diskimg", "Field required", errno.EINVAL)])
            storage = self.storage
            errors = ValidationErrors()
            if data["diskimg"] not in storage.files:
                errors.add("vm.import_disk_image.diskimg", "Disk image does not exist")  # [INF]
            zvol = storage.datasets.get(str(data["zvol"]))
            if zvol is None or zvol.type != "VOLUME":
                errors.add("vm.import_disk_image.zvol", "zvol does not exist")  # [INF]
            errors.check()
            self._write_image(job, data["diskimg"], str(data["zvol"]), "vm.import_disk_image.zvol")
            await self._progress(job)
            return True

        # plugins/vm/disk_utils.py (25.04.2): ``@job(lock_queue_size=1, lock=lambda args:
        # f"zvol_disk_image_{args[-1]['zvol']}")``: a lock per volume, so only calls into the same
        # volume are merged.
        data = params[-1] if params and isinstance(params[-1], dict) else {}
        return self.submit(
            ctx, "vm.import_disk_image", params, body, lock=f"zvol_disk_image_{data.get('zvol')}", lock_queue_size=1
        )

    async def _progress(self, job: Job) -> None:
        """``qemu-img convert -p`` percentages, over the knob's job time."""
        job.set_progress(0, "Converting disk image")
        await self.work(job, "Converting disk image")
        job.set_progress(100, "Conversion complete")
