"""The CRDs on a real kube-apiserver: installation, examples, admission refusals, explain, columns."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from truenas_incus_operator.crd import all_crds
from truenas_incus_operator.models import MAX_SPEC_JSON_BYTES

from .conftest import ROOT, Cluster
from .test_models import (
    EXTRA_VALUES,
    KEYS,
    MEMORY_CASES,
    NAMES,
    SNAPSHOT_CASES,
    TYPE_CASES,
    device,
    largest_spec,
    spec_json_size,
)
from .test_models import valid as model_valid

pytestmark = pytest.mark.e2e  # needs the local control plane (kube-apiserver + etcd, helm)

CORPUS: list[dict[str, Any]] = yaml.safe_load((ROOT / "tests" / "admission" / "invalid.yaml").read_text())
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


def test_crds_are_established(cluster: Cluster) -> None:
    for name in (crd["metadata"]["name"] for crd in all_crds()):
        crd = json.loads(cluster.kubectl("get", "crd", name, "-o", "json").stdout)
        conditions = {c["type"]: c["status"] for c in crd["status"]["conditions"]}
        assert conditions["Established"] == "True"
        assert conditions["NamesAccepted"] == "True"
        assert crd["status"]["acceptedNames"]["kind"] in (
            "IncusInstance",
            "TrueNASConnection",
            "IncusInstanceSnapshot",
            "IncusInstanceRestore",
        )


def test_the_api_server_is_a_supported_kubernetes(cluster: Cluster) -> None:
    """The supported range starts at app.MIN_KUBERNETES (the chart's kubeVersion says the same); `make
    test-oldest` runs these tests against that very version (TIO_EXPECT_KUBERNETES)."""
    from truenas_incus_operator.app import MIN_KUBERNETES

    server = json.loads(cluster.kubectl("version", "-o", "json").stdout)["serverVersion"]
    found = (int(server["major"]), int("".join(ch for ch in server["minor"] if ch.isdigit())))
    assert found >= MIN_KUBERNETES, server
    expected = os.environ.get("TIO_EXPECT_KUBERNETES")
    if expected:
        assert f"{found[0]}.{found[1]}" == expected == ".".join(map(str, MIN_KUBERNETES)), server
    chart = yaml.safe_load((ROOT / "charts" / "truenas-incus-operator" / "Chart.yaml").read_text())
    assert chart["kubeVersion"] == f">={MIN_KUBERNETES[0]}.{MIN_KUBERNETES[1]}.0-0"


def test_corpus_is_large_enough() -> None:
    assert len(CORPUS) >= 75


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_is_accepted(cluster: Cluster, namespace: str, example: Path) -> None:
    dry = cluster.kubectl("apply", "-n", namespace, "--dry-run=server", "-f", str(example), check=False)
    assert dry.returncode == 0, dry.stderr
    created = cluster.kubectl("apply", "-n", namespace, "-f", str(example), check=False)
    assert created.returncode == 0, created.stderr
    for document in yaml.safe_load_all(example.read_text()):
        got = cluster.get(document["kind"].lower(), document["metadata"]["name"], namespace)
        if "spec" in document:
            assert got["spec"] == document["spec"], "the API server changed the spec (defaults?)"


@pytest.mark.parametrize("case", CORPUS, ids=[c["case"] for c in CORPUS])
def test_invalid_manifest_is_refused(cluster: Cluster, namespace: str, case: dict[str, Any]) -> None:
    result = cluster.apply(case["manifest"], namespace)
    assert result.returncode != 0, f"{case['case']} was accepted"
    # Both shapes are the API server's own refusal (kubectl validates nothing itself for CRDs).
    assert "Error from server" in result.stderr or " is invalid: " in result.stderr, result.stderr
    for text in case["expect"]:
        assert text in result.stderr, f"{text!r} not in: {result.stderr}"
    kind = case["manifest"]["kind"].lower()
    listed = cluster.kubectl("get", kind, "-n", namespace, "-o", "name").stdout
    assert listed.strip() == "", "a refused manifest left an object behind"


IMMUTABLE_CHANGES = [
    ("name", {"name": "other"}, "spec.name is immutable"),
    ("name-added", {"name": "added"}, "spec.name is immutable"),
    ("type", {"type": "VM"}, "spec.type is immutable"),
    ("image", {"image": "debian/trixie"}, "spec.image is immutable"),
    ("storage-pool", {"storagePool": "fast"}, "spec.storagePool is immutable"),
    # Trust finding 3: pointing a created resource at another NAS would take over a same-named instance there.
    ("connection-ref", {"connectionRef": {"name": "other-nas"}}, "spec.connectionRef is immutable"),
]
# What the operator writes: an instance that exists (instanceId), a create under way (Creating), and
# status.binding alone: what an outage leaves (issue 21 item 1), whatever the phase says.
BINDING = {"name": "web01", "type": "CONTAINER", "image": "debian/bookworm", "storagePool": "tank"}
CREATED = [
    ("exists", {"phase": "Running", "instanceId": "web01"}),
    ("exists-in-error", {"phase": "Error", "instanceId": "web01"}),
    ("creating", {"phase": "Creating"}),
    ("bound-not-observed", {"phase": "Unknown", "binding": BINDING}),
    ("bound-in-error", {"phase": "Error", "binding": BINDING}),
    ("bound-pending", {"phase": "Pending", "binding": BINDING}),
]
# Nothing was created yet: never reconciled, waiting, or a create that failed.
NOT_CREATED = [("no-status", None), ("pending", {"phase": "Pending"}), ("create-failed", {"phase": "Error"})]


def _immutable_case(cluster: Cluster, namespace: str, field: str, status: dict[str, Any] | None) -> dict[str, Any]:
    """Creates an instance resource, writes ``status`` through the status subresource, returns its manifest."""
    spec: dict[str, Any] = {"type": "CONTAINER", "image": "debian/bookworm", "storagePool": "tank", "cpu": "1"}
    if field != "name-added":
        spec["name"] = "web01"
    manifest = {
        "apiVersion": "incus.truenas.io/v1alpha1",
        "kind": "IncusInstance",
        "metadata": {"name": "imm"},
        "spec": spec,
    }
    created = cluster.apply(manifest, namespace)
    assert created.returncode == 0, created.stderr
    if status is not None:
        patch = json.dumps({"status": status})
        cluster.kubectl(
            "patch", "incusinstance", "imm", "-n", namespace, "--subresource=status", "--type=merge", "-p", patch
        )
        assert cluster.get("incusinstance", "imm", namespace)["status"] == status
    return manifest


@pytest.mark.parametrize("state,status", CREATED, ids=[c[0] for c in CREATED])
@pytest.mark.parametrize("field,change,message", IMMUTABLE_CHANGES, ids=[c[0] for c in IMMUTABLE_CHANGES])
def test_immutable_field_change_is_refused_once_created(
    cluster: Cluster,
    namespace: str,
    field: str,
    change: dict[str, Any],
    message: str,
    state: str,
    status: dict[str, Any],
) -> None:
    manifest = _immutable_case(cluster, namespace, field, status)
    spec = manifest["spec"]
    manifest["spec"] = {**spec, **change}
    updated = cluster.apply(manifest, namespace)
    assert updated.returncode != 0, f"{field} changed on a {state} instance"
    assert message in updated.stderr, updated.stderr
    assert "once the instance exists" in updated.stderr, updated.stderr
    assert cluster.get("incusinstance", "imm", namespace)["spec"] == spec
    # A mutable field still changes.
    manifest["spec"] = {**spec, "cpu": "2"}
    assert cluster.apply(manifest, namespace).returncode == 0


@pytest.mark.parametrize("state,status", NOT_CREATED, ids=[c[0] for c in NOT_CREATED])
@pytest.mark.parametrize("field,change,message", IMMUTABLE_CHANGES, ids=[c[0] for c in IMMUTABLE_CHANGES])
def test_failed_or_pending_create_can_be_corrected_in_place(
    cluster: Cluster,
    namespace: str,
    field: str,
    change: dict[str, Any],
    message: str,
    state: str,
    status: dict[str, Any] | None,
) -> None:
    manifest = _immutable_case(cluster, namespace, field, status)
    manifest["spec"] = {**manifest["spec"], **change}
    updated = cluster.apply(manifest, namespace)
    assert updated.returncode == 0, updated.stderr
    assert cluster.get("incusinstance", "imm", namespace)["spec"] == manifest["spec"]


def test_field_can_be_removed_before_creation_but_not_after(cluster: Cluster, namespace: str) -> None:
    manifest = _immutable_case(cluster, namespace, "storage-pool", {"phase": "Error"})
    without_pool = {k: v for k, v in manifest["spec"].items() if k != "storagePool"}
    manifest["spec"] = without_pool
    assert cluster.apply(manifest, namespace).returncode == 0
    patch = json.dumps({"status": {"instanceId": "web01", "phase": "Running"}})
    cluster.kubectl(
        "patch", "incusinstance", "imm", "-n", namespace, "--subresource=status", "--type=merge", "-p", patch
    )
    manifest["spec"] = {**without_pool, "storagePool": "tank"}
    added = cluster.apply(manifest, namespace)
    assert added.returncode != 0 and "spec.storagePool is immutable" in added.stderr, added.stderr


def test_explain_documents_memory(cluster: Cluster) -> None:
    def explained() -> str:
        result = cluster.kubectl("explain", "incusinstance.spec.memory", check=False)
        return result.stdout if result.returncode == 0 and "DESCRIPTION" in result.stdout else ""

    text = " ".join(cluster.wait_for(explained, timeout=60, interval=1, what="kubectl explain to see the CRD").split())
    assert "at least 32Mi" in text
    assert "Kubernetes quantity" in text
    status = cluster.kubectl("explain", "incusinstance.status.conditions").stdout
    assert "Ready" in status and "Synced" in status


def test_printer_columns(cluster: Cluster, namespace: str) -> None:
    manifest = {
        "apiVersion": "incus.truenas.io/v1alpha1",
        "kind": "IncusInstance",
        "metadata": {"name": "cols"},
        "spec": {"type": "CONTAINER", "image": "debian/bookworm"},
    }
    assert cluster.apply(manifest, namespace).returncode == 0
    status = {
        "status": {
            "phase": "Running",
            "cpu": "2",
            "memory": "2Gi",
            "autostart": True,
            "ipAddresses": ["10.142.87.23"],
            "addresses": [{"address": "10.142.87.23", "family": "IPv4", "source": "TrueNAS"}],
            "conditions": [
                {
                    "type": "Ready",
                    "status": "True",
                    "reason": "Available",
                    "message": "running",
                    "lastTransitionTime": "2026-01-01T00:00:00Z",
                },
                {
                    "type": "Synced",
                    "status": "False",
                    "reason": "PolicyDenied",
                    "message": "denied",
                    "lastTransitionTime": "2026-01-01T00:00:00Z",
                },
            ],
        }
    }
    cluster.kubectl(
        "patch",
        "incusinstance",
        "cols",
        "-n",
        namespace,
        "--subresource=status",
        "--type=merge",
        "-p",
        json.dumps(status),
    )
    table = cluster.kubectl("get", "incusinstances", "-n", namespace).stdout.splitlines()
    assert table[0].split() == ["NAME", "TYPE", "PHASE", "CPU", "MEMORY", "AUTOSTART", "IP", "READY", "SYNCED", "AGE"]
    assert table[1].split()[:9] == [
        "cols", "CONTAINER", "Running", "2", "2Gi", "true", "10.142.87.23", "True", "False",
    ]  # fmt: skip
    short = cluster.kubectl("get", "ii", "-n", namespace, "-o", "name").stdout.strip()
    assert short == "incusinstance.incus.truenas.io/cols"


def test_dotted_metadata_name_is_fine_with_spec_name(cluster: Cluster, namespace: str) -> None:
    manifest = {
        "apiVersion": "incus.truenas.io/v1alpha1",
        "kind": "IncusInstance",
        "metadata": {"name": "web.01"},
        "spec": {"type": "CONTAINER", "image": "debian/bookworm", "name": "web-01"},
    }
    result = cluster.apply(manifest, namespace)
    assert result.returncode == 0, result.stderr


# ----- the API server and the models agree (tests/test_models.py has the same cases) --------------------
def _instance(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "incus.truenas.io/v1alpha1",
        "kind": "IncusInstance",
        "metadata": {"name": name},
        "spec": spec,
    }


def _admitted(cluster: Cluster, namespace: str, manifest: dict[str, Any]) -> bool:
    result = cluster.apply(manifest, namespace, "--dry-run=server")
    assert result.returncode == 0 or "Error from server" in result.stderr or " is invalid: " in result.stderr, result
    return result.returncode == 0


@pytest.mark.parametrize("value,accepted", MEMORY_CASES, ids=[str(v) for v, _ in MEMORY_CASES])
def test_memory_quantities_as_kubernetes_reads_them(
    cluster: Cluster, namespace: str, value: Any, accepted: bool
) -> None:
    manifest = _instance("mem", {"type": "CONTAINER", "image": "debian/bookworm", "memory": value})
    assert _admitted(cluster, namespace, manifest) is accepted
    assert model_valid(manifest["spec"]) is accepted, "the models disagree with the API server"


@pytest.mark.parametrize("snapshots,accepted", SNAPSHOT_CASES, ids=[str(v)[:40] for v, _ in SNAPSHOT_CASES])
def test_snapshot_schedules_as_admission_reads_them(
    cluster: Cluster, namespace: str, snapshots: Any, accepted: bool
) -> None:
    manifest = _instance("sched", {"type": "CONTAINER", "image": "debian/bookworm", "snapshots": snapshots})
    assert _admitted(cluster, namespace, manifest) is accepted
    assert model_valid(manifest["spec"]) is accepted, "the models disagree with the API server"


@pytest.mark.parametrize("instance,kind,accepted", TYPE_CASES, ids=[f"{i}-{k}" for i, k, _ in TYPE_CASES])
def test_device_types_per_instance_type(
    cluster: Cluster, namespace: str, instance: str, kind: str, accepted: bool
) -> None:
    manifest = _instance("dev", {"type": instance, "image": "debian/bookworm", "devices": [device(kind)]})
    assert _admitted(cluster, namespace, manifest) is accepted
    assert model_valid(manifest["spec"]) is accepted


@pytest.mark.parametrize("value,accepted", EXTRA_VALUES, ids=[repr(v)[:20] for v, _ in EXTRA_VALUES])
def test_extra_values(cluster: Cluster, namespace: str, value: Any, accepted: bool) -> None:
    spec = {"type": "CONTAINER", "image": "debian/bookworm", "devices": [device("GPU", extra={"pci": value})]}
    assert _admitted(cluster, namespace, _instance("extra", spec)) is accepted
    assert model_valid(spec) is accepted


@pytest.mark.parametrize("name,accepted", NAMES, ids=[n[:20] or "empty" for n, _ in NAMES])
def test_connection_ref_and_secret_names(cluster: Cluster, namespace: str, name: str, accepted: bool) -> None:
    spec = {"type": "CONTAINER", "image": "debian/bookworm", "connectionRef": {"name": name}}
    assert _admitted(cluster, namespace, _instance("ref", spec)) is accepted
    tnc = {
        "apiVersion": "incus.truenas.io/v1alpha1",
        "kind": "TrueNASConnection",
        "metadata": {"name": "nas"},
        "spec": {"url": "wss://nas.example", "apiKeySecretRef": {"name": name, "key": "apiKey"}},
    }
    assert _admitted(cluster, namespace, tnc) is accepted


@pytest.mark.parametrize("key,accepted", KEYS, ids=[k[:20] for k, _ in KEYS])
def test_secret_keys(cluster: Cluster, namespace: str, key: str, accepted: bool) -> None:
    tnc = {
        "apiVersion": "incus.truenas.io/v1alpha1",
        "kind": "TrueNASConnection",
        "metadata": {"name": "nas"},
        "spec": {"url": "wss://nas.example", "apiKeySecretRef": {"name": "k", "key": key}},
    }
    assert _admitted(cluster, namespace, tnc) is accepted


# ----- bounded specs (issue 11 item 8) ------------------------------------------------------------------
def test_largest_admissible_spec_is_stored_and_fits_kopfs_annotation(
    cluster: Cluster, namespace: str, tmp_path: Path
) -> None:
    spec = largest_spec()
    manifest = _instance("largest", spec)
    created = cluster.apply(manifest, namespace)
    assert created.returncode == 0, created.stderr[:2000]
    stored = cluster.get("incusinstance", "largest", namespace)
    assert stored["spec"] == spec
    # What kopf then writes next to it: the whole spec as an annotation (256 KiB for all of them).
    essence = json.dumps({"spec": stored["spec"]}, separators=(",", ":"))
    assert len(essence.encode()) == spec_json_size(spec) <= MAX_SPEC_JSON_BYTES
    patch = tmp_path / "patch.json"
    patch.write_text(
        json.dumps({"metadata": {"annotations": {"incus.truenas.io/last-handled-configuration": essence}}})
    )
    cluster.kubectl("patch", "incusinstance", "largest", "-n", namespace, "--type=merge", "--patch-file", str(patch))
    annotations = cluster.get("incusinstance", "largest", namespace)["metadata"]["annotations"]
    assert annotations["incus.truenas.io/last-handled-configuration"] == essence


def test_megabyte_string_and_deep_nesting_in_extra_are_refused(cluster: Cluster, namespace: str) -> None:
    # The two specs the security review got admitted (issue 11 item 8).
    nested: Any = "x"
    for _ in range(90):
        nested = {"a": nested}
    for extra in ({"pci": "x" * 1_000_000}, {"pci": nested}):
        spec = {"type": "CONTAINER", "image": "debian/bookworm", "devices": [device("GPU", extra=extra)]}
        result = cluster.apply(_instance("huge", spec), namespace)
        assert result.returncode != 0
        assert "spec.devices[0].extra.pci" in result.stderr, result.stderr[:2000]
        assert not model_valid(spec)
    assert cluster.kubectl("get", "incusinstances", "-n", namespace, "-o", "name").stdout.strip() == ""


@pytest.mark.parametrize("key", ["dev_type", "source"])
def test_extra_cannot_turn_a_nic_into_a_disk(cluster: Cluster, namespace: str, key: str) -> None:
    # Issue 11 item 9: type NIC with extra {dev_type: DISK, source: /mnt/tank/backups} created a DISK.
    extra = {"dev_type": "DISK", "source": "/mnt/tank/backups"}
    spec = {"type": "CONTAINER", "image": "debian/bookworm", "devices": [device("NIC", extra={key: extra[key]})]}
    result = cluster.apply(_instance("nic", spec), namespace)
    assert result.returncode != 0
    assert "spec.devices[0].extra" in result.stderr and "may not set" in result.stderr, result.stderr


def test_explain_says_what_absent_devices_mean(cluster: Cluster) -> None:
    for field in ("devices", "nics"):
        text = " ".join(cluster.kubectl("explain", f"incusinstance.spec.{field}").stdout.split())
        assert "Omitted or empty: the instance has no" in text, text
        assert "the operator removes any it added" in text, text
