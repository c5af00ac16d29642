"""The base model (camelCase on the wire), the enums every resource uses, and ``Condition``."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Annotated

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
)
from pydantic.alias_generators import to_camel


class _Model(BaseModel):
    """camelCase on the wire, snake_case in Python; unknown fields are refused."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        use_enum_values=True,
    )


class InstanceType(StrEnum):
    VM = "VM"
    CONTAINER = "CONTAINER"


class DeviceType(StrEnum):
    DISK = "DISK"
    NIC = "NIC"
    GPU = "GPU"
    USB = "USB"
    TPM = "TPM"
    PROXY = "PROXY"
    PCI = "PCI"
    CDROM = "CDROM"


class NICType(StrEnum):
    BRIDGED = "bridged"
    MACVLAN = "macvlan"


class PowerState(StrEnum):
    RUNNING = "Running"
    STOPPED = "Stopped"
    MANUAL = "Manual"


class DeletionPolicy(StrEnum):
    DELETE = "Delete"
    ORPHAN = "Orphan"


class ManagementPolicy(StrEnum):
    FULL = "Full"
    OBSERVE_ONLY = "ObserveOnly"


class AddressFamily(StrEnum):
    IPV4 = "IPv4"
    IPV6 = "IPv6"


class AddressSource(StrEnum):
    TRUENAS = "TrueNAS"
    """TrueNAS reports it (25.x virt.instance aliases; 27's vm.* guest agent)."""
    DECLARED = "Declared"
    """The spec declares it (spec.nics[].addresses) and the operator applied it."""


class TransportType(StrEnum):
    WEBSOCKET = "websocket"
    REST = "rest"


class Phase(StrEnum):
    PENDING = "Pending"
    CREATING = "Creating"
    STARTING = "Starting"
    RUNNING = "Running"
    STOPPING = "Stopping"
    STOPPED = "Stopped"
    FROZEN = "Frozen"
    ERROR = "Error"
    DELETING = "Deleting"
    UNKNOWN = "Unknown"


class ConditionStatus(StrEnum):
    TRUE = "True"
    FALSE = "False"
    UNKNOWN = "Unknown"


class Condition(_Model):
    """A condition in the standard Kubernetes shape."""

    type: Annotated[str, Field(max_length=316)] = Field(description="Condition type: Ready or Synced.")
    status: ConditionStatus = Field(description="True, False or Unknown.")
    reason: Annotated[str, Field(max_length=1024)] = Field(
        description="A CamelCase reason, e.g. Available, AlreadyExists, ValidationFailed, Unreachable."
    )
    message: Annotated[str, Field(max_length=32768)] = Field(
        description="Human-readable detail, including TrueNAS's own error message."
    )
    last_transition_time: datetime = Field(description="When the status last changed.")
    observed_generation: Annotated[int, Field(ge=0)] | None = Field(
        None, description="metadata.generation this condition was computed for."
    )
