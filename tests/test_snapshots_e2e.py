"""IncusInstanceSnapshot and IncusInstanceRestore against the real API server and the simulator, on
every TrueNAS generation: a container and a VM snapshotted and restored in place (the data back as
it was, the IncusInstance's spec untouched, never a rollback under a running guest), newer snapshots
refused by name unless allowed, a snapshot taken stopped, deletion with the resource, tenancy."""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from .conftest import Cluster, module_prefix
from .harness import Harness, module_operator, unique, wait_until

pytestmark = pytest.mark.e2e  # needs the local control plane (kube-apiserver + etcd)

PROFILES = ["25.04.0", "25.04.2", "25.10", "26.0", "27.0"]
GROUP = "incus.truenas.io/v1alpha1"
VM_SPEC: dict[str, Any] = {"type": "VM", "image": "debian/bookworm", "cpu": "1", "memory": "1Gi"}
START_WRITES = ("virt.instance.start", "container.start", "vm.start")
ROLLBACKS = ("zfs.snapshot.rollback", "pool.snapshot.rollback")


@pytest.fixture(scope="module", params=PROFILES)
def harness(
    cluster: Cluster, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[Harness]:
    profile = str(request.param)
    prefix = f"{module_prefix(request)}{profile.replace('.', '')}-"
    workdir = tmp_path_factory.mktemp(f"snapshots{profile}")
    for running in module_operator(cluster, workdir, prefix, profile):
        running.prefix = prefix  # type: ignore[attr-defined]
        yield running


@pytest.fixture
def ns(harness: Harness) -> str:
    """A fresh namespace the module's operator watches (its profile's prefix)."""
    name = f"{harness.prefix}{uuid.uuid4().hex[:8]}"  # type: ignore[attr-defined]
    harness.cluster.kubectl("create", "namespace", name)
    return name


def apply(harness: Harness, namespace: str, kind: str, name: str, spec: dict[str, Any]) -> None:
    manifest = {"apiVersion": GROUP, "kind": kind, "metadata": {"name": name}, "spec": spec}
    result = harness.cluster.apply(manifest, namespace)
    assert result.returncode == 0, result.stderr


def status(harness: Harness, namespace: str, plural: str, name: str) -> dict[str, Any]:
    return dict(harness.cluster.get(plural, name, namespace).get("status") or {})


def wait_phase(
    harness: Harness, namespace: str, plural: str, name: str, phase: str, timeout: float = 60
) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        found = status(harness, namespace, plural, name)
        return found if found.get("phase") == phase else None

    result: dict[str, Any] = wait_until(check, timeout=timeout, what=f"{plural}/{name} phase {phase}")
    return result


def kubectl_wait_ready(harness: Harness, namespace: str, plural: str, name: str, timeout: int = 60) -> None:
    """`kubectl wait --for=condition=Ready`, as users run it."""
    result = harness.cluster.kubectl(
        "wait", "--for=condition=Ready", f"{plural}/{name}", "-n", namespace, f"--timeout={timeout}s", check=False
    )
    assert result.returncode == 0, result.stderr + result.stdout


def storage(harness: Harness) -> Any:
    return harness.sim.sim.storage


def content(harness: Harness, dataset: str) -> Any:
    return harness.sim.run(lambda: storage(harness).datasets[dataset].content)


def write(harness: Harness, dataset: str, value: str) -> None:
    def change() -> None:
        storage(harness).datasets[dataset].content = value

    harness.sim.run(change)


def zfs_snapshots(harness: Harness) -> set[str]:
    return set(harness.sim.run(lambda: list(storage(harness).snapshots)))


def writes(harness: Harness, name: str) -> list[tuple[str, str]]:
    """The simulator's writes about the instance ``name``, in order: those whose first argument names
    it (its datasets' and snapshots' names contain it; virt.instance's calls take it), and the calls of
    a 26 container or a vm.* VM by its id."""

    def read() -> tuple[list[tuple[str, str]], set[str]]:
        sim = harness.sim.sim
        ids = {str(vm.id) for vm in sim.vms.vms.values() if vm.config.get("name") == name.replace("-", "_")}
        ids |= {str(c.id) for c in sim.containers.containers.values() if c.name == name}  # 26's calls take ids
        return list(sim.counters.writes_log), ids

    log, ids = harness.sim.run(read)
    names = (name, name.replace("-", "_"))  # a vm.* VM's home is named after its vm.* name
    return [(method, arg) for method, arg in log if any(n in arg for n in names) or arg in ids]


@contextlib.contextmanager
def slow_jobs(harness: Harness, seconds: float = 3.0) -> Iterator[None]:
    """Stop and start jobs that take ``seconds``: time to act while a restore stops the instance."""
    harness.sim.run(lambda: setattr(harness.sim.sim.knobs, "job_duration", seconds))
    try:
        yield
    finally:
        harness.sim.run(lambda: setattr(harness.sim.sim.knobs, "job_duration", 0.05))


def make_instance(harness: Harness, namespace: str, kind: str, extra: dict[str, Any] | None = None) -> str:
    name = unique("vm" if kind == "VM" else "ct")
    harness.apply(namespace, name, {**(dict(VM_SPEC) if kind == "VM" else {}), **(extra or {})})
    harness.wait_ready(namespace, name, timeout=90)
    return name


@pytest.mark.parametrize("kind", ["CONTAINER", "VM"])
def test_snapshot_and_restore_in_place(harness: Harness, ns: str, kind: str) -> None:
    name = make_instance(harness, ns, kind)
    before = harness.get(ns, name)
    apply(harness, ns, "IncusInstanceSnapshot", "before", {"instanceRef": {"name": name}})
    kubectl_wait_ready(harness, ns, "incusinstancesnapshot", "before")
    taken = status(harness, ns, "incusinstancesnapshots", "before")
    assert taken["phase"] == "Ready" and taken["consistency"] == "Crash"
    assert taken["snapshotName"].startswith("tio-") and taken["source"]["instance"] == name
    assert taken["creationTime"] and isinstance(taken["usedBytes"], int) and isinstance(taken["referencedBytes"], int)
    root = taken["datasets"][0]
    assert {f"{d}@{taken['snapshotName']}" for d in taken["datasets"]} <= zfs_snapshots(harness)
    saved = content(harness, root)

    write(harness, root, "written after the snapshot")
    apply(
        harness, ns, "IncusInstanceRestore", "undo", {"instanceRef": {"name": name}, "snapshotRef": {"name": "before"}}
    )
    kubectl_wait_ready(harness, ns, "incusinstancerestore", "undo", timeout=120)
    done = status(harness, ns, "incusinstancerestores", "undo")
    assert done["phase"] == "Succeeded" and done["snapshotName"] == taken["snapshotName"] and done["wasRunning"]
    assert content(harness, root) == saved
    assert harness.sim.run(lambda: list(storage(harness).changed_under)) == [], "rolled back under a running guest"
    harness.wait_ready(ns, name, timeout=60)
    after = harness.get(ns, name)
    assert after["spec"] == before["spec"] and after["metadata"]["generation"] == before["metadata"]["generation"]
    # As Argo CD diffs it (tests/test_argocd_diff.py): the manifest from Git against the live object.
    manifest = {"apiVersion": GROUP, "kind": "IncusInstance", "metadata": {"name": name}, "spec": before["spec"]}
    diff = harness.cluster.kubectl("diff", "-n", ns, "-f", "-", input=json.dumps(manifest), check=False)
    assert diff.returncode == 0, f"the restore put the IncusInstance out of sync:\n{diff.stdout}{diff.stderr}"
    log = writes(harness, name)
    rollback = max(i for i, (method, _) in enumerate(log) if method in ROLLBACKS)
    assert any(m.endswith((".stop", ".poweroff")) for m, _ in log[:rollback]), log
    assert any(m in START_WRITES for m, _ in log[rollback:]), log

    assert (
        harness.cluster.kubectl("delete", "incusinstancesnapshot", "before", "-n", ns, "--timeout=60s").returncode == 0
    )
    assert not {f"{d}@{taken['snapshotName']}" for d in taken["datasets"]} & zfs_snapshots(harness)
    assert harness.delete(ns, name).returncode == 0
    assert name not in harness.instance_names()


def test_newer_snapshots_are_refused_by_name_unless_allowed(harness: Harness, ns: str) -> None:
    name = make_instance(harness, ns, "CONTAINER")
    apply(harness, ns, "IncusInstanceSnapshot", "one", {"instanceRef": {"name": name}})
    first = wait_phase(harness, ns, "incusinstancesnapshots", "one", "Ready")
    apply(harness, ns, "IncusInstanceSnapshot", "two", {"instanceRef": {"name": name}})
    second = wait_phase(harness, ns, "incusinstancesnapshots", "two", "Ready")
    root = first["datasets"][0]

    apply(harness, ns, "IncusInstanceRestore", "back", {"instanceRef": {"name": name}, "snapshotRef": {"name": "one"}})
    refused = wait_phase(harness, ns, "incusinstancerestores", "back", "Failed")
    (ready,) = [c for c in refused["conditions"] if c["type"] == "Ready"]
    assert ready["reason"] == "NewerSnapshots" and f"{root}@{second['snapshotName']}" in ready["message"]
    assert not any(m in ROLLBACKS for m, _ in writes(harness, name)), "refused before any rollback"
    harness.wait_ready(ns, name)

    spec = {"instanceRef": {"name": name}, "snapshotRef": {"name": "one"}, "allowDestroyingNewerSnapshots": True}
    apply(harness, ns, "IncusInstanceRestore", "back-anyway", spec)
    done = wait_phase(harness, ns, "incusinstancerestores", "back-anyway", "Succeeded", timeout=120)
    assert done["destroyedSnapshots"] == [f"{root}@{second['snapshotName']}"]
    gone = wait_phase(harness, ns, "incusinstancesnapshots", "two", "Failed")
    assert [c["reason"] for c in gone["conditions"] if c["type"] == "Ready"] == ["Gone"]
    assert f"{root}@{second['snapshotName']}" not in zfs_snapshots(harness)
    harness.delete(ns, name)


def test_a_snapshot_taken_stopped_stops_and_starts_the_instance(harness: Harness, ns: str) -> None:
    name = make_instance(harness, ns, "CONTAINER")
    apply(harness, ns, "IncusInstanceSnapshot", "cold", {"instanceRef": {"name": name}, "consistency": "Stopped"})
    taken = wait_phase(harness, ns, "incusinstancesnapshots", "cold", "Ready", timeout=90)
    assert taken["consistency"] == "Stopped"
    log = writes(harness, name)
    create = next(i for i, (m, _) in enumerate(log) if m.endswith("snapshot.create"))
    assert any(m.endswith(".stop") for m, _ in log[:create]), log
    harness.wait_ready(ns, name, timeout=60)
    wait_until(lambda: any(m in START_WRITES for m, _ in writes(harness, name)[create:]), what="started again")
    harness.delete(ns, name)


def test_a_snapshot_names_only_an_instance_of_its_namespace_that_owns_its_instance(
    harness: Harness, ns: str, cluster: Cluster
) -> None:
    name = make_instance(harness, ns, "CONTAINER")
    other = f"{harness.prefix}{uuid.uuid4().hex[:8]}"  # type: ignore[attr-defined]
    cluster.kubectl("create", "namespace", other)
    # Another tenant's IncusInstance naming the same TrueNAS instance: it does not own it ...
    harness.apply(other, "squatter", {"name": name})
    harness.wait_synced_false(other, "squatter", "Conflict")
    # ... so a snapshot through it is refused, and one of a name that does not exist waits.
    apply(harness, other, "IncusInstanceSnapshot", "steal", {"instanceRef": {"name": "squatter"}})
    refused = wait_phase(harness, other, "incusinstancesnapshots", "steal", "Failed")
    assert [c["reason"] for c in refused["conditions"] if c["type"] == "Ready"] == ["NotOwner"]
    apply(harness, other, "IncusInstanceSnapshot", "nothing", {"instanceRef": {"name": name}})
    pending = wait_phase(harness, other, "incusinstancesnapshots", "nothing", "Pending")
    assert [c["reason"] for c in pending["conditions"] if c["type"] == "Ready"] == ["InstanceNotFound"]
    apply(harness, other, "IncusInstanceRestore", "wipe", {"instanceRef": {"name": "squatter"}, "truenasSnapshot": "x"})
    wait_phase(harness, other, "incusinstancerestores", "wipe", "Failed")
    assert not any(m.endswith("snapshot.create") or m in ROLLBACKS for m, _ in writes(harness, name)), writes(
        harness, name
    )
    harness.delete(ns, name)


def test_admission_refuses_a_restore_without_exactly_one_source_and_any_spec_change(harness: Harness, ns: str) -> None:
    manifest = {"apiVersion": GROUP, "kind": "IncusInstanceRestore", "metadata": {"name": "neither"}}
    result = harness.cluster.apply({**manifest, "spec": {"instanceRef": {"name": "x"}}}, ns)
    assert result.returncode != 0 and "exactly one of snapshotRef and truenasSnapshot" in result.stderr
    both = {"instanceRef": {"name": "x"}, "truenasSnapshot": "a", "snapshotRef": {"name": "b"}}
    result = harness.cluster.apply({**manifest, "spec": both}, ns)
    assert result.returncode != 0 and "exactly one of snapshotRef and truenasSnapshot" in result.stderr
    apply(harness, ns, "IncusInstanceSnapshot", "fixed", {"instanceRef": {"name": "absent"}})
    changed = {"apiVersion": GROUP, "kind": "IncusInstanceSnapshot", "metadata": {"name": "fixed"}}
    result = harness.cluster.apply({**changed, "spec": {"instanceRef": {"name": "another"}}}, ns)
    assert result.returncode != 0 and "spec is immutable" in result.stderr


def test_a_restore_deleted_before_its_rollback_is_cancelled(harness: Harness, ns: str) -> None:
    """Deleting a restore while it stops the instance cancels it: nothing is rolled back, and the
    instance goes back to what its spec says (a slow stop job gives the time to delete it)."""
    name = make_instance(harness, ns, "CONTAINER")
    apply(harness, ns, "IncusInstanceSnapshot", "base", {"instanceRef": {"name": name}})
    wait_phase(harness, ns, "incusinstancesnapshots", "base", "Ready")
    with slow_jobs(harness):
        apply(
            harness,
            ns,
            "IncusInstanceRestore",
            "oops",
            {"instanceRef": {"name": name}, "snapshotRef": {"name": "base"}},
        )
        wait_phase(harness, ns, "incusinstancerestores", "oops", "Stopping")
        harness.cluster.kubectl("delete", "incusinstancerestore", "oops", "-n", ns)
    harness.wait_ready(ns, name, timeout=90)
    assert not any(m in ROLLBACKS for m, _ in writes(harness, name)), writes(harness, name)
    harness.delete(ns, name)


def test_a_snapshot_taken_while_the_restore_stops_the_instance_fails_it_and_frees_the_instance(
    harness: Harness, ns: str
) -> None:
    """Hostile review F1: "snapshot before restoring" in one apply made a newer snapshot appear after
    the restore's Pending check; every rollback attempt was refused and the instance stayed stopped,
    retried for ever. Now: Failed, NewerSnapshots naming it, and the instance back to its powerState."""
    name = make_instance(harness, ns, "CONTAINER")
    apply(harness, ns, "IncusInstanceSnapshot", "good", {"instanceRef": {"name": name}})
    wait_phase(harness, ns, "incusinstancesnapshots", "good", "Ready")
    with slow_jobs(harness):
        apply(
            harness,
            ns,
            "IncusInstanceRestore",
            "undo",
            {"instanceRef": {"name": name}, "snapshotRef": {"name": "good"}},
        )
        wait_phase(harness, ns, "incusinstancerestores", "undo", "Stopping")
        apply(harness, ns, "IncusInstanceSnapshot", "late", {"instanceRef": {"name": name}})
        late = wait_phase(harness, ns, "incusinstancesnapshots", "late", "Ready")
    failed = wait_phase(harness, ns, "incusinstancerestores", "undo", "Failed", timeout=90)
    (ready,) = [c for c in failed["conditions"] if c["type"] == "Ready"]
    assert ready["reason"] == "NewerSnapshots" and late["snapshotName"] in ready["message"], ready
    harness.wait_ready(ns, name, timeout=90)
    assert not any(m in ROLLBACKS for m, _ in writes(harness, name))
    harness.delete(ns, name)


# ----- clones (spec.source.snapshotRef) --------------------------------------------------------------
CLONES_ON = {"25.04.2", "25.10", "26.0", "27.0"}
"""Where a VM is built on vm.* (a ZFS clone of the snapshot's root volume); 25.04.0 has virt.instance only."""


def ready_reason(found: dict[str, Any]) -> tuple[str, str]:
    (ready,) = [c for c in found.get("conditions") or [] if c["type"] == "Ready"]
    return str(ready["reason"]), str(ready["message"])


def sim_vm(harness: Harness, name: str) -> Any:
    return harness.sim.run(lambda: harness.sim.sim.vms.by_name(name.replace("-", "_")))


def clone_spec(snapshot: str, **extra: Any) -> dict[str, Any]:
    return {"type": "VM", "source": {"snapshotRef": {"name": snapshot}}, "cpu": "1", "memory": "1Gi", **extra}


def test_a_vm_cloned_from_a_snapshot_holds_its_data_and_the_snapshot_waits_for_it(harness: Harness, ns: str) -> None:
    profile = harness.sim.sim.profile.name
    source = make_instance(harness, ns, "VM")
    apply(harness, ns, "IncusInstanceSnapshot", "first", {"instanceRef": {"name": source}})
    wait_phase(harness, ns, "incusinstancesnapshots", "first", "Ready")
    apply(harness, ns, "IncusInstanceSnapshot", "gold", {"instanceRef": {"name": source}})
    taken = wait_phase(harness, ns, "incusinstancesnapshots", "gold", "Ready")
    clone = unique("clone")
    if profile not in CLONES_ON:
        apply(harness, ns, "IncusInstance", clone, clone_spec("gold"))
        refused = harness.wait_synced_false(ns, clone, "Unsupported", timeout=60)
        message = next(c["message"] for c in refused["conditions"] if c["type"] == "Synced")
        assert profile in message and "virt.instance" in message, message
        assert clone not in harness.instance_names()
        harness.delete(ns, clone)
        harness.delete(ns, source)
        return
    root = next(d for d in taken["datasets"] if d.endswith("/root"))
    origin = f"{root}@{taken['snapshotName']}"
    saved = content(harness, root)
    write(harness, root, "written after the snapshot")
    apply(harness, ns, "IncusInstance", clone, clone_spec("gold"))
    harness.wait_ready(ns, clone, timeout=90)
    home = f"{root.split('/')[0]}/incus-operator/vms/{clone.replace('-', '_')}"
    cloned = harness.sim.run(lambda: storage(harness).datasets[f"{home}/root"])
    assert cloned.origin == origin and cloned.content == saved, (cloned.origin, cloned.content)
    assert sim_vm(harness, clone).state == "RUNNING"
    made = harness.get(ns, clone)["status"]
    assert made["binding"]["source"] == "gold" and "image" not in made["binding"], made["binding"]
    log = writes(harness, clone)
    assert not any(
        m in ("vm.device.convert", "vm.import_disk_image", "filesystem.put") and "images" in a for m, a in log
    )
    # spec.source is immutable now the instance exists (admission).
    moved = harness.cluster.apply(
        {"apiVersion": GROUP, "kind": "IncusInstance", "metadata": {"name": clone}, "spec": clone_spec("other")}, ns
    )
    assert moved.returncode != 0 and "spec.source is immutable" in moved.stderr, moved.stderr

    # Rolling back past the clone's origin would destroy it: refused by name before anything stops.
    spec = {"instanceRef": {"name": source}, "snapshotRef": {"name": "first"}, "allowDestroyingNewerSnapshots": True}
    earlier = len(writes(harness, source))
    apply(harness, ns, "IncusInstanceRestore", "past-the-clone", spec)
    refused = wait_phase(harness, ns, "incusinstancerestores", "past-the-clone", "Failed")
    reason, message = ready_reason(refused)
    assert reason == "HasClones" and origin.split("/root@")[0] in message and f"IncusInstance {ns}/{clone}" in message
    assert not any(m in ROLLBACKS or m in ("vm.stop", "vm.poweroff") for m, _ in writes(harness, source)[earlier:])
    assert sim_vm(harness, source).state == "RUNNING" and origin in zfs_snapshots(harness)

    # The snapshot and the source wait for the clone, naming it; nothing is stopped or deleted meanwhile.
    harness.cluster.kubectl("delete", "incusinstancesnapshot", "gold", "-n", ns, "--wait=false")
    waiting = wait_phase(harness, ns, "incusinstancesnapshots", "gold", "Deleting")
    reason, message = ready_reason(waiting)
    assert reason == "HasClones" and f"IncusInstance {ns}/{clone}" in message, message
    assert origin in zfs_snapshots(harness)
    harness.delete(ns, source, wait=False)
    blocked = harness.wait_synced_false(ns, source, "HasClones", timeout=60)
    assert f"IncusInstance {ns}/{clone}" in next(c["message"] for c in blocked["conditions"] if c["type"] == "Synced")
    assert sim_vm(harness, source).state == "RUNNING"

    # The clone goes; then the snapshot and the source follow by themselves.
    assert harness.delete(ns, clone).returncode == 0
    wait_until(lambda: origin not in zfs_snapshots(harness), timeout=150, what="the snapshot deleted after its clone")
    wait_until(lambda: not harness.exists(ns, source), timeout=150, what="the source deleted after its clone")
    assert sim_vm(harness, source) is None and sim_vm(harness, clone) is None
    gone = harness.cluster.kubectl("wait", "--for=delete", "incusinstancesnapshot/gold", "-n", ns, "--timeout=150s")
    assert gone.returncode == 0, gone.stderr
    assert not [d for d in harness.sim.run(lambda: list(storage(harness).datasets)) if home in d or root in d]


def test_a_container_is_never_cloned_and_says_why_naming_the_version(harness: Harness, ns: str) -> None:
    profile = harness.sim.sim.profile.name
    source = make_instance(harness, ns, "CONTAINER")
    apply(harness, ns, "IncusInstanceSnapshot", "base", {"instanceRef": {"name": source}})
    wait_phase(harness, ns, "incusinstancesnapshots", "base", "Ready")
    clone = unique("ctclone")
    apply(harness, ns, "IncusInstance", clone, {"type": "CONTAINER", "source": {"snapshotRef": {"name": "base"}}})
    refused = harness.wait_synced_false(ns, clone, "Unsupported", timeout=60)
    message = next(c["message"] for c in refused["conditions"] if c["type"] == "Synced")
    assert message.startswith("spec.source.snapshotRef: ") and profile in message and "container" in message, message
    # A VM made from a container's snapshot is refused too (where vm.* clones at all).
    vm = unique("vmfromct")
    apply(harness, ns, "IncusInstance", vm, clone_spec("base"))
    other = harness.wait_synced_false(ns, vm, "Unsupported", timeout=60)
    said = next(c["message"] for c in other["conditions"] if c["type"] == "Synced")
    assert ("only snapshots of vm.* VMs" in said) if profile in CLONES_ON else ("virt.instance" in said), said
    assert not {clone, vm} & harness.instance_names()
    for name in (clone, vm, source):
        assert harness.delete(ns, name).returncode == 0


def test_a_clone_waits_for_its_snapshot_in_its_own_namespace_only(harness: Harness, ns: str, cluster: Cluster) -> None:
    profile = harness.sim.sim.profile.name
    if profile not in CLONES_ON:
        return  # 25.04.0: refused before any snapshot is looked at (the test above)
    source = make_instance(harness, ns, "VM")
    other = f"{harness.prefix}{uuid.uuid4().hex[:8]}"  # type: ignore[attr-defined]
    cluster.kubectl("create", "namespace", other)
    # Another tenant naming this namespace's snapshot finds nothing: a name resolves in its own namespace.
    apply(harness, ns, "IncusInstanceSnapshot", "mine", {"instanceRef": {"name": source}})
    wait_phase(harness, ns, "incusinstancesnapshots", "mine", "Ready")
    thief = unique("thief")
    apply(harness, other, "IncusInstance", thief, clone_spec("mine"))
    pending = harness.wait_synced_false(other, thief, "SourceNotReady", timeout=60)
    said = next(c["message"] for c in pending["conditions"] if c["type"] == "Synced")
    assert f"no IncusInstanceSnapshot mine in namespace {other}" in said, said
    # A clone applied with its snapshot is made once the snapshot is Ready (the snapshot wakes it).
    apply(harness, ns, "IncusInstance", "early", clone_spec("later"))
    harness.wait_synced_false(ns, "early", "SourceNotReady", timeout=60)
    apply(harness, ns, "IncusInstanceSnapshot", "later", {"instanceRef": {"name": source}})
    harness.wait_ready(ns, "early", timeout=60)
    assert thief not in harness.instance_names()
    for namespace, name in ((other, thief), (ns, "early"), (ns, source)):
        assert harness.delete(namespace, name).returncode == 0


def test_admission_takes_exactly_one_of_image_and_source(harness: Harness, ns: str) -> None:
    both = {"type": "VM", "image": "debian/bookworm", "source": {"snapshotRef": {"name": "x"}}}
    cases = (
        (both, "at most one of spec.image and spec.source may be set"),
        ({"type": "VM"}, "exactly one of spec.image and spec.source must be set"),
    )
    for spec, message in cases:
        manifest = {"apiVersion": GROUP, "kind": "IncusInstance", "metadata": {"name": "one-of"}, "spec": spec}
        result = harness.cluster.apply(manifest, ns)
        assert result.returncode != 0 and message in result.stderr, result.stderr
