"""Leader election over a ``coordination.k8s.io/v1`` Lease: with ``TIO_LEADER_ELECTION=true`` only
the replica that holds the Lease runs the operator at all (kopf, its watches and finalizers, the
instance loops, status writes, the ownership ledger, connections to TrueNAS, metrics); the others
wait in ``Elector.acquire`` and only answer liveness (and a ``tio_leader 0`` metric).

Why a Lease and not kopf's peering (docs/architecture.md, "Leader election", has the long form):
kopf pauses an operator that sees a peer of higher *or equal* priority, so replicas of one pod
template need distinct priorities, and a restarted pod with a higher priority takes over from a
healthy leader without waiting for it to stop; a paused kopf keeps its startup state (our ledger,
TrueNAS connections, metrics), which is stale when it resumes; and it needs kopf's peering CRD
installed cluster-wide. Here the standby has started nothing, and the winner starts from scratch.

The rules are client-go's (``k8s.io/client-go/tools/leaderelection``):

- a candidate takes the Lease when it has no holder (a leader that stopped cleanly released it), or
  when the holder has not renewed for ``leaseDurationSeconds`` *as measured by the candidate's own
  clock* from the moment it saw the last change (never the holder's ``renewTime``: no clock skew);
- every write is an optimistic update (``resourceVersion``): of two candidates racing, one gets 409;
- the leader renews every retry period. A watchdog *thread* (it does not need the event loop)
  ends the process with ``os._exit`` when no renewal succeeded for ``renew_deadline`` (shorter than
  the duration), counted from the moment the last successful renewal was *sent*: by the time a
  standby may take over (a duration after it *saw* that renewal), the old leader is gone;
- a leader that reads another holder in the Lease exits at once. Losing the Lease always ends the
  process (Kubernetes restarts the container, which comes back as a standby): there is no state
  to unwind and nothing can act after ``os._exit``.
- a leader that stops cleanly (SIGTERM) stops kopf first, then releases the Lease, so the standby
  takes over without waiting for the duration.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web

from .kube import FENCE, Fence, Kube
from .metrics import serve_standby_metrics
from .problems import OperatorError
from .settings import Settings

log = logging.getLogger(__name__)

EXIT_LOST = 1
"""The exit code when the Lease is lost: a failure, so Kubernetes restarts the container."""


def holder_identity(pod_name: str | None) -> str:
    """The pod (or host) name and a random suffix: a container restarted in the same pod is a new
    candidate, never mistaken for the holder that died."""
    return f"{pod_name or socket.gethostname()}_{uuid.uuid4().hex[:8]}"


def _microtime(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _exit_now(reason: str) -> None:
    log.critical("leader election: %s; exiting so that nothing acts without the Lease", reason)
    for handler in logging.getLogger().handlers:
        with contextlib.suppress(Exception):
            handler.flush()
    sys.stderr.flush()
    os._exit(EXIT_LOST)


class Elector:
    def __init__(
        self,
        kube: Kube,
        namespace: str,
        name: str,
        identity: str,
        *,
        duration: float = 15.0,
        renew_deadline: float = 10.0,
        retry: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        if renew_deadline >= duration:
            raise ValueError("the renew deadline must be shorter than the lease duration")
        self.kube = kube
        self.namespace = namespace
        self.name = name
        self.identity = identity
        self.duration = duration
        self.renew_deadline = renew_deadline
        self.retry = retry
        self.clock = clock
        self.wall = wall
        self.holder = ""
        """The holder last read from the Lease ("" when free)."""
        self.leading = False
        self.lost = False
        self.valid_until: float | None = None
        """While leading: the monotonic time after which this process must no longer act."""
        self._observed_version: str | None = None
        self._observed_at = 0.0

    @property
    def where(self) -> str:
        return f"Lease {self.namespace}/{self.name}"

    @property
    def call_timeout(self) -> float:
        """Each Lease read or write gives up after this long: a hung API server must not hold a
        renewal past the renew deadline (the watchdog would end the process first anyway)."""
        return self.renew_deadline / 2

    def proven(self) -> bool:
        """Whether this process may act now: it leads, and its last renewal is recent enough that no
        other candidate can have taken the Lease (re-checked before every write after a pause)."""
        valid_until = self.valid_until
        return self.leading and not self.lost and valid_until is not None and self.clock() <= valid_until

    def fence(self, fence: Fence = FENCE) -> None:
        """Makes ``fence`` refuse writes whenever ``proven()`` is false."""
        fence.arm(self.proven, self.where)

    # ----- one attempt -------------------------------------------------------------------------
    async def try_acquire_or_renew(self) -> bool:
        """One read and at most one write; True when this process holds the Lease afterwards.
        Raises on any failure (a timeout, an API error, a malformed answer): never "held"."""
        async with asyncio.timeout(self.call_timeout):
            return await self._try_acquire_or_renew()

    async def _try_acquire_or_renew(self) -> bool:
        sent = self.clock()
        lease = await self.kube.read_lease(self.namespace, self.name)
        if lease is None:
            created = await self.kube.create_lease(self.namespace, self._manifest(None))
            return created is not None and self._won(created, sent)
        self._observe(lease)
        spec: Mapping[str, Any] = lease.get("spec") or {}
        holder = str(spec.get("holderIdentity") or "")
        if self.leading and holder != self.identity:
            self.lost = True
            return False
        if holder and holder != self.identity:
            duration = float(spec.get("leaseDurationSeconds") or self.duration)
            if self.clock() < self._observed_at + duration:
                return False
            log.info("leader election: %s: %s stopped renewing %.0f s ago; taking over", self.where, holder, duration)
        replaced = await self.kube.replace_lease(self.namespace, self._manifest(lease))
        return replaced is not None and self._won(replaced, sent)

    def _observe(self, lease: Mapping[str, Any]) -> None:
        version = str((lease.get("metadata") or {}).get("resourceVersion") or "")
        holder = str((lease.get("spec") or {}).get("holderIdentity") or "")
        if version != self._observed_version:
            # Measured from when *we* saw the change (after the read), never the holder's clock.
            self._observed_version, self._observed_at = version, self.clock()
        if holder != self.holder and holder != self.identity and not self.leading:
            log.info("leader election: standby; %s is held by %s", self.where, holder or "nobody")
        self.holder = holder

    def _won(self, lease: Mapping[str, Any], sent: float) -> bool:
        self._observe(lease)
        self.valid_until = sent + self.renew_deadline
        if not self.leading:
            log.info("leader election: leading as %s (%s)", self.identity, self.where)
        self.leading = True
        return True

    def _manifest(self, previous: Mapping[str, Any] | None) -> dict[str, Any]:
        now = _microtime(self.wall())
        metadata: dict[str, Any] = {
            "name": self.name,
            "namespace": self.namespace,
            "labels": {"app.kubernetes.io/managed-by": "truenas-incus-operator"},
        }
        old: Mapping[str, Any] = {}
        if previous is not None:
            metadata["resourceVersion"] = (previous.get("metadata") or {}).get("resourceVersion")
            old = previous.get("spec") or {}
        ours = old.get("holderIdentity") == self.identity
        transitions = int(old.get("leaseTransitions") or 0)
        spec = {
            "holderIdentity": self.identity,
            "leaseDurationSeconds": math.ceil(self.duration),
            "acquireTime": old.get("acquireTime") if ours else now,
            "renewTime": now,
            "leaseTransitions": transitions if ours or previous is None else transitions + 1,
        }
        return {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": metadata, "spec": spec}

    # ----- the phases --------------------------------------------------------------------------
    async def acquire(self) -> None:
        """Waits (as a standby) until this process holds the Lease. Any failure of an attempt (an
        ``OperatorError``, a timeout, a malformed Lease) means "not held": it fails closed."""
        while True:
            try:
                if await self.try_acquire_or_renew():
                    return
            except Exception as exc:
                log.warning("leader election: cannot read or write the %s: %s", self.where, _describe(exc))
            await asyncio.sleep(self.retry)

    async def keep(self) -> None:
        """Renews every retry period; returns when another process holds the Lease. A renewal that
        keeps failing is the watchdog's business (``watch``)."""
        while not self.lost:
            await asyncio.sleep(self.retry)
            try:
                await self.try_acquire_or_renew()
            except Exception as exc:
                log.warning("leader election: cannot renew the %s: %s", self.where, _describe(exc))

    def watch(self, interval: float = 0.25) -> threading.Thread:
        """Starts the watchdog thread: ``os._exit`` once ``valid_until`` passes without a renewal."""

        def run() -> None:
            while True:
                time.sleep(interval)
                valid_until = self.valid_until
                if valid_until is not None and self.clock() > valid_until:
                    _exit_now(f"no renewal of the {self.where} for {self.renew_deadline:.0f} s")
                    return  # (only reached when a test replaces _exit_now)

        thread = threading.Thread(target=run, name="lease watchdog", daemon=True)
        thread.start()
        return thread

    async def release(self) -> None:
        """Clears the holder (after the operator stopped) so that a standby takes over at once."""
        self.valid_until = None
        try:
            lease = await self.kube.read_lease(self.namespace, self.name)
            spec: Mapping[str, Any] = (lease or {}).get("spec") or {}
            if lease is None or spec.get("holderIdentity") != self.identity:
                return
            body = self._manifest(lease)
            body["spec"].update(holderIdentity=None, leaseDurationSeconds=1)
            if await self.kube.replace_lease(self.namespace, body) is not None:
                log.info("leader election: released the %s", self.where)
        except Exception as exc:
            log.warning("leader election: cannot release the %s: %s", self.where, _describe(exc))
        finally:
            self.leading = False


def _describe(exc: BaseException | None) -> str:
    if exc is None:
        return "no holder proven"
    if isinstance(exc, OperatorError):
        return exc.problem.message
    if isinstance(exc, TimeoutError):
        return "no answer within the timeout"
    return type(exc).__name__


# ----- the standby's endpoints ---------------------------------------------------------------------
async def _serve_liveness(url: str, elector: Elector) -> web.AppRunner:
    """kopf's liveness endpoint is not running yet: answer it ourselves (a standby is alive)."""
    parts = urlsplit(url)

    async def health(_: web.Request) -> web.Response:
        return web.json_response({"leaderElection": "standby", "holder": elector.holder})

    app = web.Application()
    app.add_routes([web.get(parts.path or "/", health)])
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, parts.hostname or "0.0.0.0", parts.port or 80, reuse_address=True).start()
    return runner


async def run_elected(settings: Settings, liveness: str | None, operator: Callable[[], Awaitable[None]]) -> int:
    """Waits for the Lease, then runs ``operator`` (kopf) while renewing it; releases it after a
    clean stop. Returns the exit code."""
    kube = Kube(settings.kube_timeout_seconds)
    elector = Elector(
        kube,
        settings.ledger_namespace,
        settings.lease_name,
        holder_identity(settings.pod_name),
        duration=settings.lease_duration_seconds,
        renew_deadline=settings.lease_renew_deadline_seconds,
        retry=settings.lease_retry_seconds,
    )
    log.info("leader election: candidate %s for the %s", elector.identity, elector.where)
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    liveness_runner = await _serve_liveness(liveness, elector) if liveness else None
    standby_metrics = serve_standby_metrics(settings.metrics_port, settings.metrics_address)
    try:
        acquiring = asyncio.create_task(elector.acquire())
        stop = asyncio.create_task(stopping.wait())
        await asyncio.wait({acquiring, stop}, return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        if not acquiring.done():
            acquiring.cancel()
            log.info("leader election: stopped while standing by")
            return 0
        failure = acquiring.exception()
        if failure is not None or not elector.proven():
            # Fail closed: never run the operator on an election that did not prove the Lease.
            log.critical(
                "leader election: the %s was not acquired (%s); not starting", elector.where, _describe(failure)
            )
            await kube.close()
            return EXIT_LOST
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        if liveness_runner is not None:
            await liveness_runner.cleanup()
        if standby_metrics is not None:
            await asyncio.to_thread(standby_metrics)
    elector.watch()
    elector.fence()

    async def keep_or_exit() -> None:
        await elector.keep()
        _exit_now(f"the {elector.where} is now held by {elector.holder or 'nobody'}")

    # Created before kopf starts: kopf leaves the tasks that existed before it alone.
    keeper = asyncio.create_task(keep_or_exit())
    try:
        await operator()
    finally:
        keeper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await keeper
        await elector.release()
        await kube.close()
    return 0
