"""TrueNAS version profiles: what each generation serves and how it behaves (truenas-api.md §1)."""

from __future__ import annotations

from dataclasses import dataclass, replace

ALL_STATUSES = (
    "RUNNING",
    "STOPPED",
    "UNKNOWN",
    "ERROR",
    "FROZEN",
    "STARTING",
    "STOPPING",
    "FREEZING",
    "THAWED",
    "ABORTING",
)


@dataclass(frozen=True)
class Profile:
    name: str
    """Short name used on the command line, e.g. ``25.10``."""
    system_version: str
    """What ``system.version`` answers."""
    api_versions: tuple[str, ...]
    """Versioned endpoints served (``/api/<v>``); the last one is ``/api/current``."""
    schema_version: str
    """Which schema files describe the current API (``v25_10_0``)."""
    has_virt: bool = True
    has_rest: bool = True
    vm_create: bool = False
    """virt.instance can create VMs (25.04.0/25.04.1 only)."""
    statuses: tuple[str, ...] = ALL_STATUSES
    transitional_statuses: bool = True
    """Whether STARTING/STOPPING are reported while a start/stop runs."""
    legacy_jobs_option: bool = False
    """``core.set_options({"legacy_jobs": false})`` is understood (25.10)."""
    privileged_mode: bool = False
    cdrom: bool = False
    nic_mac: bool = False
    set_bootable_disk: bool = False
    vm_autostart_forbidden: bool = False
    message_ids: bool = False
    """Job objects carry ``message_ids`` (25.10)."""
    has_container: bool = False
    """The 26.x ``container.*`` API."""
    has_vm: bool = False
    """libvirt ``vm.*`` / ``vm.device.*`` (25.04.2 and later; truenas-vm-container.md §1)."""
    vm_convert: bool = False
    """``vm.device.convert`` (25.10.0 and later)."""
    vm_import_disk_image: bool = False
    """``vm.import_disk_image`` (25.04.2 and 25.10; removed in 26)."""
    snapshot_namespace: str = "pool.snapshot"
    """``zfs.snapshot`` on 25.04 (plugins/zfs_/snapshot.py), ``pool.snapshot`` from 25.10 on (zfs.snapshot
    private)."""
    vm_libvirt_events: bool = False
    """25.x's libvirt domain events on ``vm.query`` (plugins/vm/events.py): libvirt state names, no
    devices, ``added`` on every (re)definition, ``extra.state``; 26 sends full entries (plugins/vm/event.py)."""
    pylibvirt: bool = False
    """VMs through truenas_pylibvirt (26 and later): the domain is defined at the first start, its errors
    are pylibvirt's, ``vm.delete`` answers null, ZFS destroys go through truenas_pylibzfs."""
    api27: bool = False
    """TrueNAS 27 (middleware master, api/v27_0_0): ``vm.reset``, ``vm.get_guest_network_interfaces``;
    ``vm.delete`` and ``container.delete`` refuse an active guest without ``force``; ``container.delete``
    is a job with ``{force, recursive}`` and refuses a dataset with children or snapshots unless recursive."""

    @property
    def current_api(self) -> str:
        return self.api_versions[-1]

    def schema_for_api(self, api_version: str) -> str:
        """Schema folder prefix for a versioned endpoint such as ``v25.04.2``."""
        known = {"v25.04.0": "v25_04_0", "v25.04.1": "v25_04_0", "v25.04.2": "v25_04_2", "v26.0.0": "v26_0_0"}
        if api_version in known:
            return known[api_version]
        if api_version.startswith("v25.10"):
            return "v25_10_0"
        return self.schema_version


TRUENAS_26 = Profile(
    name="26.0",
    system_version="TrueNAS-26.0.0",
    api_versions=("v25.04.0", "v25.04.1", "v25.04.2", "v25.10.0", "v25.10.1", "v26.0.0"),
    schema_version="v26_0_0",
    has_virt=False,
    has_rest=False,
    legacy_jobs_option=True,
    message_ids=True,
    has_container=True,
    has_vm=True,
    vm_convert=True,
    pylibvirt=True,
)
"""TrueNAS 26; 27 is the same but where ``api27`` says."""

PROFILES: dict[str, Profile] = {
    "25.04.0": Profile(
        name="25.04.0",
        system_version="TrueNAS-25.04.0",
        api_versions=("v25.04.0",),
        schema_version="v25_04_0",
        vm_create=True,
        statuses=("RUNNING", "STOPPED", "UNKNOWN"),
        transitional_statuses=False,
        snapshot_namespace="zfs.snapshot",
    ),
    "25.04.2": Profile(
        name="25.04.2",
        system_version="TrueNAS-25.04.2.6",
        api_versions=("v25.04.0", "v25.04.1", "v25.04.2"),
        schema_version="v25_04_2",
        has_vm=True,
        vm_import_disk_image=True,
        snapshot_namespace="zfs.snapshot",
        vm_libvirt_events=True,
    ),
    "25.10": Profile(
        name="25.10",
        system_version="TrueNAS-25.10.1",
        api_versions=("v25.04.0", "v25.04.1", "v25.04.2", "v25.10.0", "v25.10.1"),
        schema_version="v25_10_0",
        legacy_jobs_option=True,
        privileged_mode=True,
        cdrom=True,
        nic_mac=True,
        set_bootable_disk=True,
        vm_autostart_forbidden=True,
        message_ids=True,
        has_vm=True,
        vm_convert=True,
        vm_import_disk_image=True,
        vm_libvirt_events=True,
    ),
    "26.0": TRUENAS_26,
    "27.0": replace(
        TRUENAS_26,
        name="27.0",
        # middleware master (66d9e1b9c3) carries 27.0.0-BETA.1 work; no 27 release exists yet
        system_version="TrueNAS-27.0.0-BETA.1",
        api_versions=(
            *("v25.04.0", "v25.04.1", "v25.04.2", "v25.10.0", "v25.10.1", "v25.10.2", "v25.10.5"),
            *("v26.0.0", "v27.0.0"),
        ),
        schema_version="v27_0_0",
        api27=True,
    ),
}
PROFILE_ALIASES = {
    "25.04": "25.04.0",
    "25.10.0": "25.10",
    "25.10.1": "25.10",
    "26": "26.0",
    "26.0.0": "26.0",
    "27": "27.0",
    "27.0.0": "27.0",
}


def get_profile(name: str) -> Profile:
    key = PROFILE_ALIASES.get(name, name)
    try:
        return PROFILES[key]
    except KeyError:
        raise ValueError(f"unknown TrueNAS profile {name!r}; choose one of {', '.join(PROFILES)}") from None
