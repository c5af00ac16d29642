"""The Argo CD health check's test cases, taken from real objects.

Each test drives the operator (against the simulator) into one state and reads the resource back
with ``kubectl get -o yaml``: Argo CD's health of that live object (tools/argocd-health, Argo CD's
Lua runtime) must be what resource_customizations/incus.truenas.io/IncusInstance/health_test.yaml
expects, and the committed testdata file must show the same state (spec, generation, phase,
conditions). ``TIO_UPDATE_FIXTURES=1`` rewrites the testdata files from the live objects, with
volatile fields (uid, timestamps, resourceVersion, managedFields, last-applied) stripped; the
expected health is never generated, it stays hand-written in health_test.yaml.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import re
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from .argocd import CHECKS, MODES, health
from .conftest import Cluster, module_prefix
from .harness import ADOPT_ANYWHERE, Harness, module_operator, start_simulator

pytestmark = pytest.mark.e2e  # needs the local control plane (kube-apiserver + etcd)

UPDATE = os.environ.get("TIO_UPDATE_FIXTURES") == "1"
INSTANCE = CHECKS["IncusInstance"]  # the only kind whose testdata are captured here so far
FIXED_NAMESPACE = "apps"
FIXED_TIME = "2026-01-01T00:00:00Z"
# Python object addresses in messages ("<ssl.SSLContext object at 0x7f...>") change every run.
ADDRESS = re.compile(r" at 0x[0-9a-f]+")
# "not been observed since 2026-12-03T13:20:00Z": the time of the run.
SINCE = re.compile(r"since \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")

# Every testdata file, and the test that captures it.
FIXTURES = {
    "progressing_no_status.yaml": "test_not_yet_acted_on",
    "progressing_spec_not_acted_on.yaml": "test_not_yet_acted_on",
    "progressing_creating.yaml": "test_creating",
    "healthy_running.yaml": "test_running_and_stopped_as_asked",
    "suspended_stopped_as_asked.yaml": "test_running_and_stopped_as_asked",
    "progressing_stopped_out_of_band.yaml": "test_stopped_out_of_band",
    "healthy_manual_stopped_out_of_band.yaml": "test_stopped_out_of_band",
    "degraded_truenas_error.yaml": "test_truenas_reports_error",
    "degraded_truenas_error_manual.yaml": "test_truenas_reports_error",
    "degraded_already_exists.yaml": "test_synced_false_reasons",
    "degraded_image_not_found.yaml": "test_synced_false_reasons",
    "degraded_validation_failed.yaml": "test_synced_false_reasons",
    "degraded_connection_not_found.yaml": "test_synced_false_reasons",
    "degraded_unreachable.yaml": "test_unreachable_and_wrong_key",
    "degraded_authentication_failed.yaml": "test_unreachable_and_wrong_key",
    "progressing_delete_failed.yaml": "test_delete_failed",
    "degraded_unknown_not_observed.yaml": "test_not_observed",
    "suspended_paused.yaml": "test_paused_and_observed",
    "healthy_observed_differs.yaml": "test_paused_and_observed",
    "degraded_observed_not_found.yaml": "test_paused_and_observed",
    "progressing_no_address.yaml": "test_waiting_for_an_address",
}


@pytest.fixture(scope="module")
def harness(
    cluster: Cluster, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[Harness]:
    policy = {**ADOPT_ANYWHERE, "observation": [{"namespaces": ["*"], "connections": ["*"]}]}
    yield from module_operator(cluster, tmp_path_factory.mktemp("operator"), module_prefix(request), "25.10", policy)


def normalized(live: dict[str, Any]) -> dict[str, Any]:
    """``live`` without what changes from run to run (the committed testdata)."""
    obj = copy.deepcopy(live)
    metadata = obj["metadata"]
    namespace = metadata["namespace"]
    for key in ("uid", "resourceVersion", "creationTimestamp", "managedFields"):
        metadata.pop(key, None)
    metadata["namespace"] = FIXED_NAMESPACE
    if "deletionTimestamp" in metadata:
        metadata["deletionTimestamp"] = FIXED_TIME
    annotations = metadata.get("annotations", {})
    annotations.pop("kubectl.kubernetes.io/last-applied-configuration", None)
    for key, value in annotations.items():  # kopf's progress records carry timestamps
        record = json.loads(value) if value.startswith("{") else None
        if isinstance(record, dict) and {"started", "delayed"} & record.keys():
            record.update({k: FIXED_TIME for k in ("started", "delayed") if record.get(k)})
            annotations[key] = json.dumps(record, separators=(",", ":"))
    if not annotations:
        metadata.pop("annotations", None)
    status = obj.get("status", {})
    status.pop("lastSyncTime", None)
    if "message" in status:
        status["message"] = scrubbed(status["message"], namespace)
    for condition in status.get("conditions", []):
        condition.pop("lastTransitionTime", None)
        if "message" in condition:
            condition["message"] = scrubbed(condition["message"], namespace)
    return obj


def scrubbed(text: str, namespace: str) -> str:
    """A message without the run's namespace and Python object addresses."""
    text = SINCE.sub(f"since {FIXED_TIME}", text)
    return ADDRESS.sub(" at 0x0", text.replace(f"{namespace}/", f"{FIXED_NAMESPACE}/"))


def essence(obj: dict[str, Any]) -> dict[str, Any]:
    """What decides the health: must match between the live object and the committed testdata."""
    status = obj.get("status") or {}
    return {
        "name": obj["metadata"]["name"],
        "generation": obj["metadata"].get("generation"),
        "deleting": "deletionTimestamp" in obj["metadata"],
        "spec": obj.get("spec"),
        "phase": status.get("phase"),
        "observedGeneration": status.get("observedGeneration"),
        "conditions": sorted(
            (c["type"], c["status"], c.get("reason"), c.get("message")) for c in status.get("conditions", [])
        ),
    }


def capture(
    harness: Harness, namespace: str, name: str, fixture: str, until: Any = None, timeout: float = 30.0
) -> dict[str, Any]:
    """``until(status)``: capture the first version read that shows it (a retry can come between)."""
    assert fixture in FIXTURES, f"{fixture} is not listed in FIXTURES"

    def read() -> dict[str, Any] | None:
        live: dict[str, Any] = yaml.safe_load(
            harness.cluster.kubectl("get", "incusinstance", name, "-n", namespace, "-o", "yaml").stdout
        )
        return live if until is None or until(live.get("status") or {}) else None

    live: dict[str, Any] = harness.cluster.wait_for(read, timeout=timeout, interval=0.05, what=f"{name} for {fixture}")
    path = INSTANCE.testdata / fixture
    if UPDATE:
        path.write_text(yaml.safe_dump(normalized(live), sort_keys=False))
    else:
        assert path.exists(), f"{path} is missing: run with TIO_UPDATE_FIXTURES=1"
        assert essence(yaml.safe_load(path.read_text())) == essence(normalized(live))
    input_path = f"testdata/{fixture}"
    expected = INSTANCE.expected_health().get(input_path)
    assert expected is not None, f"health_test.yaml has no case for {input_path}"
    for mode in MODES:
        shown = health(live, mode=mode) or {}
        if "message" in shown:
            shown["message"] = scrubbed(shown["message"], namespace)
        assert shown == expected, f"{mode}: {json.dumps(live.get('status'), indent=1)}"
    return live


def connection_ready(harness: Harness, namespace: str, name: str) -> tuple[str, str] | None:
    status = harness.cluster.get("truenasconnection", name, namespace).get("status") or {}
    ready = next((c for c in status.get("conditions", []) if c["type"] == "Ready"), None)
    return (ready["status"], ready["reason"]) if ready else None


def phase_is(value: str) -> Any:
    return lambda s: s.get("phase") == value


def test_every_case_is_captured_here() -> None:
    assert sorted(f"testdata/{f}" for f in FIXTURES) == sorted(INSTANCE.expected_health())
    assert set(FIXTURES.values()) <= {name for name in globals() if name.startswith("test_")}


def test_not_yet_acted_on(harness: Harness, namespace: str) -> None:
    harness.apply(namespace, "fx-generation", {"cpu": "1"})
    harness.wait_ready(namespace, "fx-generation")
    harness.operator.stop()
    try:
        harness.apply(namespace, "fx-generation", {"cpu": "2"})
        harness.apply(namespace, "fx-new", {})
        capture(harness, namespace, "fx-generation", "progressing_spec_not_acted_on.yaml")
        capture(harness, namespace, "fx-new", "progressing_no_status.yaml")
    finally:
        harness.operator.start()
    harness.wait_status(namespace, "fx-generation", "generation 2", lambda s: s.get("observedGeneration") == 2)


def test_creating(harness: Harness, namespace: str) -> None:
    harness.sim.run(lambda: setattr(harness.sim.sim.knobs, "job_duration", 8.0))
    try:
        harness.apply(namespace, "fx-creating", {})
        harness.wait_status(namespace, "fx-creating", "Creating", phase_is("Creating"))
        capture(harness, namespace, "fx-creating", "progressing_creating.yaml")
    finally:
        harness.sim.run(lambda: setattr(harness.sim.sim.knobs, "job_duration", 0.05))
    harness.wait_ready(namespace, "fx-creating", timeout=40)


def test_running_and_stopped_as_asked(harness: Harness, namespace: str) -> None:
    harness.apply(namespace, "fx-running", {"cpu": "2", "memory": "1Gi"})
    harness.wait_ready(namespace, "fx-running")
    capture(harness, namespace, "fx-running", "healthy_running.yaml")
    # What the operator wrote (status, finalizer, its annotations) is no drift for Argo CD: the
    # API server's dry run of the same client-side apply changes nothing.
    manifest = {
        "apiVersion": "incus.truenas.io/v1alpha1",
        "kind": "IncusInstance",
        "metadata": {"name": "fx-running"},
        "spec": {"type": "CONTAINER", "image": "debian/bookworm", "cpu": "2", "memory": "1Gi"},
    }
    diff = harness.cluster.kubectl("diff", "-n", namespace, "-f", "-", input=json.dumps(manifest), check=False)
    assert diff.returncode == 0, diff.stdout + diff.stderr
    harness.apply(namespace, "fx-stopped", {"powerState": "Stopped"})
    harness.wait_status(
        namespace, "fx-stopped", "Stopped", lambda s: s.get("phase") == "Stopped" and s.get("observedGeneration")
    )
    harness.wait_ready(namespace, "fx-stopped")
    capture(harness, namespace, "fx-stopped", "suspended_stopped_as_asked.yaml")


def test_stopped_out_of_band(harness: Harness, namespace: str) -> None:
    harness.apply(namespace, "fx-oob", {})
    harness.apply(namespace, "fx-oob-manual", {"powerState": "Manual"})
    harness.wait_ready(namespace, "fx-oob")
    harness.wait_ready(namespace, "fx-oob-manual")
    harness.sim.run(lambda: harness.sim.sim.set_power("fx-oob-manual", "STOPPED"))
    harness.wait_status(namespace, "fx-oob-manual", "Stopped", phase_is("Stopped"))
    capture(harness, namespace, "fx-oob-manual", "healthy_manual_stopped_out_of_band.yaml")
    # The operator starts it again at once: a slow start job holds the state Argo CD then shows.
    harness.sim.run(lambda: setattr(harness.sim.sim.knobs, "job_duration", 8.0))
    try:
        harness.sim.run(lambda: harness.sim.sim.set_power("fx-oob", "STOPPED"))
        harness.wait_status(namespace, "fx-oob", "Starting", phase_is("Starting"))
        capture(harness, namespace, "fx-oob", "progressing_stopped_out_of_band.yaml")
    finally:
        harness.sim.run(lambda: setattr(harness.sim.sim.knobs, "job_duration", 0.05))
    harness.wait_status(namespace, "fx-oob", "Running again", phase_is("Running"), timeout=40)


def test_truenas_reports_error(harness: Harness, namespace: str) -> None:
    for name, spec, fixture in [
        ("fx-error", {}, "degraded_truenas_error.yaml"),
        ("fx-error-manual", {"powerState": "Manual"}, "degraded_truenas_error_manual.yaml"),
    ]:
        harness.apply(namespace, name, spec)
        harness.wait_ready(namespace, name)
        harness.sim.run(functools.partial(harness.sim.sim.set_power, name, "ERROR"))
        status = harness.wait_status(namespace, name, "Error", phase_is("Error"))
        assert {c["type"]: c["status"] for c in status["conditions"]}["Synced"] == "True"
        capture(harness, namespace, name, fixture)


def test_synced_false_reasons(harness: Harness, namespace: str) -> None:
    harness.sim.run(lambda: harness.sim.sim.seed_instance(name="fx-taken", type="CONTAINER", status="RUNNING"))
    cases: list[tuple[str, dict[str, Any], str, str, str]] = [
        ("fx-taken", {}, "AlreadyExists", "Error", "degraded_already_exists.yaml"),
        ("fx-image", {"image": "plan9/4th"}, "ImageNotFound", "Error", "degraded_image_not_found.yaml"),
        ("fx-big", {"memory": "512Gi"}, "ValidationFailed", "Error", "degraded_validation_failed.yaml"),
        (
            "fx-noconn",
            {"connectionRef": {"name": "missing"}},
            "ConnectionNotFound",
            "Pending",
            "degraded_connection_not_found.yaml",
        ),
    ]
    for name, spec, *_ in cases:
        harness.apply(namespace, name, spec)
    for name, _, reason, phase, fixture in cases:
        # Between failed creates the retry shows Creating (Synced still False): capture the failure itself.
        harness.wait_synced_false(namespace, name, reason)
        capture(harness, namespace, name, fixture, until=phase_is(phase))


def test_unreachable_and_wrong_key(harness: Harness, namespace: str) -> None:
    sim = start_simulator("25.10")
    try:
        connection = harness.connect_namespace(namespace, sim, name="nas")
        wrong = harness.connect_namespace(namespace, sim, name="wrong-key")
        harness.cluster.kubectl(
            "create", "secret", "generic", "bad-key", "-n", namespace, "--from-literal=apiKey=1-wrong"
        )
        harness.cluster.kubectl("label", "secret", "bad-key", "-n", namespace, "incus.truenas.io/credentials=true")
        harness.cluster.kubectl(
            "patch", "truenasconnection", wrong, "-n", namespace, "--type=merge",
            "-p", json.dumps({"spec": {"apiKeySecretRef": {"name": "bad-key", "key": "apiKey"}}}),
        )  # fmt: skip
        # Nothing listens on port 9 (discard): a stable address for the message.
        harness.cluster.kubectl(
            "patch", "truenasconnection", connection, "-n", namespace, "--type=merge",
            "-p", json.dumps({"spec": {"url": "wss://127.0.0.1:9"}}),
        )  # fmt: skip
        # Both connections down before the instances name them: nothing was ever observed (Pending).
        for name, reason in ((connection, "Unreachable"), (wrong, "AuthenticationFailed")):
            harness.cluster.wait_for(
                lambda name=name, reason=reason: connection_ready(harness, namespace, name) == ("False", reason),
                timeout=60,
                what=f"TrueNASConnection {name}: {reason}",
            )
        harness.apply(namespace, "fx-unreachable", {"connectionRef": {"name": connection}})
        harness.apply(namespace, "fx-auth", {"connectionRef": {"name": wrong}})
        harness.wait_synced_false(namespace, "fx-unreachable", "Unreachable")
        capture(harness, namespace, "fx-unreachable", "degraded_unreachable.yaml")
        harness.wait_synced_false(namespace, "fx-auth", "AuthenticationFailed")
        capture(harness, namespace, "fx-auth", "degraded_authentication_failed.yaml")
    finally:
        sim.stop()


def test_not_observed(harness: Harness, namespace: str) -> None:
    """A running instance whose TrueNAS cannot be asked any more: phase Unknown, the last observation kept."""
    sim = start_simulator("25.10")
    try:
        connection = harness.connect_namespace(namespace, sim, name="nas")
        harness.apply(namespace, "fx-unknown", {"connectionRef": {"name": connection}})
        harness.wait_ready(namespace, "fx-unknown", timeout=60)
        harness.cluster.kubectl(
            "patch", "truenasconnection", connection, "-n", namespace, "--type=merge",
            "-p", json.dumps({"spec": {"url": "wss://127.0.0.1:9"}}),
        )  # fmt: skip
        status = harness.wait_status(namespace, "fx-unknown", "phase Unknown", phase_is("Unknown"), timeout=60)
        assert status["instanceId"] and status["binding"]["name"] == "fx-unknown"
        capture(harness, namespace, "fx-unknown", "degraded_unknown_not_observed.yaml")
    finally:
        sim.stop()


def test_delete_failed(harness: Harness, namespace: str) -> None:
    """A stuck deletion: Argo CD shows Pending deletion; status and Events say why."""
    harness.apply(namespace, "fx-delete", {})
    harness.wait_ready(namespace, "fx-delete")
    harness.sim.run(lambda: harness.sim.sim.knobs.error_rates.update({"virt.instance.delete": 1.0}))
    try:
        harness.delete(namespace, "fx-delete", wait=False)
        status = harness.wait_synced_false(namespace, "fx-delete", "DeleteFailed")
        assert status["phase"] == "Deleting"
        event = harness.wait_event(namespace, "fx-delete", "DeleteFailed")
        assert event["type"] == "Warning" and "Simulated failure of virt.instance.delete" in event["message"]
        described = harness.cluster.kubectl("describe", "incusinstance", "fx-delete", "-n", namespace).stdout
        assert "DeleteFailed" in described
        # Between failures a retry shows Ready "the operator is deleting the instance" (Synced stays
        # False/DeleteFailed): capture the state the failure leaves, as the fixture records it.
        capture(
            harness,
            namespace,
            "fx-delete",
            "progressing_delete_failed.yaml",
            until=lambda status: "see the Synced condition" in str(status.get("conditions")),
        )
    finally:
        harness.sim.run(lambda: harness.sim.sim.knobs.error_rates.clear())
    harness.cluster.wait_for(lambda: not harness.exists(namespace, "fx-delete"), what="the deletion to finish")


def insync(reason: str) -> Any:
    return lambda s: any(c["type"] == "InSync" and c["reason"] == reason for c in s.get("conditions", []))


def test_paused_and_observed(harness: Harness, namespace: str) -> None:
    harness.apply(namespace, "fx-paused", {})
    harness.wait_ready(namespace, "fx-paused")
    paused = {"incus.truenas.io/paused": "true"}
    harness.apply(namespace, "fx-paused", {"powerState": "Stopped"}, annotations=paused)
    capture(
        harness, namespace, "fx-paused", "suspended_paused.yaml",
        until=lambda s: any("would stop it" in c.get("message", "") for c in s.get("conditions", [])),
    )  # fmt: skip
    harness.sim.run(lambda: harness.sim.sim.seed_instance(name="fx-ui", type="CONTAINER", status="RUNNING"))
    observe = {"apiVersion": "incus.truenas.io/v1alpha1", "kind": "IncusInstance"}
    for name, spec in (("fx-ui", {"powerState": "Stopped"}), ("fx-nothing", {})):
        manifest = {**observe, "metadata": {"name": name}}
        manifest["spec"] = {"type": "CONTAINER", "managementPolicy": "ObserveOnly", **spec}
        assert harness.cluster.apply(manifest, namespace).returncode == 0
    capture(harness, namespace, "fx-ui", "healthy_observed_differs.yaml", until=insync("Differs"))
    capture(harness, namespace, "fx-nothing", "degraded_observed_not_found.yaml", until=insync("NotFound"))


def test_waiting_for_an_address(harness: Harness, namespace: str) -> None:
    """spec.readiness.address on a guest whose DHCP has not answered: Progressing, not Degraded."""
    sim = harness.sim.sim
    harness.sim.run(lambda: setattr(sim.knobs, "dhcp", False))
    try:
        harness.apply(namespace, "fx-no-address", {"readiness": {"address": True}})
        harness.wait_status(
            namespace,
            "fx-no-address",
            "NoAddress",
            lambda s: any(c["reason"] == "NoAddress" for c in s.get("conditions") or []),
            timeout=60,
        )
        capture(harness, namespace, "fx-no-address", "progressing_no_address.yaml")
    finally:
        harness.sim.run(lambda: setattr(sim.knobs, "dhcp", True))
    harness.sim.run(lambda: sim.set_lease("fx-no-address", True))
    harness.wait_ready(namespace, "fx-no-address", timeout=60)
