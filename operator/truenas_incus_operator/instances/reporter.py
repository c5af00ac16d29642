"""What the loops say: the status they write (through ``status.py``), the Events they post (one
per distinct problem), and how long they wait after a failure (bounded exponential backoff)."""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

from ..kube import Kube
from ..models import JobStatus, Phase
from ..problems import OperatorError, Problem
from ..reconcile import Desired, Plan
from ..settings import Settings
from ..status import applied, as_patch, clip, differs, printable, render_instance, render_invalid_spec
from ..truenas import ObservedInstance
from .resource import PLURAL, EventPoster, LoopState, about

log = logging.getLogger(__name__)
NORMAL_REASONS = frozenset({"Connecting", "SourceNotReady"})
"""Reasons that are a normal step, not a problem: their Event is Normal, not a Warning."""


class Reporter:
    def __init__(self, settings: Settings, kube: Kube, post_event: EventPoster, clock: Callable[[], datetime]) -> None:
        self.settings = settings
        self.kube = kube

        def post_printable(body: Mapping[str, Any], kind: str, reason: str, message: str) -> None:
            post_event(body, kind, reason, printable(message))  # texts and names from TrueNAS are hostile

        self.post_event: EventPoster = post_printable
        self.clock = clock

    async def write(
        self,
        state: LoopState,
        desired: Desired,
        observed: ObservedInstance | None,
        *,
        plan: Plan | None = None,
        problem: Problem | None = None,
        activity: Phase | None = None,
        job: JobStatus | None = None,
        version: str | None = None,
        connected: bool = True,
    ) -> None:
        """Writes the status if it changed; raises ``OperatorError``. Only changes are written: an idle
        operator sends the API server nothing (no heartbeat: 1000 resources cost 200 patches a minute)."""
        now = self.clock()
        status = render_instance(
            desired,
            observed,
            previous=state.status,
            now=now,
            plan=plan,
            problem=problem,
            activity=activity,
            job=job,
            version=version,
            connected=connected,
            snapshots=state.snapshots_view,
            devices=state.observed_devices[1] if desired.observe_only and state.observed_devices else None,
            exposure=state.exposure,
        )
        patch = as_patch(status.model_copy(update={"last_sync_time": now}))
        if not differs(state.status, patch):
            return
        await self.kube.patch_status(PLURAL, desired.namespace, desired.name, patch)
        state.status = applied(state.status, patch)

    async def failed(
        self,
        body: Mapping[str, Any],
        state: LoopState,
        desired: Desired,
        problem: Problem,
        observed: ObservedInstance | None,
        version: str | None,
        connected: bool = True,
    ) -> float:
        """Reports a failed pass; returns the backoff delay. ``connected`` False: TrueNAS could not be
        asked, so the status keeps its last observation (``status.render_instance``). While the
        connection is only being set up (an operator restart), a status that holds an observation is
        left as it is: no Unknown-then-Running flap at every restart."""
        if not connected and problem.reason in NORMAL_REASONS and _holds_observation(state.status):
            return self.backoff(state)
        try:
            await self.write(state, desired, observed, problem=problem, version=version, connected=connected)
        except OperatorError as exc:
            log.warning("cannot write status: %s", exc.problem.message, extra=about(desired.namespace, desired.name))
        except Exception:
            log.exception("cannot write status", extra=about(desired.namespace, desired.name))
        kind = "Normal" if problem.reason in NORMAL_REASONS else "Warning"
        self.post_once(body, state, kind, problem.reason, problem.message)
        return self.backoff(state)

    async def invalid_spec(self, body: Mapping[str, Any], state: LoopState, problem: Problem) -> None:
        meta = body["metadata"]
        generation = int(meta.get("generation") or 0)
        patch = as_patch(render_invalid_spec(state.status, problem, generation, self.clock()))
        if differs(state.status, patch):
            try:
                await self.kube.patch_status(PLURAL, meta["namespace"], meta["name"], patch)
                state.status = applied(state.status, patch)
            except OperatorError as exc:
                log.warning(
                    "cannot write status: %s", exc.problem.message, extra=about(meta["namespace"], meta["name"])
                )
        self.post_once(body, state, "Warning", problem.reason, problem.message)

    def post_once(self, body: Mapping[str, Any], state: LoopState, kind: str, reason: str, message: str) -> None:
        """One Event per distinct problem, not one per retry."""
        if state.posted == (reason, message):
            return
        state.posted = (reason, message)
        self.post_event(body, kind, reason, clip(message, 1024))

    def backoff(self, state: LoopState) -> float:
        state.failures += 1
        return backoff_delay(self.settings, state.failures - 1) * random.uniform(0.8, 1.2)


def backoff_delay(settings: Settings, attempt: int) -> float:
    """``retry_min * 2**attempt``, at most ``retry_max``; never overflows (a NAS gone for days
    fails thousands of times: ``2.0 ** 1024`` raises OverflowError)."""
    exponent = min(max(attempt, 0), 64)
    return float(min(settings.retry_max_seconds, settings.retry_min_seconds * 2.0**exponent))


def _holds_observation(status: Mapping[str, Any]) -> bool:
    return bool(status.get("instanceId") or status.get("binding"))
