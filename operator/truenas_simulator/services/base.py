"""What the API families share: the middleware they are given, jobs submitted for a call and the time
they spend working (``Service``); and what ``container.*`` and ``vm.*`` repeat for their libvirt
domains (``GuestService``): integer ids, lookups, ``*.query`` events, power state and the pid it
brings, the device collection."""

from __future__ import annotations

import asyncio
import errno
from typing import Any, ClassVar, Generic, NoReturn, Protocol, TypeVar

from ..context import CallContext, Handler, Middleware
from ..errors import CallError, InstanceNotFound
from ..filters import check_query_args, filter_list
from ..jobs import LOCK_QUEUE_SIZE, Job, JobBody

Methods = dict[str, tuple[Handler, bool]]
"""Method name -> (handler, whether it is a job), as a family registers them."""


class Service:
    def __init__(self, mw: Middleware) -> None:
        self.mw = mw

    def submit(
        self,
        ctx: CallContext,
        method: str,
        params: list[Any],
        body: JobBody,
        lock: str | None = None,
        lock_queue_size: int = LOCK_QUEUE_SIZE,
        logs: bool = False,
    ) -> Job:
        """A job for the call ``ctx`` (its message id and credentials, as ``core.get_jobs`` shows them)."""
        return self.mw.jobs.submit(
            method,
            params,
            body,
            lock=lock,
            message_id=ctx.message_id,
            credentials=ctx.credentials,
            logs=logs,
            lock_queue_size=lock_queue_size,
        )

    @staticmethod
    def lock_argument(params: list[Any]) -> dict[str, Any]:
        """The first argument of a job whose lock is made from it (``lock=lambda args: ...``): when it
        is not a dict, making the lock fails before any job exists, with the middleware's words."""
        raw = params[0] if params else None
        if not isinstance(raw, dict):
            raise CallError(
                "Error handling job lock. This is most likely caused by invalid call arguments.", errno.EINVAL
            )
        return raw

    async def work(self, job: Job, description: str = "") -> None:
        """The time a job spends in Incus or libvirt; hung methods never come back (until aborted)."""
        if job.method in self.mw.knobs.hung_methods:
            await asyncio.Event().wait()
        duration = self.mw.knobs.job_duration
        if duration > 0:
            steps = 4
            for step in range(steps):
                await asyncio.sleep(duration / steps)
                if description:
                    job.set_progress(None, f"{description}: {int((step + 1) * 100 / steps)}%")
        else:
            await asyncio.sleep(0)


class Guest(Protocol):
    """A container (26) or a VM: what ``GuestService`` reads and writes of it."""

    id: int
    state: str
    pid: int | None
    devices: dict[int, dict[str, Any]]

    @property
    def name(self) -> str: ...

    def device_entry(self, ident: int) -> dict[str, Any]: ...


G = TypeVar("G", bound=Guest)


def is_id(ident: Any) -> bool:
    """An integer id (pydantic's strict int: a bool is not one)."""
    return isinstance(ident, int) and not isinstance(ident, bool)


class GuestService(Service, Generic[G]):
    """``container.*`` and ``vm.*``: guests by integer id, each with devices by integer id."""

    COLLECTION: ClassVar[str]
    """The guests' ``*.query`` collection, also the name ``*.query`` checks its arguments under."""
    DEVICE_COLLECTION: ClassVar[str]
    VERBOSE_NAME: ClassVar[str]
    """The service's ``verbose_name`` in "... does not exist" errors."""
    DEVICE_VERBOSE_NAME: ClassVar[str]
    KIND: ClassVar[str]
    """How "Please stop/resume associated ..." names the guest."""
    ACTIVE_STATES: ClassVar[tuple[str, ...]]
    """The states in which a device may not be deleted."""
    FIRST_PID: ClassVar[int]

    def __init__(self, mw: Middleware) -> None:
        super().__init__(mw)
        self.guests: dict[int, G] = {}
        self.next_id = 1
        self.next_device_id = 1
        self.pid = self.FIRST_PID

    def entry(self, guest: G) -> dict[str, Any]:
        """The guest's ``*.query`` entry."""
        raise NotImplementedError

    # ----- lookups -------------------------------------------------------------------------------
    def get(self, ident: Any) -> G:
        guest = self.guests.get(ident) if is_id(ident) else None
        if guest is None:
            self.not_found(ident)
        return guest

    def not_found(self, ident: Any) -> NoReturn:
        raise InstanceNotFound(self.VERBOSE_NAME, ident)

    def by_name(self, name: str) -> G | None:
        return next((guest for guest in self.guests.values() if guest.name == name), None)

    def device_owner(self, ident: Any) -> G:
        """The guest that has device ``ident``."""
        for guest in self.guests.values():
            if isinstance(ident, int) and ident in guest.devices:
                return guest
        raise InstanceNotFound(self.DEVICE_VERBOSE_NAME, ident)

    # ----- events and power ------------------------------------------------------------------------
    def emit(self, msg: str, guest: G | int) -> None:
        """A ``*.query`` event: ``removed`` with the id only, else with the fresh full entry."""
        if isinstance(guest, int):
            self.mw.events.emit(self.COLLECTION, msg, guest)
        else:
            self.mw.events.emit(self.COLLECTION, msg, guest.id, self.entry(guest))

    def emit_device(self, msg: str, guest: G, ident: int) -> dict[str, Any]:
        """A ``*.device.query`` ``added``/``changed`` event with the device's entry; that entry."""
        entry = guest.device_entry(ident)
        self.mw.events.emit(self.DEVICE_COLLECTION, msg, ident, entry)
        return entry

    def set_state(self, guest: G, state: str) -> None:
        before, guest.state = guest.state, state
        if state == "RUNNING":
            self.pid += 1
            guest.pid = self.pid
            self.started(guest)
        elif self.ends_process(state):
            guest.pid = None
        self.state_changed(guest, before)

    def state_changed(self, guest: G, before: str) -> None:
        """The events a change of state sends: by default one ``changed`` with the fresh full entry
        (Incus's, and libvirt domain events on 26, §4)."""
        self.emit("changed", guest)

    def started(self, guest: G) -> None:
        """What a start records beyond the pid (nothing unless a family says so)."""

    def ends_process(self, state: str) -> bool:
        """Whether entering ``state`` (not RUNNING) ends the guest's process: any state does by default."""
        return True

    # ----- reads -----------------------------------------------------------------------------------
    def query(self, ctx: CallContext, params: list[Any]) -> Any:
        filters, options = check_query_args(params, ctx.schema)
        return filter_list([self.entry(guest) for guest in self.guests.values()], filters, options)

    def get_instance(self, ctx: CallContext, params: list[Any]) -> Any:
        return self.entry(self.get(params[0] if params else None))

    def device_query(self, ctx: CallContext, params: list[Any]) -> Any:
        filters, options = check_query_args(params, ctx.schema)
        entries = [guest.device_entry(i) for guest in self.guests.values() for i in guest.devices]
        return filter_list(entries, filters, options)

    # ----- devices ---------------------------------------------------------------------------------
    def new_device_id(self) -> int:
        ident = self.next_device_id
        self.next_device_id += 1
        return ident

    def check_device_removable(self, guest: G) -> None:
        if guest.state in self.ACTIVE_STATES:
            raise CallError(f"Please stop/resume associated {self.KIND} before deleting {self.KIND} device.")
