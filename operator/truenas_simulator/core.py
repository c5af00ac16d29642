"""The middleware's own methods: ``core.*`` (options, jobs, subscriptions, method metadata, ping)
and ``system.*`` (version, info, the NAS's identity)."""

from __future__ import annotations

import errno
import hashlib
import time
from collections.abc import Mapping
from typing import Any, Protocol

from .auth import UNAUTHENTICATED_METHODS
from .context import CallContext, Handler, Middleware, Session
from .errors import CallError, InstanceNotFound, ValidationErrors
from .filters import check_query_args, filter_list
from .jobs import Job

# Methods whose id is the instance (CRUD update/delete and the per-instance actions): core.get_methods.
ITEM_METHOD_SUFFIXES = (".update", ".delete", ".start", ".stop", ".restart", ".get_instance")


class CoreHost(Middleware, Protocol):
    """What ``core.*`` and ``system.*`` read beyond a service's view: the registered methods (for
    ``core.get_methods``) and the NAS's identity and boot time."""

    @property
    def methods(self) -> Mapping[str, tuple[Handler, bool]]: ...

    booted: float
    system_uuid: str
    hostid: bytes


async def wait_job(job: Job) -> Any:
    """What a job ends with: its result, or the exception it failed with (``Job aborted`` if aborted)."""
    await job.done.wait()
    if job.state == "SUCCESS":
        return job.result
    if job.failure is not None:
        raise job.failure
    raise CallError("Job aborted", errno.ECANCELED)


class Core:
    def __init__(self, mw: CoreHost) -> None:
        self.mw = mw

    def methods(self) -> dict[str, tuple[Handler, bool]]:
        mw = self.mw
        plain: dict[str, Handler] = {
            "core.ping": lambda ctx, p: "pong",
            "core.set_options": self.set_options,
            "core.get_jobs": self.get_jobs,
            "core.job_abort": self.job_abort,
            "core.subscribe": self.subscribe,
            "core.unsubscribe": self.unsubscribe,
            "core.get_methods": self.get_methods,
            "system.version": lambda ctx, p: mw.profile.system_version,
            "system.version_short": lambda ctx, p: mw.profile.system_version.removeprefix("TrueNAS-"),
            "system.info": self.system_info,
            # plugins/system/globalid.py (READONLY_ADMIN, every supported version): the database's UUID.
            "system.global.id": lambda ctx, p: mw.system_uuid,
            # plugins/system/info.py: sha256 hex of /etc/hostid (per machine: HA controllers differ).
            "system.host_id": lambda ctx, p: hashlib.sha256(mw.hostid).hexdigest(),
        }
        return {**{name: (handler, False) for name, handler in plain.items()}, "core.job_wait": (self.job_wait, True)}

    def _options_model(self, session: Session) -> tuple[tuple[str, ...], bool]:
        """Which core.set_options keys the session's endpoint knows, and whether it answers with them.

        Every generation's model ignores unknown keys (``extra="ignore"``). A 25.04 server's model
        (TS-25.04.0 .. TS-25.04.2.6 api/v25_04_*/core.py) knows ``py_exceptions`` only and returns
        null; 25.10 adds ``legacy_jobs`` and returns the options; a 25.10+ server serving an older
        endpoint (/api/v25.04.x) validates with that version's model (``private_methods``,
        ``py_exceptions``) and ``CoreSetOptionsResult.to_previous`` turns the result into null.
        """
        api = session.api_version
        current = api in ("current", self.mw.profile.current_api)
        if not self.mw.profile.legacy_jobs_option:
            return ("py_exceptions",), False
        if not current and api.startswith("v25.04"):
            return ("private_methods", "py_exceptions"), False
        return ("legacy_jobs", "private_methods", "py_exceptions"), True

    def set_options(self, ctx: CallContext, params: list[Any]) -> Any:
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

    def get_jobs(self, ctx: CallContext, params: list[Any]) -> Any:
        filters, options = check_query_args(params, ctx.schema)
        with_ids = self.mw.profile.message_ids
        return filter_list([job.as_dict(with_ids) for job in self.mw.jobs.jobs.values()], filters, options)

    def job_abort(self, ctx: CallContext, params: list[Any]) -> Any:
        job_id = params[0] if params else None
        if not isinstance(job_id, int) or isinstance(job_id, bool):
            raise ValidationErrors([("id", "Input should be a valid integer", errno.EINVAL)])
        self.mw.jobs.abort(job_id)
        return None

    def job_wait(self, ctx: CallContext, params: list[Any]) -> Job:
        """``core.job_wait [id]`` is itself a job that ends as the target job does (core_service.py)."""
        job_id = params[0] if params else None

        async def body(job: Job) -> Any:
            if not isinstance(job_id, int) or isinstance(job_id, bool):
                raise ValidationErrors([("id", "Input should be a valid integer", errno.EINVAL)])
            target = self.mw.jobs.jobs.get(job_id)
            if target is None:
                raise InstanceNotFound("Job with id", job_id)
            return await wait_job(target)

        return self.mw.jobs.submit(
            "core.job_wait", params, body, message_id=ctx.message_id, credentials=ctx.credentials
        )

    def get_methods(self, ctx: CallContext, params: list[Any]) -> Any:
        """``core.get_methods [service, target]``: metadata of each public method (core_service.py)."""
        service = params[0] if params else None
        if service is not None and not isinstance(service, str):
            raise ValidationErrors([("service", "Input should be a valid string", errno.EINVAL)])
        found: dict[str, Any] = {}
        for name, (_, is_job) in sorted(self.mw.methods.items()):
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

    def system_info(self, ctx: CallContext, params: list[Any]) -> Any:
        """The 19 keys of ``system.info`` (plugins/system/info.py, the same on 25.04 .. 26.0)."""
        now = time.time()
        up = now - self.mw.booted
        return {
            "version": self.mw.profile.system_version.removeprefix("TrueNAS-"),
            "buildtime": {"$date": int(self.mw.booted * 1000) - 86_400_000},
            "hostname": "truenas",
            "physmem": self.mw.knobs.host_memory,
            "model": "Simulated CPU",
            "cores": self.mw.knobs.host_cores,
            "physical_cores": max(1, self.mw.knobs.host_cores // 2),
            "loadavg": [0.0, 0.0, 0.0],
            "uptime": f"{int(up // 60)} mins",
            "uptime_seconds": up,
            "system_serial": None,
            "system_product": None,
            "system_product_version": None,
            "license": None,
            "boottime": {"$date": int(self.mw.booted * 1000)},
            "datetime": {"$date": int(now * 1000)},
            "timezone": "UTC",
            "system_manufacturer": None,
            "ecc_memory": False,
        }

    def subscribe(self, ctx: CallContext, params: list[Any]) -> Any:
        name = params[0] if params else None
        if not isinstance(name, str):
            raise ValidationErrors([("event", "Input should be a valid string", errno.EINVAL)])
        base = name.split(":", 1)[0]
        known = {"core.get_jobs", "*"} | ({"virt.instance.query"} if self.mw.profile.has_virt else set())
        if self.mw.profile.has_container:
            known |= {"container.query", "container.device.query"}
        if self.mw.profile.has_vm:
            known |= {"vm.query", "vm.device.query"}
        if base not in known:
            raise CallError(f"Invalid event name {name!r}", errno.ENOENT)
        if ctx.session.send_event is None:
            raise CallError("Events are only available over WebSocket", errno.EINVAL)
        ident = self.mw.events.subscribe(base, ctx.session.send_event)
        ctx.session.subscriptions.add(ident)
        return ident

    def unsubscribe(self, ctx: CallContext, params: list[Any]) -> Any:
        ident = params[0] if params else None
        if isinstance(ident, str) and ident in ctx.session.subscriptions:
            self.mw.events.unsubscribe(ident)
            ctx.session.subscriptions.discard(ident)
        return None
