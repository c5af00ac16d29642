"""The second security review's identity, claim and teardown findings (issue 19 items 5, 6, 7),
replayed by tenants impersonated with ``kubectl --as`` (as tests/test_tenancy.py) against the
operator as a subprocess and a TLS simulator. Each test is named for the behaviour that failed.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from .conftest import Cluster, module_prefix
from .harness import CREDENTIALS, Harness, OperatorProcess, module_operator, secret_manifest, wait_until
from .test_tenancy import Tenant, other_namespace

pytestmark = pytest.mark.e2e  # needs the local control plane (kube-apiserver + etcd)


@pytest.fixture(scope="module")
def harness(
    cluster: Cluster, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[Harness]:
    prefix = module_prefix(request)
    policy = {"adoption": [{"namespaces": [f"{prefix}*-adopt-*"], "connections": ["*"]}]}
    yield from module_operator(cluster, tmp_path_factory.mktemp("identity"), prefix, "25.10", policy=policy)


def tenant_connection(tenant: Tenant, harness: Harness, url: str, name: str = "nas") -> None:
    """The tenant's own TrueNASConnection (and Secrets), created as the tenant."""
    sim = harness.sim
    assert sim.ca_file is not None
    manifests: list[dict[str, Any]] = [
        secret_manifest(f"{name}-key", {"apiKey": sim.api_key}, labels=CREDENTIALS),
        secret_manifest(f"{name}-ca", {"ca.crt": sim.ca_file.read_text()}, labels=CREDENTIALS),
        {
            "apiVersion": "incus.truenas.io/v1alpha1",
            "kind": "TrueNASConnection",
            "metadata": {"name": name},
            "spec": {
                "url": url,
                "apiKeySecretRef": {"name": f"{name}-key", "key": "apiKey"},
                "tls": {"caSecretRef": {"name": f"{name}-ca", "key": "ca.crt"}},
            },
        },
    ]
    for manifest in manifests:
        result = tenant.kubectl("create", "-f", "-", input=json.dumps(manifest))
        assert result.returncode == 0, result.stderr


def ledger(harness: Harness) -> list[dict[str, str]]:
    namespace = harness.operator.env["TIO_LEDGER_NAMESPACE"]
    found = harness.cluster.kubectl(
        "get", "configmaps", "-n", namespace, "-l", "incus.truenas.io/ownership=true", "-o", "json"
    )
    return [item["data"] for item in json.loads(found.stdout)["items"]]


def test_another_spelling_of_the_nas_url_does_not_let_a_tenant_adopt_an_owned_instance(
    harness: Harness, namespace: str
) -> None:
    """Finding 5: ``wss://localhost:PORT`` and ``wss://127.0.0.1:PORT`` were two TrueNAS identities;
    a namespace with an adoption grant on its own connection adopted (rewrote, then deleted) the
    instance another tenant owned through the default connection."""
    assert "127.0.0.1" in harness.sim.ws_url
    owner = Tenant(harness.cluster, namespace, "tenant-owner")
    shared = f"owned-{namespace[-6:]}"
    assert owner.apply("payroll", {"name": shared, "environment": {"OWNER": "1"}}).returncode == 0
    harness.wait_ready(namespace, "payroll", timeout=90)
    thief_ns = other_namespace(harness.cluster, namespace, "adopt-bob")
    thief = Tenant(harness.cluster, thief_ns, "tenant-bob")
    tenant_connection(thief, harness, harness.sim.ws_url.replace("127.0.0.1", "localhost"))
    spec = {"name": shared, "environment": {"BOB": "1"}, "connectionRef": {"name": "nas"}}
    assert thief.apply("grab", spec, annotations={"incus.truenas.io/adopt": "true"}).returncode == 0
    status = harness.wait_synced_false(thief_ns, "grab", "Conflict", timeout=90)
    assert namespace not in status["message"] and "payroll" not in status["message"]
    assert harness.instance(shared).environment == {"OWNER": "1"}, "the owned instance was not rewritten"
    assert thief.delete("grab").returncode == 0
    assert harness.instance(shared) is not None, "deleting the intruder leaves the owner's instance"
    assert harness.condition(namespace, "payroll", "Ready")["status"] == "True"


def test_a_teardown_then_a_restart_one_second_later_deletes_every_instance(harness: Harness, namespace: str) -> None:
    """Finding 7: the namespace's contents deleted (its key Secret goes at once, the connection waits
    for its instances), the operator restarted 1 s later: every resource stayed at SecretNotFound
    and the instances kept running."""
    tenant = Tenant(harness.cluster, namespace, "tenant-a")
    tenant_connection(tenant, harness, harness.sim.ws_url)
    names = [f"td-{i}-{namespace[-6:]}" for i in range(3)]
    for index, name in enumerate(names):
        assert tenant.apply(f"app{index}", {"name": name, "connectionRef": {"name": "nas"}}).returncode == 0
    for index in range(len(names)):
        harness.wait_ready(namespace, f"app{index}", timeout=120)
    hung = {"virt.instance.stop", "virt.instance.delete"}  # the deletions are under way when it restarts
    harness.sim.run(lambda: harness.sim.sim.knobs.hung_calls.update(hung))
    try:
        # What deleting the namespace does (there is no namespace controller here): everything in it, at once.
        result = harness.cluster.kubectl(
            "delete", "incusinstances,truenasconnections,secrets", "--all", "-n", namespace, "--wait=false", check=False
        )
        assert result.returncode == 0, result.stderr
        time.sleep(1)
        harness.operator.kill()
    finally:
        harness.sim.run(lambda: harness.sim.sim.knobs.hung_calls.difference_update(hung))
    harness.operator.start()

    def torn_down() -> bool:
        left = harness.cluster.kubectl(
            "get", "incusinstances,truenasconnections", "-n", namespace, "-o", "name", check=False
        )
        return not left.stdout.strip() and not (set(names) & harness.instance_names())

    wait_until(torn_down, timeout=180, interval=1.0, what="every instance deleted and every resource gone")


def test_two_operators_without_an_election_create_each_instance_once_and_leave_none_unowned(
    harness: Harness, namespace: str
) -> None:
    """Finding 6: with two operators (no election) 20 resources made 115 create calls and left 5
    instances with no owner in the ledger (so never deleted with their resource)."""
    second = OperatorProcess(
        harness.cluster, dict(harness.operator.env), harness.workdir / "second.log", args=harness.operator.args
    ).start()
    harness.sim.run(lambda: setattr(harness.sim.sim.knobs, "job_duration", 1.0))  # a wide race window
    try:
        tenant = Tenant(harness.cluster, namespace, "tenant-a")
        count = 12
        names = [f"two-{i}-{namespace[-6:]}" for i in range(count)]
        for index, name in enumerate(names):
            assert tenant.apply(f"app{index}", {"name": name}).returncode == 0
        try:
            for index in range(count):
                harness.wait_ready(namespace, f"app{index}", timeout=240)
        except AssertionError:
            seen = {f"app{i}": harness.get(namespace, f"app{i}").get("status", {}).get("message") for i in range(count)}
            raise AssertionError(f"not all Ready: {seen}; ledger: {ledger(harness)}") from None
        uids = {harness.get(namespace, f"app{index}")["metadata"]["uid"]: name for index, name in enumerate(names)}
        assert set(names) <= harness.instance_names()
        records = {r["instance"]: r["ownerUID"] for r in ledger(harness) if r["instance"] in set(names)}
        assert records == {name: uid for uid, name in uids.items()}, "every instance owned by its resource"
        for index in range(count):
            assert tenant.delete(f"app{index}").returncode == 0
        wait_until(lambda: not (set(names) & harness.instance_names()), timeout=180, what="all deleted")
    finally:
        harness.sim.run(lambda: setattr(harness.sim.sim.knobs, "job_duration", 0.05))
        second.stop()


@pytest.mark.parametrize("source", ["/mnt/./tank/x", "/mnt//tank/x"])
def test_admission_and_the_operator_agree_on_dot_and_double_slash_host_paths(
    harness: Harness, namespace: str, source: str
) -> None:
    """Item 9: the chart's admission policy (string prefixes) refused ``/mnt/./x`` and ``/mnt//x``
    where the operator's policy (path components) allowed them; now the schema refuses both forms
    for everyone, naming the field, so neither gate sees them."""
    tenant = Tenant(harness.cluster, namespace, "tenant-a")
    device = {"name": "data", "type": "DISK", "source": source, "destination": "/data"}
    result = tenant.apply("paths", {"devices": [device]})
    assert result.returncode != 0
    assert "spec.devices[0].source" in result.stderr, result.stderr


def test_a_resource_deleted_while_the_operator_was_down_has_its_instance_reaped(
    harness: Harness, namespace: str
) -> None:
    """Item 9: a resource deleted while no operator ran (its finalizer removed by hand) left its
    ledger record for ever: the instance ran on, and a re-created resource of the same name was in
    Conflict with its dead self."""
    tenant = Tenant(harness.cluster, namespace, "tenant-a")
    name = f"gone-{namespace[-6:]}"
    assert tenant.apply("app", {"name": name}).returncode == 0
    harness.wait_ready(namespace, "app", timeout=90)
    harness.operator.stop()
    try:
        patch = json.dumps({"metadata": {"finalizers": None}})
        harness.cluster.kubectl("patch", "incusinstance", "app", "-n", namespace, "--type=merge", "-p", patch)
        harness.cluster.kubectl("delete", "incusinstance", "app", "-n", namespace, "--wait=true", "--timeout=30s")
    finally:
        harness.operator.start()
    wait_until(lambda: name not in harness.instance_names(), timeout=150, what="the instance reaped (Delete)")
    wait_until(lambda: not [r for r in ledger(harness) if r["instance"] == name], timeout=30, what="record released")
    assert tenant.apply("app", {"name": name}).returncode == 0
    harness.wait_ready(namespace, "app", timeout=90)
