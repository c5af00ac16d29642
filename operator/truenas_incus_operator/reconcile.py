"""Desired vs observed -> a plan of actions. Pure functions: no kopf, no I/O.

The controller executes a plan's actions in order and then plans again from fresh observations,
so every function here only has to answer "what is the next step from this state".
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from .models import (
    ADOPT_ANNOTATION,
    EFFECTIVE_DEFAULTS,
    DeletionPolicy,
    IncusInstanceSpec,
    InstanceBinding,
    ManagementPolicy,
    PowerState,
)
from .netconfig import network_config
from .problems import Reason
from .truenas.types import (
    UNSET,
    CloneSource,
    DeviceConfig,
    InstanceChanges,
    InstanceConfig,
    InstanceStatus,
    ObservedInstance,
)

UNCHANGEABLE = (InstanceStatus.FROZEN, InstanceStatus.ERROR, InstanceStatus.UNKNOWN)
"""States the operator leaves alone: it reports them and acts on none."""


@dataclass(frozen=True)
class Ownership:
    """What the ownership ledger (and the administrator's policy) say about the instance name on
    this TrueNAS. Never derived from annotations or status: tenants write those."""

    mine: bool = False
    """The ledger names this resource (by UID) as the instance's owner."""
    holder: str | None = None
    """Who else holds the instance in the ledger, as this resource may be told (``ledger.describe_holder``:
    never another resource's namespace or name)."""
    adopt_requested: bool = False
    """The resource carries ``incus.truenas.io/adopt: "true"`` (a request, not a right)."""
    adopt_allowed: bool = False
    """The administrator's policy allows adoption for this namespace and connection."""
    elsewhere: str | None = None
    """This resource already owns an existing instance under another name or on another TrueNAS
    (``name on host:port``): it must not create or adopt a second one."""
    adopted: bool = False
    """The ledger says the resource adopted the instance (the operator did not create it)."""
    unfinished: bool = False
    """The ledger still says ``creating``: the create call of this resource never returned (the
    operator stopped during it), so an instance under the name may be half-built (vm.* builds a VM in
    several calls). The create is called again: the backend completes what it finds, or says it exists."""
    devices_managed: bool = False
    """The operator manages the instance's devices even when the spec lists none: it created the
    instance, or it applied the spec's devices to it before (so removing them from the spec removes
    them on TrueNAS)."""
    observing: bool = False
    """The ledger names this resource as the instance's observer (spec.managementPolicy ObserveOnly on
    an instance it did not create): it reads the instance, and never writes to or deletes it."""
    observe_allowed: bool = False
    """The administrator's policy allows observing instances this resource did not create (observation)."""
    revoked: bool = False
    """The ledger names this resource as the instance's observer, and the policy no longer allows it:
    the resource is treated as holding nothing (``mine`` False: nothing of the instance is shown), and
    the loop releases the record (``Unobserve``), whatever spec.managementPolicy says now."""


@dataclass(frozen=True)
class Hold:
    """A snapshot or restore holds the instance's power state for a while (snapshots/): the loop
    stops (or starts) it as if the spec said so, and nothing else acts on its power meanwhile."""

    power: str
    """``Stopped`` or ``Running``."""
    by: str
    """Who holds it, for the status: ``IncusInstanceRestore db-before-upgrade``."""


@dataclass(frozen=True)
class Desired:
    """An IncusInstance as the reconciler sees it."""

    namespace: str
    name: str
    generation: int
    spec: IncusInstanceSpec
    uid: str = ""
    deleting: bool = False
    ownership: Ownership = Ownership()
    bound: InstanceBinding | None = None
    """``status.binding`` as the operator last wrote it: the instance the resource is bound to and the
    spec it was created or adopted with (tenants cannot write status; it only ever restricts)."""
    hold: Hold | None = None
    """A snapshot or restore in progress holds the power state (never from the body)."""
    clone: CloneSource | None = None
    """spec.source's snapshot as the ledger proves it (resolved before a create; never from the body)."""
    paused: bool = False
    """incus.truenas.io/paused: "true" (the tenant's own switch: it only ever stops writes)."""

    @property
    def instance_name(self) -> str:
        return self.spec.name or self.name

    @property
    def connection_ref(self) -> str | None:
        return self.spec.connection_ref.name if self.spec.connection_ref else None

    def binding(self) -> InstanceBinding:
        """What ``status.binding`` records when this spec creates or adopts the instance."""
        return InstanceBinding(
            name=self.instance_name,
            type=str(self.spec.type),
            image=self.spec.image,
            source=self.spec.source.snapshot_ref.name if self.spec.source else None,
            storage_pool=self.spec.storage_pool,
            connection_ref=self.connection_ref,
        )

    def immutable_changes(self) -> tuple[str, ...]:
        """The spec fields that differ from what the bound instance was created or adopted with
        (admission refuses these changes; this holds where it was bypassed or raced)."""
        if self.bound is None:
            return ()
        now, then = self.binding(), self.bound
        fields = (
            ("spec.name", now.name, then.name),
            ("spec.type", now.type, then.type),
            ("spec.image", now.image, then.image),
            ("spec.source.snapshotRef.name", now.source, then.source),
            ("spec.storagePool", now.storage_pool, then.storage_pool),
            ("spec.connectionRef", now.connection_ref, then.connection_ref),
        )
        return tuple(
            f"{field} is {new!r}, the instance was made with {old!r}"
            for field, new, old in fields
            if new != old and not (field == "spec.image" and old is None and then.source is None)
        )  # an image named for an instance made from none (observed, adopted): it records, builds nothing

    @property
    def owns(self) -> bool:
        return self.ownership.mine

    @property
    def observe_only(self) -> bool:
        """spec.managementPolicy ObserveOnly: nothing is ever written to TrueNAS for this resource."""
        return self.spec.management_policy == ManagementPolicy.OBSERVE_ONLY

    @property
    def power_state(self) -> str:
        if self.hold is not None:
            return self.hold.power
        return str(self.spec.power_state or EFFECTIVE_DEFAULTS["power_state"])

    @property
    def stop_timeout(self) -> int:
        value = self.spec.stop_timeout_seconds
        return int(EFFECTIVE_DEFAULTS["stop_timeout_seconds"] if value is None else value)

    @property
    def deletion_policy(self) -> str:
        """Effective: an ObserveOnly resource never deletes its instance, whatever spec.deletionPolicy says."""
        if self.observe_only or self.ownership.observing:
            return str(DeletionPolicy.ORPHAN)
        return str(self.spec.deletion_policy or EFFECTIVE_DEFAULTS["deletion_policy"])

    @property
    def autostart(self) -> bool:
        return bool(EFFECTIVE_DEFAULTS["autostart"] if self.spec.autostart is None else self.spec.autostart)

    @property
    def lists_devices(self) -> bool:
        return bool(self.spec.devices or self.spec.nics)

    @property
    def manages_devices(self) -> bool:
        """Whether the instance's devices must match the spec's (absent or empty lists included)."""
        return bool(self.spec.devices or self.spec.nics or self.ownership.devices_managed)


# ----- actions ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Claim:
    """Record this resource as the owner in the ledger before creating (crash safety, no twin)."""


@dataclass(frozen=True)
class Adopt:
    """Record this resource as the owner of an instance that exists and that nobody holds."""


@dataclass(frozen=True)
class Observe:
    """Record this resource as the observer of an instance that exists and that nobody holds (a write
    to the ledger only: an ObserveOnly resource never writes to TrueNAS)."""


@dataclass(frozen=True)
class Unobserve:
    """The administrator's policy no longer grants the observation this resource holds: the ledger
    forgets the observer (no TrueNAS call), and the status stops mirroring the instance."""


@dataclass(frozen=True)
class Create:
    config: InstanceConfig


@dataclass(frozen=True)
class Update:
    changes: InstanceChanges


@dataclass(frozen=True)
class AddDevice:
    device: DeviceConfig


@dataclass(frozen=True)
class UpdateDevice:
    device: DeviceConfig
    target: str
    """The observed device's name (its id where the backend keeps no names)."""


@dataclass(frozen=True)
class RemoveDevice:
    name: str
    """The observed device's name (or id)."""


@dataclass(frozen=True)
class Start:
    overcommit: bool = False
    """vm.*: start although TrueNAS cannot guarantee the memory (``spec.memoryOvercommit``)."""


@dataclass(frozen=True)
class Stop:
    """Graceful within ``timeout`` seconds, then forced."""

    timeout: int


@dataclass(frozen=True)
class Delete:
    pass


Action = (
    Claim
    | Adopt
    | Observe
    | Unobserve
    | Create
    | Update
    | AddDevice
    | UpdateDevice
    | RemoveDevice
    | Start
    | Stop
    | Delete
)


@dataclass(frozen=True)
class Blocked:
    """The reconciler must not act; ``reason`` and ``message`` go into the Synced condition."""

    reason: Reason
    message: str
    ours: bool = False
    """The instance (if it exists) is this resource's: status may report it (e.g. PolicyDenied)."""


@dataclass(frozen=True)
class Plan:
    actions: tuple[Action, ...] = ()
    blocked: Blocked | None = None
    waiting: str | None = None
    """TrueNAS is busy with the instance (e.g. STARTING): the event that ends it (or the next resync) wakes the loop."""
    unsupported: tuple[str, ...] = ()
    notes: tuple[str, ...] = field(default=())
    observing: bool = False
    """An ObserveOnly plan: ``actions`` hold no TrueNAS write, ``differences`` say what Full would do."""
    differences: tuple[str, ...] = ()
    """ObserveOnly: what Full would change, each in a few words (never an environment value)."""
    paused: bool = False
    """The resource is paused (incus.truenas.io/paused): ``actions`` are what it would do, none is done."""


# ----- translation -------------------------------------------------------------------------------------
def desired_devices(spec: IncusInstanceSpec) -> tuple[DeviceConfig, ...]:
    """Devices and NICs of the spec as backend-neutral device configs."""
    devices = [
        DeviceConfig(
            name=d.name,
            type=str(d.type),
            source=d.source,
            destination=d.destination,
            readonly=bool(d.readonly),
            extra=dict(d.extra or {}),
        )
        for d in spec.devices or []
    ]
    for nic in spec.nics or []:
        extra: dict[str, Any] = {"nic_type": str(nic.type or EFFECTIVE_DEFAULTS["nic_type"]).upper()}
        if nic.parent:
            extra["parent"] = nic.parent
        if nic.hwaddr:
            extra["mac"] = nic.hwaddr.lower().replace("-", ":")
        devices.append(DeviceConfig(name=nic.name, type="NIC", extra=extra))
    return tuple(devices)


def instance_config(desired: Desired) -> InstanceConfig:
    spec = desired.spec
    return InstanceConfig(
        name=desired.instance_name,
        type=str(spec.type),
        image=spec.image,
        storage_pool=spec.storage_pool,
        cpu=spec.cpu,
        memory=spec.memory_bytes(),
        autostart=desired.autostart,
        environment=dict(spec.environment or {}),
        devices=desired_devices(spec),
        root_disk_size=spec.root_disk_bytes(),
        cloud_init_user_data=spec.cloud_init.user_data if spec.cloud_init else None,
        cloud_init_network_config=(spec.cloud_init.network_config if spec.cloud_init else None)
        or network_config(spec.nics),
        network_declared=any(n.addresses for n in spec.nics or []),
        memory_overcommit=bool(spec.memory_overcommit),
        source=desired.clone,
        wants_address=bool(spec.readiness and spec.readiness.address),
    )


def config_changes(config: InstanceConfig, observed: ObservedInstance) -> InstanceChanges:
    """cpu, memory, autostart and environment that differ (omitted limits mean no limit). An environment
    TrueNAS cannot show (``None``) is not compared: the backend's ``deferred_fields`` says when it differs."""
    memory = config.memory
    if memory is not None:
        memory = memory // 2**20 * 2**20  # TrueNAS keeps whole MiB; compare like with like
    return InstanceChanges(
        cpu=None if config.cpu == observed.cpu else (config.cpu if config.cpu is not None else UNSET),
        memory=None if memory == observed.memory else (memory if memory is not None else UNSET),
        autostart=None if config.autostart == observed.autostart else config.autostart,
        environment=None
        if observed.environment is None or config.environment == observed.environment
        else dict(config.environment),
    )


def device_differs(want: DeviceConfig, have: DeviceConfig) -> bool:
    """Compares only what the spec says (TrueNAS fills in defaults for the rest)."""
    if want.type != have.type or want.readonly != have.readonly:
        return True
    if want.source is not None and want.source != have.source:
        return True
    if want.destination is not None and want.destination != have.destination:
        return True
    return any(have.extra.get(key) != value for key, value in want.extra.items())


def by_name(device: DeviceConfig) -> str:
    return device.name


def device_actions(
    wanted: tuple[DeviceConfig, ...], devices: list[DeviceConfig], identity: Callable[[DeviceConfig], str] = by_name
) -> list[Action]:
    """Removals, additions and changes that turn ``devices`` (observed) into ``wanted``."""
    want = {identity(d): d for d in wanted}
    have = {identity(d): d for d in devices if not d.inherited}
    actions: list[Action] = [RemoveDevice(d.name) for key, d in have.items() if key not in want]
    for key, device in want.items():
        if key not in have:
            actions.append(AddDevice(device))
        elif device_differs(device, have[key]):
            actions.append(UpdateDevice(device, have[key].name))
    return actions


# ----- planning ------------------------------------------------------------------------------------------
def plan(
    desired: Desired,
    observed: ObservedInstance | None,
    devices: list[DeviceConfig] | None = None,
    unsupported: tuple[str, ...] = (),
    config: InstanceConfig | None = None,
    identity: Callable[[DeviceConfig], str] = by_name,
) -> Plan:
    """The next steps toward the spec.

    ``config`` is the spec as the backend can apply it (``InstanceBackend.honoured``): fields it
    cannot honour are left out, so they are reported (``unsupported``) instead of retried forever.
    ``devices`` is None when they were not read this time.
    """
    config = config or instance_config(desired)
    ownership = desired.ownership
    changed = desired.immutable_changes()
    if changed:
        bound = desired.bound
        same_instance = bound is not None and (bound.name, bound.connection_ref) == (
            desired.instance_name,
            desired.connection_ref,
        )
        return Plan(
            blocked=Blocked(
                Reason.IMMUTABLE_FIELD_CHANGED,
                "; ".join(changed) + ": an instance cannot be renamed, moved or rebuilt; restore the spec, or delete "
                "the resource and create a new one",
                ours=same_instance and ownership.mine,
            )
        )
    if ownership.holder is not None:
        return Plan(
            blocked=Blocked(
                Reason.CONFLICT,
                f"the instance {desired.instance_name!r} is already managed by {ownership.holder}",
            )
        )
    if ownership.elsewhere is not None and not ownership.mine:
        return Plan(
            blocked=Blocked(
                Reason.OWNS_ELSEWHERE,
                f"this resource already owns the instance {ownership.elsewhere}; it cannot also manage "
                f"{desired.instance_name!r} here (was its connection or name changed around admission?). Restore "
                "the spec, or delete the resource",
            )
        )
    if ownership.observing:
        return _observed_not_managed(desired, observed)
    if observed is None:
        if ownership.mine and ownership.adopted:
            return Plan(
                blocked=Blocked(
                    Reason.INSTANCE_GONE,
                    f"the adopted instance {desired.instance_name!r} no longer exists on TrueNAS (deleted outside the "
                    "operator, or not carried over by a TrueNAS upgrade); the operator does not re-create what it "
                    "did not create: delete this resource (nothing is left to delete on TrueNAS)",
                    ours=True,
                )
            )
        if "type" in unsupported:
            return Plan(blocked=Blocked(Reason.UNSUPPORTED, _vm_unsupported_message(desired)), unsupported=unsupported)
        actions: list[Action] = [] if ownership.mine else [Claim()]
        actions.append(Create(config))
        return Plan(actions=tuple(actions), unsupported=unsupported)

    if observed.type != str(desired.spec.type) and (ownership.mine or ownership.adopt_requested):
        return Plan(
            blocked=Blocked(
                Reason.TYPE_MISMATCH,
                f"the instance {desired.instance_name!r} on TrueNAS is a {observed.type}, the spec asks for a "
                f"{desired.spec.type}",
            )
        )
    if not ownership.mine:
        return _not_ours(desired)
    if observed.status.transitional:
        return Plan(waiting=f"TrueNAS reports {observed.status}", unsupported=unsupported)
    if ownership.unfinished:
        return Plan(actions=(Create(config),), unsupported=unsupported)

    steps: list[Action] = []
    changes = config_changes(config, observed)
    if not changes.is_empty():
        steps.append(Update(changes))
    if devices is not None:
        steps.extend(device_actions(config.devices, devices, identity))
    power = desired.power_state
    if power == PowerState.RUNNING and observed.status == InstanceStatus.STOPPED:
        steps.append(Start(overcommit=config.memory_overcommit))
    elif power == PowerState.STOPPED and observed.status == InstanceStatus.RUNNING:
        steps.append(Stop(desired.stop_timeout))
    notes: tuple[str, ...] = ()
    if power != PowerState.MANUAL and observed.status in UNCHANGEABLE:
        notes = (f"TrueNAS reports {observed.status}; the operator does not change a {observed.status} instance",)
    if desired.hold is not None:
        notes = (*notes, f"{desired.hold.power.lower()} for {desired.hold.by}")
    return Plan(actions=tuple(steps), unsupported=unsupported, notes=notes)


def plan_delete(desired: Desired, observed: ObservedInstance | None) -> Plan:
    """Steps to remove the instance when the resource is deleted."""
    if desired.deletion_policy == DeletionPolicy.ORPHAN or observed is None:
        return Plan()
    if not desired.owns:
        return Plan(
            notes=(f"the instance {desired.instance_name!r} was never managed by this resource; left in place",)
        )
    if observed.status.transitional:
        return Plan(waiting=f"TrueNAS reports {observed.status}")
    steps: list[Action] = []
    if observed.status == InstanceStatus.RUNNING:
        steps.append(Stop(desired.stop_timeout))
    steps.append(Delete())
    return Plan(actions=tuple(steps))


def plan_observe(
    desired: Desired,
    observed: ObservedInstance | None,
    devices: list[DeviceConfig] | None = None,
    unsupported: tuple[str, ...] = (),
    config: InstanceConfig | None = None,
    identity: Callable[[DeviceConfig], str] = by_name,
) -> Plan:
    """spec.managementPolicy ObserveOnly: never a TrueNAS write. The only action is ``Observe`` (the
    ledger records the observer of an instance nobody holds, where the policy allows observing);
    ``differences`` says what Full would change (the InSync condition), from Full's own plan."""
    ownership = desired.ownership
    if ownership.holder is not None:
        return Plan(
            blocked=Blocked(
                Reason.CONFLICT, f"the instance {desired.instance_name!r} is already managed by {ownership.holder}"
            ),
            observing=True,
        )
    if ownership.elsewhere is not None and not ownership.mine:
        message = f"this resource already owns or observes the instance {ownership.elsewhere}; it cannot also observe"
        return Plan(blocked=Blocked(Reason.OWNS_ELSEWHERE, f"{message} {desired.instance_name!r}"), observing=True)
    if ownership.revoked or (ownership.observing and not ownership.observe_allowed):
        return Plan(actions=(Unobserve(),), observing=True)  # the grant was taken back: the record goes
    if observed is None:
        return Plan(observing=True, differences=("create the instance (it does not exist on TrueNAS)",))
    if not ownership.mine:
        if not ownership.observe_allowed:
            return Plan(
                blocked=Blocked(
                    Reason.OBSERVE_NOT_ALLOWED,
                    f"an instance named {desired.instance_name!r} exists on TrueNAS and was not created by this "
                    f"resource; the administrator's policy does not allow observing it in namespace "
                    f"{desired.namespace!r} on this connection (policy: observation)",
                ),
                observing=True,
            )
        return Plan(actions=(Observe(),), observing=True)
    as_full = replace(
        desired,
        ownership=replace(ownership, observing=False, adopted=ownership.adopted or ownership.observing),
    )
    full = plan(as_full, observed, devices, unsupported, config=config, identity=identity)
    differences: list[str] = []
    if observed.type != str(desired.spec.type):
        differences.append(f"type: TrueNAS has a {observed.type}, the spec says {desired.spec.type}")
    if full.blocked is not None:
        differences.append(f"refuse it ({full.blocked.reason}): {full.blocked.message}")
    differences.extend(describe_action(action, observed) for action in full.actions)
    return Plan(observing=True, differences=tuple(differences), unsupported=full.unsupported, notes=full.notes)


def describe_action(action: Action, observed: ObservedInstance | None = None) -> str:
    """What an action would do, in a few words (for InSync): never an environment value (those can be secrets)."""
    if isinstance(action, Update):
        changes = action.changes
        parts = []
        if changes.cpu is not None:
            cpus = observed.cpu if observed is not None else None
            parts.append(f"cpu {cpus or 'no limit'} -> {changes.cpu if changes.cpu is not UNSET else 'no limit'}")
        if changes.memory is not None:
            have = observed.memory if observed is not None else None
            parts.append(f"memory {_mib(have)} -> {_mib(None if changes.memory is UNSET else changes.memory)}")
        if changes.autostart is not None:
            parts.append(f"autostart -> {changes.autostart}")
        if changes.environment is not None:
            had = set((observed.environment or {}) if observed is not None else {})
            keys = sorted(had ^ set(changes.environment)) or sorted(changes.environment)
            parts.append(f"environment ({', '.join(keys[:8])}{', ...' if len(keys) > 8 else ''})")
        return "update " + ", ".join(parts)
    if isinstance(action, AddDevice):
        return f"add device {action.device.name}"
    if isinstance(action, UpdateDevice):
        return f"change device {action.device.name}"
    if isinstance(action, RemoveDevice):
        return f"remove device {action.name}"
    if isinstance(action, Start):
        return "start it (spec.powerState Running)"
    if isinstance(action, Stop):
        return "stop it (spec.powerState Stopped)"
    if isinstance(action, Create):
        return "finish creating it"
    if isinstance(action, Delete):
        return "delete it"
    return type(action).__name__.lower()


def _mib(amount: Any) -> str:
    return f"{amount // 2**20}Mi" if isinstance(amount, int) else "no limit"


def _observed_not_managed(desired: Desired, observed: ObservedInstance | None) -> Plan:
    """spec.managementPolicy Full on an instance this resource only observed: managing it is an adoption."""
    name = desired.instance_name
    if observed is None:
        return Plan(
            blocked=Blocked(
                Reason.INSTANCE_GONE,
                f"the instance {name!r} this resource observed no longer exists on TrueNAS; the operator does not "
                "create an instance over an observation: delete this resource and apply it again to have it created",
                ours=True,
            )
        )
    if desired.ownership.adopt_requested and desired.ownership.adopt_allowed:
        return Plan(actions=(Adopt(),))
    if desired.ownership.adopt_requested:
        return Plan(
            blocked=Blocked(
                Reason.ADOPTION_NOT_ALLOWED,
                f"this resource observed {name!r} (ObserveOnly); managing it is an adoption, which the administrator's "
                f"policy does not allow in namespace {desired.namespace!r} on this connection (policy: adoption)",
                ours=True,
            )
        )
    return Plan(
        blocked=Blocked(
            Reason.ALREADY_EXISTS,
            f"this resource observed {name!r} (ObserveOnly) and did not create it; to manage it, annotate the "
            f'resource with {ADOPT_ANNOTATION}: "true" where the administrator\'s policy allows adoption',
            ours=True,
        )
    )


def _not_ours(desired: Desired) -> Plan:
    """An instance exists under the name and this resource does not own it."""
    name = desired.instance_name
    if desired.ownership.adopt_requested and desired.ownership.adopt_allowed:
        return Plan(actions=(Adopt(),))
    if desired.ownership.adopt_requested:
        return Plan(
            blocked=Blocked(
                Reason.ADOPTION_NOT_ALLOWED,
                f"an instance named {name!r} already exists on TrueNAS; the administrator's policy does not allow "
                f"adoption in namespace {desired.namespace!r} on this connection (policy: adoption)",
            )
        )
    return Plan(
        blocked=Blocked(
            Reason.ALREADY_EXISTS,
            f"an instance named {name!r} already exists on TrueNAS and was not created by this resource; to manage "
            f'it, annotate the resource with {ADOPT_ANNOTATION}: "true" where the administrator\'s policy allows '
            "adoption",
        )
    )


def _vm_unsupported_message(desired: Desired) -> str:
    return (
        f"this TrueNAS cannot create the Incus VM {desired.instance_name!r}: only TrueNAS 25.04.0 and 25.04.1 "
        "create VMs through virt.instance; 25.04.2 and later create VMs through the vm.* API, and TrueNAS 26 "
        "has no Incus VMs at all. Existing Incus VMs on 25.04.2-25.10 stay manageable: annotate this resource "
        f'with {ADOPT_ANNOTATION}: "true" to take one over (where the policy allows adoption), or use type CONTAINER'
    )
