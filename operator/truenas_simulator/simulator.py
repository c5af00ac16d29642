"""The simulated middleware: method dispatch, sessions and authentication, jobs, faults, counters.

Transports (``server.py``) turn requests into ``Simulator.call`` and its exceptions into their wire
formats; everything a TrueNAS would decide is decided here.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import inspect
import random
import secrets
import time
import uuid
from collections import deque
from collections.abc import Callable
from typing import Any

from .context import CallContext, Handler, Session, SessionSpan
from .errors import ENOTAUTHENTICATED, CallError, InstanceNotFound, MethodNotFound, ValidationErrors
from .events import EventBus
from .filters import check_query_args, filter_list
from .jobs import Job, JobManager
from .profiles import Profile, get_profile
from .scram import MIN_ITERATIONS, ScramParseError, ScramSecrets, parse_client_first
from .scram import server_first as scram_server_first
from .scram import verify_client_final as scram_verify_client_final
from .services.container import Container, ContainerService, registry_name
from .services.storage import StorageService
from .services.virt import VirtService
from .services.vm import VMService
from .state import DEFAULT_IMAGES, ApiKey, CallCounters, GlobalConfig, Image, Instance, Knobs
from .validation import load_schema, validated

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
# Methods whose id is the instance (CRUD update/delete and the per-instance actions): core.get_methods.
ITEM_METHOD_SUFFIXES = (".update", ".delete", ".start", ".stop", ".restart", ".get_instance")
# Job methods whose arguments older versioned endpoints validate before the job exists.
UPFRONT_SCHEMAS = {
    "virt.instance.create": ("virt.instance.create.args", "virt_instance_create"),
    "virt.instance.update": ("virt.instance.update.args", "virt_instance_update"),
}
FULL_ADMIN_ONLY = frozenset({"filesystem.put", "filesystem.get"})
"""Methods only FULL_ADMIN may call (plugins/filesystem.py: ``roles=['FULL_ADMIN']`` on ``put`` and
``get``, 25.04 to 26): a key with the virtualization roles cannot upload a VM image or seed."""


class Simulator:
    def __init__(
        self,
        profile: Profile | str = "25.10",
        knobs: Knobs | None = None,
        api_keys: list[ApiKey] | None = None,
        images: tuple[Image, ...] = DEFAULT_IMAGES,
        seed: int | None = None,
    ) -> None:
        self.profile = get_profile(profile) if isinstance(profile, str) else profile
        self.knobs = knobs or Knobs()
        self.api_keys = {k.id: k for k in api_keys} if api_keys else {}
        if not self.api_keys:
            key = ApiKey(id=1, secret=secrets.token_hex(32))
            self.api_keys[key.id] = key
        self.images = {image.alias: image for image in images}
        self.instances: dict[str, Instance] = {}
        self.global_config = GlobalConfig()
        self.host_interfaces = {"br0", "enp1s0", "eno1", "bond0"}
        self.events = EventBus()
        self.jobs = JobManager(self.events, with_message_ids=self.profile.message_ids)
        self.counters = CallCounters()
        self.random = random.Random(seed)
        self.sessions: set[Session] = set()
        self.session_spans: deque[SessionSpan] = deque(maxlen=10_000)
        """The WebSocket sessions opened (the last 10,000), open or closed."""
        self.virt = VirtService(self)
        self.containers = ContainerService(self)
        self.storage = StorageService(self, in_use=lambda name: self.vms.using(name))
        self.vms = VMService(self, self.storage)
        self.methods: dict[str, tuple[Handler, bool]] = {}
        self.booted = time.time()
        self.system_uuid = uuid.uuid4().hex
        """What ``system.global.id`` answers: the system's UUID in TrueNAS's database (32 hex digits),
        one per simulator as one per NAS (never seeded: two seeded simulators are still two NAS)."""
        self.hostid = secrets.token_bytes(4)
        """The contents of /etc/hostid, from which ``system.host_id`` is derived."""
        self._scram: dict[int, ScramSecrets] = {}
        self._register()

    @property
    def api_key(self) -> str:
        """The first API key (handy for tests and the CLI banner)."""
        return next(iter(self.api_keys.values())).key

    def _register(self) -> None:
        core: dict[str, Handler] = {
            "core.ping": lambda ctx, p: "pong",
            "core.set_options": self._set_options,
            "core.get_jobs": self._get_jobs,
            "core.job_abort": self._job_abort,
            "core.subscribe": self._subscribe,
            "core.unsubscribe": self._unsubscribe,
            "core.get_methods": self._get_methods,
            "system.version": lambda ctx, p: self.profile.system_version,
            "system.version_short": lambda ctx, p: self.profile.system_version.removeprefix("TrueNAS-"),
            "system.info": self._system_info,
            # plugins/system/globalid.py (READONLY_ADMIN, every supported version): the database's UUID.
            "system.global.id": lambda ctx, p: self.system_uuid,
            # plugins/system/info.py: sha256 hex of /etc/hostid (per machine: HA controllers differ).
            "system.host_id": lambda ctx, p: hashlib.sha256(self.hostid).hexdigest(),
            "auth.login": self._login,
            "auth.login_with_api_key": self._login_with_api_key,
            "auth.login_with_token": self._login_with_token,
            "auth.login_ex": self._login_ex,
            "auth.logout": self._logout,
            "auth.mechanism_choices": self._mechanism_choices,
            "auth.me": self._me,
        }
        self.methods = {name: (handler, False) for name, handler in core.items()}
        self.methods["core.job_wait"] = (self._job_wait, True)
        if self.profile.has_virt:
            self.methods.update(self.virt.methods())
        if self.profile.has_container:
            self.methods.update(self.containers.methods())
        if self.profile.has_vm:
            self.methods.update(self.vms.methods())
            self.methods.update(self.storage.methods())

    async def upload(self, session: Session, method: str, params: list[Any], content: bytes) -> int:
        """``POST /_upload``: the job the ``data`` part names, fed by the ``file`` part; its id."""
        self.counters.count(method)
        if method != "filesystem.put" or not self.profile.has_vm:
            raise MethodNotFound(method)
        if session.api_key is not None and not session.api_key.full_admin:
            raise PermissionError(method)  # the file app's authorize(): HTTP 403 (apps/file_app.py)
        ctx = CallContext(session=session, message_id=None, schema=self.profile.schema_version, prevalidated=False)
        return self.storage.put_job(ctx, params, content).id

    # ----- sessions -------------------------------------------------------------------------------
    def open_session(self, session: Session) -> Session:
        self.sessions.add(session)
        session.span = SessionSpan(session.transport, time.monotonic())
        self.session_spans.append(session.span)
        return session

    def close_session(self, session: Session) -> None:
        for ident in list(session.subscriptions):
            self.events.unsubscribe(ident)
        session.subscriptions.clear()
        self.sessions.discard(session)
        if session.span is not None:
            session.span.closed = time.monotonic()

    def authenticate_key(self, key: Any, session: Session) -> str:
        """Returns SUCCESS, AUTH_ERR or EXPIRED, and marks the session logged in on success."""
        if not isinstance(key, str) or "-" not in key:
            return "AUTH_ERR"
        ident, _, secret = key.partition("-")
        stored = self.api_keys.get(int(ident)) if ident.isdigit() else None
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

    # ----- dispatch -------------------------------------------------------------------------------
    async def call(self, session: Session, method: str, params: list[Any], message_id: Any = None) -> Any:
        """Runs one call as the middleware would; raises the middleware's exceptions."""
        self.counters.count(method)
        if session.span is not None:
            session.span.calls += 1
            if CallCounters.is_write(method):
                now = time.monotonic()
                session.span.writes += 1
                session.span.first_write = session.span.first_write or now
                session.span.last_write = now
        if self.knobs.latency > 0:
            await asyncio.sleep(self.knobs.latency)
        if method in self.knobs.hung_calls or "*" in self.knobs.hung_calls:
            await asyncio.Event().wait()  # hung: never answers (the session's close cancels it)
        entry = self.methods.get(method)
        if entry is None:
            raise MethodNotFound(method)
        handler, is_job = entry
        if method not in UNAUTHENTICATED_METHODS and not session.authenticated:
            raise CallError("Not authenticated", ENOTAUTHENTICATED)
        if session.api_key is not None and session.api_key.readonly and CallCounters.is_write(method):
            raise CallError("Not authorized", errno.EACCES)
        if session.api_key is not None and method in FULL_ADMIN_ONLY and not session.api_key.full_admin:
            raise CallError("Not authorized", errno.EACCES)
        current = session.api_version in ("current", self.profile.current_api)
        schema = self.profile.schema_version if current else self.profile.schema_for_api(session.api_version)
        ctx = CallContext(session=session, message_id=message_id, schema=schema, prevalidated=False)
        if is_job and not current and method in UPFRONT_SCHEMAS:
            params = self._validate_upfront(method, params, schema)
            ctx.prevalidated = True
        fault = self._fault(method)
        if not is_job:
            if fault:
                raise fault
            result = handler(ctx, params)
            return await result if inspect.isawaitable(result) else result
        if fault:
            job = self.jobs.submit(
                method, params, _fail_with(fault), message_id=message_id, credentials=ctx.credentials
            )
        else:
            job = handler(ctx, params)
        if session.legacy_jobs:
            return job.id
        return await self.wait_job(job)

    async def wait_job(self, job: Job) -> Any:
        await job.done.wait()
        if job.state == "SUCCESS":
            return job.result
        if job.failure is not None:
            raise job.failure
        raise CallError("Job aborted", errno.ECANCELED)

    def _validate_upfront(self, method: str, params: list[Any], schema: str) -> list[Any]:
        kind, attribute = UPFRONT_SCHEMAS[method]
        index = 0 if method.endswith(".create") else 1
        if len(params) <= index:
            raise ValidationErrors([(attribute, "Field required", errno.EINVAL)])
        adapted = list(params)
        adapted[index] = validated(load_schema(f"{schema}.{kind}"), params[index], attribute)
        return adapted

    def _fault(self, method: str) -> CallError | None:
        rate = self.knobs.error_rates.get(method, 0.0)
        if rate and self.random.random() < rate:
            self.counters.faults[f"error:{method}"] += 1
            return CallError(f"Simulated failure of {method} (fault injection)", errno.EIO)
        return None

    # ----- core / auth --------------------------------------------------------------------------
    def _options_model(self, session: Session) -> tuple[tuple[str, ...], bool]:
        """Which core.set_options keys the session's endpoint knows, and whether it answers with them.

        Every generation's model ignores unknown keys (``extra="ignore"``). A 25.04 server's model
        (TS-25.04.0 .. TS-25.04.2.6 api/v25_04_*/core.py) knows ``py_exceptions`` only and returns
        null; 25.10 adds ``legacy_jobs`` and returns the options; a 25.10+ server serving an older
        endpoint (/api/v25.04.x) validates with that version's model (``private_methods``,
        ``py_exceptions``) and ``CoreSetOptionsResult.to_previous`` turns the result into null.
        """
        api = session.api_version
        current = api in ("current", self.profile.current_api)
        if not self.profile.legacy_jobs_option:
            return ("py_exceptions",), False
        if not current and api.startswith("v25.04"):
            return ("private_methods", "py_exceptions"), False
        return ("legacy_jobs", "private_methods", "py_exceptions"), True

    def _set_options(self, ctx: CallContext, params: list[Any]) -> Any:
        options = params[0] if params else {}
        if not isinstance(options, dict):
            raise ValidationErrors([("options", "Input should be a valid dictionary", errno.EINVAL)])
        known, answers = self._options_model(ctx.session)
        errors = ValidationErrors()
        for key in known:
            if key in options and not isinstance(options[key], bool):
                errors.add(f"options.{key}", "Input should be a valid boolean")  # strict=True
        errors.check()
        session = ctx.session
        if "legacy_jobs" in known and "legacy_jobs" in options:
            session.legacy_jobs = options["legacy_jobs"]
        if "private_methods" in known and "private_methods" in options:
            session.private_methods = options["private_methods"]
        if "py_exceptions" in options:
            session.py_exceptions = options["py_exceptions"]
        if not answers:
            return None
        return {
            "legacy_jobs": session.legacy_jobs,
            "private_methods": session.private_methods,
            "py_exceptions": session.py_exceptions,
        }

    def _get_jobs(self, ctx: CallContext, params: list[Any]) -> Any:
        filters, options = check_query_args(params, "core.get_jobs")
        with_ids = self.profile.message_ids
        return filter_list([job.as_dict(with_ids) for job in self.jobs.jobs.values()], filters, options)

    def _job_abort(self, ctx: CallContext, params: list[Any]) -> Any:
        job_id = params[0] if params else None
        if not isinstance(job_id, int) or isinstance(job_id, bool):
            raise ValidationErrors([("core.job_abort.id", "Input should be a valid integer", errno.EINVAL)])
        self.jobs.abort(job_id)
        return None

    def _job_wait(self, ctx: CallContext, params: list[Any]) -> Job:
        """``core.job_wait [id]`` is itself a job that ends as the target job does (core_service.py)."""
        job_id = params[0] if params else None

        async def body(job: Job) -> Any:
            if not isinstance(job_id, int) or isinstance(job_id, bool):
                raise ValidationErrors([("core.job_wait.id", "Input should be a valid integer", errno.EINVAL)])
            target = self.jobs.jobs.get(job_id)
            if target is None:
                raise InstanceNotFound("Job with id", job_id)
            return await self.wait_job(target)

        return self.jobs.submit("core.job_wait", params, body, message_id=ctx.message_id, credentials=ctx.credentials)

    def _get_methods(self, ctx: CallContext, params: list[Any]) -> Any:
        """``core.get_methods [service, target]``: metadata of each public method (core_service.py)."""
        service = params[0] if params else None
        if service is not None and not isinstance(service, str):
            raise ValidationErrors([("service", "Input should be a valid string", errno.EINVAL)])
        found: dict[str, Any] = {}
        for name, (_, is_job) in sorted(self.methods.items()):
            if service is not None and name.rpartition(".")[0] != service:
                continue
            found[name] = {
                "description": None,
                "cli_description": "",
                "examples": {},
                "item_method": name.endswith(ITEM_METHOD_SUFFIXES),
                "no_auth_required": name in UNAUTHENTICATED_METHODS,
                "filterable": name.endswith(".query") or name == "core.get_jobs",
                "filterable_schema": None,
                "pass_application": name.startswith(("auth.", "core.")),
                "require_websocket": name in ("core.subscribe", "core.unsubscribe", "auth.logout"),
                "job": is_job,
                "downloadable": False,
                "uploadable": False,
                "check_pipes": False,
                "roles": ["FULL_ADMIN"],
                "accepts": {"type": "array"},
                "returns": {},
            }
        return found

    def _system_info(self, ctx: CallContext, params: list[Any]) -> Any:
        """The 19 keys of ``system.info`` (plugins/system/info.py, the same on 25.04 .. 26.0)."""
        now = time.time()
        up = now - self.booted
        return {
            "version": self.profile.system_version.removeprefix("TrueNAS-"),
            "buildtime": {"$date": int(self.booted * 1000) - 86_400_000},
            "hostname": "truenas",
            "physmem": self.knobs.host_memory,
            "model": "Simulated CPU",
            "cores": self.knobs.host_cores,
            "physical_cores": max(1, self.knobs.host_cores // 2),
            "loadavg": [0.0, 0.0, 0.0],
            "uptime": f"{int(up // 60)} mins",
            "uptime_seconds": up,
            "system_serial": None,
            "system_product": None,
            "system_product_version": None,
            "license": None,
            "boottime": {"$date": int(self.booted * 1000)},
            "datetime": {"$date": int(now * 1000)},
            "timezone": "UTC",
            "system_manufacturer": None,
            "ecc_memory": False,
        }

    def _subscribe(self, ctx: CallContext, params: list[Any]) -> Any:
        name = params[0] if params else None
        if not isinstance(name, str):
            raise ValidationErrors([("core.subscribe.event", "Input should be a valid string", errno.EINVAL)])
        base = name.split(":", 1)[0]
        known = {"core.get_jobs", "*"} | ({"virt.instance.query"} if self.profile.has_virt else set())
        if self.profile.has_container:
            known |= {"container.query", "container.device.query"}
        if self.profile.has_vm:
            known |= {"vm.query", "vm.device.query"}
        if base not in known:
            raise CallError(f"Invalid event name {name!r}", errno.ENOENT)
        if ctx.session.send_event is None:
            raise CallError("Events are only available over WebSocket", errno.EINVAL)
        ident = self.events.subscribe(base, ctx.session.send_event)
        ctx.session.subscriptions.add(ident)
        return ident

    def _unsubscribe(self, ctx: CallContext, params: list[Any]) -> Any:
        ident = params[0] if params else None
        if isinstance(ident, str) and ident in ctx.session.subscriptions:
            self.events.unsubscribe(ident)
            ctx.session.subscriptions.discard(ident)
        return None

    async def refusal_delay(self) -> None:
        """TrueNAS answers a refused credential after uniform(1, 2) s (AAL1 min_fail_delay)."""
        low = self.knobs.auth_fail_delay
        if low > 0:
            await asyncio.sleep(self.random.uniform(low, low + 1))

    def mechanisms(self) -> list[str]:
        return [*PLAIN_MECHANISMS, "SCRAM"] if self.profile.has_container else list(PLAIN_MECHANISMS)

    def _mechanism_choices(self, ctx: CallContext, params: list[Any]) -> Any:
        # 25.04.2 .. 25.10.x read app.authenticated_credentials.may_create_auth_token without a None
        # check, so an anonymous call fails there (fixed in 26; 25.04.0 takes no app at all).
        if not ctx.session.authenticated and self.profile.name in ("25.04.2", "25.10"):
            raise AttributeError("'NoneType' object has no attribute 'may_create_auth_token'")
        return self.mechanisms()

    async def _login_with_api_key(self, ctx: CallContext, params: list[Any]) -> Any:
        if self.authenticate_key(params[0] if params else None, ctx.session) == "SUCCESS":
            return True
        await self.refusal_delay()
        return False

    async def _login(self, ctx: CallContext, params: list[Any]) -> Any:
        """``auth.login [username, password, otp?]``: the simulator has no password accounts."""
        if len(params) < 2 or not all(isinstance(p, str) for p in params[:2]):
            raise ValidationErrors([("auth.login.password", "Field required", errno.EINVAL)])
        await self.refusal_delay()
        return False

    async def _login_with_token(self, ctx: CallContext, params: list[Any]) -> Any:
        """``auth.login_with_token [token]``: the simulator hands out no tokens, so none is valid."""
        if not params or not isinstance(params[0], str):
            raise ValidationErrors([("auth.login_with_token.token", "Field required", errno.EINVAL)])
        await self.refusal_delay()
        return False

    def _logout(self, ctx: CallContext, params: list[Any]) -> Any:
        """``auth.logout``: drops the session's subscriptions and credentials, answers true."""
        session = ctx.session
        for ident in list(session.subscriptions):
            self.events.unsubscribe(ident)
        session.subscriptions.clear()
        session.authenticated, session.api_key, session.scram = False, None, None
        return True

    async def _login_ex(self, ctx: CallContext, params: list[Any]) -> Any:
        data = params[0] if params else None
        mechanism = data.get("mechanism") if isinstance(data, dict) else None
        tags = (*LOGIN_EX_MODEL_TAGS, "SCRAM") if self.profile.has_container else LOGIN_EX_MODEL_TAGS
        if not isinstance(data, dict) or mechanism not in tags:
            expected = ", ".join(f"'{t}'" for t in tags)
            raise ValidationErrors(
                [
                    (
                        "auth.login_ex.login_data",
                        f"Input tag '{mechanism}' found using 'mechanism' does not match any of the expected "
                        f"tags: {expected}",
                        errno.EINVAL,
                    )
                ]
            )
        session = ctx.session
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
        else:  # PASSWORD_PLAIN, TOKEN_PLAIN: no such accounts or tokens here
            outcome = "AUTH_ERR"
        if outcome != "SUCCESS":
            await self.refusal_delay()
            return {"response_type": outcome}
        user_info = self._me(ctx, []) if (data.get("login_options") or {}).get("user_info", True) else None
        response: dict[str, Any] = {"response_type": "SUCCESS", "user_info": user_info, "authenticator": "LEVEL_1"}
        if self.profile.has_container:  # reconnect_token arrived with 26's model (api/v26_0_0/auth.py)
            response["reconnect_token"] = None
        return response

    def scram_secrets(self, key: ApiKey) -> ScramSecrets:
        """The key's SCRAM secrets, made on first use (PBKDF2 is slow on purpose)."""
        iterations = max(self.knobs.scram_iterations, MIN_ITERATIONS)
        cached = self._scram.get(key.id)
        if cached is None or cached.iterations != iterations:
            cached = self._scram[key.id] = ScramSecrets.derive(key.secret, iterations)
        return cached

    async def _login_scram(self, ctx: CallContext, data: dict[str, Any]) -> Any:
        """SCRAM-SHA-512 over two ``auth.login_ex`` calls (plugins/auth.py, auth_/login_ex_impl.py)."""
        session = ctx.session
        scram_type = data.get("scram_type")
        rfc_str = data.get("rfc_str")
        if scram_type not in ("CLIENT_FIRST_MESSAGE", "CLIENT_FINAL_MESSAGE") or not isinstance(rfc_str, str):
            raise ValidationErrors(
                [
                    (
                        "auth.login_ex.login_data.SCRAM.scram_type",
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
            key = self.api_keys.get(first.api_key_id) if first is not None else None
            refused = (
                first is None
                or key is None
                or key.revoked
                or key.username != first.username
                or (first.gs2_header.startswith("p=") and not session.secure)
                or first.gs2_header.startswith("p=")  # the simulator offers no channel binding
            )
            if refused or key is None or first is None:
                await self.refusal_delay()
                return {"response_type": "AUTH_ERR"}
            secrets_ = self.scram_secrets(key)
            message = scram_server_first(first, secrets_)
            session.scram = (first, message, secrets_)
            return {
                "response_type": "SCRAM_RESPONSE",
                "scram_type": "SERVER_FIRST_RESPONSE",
                "rfc_str": message,
                "user_info": None,
            }
        if session.scram is None:
            raise CallError("SCRAM authentication is not in progress")
        first, message, secrets_ = session.scram
        session.scram = None
        verdict = scram_verify_client_final(first, message, rfc_str, secrets_)
        key = self.api_keys.get(first.api_key_id)
        if verdict is None or key is None or key.revoked:
            await self.refusal_delay()
            return {"response_type": "AUTH_ERR"}
        session.authenticated, session.api_key = True, key
        return {
            "response_type": "SCRAM_RESPONSE",
            "scram_type": "SERVER_FINAL_RESPONSE",
            "rfc_str": verdict,
            "user_info": self._me(ctx, []),
        }

    def _me(self, ctx: CallContext, params: list[Any]) -> Any:
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

    # ----- out-of-band changes (the control API) --------------------------------------------------
    def seed_instance(self, **fields: Any) -> Any:
        """An instance made outside the operator (a virt instance on 25.x, a container on 26)."""
        image = self.images[fields.pop("image", "debian/bookworm")]
        if self.profile.has_container:
            status = fields.pop("status", "STOPPED")
            fields.pop("type", None)
            container = Container(
                id=self.containers.next_id, image=registry_name(image), version=image.serial, **fields
            )
            self.containers.next_id += 1
            self.containers.containers[container.id] = container
            if status == "RUNNING":
                self.containers.set_state(container, "RUNNING")
            self.containers.emit("added", container)
            return container
        instance = Instance(image=image, **fields)
        self.instances[instance.name] = instance
        self.virt.emit("added", instance.name, instance.entry(self.profile))
        return instance

    def entry_of(self, item: Any) -> dict[str, Any]:
        return item.entry() if isinstance(item, Container) else item.entry(self.profile)

    def find(self, name: str) -> Any:
        if self.profile.has_container:
            container = self.containers.by_name(name)
            if container is None:
                raise InstanceNotFound("Container", name)
            return container
        return self.virt.get(name)

    def set_power(self, name: str, status: str) -> Any:
        item = self.find(name)
        if isinstance(item, Container):
            self.containers.set_state(item, "RUNNING" if status == "RUNNING" else "STOPPED")
        else:
            self.virt.set_status(item, status)
        return item

    def change_instance(self, name: str, fields: dict[str, Any]) -> Any:
        item = self.find(name)
        for key, value in fields.items():
            if not hasattr(item, key) or key in ("name", "image", "type", "id"):
                raise ValueError(f"cannot change {key!r}")
            setattr(item, key, value)
        if isinstance(item, Container):
            self.containers.emit("changed", item)
        else:
            self.virt.emit("changed", name, item.entry(self.profile))
        return item

    def remove_instance(self, name: str) -> None:
        item = self.find(name)
        if isinstance(item, Container):
            del self.containers.containers[item.id]
            self.containers.emit("removed", item.id)
        else:
            del self.instances[name]
            self.virt.emit("removed", name)

    def names(self) -> set[str]:
        if self.profile.has_container:
            return {c.name for c in self.containers.containers.values()}
        return set(self.instances)

    def upgrade(self, profile: str = "26.0") -> list[str]:
        """Turns this TrueNAS into ``profile`` as an upgrade and reboot would; 26 migrates Incus containers.

        The server should drop its connections afterwards (the middleware restarted).
        """
        target = get_profile(profile)
        log: list[str] = []
        if target.has_container and not self.profile.has_container:
            log = self.containers.migrate(self.instances)
            self.instances = {}
        self.profile = target
        self.jobs.with_message_ids = target.message_ids
        self._register()
        return log


def _fail_with(error: Exception) -> Callable[[Job], Any]:
    async def body(job: Job) -> Any:
        raise error

    return body
