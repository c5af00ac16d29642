"""The operator's client logs in to TrueNAS 26 with SCRAM-SHA-512 (docs/scram.md "Decision"),
against the simulator's server side (tests/test_simulator_scram.py checks that against TrueNAS's
own client): over TLS bound to the certificate, over plain ws unbound, never in clear."""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from truenas_incus_operator.truenas import AuthenticationFailed
from truenas_incus_operator.truenas.transports import scram
from truenas_simulator import ApiKey, Simulator, SimulatorServer
from truenas_simulator.tls import CertificateAuthority, server_context, truenas_default_certificate

from .fakes import connect_to

PLAIN_LOGINS = ("LEGACY_API_KEY", "API_KEY_PLAIN")


@asynccontextmanager
async def serve(
    profile: str, tmp_path: Path, tls: bool, published: bytes | None = None, **knobs: Any
) -> AsyncIterator[tuple[Simulator, SimulatorServer, dict[str, Any]]]:
    """A simulator over TLS (its certificate published for binding unless ``published`` names
    another, as a man in the middle's would differ) or plain ws; yields the client's TLS kwargs."""
    sim = Simulator(profile, seed=5)
    sim.knobs.auth_fail_delay = 0
    sim.knobs.scram_iterations = 50_000
    for name, value in knobs.items():
        setattr(sim.knobs, name, value)
    context = server_context(CertificateAuthority.create("t"), tmp_path, ["127.0.0.1"]) if tls else None
    certificate = published or ((tmp_path / "server.crt").read_bytes() if tls else None)
    server = await SimulatorServer(sim, ssl_context=context, certificate=certificate).start()
    tls_kwargs = {"ca_pem": (tmp_path / "ca.crt").read_text()} if tls else {}
    try:
        yield sim, server, tls_kwargs
    finally:
        await server.stop()


def never_in_clear(sim: Simulator) -> None:
    assert not any(sim.auth.mechanisms_tried[m] for m in PLAIN_LOGINS), sim.auth.mechanisms_tried


async def test_scram_over_tls_is_bound_to_the_certificate(tmp_path: Path) -> None:
    async with serve("26.0", tmp_path, tls=True) as (sim, server, tls):
        client = await connect_to(server.ws_url, sim.api_key, **tls)
        try:
            assert client.login_mechanism == "SCRAM-SHA-512+tls-server-end-point"
            assert await client.instances.list_instances() == []
        finally:
            await client.close()
    assert sim.auth.mechanisms_tried == {"SCRAM": 2}


async def test_scram_over_tls_binds_even_without_verification(tmp_path: Path) -> None:
    """insecureSkipVerify: the peer certificate is still read, so the binding still proves that the
    server the key's proof went to is the one holding the certificate TrueNAS published."""
    async with serve("26.0", tmp_path, tls=True) as (sim, server, _):
        client = await connect_to(server.ws_url, sim.api_key, insecure_skip_verify=True)
        assert client.login_mechanism == "SCRAM-SHA-512+tls-server-end-point"
        await client.close()


async def test_scram_over_plain_websocket_is_unbound(tmp_path: Path) -> None:
    async with serve("26.0", tmp_path, tls=False) as (sim, server, _):
        client = await connect_to(server.ws_url, sim.api_key)
        assert client.login_mechanism == "SCRAM-SHA-512"
        await client.close()
    assert sim.auth.mechanisms_tried == {"SCRAM": 2}
    assert not next(iter(sim.api_keys.values())).revoked  # a key sent in clear over ws:// would be


async def test_a_wrong_key_is_an_authentication_error_naming_no_secret(tmp_path: Path) -> None:
    async with serve("26.0", tmp_path, tls=True) as (sim, server, tls):
        wrong = "1-" + "Z" * 64
        with pytest.raises(AuthenticationFailed) as caught:
            await connect_to(server.ws_url, wrong, **tls)
    assert "Z" * 8 not in str(caught.value) and sim.api_key.partition("-")[2][:8] not in str(caught.value)
    assert "SCRAM" in caught.value.message and "'root'" in caught.value.message
    never_in_clear(sim)


async def test_a_server_whose_signature_does_not_verify_is_refused_without_fallback(tmp_path: Path) -> None:
    """RFC 5802 §3: the server's ``v=`` proves it holds the key; a wrong one is a failed login (the
    server answered the proof: it may be a man in the middle), never a retry with the key in clear."""
    async with serve("26.0", tmp_path, tls=True, scram_wrong_signature=True) as (sim, server, tls):
        with pytest.raises(AuthenticationFailed, match="signature does not verify"):
            await connect_to(server.ws_url, sim.api_key, **tls)
    assert sim.auth.mechanisms_tried == {"SCRAM": 2}
    never_in_clear(sim)


async def test_a_binding_to_another_certificate_is_refused_without_fallback(tmp_path: Path) -> None:
    """A TLS endpoint whose certificate is not the one TrueNAS published (a proxy or a man in the
    middle re-terminating TLS): TrueNAS refuses the bound proof; the operator does not retry unbound
    (which a relaying man in the middle would pass) nor in clear."""
    other = truenas_default_certificate()[0]
    async with serve("26.0", tmp_path, tls=True, published=other) as (sim, server, tls):
        with pytest.raises(AuthenticationFailed, match="channel binding"):
            await connect_to(server.ws_url, sim.api_key, **tls)
    assert sim.auth.mechanisms_tried == {"SCRAM": 2}
    never_in_clear(sim)


async def test_the_key_owner_is_named(tmp_path: Path) -> None:
    """SCRAM names the key's user (``n=<user>:<id>``): a key of ``admin`` logs in as admin only."""
    async with serve("26.0", tmp_path, tls=False) as (sim, server, _):
        sim.api_keys = {7: ApiKey(id=7, secret="a" * 64, username="admin")}
        key = "7-" + "a" * 64
        client = await connect_to(server.ws_url, key, username="admin")
        await client.close()
        with pytest.raises(AuthenticationFailed, match="'root'"):
            await connect_to(server.ws_url, key)
    never_in_clear(sim)


@pytest.mark.parametrize("profile", ["25.04.0", "25.10"])
async def test_25_x_still_logs_in_with_the_plain_key(profile: str, tmp_path: Path) -> None:
    async with serve(profile, tmp_path, tls=True) as (sim, server, tls):
        client = await connect_to(server.ws_url, sim.api_key, **tls)
        assert client.login_mechanism == "API_KEY_PLAIN"
        await client.close()
    assert sim.auth.mechanisms_tried == {"LEGACY_API_KEY": 1}


async def test_pbkdf2_runs_off_the_loop_once_per_key_salt_and_iterations(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    threads: list[threading.Thread] = []
    derive = scram._derive

    def counting(material: str, salt: bytes, iterations: int) -> scram.DerivedKeys:
        threads.append(threading.current_thread())
        return derive(material, salt, iterations)

    monkeypatch.setattr(scram, "_derive", counting)
    monkeypatch.setattr(scram, "_derived", type(scram._derived)())
    async with serve("26.0", tmp_path, tls=False) as (sim, server, _):
        for _ in range(3):  # reconnects: the salt and the count stay, so the keys are reused
            client = await connect_to(server.ws_url, sim.api_key)
            await client.close()
        assert len(threads) == 1 and threads[0] is not threading.main_thread()
        sim.knobs.scram_iterations = 60_000  # a new count (a re-made key): derived again
        client = await connect_to(server.ws_url, sim.api_key)
        await client.close()
    assert len(threads) == 2


async def test_no_log_line_carries_the_key_or_the_proof(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A refused SCRAM login, a bad signature and a good login, logged at DEBUG: neither the key,
    its secret part, nor a SCRAM message (the proof is derived from the key) shows up."""
    caplog.set_level(logging.DEBUG)
    async with serve("26.0", tmp_path, tls=True) as (sim, server, tls):
        secret_part = sim.api_key.partition("-")[2]
        with pytest.raises(AuthenticationFailed):
            await connect_to(server.ws_url, sim.api_key, username="admin", **tls)
        sim.knobs.scram_wrong_signature = True
        with pytest.raises(AuthenticationFailed):
            await connect_to(server.ws_url, sim.api_key, **tls)
        sim.knobs.scram_wrong_signature = False
        client = await connect_to(server.ws_url, sim.api_key, **tls)
        await client.close()
    text = caplog.text
    assert secret_part not in text and sim.api_key not in text
    assert "rfc_str" not in text and "c=cD10bHMt" not in text  # base64 of "p=tls-" begins every bound final


async def test_a_server_that_wants_a_login_before_mechanism_choices_gets_the_plain_key(tmp_path: Path) -> None:
    """A server that answers mechanism_choices with "Not authenticated" offers no anonymous SCRAM
    (25.x never lists it): the login goes on as on 25.x instead of failing the connection."""
    from truenas_simulator.errors import ENOTAUTHENTICATED, CallError

    def wants_login(ctx: Any, params: list[Any]) -> Any:
        raise CallError("Not authenticated", ENOTAUTHENTICATED)

    async with serve("25.10", tmp_path, tls=True) as (sim, server, tls):
        sim.methods["auth.mechanism_choices"] = (wants_login, False)
        client = await connect_to(server.ws_url, sim.api_key, **tls)
        assert client.login_mechanism == "API_KEY_PLAIN"
        await client.close()


# ----- hostile review of the SCRAM login (2026-12-06) ----------------------------------------------------------
def offering(mechanisms: Any) -> Any:
    def answer(ctx: Any, params: list[Any]) -> Any:
        return mechanisms

    return answer


async def test_a_server_that_offered_scram_never_gets_the_key_in_clear_later(tmp_path: Path) -> None:
    """Finding 1: after a SCRAM login, something answering in TrueNAS's place (a man in the middle
    where TLS is not verified) said SCRAM was not offered, and the reconnect sent the key in clear."""
    async with serve("26.0", tmp_path, tls=False) as (sim, server, _):
        client = await connect_to(server.ws_url, sim.api_key)
        assert client.login_mechanism == "SCRAM-SHA-512"
        await client.close()
        sim.methods["auth.mechanism_choices"] = (offering(["API_KEY_PLAIN"]), False)
        with pytest.raises(AuthenticationFailed, match="offered SCRAM to this process before"):
            await connect_to(server.ws_url, sim.api_key)
        never_in_clear(sim)


async def test_a_server_that_says_26_without_offering_scram_is_refused_and_not_sent_the_key_again(
    tmp_path: Path,
) -> None:
    """Finding 1: every TrueNAS 26 offers SCRAM; one that does not is not what it says. The first
    login cannot know before sending the key (25.x logs in that way); it fails loudly, and no later
    connection sends it again."""
    async with serve("26.0", tmp_path, tls=False) as (sim, server, _):
        sim.methods["auth.mechanism_choices"] = (offering(["API_KEY_PLAIN", "TOKEN_PLAIN"]), False)
        with pytest.raises(AuthenticationFailed, match="did not offer SCRAM, which every TrueNAS 26 does"):
            await connect_to(server.ws_url, sim.api_key)
        with pytest.raises(AuthenticationFailed, match="offered SCRAM to this process before"):
            await connect_to(server.ws_url, sim.api_key)
    assert sim.auth.mechanisms_tried["LEGACY_API_KEY"] == 1


@pytest.mark.parametrize("answer", [{}, "SCRAM", None])
async def test_mechanism_choices_that_is_not_a_list_fails_the_connection(tmp_path: Path, answer: Any) -> None:
    from truenas_incus_operator.truenas import MalformedAnswer

    async with serve("26.0", tmp_path, tls=False) as (sim, server, _):
        sim.methods["auth.mechanism_choices"] = (offering(answer), False)
        with pytest.raises(MalformedAnswer):
            await connect_to(server.ws_url, sim.api_key)
    never_in_clear(sim)


async def vm_created(profile: str, tmp_path: Path) -> Simulator:
    """A simulator of ``profile`` in which the client created one VM (an image and a seed uploaded)."""
    from .test_client_vm import mirror, vm_config

    async with serve(profile, tmp_path, tls=False) as (sim, server, _):
        client = await connect_to(server.ws_url, sim.api_key, vm_image_server=mirror(server))
        try:
            await client.instances.create(vm_config())
        finally:
            await client.close()
    return sim


async def test_uploads_after_a_scram_login_send_a_single_use_token_never_the_key(tmp_path: Path) -> None:
    """Finding 2: every VM's image and seed went to /_upload with ``Authorization: Bearer <key>``."""
    sim = await vm_created("26.0", tmp_path)
    assert sim.upload_schemes == {"Token": 2}, "the image and the seed, each with its own token"
    assert sim.counters.by_method["auth.generate_token"] == 2
    never_in_clear(sim)


async def test_25_x_uploads_still_send_the_key_it_logged_in_with(tmp_path: Path) -> None:
    assert (await vm_created("25.10", tmp_path)).upload_schemes == {"Bearer": 2}


async def test_an_unverified_certificate_without_a_binding_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Finding 3: with insecureSkipVerify, a man in the middle presenting an EdDSA certificate (no
    tls-server-end-point binding) got the exchange unbound, and relayed it. Verified, it stays allowed."""
    monkeypatch.setattr(scram, "tls_server_end_point", lambda certificate: None)
    async with serve("26.0", tmp_path, tls=True) as (sim, server, tls):
        with pytest.raises(AuthenticationFailed, match="no tls-server-end-point binding"):
            await connect_to(server.ws_url, sim.api_key, insecure_skip_verify=True)
        client = await connect_to(server.ws_url, sim.api_key, **tls)
        assert client.login_mechanism == "SCRAM-SHA-512"
        await client.close()
    never_in_clear(sim)


async def test_a_server_that_cannot_sign_evicts_no_cached_key_and_big_counts_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Finding 4: keys were cached before the server's signature was checked, so a hostile server
    with a fresh salt each time pushed the good ones out; counts up to 5 000 000 cost seconds each."""
    monkeypatch.setattr(scram, "_derived", type(scram._derived)())
    async with serve("26.0", tmp_path, tls=False, scram_wrong_signature=True) as (sim, server, _):
        with pytest.raises(AuthenticationFailed):
            await connect_to(server.ws_url, sim.api_key)
        assert len(scram._derived) == 0
        sim.knobs.scram_wrong_signature = False
        client = await connect_to(server.ws_url, sim.api_key)
        await client.close()
        assert len(scram._derived) == 1
    assert scram.MAX_ITERATIONS == 1_000_000
    assert "<redacted>" in repr(next(iter(scram._derived.values())))  # finding 5: no key material in a repr
    assert not scram.ITERATIONS.fullmatch(
        "\u0665" + "\u0660" * 5
    )  # finding 6: ASCII digits only (not 500000 in Arabic-Indic)
