"""Argo CD diffing: what is applied from Git must come back from the API server unchanged.

Argo CD compares the manifest from Git with the live object; anything the API server adds
(schema defaults), rewrites (quantities, numbers) or drops (pruned fields, nulls) under ``spec``
shows as a perpetual OutOfSync. Each manifest here (the examples, and variations of every field
form users write) is applied to the real kube-apiserver with kubectl, as Argo CD's default
client-side apply does, and with server-side apply (Argo CD's ServerSideApply=true), then read
back: the spec must be exactly what was applied, and ``kubectl diff`` (the API server's dry-run
of the same apply) must show nothing.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from .conftest import ROOT, Cluster

pytestmark = pytest.mark.e2e  # needs the local control plane (kube-apiserver + etcd)

EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
BASE = {"type": "CONTAINER", "image": "debian/bookworm"}
VARIATIONS: dict[str, dict[str, Any]] = {
    "memory-gi": {"memory": "2Gi"},
    "memory-mi-not-canonical": {"memory": "2048Mi"},
    "memory-decimal-si": {"memory": "2G"},
    "memory-mi-over-a-gi": {"memory": "1536Mi"},
    "memory-fractional-gi": {"memory": "1.5Gi"},
    "memory-bytes-int": {"memory": 4294967296},
    "memory-bytes-string": {"memory": "4294967296"},
    "memory-exponent": {"memory": "4e9"},
    "cpu-forms": {"cpu": "0-3,6"},
    "cpu-null": {"cpu": None},
    "autostart-false": {"autostart": False},
    "autostart-null": {"autostart": None},
    "environment-empty": {"environment": {}},
    "environment": {"environment": {"TZ": "UTC", "A_B/C": "x y"}},
    "devices": {
        "devices": [
            {"name": "data", "type": "DISK", "source": "/mnt/tank/data", "destination": "/data", "readonly": False},
            {
                "name": "http",
                "type": "PROXY",
                "extra": {"source_proto": "TCP", "source_port": 8080, "dest_proto": "TCP", "dest_port": 80},
            },
            {"name": "tpm", "type": "TPM", "extra": {"path": "/dev/tpm0", "pathrm": "/dev/tpmrm0"}},
        ]
    },
    "devices-empty": {"devices": []},
    "nics": {"nics": [{"name": "eth1", "type": "macvlan", "parent": "enp1s0", "hwaddr": "10:66:6A:01:02:03"}]},
    "power-and-policy": {"powerState": "Manual", "stopTimeoutSeconds": 0, "deletionPolicy": "Orphan"},
    "names": {"name": "web01", "storagePool": "tank", "connectionRef": {"name": "nas01"}},
}


def instance(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "incus.truenas.io/v1alpha1",
        "kind": "IncusInstance",
        "metadata": {"name": name, "labels": {"app": "web"}, "annotations": {"team": "infra"}},
        "spec": {**BASE, **spec},
    }


def documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d and d["kind"] != "Application"]


def without_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [without_nulls(v) for v in value]
    return value


def check_round_trip(cluster: Cluster, namespace: str, manifest: dict[str, Any], *apply_args: str) -> None:
    # JSON, not YAML: no YAML 1.1/1.2 guessing about what is a number (4e9) between here and kubectl.
    text = json.dumps(manifest)
    applied = cluster.kubectl("apply", "-n", namespace, "-f", "-", *apply_args, input=text, check=False)
    assert applied.returncode == 0, applied.stderr
    live = cluster.get(manifest["kind"].lower(), manifest["metadata"]["name"], namespace)
    # Client-side apply (kubectl's, Argo CD's default) sends null as "remove the field", and Argo CD's
    # three-way diff reads it the same way; server-side apply stores null where the schema allows it.
    expected = manifest if "--server-side" in apply_args else without_nulls(manifest)
    for key in ("spec", "data"):
        if key in manifest:
            assert live[key] == expected[key], f"the API server changed {key}"
    for key in ("labels", "annotations"):
        assert manifest["metadata"].get(key, {}).items() <= live["metadata"].get(key, {}).items()
    diff = cluster.kubectl("diff", "-n", namespace, "-f", "-", *apply_args, input=text, check=False)
    assert diff.returncode == 0, f"kubectl diff shows a difference right after the apply:\n{diff.stdout}{diff.stderr}"


@pytest.mark.parametrize("mode", [[], ["--server-side"]], ids=["client-side", "server-side"])
@pytest.mark.parametrize("example", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_round_trips(cluster: Cluster, namespace: str, example: Path, mode: list[str]) -> None:
    for manifest in documents(example):
        if manifest["kind"] == "Secret":
            continue  # stringData is write-only by design; Secrets are not ours
        check_round_trip(cluster, namespace, manifest, *mode)


@pytest.mark.parametrize("mode", [[], ["--server-side"]], ids=["client-side", "server-side"])
@pytest.mark.parametrize("case", sorted(VARIATIONS))
def test_variation_round_trips(cluster: Cluster, namespace: str, case: str, mode: list[str]) -> None:
    check_round_trip(cluster, namespace, instance(case, VARIATIONS[case]), *mode)


def test_status_in_git_is_not_stored(cluster: Cluster, namespace: str) -> None:
    """status is a subresource: a status committed to Git is dropped, never compared as spec."""
    manifest = copy.deepcopy(instance("with-status", {}))
    manifest["status"] = {"phase": "Running"}
    created = cluster.apply(manifest, namespace)
    assert created.returncode == 0, created.stderr
    assert "status" not in cluster.get("incusinstance", "with-status", namespace)
