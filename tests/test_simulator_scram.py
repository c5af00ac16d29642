"""The simulator's SCRAM-SHA-512 (TrueNAS 26) against a client that behaves as TrueNAS's official
client does (tests/official_scram_client.py), over TLS and plain WebSocket.

Each test names the rule and where it is in TrueNAS's source: the middleware (truenas/middleware
TS-26.0.0-BETA.3, paths under src/middlewared/middlewared/), the SCRAM library (truenas/truenas_scram
src/scram/), the PAM module (truenas/pam_truenas) and the official client (truenas/api_client).
"""

from __future__ import annotations

import base64
import json
import secrets
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from itertools import count
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import scramp

from truenas_simulator import Simulator, SimulatorServer
from truenas_simulator.context import Session
from truenas_simulator.errors import ValidationErrors
from truenas_simulator.tls import CertificateAuthority, server_context

from .official_scram_client import Call, OfficialClientRefused, official_scram_login, tls_server_end_point


def quick(profile: str = "26.0") -> Simulator:
    sim = Simulator(profile, seed=3)
    sim.knobs.auth_fail_delay = 0
    sim.knobs.scram_iterations = 50_000  # the lowest count TrueNAS's own client accepts
    return sim


@asynccontextmanager
async def wire(sim: Simulator, tls: bool, cert_dir: Path) -> AsyncIterator[tuple[Call, bytes | None]]:
    """A JSON-RPC connection to the simulator served over TLS (its certificate published for
    binding, as middlewared publishes the UI certificate's) or plain ws; yields (call, peer cert)."""
    context = server_context(CertificateAuthority.create("test CA"), cert_dir, ["127.0.0.1"]) if tls else None
    certificate = (cert_dir / "server.crt").read_bytes() if tls else None
    server = await SimulatorServer(sim, ssl_context=context, certificate=certificate).start()
    client_context = ssl.create_default_context(cafile=str(cert_dir / "ca.crt")) if tls else False
    ids = count(1)
    try:
        async with (
            aiohttp.ClientSession() as http,
            http.ws_connect(f"{server.ws_url}/api/current", ssl=client_context) as ws,
        ):
            ssl_object = ws.get_extra_info("ssl_object")
            peer = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None

            async def call(method: str, params: list[Any]) -> Any:
                ident = next(ids)
                await ws.send_str(json.dumps({"jsonrpc": "2.0", "id": ident, "method": method, "params": params}))
                answer = json.loads((await ws.receive()).data)
                assert answer["id"] == ident
                if "error" in answer:
                    raise RuntimeError(answer["error"])
                return answer["result"]

            yield call, peer
    finally:
        await server.stop()


def direct(sim: Simulator, session: Session) -> Call:
    async def call(method: str, params: list[Any]) -> Any:
        return await sim.call(session, method, params)

    return call


def first_message(nonce: bytes, flag: str = "n", user: str = "root:1") -> dict[str, str]:
    return {
        "mechanism": "SCRAM",
        "scram_type": "CLIENT_FIRST_MESSAGE",
        "rfc_str": f"{flag},,n={user},r={base64.b64encode(nonce).decode()}",
    }


# ----- rule 1: nonces are bytes ------------------------------------------------------------------
async def test_server_nonce_is_base64_of_the_client_nonce_bytes_and_32_of_its_own() -> None:
    """truenas_scram scram_server_first.c ``scram_create_server_first_message``: the combined nonce
    is the client's nonce bytes followed by 32 random bytes (``scram_generate_nonce``,
    SCRAM_NONCE_SIZE 32), serialized as one base64 value. The official client decodes it and
    accepts only 32 or 64 bytes (py_scram server_first.py, after scram_parse_nonce)."""
    sim = quick()
    client_nonce = secrets.token_bytes(32)
    answer = await sim.call(Session(), "auth.login_ex", [first_message(client_nonce)])
    assert answer["response_type"] == "SCRAM_RESPONSE" and answer["user_info"] is None
    r, s, i = answer["rfc_str"].split(",")
    combined = base64.b64decode(r[2:], validate=True)
    assert len(combined) == 64 and combined[:32] == client_nonce
    assert len(base64.b64decode(s[2:])) == 16 and i == "i=50000"


@pytest.mark.parametrize(
    "nonce",
    [
        base64.b64encode(bytes(range(24))).decode(),  # a size truenas_scram does not take
        bytes(range(32)).hex(),  # printable, as RFC 5802 allows, but not base64 of 32 bytes
        "not*base64",
    ],
)
async def test_client_nonce_must_be_base64_of_32_or_64_bytes(nonce: str) -> None:
    """scram_attr_parse.c ``scram_parse_nonce``: an ``r=`` that does not base64-decode to 32 or 64
    bytes fails the client-first parse; ScramPamAuthenticator turns a parse error into
    PAM_AUTH_ERR, which login_ex answers as AUTH_ERR (utils/account/authenticator.py)."""
    sim = quick()
    message = {"mechanism": "SCRAM", "scram_type": "CLIENT_FIRST_MESSAGE", "rfc_str": f"n,,n=root:1,r={nonce}"}
    assert await sim.call(Session(), "auth.login_ex", [message]) == {"response_type": "AUTH_ERR"}
    assert await sim.call(Session(), "auth.login_ex", [first_message(secrets.token_bytes(64))]) != {
        "response_type": "AUTH_ERR"
    }


async def test_a_generic_rfc5802_client_refuses_truenas_nonce() -> None:
    """Because the combined nonce is re-encoded bytes, it does not start with the client's base64
    text (32 bytes encode with padding), so an RFC 5802 client that checks the prefix (§5.1), such as
    scramp, gives up: TrueNAS's SCRAM is for its own client library (truenas_scram), not for any."""
    sim = quick()
    ident, _, material = sim.api_key.partition("-")
    client = scramp.ScramClient(
        ["SCRAM-SHA-512"], f"root:{ident}", material, c_nonce=base64.b64encode(secrets.token_bytes(32)).decode()
    )
    first = await sim.call(
        Session(),
        "auth.login_ex",
        [{"mechanism": "SCRAM", "scram_type": "CLIENT_FIRST_MESSAGE", "rfc_str": client.get_client_first()}],
    )
    with pytest.raises(scramp.ScramException, match="nonce"):
        client.set_server_first(first["rfc_str"])


# ----- rule 2: channel binding (tls-server-end-point), negotiated --------------------------------
async def test_official_client_binds_over_tls(tmp_path: Path) -> None:
    """api_client auth_api_key.py ``_resolve_channel_binding``: over wss:// the client reads the
    server certificate and sends ``p=tls-server-end-point``; the 26.0 server verifies it against the
    UI certificate's hash (etc_files/pam_keyring.py publishes it; pam_truenas
    ``_ptn_verify_client_final``, channel_binding=negotiate in pam.d/truenas-api-key.mako)."""
    sim = quick()
    async with wire(sim, tls=True, cert_dir=tmp_path) as (call, peer):
        assert peer is not None
        final = await official_scram_login(call, "root", sim.api_key, peer_cert_der=peer)
        assert final["user_info"]["pw_name"] == "root"
        assert await call("container.query", []) == []
    assert sim.auth.mechanisms_tried == {"SCRAM": 2}


async def test_unbound_scram_is_still_accepted_over_tls_and_plain(tmp_path: Path) -> None:
    """api/v26_0_0/auth.py AuthSCRAM: binding "is only honored over TLS and remains optional, so
    clients that do not request it still authenticate" (``n,,``; pam_truenas negotiate)."""
    sim = quick()
    async with wire(sim, tls=True, cert_dir=tmp_path / "tls") as (call, peer):
        await official_scram_login(call, "root", sim.api_key, peer_cert_der=peer, channel_binding=False)
    async with wire(sim, tls=False, cert_dir=tmp_path / "plain") as (call, peer):
        assert peer is None
        with pytest.raises(OfficialClientRefused, match="not TLS"):  # the client's own default refuses
            await official_scram_login(call, "root", sim.api_key, peer_cert_der=peer)
        await official_scram_login(call, "root", sim.api_key, peer_cert_der=None, channel_binding=False)


async def test_binding_over_plain_websocket_is_refused_at_the_first_message(tmp_path: Path) -> None:
    """utils/account/authenticator.py ScramPamAuthenticator.handle_first_message: a ``p=`` client
    that did not arrive over TLS (``origin.ssl``) is PAM_AUTH_ERR ('channel binding is not permitted
    over a non-TLS transport'): a non-TLS client could replay the public certificate's hash."""
    sim = quick()
    sim.ui_certificate = _some_cert()  # a binding is published: only the transport is wrong
    async with wire(sim, tls=False, cert_dir=tmp_path) as (call, _):
        with pytest.raises(OfficialClientRefused, match="Invalid API key"):  # refused at the first step
            await official_scram_login(call, "root", sim.api_key, peer_cert_der=sim.ui_certificate)


async def test_a_wrong_binding_or_an_unknown_binding_type_is_refused(tmp_path: Path) -> None:
    """pam_truenas tests/test_scram_channel_binding.py test_keyring_mismatched_binding_rejected: a
    ``p`` client bound to another certificate (a re-terminating man in the middle) is PAM_AUTH_ERR at
    the final message; so is a cb-name the server does not offer (RFC 5802 §6)."""
    sim = quick()
    async with wire(sim, tls=True, cert_dir=tmp_path) as (call, peer):
        with pytest.raises(OfficialClientRefused, match="Failed to authenticate"):
            await official_scram_login(call, "root", sim.api_key, peer_cert_der=peer, corrupt_binding=True)
        with pytest.raises(OfficialClientRefused, match="Failed to authenticate"):
            await official_scram_login(call, "root", sim.api_key, peer_cert_der=peer, gs2_flag="p=tls-unique")


async def test_binding_is_refused_when_the_server_published_none() -> None:
    """pam_truenas README and test_no_binding_rejects_bound_client: with no binding published (no UI
    certificate), a client that asks for binding is refused, not accepted unverified."""
    sim = quick()
    assert sim.ui_certificate is None
    session = Session(secure=True)
    with pytest.raises(OfficialClientRefused, match="Failed to authenticate"):
        await official_scram_login(direct(sim, session), "root", sim.api_key, peer_cert_der=_some_cert())
    await official_scram_login(direct(sim, Session(secure=True)), "root", sim.api_key, peer_cert_der=None,
                               channel_binding=False)  # fmt: skip


async def test_y_flag_is_refused_while_the_server_offers_binding() -> None:
    """RFC 5802 §6: 'y' says the client supports binding but thinks the server does not; a server
    that does (26.0 publishes the UI certificate's binding) MUST fail the exchange (a stripped
    offer). Without a published binding it is an unbound login like 'n'. (The official client never
    sends 'y'; truenas_scram's channel-binding verifier was not in the sources read.)"""
    sim = quick()
    sim.ui_certificate = _some_cert()
    with pytest.raises(OfficialClientRefused, match="Failed to authenticate"):
        await official_scram_login(
            direct(sim, Session(secure=True)), "root", sim.api_key, peer_cert_der=None, channel_binding=False,
            gs2_flag="y",
        )  # fmt: skip
    sim.ui_certificate = None
    await official_scram_login(
        direct(sim, Session(secure=True)), "root", sim.api_key, peer_cert_der=None, channel_binding=False, gs2_flag="y"
    )


def _some_cert() -> bytes:
    from truenas_simulator.tls import truenas_default_certificate

    return ssl.PEM_cert_to_DER_cert(truenas_default_certificate()[0].decode())


def test_tls_server_end_point_follows_the_signature_hash() -> None:
    """RFC 5929 §4.1 (as api_client py_scram/channel_binding.py mirrors truenas_scram): SHA-256 for
    the RSA/SHA-256 truenas_default certificate; the simulator and the test client agree."""
    from truenas_simulator.scram import tls_server_end_point as simulator_binding

    der = _some_cert()
    assert tls_server_end_point(der) == simulator_binding(der) and len(tls_server_end_point(der)) == 32


# ----- rule 3: payloads, answers, errors ---------------------------------------------------------
async def test_final_message_attributes_come_in_order_c_r_p() -> None:
    """scram_client_final.c: 'expected channel binding as first attribute', 'expected nonce as
    second attribute'; a reordered final is a parse failure, AUTH_ERR."""
    sim = quick()
    session = Session()
    nonce = secrets.token_bytes(32)
    first = await sim.call(session, "auth.login_ex", [first_message(nonce)])
    r = first["rfc_str"].split(",")[0]
    proof = base64.b64encode(bytes(64)).decode()
    final = {"mechanism": "SCRAM", "scram_type": "CLIENT_FINAL_MESSAGE", "rfc_str": f"{r},c=biws,p={proof}"}
    assert await sim.call(session, "auth.login_ex", [final]) == {"response_type": "AUTH_ERR"}


async def test_wrong_signature_knob_makes_the_official_client_refuse() -> None:
    """api_client auth_api_key.py: a server-final whose ``v=`` does not verify logs out and raises
    'Remote server validation failed!' (the knob serves clients' tests of that refusal)."""
    sim = quick()
    sim.knobs.scram_wrong_signature = True
    session = Session()
    with pytest.raises(OfficialClientRefused, match="validation failed"):
        await official_scram_login(direct(sim, session), "root", sim.api_key, peer_cert_der=None, channel_binding=False)
    assert not session.authenticated  # the client's auth.logout


async def test_a_scram_payload_takes_exactly_mechanism_scram_type_and_rfc_str() -> None:
    """api/v26_0_0/auth.py AuthSCRAM has mechanism, scram_type and rfc_str only, and the API's
    BaseModel forbids extra inputs (api/base/model.py ``extra="forbid"``): a SCRAM payload with
    login_options (which the plain mechanisms take) is a validation error, not ignored. The
    official client sends the three keys alone."""
    sim = quick()
    message = {**first_message(secrets.token_bytes(32)), "login_options": {"user_info": True}}
    with pytest.raises(ValidationErrors) as caught:
        await sim.call(Session(), "auth.login_ex", [message])
    assert caught.value.extra() == [["login_data.SCRAM.login_options", "Extra inputs are not permitted", 22]]
