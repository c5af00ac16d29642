"""Issue 19's findings on the VM image path and the policy, replayed by tenants impersonated with
``kubectl --as`` (the Role of tests/test_tenancy.py: IncusInstances and TrueNASConnections in their
namespace, Secrets create-only, no status).

The operator runs under an administrator's policy that allows one team's own image mirror in its
namespaces (``*-bob``), caps VMs in ``*-capped`` and gives ``*-quota`` namespaces two connections
and one VM; everything else has the defaults (only the operator's own image server).
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from truenas_simulator.images import simplestreams_index, write_mirror

from .conftest import Cluster, module_prefix
from .harness import CREDENTIALS, Harness, module_operator, secret_manifest, unique, wait_until
from .test_tenancy import Tenant, other_namespace

pytestmark = pytest.mark.e2e  # needs the local control plane (kube-apiserver + etcd)

BOB_MIRROR = "bob-mirror"
BROKEN_MIRROR = "broken-mirror"


@pytest.fixture(scope="module")
def harness(
    cluster: Cluster, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[Harness]:
    prefix = module_prefix(request)
    workdir = tmp_path_factory.mktemp("tenancy-images")
    policy = {
        "rules": [
            {"namespaces": [f"{prefix}*-bob"], "vmImageServers": [f"file://{workdir / BOB_MIRROR}"]},
            {"namespaces": [f"{prefix}*-broken"], "vmImageServers": [f"file://{workdir / BROKEN_MIRROR}"]},
            {"namespaces": [f"{prefix}*-capped"], "maxRootDiskSize": "50Gi", "maxMemory": "4Gi", "maxVCPUs": 2},
        ],
        "quotas": [{"namespaces": [f"{prefix}*-quota"], "maxConnections": 2, "maxVMs": 1}],
    }
    yield from module_operator(cluster, workdir, prefix, "25.10", policy=policy)


def connection(tenant: Tenant, harness: Harness, name: str = "nas", **spec: Any) -> None:
    """A TrueNASConnection (and its key and CA Secrets) to the module's NAS, made by the tenant."""
    sim = harness.sim
    assert sim.ca_file is not None
    manifests = [
        secret_manifest(f"{name}-key", {"apiKey": sim.api_key}, labels=CREDENTIALS),
        secret_manifest(f"{name}-ca", {"ca.crt": sim.ca_file.read_text()}, labels=CREDENTIALS),
        {
            "apiVersion": "incus.truenas.io/v1alpha1",
            "kind": "TrueNASConnection",
            "metadata": {"name": name},
            "spec": {
                "url": sim.ws_url,
                "apiKeySecretRef": {"name": f"{name}-key", "key": "apiKey"},
                "tls": {"caSecretRef": {"name": f"{name}-ca", "key": "ca.crt"}},
                **spec,
            },
        },
    ]
    for manifest in manifests:  # a tenant may create Secrets but not read them, so no apply for those
        verb = "create" if manifest["kind"] == "Secret" else "apply"
        result = tenant.kubectl(verb, "-f", "-", input=yaml.safe_dump(manifest))
        assert result.returncode == 0, result.stderr


def ready(harness: Harness, namespace: str, name: str) -> dict[str, Any]:
    """The TrueNASConnection's Ready condition ({} until written)."""
    body = harness.cluster.get("truenasconnection", name, namespace)
    return next((c for c in (body.get("status") or {}).get("conditions", []) if c["type"] == "Ready"), {})


def wait_refused(harness: Harness, namespace: str, name: str, reason: str, timeout: float = 60.0) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        condition = ready(harness, namespace, name)
        return condition if condition.get("status") == "False" and condition.get("reason") == reason else None

    found: dict[str, Any] = harness.cluster.wait_for(check, timeout=timeout, what=f"{namespace}/{name}: {reason}")
    return found


def vm_spec(**fields: Any) -> dict[str, Any]:
    return {"type": "VM", "image": "debian/bookworm", "memory": "1Gi", "cpu": "1", **fields}


def root_of(harness: Harness, instance: str) -> Any:
    name = f"tank/incus-operator/vms/{instance.replace('-', '_')}/root"
    return harness.sim.run(lambda: harness.sim.sim.storage.datasets.get(name))


def plant(harness: Harness, directory: Path) -> str:
    """Bob's mirror: the real product and version of every VM image with his own bytes, indexed with
    their sha256 (so every check of his own index passes). Returns his debian/bookworm sha256."""
    write_mirror(list(harness.sim.sim.images.values()), directory)
    products_file = directory / "streams/v1/images.json"
    document = json.loads(products_file.read_text())
    planted = ""
    for key, product in document["products"].items():
        for version in product["versions"].values():
            item = version["items"]["disk.qcow2"]
            image_file = directory / item["path"]
            data = image_file.read_bytes()
            data = data[: -len(b"bob's bytes")] + b"bob's bytes"
            image_file.write_bytes(data)
            item["sha256"] = hashlib.sha256(data).hexdigest()
            if key == "debian:bookworm:amd64:default":
                planted = item["sha256"]
    products_file.write_text(json.dumps(document))
    return planted


def real_sha256(harness: Harness) -> str:
    _, products = simplestreams_index(list(harness.sim.sim.images.values()))
    item = next(iter(products["products"]["debian:bookworm:amd64:default"]["versions"].values()))["items"]
    return str(item["disk.qcow2"]["sha256"])


# ----- finding 1: a tenant plants the boot disk of other tenants' VMs -------------------------------------------
def test_a_tenants_image_under_the_same_version_never_boots_another_tenants_vm(
    harness: Harness, namespace: str
) -> None:
    bob_ns = other_namespace(harness.cluster, namespace, "bob")
    bob = Tenant(harness.cluster, bob_ns, "tenant-bob")
    alice = Tenant(harness.cluster, namespace, "tenant-alice")
    bob_sha = plant(harness, harness.workdir / BOB_MIRROR)
    connection(bob, harness, vmImageServer=f"file://{harness.workdir / BOB_MIRROR}")
    bob_vm, alice_vm = unique("bob-vm"), unique("alice-vm")
    assert bob.apply("planted", vm_spec(name=bob_vm, connectionRef={"name": "nas"})).returncode == 0
    harness.wait_ready(bob_ns, "planted", timeout=180)
    assert root_of(harness, bob_vm).content == bob_sha  # Bob's VM runs his own bytes: his to choose

    assert alice.apply("victim", vm_spec(name=alice_vm)).returncode == 0  # the default connection
    harness.wait_ready(namespace, "victim", timeout=180)
    root = root_of(harness, alice_vm)
    assert root.content == real_sha256(harness) != bob_sha, "Alice's VM must boot the administrator's image"
    assert root.origin is not None and real_sha256(harness) in root.origin


# ----- finding 2: SSRF with read-back ------------------------------------------------------------------------------
class Recorder:
    """An internal HTTP service on loopback that counts the requests it gets."""

    def __init__(self) -> None:
        hits: list[str] = []
        self.hits = hits

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                hits.append(self.path)
                self.send_response(200)
                self.end_headers()
                self.wfile.write(b'{"index": {}}')

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Recorder:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_a_tenant_cannot_point_the_operator_at_an_internal_url(harness: Harness, namespace: str) -> None:
    tenant = Tenant(harness.cluster, namespace, "tenant-ssrf")
    with Recorder() as internal:
        connection(tenant, harness, vmImageServer=f"http://127.0.0.1:{internal.port}/")
        refused = wait_refused(harness, namespace, "nas", "PolicyDenied")
        assert "spec.vmImageServer" in refused["message"] and "vmImageServers" in refused["message"]
        assert tenant.apply("probe", vm_spec(connectionRef={"name": "nas"})).returncode == 0
        wait_until(lambda: harness.condition(namespace, "probe", "Synced").get("status") == "False", 60)
        assert internal.hits == [], "the operator fetched a tenant's internal URL"


# ----- finding 3: local-mirror traversal -------------------------------------------------------------------------
def test_a_tenant_names_no_local_directory_and_learns_nothing_of_it(harness: Harness, namespace: str) -> None:
    tenant = Tenant(harness.cluster, namespace, "tenant-local")
    existing, missing = "/etc", "/no-such-dir"
    connection(tenant, harness, name="here", vmImageServer=existing)
    connection(tenant, harness, name="there", vmImageServer=f"file://{missing}")
    messages = [
        wait_refused(harness, namespace, name, "PolicyDenied")["message"].replace(path, "<path>")
        for name, path in (("here", existing), ("there", f"file://{missing}"))
    ]
    assert messages[0] == messages[1], "status must not tell whether a path exists"
    assert "only the administrator may choose" in messages[0]


# ----- finding 4: connections per namespace ------------------------------------------------------------------------
def test_a_namespace_gets_no_more_connections_than_its_quota(harness: Harness, namespace: str) -> None:
    quota_ns = other_namespace(harness.cluster, namespace, "quota")
    tenant = Tenant(harness.cluster, quota_ns, "tenant-many")
    for name in ("one", "two"):
        connection(tenant, harness, name=name)
        wait_until(lambda name=name: ready(harness, quota_ns, name).get("status") == "True", 60)
    connection(tenant, harness, name="three")
    refused = wait_refused(harness, quota_ns, "three", "QuotaExceeded")
    assert "maxConnections" in refused["message"]


def test_connections_with_one_url_and_key_share_one_websocket(harness: Harness, namespace: str) -> None:
    """Finding 4: 600 TrueNASConnections to one NAS were 601 WebSockets. Now connections with the same
    URL, key and TLS settings share one, in any namespace: six more connections open at most one
    more socket, and deleting them leaves the one the operator already had."""

    def sockets() -> int:
        server = harness.sim.server
        assert server is not None
        return harness.sim.run(lambda: len(server.websockets))

    tenant = Tenant(harness.cluster, namespace, "tenant-sockets")
    before = sockets()
    names = [f"same{i}" for i in range(6)]
    for name in names:
        connection(tenant, harness, name=name)
    for name in names:
        wait_until(lambda name=name: ready(harness, namespace, name).get("status") == "True", 60)
    assert sockets() <= before + 1, f"{sockets()} sockets for 6 connections with one URL and key ({before} before)"
    for name in names:
        assert tenant.kubectl("delete", "truenasconnection", name).returncode == 0
    wait_until(lambda: sockets() <= before, 60, what="the connections' shared socket closed")


# ----- finding 8: the policy had no VM limits ----------------------------------------------------------------------
def test_vm_sizes_and_counts_are_capped_by_the_policy(harness: Harness, namespace: str) -> None:
    capped_ns = other_namespace(harness.cluster, namespace, "capped")
    capped = Tenant(harness.cluster, capped_ns, "tenant-capped")
    huge = unique("huge")
    assert capped.apply("huge", vm_spec(name=huge, rootDiskSize="1Pi", memory="64Gi", cpu="64")).returncode == 0
    status = harness.wait_synced_false(capped_ns, "huge", "PolicyDenied", timeout=60)
    message = next(c["message"] for c in status["conditions"] if c["type"] == "Synced")
    assert all(f in message for f in ("maxRootDiskSize", "maxMemory", "maxVCPUs")), message
    quota_ns = other_namespace(harness.cluster, namespace, "quota")
    many = Tenant(harness.cluster, quota_ns, "tenant-vms")
    first, second = unique("first"), unique("second")
    assert many.apply("first", vm_spec(name=first)).returncode == 0
    harness.wait_ready(quota_ns, "first", timeout=180)
    assert many.apply("second", vm_spec(name=second)).returncode == 0
    status = harness.wait_synced_false(quota_ns, "second", "PolicyDenied", timeout=60)
    assert "maxVMs" in next(c["message"] for c in status["conditions"] if c["type"] == "Synced")
    assert harness.sim.run(lambda: harness.sim.sim.vms.by_name(second.replace("-", "_"))) is None
    assert harness.sim.run(lambda: harness.sim.sim.vms.by_name(huge.replace("-", "_"))) is None


# ----- item 9: smaller findings ---------------------------------------------------------------------------------
def test_a_url_port_that_is_not_plain_digits_is_refused_at_admission(harness: Harness, namespace: str) -> None:
    tenant = Tenant(harness.cluster, namespace, "tenant-port")
    manifest = {
        "apiVersion": "incus.truenas.io/v1alpha1",
        "kind": "TrueNASConnection",
        "metadata": {"name": "odd"},
        "spec": {"url": "wss://nas.example:+1234", "apiKeySecretRef": {"name": "k", "key": "apiKey"}},
    }
    result = tenant.kubectl("apply", "-f", "-", input=yaml.safe_dump(manifest))
    assert result.returncode != 0 and "spec.url" in result.stderr


def test_a_non_json_index_is_an_image_server_error_not_a_crash_in_sync(harness: Harness, namespace: str) -> None:
    broken_ns = other_namespace(harness.cluster, namespace, "broken")
    tenant = Tenant(harness.cluster, broken_ns, "tenant-broken")
    mirror = harness.workdir / BROKEN_MIRROR
    (mirror / "streams/v1").mkdir(parents=True)
    (mirror / "streams/v1/index.json").write_text("<html>not json</html>")
    connection(tenant, harness, vmImageServer=f"file://{mirror}")
    wait_until(lambda: ready(harness, broken_ns, "nas").get("status") == "True", 60)
    assert tenant.apply("vm", vm_spec(connectionRef={"name": "nas"})).returncode == 0
    status = harness.wait_synced_false(broken_ns, "vm", "ImageServerError", timeout=60)
    message = next(c["message"] for c in status["conditions"] if c["type"] == "Synced")
    assert "not JSON" in message
    assert harness.operator.alive(), "the operator survived the index"
    # The loop goes on: a fixed index is picked up without touching the resource.
    write_mirror(list(harness.sim.sim.images.values()), mirror)
    harness.wait_ready(broken_ns, "vm", timeout=180)


def test_a_vms_seed_is_readable_by_its_owner_only(harness: Harness, namespace: str) -> None:
    tenant = Tenant(harness.cluster, namespace, "tenant-seed")
    name = unique("seeded")
    spec = vm_spec(name=name, environment={"DB_PASSWORD": "hunter2"}, cloudInit={"userData": "#cloud-config\n"})
    assert tenant.apply("seeded", spec).returncode == 0
    harness.wait_ready(namespace, "seeded", timeout=180)
    seed = f"/mnt/tank/incus-operator/vms/{name.replace('-', '_')}/seed.iso"
    mode = harness.sim.run(lambda: harness.sim.sim.storage.modes.get(seed))
    assert mode is not None and mode & 0o077 == 0, oct(mode or 0)
