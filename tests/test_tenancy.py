"""The security review's findings, replayed by tenants impersonated with ``kubectl --as``.

A tenant may manage IncusInstances and TrueNASConnections (and create Secrets) in its own namespace,
and may not read Secrets. The operator runs with the default policy: no adoption anywhere, except
in namespaces the policy names (``*-adopt-*`` here). Findings 6-10 are proven in their own modules
(README, "Tenancy": test_credentials.py, test_admission.py, test_policy*.py).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from .conftest import Cluster, module_prefix
from .harness import Harness, module_operator, unique, wait_until

pytestmark = pytest.mark.e2e  # needs the local control plane (kube-apiserver + etcd)

TENANT_RULES = [
    {
        "apiGroups": ["incus.truenas.io"],
        "resources": ["incusinstances", "truenasconnections"],
        "verbs": ["get", "list", "watch", "create", "update", "patch", "delete"],
    },
    {"apiGroups": [""], "resources": ["secrets"], "verbs": ["create", "delete"]},
    {"apiGroups": [""], "resources": ["events"], "verbs": ["get", "list"]},
]


@pytest.fixture(scope="module")
def harness(
    cluster: Cluster, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[Harness]:
    prefix = module_prefix(request)
    policy = {"adoption": [{"namespaces": [f"{prefix}*-adopt-*"], "connections": ["*"]}]}
    yield from module_operator(cluster, tmp_path_factory.mktemp("tenancy"), prefix, "25.10", policy=policy)


class Tenant:
    """A user with the tenant's Role in one namespace, acting through ``kubectl --as``."""

    def __init__(self, cluster: Cluster, namespace: str, user: str) -> None:
        self.cluster, self.namespace, self.user = cluster, namespace, user
        role = {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": {"name": "tenant", "namespace": namespace},
            "rules": TENANT_RULES,
        }
        binding = {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": {"name": "tenant", "namespace": namespace},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "tenant"},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}],
        }
        for manifest in (role, binding):
            assert cluster.apply(manifest, namespace).returncode == 0

    def kubectl(self, *args: str, input: str | None = None) -> Any:
        return self.cluster.kubectl(f"--as={self.user}", "-n", self.namespace, *args, input=input, check=False)

    def apply(self, name: str, spec: dict[str, Any], annotations: dict[str, str] | None = None) -> Any:
        manifest = {
            "apiVersion": "incus.truenas.io/v1alpha1",
            "kind": "IncusInstance",
            "metadata": {"name": name, **({"annotations": annotations} if annotations else {})},
            "spec": {"type": "CONTAINER", "image": "debian/bookworm", **spec},
        }
        return self.kubectl("apply", "-f", "-", input=yaml.safe_dump(manifest))

    def delete(self, name: str) -> Any:
        return self.kubectl("delete", "incusinstance", name, "--wait=true", "--timeout=60s")


def other_namespace(cluster: Cluster, namespace: str, tag: str) -> str:
    name = f"{namespace[:50]}-{tag}"
    cluster.kubectl("create", "namespace", name)
    return name


def writes(harness: Harness) -> dict[str, int]:
    """TrueNAS calls that change something."""
    return {
        method: count
        for method, count in harness.calls().items()
        if method.startswith("virt.instance.") and not method.endswith(("query", "device_list"))
    }


# ----- finding 1: forged ownership annotations ------------------------------------------------------------------
def test_forged_annotations_take_over_nothing(harness: Harness, namespace: str) -> None:
    tenant = Tenant(harness.cluster, namespace, "tenant-a")
    victim = unique("victim")
    harness.sim.run(
        lambda: harness.sim.sim.seed_instance(
            name=victim, type="CONTAINER", status="RUNNING", environment={"DB": "prod"}
        )
    )
    before = writes(harness)
    forged = {"incus.truenas.io/adopt": "true", "incus.truenas.io/created-instance": victim}
    spec = {
        "environment": {"EVIL": "1"},
        "devices": [{"name": "loot", "type": "DISK", "source": "/mnt/tank", "destination": "/loot"}],
    }
    assert tenant.apply(victim, spec, annotations=forged).returncode == 0
    status = harness.wait_synced_false(namespace, victim, "AdoptionNotAllowed")
    assert "policy" in status["message"] and "instanceId" not in status
    time.sleep(3)  # a few resyncs
    instance = harness.instance(victim)
    assert instance.environment == {"DB": "prod"} and not instance.devices
    # Deleting the resource leaves the instance it never owned.
    assert tenant.delete(victim).returncode == 0
    assert harness.instance(victim) is not None and harness.instance(victim).status == "RUNNING"
    assert writes(harness) == before, "no TrueNAS write for a resource that owns nothing"


def test_adoption_only_where_the_policy_allows_it(harness: Harness, namespace: str) -> None:
    allowed = other_namespace(harness.cluster, namespace, "adopt-ok")
    tenant = Tenant(harness.cluster, allowed, "tenant-adopter")
    name = unique("legacy")
    harness.sim.run(lambda: harness.sim.sim.seed_instance(name=name, type="CONTAINER", status="RUNNING"))
    assert tenant.apply(name, {"environment": {"NEW": "1"}}, {"incus.truenas.io/adopt": "true"}).returncode == 0
    harness.wait_ready(allowed, name)
    assert harness.instance(name).environment == {"NEW": "1"}
    harness.wait_event(allowed, name, "Adopted")


# ----- finding 2: deleting a resource blocked by Conflict ------------------------------------------------------
def test_deleting_a_conflicting_resource_leaves_the_owners_instance(harness: Harness, namespace: str) -> None:
    owner = Tenant(harness.cluster, namespace, "tenant-owner")
    intruder_ns = other_namespace(harness.cluster, namespace, "b")
    intruder = Tenant(harness.cluster, intruder_ns, "tenant-b")
    shared = unique("shared")
    assert owner.apply("app", {"name": shared, "environment": {"OWNER": "a"}}).returncode == 0
    harness.wait_ready(namespace, "app")
    forged = {"incus.truenas.io/adopt": "true", "incus.truenas.io/created-instance": shared}
    assert intruder.apply("grab", {"name": shared, "environment": {"OWNER": "b"}}, forged).returncode == 0
    status = harness.wait_synced_false(intruder_ns, "grab", "Conflict")
    # Issue 19 item 9: the holder's namespace and resource are another tenant's business.
    assert f"{namespace}/app" not in status["message"] and "another IncusInstance" in status["message"]
    creates = harness.calls().get("virt.instance.create", 0)
    assert intruder.delete("grab").returncode == 0
    time.sleep(2)
    instance = harness.instance(shared)
    assert instance is not None and instance.environment == {"OWNER": "a"}
    assert harness.calls().get("virt.instance.create", 0) == creates, "nothing re-created from the image"
    assert harness.condition(namespace, "app", "Ready")["status"] == "True"


# ----- finding 3: connectionRef changed after creation ----------------------------------------------------------
def test_connection_ref_cannot_move_a_created_resource_to_another_nas(harness: Harness, namespace: str) -> None:
    tenant = Tenant(harness.cluster, namespace, "tenant-a")
    assert tenant.apply("web", {}).returncode == 0
    harness.wait_ready(namespace, "web")
    moved = tenant.apply("web", {"connectionRef": {"name": "other-nas"}})
    assert moved.returncode != 0 and "spec.connectionRef is immutable" in moved.stderr
    assert "connectionRef" not in harness.get(namespace, "web")["spec"]


# ----- finding 4: ownership across operator restarts ------------------------------------------------------------
def test_a_younger_conflicting_resource_never_acts_across_restarts(harness: Harness, namespace: str) -> None:
    owner = Tenant(harness.cluster, namespace, "tenant-owner")
    intruder_ns = other_namespace(harness.cluster, namespace, "late")
    intruder = Tenant(harness.cluster, intruder_ns, "tenant-late")
    shared = unique("dup")
    assert owner.apply("app", {"name": shared, "environment": {"OWNER": "a"}}).returncode == 0
    harness.wait_ready(namespace, "app")
    forged = {"incus.truenas.io/adopt": "true", "incus.truenas.io/created-instance": shared}
    spec = {"name": shared, "environment": {"OWNER": "b"}, "powerState": "Stopped"}
    assert intruder.apply("dup", spec, forged).returncode == 0
    harness.wait_synced_false(intruder_ns, "dup", "Conflict")
    before = writes(harness)
    for _ in range(5):
        harness.operator.kill()
        harness.operator.start()
        harness.wait_status(
            intruder_ns,
            "dup",
            "Conflict after the restart",
            lambda s: s.get("lastSyncTime") is not None and "Conflict" in (s.get("message") or ""),
        )
        time.sleep(2)
        instance = harness.instance(shared)
        assert instance.environment == {"OWNER": "a"} and instance.status == "RUNNING"
    assert writes(harness) == before, "neither stops nor environment rewrites after restarts"


# ----- finding 5: a namespace deleted all at once --------------------------------------------------------------
def test_deleting_everything_in_a_namespace_at_once_finishes_and_leaks_nothing(
    harness: Harness, namespace: str
) -> None:
    from .harness import start_simulator

    nas = start_simulator("25.10", job_duration=0.05)
    try:
        connection = harness.connect_namespace(namespace, nas)
        names = [unique("ns") for _ in range(3)]
        for name in names:
            harness.apply(namespace, name, {"connectionRef": {"name": connection}})
        for name in names:
            harness.wait_ready(namespace, name)
        harness.apply(namespace, "never-created", {"connectionRef": {"name": "missing"}})
        # What the namespace controller does: delete every object at once, Secrets first among equals.
        harness.cluster.kubectl(
            "delete", "secrets,truenasconnections,incusinstances", "--all", "-n", namespace, "--wait=false"
        )

        def remaining() -> list[str]:
            out = harness.cluster.kubectl(
                "get", "incusinstances,truenasconnections", "-n", namespace, "-o", "json"
            ).stdout
            return [f"{i['kind']}/{i['metadata']['name']}" for i in json.loads(out)["items"]]

        wait_until(lambda: remaining() == [], timeout=90, what=f"everything in {namespace} to go; left")
        assert not set(names) & harness.instance_names(nas), "no instance left behind on TrueNAS"
    finally:
        nas.stop()
