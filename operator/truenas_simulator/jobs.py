"""TrueNAS jobs (truenas-api.md §6): integer ids, WAITING -> RUNNING -> SUCCESS/FAILED/ABORTED,
one lock per instance, progress and ``core.get_jobs`` events, ``$date`` timestamps."""

from __future__ import annotations

import asyncio
import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from .errors import CallError, ValidationErrors
from .events import EventBus

JobBody = Callable[["Job"], Awaitable[Any]]
FINAL_STATES = ("SUCCESS", "FAILED", "ABORTED")
LOCK_QUEUE_SIZE = 5
KEEP_JOBS = 1000


def now_date() -> dict[str, int]:
    return {"$date": int(time.time() * 1000)}


@dataclass
class Job:
    id: int
    method: str
    arguments: list[Any]
    lock: str | None
    message_ids: list[Any] | None
    credentials: dict[str, Any] | None
    logs: bool = False
    state: str = "WAITING"
    progress: dict[str, Any] = field(default_factory=lambda: {"percent": 0, "description": "", "extra": None})
    result: Any = None
    error: str | None = None
    exception: str | None = None
    exc_info: dict[str, Any] | None = None
    time_started: dict[str, int] = field(default_factory=now_date)
    time_finished: dict[str, int] | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None
    failure: BaseException | None = None
    manager: JobManager | None = None

    def as_dict(self, with_message_ids: bool) -> dict[str, Any]:
        data: dict[str, Any] = {"id": self.id}
        if with_message_ids:
            data["message_ids"] = list(self.message_ids or [])
        data.update(
            {
                "method": self.method,
                "arguments": self.arguments,
                "transient": False,
                "description": None,
                "abortable": False,
                "logs_path": f"/var/log/jobs/{self.id}.log" if self.logs else None,
                "logs_excerpt": "" if self.logs and self.state in FINAL_STATES else None,
                "progress": dict(self.progress),
                "result": self.result,
                "result_encoding_error": None,
                "error": self.error,
                "exception": self.exception,
                "exc_info": self.exc_info,
                "state": self.state,
                "time_started": self.time_started,
                "time_finished": self.time_finished,
                "credentials": self.credentials,
            }
        )
        return data

    def set_progress(self, percent: int | None = None, description: str | None = None) -> None:
        if percent is not None:
            self.progress["percent"] = percent
        if description is not None:
            self.progress["description"] = description
        if self.manager:
            self.manager.changed(self)


@dataclass
class JobManager:
    events: EventBus
    with_message_ids: bool = False
    jobs: dict[int, Job] = field(default_factory=dict)
    next_id: int = 1
    locks: dict[str, asyncio.Lock] = field(default_factory=dict)
    waiting: dict[str, list[Job]] = field(default_factory=dict)

    def changed(self, job: Job, msg: str = "changed") -> None:
        self.events.emit("core.get_jobs", msg, job.id, job.as_dict(self.with_message_ids))

    def submit(
        self,
        method: str,
        arguments: list[Any],
        body: JobBody,
        lock: str | None = None,
        message_id: Any = None,
        credentials: dict[str, Any] | None = None,
        logs: bool = False,
        lock_queue_size: int = LOCK_QUEUE_SIZE,
    ) -> Job:
        """``lock_queue_size``: how many jobs may wait on ``lock`` (the ``@job`` decorator's; the running
        one is not counted). ``JobsQueue.add`` (middlewared/job.py) hands a call beyond it the newest
        waiting job on the lock, *whatever its arguments*, and creates no job of its own: the caller
        gets that job's id, no error, no ``added`` event (for a key with full admin rights, which every
        simulated key has; another user's job would be refused with EBUSY)."""
        if lock is not None:
            queued = self.waiting.setdefault(lock, [])
            if len(queued) >= lock_queue_size:
                last = queued[-1]
                if message_id is not None and last.message_ids is not None:
                    last.message_ids.append(message_id)
                    self.changed(last)  # queued_job.send_changed_event()
                return last
        job = Job(
            id=self.next_id,
            method=method,
            arguments=arguments,
            lock=lock,
            message_ids=[message_id] if message_id is not None else [],
            credentials=credentials,
            logs=logs,
            manager=self,
        )
        self.next_id += 1
        self.jobs[job.id] = job
        while len(self.jobs) > KEEP_JOBS:
            oldest = next(iter(self.jobs))
            if self.jobs[oldest].state not in FINAL_STATES:
                break
            del self.jobs[oldest]
        if lock is not None:
            self.waiting[lock].append(job)
        self.changed(job, "added")
        job.task = asyncio.create_task(self._run(job, body))
        return job

    async def _run(self, job: Job, body: JobBody) -> None:
        lock = self.locks.setdefault(job.lock, asyncio.Lock()) if job.lock else None
        try:
            if lock is not None:
                await lock.acquire()
            try:
                if job.lock:
                    self.waiting[job.lock].remove(job)
                job.state = "RUNNING"
                self.changed(job)
                job.result = await body(job)
                job.state = "SUCCESS"
                if job.progress["percent"] != 100:
                    job.progress["percent"] = 100
            finally:
                if lock is not None and lock.locked():
                    lock.release()
        except asyncio.CancelledError:
            job.state = "ABORTED"
            job.error = "CancelledError()"
            if job.lock and job in self.waiting.get(job.lock, []):
                self.waiting[job.lock].remove(job)
        except Exception as exc:
            job.state = "FAILED"
            job.failure = exc
            job.error = str(exc) or repr(exc)
            job.exception = "".join(traceback.format_exception(exc))
            job.exc_info = exc_info(exc)
        job.time_finished = now_date()
        self.changed(job)
        job.done.set()

    def abort(self, job_id: int) -> None:
        job = self.jobs.get(job_id)
        if job is None:
            raise CallError("Job does not exist", 2)
        if job.task and not job.task.done():
            job.task.cancel()


def exc_info(exc: BaseException) -> dict[str, Any]:
    if isinstance(exc, ValidationErrors):
        errno = exc.errors[0][2] if len(exc.errors) == 1 else None
        return {"repr": _repr(exc), "type": "VALIDATION", "errno": errno, "extra": exc.extra()}
    if isinstance(exc, CallError):
        return {"repr": f"CallError({exc.errmsg!r})", "type": "CallError", "errno": exc.errno, "extra": exc.extra}
    return {"repr": repr(exc), "type": type(exc).__name__, "errno": None, "extra": None}


def _repr(exc: ValidationErrors) -> str:
    inner = ", ".join(f"ValidationError({a!r}, {m!r}, {e})" for a, m, e in exc.errors)
    return f"ValidationErrors([{inner}])"
