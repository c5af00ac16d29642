"""Findings 6 and 7 of issue 11 replayed on the local control plane, with the operator as a subprocess.

6: a tenant who may manage TrueNASConnections but not read Secrets points a connection at a server
   of theirs (it records every byte it receives) and names Secret ``payroll-db``: the operator never
   sends its value, and the connection's status says why.
7: a Secret value with a line break, over REST: no piece of the key in status, Events or the
   operator's log.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest
from aiohttp import WSMsgType, web

from .conftest import Cluster, module_prefix
from .harness import CREDENTIALS, Harness, module_operator, secret_manifest, unique, wait_until

pytestmark = pytest.mark.e2e  # needs the local control plane (kube-apiserver + etcd)

TENANT = "tenant-alice"
PAYROLL = "payroll-db-password-" + "S3cr3t" * 6


class Recorder:
    """The tenant's server: records every request (headers and body) and WebSocket message, and
    answers like a TrueNAS that refuses the login, so a client would go on sending."""

    def __init__(self) -> None:
        self.received: list[str] = []
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._runner: web.AppRunner | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Recorder:
        self._thread.start()
        assert self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._start())
        self._ready.set()
        self._loop.run_forever()

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert server is not None
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.received.append(f"{request.method} {request.path_qs} {dict(request.headers)!r} {await request.text()}")
        if request.headers.get("Upgrade", "").lower() != "websocket":
            return web.json_response({"message": "Not authenticated"}, status=401)
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for message in ws:
            if message.type == WSMsgType.TEXT:
                self.received.append(message.data)
                ident = json.loads(message.data).get("id")
                await ws.send_str(json.dumps({"jsonrpc": "2.0", "id": ident, "result": False}))
        return ws


@pytest.fixture(scope="module")
def harness(
    cluster: Cluster, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[Harness]:
    yield from module_operator(cluster, tmp_path_factory.mktemp("operator"), module_prefix(request), "25.10")


def tenant_may_manage_connections_not_secrets(cluster: Cluster, namespace: str) -> None:
    role = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": {"name": "tenant"},
        "rules": [
            {
                "apiGroups": ["incus.truenas.io"],
                "resources": ["incusinstances", "truenasconnections"],
                "verbs": ["get", "list", "watch", "create", "update", "patch", "delete"],
            }
        ],
    }
    binding = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": {"name": "tenant"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "tenant"},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": TENANT}],
    }
    for manifest in (role, binding):
        assert cluster.apply(manifest, namespace).returncode == 0


def as_tenant(cluster: Cluster, namespace: str, manifest: dict[str, Any]) -> None:
    result = cluster.kubectl(
        "apply", f"--as={TENANT}", "-n", namespace, "-f", "-", input=json.dumps(manifest), check=False
    )
    assert result.returncode == 0, result.stderr


def connection(name: str, url: str, secret: str, key: str, **extra: Any) -> dict[str, Any]:
    return {
        "apiVersion": "incus.truenas.io/v1alpha1",
        "kind": "TrueNASConnection",
        "metadata": {"name": name},
        "spec": {"url": url, "apiKeySecretRef": {"name": secret, "key": key}, **extra},
    }


def connection_condition(cluster: Cluster, namespace: str, name: str, kind: str) -> dict[str, Any]:
    status = cluster.get("truenasconnection", name, namespace).get("status") or {}
    return next((dict(c) for c in status.get("conditions", []) if c["type"] == kind), {})


def wait_connection(
    cluster: Cluster, namespace: str, name: str, kind: str, reason: str, timeout: float = 30
) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        condition = connection_condition(cluster, namespace, name, kind)
        return condition if condition.get("reason") == reason else None

    result: dict[str, Any] = wait_until(check, timeout, what=f"TrueNASConnection {name}: {kind} reason {reason}")
    return result


def pieces(secret: str) -> list[str]:
    return [secret, *(p for p in secret.split("\n") if len(p) >= 6), secret.split("-", 1)[1]]


def everything_said(harness: Harness, namespace: str) -> list[str]:
    kubectl = harness.cluster.kubectl
    return [
        harness.operator.logs(),
        kubectl("get", "events", "-n", namespace, "-o", "json").stdout,
        kubectl("get", "incusinstances,truenasconnections", "-n", namespace, "-o", "json").stdout,
    ]


# ----- finding 6 -----------------------------------------------------------------------------------------
def test_a_tenant_cannot_send_a_secret_they_cannot_read_to_their_server(
    harness: Harness, cluster: Cluster, namespace: str
) -> None:
    cluster.apply(secret_manifest("payroll-db", {"password": PAYROLL}), namespace)
    tenant_may_manage_connections_not_secrets(cluster, namespace)
    denied = cluster.kubectl("get", "secret", "payroll-db", f"--as={TENANT}", "-n", namespace, check=False)
    assert denied.returncode != 0 and "forbidden" in denied.stderr
    with Recorder() as recorder:
        # Plain transport to loopback is allowed, so only the Secret's missing opt-in stops these.
        websocket = f"ws://127.0.0.1:{recorder.port}"
        as_tenant(cluster, namespace, connection("grab", websocket, "payroll-db", "password"))
        rest = f"http://127.0.0.1:{recorder.port}"
        as_tenant(cluster, namespace, connection("grab-rest", rest, "payroll-db", "password", transport="rest"))
        name = unique("thief")
        as_tenant(
            cluster,
            namespace,
            {
                "apiVersion": "incus.truenas.io/v1alpha1",
                "kind": "IncusInstance",
                "metadata": {"name": name},
                "spec": {"type": "CONTAINER", "image": "debian/bookworm", "connectionRef": {"name": "grab"}},
            },
        )
        for grab in ("grab", "grab-rest"):
            ready = wait_connection(cluster, namespace, grab, "Ready", "SecretNotAllowed")
            assert ready["status"] == "False"
            assert f"{namespace}/payroll-db" in ready["message"]
            assert "incus.truenas.io/credentials=true" in ready["message"]
        status = harness.wait_synced_false(namespace, name, "SecretNotAllowed")
        assert "payroll-db" in status["message"]
        harness.wait_event(namespace, name, "SecretNotAllowed")
        # A connection that had read the Secret would have called within milliseconds; give the
        # operator's retries a few seconds more anyway.
        time.sleep(3)
        assert recorder.received == [], recorder.received
        for text in everything_said(harness, namespace):
            assert PAYROLL not in text and PAYROLL[20:] not in text


def test_a_bound_key_goes_only_to_the_hosts_its_owner_listed(
    harness: Harness, cluster: Cluster, namespace: str
) -> None:
    key = harness.sim.api_key
    secret = secret_manifest(
        "nas-key",
        {"apiKey": key},
        labels=CREDENTIALS,
        annotations={"incus.truenas.io/allowed-hosts": "truenas.example.internal"},
    )
    cluster.apply(secret, namespace)
    tenant_may_manage_connections_not_secrets(cluster, namespace)
    with Recorder() as recorder:
        as_tenant(cluster, namespace, connection("grab", f"ws://127.0.0.1:{recorder.port}", "nas-key", "apiKey"))
        ready = wait_connection(cluster, namespace, "grab", "Ready", "HostNotAllowed")
        assert "incus.truenas.io/allowed-hosts" in ready["message"] and f"{namespace}/nas-key" in ready["message"]
        assert recorder.received == []
    for text in everything_said(harness, namespace):
        assert key.split("-", 1)[1] not in text


# ----- finding 7 -----------------------------------------------------------------------------------------
def test_a_key_with_a_line_break_over_rest_shows_nowhere(harness: Harness, cluster: Cluster, namespace: str) -> None:
    sim = harness.sim
    assert sim.ca_file is not None
    bad = sim.api_key[:12] + "\n" + sim.api_key[12:] + "\n" + "tail-of-the-key"
    cluster.apply(secret_manifest("nas-key", {"apiKey": bad}, labels=CREDENTIALS), namespace)
    cluster.apply(secret_manifest("nas-ca", {"ca.crt": sim.ca_file.read_text()}, labels=CREDENTIALS), namespace)
    tls = {"caSecretRef": {"name": "nas-ca", "key": "ca.crt"}}
    cluster.apply(connection("nas", sim.url, "nas-key", "apiKey", transport="rest", tls=tls), namespace)
    name = unique("nl")
    harness.apply(namespace, name, {"connectionRef": {"name": "nas"}})
    ready = wait_connection(cluster, namespace, "nas", "Ready", "InvalidAPIKey")
    assert f"Secret {namespace}/nas-key key 'apiKey'" in ready["message"]
    harness.wait_synced_false(namespace, name, "InvalidAPIKey")
    harness.wait_event(namespace, name, "InvalidAPIKey")
    texts = everything_said(harness, namespace)
    leaks = [piece for piece in pieces(bad) for text in texts if piece in text]
    assert not leaks
    # Fixing the Secret is enough: the connection comes up.
    cluster.apply(secret_manifest("nas-key", {"apiKey": sim.api_key}, labels=CREDENTIALS), namespace)
    cluster.kubectl("annotate", "truenasconnection", "nas", "-n", namespace, "touch=1")
    wait_connection(cluster, namespace, "nas", "Ready", "Connected")
    harness.wait_ready(namespace, name, timeout=60)


# ----- issue 21 item 2: a Secret that comes later, or is fixed later -------------------------------------
SECRET_CONVERGES = 30
"""Seconds a connection may take to notice a corrected Secret: the operator re-reads at most 10 s
apart (docs/troubleshooting.md); the rest is margin for a loaded machine."""


def ca_secret_and_tls(harness: Harness, cluster: Cluster, namespace: str) -> dict[str, Any]:
    assert harness.sim.ca_file is not None
    ca = secret_manifest("nas-ca", {"ca.crt": harness.sim.ca_file.read_text()}, labels=CREDENTIALS)
    cluster.apply(ca, namespace)
    return {"caSecretRef": {"name": "nas-ca", "key": "ca.crt"}}


def test_a_secret_created_after_its_connection_is_used_without_touching_it(
    harness: Harness, cluster: Cluster, namespace: str
) -> None:
    """GitOps order (SealedSecrets, ExternalSecrets): the connection first, its Secret a while later."""
    sim = harness.sim
    tls = ca_secret_and_tls(harness, cluster, namespace)
    cluster.apply(connection("nas", sim.ws_url, "nas-key", "apiKey", tls=tls), namespace)
    name = unique("later")
    harness.apply(namespace, name, {"connectionRef": {"name": "nas"}})
    wait_connection(cluster, namespace, "nas", "Ready", "SecretNotFound")
    time.sleep(12)  # long enough that a re-read only at the start (or on the operator's own writes) is over
    cluster.apply(secret_manifest("nas-key", {"apiKey": sim.api_key}, labels=CREDENTIALS), namespace)
    started = time.monotonic()
    wait_connection(cluster, namespace, "nas", "Ready", "Connected", timeout=SECRET_CONVERGES)
    print(f"connected {time.monotonic() - started:.1f} s after the Secret was created")
    harness.wait_ready(namespace, name, timeout=60)


def test_a_secret_fixed_after_the_connection_refused_it_is_used_without_touching_it(
    harness: Harness, cluster: Cluster, namespace: str
) -> None:
    """Unlabelled (SecretNotAllowed), then bound to another host (HostNotAllowed), then right."""
    sim = harness.sim
    tls = ca_secret_and_tls(harness, cluster, namespace)
    cluster.apply(secret_manifest("nas-key", {"apiKey": sim.api_key}), namespace)
    cluster.apply(connection("nas", sim.ws_url, "nas-key", "apiKey", tls=tls), namespace)
    wait_connection(cluster, namespace, "nas", "Ready", "SecretNotAllowed")
    time.sleep(5)
    hosts = "incus.truenas.io/allowed-hosts"
    cluster.kubectl("annotate", "secret", "nas-key", "-n", namespace, f"{hosts}=truenas.example.internal")
    cluster.kubectl("label", "secret", "nas-key", "-n", namespace, "incus.truenas.io/credentials=true")
    wait_connection(cluster, namespace, "nas", "Ready", "HostNotAllowed", timeout=SECRET_CONVERGES)
    time.sleep(5)
    cluster.kubectl(
        "annotate", "--overwrite", "secret", "nas-key", "-n", namespace, f"{hosts}={urlsplit(sim.ws_url).hostname}"
    )
    started = time.monotonic()
    wait_connection(cluster, namespace, "nas", "Ready", "Connected", timeout=SECRET_CONVERGES)
    print(f"connected {time.monotonic() - started:.1f} s after the Secret was fixed")


# ----- the insecure flag -----------------------------------------------------------------------------------
def test_the_connection_says_when_it_is_not_secure(harness: Harness, cluster: Cluster, namespace: str) -> None:
    sim = harness.sim
    cluster.apply(secret_manifest("nas-key", {"apiKey": sim.api_key}, labels=CREDENTIALS), namespace)
    skip = {"insecureSkipVerify": True}
    cluster.apply(connection("skip", sim.ws_url, "nas-key", "apiKey", tls=skip), namespace)
    harness.connect_namespace(namespace, sim, name="verified")
    wait_connection(cluster, namespace, "skip", "Ready", "Connected")
    secure = wait_connection(cluster, namespace, "skip", "Secure", "InsecureSkipVerify")
    assert secure["status"] == "False"
    assert wait_connection(cluster, namespace, "verified", "Secure", "Verified")["status"] == "True"
    row = cluster.kubectl("get", "truenasconnection", "skip", "-n", namespace, "--no-headers").stdout.split()
    assert row[4:6] == ["True", "False"], row  # Ready, Secure


def test_plain_transport_to_another_host_is_refused(harness: Harness, cluster: Cluster, namespace: str) -> None:
    cluster.apply(secret_manifest("nas-key", {"apiKey": harness.sim.api_key}, labels=CREDENTIALS), namespace)
    cluster.apply(connection("plain", "ws://truenas.example.internal", "nas-key", "apiKey"), namespace)
    ready = wait_connection(cluster, namespace, "plain", "Ready", "InsecureTransport")
    assert "allowInsecureTransport" in ready["message"]
    secure = connection_condition(cluster, namespace, "plain", "Secure")
    assert (secure["status"], secure["reason"]) == ("False", "PlainTransport")
