"""A test client that logs in with SCRAM the way TrueNAS's official client does.

Our own code, written from reading ``truenas/api_client`` (``truenas_api_client/auth_api_key.py``
``api_key_authenticate`` / ``_resolve_channel_binding``, ``scram_impl.py`` ``TNScramClient``, and the
``py_scram`` package that mirrors the ``truenas_scram`` C library): what it sends and what it
refuses, so the simulator is checked against TrueNAS's client rather than against ours.

- ``auth.mechanism_choices`` first; no SCRAM there is an error (no automatic plain login);
- the client-first is ``<gs2>,,n=<user>:<key id>,r=<base64 of 32 random bytes>`` where the gs2 flag
  is ``p=tls-server-end-point`` when the connection has a TLS peer certificate (the default
  ``channel_binding=True``) and ``n`` when binding is turned off;
- the payloads are ``{"mechanism": "SCRAM", "scram_type": ..., "rfc_str": ...}`` and nothing else;
- AUTH_ERR refuses, any other ``response_type`` than SCRAM_RESPONSE is an unexpected answer;
- the server-first must be exactly ``r=,s=,i=``; its nonce base64 of 32 or 64 bytes, the
  iteration count within 50 000 .. 5 000 000, the salt at most 1024 bytes;
- the final is ``c=<base64(gs2 + ",," + binding)>,r=<base64 nonce>,p=<proof>``;
- the server's ``v=`` is checked, and a mismatch logs out and fails.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from collections.abc import Awaitable, Callable
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes

Call = Callable[[str, list[Any]], Awaitable[Any]]
MIN_ITERATIONS, MAX_ITERATIONS = 50_000, 5_000_000
NONCE_SIZE = 32
MAX_SALT = 1024


class OfficialClientRefused(ValueError):
    pass


def tls_server_end_point(cert_der: bytes) -> bytes:
    """RFC 5929 4.1: the certificate hashed with its signature's hash, MD5 and SHA-1 made SHA-256."""
    algorithm = x509.load_der_x509_certificate(cert_der).signature_hash_algorithm
    if algorithm is None:
        raise OfficialClientRefused("tls-server-end-point is undefined for this signature algorithm")
    if isinstance(algorithm, hashes.MD5 | hashes.SHA1):
        algorithm = hashes.SHA256()
    return hashlib.new(algorithm.name, cert_der).digest()


def _hmac(key: bytes, message: bytes) -> bytes:
    return hmac.new(key, message, hashlib.sha512).digest()


async def official_scram_login(
    call: Call,
    username: str,
    raw_key: str,
    *,
    peer_cert_der: bytes | None,
    channel_binding: bool = True,
    gs2_flag: str | None = None,
    corrupt_binding: bool = False,
) -> dict[str, Any]:
    """Runs the exchange; returns the SERVER_FINAL_RESPONSE. ``gs2_flag`` and ``corrupt_binding``
    make it misbehave on purpose (what the official client never sends), for refusal tests."""
    mechanisms = await call("auth.mechanism_choices", [])
    if "SCRAM" not in mechanisms:
        raise OfficialClientRefused("SCRAM authentication is not supported on the remote server")
    key_id, _, material = raw_key.partition("-")
    binding: bytes | None = None
    if channel_binding:
        if peer_cert_der is None:
            raise OfficialClientRefused("channel binding is required but the connection is not TLS (wss://)")
        binding = tls_server_end_point(peer_cert_der)
    flag = gs2_flag or ("p=tls-server-end-point" if binding is not None else "n")
    if not flag.startswith("p="):
        binding = None
    if corrupt_binding and binding is not None:
        binding = bytes(len(binding))
    nonce = secrets.token_bytes(NONCE_SIZE)
    bare = f"n={username}:{int(key_id)},r={base64.b64encode(nonce).decode()}"
    first = await call(
        "auth.login_ex", [{"mechanism": "SCRAM", "scram_type": "CLIENT_FIRST_MESSAGE", "rfc_str": f"{flag},,{bare}"}]
    )
    kind = first.pop("response_type")
    if kind == "AUTH_ERR":
        raise OfficialClientRefused("Invalid API key")
    if kind != "SCRAM_RESPONSE":
        raise OfficialClientRefused(f"{kind}: unexpected server response")
    if first["scram_type"] != "SERVER_FIRST_RESPONSE":
        raise OfficialClientRefused(f"{first['scram_type']}: unexpected response type")
    server_first = first["rfc_str"]
    parts = server_first.split(",")
    if len(parts) != 3 or [p[:2] for p in parts] != ["r=", "s=", "i="]:
        raise OfficialClientRefused("Invalid server first message format")
    combined = base64.b64decode(parts[0][2:])
    salt = base64.b64decode(parts[1][2:])
    iterations = int(parts[2][2:])
    if not MIN_ITERATIONS <= iterations <= MAX_ITERATIONS:
        raise OfficialClientRefused(f"{iterations}: iteration count outside the valid range")
    if len(combined) not in (NONCE_SIZE, 2 * NONCE_SIZE):
        raise OfficialClientRefused(f"{len(combined)}: unexpected nonce size")
    if len(salt) > MAX_SALT:
        raise OfficialClientRefused(f"{len(salt)}: salt too long")
    salted = hashlib.pbkdf2_hmac("sha512", material.encode(), salt, iterations)
    client_key = _hmac(salted, b"Client Key")
    stored_key = hashlib.sha512(client_key).digest()
    server_key = _hmac(salted, b"Server Key")
    cbind = base64.b64encode(f"{flag},,".encode() + (binding or b"")).decode()
    without_proof = f"c={cbind},r={base64.b64encode(combined).decode()}"
    auth_message = f"{bare},{server_first},{without_proof}".encode()
    proof = bytes(a ^ b for a, b in zip(client_key, _hmac(stored_key, auth_message), strict=True))
    final = await call(
        "auth.login_ex",
        [
            {
                "mechanism": "SCRAM",
                "scram_type": "CLIENT_FINAL_MESSAGE",
                "rfc_str": f"{without_proof},p={base64.b64encode(proof).decode()}",
            }
        ],
    )
    kind = final.pop("response_type")
    if kind == "AUTH_ERR":
        raise OfficialClientRefused("Failed to authenticate with API key")
    if kind != "SCRAM_RESPONSE" or final["scram_type"] != "SERVER_FINAL_RESPONSE":
        raise OfficialClientRefused(f"{kind}: unexpected server response")
    signature = final["rfc_str"]
    if not signature.startswith("v=") or not hmac.compare_digest(
        base64.b64decode(signature[2:]), _hmac(server_key, auth_message)
    ):
        await call("auth.logout", [])
        raise OfficialClientRefused("Remote server validation failed!")
    assert isinstance(final, dict)
    return final
