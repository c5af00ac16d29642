"""Defence in depth behind admission: a device's extra never overrides its typed fields (issue 11 item 9)."""

from __future__ import annotations

from truenas_incus_operator.truenas.backends.container import device_attributes
from truenas_incus_operator.truenas.backends.virt import device_payload
from truenas_incus_operator.truenas.types import DeviceConfig

FORGED = {"dev_type": "DISK", "dtype": "FILESYSTEM", "name": "other", "source": "/mnt/tank/backups", "readonly": True}


def test_virt_payload_typed_fields_win_over_extra() -> None:
    nic = DeviceConfig("eth1", "NIC", extra={**FORGED, "nic_type": "BRIDGED", "parent": "br0"})
    payload = device_payload(nic, with_mac=True)
    assert payload["dev_type"] == "NIC" and payload["name"] == "eth1"
    assert "source" not in payload and "readonly" not in payload
    assert payload["nic_type"] == "BRIDGED" and payload["parent"] == "br0"
    disk = DeviceConfig("data", "DISK", source="/mnt/tank/data", destination="/data", extra={"destination": "/etc"})
    assert device_payload(disk, with_mac=True)["destination"] == "/data"


def test_virt_payload_keeps_type_specific_extra() -> None:
    proxy = {"source_proto": "TCP", "source_port": 8080, "dest_proto": "TCP", "dest_port": 80}
    payload = device_payload(DeviceConfig("http", "PROXY", extra=proxy), with_mac=True)
    assert payload == {"dev_type": "PROXY", "name": "http", **proxy}


def test_container_attributes_typed_dtype_wins_over_extra() -> None:
    gpu = DeviceConfig("gpu", "GPU", extra={"dtype": "FILESYSTEM", "gpu_type": "NVIDIA", "pci_address": "0000:01:00.0"})
    assert device_attributes(gpu) == {"dtype": "GPU", "gpu_type": "NVIDIA", "pci_address": "0000:01:00.0"}
