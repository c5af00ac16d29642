"""The marks the operator leaves in a VM's description (they outlive the operator): that it made the
VM, and short digests of what its seed holds (so a later environment or cloud-init is known to be
undelivered)."""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

from ...types import InstanceConfig

MANAGED_MARK = "managed by truenas-incus-operator"
SEED_MARK = re.compile(r"seed env=(\w+) cloud-init=(\w+)(?: net=(\w+))?")
"""The seed's marks; ``net`` (the network-config alone) is absent from VMs made before it had one."""
FIRST_BOOT_ONLY = "applies at first boot only"
NEXT_START = "takes effect at the next start"


def made_by_operator(entry: dict[str, Any]) -> bool:
    """The operator's own VMs say so in their description (``_create_vm``)."""
    return str(entry.get("description") or "").endswith(MANAGED_MARK)


def fingerprint(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:12]


def seed_marks(config: InstanceConfig) -> tuple[str, str, str]:
    """What the seed holds, as short digests kept in the VM's description (they outlive the operator):
    the environment, cloud-init's user-data and network-config together, the network-config alone."""
    return (
        fingerprint(config.environment),
        fingerprint(config.cloud_init_user_data, config.cloud_init_network_config),
        fingerprint(config.cloud_init_network_config),
    )


def seed_mark_text(config: InstanceConfig) -> str:
    return "seed env={} cloud-init={} net={}".format(*seed_marks(config))


def description(config: InstanceConfig, version: str) -> str:
    """``version``: the image's (``debian/bookworm (debian 12)``), or what a clone was made of."""
    made_of = f"{config.image} ({version})" if config.image else version
    return f"{made_of}, {seed_mark_text(config)}, {MANAGED_MARK}"
