"""The operator end to end: a real kube-apiserver, the operator as a subprocess, TrueNAS simulators."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from truenas_simulator import ApiKey, Image, Simulator, SimulatorThread

from .conftest import Cluster, module_prefix
from .harness import CREDENTIALS, GIB, Harness, module_operator, start_simulator, unique, wait_until

pytestmark = pytest.mark.e2e  # needs the local control plane (kube-apiserver + etcd, helm)


@pytest.fixture(scope="module")
def harness(
    cluster: Cluster, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[Harness]:
    # Only this module's namespaces: other modules' leftovers are not this operator's business.
    yield from module_operator(cluster, tmp_path_factory.mktemp("operator"), module_prefix(request), "25.10")


# ----- 1. create ------------------------------------------------------------------------------------------
def test_container_reaches_running_with_status(harness: Harness, namespace: str) -> None:
    name = unique("web")
    harness.apply(namespace, name, {"cpu": "2", "memory": "2Gi", "environment": {"TZ": "UTC"}})
    waited = harness.cluster.kubectl(
        "wait", "--for=condition=Ready", f"incusinstance/{name}", "-n", namespace, "--timeout=30s", check=False
    )
    assert waited.returncode == 0, waited.stderr
    status = harness.get(namespace, name)["status"]
    assert status["phase"] == "Running"
    assert status["instanceId"] == name
    assert (status["cpu"], status["memory"], status["autostart"]) == ("2", "2Gi", True)
    assert status["ipAddresses"] and status["ipAddresses"] == [a["address"] for a in harness.instance(name).addresses()]
    assert status["image"]["os"] == "Debian" and status["image"]["release"] == "bookworm"
    assert status["observedGeneration"] == 1
    row = harness.cluster.kubectl("get", "incusinstance", name, "-n", namespace, "--no-headers").stdout.split()
    assert row[:8] == [name, "CONTAINER", "Running", "2", "2Gi", "true", status["ipAddresses"][0], "True"]
    instance = harness.instance(name)
    assert instance.status == "RUNNING" and instance.environment == {"TZ": "UTC"} and instance.memory == 2 * GIB


def test_vm_on_25_04_0(harness: Harness, namespace: str) -> None:
    sim = start_simulator("25.04.0", job_duration=0.05)
    try:
        connection = harness.connect_namespace(namespace, sim)
        name = unique("vm")
        harness.apply(namespace, name, {"type": "VM", "image": "ubuntu/noble", "connectionRef": {"name": connection}})
        status = harness.wait_ready(namespace, name)
        assert status["phase"] == "Running"
        vm = harness.instance(name, sim)
        assert vm.type == "VM" and vm.status == "RUNNING"
        tnc = harness.cluster.get("truenasconnection", connection, namespace)["status"]
        assert tnc["version"] == "TrueNAS-25.04.0" and tnc["apiFamily"] == "virt.instance"
    finally:
        sim.stop()


# ----- 2. update ------------------------------------------------------------------------------------------
def test_updates_reach_truenas_and_status(harness: Harness, namespace: str) -> None:
    name = unique("upd")
    harness.apply(namespace, name, {"cpu": "1", "memory": 512 * 2**20})
    harness.wait_ready(namespace, name)
    harness.apply(namespace, name, {"cpu": "0-3", "memory": 1073741824, "autostart": False, "environment": {"A": "1"}})
    status = harness.wait_status(
        namespace, name, "updated", lambda s: s.get("cpu") == "0-3" and s.get("observedGeneration") == 2
    )
    assert (status["memory"], status["autostart"]) == ("1Gi", False)
    instance = harness.instance(name)
    assert (instance.cpu, instance.memory, instance.autostart, instance.environment) == ("0-3", GIB, False, {"A": "1"})
    # A quantity, and omitting a limit removes it.
    harness.apply(namespace, name, {"memory": "1536Mi", "autostart": False})
    harness.wait_status(namespace, name, "memory as quantity", lambda s: s.get("memory") == "1536Mi" and "cpu" not in s)
    instance = harness.instance(name)
    assert (instance.cpu, instance.memory, instance.environment) == (None, 1536 * 2**20, {})


def test_devices_and_nics_follow_the_spec(harness: Harness, namespace: str) -> None:
    name = unique("dev")
    proxy = {"source_proto": "TCP", "source_port": 18080, "dest_proto": "TCP", "dest_port": 80}
    harness.apply(
        namespace,
        name,
        {
            "devices": [
                {"name": "data", "type": "DISK", "source": "/mnt/tank/data", "destination": "/data"},
                {"name": "http", "type": "PROXY", "extra": proxy},
            ],
            "nics": [{"name": "eth1", "parent": "br0"}],
        },
    )
    harness.wait_ready(namespace, name)
    devices = harness.instance(name).devices
    assert set(devices) == {"data", "http", "eth1"}
    assert devices["eth1"]["nic_type"] == "BRIDGED" and devices["eth1"]["parent"] == "br0"
    assert devices["http"]["source_port"] == 18080
    calls_before = harness.calls()
    # Change one, remove one, add one, switch a NIC to macvlan.
    harness.apply(
        namespace,
        name,
        {
            "devices": [
                {"name": "data", "type": "DISK", "source": "/mnt/tank/data", "destination": "/srv", "readonly": True},
                {"name": "tpm", "type": "TPM"},
            ],
            "nics": [{"name": "eth1", "type": "macvlan", "parent": "enp1s0", "hwaddr": "10:66:6A:01:02:03"}],
        },
    )

    def converged() -> bool:
        d = harness.instance(name).devices
        return (
            set(d) == {"data", "tpm", "eth1"}
            and d["data"]["destination"] == "/srv"
            and d["data"]["readonly"] is True
            and d["eth1"]["nic_type"] == "MACVLAN"
            and d["eth1"]["mac"] == "10:66:6a:01:02:03"
        )

    wait_until(converged, what="device changes on the simulator")
    harness.wait_status(namespace, name, "generation 2", lambda s: s.get("observedGeneration") == 2)
    calls = harness.calls()
    assert calls["virt.instance.device_delete"] - calls_before.get("virt.instance.device_delete", 0) == 1
    assert calls["virt.instance.device_add"] - calls_before.get("virt.instance.device_add", 0) == 1
    assert calls["virt.instance.device_update"] - calls_before.get("virt.instance.device_update", 0) == 2
    # Removing the last device and the whole nics field removes them on TrueNAS (issue 12, item 1).
    harness.apply(namespace, name, {"devices": []})
    wait_until(lambda: set(harness.instance(name).devices) == set(), what="every device removed")
    harness.wait_status(namespace, name, "generation 3", lambda s: s.get("observedGeneration") == 3)


def test_a_device_removed_on_truenas_is_restored(harness: Harness, namespace: str) -> None:
    name = unique("drift")
    disk = {"name": "data", "type": "DISK", "source": "/mnt/tank/data", "destination": "/data"}
    harness.apply(namespace, name, {"devices": [disk]})
    harness.wait_ready(namespace, name)
    instance = harness.instance(name)
    harness.sim.run(lambda: instance.devices.pop("data"))  # as if removed in the TrueNAS UI
    # Audited within ceil(instances / 10) resync intervals (2 s here); this module has only a few.
    wait_until(lambda: "data" in harness.instance(name).devices, timeout=60, what="the device restored")
    event = harness.wait_event(namespace, name, "DriftCorrected")
    assert "adding data" in event["message"]


def test_a_failed_create_is_corrected_in_place(harness: Harness, namespace: str) -> None:
    name = unique("typo")
    harness.apply(namespace, name, {"image": "debian/bookwrom"})
    harness.wait_synced_false(namespace, name, "ImageNotFound")
    fixed = harness.apply(namespace, name, {"image": "debian/bookworm"}, check=False)
    assert fixed.returncode == 0, f"a typo before anything exists can be corrected: {fixed.stderr}"
    harness.wait_ready(namespace, name)
    assert harness.instance(name).image.release == "bookworm"
    again = harness.apply(namespace, name, {"image": "debian/trixie"}, check=False)
    assert again.returncode != 0 and "spec.image is immutable" in again.stderr


# ----- 3. power ---------------------------------------------------------------------------------------------
def test_power_state_stop_graceful_then_force_and_start(harness: Harness, namespace: str) -> None:
    name = unique("pwr")
    harness.apply(namespace, name, {"stopTimeoutSeconds": 1})
    harness.wait_ready(namespace, name)
    harness.sim.run(lambda: setattr(harness.sim.sim.instances[name], "ignores_shutdown", True))
    jobs_before = harness.sim.run(lambda: len(harness.sim.sim.jobs.jobs))
    harness.apply(namespace, name, {"stopTimeoutSeconds": 1, "powerState": "Stopped"})
    status = harness.wait_status(namespace, name, "Stopped", lambda s: s.get("phase") == "Stopped")
    assert {c["type"]: (c["status"], c["reason"]) for c in status["conditions"]}["Ready"] == ("True", "Stopped")
    stops = harness.sim.run(
        lambda: [
            j.arguments
            for j in list(harness.sim.sim.jobs.jobs.values())[jobs_before:]
            if j.method == "virt.instance.stop"
        ]
    )
    assert stops == [[name, {"force": False, "timeout": 1}], [name, {"force": True, "timeout": -1}]]
    assert harness.instance(name).status == "STOPPED"
    harness.apply(namespace, name, {"powerState": "Running"})
    harness.wait_status(namespace, name, "Running", lambda s: s.get("phase") == "Running" and s.get("ipAddresses"))
    assert harness.instance(name).status == "RUNNING"


def test_out_of_band_stop_is_reported_and_corrected(harness: Harness, namespace: str) -> None:
    running, manual = unique("oob"), unique("man")
    harness.apply(namespace, running, {})
    harness.apply(namespace, manual, {"powerState": "Manual"})
    harness.wait_ready(namespace, running)
    harness.wait_ready(namespace, manual)
    starts_before = harness.calls().get("virt.instance.start", 0)
    harness.sim.run(lambda: harness.sim.sim.set_power(manual, "STOPPED"))
    status = harness.wait_status(
        namespace, manual, "Stopped reported", lambda s: s.get("phase") == "Stopped", timeout=5
    )
    assert {c["type"]: c["reason"] for c in status["conditions"]}["Ready"] == "Manual"
    harness.sim.run(lambda: harness.sim.sim.set_power(running, "STOPPED"))
    wait_until(lambda: harness.instance(running).status == "RUNNING", timeout=10, what="the operator to restart it")
    harness.wait_status(namespace, running, "Running again", lambda s: s.get("phase") == "Running")
    assert harness.calls()["virt.instance.start"] == starts_before + 1
    assert harness.instance(manual).status == "STOPPED", "Manual must never be started"


# ----- 4. delete ---------------------------------------------------------------------------------------------
def test_delete_stops_and_deletes_then_releases(harness: Harness, namespace: str) -> None:
    name = unique("del")
    harness.apply(namespace, name, {})
    harness.wait_ready(namespace, name)
    deleted = harness.delete(namespace, name)
    assert deleted.returncode == 0, deleted.stderr
    assert name not in harness.instance_names()
    assert not harness.exists(namespace, name)


def test_orphan_leaves_the_instance(harness: Harness, namespace: str) -> None:
    name = unique("orph")
    harness.apply(namespace, name, {"deletionPolicy": "Orphan"})
    harness.wait_ready(namespace, name)
    assert harness.delete(namespace, name).returncode == 0
    assert not harness.exists(namespace, name)
    assert harness.instance(name).status == "RUNNING"


def test_refused_delete_keeps_the_finalizer_and_says_why(harness: Harness, namespace: str) -> None:
    name = unique("ref")
    harness.apply(namespace, name, {})
    harness.wait_ready(namespace, name)
    harness.sim.run(lambda: harness.sim.sim.knobs.error_rates.update({"virt.instance.delete": 1.0}))
    try:
        harness.delete(namespace, name, wait=False)
        status = harness.wait_synced_false(namespace, name, "DeleteFailed")
        assert "Simulated failure of virt.instance.delete" in status["message"]
        assert status["phase"] == "Deleting"
        assert "incus.truenas.io/finalizer" in harness.get(namespace, name)["metadata"]["finalizers"]
        harness.wait_event(namespace, name, "DeleteFailed")
    finally:
        harness.sim.run(lambda: harness.sim.sim.knobs.error_rates.clear())
    wait_until(
        lambda: not harness.exists(namespace, name), timeout=30, what="the deletion to finish once TrueNAS allows it"
    )
    assert name not in harness.instance_names()


def test_instance_already_gone_counts_as_deleted(harness: Harness, namespace: str) -> None:
    name = unique("gone")
    harness.apply(namespace, name, {"powerState": "Manual"})
    harness.wait_ready(namespace, name)
    harness.operator.stop()
    # kopf stops the loops by cancelling them: their normal end, not a warning per resource at every exit
    cancelled = [line for line in harness.operator.logs().splitlines() if name in line and "is cancelled" in line]
    assert cancelled == []
    try:
        harness.sim.run(lambda: harness.sim.sim.remove_instance(name))
        harness.delete(namespace, name, wait=False)
    finally:
        harness.operator.start()
    wait_until(lambda: not harness.exists(namespace, name), what="the finalizer to go")


# ----- 5. adoption safety ------------------------------------------------------------------------------------
def test_existing_instance_is_not_taken_over_without_the_annotation(harness: Harness, namespace: str) -> None:
    name = unique("adopt")
    harness.sim.run(lambda: harness.sim.sim.seed_instance(name=name, type="CONTAINER", status="RUNNING", cpu="1"))
    harness.apply(namespace, name, {"cpu": "2"})
    status = harness.wait_synced_false(namespace, name, "AlreadyExists")
    assert "incus.truenas.io/adopt" in status["message"]
    assert status["phase"] == "Error" and "instanceId" not in status and "cpu" not in status
    time.sleep(3)  # a few resyncs: still not touched
    assert harness.condition(namespace, name, "Synced")["reason"] == "AlreadyExists"
    harness.wait_event(namespace, name, "AlreadyExists")
    assert harness.instance(name).cpu == "1", "must not touch an instance it does not own"
    creates = harness.calls().get("virt.instance.create", 0)
    harness.apply(namespace, name, {"cpu": "2"}, annotations={"incus.truenas.io/adopt": "true"})
    harness.wait_ready(namespace, name)
    assert harness.instance(name).cpu == "2"
    assert harness.calls().get("virt.instance.create", 0) == creates, "adoption must not recreate"


# ----- 6. errors -------------------------------------------------------------------------------------------------
def test_bad_image_then_it_appears(harness: Harness, namespace: str) -> None:
    name = unique("img")
    harness.apply(namespace, name, {"image": "plan9/4th"})
    status = harness.wait_synced_false(namespace, name, "ImageNotFound")
    assert "Image not found: plan9/4th" in status["message"]
    assert status["phase"] == "Error"
    harness.wait_event(namespace, name, "ImageNotFound")
    creates = harness.calls().get("virt.instance.create", 0)
    time.sleep(8)
    retries = harness.calls().get("virt.instance.create", 0) - creates
    assert 1 <= retries <= 6, f"{retries} create attempts in 8 s: retries must back off (0.5 s doubling to 4 s here)"
    harness.sim.run(lambda: harness.sim.sim.images.update({"plan9/4th": Image("plan9/4th", "Plan9", "4th")}))
    harness.wait_ready(namespace, name, timeout=30)


def test_truenas_validation_error_then_host_grows(harness: Harness, namespace: str) -> None:
    name = unique("big")
    harness.apply(namespace, name, {"memory": "512Gi"})
    status = harness.wait_synced_false(namespace, name, "ValidationFailed")
    assert "virt_instance_create.memory: Cannot reserve more than physical memory" in status["message"]
    harness.wait_event(namespace, name, "ValidationFailed")
    old = harness.sim.run(lambda: harness.sim.sim.knobs.host_memory)
    harness.sim.run(lambda: setattr(harness.sim.sim.knobs, "host_memory", 1024 * GIB))
    try:
        harness.wait_ready(namespace, name)
    finally:
        harness.sim.run(lambda: setattr(harness.sim.sim.knobs, "host_memory", old))


def test_wrong_api_key_then_secret_fixed(harness: Harness, namespace: str) -> None:
    sim = start_simulator("25.10")
    try:
        connection = harness.connect_namespace(namespace, sim)
        right = sim.api_key
        harness.cluster.kubectl(
            "create", "secret", "generic", "wrong", "-n", namespace, "--from-literal=apiKey=1-wrong"
        )
        harness.cluster.kubectl("label", "secret", "wrong", "-n", namespace, "incus.truenas.io/credentials=true")
        harness.cluster.kubectl(
            "patch", "truenasconnection", connection, "-n", namespace, "--type=merge",
            "-p", json.dumps({"spec": {"apiKeySecretRef": {"name": "wrong", "key": "apiKey"}}}),
        )  # fmt: skip
        name = unique("auth")
        harness.apply(namespace, name, {"connectionRef": {"name": connection}})
        status = harness.wait_synced_false(namespace, name, "AuthenticationFailed")
        assert "refused the API key" in status["message"]
        harness.wait_event(namespace, name, "AuthenticationFailed")
        # Fix the Secret only: the operator re-reads it after the next authentication failure.
        fixed = harness.cluster.kubectl(
            "create",
            "secret",
            "generic",
            "wrong",
            "-n",
            namespace,
            f"--from-literal=apiKey={right}",
            "--dry-run=client",
            "-o",
            "json",
        ).stdout
        fixed = json.dumps({**json.loads(fixed), "metadata": {"name": "wrong", "labels": CREDENTIALS}})
        assert harness.cluster.kubectl("apply", "-n", namespace, "-f", "-", input=fixed).returncode == 0
        harness.wait_ready(namespace, name, timeout=40)
    finally:
        sim.stop()


def test_unreachable_truenas_then_it_comes_up(harness: Harness, namespace: str, tmp_path: Path) -> None:
    sim = start_simulator("25.10", cert_dir=tmp_path)
    port, key = sim.server.port, sim.api_key  # type: ignore[union-attr]
    connection = harness.connect_namespace(namespace, sim)
    sim.stop()
    name = unique("unr")
    harness.apply(namespace, name, {"connectionRef": {"name": connection}})
    # The operator may have connected before the stop: the loss shows at the next call or query (reconnect
    # attempts of up to 10 s each), so allow more than one attempt under load.
    status = harness.wait_synced_false(namespace, name, "Unreachable", timeout=60)
    assert f"127.0.0.1:{port}" in status["message"]
    harness.wait_event(namespace, name, "Unreachable")
    ident, _, secret = key.partition("-")
    # The same TrueNAS comes back: same port, same key, same CA (kept in tmp_path).
    revived = SimulatorThread(
        Simulator("25.10", api_keys=[ApiKey(int(ident), secret)]), tls=True, port=port, cert_dir=tmp_path
    )
    revived.start()
    try:
        harness.wait_ready(namespace, name, timeout=40)
        assert name in harness.instance_names(revived)
    finally:
        revived.stop()


# ----- 8. drift and economy -----------------------------------------------------------------------------------
def test_out_of_band_change_shows_within_two_seconds(harness: Harness, namespace: str) -> None:
    name = unique("drift")
    harness.apply(namespace, name, {"powerState": "Manual"})
    harness.wait_ready(namespace, name)
    harness.sim.run(lambda: harness.sim.sim.set_power(name, "FROZEN"))
    harness.wait_status(namespace, name, "Frozen", lambda s: s.get("phase") == "Frozen", timeout=2.0)


def test_steady_state_calls_do_not_grow_with_resources(harness: Harness, namespace: str) -> None:
    def idle_calls(seconds: float) -> dict[str, int]:
        before = harness.calls()
        time.sleep(seconds)
        after = harness.calls()
        return {m: after.get(m, 0) - before.get(m, 0) for m in after if after.get(m, 0) != before.get(m, 0)}

    names = [unique("eco") for _ in range(2)]
    for name in names:
        harness.apply(namespace, name, {"powerState": "Manual"})
    for name in names:
        harness.wait_ready(namespace, name)
    few = idle_calls(6.0)
    more = [unique("eco") for _ in range(10)]
    for name in more:
        harness.apply(namespace, name, {"powerState": "Manual"})
    for name in more:
        harness.wait_ready(namespace, name)
    many = idle_calls(6.0)
    # Resync every 2 s: about 3 queries in 6 s per API family (virt.instance for containers, vm.* for VMs
    # on 25.10), whatever the number of resources; besides them only the device audit, at most 10 device
    # reads per interval (TIO_DEVICE_AUDITS_PER_RESYNC), also whatever N.
    idle = {"virt.instance.query", "vm.query", "virt.instance.device_list"}
    assert set(few) <= idle and set(many) <= idle, (few, many)
    for query in ("virt.instance.query", "vm.query"):
        assert 2 <= few[query] <= 4 and 2 <= many[query] <= 4, (few, many)
    assert many.get("virt.instance.device_list", 0) <= 10 * 4, many


# ----- 9. connections, secrets ----------------------------------------------------------------------------
def test_two_truenas_systems_in_two_namespaces(harness: Harness, cluster: Cluster, namespace: str) -> None:
    other_ns = namespace + "-b"
    cluster.kubectl("create", "namespace", other_ns)
    first, second = start_simulator("25.10"), start_simulator("25.04.2")
    try:
        harness.connect_namespace(namespace, first)
        harness.connect_namespace(other_ns, second, transport="rest")
        a, b = unique("a"), unique("b")
        harness.apply(namespace, a, {"connectionRef": {"name": "nas"}})
        harness.apply(other_ns, b, {"connectionRef": {"name": "nas"}})
        harness.wait_ready(namespace, a)
        harness.wait_ready(other_ns, b)
        assert harness.instance_names(first) == {a}
        assert harness.instance_names(second) == {b}
        assert a not in harness.instance_names() and b not in harness.instance_names()
        tnc = cluster.get("truenasconnection", "nas", other_ns)["status"]
        assert tnc["version"] == "TrueNAS-25.04.2.6" and tnc["apiVersion"] == "v2.0" and tnc["transport"] == "rest"
    finally:
        first.stop()
        second.stop()


def test_api_key_is_never_shown(harness: Harness, cluster: Cluster) -> None:
    secret = harness.sim.api_key.split("-", 1)[1]
    texts = [harness.operator.logs()]
    texts.append(cluster.kubectl("get", "events", "-A", "-o", "json").stdout)
    texts.append(cluster.kubectl("get", "incusinstances,truenasconnections", "-A", "-o", "json").stdout)
    assert len(texts[0]) > 1000, "the operator should have logged something"
    for text in texts:
        assert secret not in text


# ----- 10. status hygiene ------------------------------------------------------------------------------------
def test_status_shape_and_the_operator_never_writes_spec(harness: Harness, namespace: str) -> None:
    name = unique("hyg")
    harness.apply(namespace, name, {"cpu": "1"})
    harness.wait_ready(namespace, name)
    harness.apply(namespace, name, {"cpu": "2"})
    harness.wait_status(
        namespace, name, "generation 2", lambda s: s.get("observedGeneration") == 2 and s.get("cpu") == "2"
    )
    body = harness.get(namespace, name)
    status = body["status"]
    allowed = {
        "phase", "instanceId", "binding", "observedGeneration", "conditions", "cpu", "memory", "autostart",
        "ipAddresses", "addresses", "image", "job", "lastSyncTime", "message",
    }  # fmt: skip
    assert set(status) <= allowed, set(status) - allowed
    assert status["binding"] == {"name": name, "type": "CONTAINER", "image": "debian/bookworm"}, status
    for condition in status["conditions"]:
        assert set(condition) == {"type", "status", "reason", "message", "lastTransitionTime", "observedGeneration"}
        assert condition["observedGeneration"] == 2
        assert condition["status"] in ("True", "False", "Unknown")
    assert [c["type"] for c in status["conditions"]] == ["Ready", "Synced"]
    managed = json.loads(
        harness.cluster.kubectl(
            "get", "incusinstance", name, "-n", namespace, "--show-managed-fields", "-o", "json"
        ).stdout
    )["metadata"]["managedFields"]
    assert {e["manager"] for e in managed} >= {"kubectl-client-side-apply", "kopf"}
    for entry in managed:
        if entry["manager"].startswith("kubectl"):
            continue
        assert "f:spec" not in json.dumps(entry.get("fieldsV1", {})), entry
    assert not [k for k in body["metadata"].get("annotations", {}) if k.startswith("kopf.zalando.org")]
    assert body["metadata"]["finalizers"] == ["incus.truenas.io/finalizer"]
