"""The simulated middleware: the state it holds, method dispatch (latency, hangs, authorization,
up-front validation, faults, jobs), sessions, counters, and the out-of-band changes of the control API.

Transports (``wire/``) turn requests into ``Simulator.call`` and its exceptions into their wire
formats. What each method does is decided by its family: ``core.py`` (core.*, system.*), ``auth.py``
(auth.*, who may call what) and ``services/`` (virt, container, vm, storage); this module combines
their method tables by profile and gives them the state they share (``context.Middleware``).
"""

from __future__ import annotations

import asyncio
import errno
import inspect
import random
import secrets
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable
from typing import Any

from .arity import check_arity
from .auth import Auth
from .context import CallContext, Handler, Session, SessionSpan
from .core import Core, wait_job
from .errors import CallError, InstanceNotFound, MethodNotFound, ValidationErrors
from .events import EventBus
from .jobs import Job, JobManager
from .profiles import Profile, get_profile
from .services.container import Container, ContainerService, registry_name
from .services.storage import StorageService
from .services.virt import VirtService
from .services.vm import VMService
from .state import DEFAULT_IMAGES, ApiKey, CallCounters, GlobalConfig, Image, Instance, Knobs
from .validation import load_schema, validated

# Job methods whose arguments older versioned endpoints validate before the job exists.
UPFRONT_SCHEMAS = {
    "virt.instance.create": ("virt.instance.create.args", "virt_instance_create"),
    "virt.instance.update": ("virt.instance.update.args", "virt_instance_update"),
}


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
        self.upload_schemes: Counter[str] = Counter()
        """``/_upload`` requests by how they authenticated (``Token``, ``Bearer``, ``Basic``, ``query``):
        how tests tell that a client sent its key, or a token, with a file."""
        self.random = random.Random(seed)
        self.sessions: set[Session] = set()
        self.session_spans: deque[SessionSpan] = deque(maxlen=10_000)
        """The WebSocket sessions opened (the last 10,000), open or closed."""
        self.storage = StorageService(self, in_use=lambda name: self.vms.using(name))
        self.storage.running_on = lambda name: (
            self.vms.using(name) or self.containers.running_on(name) or self.virt.running_on(name)
        )
        self.virt = VirtService(self, self.storage)
        self.containers = ContainerService(self, self.storage)
        self.vms = VMService(self, self.storage)
        self.methods: dict[str, tuple[Handler, bool]] = {}
        self.booted = time.time()
        self.system_uuid = uuid.uuid4().hex
        """What ``system.global.id`` answers: the system's UUID in TrueNAS's database (32 hex digits),
        one per simulator as one per NAS (never seeded: two seeded simulators are still two NAS)."""
        self.hostid = secrets.token_bytes(4)
        """The contents of /etc/hostid, from which ``system.host_id`` is derived."""
        self.ui_certificate: bytes | None = None
        """The certificate (PEM or DER) the UI and API are served with (``system.general``'s
        ui_certificate): SCRAM's channel binding is checked against its hash; None: no binding."""
        self.core = Core(self)
        self.auth = Auth(self)
        self._register()

    @property
    def api_key(self) -> str:
        """The first API key (handy for tests and the CLI banner)."""
        return next(iter(self.api_keys.values())).key

    def _register(self) -> None:
        self.methods = {**self.core.methods(), **self.auth.methods()}
        if self.profile.has_virt:
            self.methods.update(self.virt.methods())
        if self.profile.has_container:
            self.methods.update(self.containers.methods())
        if self.profile.has_vm:
            self.methods.update(self.vms.methods())
        self.methods.update(self.storage.methods())  # datasets and snapshots: every version

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

    # ----- dispatch -------------------------------------------------------------------------------
    async def call(self, session: Session, method: str, params: list[Any], message_id: Any = None) -> Any:
        """Runs one call as the middleware would; raises the middleware's exceptions."""
        self.counters.count(method, params)
        if session.transport == "rest":
            self.counters.over_rest[method] += 1
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
        self.auth.authorize(session, method)
        current = session.api_version in ("current", self.profile.current_api)
        schema = self.profile.schema_version if current else self.profile.schema_for_api(session.api_version)
        ctx = CallContext(session=session, message_id=message_id, schema=schema, prevalidated=False)
        if is_job and not current and method in UPFRONT_SCHEMAS:
            check_arity(method, params, self.profile.api27)
            params = self._validate_upfront(method, params, schema)
            ctx.prevalidated = True
        fault = self._fault(method)
        if not is_job:
            check_arity(method, params, self.profile.api27)  # api_method's wrapper, before the method runs
            if fault:
                raise fault
            result = handler(ctx, params)
            return await result if inspect.isawaitable(result) else result
        try:
            # a job's arguments are accepted inside the job (api/base/decorator.py)
            check_arity(method, params, self.profile.api27)
        except ValidationErrors as too_many:
            fault = too_many
        if fault:
            job = self.jobs.submit(
                method, params, _fail_with(fault), message_id=message_id, credentials=ctx.credentials
            )
        else:
            job = handler(ctx, params)
        if session.legacy_jobs:
            return job.id
        return await wait_job(job)

    def _validate_upfront(self, method: str, params: list[Any], schema: str) -> list[Any]:
        kind, attribute = UPFRONT_SCHEMAS[method]
        index = 0 if method.endswith(".create") else 1
        if len(params) <= index:
            raise ValidationErrors([(attribute, "Field required", errno.EINVAL)])
        adapted = list(params)
        adapted[index] = validated(load_schema(f"{schema}.{kind}"), params[index], attribute)
        return adapted

    def _fault(self, method: str) -> CallError | ValidationErrors | None:
        rate = self.knobs.error_rates.get(method, 0.0)
        if rate and self.random.random() < rate:
            self.counters.faults[f"error:{method}"] += 1
            return CallError(f"Simulated failure of {method} (fault injection)", errno.EIO)
        return None

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

    def set_lease(self, name: str, leased: bool) -> None:
        """A 25.x Incus guest gets (or loses) its DHCP address. No event: TrueNAS's virt events are
        Incus lifecycle events, and an address is not one; a client sees it at its next query."""
        item = self.find(name)
        if isinstance(item, Container):
            raise ValueError("26 containers report no addresses (container.query has none)")
        item.leased = leased

    def renumber(self, name: str) -> None:
        """A 25.x Incus guest's DHCP server hands it another address (its lease ran out). No event, as
        ``set_lease``: a client sees the new address at its next query."""
        item = self.find(name)
        if isinstance(item, Container):
            raise ValueError("26 containers report no addresses (container.query has none)")
        item.lease += 1

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
