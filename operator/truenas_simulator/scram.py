"""Server side of SCRAM-SHA-512 (RFC 5802) as TrueNAS 26 offers it through ``auth.login_ex``.

TrueNAS departs from the RFC in one place: the client-first message names the API key as well as
the user (``n=<user>:<api key id>``), and the SCRAM "password" is the key material after the
``<id>-`` prefix. Keys are derived with PBKDF2-HMAC-SHA512 (500 000 rounds on a real 26, 16-byte
salt); clients refuse iteration counts outside 50 000..5 000 000.

The wire shapes (``scram_type`` CLIENT_FIRST_MESSAGE / SERVER_FIRST_RESPONSE / CLIENT_FINAL_MESSAGE /
SERVER_FINAL_RESPONSE, ``rfc_str``) are those of ``api/v26_0_0/auth.py`` (AuthSCRAM, AuthRespScram).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from dataclasses import dataclass

MIN_ITERATIONS = 50_000


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
    gs2_header: str
    """``n,,`` / ``y,,`` / ``p=<cb-name>,,`` (with the authzid, if any)."""
    username: str
    api_key_id: int
    nonce: str
    bare: str


def _attributes(text: str) -> dict[str, str]:
    values: dict[str, str] = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        if not sep or len(key) != 1:
            raise ScramParseError(f"malformed SCRAM attribute {part!r}")
        values[key] = value
    return values


def parse_client_first(text: str) -> ClientFirst:
    flag, sep1, rest = text.partition(",")
    authzid, sep2, bare = rest.partition(",")
    if not (sep1 and sep2) or not (flag in ("n", "y") or flag.startswith("p=")):
        raise ScramParseError("malformed gs2 header")
    values = _attributes(bare)
    if "n" not in values or "r" not in values or not values["r"]:
        raise ScramParseError("client-first-message needs n= and r=")
    name = values["n"].replace("=2C", ",").replace("=3D", "=")
    user, colon, key_id = name.rpartition(":")
    if not colon or not key_id.isdigit():
        user, key_id = name, "0"
    return ClientFirst(f"{flag},{authzid},", user, int(key_id), values["r"], bare)


def server_first(client: ClientFirst, secrets_: ScramSecrets) -> str:
    nonce = client.nonce + base64.b64encode(secrets.token_bytes(18)).decode()
    return f"r={nonce},s={base64.b64encode(secrets_.salt).decode()},i={secrets_.iterations}"


def verify_client_final(
    client: ClientFirst, server_first_message: str, final: str, secrets_: ScramSecrets
) -> str | None:
    """Returns the server-final message (``v=...``) when the client proof is right, else None."""
    try:
        values = _attributes(final)
    except ScramParseError:
        return None
    if set(values) - {"c", "r", "p"} or "p" not in values:
        return None
    expected_nonce = _attributes(server_first_message)["r"]
    if values.get("r") != expected_nonce:
        return None
    if values.get("c") != base64.b64encode(client.gs2_header.encode()).decode():
        return None  # channel binding data must be the gs2 header alone (no binding offered here)
    without_proof = final[: final.rindex(",p=")]
    auth_message = f"{client.bare},{server_first_message},{without_proof}".encode()
    try:
        proof = base64.b64decode(values["p"], validate=True)
    except ValueError:
        return None
    signature = _hmac(secrets_.stored_key, auth_message)
    if len(proof) != len(signature):
        return None
    client_key = bytes(a ^ b for a, b in zip(proof, signature, strict=True))
    if not hmac.compare_digest(hashlib.sha512(client_key).digest(), secrets_.stored_key):
        return None
    return "v=" + base64.b64encode(_hmac(secrets_.server_key, auth_message)).decode()


def _hmac(key: bytes, message: bytes) -> bytes:
    return hmac.new(key, message, hashlib.sha512).digest()
