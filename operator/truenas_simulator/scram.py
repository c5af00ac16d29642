"""Server side of SCRAM-SHA-512 (RFC 5802) as TrueNAS 26 offers it through ``auth.login_ex``.

TrueNAS departs from the RFC in three places (truenas_scram ``src/scram/``, the library its PAM
module ``pam_truenas`` and the middleware use):

- the client-first message names the API key as well as the user (``n=<user>:<api key id>``), and
  the SCRAM "password" is the key material after the ``<id>-`` prefix;
- nonces are bytes, not strings: the client's ``r=`` must be base64 of 32 (or 64) bytes
  (``scram_parse_nonce`` in scram_attr_parse.c), and the server's ``r=`` is base64 of the client's
  nonce bytes followed by 32 random bytes of its own (``scram_create_server_first_message`` in
  scram_server_first.c), so it does not start with the client's base64 text as RFC 5802 §5.1
  would have it, and a generic RFC client that checks that prefix refuses it;
- the client-final's attributes come in the order ``c``, ``r``, ``p`` (scram_client_final.c).

Keys are derived with PBKDF2-HMAC-SHA512 (500 000 rounds on a real 26, 16-byte salt); clients
refuse iteration counts outside 50 000..5 000 000.

Channel binding (RFC 5929 ``tls-server-end-point``) is negotiated: pam_truenas is configured with
``channel_binding=negotiate`` on 26.0 (middleware ``etc_files/pam.d/truenas-api-key.mako``) and
verifies ``p=tls-server-end-point`` against the hash of the UI certificate middlewared publishes
(``etc_files/pam_keyring.py``); a client that asks for binding when no binding is published is
refused, an unbound ``n`` client is admitted (pam_truenas ``_ptn_verify_client_final`` and its
tests/test_scram_channel_binding.py). A ``y`` client ("I support binding, I think you don't") is
refused while a binding is published, as RFC 5802 §6 requires of a server that supports it.

The wire shapes (``scram_type`` CLIENT_FIRST_MESSAGE / SERVER_FIRST_RESPONSE / CLIENT_FINAL_MESSAGE /
SERVER_FINAL_RESPONSE, ``rfc_str``) are those of ``api/v26_0_0/auth.py`` (AuthSCRAM, AuthRespScram).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding

MIN_ITERATIONS = 50_000
NONCE_SIZE = 32
"""Bytes of each side's nonce (SCRAM_NONCE_SIZE in truenas_scram.h)."""
TLS_SERVER_END_POINT = "tls-server-end-point"


class ScramParseError(ValueError):
    pass


@dataclass(frozen=True)
class ScramSecrets:
    """What the server keeps for one API key instead of the key itself."""

    salt: bytes
    iterations: int
    stored_key: bytes
    server_key: bytes

    @classmethod
    def derive(cls, key_material: str, iterations: int, salt: bytes | None = None) -> ScramSecrets:
        salt = salt if salt is not None else secrets.token_bytes(16)
        salted = hashlib.pbkdf2_hmac("sha512", key_material.encode(), salt, iterations)
        client_key = _hmac(salted, b"Client Key")
        return cls(salt, iterations, hashlib.sha512(client_key).digest(), _hmac(salted, b"Server Key"))


@dataclass(frozen=True)
class ClientFirst:
    gs2_flag: str
    """``n``, ``y`` or ``p=<cb-name>``."""
    username: str
    api_key_id: int
    nonce: bytes
    bare: str

    @property
    def gs2_header(self) -> str:
        """The header as the client-final's ``c=`` repeats it (no authzid: TrueNAS has none)."""
        return f"{self.gs2_flag},,"

    @property
    def wants_binding(self) -> bool:
        return self.gs2_flag.startswith("p=")


@dataclass(frozen=True)
class ServerFirst:
    nonce: bytes
    """The client's nonce bytes followed by the server's."""
    message: str


def _attributes(text: str) -> list[tuple[str, str]]:
    values: list[tuple[str, str]] = []
    for part in text.split(","):
        key, sep, value = part.partition("=")
        if not sep or len(key) != 1 or not value:
            raise ScramParseError(f"malformed SCRAM attribute {part!r}")
        values.append((key, value))
    return values


def _b64(text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ScramParseError("not base64") from None


def _nonce(text: str) -> bytes:
    nonce = _b64(text)
    if len(nonce) not in (NONCE_SIZE, 2 * NONCE_SIZE):
        raise ScramParseError(f"{len(nonce)}: unexpected nonce size")
    return nonce


def parse_client_first(text: str) -> ClientFirst:
    flag, separator, bare = text.partition(",,")
    if not separator or not (flag in ("n", "y") or (flag.startswith("p=") and len(flag) > 2)):
        raise ScramParseError("malformed gs2 header")  # an authzid (``n,a=x,``) is not understood either
    attributes = _attributes(bare)
    if [key for key, _ in attributes] != ["n", "r"]:
        raise ScramParseError("client-first-message needs n= then r=")
    name, nonce = attributes[0][1], _nonce(attributes[1][1])
    user, colon, key_id = name.rpartition(":")
    if not colon or not key_id.isdigit():
        user, key_id = name, "0"
    return ClientFirst(flag, user, int(key_id), nonce, bare)


def server_first(client: ClientFirst, secrets_: ScramSecrets) -> ServerFirst:
    nonce = client.nonce + secrets.token_bytes(NONCE_SIZE)
    message = (
        f"r={base64.b64encode(nonce).decode()},s={base64.b64encode(secrets_.salt).decode()},i={secrets_.iterations}"
    )
    return ServerFirst(nonce, message)


def verify_client_final(
    client: ClientFirst,
    first: ServerFirst,
    final: str,
    secrets_: ScramSecrets,
    binding: bytes | None = None,
    *,
    wrong_signature: bool = False,
) -> str | None:
    """The server-final message (``v=...``) when the client proof is right, else None.

    ``binding``: the ``tls-server-end-point`` value the server publishes (None: no binding, so a
    client that asks for one is refused). ``wrong_signature`` signs with the wrong key, as a server
    that does not hold the key would (a knob for clients' tests)."""
    try:
        attributes = _attributes(final)
        if [key for key, _ in attributes] != ["c", "r", "p"]:
            return None
        cbind_input, nonce, proof = _b64(attributes[0][1]), _b64(attributes[1][1]), _b64(attributes[2][1])
    except ScramParseError:
        return None
    if not hmac.compare_digest(nonce, first.nonce):
        return None
    if client.wants_binding:
        if client.gs2_flag != f"p={TLS_SERVER_END_POINT}" or binding is None:
            return None  # an unknown binding type, or none published to check it against
        expected = client.gs2_header.encode() + binding
    elif client.gs2_flag == "y" and binding is not None:
        return None  # RFC 5802 §6: a server that supports binding refuses "y" (a stripped offer)
    else:
        expected = client.gs2_header.encode()
    if not hmac.compare_digest(cbind_input, expected):
        return None
    without_proof = final[: final.rindex(",p=")]
    auth_message = f"{client.bare},{first.message},{without_proof}".encode()
    signature = _hmac(secrets_.stored_key, auth_message)
    if len(proof) != len(signature):
        return None
    client_key = bytes(a ^ b for a, b in zip(proof, signature, strict=True))
    if not hmac.compare_digest(hashlib.sha512(client_key).digest(), secrets_.stored_key):
        return None
    server_key = secrets_.stored_key if wrong_signature else secrets_.server_key
    return "v=" + base64.b64encode(_hmac(server_key, auth_message)).decode()


def tls_server_end_point(certificate: bytes) -> bytes | None:
    """RFC 5929 §4.1: the certificate (PEM or DER) hashed with its signature's hash, MD5 and SHA-1
    promoted to SHA-256; None where that is undefined (EdDSA), as truenas_scram refuses those."""
    cert = (
        x509.load_pem_x509_certificate(certificate)
        if certificate.lstrip().startswith(b"-----")
        else x509.load_der_x509_certificate(certificate)
    )
    algorithm = cert.signature_hash_algorithm
    if algorithm is None:
        return None
    if isinstance(algorithm, hashes.MD5 | hashes.SHA1):
        algorithm = hashes.SHA256()
    return hashlib.new(algorithm.name, cert.public_bytes(Encoding.DER)).digest()


def _hmac(key: bytes, message: bytes) -> bytes:
    return hmac.new(key, message, hashlib.sha512).digest()
