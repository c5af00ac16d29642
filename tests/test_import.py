"""``truenas-incus-operator import`` against the simulator over real sockets, on every profile (issue 25
items 3, 5): a manifest per instance that the CRD's models accept, ObserveOnly (or adopt), what cannot
be expressed in comments; names that are not Kubernetes names mapped with spec.name keeping the
TrueNAS name; hundreds of instances streamed; and not one write (the simulator's counters, and the
read-only client refusing a write before it is sent)."""

from __future__ import annotations

import io
from typing import Any

import pytest
import yaml

from truenas_incus_operator.importer import Imported, Output, import_instances, kubernetes_name
from truenas_incus_operator.models import IncusInstanceSpec
from truenas_incus_operator.truenas import InstanceConfig, connect
from truenas_incus_operator.truenas.client import Endpoint
from truenas_incus_operator.truenas.transports.base import Secret
from truenas_incus_operator.truenas.transports.readonly import WriteRefused

from .test_client import serve
from .test_simulator import session

PROFILES = ["25.04.0", "25.04.2", "25.10", "26.0", "27.0"]


def writes(sim: Any) -> int:
    return int(sim.counters.snapshot()["writes"])


async def read_only(server: Any) -> Any:
    return await connect(Endpoint(url=server.ws_url, api_key=Secret(server.sim.api_key)), read_only=True)


async def collect(client: Any, **kwargs: Any) -> list[Imported]:
    return [found async for found in import_instances(client, **kwargs)]


@pytest.mark.parametrize("profile", PROFILES)
async def test_every_instance_becomes_a_manifest_the_crd_accepts_and_nothing_is_written(profile: str) -> None:
    async with serve(profile) as (sim, server):
        sim.seed_instance(name="web01", type="CONTAINER", status="RUNNING")
        sim.seed_instance(name="Db-Main", type="CONTAINER", status="STOPPED")
        if profile.startswith("25."):
            own = session(sim)
            disk = {"dev_type": "DISK", "name": "data", "source": "/mnt/tank/data", "destination": "/data"}
            await sim.call(own, "virt.instance.device_add", ["web01", disk])
        if sim.profile.has_vm:  # a VM made in the UI: vm.* records no image
            await sim.call(session(sim), "vm.create", [{"name": "ui_vm", "memory": 512}])
        before = writes(sim)
        client = await read_only(server)
        try:
            found = await collect(client)
        finally:
            await client.close()
        assert writes(sim) == before, "import wrote to TrueNAS"
        by_instance = {f.instance: f for f in found}
        assert {"web01", "Db-Main"} <= set(by_instance)
        for item in found:
            assert item.manifest is not None, item.notes
            spec = IncusInstanceSpec.model_validate(item.manifest["spec"])
            assert spec.management_policy == "ObserveOnly"
        main = by_instance["Db-Main"].manifest
        assert main is not None and main["metadata"]["name"] == "db-main" and main["spec"]["name"] == "Db-Main"
        assert main["spec"]["powerState"] == "Stopped"
        web = by_instance["web01"].manifest
        assert web is not None and "name" not in web["spec"] and web["spec"]["powerState"] == "Running"
        if profile.startswith("25."):
            assert web["spec"]["image"] == "debian/bookworm"
            assert web["spec"]["devices"] == [
                {"name": "data", "type": "DISK", "source": "/mnt/tank/data", "destination": "/data"}
            ]
        else:  # 26's container.query does not say what the container was made from
            assert "image" not in web["spec"] and any("spec.image" in n for n in by_instance["web01"].notes)
        text = by_instance["web01"].as_yaml()
        assert text.startswith("# TrueNAS instance 'web01'") and yaml.safe_load(text) == web
        if sim.profile.has_vm:
            vm = by_instance["ui-vm"]
            assert (
                vm.manifest is not None and vm.manifest["spec"]["type"] == "VM" and "image" not in vm.manifest["spec"]
            )
            assert vm.manifest["spec"]["memory"] == "512Mi"
            assert any("does not record the image a VM was made from" in n for n in vm.notes)
            assert any("spec.environment" in n for n in vm.notes)


@pytest.mark.parametrize("profile", ["25.10", "26.0"])
async def test_adopt_manifests_carry_the_annotation_where_the_image_is_known(profile: str) -> None:
    async with serve(profile) as (sim, server):
        sim.seed_instance(name="web01", type="CONTAINER", status="RUNNING")
        client = await read_only(server)
        try:
            (found,) = await collect(client, adopt=True, namespace="apps", connection="nas")
        finally:
            await client.close()
        assert found.manifest is not None
        meta, spec = found.manifest["metadata"], found.manifest["spec"]
        assert meta["namespace"] == "apps" and spec["connectionRef"] == {"name": "nas"}
        if profile == "25.10":
            assert meta["annotations"] == {"incus.truenas.io/adopt": "true"} and "managementPolicy" not in spec
        else:
            assert "annotations" not in meta and spec["managementPolicy"] == "ObserveOnly"
            assert any("--adopt: left ObserveOnly" in note for note in found.notes)


async def test_the_read_only_client_refuses_a_write_before_it_is_sent() -> None:
    async with serve("25.10") as (sim, server):
        sim.seed_instance(name="web01", type="CONTAINER", status="RUNNING")
        client = await read_only(server)
        try:
            before = writes(sim)
            with pytest.raises(WriteRefused, match=r"virt\.instance\.stop"):
                await client.instances.stop("web01", timeout=1)
            with pytest.raises(WriteRefused):
                await client.instances.create(InstanceConfig(name="x", type="CONTAINER", image="debian/bookworm"))
            assert writes(sim) == before and not sim.counters.writes_log, "no write reached TrueNAS"
        finally:
            await client.close()


async def test_hundreds_of_instances_are_streamed_one_at_a_time() -> None:
    async with serve("25.10") as (sim, server):
        for i in range(300):
            sim.seed_instance(name=f"ct{i:03d}", type="CONTAINER", status="RUNNING")
        out = io.StringIO()
        sink = Output(stream=out)
        client = await read_only(server)
        try:
            listed_before_first = None
            async for found in import_instances(client):
                if listed_before_first is None:
                    listed_before_first = sim.counters.by_method["virt.instance.device_list"]
                sink(found)
        finally:
            await client.close()
        assert listed_before_first == 1, "the first manifest is out before the next instance is read"
        documents = list(yaml.safe_load_all(out.getvalue()))
        assert len(documents) == 300 and sink.written == 300
        assert sim.counters.by_method["virt.instance.query"] == 1


def test_names_that_are_not_kubernetes_names_are_mapped_and_unique() -> None:
    taken: set[str] = set()
    assert kubernetes_name("Web_01", taken) == "web-01"
    assert kubernetes_name("web-01", taken) == "web-01-2"
    assert kubernetes_name("9lives", taken) == "i-9lives"
    assert kubernetes_name("___", taken) == "i"


async def test_an_instance_truenas_reports_half_built_or_busy_names_no_power_state() -> None:
    async with serve("25.10") as (sim, server):
        sim.seed_instance(name="broken", type="CONTAINER", status="ERROR")
        client = await read_only(server)
        try:
            (found,) = await collect(client)
        finally:
            await client.close()
        assert found.manifest is not None and "powerState" not in found.manifest["spec"]
        assert any("spec.powerState: TrueNAS reports ERROR" in note for note in found.notes)
        IncusInstanceSpec.model_validate(found.manifest["spec"])


def observed(name: str, **overrides: Any) -> Any:
    from truenas_incus_operator.truenas.types import InstanceStatus, ObservedImage, ObservedInstance

    values: dict[str, Any] = {
        "id": name,
        "name": name,
        "type": "CONTAINER",
        "status": InstanceStatus.RUNNING,
        "cpu": None,
        "memory": None,
        "autostart": True,
        "environment": {},
        "addresses": (),
        "image": ObservedImage(os="Debian", release="bookworm"),
        "family": "virt.instance",
    }
    values.update(overrides)
    return ObservedInstance(**values)


FORGED = "x\n---\napiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRoleBinding\nmetadata: {name: own}\n#"


def test_truenas_text_in_the_notes_cannot_add_a_document_or_a_line() -> None:
    """A hostile NAS names a device's extra key, a NIC key and an error with line breaks (review H1)."""
    from truenas_incus_operator.truenas.types import DeviceConfig

    devices = [
        DeviceConfig(name="data", type="DISK", source="/mnt/tank/data", destination="/d", extra={FORGED: ["a"]}),
        DeviceConfig(name="eth0", type="NIC", extra={"nic_type": "BRIDGED", FORGED: "on"}),
    ]
    from truenas_incus_operator.importer import imported

    found = imported(observed("web01"), devices, set(), adopt=True)
    assert found.manifest is not None and all(note.isprintable() for note in found.notes), found.notes
    found.note(f"spec.devices: {FORGED}")
    found.notes.append(FORGED)  # even a note added raw is escaped when written
    text = found.as_yaml()
    documents = list(yaml.safe_load_all(text))
    assert documents == [found.manifest], text
    for line in text.splitlines():
        assert not line.startswith(("apiVersion: rbac", "kind: ClusterRoleBinding")), text


def test_a_name_with_a_trailing_line_break_is_not_taken_for_another_instance() -> None:
    """``db01\\n`` must not become a manifest for db01 (review M5: re.match accepts the newline)."""
    from truenas_incus_operator.importer import imported

    found = imported(observed("db01\n"), [], set(), adopt=True)
    assert found.manifest is None, found.manifest
    assert any("spec.name" in note for note in found.notes)


def test_adopt_manifests_keep_the_instance_and_lose_nothing_on_deletion() -> None:
    """An adopt manifest orphans on deletion; a refused device makes it ObserveOnly (review M5)."""
    from truenas_incus_operator.importer import imported
    from truenas_incus_operator.truenas.types import DeviceConfig

    clean = imported(observed("web01"), [], set(), adopt=True)
    assert clean.manifest is not None
    assert clean.manifest["metadata"]["annotations"] == {"incus.truenas.io/adopt": "true"}
    assert clean.manifest["spec"]["deletionPolicy"] == "Orphan"
    IncusInstanceSpec.model_validate(clean.manifest["spec"])

    refused = DeviceConfig(name="media", type="DISK", source="/mnt//tank", destination="/media")
    lossy = imported(observed("web02"), [refused], set(), adopt=True)
    assert lossy.manifest is not None
    spec = lossy.manifest["spec"]
    assert "annotations" not in lossy.manifest["metadata"] and spec["managementPolicy"] == "ObserveOnly"
    assert any("devices[media]" in note for note in lossy.notes)
    assert any("--adopt: left ObserveOnly" in note for note in lossy.notes)


async def test_import_reads_a_running_vm_on_27() -> None:
    """vm.get_guest_network_interfaces is a read (review L1): a running VM must not fail the import."""
    async with serve("27.0") as (sim, server):
        own = session(sim)
        vm = await sim.call(own, "vm.create", [{"name": "vmrun", "memory": 512}])
        await sim.call(own, "vm.start", [vm["id"]])
        client = await read_only(server)
        try:
            found = await collect(client)
        finally:
            await client.close()
        (item,) = [f for f in found if f.instance == "vmrun"]
        assert item.manifest is not None and item.manifest["spec"]["powerState"] == "Running", item.notes


def test_every_string_is_quoted_so_kubectls_yaml_reads_what_import_meant() -> None:
    """sigs.k8s.io/yaml (kubectl, Argo CD) reads a plain y as true and 1e3 as a number; PyYAML leaves
    both plain (review round 2, R4): every string value, and every key but the schema's, is quoted."""
    from truenas_incus_operator.importer import imported

    seen = observed("web01", environment={"y": "y", "NUM": "1e3", "OCT": "0o17", "on": "off"})
    found = imported(seen, [], set())
    text = found.as_yaml()
    assert list(yaml.safe_load_all(text)) == [found.manifest]
    root = yaml.compose(text)

    def scalars(node: Any, key: bool = False) -> Any:
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                yield from scalars(k, True)
                yield from scalars(v)
        elif isinstance(node, yaml.SequenceNode):
            for item in node.value:
                yield from scalars(item)
        else:
            yield node, key

    for node, is_key in scalars(root):
        if node.tag.endswith(":str") and not is_key:
            assert node.style == '"', node.value
        if is_key and node.style != '"':
            assert node.value.isalpha() and node.value[0].islower() and node.value not in ("y", "on"), node.value
    assert '"y": "y"' in text and '"NUM": "1e3"' in text and '"on": "off"' in text, text


def test_a_folder_output_never_overwrites_a_file(tmp_path: Any) -> None:
    """An instance named kustomization must not replace the folder's kustomization.yaml (R5)."""
    from truenas_incus_operator.importer import imported

    mine = tmp_path / "kustomization.yaml"
    mine.write_text("resources: []\n")
    out = Output(folder=tmp_path)
    out(imported(observed("kustomization"), [], set()))
    out(imported(observed("web01"), [], set()))
    assert mine.read_text() == "resources: []\n" and out.refused == ["kustomization.yaml"]
    assert (tmp_path / "web01.yaml").exists()


@pytest.mark.parametrize(
    ("seen", "devices", "change"),
    [
        (observed("big", memory=1_000_000_000), [], "memory"),
        (
            observed("mac"),
            [("eth1", {"nic_type": "BRIDGED", "parent": "br0", "mac": "AA:BB:CC:00:11:22"})],
            "change device eth1",
        ),
        (observed("bare"), [("eth1", {"parent": "br0"})], "change device eth1"),
    ],
    ids=["memory-not-whole-mib", "upper-case-mac", "nic-without-type"],
)
def test_adopt_only_where_the_first_full_pass_would_change_nothing(seen: Any, devices: Any, change: str) -> None:
    """--adopt writes the annotation only when Full's planner plans nothing for the manifest (R6)."""
    from truenas_incus_operator.importer import imported
    from truenas_incus_operator.truenas.types import DeviceConfig

    listed = [DeviceConfig(name, "NIC", extra=extra) for name, extra in devices]
    found = imported(seen, listed, set(), adopt=True)
    assert found.manifest is not None
    assert "annotations" not in found.manifest["metadata"]
    assert found.manifest["spec"]["managementPolicy"] == "ObserveOnly"
    assert any(note.startswith("--adopt: left ObserveOnly (Full would:") and change in note for note in found.notes), (
        found.notes
    )
