"""Issue 20, "Edges that hold": every exception leaving the Kubernetes client and the TrueNAS
transports is one of the operator's (or the client's) errors, driven against real fake servers that
hang, reset, and answer 500/429/non-JSON; the loop's last-resort handler; the create that a failed
progress write must not mask; backoff that cannot overflow."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from truenas_incus_operator.instances import executor
from truenas_incus_operator.instances.resource import LoopState
from truenas_incus_operator.kube import Kube
from truenas_incus_operator.problems import OperatorError

from .fakes import FakeBackend, FakeKube, fake_operator, resource

# ----- the Kubernetes edge ------------------------------------------------------------------------------
FAULTS = ("hang", "reset", "500", "429", "not-json", "json-list", "truncated", "ill-shaped")


def _fault_app(fault: str) -> web.Application:
    async def answer(request: web.Request) -> web.StreamResponse:
        if fault == "hang":
            await asyncio.sleep(30)
        if fault == "reset":
            assert request.transport is not None
            request.transport.abort()
            await asyncio.sleep(1)
        if fault in ("500", "429"):
            return web.json_response({"kind": "Status"}, status=int(fault), headers={"Retry-After": "1"})
        if fault == "not-json":
            return web.Response(text="<html>proxy error</html>", content_type="text/html")
        if fault == "json-list":
            return web.json_response([1, 2, 3])
        if fault == "truncated":
            response = web.StreamResponse(headers={"Content-Length": "1000", "Content-Type": "application/json"})
            await response.prepare(request)
            await response.write(b'{"items": [')
            assert request.transport is not None
            request.transport.abort()
            return response
        # ill-shaped: JSON objects, but not what the API returns
        return web.json_response({"metadata": ["x"], "items": {"a": 1}, "data": {"key": 7}})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    return app


@pytest.fixture
async def faulty(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Kube]:
    async with TestServer(_fault_app(request.param)) as server:
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "c", "cluster": {"server": str(server.make_url("")).rstrip("/")}}],
            "users": [{"name": "u", "user": {"token": "secret-token-value"}}],
            "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
            "current-context": "x",
        }
        path = tmp_path / "kubeconfig"
        path.write_text(json.dumps(config))
        monkeypatch.setenv("KUBECONFIG", str(path))
        kube = Kube()
        kube.timeout = 0.5  # the client's own bound, short for the test
        try:
            yield kube
        finally:
            await kube.close()


def _kube_calls(kube: Kube) -> dict[str, Callable[[], Awaitable[Any]]]:
    body = {"metadata": {"name": "n", "resourceVersion": "1"}}
    return {
        "patch_status": lambda: kube.patch_status("incusinstances", "ns", "n", {"phase": "Running"}),
        "patch_annotations": lambda: kube.patch_annotations("incusinstances", "ns", "n", {"a": "b"}),
        "list_configmaps": lambda: kube.list_configmaps("ns", "a=b"),
        "create_configmap": lambda: kube.create_configmap("ns", body),
        "read_configmap": lambda: kube.read_configmap("ns", "n"),
        "replace_configmap": lambda: kube.replace_configmap("ns", body),
        "delete_configmap": lambda: kube.delete_configmap("ns", "n", "1"),
        "read_lease": lambda: kube.read_lease("ns", "n"),
        "create_lease": lambda: kube.create_lease("ns", body),
        "replace_lease": lambda: kube.replace_lease("ns", body),
        "read_secret": lambda: kube.read_secret("ns", "n"),
    }


@pytest.mark.parametrize("faulty", FAULTS, indirect=True)
async def test_only_operator_errors_leave_the_kubernetes_client(faulty: Kube) -> None:
    """As kopf's tests prove of its API layer: whatever the server does, one error tree leaves."""
    leaked: dict[str, str] = {}

    async def attempt(name: str, call: Callable[[], Awaitable[Any]]) -> None:
        try:
            async with asyncio.timeout(10):  # the client's own timeout (0.5 s) must end a hang first
                await call()
        except OperatorError as exc:
            assert exc.problem.reason == "KubernetesError", (name, exc.problem)
            assert "secret-token-value" not in exc.problem.message
        except BaseException as exc:
            leaked[name] = f"{type(exc).__name__}: {exc}"

    # Each call is its own request: all at once, so that a hang costs one client timeout, not eleven.
    await asyncio.gather(*(attempt(name, call) for name, call in _kube_calls(faulty).items()))
    assert not leaked, leaked


def test_kubeconfig_client_keys_do_not_stay_on_disk_after_a_login(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each re-login (after a 401) wrote two new temp files, removed only at exit."""
    import base64
    import datetime
    import tempfile

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "client")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    pem_key = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    pem_cert = cert.public_bytes(serialization.Encoding.PEM)
    user = {
        "client-certificate-data": base64.b64encode(pem_cert).decode(),
        "client-key-data": base64.b64encode(pem_key).decode(),
    }
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "c", "cluster": {"server": "https://127.0.0.1:1"}}],
        "users": [{"name": "u", "user": user}],
        "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
        "current-context": "x",
    }
    path = tmp_path / "kubeconfig"
    path.write_text(json.dumps(config))
    monkeypatch.setenv("KUBECONFIG", str(path))
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    kube = Kube()
    for _ in range(3):  # three logins (a rotated token each time)
        kube._login()
    assert list(scratch.iterdir()) == []


# ----- the loop's last resort ---------------------------------------------------------------------------
class BrokenBackend(FakeBackend):
    """A backend whose answer parsing failed in a way nobody foresaw."""

    async def create(self, config: Any, on_progress: Any = None) -> Any:
        self._log(f"create {config.name}")
        raise KeyError("instance")


async def test_an_unforeseen_exception_is_reported_as_internal_error_with_backoff() -> None:
    fake = fake_operator(BrokenBackend())
    state = LoopState(status={})
    body = resource()
    delays = [await fake.operator.loops.reconcile_once(body, state, lambda: None) for _ in range(3)]
    assert delays[2] > delays[0], f"backoff: {delays}"
    synced = next(c for c in fake.kube.statuses("web01")[-1]["conditions"] if c["type"] == "Synced")
    assert synced["status"] == "False" and synced["reason"] == "InternalError"
    assert "KeyError" in synced["message"]
    assert [e[1] for e in fake.events if e[0] == "Warning"] == ["InternalError"], "one Event, not one per pass"


async def test_the_loop_keeps_running_after_an_unforeseen_exception() -> None:
    fake = fake_operator(BrokenBackend(), retry_min_seconds=0.01, retry_max_seconds=0.02)

    class Stopped:
        def __init__(self) -> None:
            self.flag = False

        def __bool__(self) -> bool:
            return self.flag

    stopped = Stopped()
    creates: list[str] = []
    fake.backend.on_call = creates.append
    loop = asyncio.create_task(fake.operator.loops.run(resource(), stopped))
    for _ in range(500):
        if creates.count("create web01") >= 3 or loop.done():
            break
        await asyncio.sleep(0.01)
    assert not loop.done(), loop.exception()
    assert creates.count("create web01") >= 3, "retried with backoff, not given up"
    stopped.flag = True
    await asyncio.wait_for(loop, 5)


# ----- item 3: a failed progress write never masks a create ----------------------------------------------
class FailingStatusKube(FakeKube):
    """Status writes with a job in them fail with something other than an OperatorError."""

    async def patch_status(self, plural: str, namespace: str, name: str, status: dict[str, Any]) -> None:
        if status.get("job"):
            raise RuntimeError("progress write failed")
        await super().patch_status(plural, namespace, name, status)


async def test_a_failed_progress_write_does_not_mask_a_successful_create(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(executor, "JOB_REPORT_SECONDS", 0.01)
    backend = FakeBackend(gate=asyncio.Event())
    fake = fake_operator(backend)
    kube = FailingStatusKube()
    kube.configmaps, kube.patches, kube.calls = fake.kube.configmaps, fake.kube.patches, fake.kube.calls
    fake.operator.loops.reporter.kube = kube
    creating = asyncio.create_task(fake.operator.loops.reconcile_once(resource(), LoopState(status={}), lambda: None))
    await asyncio.sleep(0.2)  # the progress task has tried (and failed) to show the job
    assert backend.gate is not None
    backend.gate.set()
    await creating
    from .test_instances import ledger_record

    assert ledger_record(fake)["state"] == "created"
    assert ("Normal", "Created") in [(e[0], e[1]) for e in fake.events]


# ----- item 4: backoff never overflows ---------------------------------------------------------------------
def test_the_loop_backoff_stays_bounded_after_thousands_of_failures() -> None:
    fake = fake_operator(retry_max_seconds=300.0)
    state = LoopState(status={}, failures=5000)
    delay = fake.operator.loops.reporter.backoff(state)
    assert 0 < delay <= 300 * 1.2


async def test_the_deletion_backoff_stays_bounded_after_thousands_of_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = fake_operator(retry_max_seconds=300.0)
    await fake.operator.loops.reconcile_once(resource(), LoopState(status={}), lambda: None)  # created, owned
    fake.connection.detach()
    from truenas_incus_operator.instances import deletion

    monkeypatch.setattr(deletion, "CONNECT_WAIT_SECONDS", 0.01)
    with pytest.raises(OperatorError) as raised:
        await fake.operator.deletion.delete(resource(deleting=True), retry=5000)
    assert raised.value.retry_after is not None and 0 < raised.value.retry_after <= 300


# ----- the TrueNAS edge: the transports ---------------------------------------------------------------
TRUENAS_FAULTS = ("hang", "reset", "500", "429", "not-json", "json-list", "bad-error", "bad-job-id")


def _rest_app(fault: str) -> web.Application:
    async def answer(request: web.Request) -> web.StreamResponse:
        if fault == "hang":
            await asyncio.sleep(30)
        if fault == "reset":
            assert request.transport is not None
            request.transport.abort()
            await asyncio.sleep(1)
        if fault in ("500", "429"):
            return web.Response(text="busy", status=int(fault))
        if fault == "not-json":
            return web.Response(text="<html>captive portal</html>", content_type="text/html")
        if fault == "json-list":
            return web.json_response([{"id": "x"}])
        if fault == "bad-error":
            return web.json_response({"message": "x", "errno": "not a number"}, status=422)
        return web.json_response("a string, not a job id")  # bad-job-id

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    return app


def _jsonrpc_app(fault: str) -> web.Application:
    async def socket(request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for message in ws:
            data = json.loads(message.data)
            ident, method = data["id"], data["method"]
            if method == "auth.login_with_api_key":
                await ws.send_json({"jsonrpc": "2.0", "id": ident, "result": True})
            elif method == "auth.mechanism_choices":  # asked before login: no SCRAM, a plain login
                await ws.send_json({"jsonrpc": "2.0", "id": ident, "result": ["API_KEY_PLAIN"]})
            elif method == "core.set_options":
                await ws.send_json({"jsonrpc": "2.0", "id": ident, "result": {"legacy_jobs": True}})
            elif method == "system.version":
                await ws.send_json({"jsonrpc": "2.0", "id": ident, "result": "TrueNAS-25.10.1"})
            elif method == "core.subscribe":
                await ws.send_json({"jsonrpc": "2.0", "id": ident, "result": None})
            elif fault == "hang":
                continue
            elif fault == "reset":
                assert request.transport is not None
                request.transport.abort()
                break
            elif fault in ("500", "429", "bad-error"):
                await ws.send_json({"jsonrpc": "2.0", "id": ident, "error": {"code": "x", "data": {"error": "EBUSY"}}})
            elif fault == "not-json":
                await ws.send_str("<html>")
                await ws.send_json({"jsonrpc": "2.0", "id": ident, "error": "not an object"})
            elif fault == "json-list":
                await ws.send_str("[1, 2]")
                await ws.send_json({"jsonrpc": "2.0", "id": ident, "result": [[1], "x"]})
            else:  # bad-job-id
                await ws.send_json({"jsonrpc": "2.0", "id": ident, "result": {"not": "a job id"}})
        return ws

    app = web.Application()
    app.router.add_get("/api/current", socket)
    return app


async def _transport_calls(transport: Any) -> dict[str, str]:
    """Every call a backend makes, each against the faulty server: what left, when not a TrueNASError."""
    from truenas_incus_operator.truenas import TrueNASError

    calls: dict[str, Callable[[], Awaitable[Any]]] = {
        "call": lambda: transport.call("virt.instance.query", [], {}, idempotent=True),
        "call-write": lambda: transport.call("virt.instance.update", "web01", {"cpu": "2"}),
        "call_job": lambda: transport.call_job("virt.instance.create", {"name": "web01"}),
        "wait_job": lambda: transport.wait_job(7, timeout=1.0),
    }
    leaked: dict[str, str] = {}
    for name, call in calls.items():
        try:
            async with asyncio.timeout(15):
                await call()
        except TrueNASError as exc:
            assert "1-secret-key-value" not in str(exc) and "secret-key-value" not in exc.message
        except BaseException as exc:
            leaked[name] = f"{type(exc).__name__}: {exc}"
    return leaked


@pytest.mark.parametrize("fault", TRUENAS_FAULTS)
async def test_only_truenas_errors_leave_the_rest_transport(fault: str) -> None:
    from truenas_incus_operator.truenas import Secret
    from truenas_incus_operator.truenas.transports.base import ConnectionOptions
    from truenas_incus_operator.truenas.transports.rest import RestTransport

    async with TestServer(_rest_app(fault)) as server:
        options = ConnectionOptions(
            url=str(server.make_url("")).rstrip("/"), api_key=Secret("1-secret-key-value"),
            call_timeout=0.5, read_timeout=0.5, job_timeout=1.0, connect_timeout=0.5,
        )  # fmt: skip
        transport = RestTransport(options)
        import httpx

        transport._client = httpx.AsyncClient(base_url=transport.base, timeout=httpx.Timeout(0.5))
        try:
            assert await _transport_calls(transport) == {}
        finally:
            await transport.close()


@pytest.mark.parametrize("fault", TRUENAS_FAULTS)
async def test_only_truenas_errors_leave_the_jsonrpc_transport(fault: str) -> None:
    from truenas_incus_operator.truenas import Secret
    from truenas_incus_operator.truenas.transports.base import ConnectionOptions
    from truenas_incus_operator.truenas.transports.jsonrpc import JsonRpcTransport

    async with TestServer(_jsonrpc_app(fault)) as server:
        url = str(server.make_url("")).rstrip("/").replace("http://", "ws://")
        options = ConnectionOptions(
            url=url, api_key=Secret("1-secret-key-value"),
            call_timeout=0.5, read_timeout=0.5, job_timeout=1.0, connect_timeout=2.0,
        )  # fmt: skip
        transport = JsonRpcTransport(options)
        try:
            await transport.connect()
            assert await _transport_calls(transport) == {}
        finally:
            await transport.close()


async def test_a_200_that_is_not_json_is_a_malformed_answer_over_rest() -> None:
    from truenas_incus_operator.truenas import MalformedAnswer, Secret
    from truenas_incus_operator.truenas.transports.base import ConnectionOptions
    from truenas_incus_operator.truenas.transports.rest import RestTransport

    async with TestServer(_rest_app("not-json")) as server:
        transport = RestTransport(
            ConnectionOptions(url=str(server.make_url("")).rstrip("/"), api_key=Secret("1-secret-key-value"))
        )
        with pytest.raises(MalformedAnswer, match="not JSON"):
            await transport.connect()
        await transport.close()


# ----- item 5: startup preconditions ---------------------------------------------------------------------
class ClusterKube(FakeKube):
    """A cluster as discovery, a dry-run create and SelfSubjectAccessReviews see it."""

    def __init__(self, namespaces: set[str], served: set[str] | None, denied: set[tuple[str, str]]) -> None:
        super().__init__()
        self.namespaces, self.served, self.denied = namespaces, served, denied

    async def namespace_exists(self, namespace: str) -> bool | None:
        return namespace in self.namespaces

    async def create_namespace(self, namespace: str) -> None:
        self.namespaces.add(namespace)

    async def served_resources(self, group_version: str) -> set[str] | None:
        return self.served

    async def may(
        self, verb: str, group: str, resource: str, namespace: str = "", name: str = "", subresource: str = ""
    ) -> bool:
        return (verb, f"{resource}/{subresource}" if subresource else resource) not in self.denied


ALL_SERVED = {
    kind + sub
    for kind in ("incusinstances", "truenasconnections", "incusinstancesnapshots", "incusinstancerestores")
    for sub in ("", "/status")
}


async def test_a_missing_ledger_namespace_is_created_when_the_operator_may(caplog: pytest.LogCaptureFixture) -> None:
    from truenas_incus_operator.app import check_preconditions
    from truenas_incus_operator.settings import Settings

    kube = ClusterKube(set(), ALL_SERVED, set())
    settings = Settings(ledger_namespace="tio-ledger")
    with caplog.at_level("WARNING"):
        assert await check_preconditions(settings, kube, None) == []
    assert "tio-ledger" in kube.namespaces
    assert "created namespace tio-ledger" in caplog.text


async def test_each_missing_precondition_is_named_with_its_fix() -> None:
    from truenas_incus_operator.app import check_preconditions
    from truenas_incus_operator.settings import Settings

    kube = ClusterKube(
        set(), {"incusinstances", "truenasconnections"}, {("create", "namespaces"), ("patch", "incusinstances/status")}
    )
    settings = Settings(ledger_namespace="tio-ledger", leader_election=True)
    problems = await check_preconditions(settings, kube, ["apps"])
    assert len(problems) == 3, problems
    assert "namespace tio-ledger does not exist" in problems[0] and "kubectl create namespace tio-ledger" in problems[0]
    assert "lacks incusinstances/status, truenasconnections/status, incusinstancesnapshots," in problems[1]
    assert problems[2] == (
        "the operator's identity may not: patch incusinstances/status.incus.truenas.io in namespace apps "
        "(the chart's RBAC grants these)"
    )
    kube.served = None
    problems = await check_preconditions(settings, kube, ["apps"])
    assert "serves no incus.truenas.io/v1alpha1: the CRDs are not installed" in problems[1]


async def test_an_api_server_older_than_the_supported_range_is_refused_at_startup() -> None:
    from truenas_incus_operator.app import check_preconditions
    from truenas_incus_operator.settings import Settings

    kube = ClusterKube({"tio-ledger"}, ALL_SERVED, set())
    settings = Settings(ledger_namespace="tio-ledger")
    for version in ((1, 31), (1, 37), None):
        kube.version = version
        assert await check_preconditions(settings, kube, None) == [], version
    kube.version = (1, 30)
    (problem,) = await check_preconditions(settings, kube, None)
    assert "the API server is Kubernetes 1.30; the oldest this operator supports is 1.31" in problem


def test_the_needs_cover_the_lease_only_with_election_and_discovery_only_when_kopf_scans() -> None:
    from truenas_incus_operator.app import needs
    from truenas_incus_operator.settings import Settings

    named = {str(n) for n in needs(Settings(ledger_namespace="l"), ["a", "b"])}
    assert "get secrets in namespace a" in named and "get secrets in namespace b" in named
    assert not any("lease" in n or "customresourcedefinitions" in n for n in named)
    wide = {str(n) for n in needs(Settings(ledger_namespace="l", leader_election=True, lease_name="x"), None)}
    assert "get secrets in every namespace (cluster-wide)" in wide
    assert "update leases.coordination.k8s.io 'x' in namespace l" in wide
    # kopf scans (CRDs, namespaces) only for namespace patterns: -A needs no cluster-wide CRD rights,
    # which the chart does not grant (a CRD being deleted would stop being served, its delete hang).
    assert not any(
        "customresourcedefinitions" in n or n.startswith(("list namespaces", "watch namespaces")) for n in wide
    )
    scanning = {str(n) for n in needs(Settings(ledger_namespace="l"), None, scanning=True)}
    assert "list customresourcedefinitions.apiextensions.k8s.io in every namespace (cluster-wide)" in scanning
    assert "watch namespaces in every namespace (cluster-wide)" in scanning


# ----- item 6: the connection's status says the API version and the transport apart -----------------------
@pytest.mark.parametrize(("transport", "expected"), [("websocket", "v25.10.1"), ("rest", "v2.0")])
async def test_the_connection_status_has_the_api_version_and_the_transport_apart(transport: str, expected: str) -> None:
    from truenas_incus_operator.connections import Connection, ConnectionConfig, ConnectionManager
    from truenas_incus_operator.connections.resources import ConnectionResources, _Reported
    from truenas_incus_operator.settings import Settings
    from truenas_incus_operator.truenas import Secret
    from truenas_simulator import Simulator, SimulatorServer

    sim = Simulator("25.10", seed=7)
    server = await SimulatorServer(sim).start()
    kube = FakeKube()
    try:
        url = server.ws_url if transport == "websocket" else server.url
        config = ConnectionConfig(url=url, api_key=Secret(sim.api_key), transport=transport)
        connection = Connection("ns/nas", config, resync_seconds=30.0)
        await connection._connect()
        resources = ConnectionResources(Settings(), kube, ConnectionManager(30.0, 60.0))
        resources._reported["ns/nas"] = _Reported("ns", "nas", 1, {}, None)
        await resources._write("ns/nas", None, connection)
        status = kube.patches[-1].body
        assert status["apiVersion"] == expected and status["transport"] == transport
        await connection.close()
    finally:
        await server.stop()


async def test_ready_is_progressing_for_the_new_generation_before_an_update_job() -> None:
    """Else `kubectl wait --for=condition=Ready` returns at once after a spec change."""
    fake = fake_operator()
    state = LoopState(status={})
    await fake.operator.loops.reconcile_once(resource(cpu="1"), state, lambda: None)
    ready = next(c for c in fake.kube.statuses("web01")[-1]["conditions"] if c["type"] == "Ready")
    assert (ready["status"], ready["observedGeneration"]) == ("True", 1)
    seen: list[tuple[str, str, int]] = []

    def on_call(call: str) -> None:
        if call == "update web01":
            last = next(c for c in fake.kube.statuses("web01")[-1]["conditions"] if c["type"] == "Ready")
            seen.append((last["status"], last["reason"], last["observedGeneration"]))

    fake.backend.on_call = on_call
    await fake.operator.loops.reconcile_once(resource(cpu="2", generation=2), state, lambda: None)
    assert seen == [("False", "Progressing", 2)], "what the API server holds while the update job runs"
    ready = next(c for c in fake.kube.statuses("web01")[-1]["conditions"] if c["type"] == "Ready")
    assert (ready["status"], ready["observedGeneration"]) == ("True", 2)


async def test_a_deletion_that_only_waited_says_so_not_still_there_after_deleting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:

    from .fakes import observed

    fake = fake_operator()
    await fake.operator.loops.reconcile_once(resource(), LoopState(status={}), lambda: None)
    calls: list[str] = []
    fake.backend.on_call = calls.append
    fake.backend.instances["web01"] = observed("web01", status="STOPPING")
    real_sleep = asyncio.sleep
    monkeypatch.setattr(asyncio, "sleep", lambda _: real_sleep(0))
    with pytest.raises(OperatorError) as raised:
        await fake.operator.deletion.delete(resource(deleting=True), retry=0)
    assert not [c for c in calls if c.startswith(("delete", "stop"))], calls
    message = raised.value.problem.message
    assert "after deleting" not in message and "STOPPING" in message, message


def test_one_outage_counts_one_reconnect() -> None:
    """The transport reconnected (JSON-RPC), and a read that failed during the same gap made the
    connection lost and up again: one outage, one count (it counted two)."""
    from truenas_incus_operator.metrics import Metrics

    from .fakes import ScriptedTransport

    now = [1000.0]
    metrics = Metrics()
    metrics.clock = lambda: now[0]

    class Client:
        system_version = "TrueNAS-25.10.1"
        api_family = "virt.instance"
        transport = ScriptedTransport()

    def count() -> float | None:
        return metrics.registry.get_sample_value("tio_truenas_reconnects_total", {"connection": "ns/nas"})

    observer = metrics.truenas("ns/nas", 20)
    metrics.connection_state("ns/nas", Client())
    observer.reconnected()  # the transport's own reconnect
    now[0] += 2
    metrics.connection_state("ns/nas", None)  # a read failed in the gap
    now[0] += 1
    metrics.connection_state("ns/nas", Client())
    assert count() == 1
    now[0] += 3600  # a later outage, seen only by the connection
    metrics.connection_state("ns/nas", None)
    metrics.connection_state("ns/nas", Client())
    assert count() == 2
