"""The client side of SCRAM-SHA-512 (RFC 5802) as TrueNAS 26 speaks it over ``auth.login_ex``.

What TrueNAS expects, from its own client library and server (docs/scram.md has the sources):

- the client-first names the key: ``<gs2>,,n=<user>:<key id>,r=<base64 of 32 random bytes>``;
  the SCRAM password is the key material after ``<id>-``, stretched with PBKDF2-HMAC-SHA512;
- the server's ``r=`` is base64 of our nonce bytes followed by 32 of its own (truenas_scram joins
  bytes, not strings); its iteration count lies within 50 000 .. 5 000 000;
- the final is ``c=<base64(gs2 + ",," + binding)>,r=<base64 nonce>,p=<proof>``; the server answers
  ``v=<signature>``, which proves it holds the key too; a wrong one fails the login;
- the gs2 flag is ``p=tls-server-end-point`` over TLS (RFC 5929: the hash of the certificate the
  server presented, so a man in the middle that re-terminates TLS cannot relay the exchange), ``n``
  over plain WebSocket, where TrueNAS refuses binding.

The key never leaves the process: only the proof does. The PBKDF2 (500 000 rounds on a real 26,
about half a second of CPU) runs on one worker thread of its own (a hostile server cannot take the
shared executor's), at most ``MAX_ITERATIONS`` rounds, and its result is kept per (key, salt,
iterations) once the server's signature proved it, so reconnects do not repeat it.

Downgrades: a server that offered SCRAM once (``pin``) is never sent the key in clear by this
process afterwards (``pinned``); the transport refuses instead (hostile-tenant review, 2026-12-06).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import re
import secrets
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from ..errors import AuthenticationFailed, MalformedAnswer
from .base import Secret

MECHANISM = "SCRAM"
MIN_ITERATIONS, MAX_ITERATIONS = 50_000, 1_000_000
"""TrueNAS's client takes 50 000 .. 5 000 000; TrueNAS uses 500 000. Bounded lower here so that a
server (a tenant's URL) cannot make each login cost ten seconds of CPU."""
ITERATIONS = re.compile(r"[0-9]{1,7}")
NONCE_SIZE = 32
MAX_SALT_BYTES = 1024
TLS_SERVER_END_POINT = "tls-server-end-point"
KEY_CACHE_SIZE = 64

Call = Callable[[str, list[Any]], Awaitable[Any]]


@dataclass(frozen=True, repr=False)
class DerivedKeys:
    client_key: bytes
    stored_key: bytes
    server_key: bytes

    def __repr__(self) -> str:
        return "DerivedKeys(<redacted>)"  # ClientKey alone makes valid proofs for that NAS


_derived: OrderedDict[tuple[bytes, bytes, int], DerivedKeys] = OrderedDict()
"""Derived keys by (SHA-256 of the key, salt, iterations): the key itself is not a dictionary key."""
_pbkdf2 = ThreadPoolExecutor(max_workers=1, thread_name_prefix="scram-pbkdf2")
"""PBKDF2 runs here, one at a time: never on the executor the rest of the operator shares."""
_offered: set[bytes] = set()
"""SHA-256 of (URL, key) for every server that offered SCRAM to this process (``pin``)."""


def _pin_key(url: str, api_key: Secret) -> bytes:
    return hashlib.sha256(f"{url}\0{api_key.reveal()}".encode()).digest()


def pin(url: str, api_key: Secret) -> None:
    """Remembers that the server at ``url`` offered SCRAM for this key."""
    _offered.add(_pin_key(url, api_key))


def pinned(url: str, api_key: Secret) -> bool:
    """Whether the server at ``url`` offered SCRAM for this key before (then plain login is refused)."""
    return _pin_key(url, api_key) in _offered


def _derive(material: str, salt: bytes, iterations: int) -> DerivedKeys:
    salted = hashlib.pbkdf2_hmac("sha512", material.encode(), salt, iterations)
    client_key = _hmac(salted, b"Client Key")
    return DerivedKeys(client_key, hashlib.sha512(client_key).digest(), _hmac(salted, b"Server Key"))


def _cache_key(material: str, salt: bytes, iterations: int) -> tuple[bytes, bytes, int]:
    return hashlib.sha256(material.encode()).digest(), salt, iterations


async def derived_keys(material: str, salt: bytes, iterations: int) -> DerivedKeys:
    """PBKDF2 off the event loop on its own thread, or the cached result for (key, salt, iterations)."""
    keys = _derived.get(_cache_key(material, salt, iterations))
    if keys is not None:
        _derived.move_to_end(_cache_key(material, salt, iterations))
        return keys
    return await asyncio.get_running_loop().run_in_executor(_pbkdf2, _derive, material, salt, iterations)


def remember(material: str, salt: bytes, iterations: int, keys: DerivedKeys) -> None:
    """Caches keys the server's signature proved (a server that cannot sign evicts nothing)."""
    _derived[_cache_key(material, salt, iterations)] = keys
    while len(_derived) > KEY_CACHE_SIZE:
        _derived.popitem(last=False)


def tls_server_end_point(certificate_der: bytes) -> bytes | None:
    """RFC 5929 §4.1: the certificate hashed with its signature's hash, MD5 and SHA-1 promoted to
    SHA-256. None where that is undefined (EdDSA): TrueNAS can publish no binding for such a
    certificate either, so the exchange is unbound."""
    # Imported when a SCRAM login needs it: cryptography's bindings are 8 MB of RSS in every
    # operator process (BENCHMARKS.md, "Scale round 2").
    from cryptography import exceptions, x509
    from cryptography.hazmat.primitives import hashes

    try:
        algorithm = x509.load_der_x509_certificate(certificate_der).signature_hash_algorithm
    except (ValueError, exceptions.UnsupportedAlgorithm):
        return None
    if algorithm is None:
        return None
    if isinstance(algorithm, hashes.MD5 | hashes.SHA1):
        algorithm = hashes.SHA256()
    return hashlib.new(algorithm.name, certificate_der).digest()


def _hmac(key: bytes, message: bytes) -> bytes:
    return hmac.new(key, message, hashlib.sha512).digest()


def _b64(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise MalformedAnswer(f"SCRAM: the server's {what} is not base64") from None


def _answer(answer: Any, expected: str, username: str) -> str:
    """The ``rfc_str`` of a SCRAM_RESPONSE of type ``expected``; AUTH_ERR is a refused key."""
    if not isinstance(answer, dict):
        raise MalformedAnswer(f"auth.login_ex (SCRAM) answered a {type(answer).__name__}, not an object")
    kind = answer.get("response_type")
    if kind == "AUTH_ERR":
        raise AuthenticationFailed(
            f"TrueNAS refused the API key (SCRAM login as user {username!r}): the key is wrong, revoked or "
            "expired, or belongs to another user (spec.username), or the TLS channel binding did not match "
            "the certificate TrueNAS serves (a proxy that re-terminates TLS)"
        )
    if kind != "SCRAM_RESPONSE" or answer.get("scram_type") != expected:
        raise AuthenticationFailed(
            f"TrueNAS answered the SCRAM login with {str(kind)[:40]!r}/{str(answer.get('scram_type'))[:40]!r}, "
            f"not SCRAM_RESPONSE/{expected}"
        )
    text = answer.get("rfc_str")
    if not isinstance(text, str):
        raise MalformedAnswer("auth.login_ex (SCRAM) answered no rfc_str")
    return text


def check_username(username: str) -> None:
    if not username or any(c in username for c in ",=:") or not username.isprintable() or " " in username:
        raise AuthenticationFailed(
            f"the username {username[:64]!r} cannot be used for SCRAM (no ',', '=', ':' or spaces)"
        )


async def login(
    call: Call, username: str, api_key: Secret, peer_certificate: bytes | None, *, verified: bool = True
) -> str:
    """Logs in with SCRAM; returns the mechanism as doctor shows it (``SCRAM-SHA-512`` with
    ``+tls-server-end-point`` when bound). Raises ``AuthenticationFailed`` when refused or when the
    server's signature does not prove it holds the key, never falling back to sending the key.
    ``verified``: whether TLS verified the certificate; an unverified one must be bound (else a man in
    the middle who chose a certificate without a binding, EdDSA, relays the exchange unbound)."""
    check_username(username)
    key_id, _, material = api_key.reveal().partition("-")
    if not key_id.isdigit() or not material:
        raise AuthenticationFailed("the API key is not of the form <id>-<key>; SCRAM needs the key's id")
    binding = tls_server_end_point(peer_certificate) if peer_certificate else None
    if peer_certificate is not None and binding is None and not verified:
        raise AuthenticationFailed(
            "SCRAM: the certificate TrueNAS presented has no tls-server-end-point binding (an EdDSA or "
            "unreadable certificate) and TLS verification is off (insecureSkipVerify): an unbound login "
            "could be relayed by a man in the middle, so it is refused. Verify the certificate (spec.tls.caSecretRef) "
            "or serve an RSA or ECDSA certificate"
        )
    flag = f"p={TLS_SERVER_END_POINT}" if binding is not None else "n"
    nonce = secrets.token_bytes(NONCE_SIZE)
    bare = f"n={username}:{int(key_id)},r={base64.b64encode(nonce).decode()}"
    server_first = _answer(
        await call(
            "auth.login_ex",
            [{"mechanism": MECHANISM, "scram_type": "CLIENT_FIRST_MESSAGE", "rfc_str": f"{flag},,{bare}"}],
        ),
        "SERVER_FIRST_RESPONSE",
        username,
    )
    parts = server_first.split(",")
    if len(parts) != 3 or [p[:2] for p in parts] != ["r=", "s=", "i="] or not ITERATIONS.fullmatch(parts[2][2:]):
        raise MalformedAnswer("SCRAM: the server-first message is not r=...,s=...,i=...")
    combined, salt, iterations = _b64(parts[0][2:], "nonce"), _b64(parts[1][2:], "salt"), int(parts[2][2:])
    if len(combined) != 2 * NONCE_SIZE or not hmac.compare_digest(combined[:NONCE_SIZE], nonce):
        raise AuthenticationFailed("SCRAM: the server's nonce does not extend ours (not TrueNAS's SCRAM)")
    if not MIN_ITERATIONS <= iterations <= MAX_ITERATIONS or not 0 < len(salt) <= MAX_SALT_BYTES:
        raise AuthenticationFailed(
            f"SCRAM: the server asks for {iterations} iterations and a {len(salt)}-byte salt "
            f"(TrueNAS's client accepts {MIN_ITERATIONS}..{MAX_ITERATIONS} and at most {MAX_SALT_BYTES} bytes)"
        )
    keys = await derived_keys(material, salt, iterations)
    cbind = base64.b64encode(f"{flag},,".encode() + (binding or b"")).decode()
    without_proof = f"c={cbind},r={base64.b64encode(combined).decode()}"
    auth_message = f"{bare},{server_first},{without_proof}".encode()
    proof = bytes(a ^ b for a, b in zip(keys.client_key, _hmac(keys.stored_key, auth_message), strict=True))
    server_final = _answer(
        await call(
            "auth.login_ex",
            [
                {
                    "mechanism": MECHANISM,
                    "scram_type": "CLIENT_FINAL_MESSAGE",
                    "rfc_str": f"{without_proof},p={base64.b64encode(proof).decode()}",
                }
            ],
        ),
        "SERVER_FINAL_RESPONSE",
        username,
    )
    signature = _b64(server_final[2:], "signature") if server_final.startswith("v=") else b""
    if not hmac.compare_digest(signature, _hmac(keys.server_key, auth_message)):
        raise AuthenticationFailed(
            "SCRAM: TrueNAS's signature does not verify, so the server does not hold the API key "
            "(a man in the middle, or another host); the login is refused"
        )
    remember(material, salt, iterations, keys)
    return "SCRAM-SHA-512" + (f"+{TLS_SERVER_END_POINT}" if binding is not None else "")
