"""CEL helpers and the instance's admission rules (``x-kubernetes-validations``), beside the
models that carry them; the root-level transition rules (``INSTANCE_ROOT_RULES``) exist only here."""

from __future__ import annotations

from pydantic.config import JsonDict, JsonValue

from .limits import (
    DEVICE_PATHS_TOTAL_MAX_LENGTH,
    EXTRA_KEY_PATTERN,
    EXTRA_NIC_OWNED_KEYS,
    EXTRA_OWNED_KEYS,
    INSTANCE_NAME_PATTERN,
    SERVICE_NAME_PATTERN,
)


def _cel(rule: str, message: str, field_path: str | None = None) -> JsonDict:
    validation: JsonDict = {"rule": rule, "message": message}
    if field_path:
        validation["fieldPath"] = field_path
    return validation


def _cel_list(values: tuple[str, ...] | list[str]) -> str:
    return "[" + ", ".join(f"'{v}'" for v in values) + "]"


_EXTRA_RULES: list[JsonValue] = [
    _cel(
        f"self.all(k, k.matches('{EXTRA_KEY_PATTERN}'))",
        "keys must be TrueNAS field names: lowercase letters, digits and '_', at most 32 characters",
    ),
]

_DEVICE_RULES: list[JsonValue] = [
    _cel(
        f"!has(self.extra) || !self.extra.exists(k, k in {_cel_list(EXTRA_OWNED_KEYS)})",
        "extra may not set " + ", ".join(EXTRA_OWNED_KEYS) + ": the typed fields name, type, source, "
        "destination and readonly own them",
        ".extra",
    ),
    _cel(
        f"self.type != 'NIC' || !has(self.extra) || !self.extra.exists(k, k in {_cel_list(EXTRA_NIC_OWNED_KEYS)})",
        "extra of a NIC may not set " + ", ".join(EXTRA_NIC_OWNED_KEYS) + ": declare the NIC in spec.nics "
        "(type, parent, hwaddr)",
        ".extra",
    ),
]


# Device types each instance type can have. Admission cannot know which TrueNAS a connection reaches,
# so it refuses what every TrueNAS version refuses; a type one version lacks (TPM and PROXY on
# TrueNAS 26 containers, truenas-vm-container.md §3.5) is reported in status by that version's backend.
#  * virt.instance, 25.04-25.10 (truenas-api.md §5, schemas truenas-schemas/v25_*.virt.device.json):
#    DISK, NIC, USB, TPM and GPU for both types (TPM: "containers default /dev/tpm0");
#    PCI only for VMs ("PCI passthrough is only supported for vms"), CDROM only for VMs (25.10,
#    "Container instance type is not supported"); PROXY is built with bind=host and without NAT
#    (truenas-api.md §5, "Incus mapping"), which Incus allows for containers only (Incus docs,
#    reference/devices_proxy: "VMs (NAT mode only)").
#  * container.*, 26 (truenas-vm-container.md §3.5): FILESYSTEM (our DISK), NIC, GPU, USB.
#  * vm.*, 25.04.2+ (truenas-vm-container.md §2.5): no PROXY device at all (nor TPM/GPU: a VM flag and PCI).
DEVICE_TYPES_BY_INSTANCE_TYPE: dict[str, tuple[str, ...]] = {
    "VM": ("DISK", "NIC", "GPU", "USB", "TPM", "PCI", "CDROM"),
    "CONTAINER": ("DISK", "NIC", "GPU", "USB", "TPM", "PROXY"),
}
_VM_ONLY = tuple(t for t in DEVICE_TYPES_BY_INSTANCE_TYPE["VM"] if t not in DEVICE_TYPES_BY_INSTANCE_TYPE["CONTAINER"])
_CONTAINER_ONLY = tuple(
    t for t in DEVICE_TYPES_BY_INSTANCE_TYPE["CONTAINER"] if t not in DEVICE_TYPES_BY_INSTANCE_TYPE["VM"]
)


def _device_type_rule(instance_type: str, refused: tuple[str, ...], why: str) -> JsonDict:
    # A static message: messageExpression listing the offending names costs too much for the API
    # server's estimate; the message names the types, and each name in the list has one type.
    kinds = " or ".join(refused)
    present = f"self.devices.exists(d, d.type in {_cel_list(refused)})"
    return _cel(
        f"self.type != '{instance_type}' || !has(self.devices) || !{present}",
        f"spec.devices: a {instance_type} cannot have {kinds} devices: {why}",
        ".devices",
    )


_CROSS_FIELD_RULES: list[JsonValue] = [
    _cel(
        "!(has(self.image) && has(self.source))",
        "at most one of spec.image and spec.source may be set: an image to build from, or a snapshot to clone",
    ),
    _cel(
        "has(self.image) || has(self.source) || (has(self.managementPolicy) && self.managementPolicy == 'ObserveOnly')",
        "exactly one of spec.image and spec.source must be set (only spec.managementPolicy ObserveOnly may "
        "leave both out): an image to build from, or a snapshot to clone",
    ),
    _device_type_rule("CONTAINER", _VM_ONLY, " and ".join(_VM_ONLY) + " devices are only supported for VMs"),
    _device_type_rule(
        "VM", _CONTAINER_ONLY, " and ".join(_CONTAINER_ONLY) + " devices are only supported for containers"
    ),
    _cel(
        "!has(self.devices) || self.devices.all(d, d.type != 'DISK' || has(d.source))",
        "spec.devices: a DISK device needs a source",
        ".devices",
    ),
    _cel(
        "self.type == 'VM' || !has(self.devices) || self.devices.all(d, d.type != 'DISK' || has(d.destination))",
        "spec.devices: a DISK device of a CONTAINER needs a destination",
        ".devices",
    ),
    _cel(
        "!has(self.devices) || !has(self.nics) || self.nics.all(n, self.devices.all(d, d.name != n.name))",
        "spec.nics: a NIC may not share its name with an entry of spec.devices",
        ".nics",
    ),
    _cel(
        "!has(self.nics) || !self.nics.exists(n, has(n.addresses)) || "
        "!has(self.cloudInit) || !has(self.cloudInit.networkConfig)",
        "spec.nics[].addresses and spec.cloudInit.networkConfig: one network-config only",
        ".nics",
    ),
    _cel(
        "!has(self.nics) || !self.nics.exists(n, has(n.addresses)) || self.nics.all(n, has(n.hwaddr))",
        "spec.nics: with addresses, every NIC needs hwaddr (the guest matches it by MAC)",
        ".nics",
    ),
    _cel(
        "!has(self.devices) || self.devices.map(d, (has(d.source) ? size(d.source) : 0) + "
        f"(has(d.destination) ? size(d.destination) : 0)).sum() <= {DEVICE_PATHS_TOTAL_MAX_LENGTH}",
        f"spec.devices: sources and destinations of all devices together may not exceed "
        f"{DEVICE_PATHS_TOTAL_MAX_LENGTH} characters",
        ".devices",
    ),
]

# An instance exists on TrueNAS (or is being created) once the operator wrote status.instanceId or a
# phase other than Pending and Error. Until then image, type, name and storagePool can be corrected in
# place (a typo, a create TrueNAS refused); afterwards they are immutable. Root-level transition rules,
# because only the whole object sees the status next to the spec.
#
# status.binding is the anchor: the operator sets it once, when it starts the create or sees the
# instance it created or adopted, keeps it through connection and authentication failures, and removes
# it only when TrueNAS answers that the instance is gone. Tenants have no rights on the status
# subresource, and a spec update cannot change the status (the API server keeps the old one), so
# oldSelf.status is what the operator last wrote. instanceId and the phase still count, for a status
# written before status.binding existed.
_NOT_CREATED = (
    "!has(oldSelf.status) || (!has(oldSelf.status.binding) && !has(oldSelf.status.instanceId) && "
    "(!has(oldSelf.status.phase) || oldSelf.status.phase in ['Pending', 'Error']))"
)


def _immutable(field: str, message: str, also: str = "") -> JsonDict:
    """Also refuses adding or removing an optional field (``has`` on both sides); ``also``: a CEL
    condition under which a change is allowed all the same."""
    same = (
        f"has(self.spec.{field}) == has(oldSelf.spec.{field}) && "
        f"(!has(self.spec.{field}) || self.spec.{field} == oldSelf.spec.{field})"
    )
    return _cel(f"{_NOT_CREATED} || ({same}){f' || ({also})' if also else ''}", message, f".spec.{field}")


_CREATED_NOTE = "once the instance exists on TrueNAS (status.binding set: created, adopted or a create under way)"
# Checked on the whole object: metadata.name becomes the instance name when spec.name is omitted.
INSTANCE_ROOT_RULES: list[JsonValue] = [
    _cel(
        f"!has(self.spec.expose) || self.metadata.name.matches('{SERVICE_NAME_PATTERN}')",
        "spec.expose: the Service is named after the IncusInstance, and metadata.name is not a DNS label "
        "(lowercase letters, digits and '-', at most 63, starting with a letter)",
        ".spec.expose",
    ),
    _cel(
        f"has(self.spec.name) || self.metadata.name.matches('{INSTANCE_NAME_PATTERN}')",
        "metadata.name is not a valid Incus instance name (letters, digits and '-', 1-63 characters, "
        "starting with a letter): set spec.name",
    ),
    _immutable("name", f"spec.name is immutable {_CREATED_NOTE}: the instance cannot be renamed"),
    _immutable("type", f"spec.type is immutable {_CREATED_NOTE}"),
    _immutable(
        "image",
        f"spec.image is immutable {_CREATED_NOTE}: an instance cannot be rebuilt from another image (naming one "
        "for an observed instance that had none is allowed)",
        # An ObserveOnly resource may leave both out; naming the image later (to switch to Full) records
        # what the instance was made from and builds nothing (the instance exists: adopted, never re-created).
        also="!has(oldSelf.spec.image) && !has(oldSelf.spec.source) && !has(self.spec.source)",
    ),
    _immutable(
        "source",
        f"spec.source is immutable {_CREATED_NOTE}: an instance cannot be rebuilt from another snapshot",
    ),
    _immutable("storagePool", f"spec.storagePool is immutable {_CREATED_NOTE}"),
    _immutable(
        "connectionRef",
        f"spec.connectionRef is immutable {_CREATED_NOTE}: the resource stays bound to the TrueNAS its instance "
        "lives on",
    ),
]
