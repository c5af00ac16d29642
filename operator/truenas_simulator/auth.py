"""Authentication: API keys, the ``auth.*`` login methods (plain mechanisms and SCRAM-SHA-512 over
two ``auth.login_ex`` calls), ``auth.me``, and which methods a session may call at all.

The SCRAM primitives (RFC 5802 messages, proofs) are in ``scram.py``; this is the exchange.
"""

from __future__ import annotations

import asyncio
import errno
import random
import secrets
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Protocol

from .context import CallContext, Handler, Middleware, Session
from .errors import ENOTAUTHENTICATED, CallError, ValidationErrors
from .scram import MIN_ITERATIONS, ScramParseError, ScramSecrets, parse_client_first, tls_server_end_point
from .scram import server_first as scram_server_first
from .scram import verify_client_final as scram_verify_client_final
from .state import ApiKey, CallCounters

UNAUTHENTICATED_METHODS = frozenset(
    {
        "core.ping",
        "core.set_options",
        "auth.login",
        "auth.login_with_api_key",
        "auth.login_ex",
        "auth.login_with_token",
        "auth.mechanism_choices",
    }
)
# auth.login_ex mechanisms per API generation (utils/auth.py AA_LEVEL1, in this order).
PLAIN_MECHANISMS = ("API_KEY_PLAIN", "TOKEN_PLAIN", "PASSWORD_PLAIN")
LOGIN_EX_MODEL_TAGS = ("API_KEY_PLAIN", "PASSWORD_PLAIN", "TOKEN_PLAIN", "OTP_TOKEN")
FULL_ADMIN_ONLY = frozenset({"filesystem.put", "filesystem.get"})
"""Methods only FULL_ADMIN may call (plugins/filesystem.py: ``roles=['FULL_ADMIN']`` on ``put`` and
``get``, 25.04 to 26): a key with the virtualization roles cannot upload a VM image or seed."""


@dataclass
class Token:
    """One ``auth.generate_token`` token (plugins/auth.py ``TokenManager``/``Token``): valid while
    ``time.monotonic() < last_used + ttl``; it stands for the credentials of the session that made it
    (their root, when that session was itself logged in with a token)."""

    token: str
    ttl: int
    attributes: dict[str, Any]
    api_key: ApiKey
    single_use: bool
    last_used: float = field(default_factory=time.monotonic)

    def valid(self) -> bool:
        return time.monotonic() < self.last_used + self.ttl


class AuthHost(Middleware, Protocol):
    """What authentication reads beyond a service's view: the keys, the random source of the
    refusal delay (seeded with the simulator), and the certificate the UI and API are served with."""

    api_keys: dict[int, ApiKey]
    random: random.Random
    ui_certificate: bytes | None


class Auth:
    def __init__(self, mw: AuthHost) -> None:
        self.mw = mw
        self._scram: dict[int, ScramSecrets] = {}
        self.mechanisms_tried: Counter[str] = Counter()
        """Login attempts by mechanism (``auth.login_ex``'s, and ``LEGACY_API_KEY`` for
        ``auth.login_with_api_key``): how tests tell that a client never sent its key in clear."""
        self.tokens: dict[str, Token] = {}

    def methods(self) -> dict[str, tuple[Handler, bool]]:
        handlers: dict[str, Handler] = {
            "auth.login": self.login,
            "auth.login_with_api_key": self.login_with_api_key,
            "auth.login_with_token": self.login_with_token,
            "auth.generate_token": self.generate_token,
            "auth.login_ex": self.login_ex,
            "auth.logout": self.logout,
            "auth.mechanism_choices": self.mechanism_choices,
            "auth.me": self.me,
        }
        return {name: (handler, False) for name, handler in handlers.items()}

    def authorize(self, session: Session, method: str) -> None:
        """Refuses a call the session may not make: not logged in, read-only, or not FULL_ADMIN."""
        if method not in UNAUTHENTICATED_METHODS and not session.authenticated:
            raise CallError("Not authenticated", ENOTAUTHENTICATED)
        if session.api_key is not None and session.api_key.readonly and CallCounters.is_write(method):
            raise CallError("Not authorized", errno.EACCES)
        if session.api_key is not None and method in FULL_ADMIN_ONLY and not session.api_key.full_admin:
            raise CallError("Not authorized", errno.EACCES)

    def authenticate_key(self, key: Any, session: Session) -> str:
        """Returns SUCCESS, AUTH_ERR or EXPIRED, and marks the session logged in on success."""
        if not isinstance(key, str) or "-" not in key:
            return "AUTH_ERR"
        ident, _, secret = key.partition("-")
        stored = self.mw.api_keys.get(int(ident)) if ident.isdigit() else None
        if stored is None or not secrets.compare_digest(stored.secret, secret):
            return "AUTH_ERR"
        if stored.revoked:
            return "EXPIRED"
        if not session.secure and not session.loopback and session.transport == "websocket":
            # TrueNAS revokes a key sent in clear text over the network (truenas-api.md §2.1).
            stored.revoked = True
            return "EXPIRED"
        session.authenticated = True
        session.api_key = stored
        return "SUCCESS"

    async def refusal_delay(self) -> None:
        """TrueNAS answers a refused credential after uniform(1, 2) s (AAL1 min_fail_delay)."""
        low = self.mw.knobs.auth_fail_delay
        if low > 0:
            await asyncio.sleep(self.mw.random.uniform(low, low + 1))

    def mechanisms(self) -> list[str]:
        return [*PLAIN_MECHANISMS, "SCRAM"] if self.mw.profile.has_container else list(PLAIN_MECHANISMS)

    def mechanism_choices(self, ctx: CallContext, params: list[Any]) -> Any:
        # 25.04.2 .. 25.10.x read app.authenticated_credentials.may_create_auth_token without a None
        # check, so an anonymous call fails there (fixed in 26; 25.04.0 takes no app at all).
        if not ctx.session.authenticated and self.mw.profile.name in ("25.04.2", "25.10"):
            raise AttributeError("'NoneType' object has no attribute 'may_create_auth_token'")
        return self.mechanisms()

    async def login_with_api_key(self, ctx: CallContext, params: list[Any]) -> Any:
        self.mechanisms_tried["LEGACY_API_KEY"] += 1
        if self.authenticate_key(params[0] if params else None, ctx.session) == "SUCCESS":
            return True
        await self.refusal_delay()
        return False

    async def login(self, ctx: CallContext, params: list[Any]) -> Any:
        """``auth.login [username, password, otp?]``: the simulator has no password accounts."""
        # AuthLoginArgs (api/v*/auth.py): username, password, otp_token=None; errors at the field's name.
        errors = ValidationErrors()
        for index, name in enumerate(("username", "password")):
            if len(params) <= index:
                errors.add(name, "Field required")
            elif not isinstance(params[index], str):
                errors.add(name, "Input should be a valid string")
        errors.check()
        await self.refusal_delay()
        return False

    async def login_with_token(self, ctx: CallContext, params: list[Any]) -> Any:
        """``auth.login_with_token [token]``: ``login_ex`` with TOKEN_PLAIN, answering whether it logged in
        (plugins/auth.py)."""
        if not params or not isinstance(params[0], str):
            raise ValidationErrors([("token", "Field required", errno.EINVAL)])
        if self._login_token(params[0], ctx.session):
            return True
        await self.refusal_delay()
        return False

    def generate_token(self, ctx: CallContext, params: list[Any]) -> Any:
        """``auth.generate_token [ttl=600, attrs={}, match_origin=true, single_use=false]`` -> the token
        (plugins/auth.py ``generate_token``, api/v*/auth.py ``AuthGenerateTokenArgs``; 25.04 .. 26).

        ``ttl`` null is 600. Every session here is local, so ``match_origin`` always matches. The
        token logs a session in (``auth.login_with_token``, ``login_ex`` TOKEN_PLAIN) and authenticates
        ``/_upload`` (``Authorization: Token``, ``?auth_token=``) when it has no ``attrs``."""
        defaults: list[Any] = [600, {}, True, False]
        ttl, attrs, match_origin, single_use = [*params, *defaults[len(params) :]][:4]
        errors = ValidationErrors()
        if ttl is not None and (isinstance(ttl, bool) or not isinstance(ttl, int)):
            errors.add("ttl", "Input should be a valid integer")
        if not isinstance(attrs, dict):
            errors.add("attrs", "Input should be a valid dictionary")
        for name, value in (("match_origin", match_origin), ("single_use", single_use)):
            if not isinstance(value, bool):
                errors.add(name, "Input should be a valid boolean")
        errors.check()
        key = ctx.session.api_key
        if key is None:
            raise CallError("Not authenticated", ENOTAUTHENTICATED)
        token = Token(secrets.token_urlsafe(48), 600 if ttl is None else ttl, dict(attrs), key, single_use)
        self.tokens[token.token] = token
        return token.token

    def _token(self, value: Any) -> Token | None:
        token = self.tokens.get(value) if isinstance(value, str) else None
        if token is not None and not token.valid():
            del self.tokens[token.token]
            return None
        return token

    def _login_token(self, value: Any, session: Session) -> bool:
        """TOKEN_PLAIN (plugins/auth.py login_ex): a known, unexpired token without attributes logs the
        session in as its credentials; a single-use one is then destroyed."""
        token = self._token(value)
        if token is None or token.attributes or token.api_key.revoked:
            return False
        session.authenticated, session.api_key = True, token.api_key
        token.last_used = time.monotonic()
        if token.single_use:
            del self.tokens[token.token]
        return True

    def token_for_action(self, value: str, method: str) -> ApiKey | None:
        """``auth.get_token_for_action`` for the file app: the token's credentials when it is valid, has
        no attributes and they may call ``method``; a single-use token is used up."""
        token = self._token(value)
        if token is None or token.attributes or token.api_key.revoked:
            return None
        if method in FULL_ADMIN_ONLY and not token.api_key.full_admin:
            return None
        if token.single_use:
            del self.tokens[token.token]
        return token.api_key

    def logout(self, ctx: CallContext, params: list[Any]) -> Any:
        """``auth.logout``: drops the session's subscriptions and credentials, answers true."""
        session = ctx.session
        for ident in list(session.subscriptions):
            self.mw.events.unsubscribe(ident)
        session.subscriptions.clear()
        session.authenticated, session.api_key, session.scram = False, None, None
        return True

    async def login_ex(self, ctx: CallContext, params: list[Any]) -> Any:
        data = params[0] if params else None
        mechanism = data.get("mechanism") if isinstance(data, dict) else None
        tags = (*LOGIN_EX_MODEL_TAGS, "SCRAM") if self.mw.profile.has_container else LOGIN_EX_MODEL_TAGS
        if isinstance(data, dict) and "mechanism" not in data:
            # validate_model: a union_tag_not_found error is located at the discriminator, "Field required".
            raise ValidationErrors([("login_data.mechanism", "Field required", errno.EINVAL)])
        if not isinstance(data, dict) or mechanism not in tags:
            expected = ", ".join(f"'{t}'" for t in tags)
            raise ValidationErrors(
                [
                    (
                        "login_data",
                        f"Input tag '{mechanism}' found using 'mechanism' does not match any of the expected "
                        f"tags: {expected}",
                        errno.EINVAL,
                    )
                ]
            )
        session = ctx.session
        self.mechanisms_tried[str(mechanism)] += 1
        if mechanism != "SCRAM":
            session.scram = None  # another mechanism abandons an exchange in progress
        if mechanism == "OTP_TOKEN":
            raise CallError("OTP_TOKEN: no authentication in progress", errno.EINVAL)
        if mechanism == "SCRAM":
            return await self._login_scram(ctx, data)
        if mechanism == "API_KEY_PLAIN":
            outcome = self.authenticate_key(data.get("api_key"), session)
            key = session.api_key
            if outcome == "SUCCESS" and key is not None and data.get("username") != key.username:
                session.authenticated, session.api_key = False, None
                outcome = "AUTH_ERR"
        elif mechanism == "TOKEN_PLAIN":
            outcome = "SUCCESS" if self._login_token(data.get("token"), session) else "AUTH_ERR"
        else:  # PASSWORD_PLAIN: no password accounts here
            outcome = "AUTH_ERR"
        if outcome != "SUCCESS":
            await self.refusal_delay()
            return {"response_type": outcome}
        user_info = self.me(ctx, []) if (data.get("login_options") or {}).get("user_info", True) else None
        response: dict[str, Any] = {"response_type": "SUCCESS", "user_info": user_info, "authenticator": "LEVEL_1"}
        if self.mw.profile.has_container:  # reconnect_token arrived with 26's model (api/v26_0_0/auth.py)
            response["reconnect_token"] = None
        return response

    def scram_secrets(self, key: ApiKey) -> ScramSecrets:
        """The key's SCRAM secrets, made on first use (PBKDF2 is slow on purpose)."""
        iterations = max(self.mw.knobs.scram_iterations, MIN_ITERATIONS)
        cached = self._scram.get(key.id)
        if cached is None or cached.iterations != iterations:
            cached = self._scram[key.id] = ScramSecrets.derive(key.secret, iterations)
        return cached

    def channel_binding(self) -> bytes | None:
        """The ``tls-server-end-point`` value of the UI certificate, as middlewared publishes it for
        pam_truenas (etc_files/pam_keyring.py); None when no certificate is configured."""
        certificate = self.mw.ui_certificate
        return tls_server_end_point(certificate) if certificate else None

    async def _login_scram(self, ctx: CallContext, data: dict[str, Any]) -> Any:
        """SCRAM-SHA-512 over two ``auth.login_ex`` calls (plugins/auth.py ``login_ex``,
        auth_/login_ex_impl.py ``login_ex_scram``, utils/account/authenticator.py
        ``ScramPamAuthenticator``; TS-26.0.0-BETA.3). A refusal at either step is AUTH_ERR."""
        session = ctx.session
        extra = sorted(set(data) - {"mechanism", "scram_type", "rfc_str"})
        if extra:  # AuthSCRAM has these three; the API's BaseModel forbids extras (api/base/model.py)
            raise ValidationErrors(
                [(f"login_data.SCRAM.{key}", "Extra inputs are not permitted", errno.EINVAL) for key in extra]
            )
        scram_type = data.get("scram_type")
        rfc_str = data.get("rfc_str")
        if scram_type not in ("CLIENT_FIRST_MESSAGE", "CLIENT_FINAL_MESSAGE") or not isinstance(rfc_str, str):
            raise ValidationErrors(
                [
                    (
                        "login_data.SCRAM.scram_type",
                        "Input should be 'CLIENT_FIRST_MESSAGE' or 'CLIENT_FINAL_MESSAGE'",
                        errno.EINVAL,
                    )
                ]
            )
        if scram_type == "CLIENT_FIRST_MESSAGE":
            session.scram = None
            try:
                first = parse_client_first(rfc_str)
            except ScramParseError:
                first = None
            key = self.mw.api_keys.get(first.api_key_id) if first is not None else None
            if (
                first is None
                or key is None
                or key.revoked
                or key.username != first.username
                # ScramPamAuthenticator.handle_first_message: binding only over TLS (origin.ssl),
                # since the value checked is the hash of a public certificate.
                or (first.wants_binding and not session.secure)
            ):
                await self.refusal_delay()
                return {"response_type": "AUTH_ERR"}
            secrets_ = self.scram_secrets(key)
            server = scram_server_first(first, secrets_)
            session.scram = (first, server, secrets_)
            return {
                "response_type": "SCRAM_RESPONSE",
                "scram_type": "SERVER_FIRST_RESPONSE",
                "rfc_str": server.message,
                "user_info": None,
            }
        if session.scram is None:
            raise CallError("SCRAM authentication is not in progress")
        first, server, secrets_ = session.scram
        session.scram = None
        verdict = scram_verify_client_final(
            first,
            server,
            rfc_str,
            secrets_,
            self.channel_binding(),
            wrong_signature=self.mw.knobs.scram_wrong_signature,
        )
        key = self.mw.api_keys.get(first.api_key_id)
        if verdict is None or key is None or key.revoked:
            await self.refusal_delay()
            return {"response_type": "AUTH_ERR"}
        session.authenticated, session.api_key = True, key
        return {
            "response_type": "SCRAM_RESPONSE",
            "scram_type": "SERVER_FINAL_RESPONSE",
            "rfc_str": verdict,
            "user_info": self.me(ctx, []),
        }

    def me(self, ctx: CallContext, params: list[Any]) -> Any:
        """``auth.me``: user.get_user_obj's 10 keys plus privilege, account_attributes, attributes and
        two_factor_config (api/v*/auth.py AuthUserInfo, plugins/auth.py ``me``)."""
        key = ctx.session.api_key
        username = key.username if key else "root"
        root = username == "root"
        admin = key is None or not key.readonly
        return {
            "pw_name": username,
            "pw_gecos": "root" if root else username,
            "pw_dir": "/root" if root else f"/home/{username}",
            "pw_shell": "/usr/bin/zsh",
            "pw_uid": 0 if root else 3000,
            "pw_gid": 0 if root else 3000,
            "grouplist": [0, 544] if root else [3000, 544],
            "sid": None,
            "source": "LOCAL",
            "local": True,
            "attributes": {},
            "two_factor_config": {
                "provisioning_uri": None,
                "secret_configured": False,
                "interval": 30,
                "otp_digits": 6,
            },
            "privilege": {
                "roles": {"$set": list(key.role_names) if key else ["FULL_ADMIN"]},
                "allowlist": [{"method": "*", "resource": "*"}] if admin and (key is None or key.full_admin) else [],
                "web_shell": admin,
                "webui_access": True,
            },
            "account_attributes": ["LOCAL", "SYS_ADMIN", "API_KEY"] if root else ["LOCAL", "API_KEY"],
        }
