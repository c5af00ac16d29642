"""The simulated middleware: method dispatch, sessions and authentication, jobs, faults, counters.

Transports (``server.py``) turn requests into ``Simulator.call`` and its exceptions into their wire
formats; everything a TrueNAS would decide is decided here.
"""

from __future__ import annotations

import asyncio
import errno
import random
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .container import Container, ContainerService, registry_name
from .errors import ENOTAUTHENTICATED, CallError, InstanceNotFound, MethodNotFound, ValidationErrors
from .events import EventBus
from .filters import check_query_args, filter_list
from .jobs import Job, JobManager
from .profiles import Profile, get_profile
from .state import DEFAULT_IMAGES, ApiKey, CallCounters, GlobalConfig, Image, Instance, Knobs
from .validation import load_schema, validate
from .virt import VirtService

UNAUTHENTICATED_METHODS = frozenset(
    {"core.ping", "core.set_options", "auth.login", "auth.login_with_api_key", "auth.login_ex", "auth.login_with_token"}
)
# Job methods whose arguments older versioned endpoints validate before the job exists.
UPFRONT_SCHEMAS = {
    "virt.instance.create": ("virt.instance.create.args", "virt_instance_create"),
    "virt.instance.update": ("virt.instance.update.args", "virt_instance_update"),
}


@dataclass(eq=False)
class Session:
    """One WebSocket connection, or one REST request."""

    transport: str = "websocket"
    api_version: str = "current"
    secure: bool = True
    loopback: bool = True
    authenticated: bool = False
    api_key: ApiKey | None = None
    legacy_jobs: bool = True
    send_event: Callable[[dict[str, Any]], None] | None = None
    subscriptions: set[str] = field(default_factory=set)
    close: Callable[[], None] | None = None


@dataclass
class CallContext:
    session: Session
    message_id: Any
    schema: str
    prevalidated: bool

    @property
    def credentials(self) -> dict[str, Any] | None:
        key = self.session.api_key
        if key is None:
            return None
        return {
            "type": "API_KEY",
            "data": {
                "username": key.username,
                "login_id": f"sim-{key.id}",
                "api_key": {"id": key.id, "name": key.name},
            },
        }


Handler = Callable[[CallContext, list[Any]], Any]


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
        self.virt = VirtService(self)
        self.containers = ContainerService(self)
        self.methods: dict[str, tuple[Handler, bool]] = {}
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
            "system.version": lambda ctx, p: self.profile.system_version,
            "system.version_short": lambda ctx, p: self.profile.system_version.removeprefix("TrueNAS-"),
            "auth.login_with_api_key": self._login_with_api_key,
            "auth.login_ex": self._login_ex,
            "auth.me": self._me,
        }
        self.methods = {name: (handler, False) for name, handler in core.items()}
        if self.profile.has_virt:
            virt = self.virt
            jobs: dict[str, Handler] = {
                "virt.instance.create": virt.create,
                "virt.instance.update": virt.update,
                "virt.instance.delete": virt.delete,
                "virt.instance.start": virt.start,
                "virt.instance.stop": virt.stop,
                "virt.instance.restart": virt.restart,
            }
            plain: dict[str, Handler] = {
                "virt.instance.query": virt.query,
                "virt.instance.get_instance": virt.get_instance,
                "virt.instance.image_choices": virt.image_choices,
                "virt.instance.device_list": virt.device_list,
                "virt.instance.device_add": virt.device_add,
                "virt.instance.device_update": virt.device_update,
                "virt.instance.device_delete": virt.device_delete,
                "virt.global.config": virt.global_config,
            }
            if self.profile.set_bootable_disk:
                plain["virt.instance.set_bootable_disk"] = virt.set_bootable_disk
            self.methods.update({name: (handler, True) for name, handler in jobs.items()})
            self.methods.update({name: (handler, False) for name, handler in plain.items()})
        if self.profile.has_container:
            c = self.containers
            self.methods.update({"container.create": (c.create, True), "container.stop": (c.stop, True)})
            container_plain: dict[str, Handler] = {
                "container.query": c.query,
                "container.get_instance": c.get_instance,
                "container.update": c.update,
                "container.delete": c.delete,
                "container.start": c.start,
                "container.device.query": c.device_query,
                "container.device.create": c.device_create,
                "container.device.update": c.device_update,
                "container.device.delete": c.device_delete,
                "container.image.query_registry": c.query_registry,
                "lxc.config": c.lxc_config,
            }
            self.methods.update({name: (handler, False) for name, handler in container_plain.items()})

    # ----- sessions -------------------------------------------------------------------------------
    def open_session(self, session: Session) -> Session:
        self.sessions.add(session)
        return session

    def close_session(self, session: Session) -> None:
        for ident in list(session.subscriptions):
            self.events.unsubscribe(ident)
        session.subscriptions.clear()
        self.sessions.discard(session)

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
        if self.knobs.latency > 0:
            await asyncio.sleep(self.knobs.latency)
        entry = self.methods.get(method)
        if entry is None:
            raise MethodNotFound(method)
        handler, is_job = entry
        if method not in UNAUTHENTICATED_METHODS and not session.authenticated:
            raise CallError("Not authenticated", ENOTAUTHENTICATED)
        if session.api_key is not None and session.api_key.readonly and CallCounters.is_write(method):
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
            return handler(ctx, params)
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
        value, errors = validate(load_schema(f"{schema}.{kind}"), params[index], attribute)
        if errors:
            raise ValidationErrors([(a, m, errno.EINVAL) for a, m in errors])
        adapted = list(params)
        adapted[index] = value
        return adapted

    def _fault(self, method: str) -> CallError | None:
        rate = self.knobs.error_rates.get(method, 0.0)
        if rate and self.random.random() < rate:
            self.counters.faults[f"error:{method}"] += 1
            return CallError(f"Simulated failure of {method} (fault injection)", errno.EIO)
        return None

    # ----- core / auth --------------------------------------------------------------------------
    def _set_options(self, ctx: CallContext, params: list[Any]) -> Any:
        options = params[0] if params else {}
        if not isinstance(options, dict):
            raise ValidationErrors([("core.set_options.options", "Input should be a valid dictionary", errno.EINVAL)])
        allowed = (
            {"py_exceptions", "legacy_jobs", "private_methods"}
            if self.profile.legacy_jobs_option
            else {"py_exceptions"}
        )
        for key in options:
            if key not in allowed:
                raise ValidationErrors(
                    [(f"core.set_options.options.{key}", "Extra inputs are not permitted", errno.EINVAL)]
                )
        if not self.profile.legacy_jobs_option:
            return None
        if "legacy_jobs" in options:
            ctx.session.legacy_jobs = bool(options["legacy_jobs"])
        return {"legacy_jobs": ctx.session.legacy_jobs, "private_methods": False, "py_exceptions": False}

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

    def _subscribe(self, ctx: CallContext, params: list[Any]) -> Any:
        name = params[0] if params else None
        if not isinstance(name, str):
            raise ValidationErrors([("core.subscribe.event", "Input should be a valid string", errno.EINVAL)])
        base = name.split(":", 1)[0]
        known = {"core.get_jobs", "*"} | ({"virt.instance.query"} if self.profile.has_virt else set())
        if self.profile.has_container:
            known |= {"container.query", "container.device.query"}
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

    def _login_with_api_key(self, ctx: CallContext, params: list[Any]) -> Any:
        return self.authenticate_key(params[0] if params else None, ctx.session) == "SUCCESS"

    def _login_ex(self, ctx: CallContext, params: list[Any]) -> Any:
        data = params[0] if params else None
        if not isinstance(data, dict) or data.get("mechanism") != "API_KEY_PLAIN":
            raise ValidationErrors(
                [("auth.login_ex.login_data", "The simulator supports the API_KEY_PLAIN mechanism", 22)]
            )
        outcome = self.authenticate_key(data.get("api_key"), ctx.session)
        key = ctx.session.api_key
        if outcome == "SUCCESS" and key is not None and data.get("username") not in (None, key.username):
            ctx.session.authenticated, ctx.session.api_key = False, None
            outcome = "AUTH_ERR"
        if outcome != "SUCCESS":
            return {"response_type": outcome}
        user_info = self._me(ctx, []) if (data.get("login_options") or {}).get("user_info", True) else None
        return {"response_type": "SUCCESS", "user_info": user_info, "authenticator": "LEVEL_1"}

    def _me(self, ctx: CallContext, params: list[Any]) -> Any:
        key = ctx.session.api_key
        return {"pw_name": key.username if key else None, "pw_uid": 0, "privilege": {"roles": {"$set": ["FULL_ADMIN"]}}}

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
                self.containers._set_state(container, "RUNNING")
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
            self.containers._set_state(item, "RUNNING" if status == "RUNNING" else "STOPPED")
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
