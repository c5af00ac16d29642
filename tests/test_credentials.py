"""Credentials cannot be turned against their owner (issue 11, findings 6 and 7), without a cluster.

The loader uses only Secrets that opt in, sends a bound key only to the hosts its Secret names,
refuses plain transport off loopback unless allowed, and refuses a malformed key without showing
it; the transports scrub the key from every error, whatever the library said; the connection's
status flags what is not secure.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import httpx
import pytest

from tests.fakes import NOW, FakeKube, fake_operator
from truenas_incus_operator.connections import Connection
from truenas_incus_operator.connections.config import (
    ALLOWED_HOSTS_ANNOTATION,
    CREDENTIALS_LABEL,
    ConnectionConfig,
    resource_loader,
    settings_loader,
)
from truenas_incus_operator.models import TrueNASConnectionSpec
from truenas_incus_operator.policy import Policy
from truenas_incus_operator.problems import OperatorError, problem_of
from truenas_incus_operator.settings import Settings
from truenas_incus_operator.status import as_patch, render_connection, secure_condition
from truenas_incus_operator.truenas import (
    CallFailed,
    FieldError,
    MalformedAnswer,
    Secret,
    TransportError,
    TrueNASError,
    ValidationFailed,
)
from truenas_incus_operator.truenas.backends.routing import RoutingBackend
from truenas_incus_operator.truenas.images import ImageSource
from truenas_incus_operator.truenas.transports.base import scrubbing
from truenas_simulator import Simulator, SimulatorServer

from .fakes import connect_to

NS = "apps"
KEY = "7-" + "Qx3v" * 16
OPT_IN = {CREDENTIALS_LABEL: "true"}


def spec(url: str = "wss://nas.example.internal", **extra: Any) -> TrueNASConnectionSpec:
    return TrueNASConnectionSpec.model_validate(
        {"url": url, "apiKeySecretRef": {"name": "nas-key", "key": "apiKey"}, **extra}
    )


def kube_with(value: str = KEY, name: str = "nas-key", **metadata: Any) -> FakeKube:
    kube = FakeKube()
    kube.add_secret(NS, name, {"apiKey": value}, **metadata)
    return kube


def pieces(key: str) -> list[str]:
    """What of a key must never show: the key, its secret part, and every piece around a break."""
    return [key, key.split("-", 1)[1], *(p for p in key.replace("\r", "\n").split("\n") if len(p) >= 6)]


def leaked(text: str, key: str) -> list[str]:
    return [piece for piece in pieces(key) if piece in text]


async def refusal(loader: Any) -> OperatorError:
    with pytest.raises(OperatorError) as caught:
        await loader()
    return caught.value


# ----- opting in -----------------------------------------------------------------------------------------
async def test_a_secret_without_the_label_is_refused_and_named_never_shown() -> None:
    kube = kube_with(name="payroll-db")
    connection = TrueNASConnectionSpec.model_validate(
        {"url": "wss://attacker.example", "apiKeySecretRef": {"name": "payroll-db", "key": "apiKey"}}
    )
    error = await refusal(resource_loader(kube, NS, connection))
    assert error.problem.reason == "SecretNotAllowed"
    assert f"{NS}/payroll-db" in error.problem.message
    assert f"{CREDENTIALS_LABEL}=true" in error.problem.message
    assert not leaked(error.problem.message, KEY) and not leaked(repr(error), KEY)


async def test_a_label_with_another_value_does_not_opt_in() -> None:
    kube = kube_with(labels={CREDENTIALS_LABEL: "false"})
    assert (await refusal(resource_loader(kube, NS, spec()))).problem.reason == "SecretNotAllowed"


async def test_a_labelled_secret_is_used() -> None:
    config = await resource_loader(kube_with(labels=OPT_IN), NS, spec())()
    assert config.api_key.reveal() == KEY and config.url == "wss://nas.example.internal"


async def test_the_ca_secret_must_opt_in_too() -> None:
    kube = kube_with(labels=OPT_IN)
    kube.add_secret(NS, "nas-ca", {"ca.crt": "-----BEGIN CERTIFICATE-----"})
    tls: dict[str, Any] = {"tls": {"caSecretRef": {"name": "nas-ca", "key": "ca.crt"}}}
    error = await refusal(resource_loader(kube, NS, spec(**tls)))
    assert error.problem.reason == "SecretNotAllowed" and f"{NS}/nas-ca" in error.problem.message
    kube.secret_labels[(NS, "nas-ca")] = dict(OPT_IN)
    assert (await resource_loader(kube, NS, spec(**tls))()).ca_pem == "-----BEGIN CERTIFICATE-----"


# ----- binding a key to hosts ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("allowed", "url", "ok"),
    [
        ("nas.example.internal", "wss://nas.example.internal", True),
        ("nas.example.internal", "wss://NAS.example.internal:8443/api", True),
        ("other.lan, nas.example.internal", "https://nas.example.internal", True),
        ("nas.example.internal:443", "wss://nas.example.internal", True),
        ("nas.example.internal:8443", "wss://nas.example.internal", False),
        ("nas.example.internal", "wss://attacker.example", False),
        ("nas.example.internal", "wss://nas.example.internal.attacker.example", False),
        ("", "wss://nas.example.internal", False),
    ],
)
async def test_a_bound_key_goes_only_to_the_hosts_its_secret_names(allowed: str, url: str, ok: bool) -> None:
    kube = kube_with(labels=OPT_IN, annotations={ALLOWED_HOSTS_ANNOTATION: allowed})
    load = resource_loader(kube, NS, spec(url))
    if ok:
        assert (await load()).api_key.reveal() == KEY
        return
    error = await refusal(load)
    assert error.problem.reason == "HostNotAllowed"
    assert ALLOWED_HOSTS_ANNOTATION in error.problem.message and f"{NS}/nas-key" in error.problem.message
    assert not leaked(error.problem.message, KEY)


# ----- plain transport ------------------------------------------------------------------------------------
@pytest.mark.parametrize("url", ["ws://nas.example.internal", "http://10.0.0.5:80", "ws://192.168.1.2/api/current"])
async def test_plain_transport_off_loopback_is_refused_before_any_secret_is_read(url: str) -> None:
    kube = kube_with(labels=OPT_IN)
    error = await refusal(resource_loader(kube, NS, spec(url)))
    assert error.problem.reason == "InsecureTransport"
    assert "allowInsecureTransport" in error.problem.message
    assert not [call for call in kube.calls if call.startswith("read_secret")]


async def test_plain_transport_is_allowed_when_the_connection_says_so() -> None:
    config = await resource_loader(
        kube_with(labels=OPT_IN), NS, spec("ws://nas.example.internal", allowInsecureTransport=True)
    )()
    assert config.url == "ws://nas.example.internal"


@pytest.mark.parametrize("url", ["ws://127.0.0.1:6000", "http://localhost:8080", "ws://[::1]:6000", "ws://127.8.9.1"])
async def test_plain_transport_to_loopback_is_accepted(url: str) -> None:
    assert (await resource_loader(kube_with(labels=OPT_IN), NS, spec(url))()).url == url


async def test_the_default_connection_refuses_plain_transport_unless_its_settings_allow_it() -> None:
    refused = Settings(truenas_url="ws://nas.example.internal", truenas_api_key=KEY)
    error = await refusal(settings_loader(refused))
    assert error.problem.reason == "InsecureTransport"
    assert "TIO_TRUENAS_ALLOW_INSECURE_TRANSPORT" in error.problem.message
    allowed = Settings(
        truenas_url="ws://nas.example.internal", truenas_api_key=KEY, truenas_allow_insecure_transport=True
    )
    assert (await settings_loader(allowed)()).url == "ws://nas.example.internal"
    loopback = Settings(truenas_url="ws://127.0.0.1:6000", truenas_api_key=KEY)
    assert (await settings_loader(loopback)()).url == "ws://127.0.0.1:6000"


# ----- the key's characters ----------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [KEY[:20] + "\n" + KEY[20:], KEY[:20] + " " + KEY[20:], KEY + "\x00x", KEY + "é"])
async def test_a_key_with_a_break_or_control_character_is_refused_without_showing_it(bad: str) -> None:
    error = await refusal(resource_loader(kube_with(bad, labels=OPT_IN), NS, spec()))
    assert error.problem.reason == "InvalidAPIKey"
    assert f"Secret {NS}/nas-key key 'apiKey'" in error.problem.message
    assert "<id>-<64 letters and digits>" in error.problem.message
    assert not leaked(error.problem.message, bad) and not leaked(repr(error), bad)


async def test_the_default_connections_key_is_checked_too(tmp_path: Any) -> None:
    key_file = tmp_path / "api-key"
    key_file.write_text(KEY[:20] + "\r\n" + KEY[20:] + "\n")
    settings = Settings(truenas_url="wss://nas.example.internal", truenas_api_key_file=key_file)
    error = await refusal(settings_loader(settings))
    assert error.problem.reason == "InvalidAPIKey" and str(key_file) in error.problem.message
    assert not leaked(error.problem.message, key_file.read_text().strip())


# ----- scrubbing, whatever the transport ---------------------------------------------------------------
@pytest.mark.parametrize("transport", ["rest", "websocket"])
async def test_a_bad_key_never_reaches_an_error_text(transport: str, caplog: pytest.LogCaptureFixture) -> None:
    """Finding 7: over REST httpx refused the header and its error carried ``Bearer <key>``."""
    caplog.set_level(logging.DEBUG)
    sim = Simulator("25.10", seed=3)
    server = await SimulatorServer(sim).start()
    bad = sim.api_key[:12] + "\n" + sim.api_key[12:]
    try:
        with pytest.raises(Exception) as caught:
            client = await connect_to(server.url if transport == "rest" else server.ws_url, bad, transport=transport)
            await client.close()
    finally:
        await server.stop()
    error = caught.value
    assert isinstance(error, TrueNASError) and problem_of(error).reason in ("AuthenticationFailed", "Unreachable")
    texts = [str(error), repr(error), problem_of(error).message, *(r.getMessage() for r in caplog.records)]
    link = error.__cause__ or error.__context__
    while link is not None:
        texts += [str(link), repr(link)]
        link = link.__cause__ or link.__context__
    assert not [t for t in texts if leaked(t, bad)], texts


async def test_scrubbing_cleans_any_exception_that_leaves_a_transport() -> None:
    secret = Secret(KEY[:9] + "\n" + KEY[9:])
    bad = secret.reveal()
    with pytest.raises(TransportError) as foreign, scrubbing(secret):
        raise httpx.LocalProtocolError(f"Illegal header value {('Bearer ' + bad).encode()!r}")
    assert "Illegal header value" in str(foreign.value) and not leaked(str(foreign.value), bad)
    with pytest.raises(CallFailed) as own, scrubbing(secret):
        raise CallFailed(f"login failed for {bad!r}")
    assert not leaked(str(own.value), bad) and not leaked(own.value.message, bad)
    with pytest.raises(ValidationFailed) as fields, scrubbing(secret):
        raise ValidationFailed([FieldError("auth.key", f"bad key {bad}")])
    assert not leaked(str(fields.value), bad) and not leaked(str(fields.value.errors), bad)
    with pytest.raises(TransportError) as chained, scrubbing(secret):
        try:
            raise ValueError(bad)
        except ValueError:
            raise TransportError("lost") from ValueError(bad)
    assert chained.value.__cause__ is None and chained.value.__suppress_context__
    with pytest.raises(MalformedAnswer, match="KeyError: 'unrelated'"), scrubbing(secret):
        raise KeyError("unrelated")  # an error without the key: the client's own error too (issue 20)


# ----- the insecure flag in status -----------------------------------------------------------------------
def test_secure_condition() -> None:
    assert secure_condition("wss://nas", False)[:2] == ("True", "Verified")
    assert secure_condition("https://nas", True)[:2] == ("False", "InsecureSkipVerify")
    assert secure_condition("ws://127.0.0.1:6000", False)[:2] == ("False", "PlainTransport")
    assert secure_condition("http://nas", True)[:2] == ("False", "PlainTransport")


def test_render_connection_shows_the_secure_condition() -> None:
    status = as_patch(render_connection(None, None, generation=3, now=NOW, secure=secure_condition("wss://nas", True)))
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["Ready"]["status"] == "True"
    assert conditions["Secure"]["status"] == "False" and conditions["Secure"]["reason"] == "InsecureSkipVerify"
    assert conditions["Secure"]["observedGeneration"] == 3


async def test_a_connection_reports_why_it_will_not_use_a_secret_and_what_is_insecure() -> None:
    fake = fake_operator()
    fake.kube.add_secret(NS, "payroll-db", {"apiKey": KEY})
    body = {
        "metadata": {"namespace": NS, "name": "evil", "generation": 1},
        "spec": {
            "url": "wss://attacker.example",
            "apiKeySecretRef": {"name": "payroll-db", "key": "apiKey"},
            "tls": {"insecureSkipVerify": True},
        },
    }
    await fake.operator.connection_resources.sync(body)
    (status,) = fake.kube.statuses("evil")
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["Ready"]["reason"] == "SecretNotAllowed"
    assert conditions["Secure"]["reason"] == "InsecureSkipVerify"
    assert not leaked(str(status), KEY)
    with pytest.raises(OperatorError) as caught:
        fake.operator.connections.get(f"{NS}/evil")
    assert caught.value.problem.reason == "SecretNotAllowed"


# ----- where VM images come from -------------------------------------------------------------------------
async def test_the_vm_image_server_comes_from_the_connection_else_from_the_operators_settings() -> None:
    kube = kube_with(labels=OPT_IN)
    settings = Settings.model_construct(vm_image_server="https://mirror.example")
    allowing = Policy.model_validate({"defaultRule": {"vmImageServers": ["file:///srv/mirror"]}})
    own = await resource_loader(kube, NS, spec(vmImageServer="/srv/mirror"), settings, allowing, "nas")()
    assert own.vm_image_server is not None
    assert (own.vm_image_server.url, own.vm_image_server.trusted) == ("/srv/mirror", True)
    fallback = await resource_loader(kube, NS, spec(), settings)()
    assert fallback.vm_image_server is not None and fallback.vm_image_server.url == "https://mirror.example/"
    unset = (await resource_loader(kube, NS, spec())()).vm_image_server
    assert unset is not None and unset.url == "https://images.linuxcontainers.org/"
    default = Settings(truenas_url="wss://nas.example.internal", truenas_api_key=KEY, vm_image_server="file:///m")
    made = (await settings_loader(default)()).vm_image_server
    assert made is not None and (made.url, made.trusted) == ("file:///m", True)


async def test_a_tenant_names_no_image_server_the_policy_does_not_allow() -> None:
    """Finding 2 and 3 of issue 19: by default only the operator's own server; a local path never."""
    kube = kube_with(labels=OPT_IN)
    settings = Settings.model_construct(vm_image_server="https://mirror.example")
    for named in ("/srv/mirror", "file:///var/run/secrets", "https://bob.example/", "http://10.0.0.1/"):
        error = await refusal(resource_loader(kube, NS, spec(vmImageServer=named), settings, Policy(), "nas"))
        assert error.problem.reason == "PolicyDenied"
        assert "spec.vmImageServer" in error.problem.message and "vmImageServers" in error.problem.message
    anywhere = Policy.model_validate({"defaultRule": {"vmImageServers": ["*"]}})
    public = await resource_loader(kube, NS, spec(vmImageServer="https://bob.example"), settings, anywhere, "nas")()
    assert public.vm_image_server is not None and not public.vm_image_server.trusted


async def test_a_connection_hands_its_vm_image_server_to_the_vm_backend() -> None:
    sim = Simulator("25.10", seed=3)
    server = await SimulatorServer(sim).start()
    try:
        config = ConnectionConfig(
            url=server.ws_url, api_key=Secret(sim.api_key), vm_image_server=ImageSource("/srv/mirror")
        )
        connection = Connection("ns/nas", config, resync_seconds=30.0)
        await connection._connect()
        assert connection.client is not None
        backend = connection.client.instances
        assert isinstance(backend, RoutingBackend) and backend.vms.images.url == "/srv/mirror/"
        await connection.client.close()
    finally:
        await server.stop()


# ----- a Secret that comes or is fixed later (issue 21 item 2) -------------------------------------------
def ready_reason(fake: Any, name: str) -> str | None:
    reasons = [
        c["reason"] for status in fake.kube.statuses(name) for c in status.get("conditions", []) if c["type"] == "Ready"
    ]
    return reasons[-1] if reasons else None


async def wait_for(check: Any, timeout: float) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.05)


def connection_body(name: str = "nas") -> dict[str, Any]:
    return {
        "metadata": {"namespace": NS, "name": name, "generation": 1},
        "spec": {"url": "wss://nas.example.internal", "apiKeySecretRef": {"name": "nas-key", "key": "apiKey"}},
    }


async def test_a_connection_reads_its_secret_again_until_it_can_be_used_without_an_event() -> None:
    fake = fake_operator()
    resources = fake.operator.connection_resources
    await resources.sync(connection_body())
    assert ready_reason(fake, "nas") == "SecretNotFound"
    # No event comes (nothing changed on the resource): the Secret appears, not yet opted in.
    fake.kube.add_secret(NS, "nas-key", {"apiKey": KEY})
    await wait_for(lambda: ready_reason(fake, "nas") == "SecretNotAllowed", timeout=5)
    # Its owner binds it to another host: refused for that reason now.
    fake.kube.secret_labels[(NS, "nas-key")] = dict(OPT_IN)
    fake.kube.secret_annotations[(NS, "nas-key")] = {ALLOWED_HOSTS_ANNOTATION: "elsewhere.example"}
    await wait_for(lambda: ready_reason(fake, "nas") == "HostNotAllowed", timeout=12)
    await resources.close()


async def test_reloads_back_off_and_stop_when_the_connection_goes(monkeypatch: pytest.MonkeyPatch) -> None:
    from truenas_incus_operator.connections import resources as module

    monkeypatch.setattr(module, "RELOAD_MIN_SECONDS", 0.5)  # half the real backoff, the same sequence
    monkeypatch.setattr(module, "RELOAD_MAX_SECONDS", 5.0)
    fake = fake_operator()
    resources = fake.operator.connection_resources
    await resources.sync(connection_body())

    def reads() -> int:
        return fake.kube.calls.count(f"read_secret {NS}/nas-key")

    await asyncio.sleep(1.75)  # retries after 0.5 s and 1 s more: 3 reads in all, not one per event or per tick
    assert reads() == 2 + 1, fake.kube.calls
    await resources.remove(f"{NS}/nas")
    before = reads()
    await asyncio.sleep(2.25)
    assert reads() == before, "a removed connection is not read again"


# ----- the key's owner (SCRAM on TrueNAS 26 names it) ------------------------------------------------------
async def test_the_keys_user_comes_from_the_connection_or_the_settings_and_defaults_to_root() -> None:
    kube = kube_with(labels=OPT_IN)
    assert (await resource_loader(kube, NS, spec())()).username == "root"
    assert (await resource_loader(kube, NS, spec(username="truenas_admin"))()).username == "truenas_admin"
    settings = Settings(truenas_url="wss://nas.example.internal", truenas_api_key=KEY)
    assert (await settings_loader(settings)()).username == "root"
    named = Settings(truenas_url="wss://nas.example.internal", truenas_api_key=KEY, truenas_username="ops@ad.example")
    assert (await settings_loader(named)()).username == "ops@ad.example"


@pytest.mark.parametrize("username", ["", "a,b", "a=b", "root:1", "with space", "x" * 257])
def test_a_username_scram_cannot_carry_is_refused_by_the_schema(username: str) -> None:
    """SCRAM's ``n=<user>:<key id>`` cannot carry ',', '=' or ':' (truenas_scram and the official
    client refuse them); the CRD's pattern keeps them out before the operator sees them."""
    with pytest.raises(ValueError, match="username"):
        spec(username=username)
    with pytest.raises(ValueError, match="truenas_username"):
        Settings(truenas_username=username)
