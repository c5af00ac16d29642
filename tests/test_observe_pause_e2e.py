"""ObserveOnly and pause against the real API server and the simulator, on every TrueNAS generation
(issue 25 items 1, 2, 5): an instance made outside the operator is observed (status mirrors it,
InSync says what Full would change) with no write to TrueNAS (the simulator's write log), where the
administrator's policy grants observation; never created, never deleted; two resources cannot
observe one; ObserveOnly -> Full is an adoption, Full -> ObserveOnly stops writes at once; the paused
annotation stops every write, deletion waits for it, removing it resumes."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from truenas_incus_operator.importer import Imported, import_instances
from truenas_incus_operator.truenas import connect
from truenas_incus_operator.truenas.client import Endpoint
from truenas_incus_operator.truenas.transports.base import Secret

from .conftest import Cluster, module_prefix
from .harness import ADOPT_ANYWHERE, Harness, module_operator, unique, wait_until
from .test_snapshots_e2e import ROLLBACKS, apply, slow_jobs, status, wait_phase, writes, zfs_snapshots

pytestmark = pytest.mark.e2e  # needs the local control plane (kube-apiserver + etcd)

PROFILES = ["25.04.0", "25.04.2", "25.10", "26.0", "27.0"]
POLICY: dict[str, Any] = {**ADOPT_ANYWHERE, "observation": [{"namespaces": ["*-watch-*"], "connections": ["*"]}]}
PAUSED = "incus.truenas.io/paused"


@pytest.fixture(scope="module", params=PROFILES)
def harness(
    cluster: Cluster, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[Harness]:
    profile = str(request.param)
    prefix = f"{module_prefix(request)}{profile.replace('.', '')}-"
    workdir = tmp_path_factory.mktemp(f"observe{profile}")
    for running in module_operator(cluster, workdir, prefix, profile, policy=POLICY):
        running.prefix = prefix  # type: ignore[attr-defined]
        yield running


def namespace(harness: Harness, middle: str) -> str:
    name = f"{harness.prefix}{middle}{uuid.uuid4().hex[:6]}"  # type: ignore[attr-defined]
    harness.cluster.kubectl("create", "namespace", name)
    return name


def seed(harness: Harness, name: str) -> None:
    """An instance made in the TrueNAS UI (a virt.instance container on 25.x, a container on 26)."""
    harness.sim.run(lambda: harness.sim.sim.seed_instance(name=name, type="CONTAINER", status="RUNNING"))


def observe(harness: Harness, ns: str, resource: str, **spec: Any) -> None:
    apply(harness, ns, "IncusInstance", resource, {"type": "CONTAINER", "managementPolicy": "ObserveOnly", **spec})


def condition(status: dict[str, Any], kind: str) -> dict[str, Any]:
    return next((c for c in status.get("conditions") or [] if c["type"] == kind), {})


def wait_condition(harness: Harness, ns: str, name: str, kind: str, reason: str, timeout: float = 60) -> dict[str, Any]:
    return harness.wait_status(
        ns, name, f"{kind} {reason}", lambda s: condition(s, kind).get("reason") == reason, timeout
    )


def matching(status: dict[str, Any]) -> dict[str, Any]:
    """The spec fields that make Full change nothing, from what the status mirrors."""
    spec: dict[str, Any] = {"powerState": "Running", "autostart": status["autostart"]}
    for field in ("cpu", "memory"):
        if status.get(field) is not None:
            spec[field] = status[field]
    return spec


def test_an_instance_made_outside_is_observed_with_no_write_and_left_when_the_resource_goes(
    harness: Harness,
) -> None:
    ns = namespace(harness, "x-watch-")
    name = unique("ui")
    seed(harness, name)
    observe(harness, ns, name, powerState="Stopped")
    status = wait_condition(harness, ns, name, "InSync", "Differs")
    assert condition(status, "Ready")["reason"] == "Observed" and status["phase"] == "Running"
    assert condition(status, "Synced")["reason"] == "Observing" and status.get("instanceId")
    assert "stop it (spec.powerState Stopped)" in condition(status, "InSync")["message"]
    harness.wait_event(ns, name, "Observing")
    assert (
        harness.cluster.kubectl(
            "wait", "--for=condition=Ready", f"incusinstance/{name}", "-n", ns, "--timeout=30s", check=False
        ).returncode
        == 0
    )

    observe(harness, ns, name, **matching(status))
    wait_condition(harness, ns, name, "InSync", "Matches")
    # A snapshot writes to TrueNAS: none is taken through an ObserveOnly resource.
    apply(harness, ns, "IncusInstanceSnapshot", "snap", {"instanceRef": {"name": name}})
    refused = wait_phase(harness, ns, "incusinstancesnapshots", "snap", "Failed")
    assert (
        condition(refused, "Ready")["reason"] == "NotOwner" and "ObserveOnly" in condition(refused, "Ready")["message"]
    )
    time.sleep(2)  # a few passes: still nothing written
    assert writes(harness, name) == [], writes(harness, name)

    assert harness.delete(ns, name).returncode == 0
    assert name in harness.instance_names(), "an observed instance is never deleted"
    assert writes(harness, name) == []


def test_observing_needs_the_policy_and_two_resources_cannot_observe_one(harness: Harness) -> None:
    name = unique("ui")
    seed(harness, name)
    closed = namespace(harness, "x-closed-")
    observe(harness, closed, name)
    refused = harness.wait_synced_false(closed, name, "ObserveNotAllowed", timeout=60)
    assert "policy: observation" in condition(refused, "Synced")["message"]
    assert not refused.get("instanceId") and refused.get("cpu") is None and not refused.get("ipAddresses")

    first, second = namespace(harness, "a-watch-"), namespace(harness, "b-watch-")
    observe(harness, first, name)
    wait_condition(harness, first, name, "Ready", "Observed")
    observe(harness, second, "twin", name=name)
    conflict = harness.wait_synced_false(second, "twin", "Conflict", timeout=60)
    assert first not in condition(conflict, "Synced")["message"], "another tenant's namespace is never named"
    assert writes(harness, name) == []
    for ns, resource in ((closed, name), (first, name), (second, "twin")):
        assert harness.delete(ns, resource).returncode == 0
    assert name in harness.instance_names()


def test_observe_only_never_creates_a_missing_instance(harness: Harness) -> None:
    ns = namespace(harness, "x-watch-")
    name = unique("none")
    observe(harness, ns, name, image="debian/bookworm")
    status = wait_condition(harness, ns, name, "InSync", "NotFound")
    assert condition(status, "Ready")["reason"] == "NotFound" and condition(status, "Synced")["status"] == "True"
    time.sleep(3)
    assert name not in harness.instance_names() and writes(harness, name) == []
    assert harness.delete(ns, name).returncode == 0


def test_observe_only_to_full_is_an_adoption_and_back_stops_writes(harness: Harness) -> None:
    ns = namespace(harness, "x-watch-")
    name = unique("ui")
    seed(harness, name)
    observe(harness, ns, name)
    status = wait_condition(harness, ns, name, "Ready", "Observed")
    spec = {"type": "CONTAINER", "image": "debian/bookworm", **matching(status)}
    # Full without the adopt annotation: refused, nothing written.
    apply(harness, ns, "IncusInstance", name, spec)
    refused = harness.wait_synced_false(ns, name, "AlreadyExists")
    assert "observed" in condition(refused, "Synced")["message"] and writes(harness, name) == []
    # With it (the policy allows adoption here): taken over, and the spec is applied from now on.
    manifest = {
        "apiVersion": "incus.truenas.io/v1alpha1",
        "kind": "IncusInstance",
        "metadata": {"name": name, "annotations": {"incus.truenas.io/adopt": "true"}},
        "spec": {**spec, "powerState": "Stopped"},
    }
    assert harness.cluster.apply(manifest, ns).returncode == 0
    harness.wait_event(ns, name, "Adopted")
    wait_until(lambda: harness.instance(name) is not None and _state(harness, name) == "STOPPED", what="stopped")
    assert any(m.endswith((".stop", ".poweroff")) for m, _ in writes(harness, name))
    # Full -> ObserveOnly: the next change is only reported.
    before = len(writes(harness, name))
    manifest["spec"] = {**spec, "powerState": "Running", "managementPolicy": "ObserveOnly"}
    assert harness.cluster.apply(manifest, ns).returncode == 0
    insync = wait_condition(harness, ns, name, "InSync", "Differs")
    assert "start it" in condition(insync, "InSync")["message"]
    time.sleep(2)
    assert len(writes(harness, name)) == before and _state(harness, name) == "STOPPED"
    assert harness.delete(ns, name).returncode == 0
    assert name in harness.instance_names(), "ObserveOnly never deletes, whatever the resource did before"


def test_a_paused_resource_is_not_written_and_its_deletion_waits_for_the_resume(harness: Harness) -> None:
    ns = namespace(harness, "x-pause-")
    name = unique("ct")
    harness.apply(ns, name, {})
    harness.wait_ready(ns, name, timeout=90)
    assert harness.cluster.kubectl("annotate", "incusinstance", name, "-n", ns, f"{PAUSED}=true").returncode == 0
    harness.wait_event(ns, name, "ReconciliationPaused")
    before = len(writes(harness, name))
    harness.apply(ns, name, {"powerState": "Stopped"}, annotations={PAUSED: "true"})
    status = harness.wait_status(
        ns, name, "the stop reported", lambda s: "would stop it" in condition(s, "Synced").get("message", "")
    )
    assert condition(status, "Paused")["status"] == "True" and condition(status, "Synced")["status"] == "False"
    assert condition(status, "Ready")["reason"] == "NotSynced"
    apply(harness, ns, "IncusInstanceSnapshot", "later", {"instanceRef": {"name": name}})
    pending = wait_phase(harness, ns, "incusinstancesnapshots", "later", "Pending")
    assert condition(pending, "Ready")["reason"] == "ReconciliationPaused"
    time.sleep(2)
    assert len(writes(harness, name)) == before and _state(harness, name) == "RUNNING"
    assert harness.cluster.kubectl("delete", "incusinstancesnapshot", "later", "-n", ns).returncode == 0

    assert harness.delete(ns, name, wait=False).returncode == 0
    waiting = wait_condition(harness, ns, name, "Synced", "ReconciliationPaused")
    harness.wait_status(
        ns, name, "the deletion waits", lambda s: "deletion waits" in condition(s, "Synced").get("message", "")
    )
    assert name in harness.instance_names() and waiting
    time.sleep(2)
    assert name in harness.instance_names() and len(writes(harness, name)) == before
    assert harness.cluster.kubectl("annotate", "incusinstance", name, "-n", ns, f"{PAUSED}-").returncode == 0
    wait_until(lambda: not harness.exists(ns, name), timeout=60, what="deleted once resumed")
    assert name not in harness.instance_names()


def _state(harness: Harness, name: str) -> str:
    found = harness.instance(name)
    return str(getattr(found, "status", None) or getattr(found, "state", None))


def test_imported_manifests_are_observed_in_sync(harness: Harness) -> None:
    """Issue 25 item 3's round trip: what import prints, applied as it is, observes every instance
    with InSync=True (Full would change nothing), and nothing is written to TrueNAS."""
    ns = namespace(harness, "x-watch-")
    sim = harness.sim.sim
    names = [unique("imp"), unique("Imp")]  # the second is no Kubernetes name: spec.name keeps it
    harness.sim.run(lambda: sim.seed_instance(name=names[0], type="CONTAINER", status="RUNNING"))
    harness.sim.run(lambda: sim.seed_instance(name=names[1], type="CONTAINER", status="STOPPED"))
    own = harness.sim.run(lambda: _session(sim))
    if sim.profile.has_virt:
        disk = {"dev_type": "DISK", "name": "data", "source": "/mnt/tank/data", "destination": "/data"}
        harness.sim.submit(sim.call(own, "virt.instance.device_add", [names[0], disk])).result(timeout=30)
    if sim.profile.has_vm:
        vm = unique("uivm").replace("-", "_")
        names.append(vm.replace("_", "-"))
        harness.sim.submit(sim.call(own, "vm.create", [{"name": vm, "memory": 512}])).result(timeout=30)
    seeded = {name: len(writes(harness, name)) for name in names}  # the seeding's own calls
    assert harness.sim.ca_file is not None
    endpoint = Endpoint(
        url=harness.sim.ws_url, api_key=Secret(harness.sim.api_key), ca_pem=harness.sim.ca_file.read_text()
    )

    async def run() -> list[Imported]:
        client = await connect(endpoint, read_only=True)
        try:
            return [found async for found in import_instances(client, namespace=ns)]
        finally:
            await client.close()
            # aiohttp closes a TLS connection's socket a moment after the session (its documented
            # graceful shutdown): without the pause asyncio.run ends first, and the socket's
            # ResourceWarning surfaces, at garbage collection, in whichever test runs then.
            await asyncio.sleep(0.25)

    found = {item.instance: item for item in asyncio.run(run())}
    resources = []
    for instance in names:
        item = found[instance]
        assert item.manifest is not None, item.notes
        assert harness.cluster.apply(item.manifest, ns).returncode == 0
        resources.append(item.manifest["metadata"]["name"])
    for resource in resources:
        status = wait_condition(harness, ns, resource, "InSync", "Matches", timeout=90)
        assert condition(status, "Ready")["reason"] == "Observed", status
    if sim.profile.has_virt:  # the status mirrors the instance's own devices (a profile's left out)
        mirrored = harness.get(ns, resources[0])["status"]["devices"]
        assert mirrored == [{"name": "data", "type": "DISK", "source": "/mnt/tank/data", "destination": "/data"}]
    assert {name: len(writes(harness, name)) for name in names} == seeded, "nothing written since"
    for resource in resources:
        assert harness.delete(ns, resource).returncode == 0
    vms = harness.sim.run(
        lambda: {vm.config.get("name") for vm in sim.vms.vms.values()} if sim.profile.has_vm else set()
    )
    assert set(names) <= harness.instance_names() | {str(name).replace("_", "-") for name in vms}, "none deleted"


def _session(sim: Any) -> Any:
    from .test_simulator import session

    return session(sim)


def test_a_pause_set_while_a_deletion_retries_holds_it(harness: Harness) -> None:
    """Issue 25 item 5: pause on a resource being deleted. TrueNAS refuses the delete (a fault), the
    deletion retries; the annotation set meanwhile stops it at its next attempt: once TrueNAS would
    accept, the instance stays until the annotation goes."""
    ns = namespace(harness, "x-pdel-")
    name = unique("ct")
    harness.apply(ns, name, {})
    harness.wait_ready(ns, name, timeout=90)
    sim = harness.sim.sim
    method = "container.delete" if sim.profile.has_container else "virt.instance.delete"
    harness.sim.run(lambda: sim.knobs.error_rates.__setitem__(method, 1.0))
    try:
        assert harness.delete(ns, name, wait=False).returncode == 0
        harness.wait_synced_false(ns, name, "DeleteFailed", timeout=60)
        assert harness.cluster.kubectl("annotate", "incusinstance", name, "-n", ns, f"{PAUSED}=true").returncode == 0
        wait_condition(harness, ns, name, "Synced", "ReconciliationPaused", timeout=60)
    finally:
        harness.sim.run(lambda: sim.knobs.error_rates.pop(method, None))
    time.sleep(6)  # past the paused deletion's next look (every 5 s): it still waits
    assert name in harness.instance_names() and harness.exists(ns, name)
    assert harness.cluster.kubectl("annotate", "incusinstance", name, "-n", ns, f"{PAUSED}-").returncode == 0
    wait_until(lambda: not harness.exists(ns, name), timeout=90, what="deleted once resumed")
    assert name not in harness.instance_names()


def test_a_snapshot_of_a_paused_or_observed_instance_is_neither_taken_nor_destroyed(harness: Harness) -> None:
    """Review M2: pause and ObserveOnly hold for the instance's snapshots too. A pause set while a
    snapshot taken stopped waits for the stop: nothing is taken until it goes. Deleting a snapshot of a
    paused instance waits; of an ObserveOnly one, leaves it on TrueNAS (Retained)."""
    ns = namespace(harness, "x-psnap-")
    name = unique("ct")
    harness.apply(ns, name, {})
    harness.wait_ready(ns, name, timeout=90)
    taken_before = zfs_snapshots(harness)
    with slow_jobs(harness, 4.0):
        apply(harness, ns, "IncusInstanceSnapshot", "cold", {"instanceRef": {"name": name}, "consistency": "Stopped"})
        wait_phase(harness, ns, "incusinstancesnapshots", "cold", "Creating")
        assert harness.cluster.kubectl("annotate", "incusinstance", name, "-n", ns, f"{PAUSED}=true").returncode == 0
        held = harness.cluster.wait_for(
            lambda: (lambda s: s if condition(s, "Ready").get("reason") == "ReconciliationPaused" else None)(
                status(harness, ns, "incusinstancesnapshots", "cold")
            ),
            timeout=60,
            what="the snapshot waits for the resume",
        )
    assert held["phase"] == "Creating" and zfs_snapshots(harness) == taken_before, "nothing taken while paused"
    assert harness.cluster.kubectl("annotate", "incusinstance", name, "-n", ns, f"{PAUSED}-").returncode == 0
    ready = wait_phase(harness, ns, "incusinstancesnapshots", "cold", "Ready", timeout=90)
    wait_until(lambda: _state(harness, name) == "RUNNING", timeout=60, what="started again")
    cold = {s for s in zfs_snapshots(harness) if s.endswith("@" + ready["snapshotName"])}
    assert cold

    # Deleting it while the instance is paused waits; resumed, it goes.
    assert harness.cluster.kubectl("annotate", "incusinstance", name, "-n", ns, f"{PAUSED}=true").returncode == 0
    harness.wait_event(ns, name, "ReconciliationPaused")
    deleting = harness.cluster.kubectl("delete", "incusinstancesnapshot", "cold", "-n", ns, "--wait=false")
    assert deleting.returncode == 0
    time.sleep(3)
    assert cold <= zfs_snapshots(harness), "no ZFS destroy while the instance is paused"
    assert harness.cluster.get("incusinstancesnapshots", "cold", ns), "the deletion waits"
    assert harness.cluster.kubectl("annotate", "incusinstance", name, "-n", ns, f"{PAUSED}-").returncode == 0
    wait_until(lambda: not (cold & zfs_snapshots(harness)), timeout=60, what="destroyed once resumed")

    # ObserveOnly: a snapshot's deletion leaves it on TrueNAS.
    apply(harness, ns, "IncusInstanceSnapshot", "warm", {"instanceRef": {"name": name}})
    warm = wait_phase(harness, ns, "incusinstancesnapshots", "warm", "Ready")
    kept = {s for s in zfs_snapshots(harness) if s.endswith("@" + warm["snapshotName"])}
    harness.apply(ns, name, {"managementPolicy": "ObserveOnly"})
    wait_condition(harness, ns, name, "InSync", "Matches")
    before = len(writes(harness, name))
    gone = harness.cluster.kubectl("delete", "incusinstancesnapshot", "warm", "-n", ns, "--timeout=60s")
    assert gone.returncode == 0, gone.stderr
    harness.wait_event(ns, "warm", "Retained")
    assert kept and kept <= zfs_snapshots(harness), "ObserveOnly: the snapshot stays on TrueNAS"
    assert len(writes(harness, name)) == before


def test_a_pause_set_while_a_restore_stops_the_instance_holds_the_rollback(harness: Harness) -> None:
    """Review round 2, R9: the restore resolves its instance again right before the rollback. Paused
    while the instance stops, nothing is rolled back until the annotation goes; then it completes."""
    ns = namespace(harness, "x-prest-")
    name = unique("ct")
    harness.apply(ns, name, {})
    harness.wait_ready(ns, name, timeout=90)
    apply(harness, ns, "IncusInstanceSnapshot", "base", {"instanceRef": {"name": name}})
    wait_phase(harness, ns, "incusinstancesnapshots", "base", "Ready")
    with slow_jobs(harness, 4.0):
        apply(
            harness,
            ns,
            "IncusInstanceRestore",
            "back",
            {"instanceRef": {"name": name}, "snapshotRef": {"name": "base"}},
        )
        wait_phase(harness, ns, "incusinstancerestores", "back", "Stopping")
        assert harness.cluster.kubectl("annotate", "incusinstance", name, "-n", ns, f"{PAUSED}=true").returncode == 0
        harness.cluster.wait_for(
            lambda: (
                condition(status(harness, ns, "incusinstancerestores", "back"), "Ready").get("reason")
                == "ReconciliationPaused"
            ),
            timeout=60,
            what="the restore waits for the resume",
        )
    time.sleep(2)
    assert not [m for m, _ in writes(harness, name) if m in ROLLBACKS], "no rollback while paused"
    assert status(harness, ns, "incusinstancerestores", "back")["phase"] == "Stopping"
    assert harness.cluster.kubectl("annotate", "incusinstance", name, "-n", ns, f"{PAUSED}-").returncode == 0
    wait_phase(harness, ns, "incusinstancerestores", "back", "Succeeded", timeout=120)
    assert [m for m, _ in writes(harness, name) if m in ROLLBACKS], "rolled back once resumed"
    wait_until(lambda: _state(harness, name) == "RUNNING", timeout=60, what="running again")
