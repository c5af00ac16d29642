"""TrueNAS jobs (truenas-api.md §6), the same on every transport and backend.

The transports differ only in how they learn that a job moved (events or polling); what a
finished job means, and how to find a job that is still running, lives here.
"""

from __future__ import annotations

from typing import Any, Protocol

from .transports.base import error_from_job

FINAL_JOB_STATES = ("SUCCESS", "FAILED", "ABORTED")


def is_finished(job: dict[str, Any]) -> bool:
    return job.get("state") in FINAL_JOB_STATES


def job_result(job: dict[str, Any], job_id: int | None = None) -> Any:
    """A finished job's result; raises the client error for FAILED or ABORTED."""
    if job["state"] == "SUCCESS":
        return job.get("result")
    raise error_from_job(job if job_id is None else {**job, "id": job_id})


class _Caller(Protocol):
    async def call(self, method: str, *params: Any, timeout: float | None = None, idempotent: bool = False) -> Any: ...


async def job_running(transport: _Caller, method: str, name: str) -> bool:
    """Whether a ``method`` job for instance ``name`` is WAITING or RUNNING on TrueNAS."""
    jobs = await transport.call(
        "core.get_jobs", [["method", "=", method], ["state", "in", ["WAITING", "RUNNING"]]], {}, idempotent=True
    )
    return any(
        isinstance(j.get("arguments"), list) and j["arguments"] and (j["arguments"][0] or {}).get("name") == name
        for j in jobs
    )
