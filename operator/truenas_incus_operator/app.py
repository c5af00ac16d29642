"""The operator's parts, wired together once at startup (``handlers.py`` calls ``build``).

Tests build the same graph with a fake Kube, fake backends and their own clock.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from .connections import ConnectionManager, ConnectionResources
from .instances import Deletion, Executor, InstanceLoops, Ledger, Reaper, Reporter, Wakeups
from .instances.resource import EventPoster
from .kube import Kube
from .metrics import Metrics
from .policy import Policy, load_policy
from .settings import Settings
from .status import utc_now


@dataclass
class Operator:
    settings: Settings
    kube: Kube
    connections: ConnectionManager
    connection_resources: ConnectionResources
    wakeups: Wakeups
    ledger: Ledger
    policy: Policy
    loops: InstanceLoops
    deletion: Deletion
    metrics: Metrics
    reaper: Reaper
    _reaping: asyncio.Task[None] | None = None

    def start_reaper(self) -> None:
        """Sweeps the ledger for records whose resource vanished unseen (instances/reaper.py)."""
        if self._reaping is None:
            self._reaping = asyncio.get_running_loop().create_task(self.reaper.run(), name="ledger reaper")

    def serve_metrics(self) -> None:
        """Serves Prometheus metrics when ``TIO_METRICS_PORT`` is set (raises ``OSError`` if it cannot)."""
        if self.settings.metrics_port:
            self.metrics.serve(self.settings.metrics_port, self.settings.metrics_address)

    async def close(self) -> None:
        if self._reaping is not None:
            self._reaping.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaping
            self._reaping = None
        await self.connection_resources.close()
        await self.connections.close()
        await self.kube.close()
        await asyncio.to_thread(self.metrics.stop)


def build(
    settings: Settings,
    kube: Kube,
    post_event: EventPoster,
    clock: Callable[[], datetime] = utc_now,
    policy: Policy | None = None,
    metrics: Metrics | None = None,
) -> Operator:
    """Raises ``PolicyError`` when the policy file cannot be used: never run with a policy other than
    the administrator's."""
    metrics = metrics if metrics is not None else Metrics(connection_names=settings.metrics_connection_names)
    connections = ConnectionManager(
        settings.resync_seconds,
        settings.retry_max_seconds,
        settings.call_timeout_seconds,
        settings.job_timeout_seconds,
        device_audits_per_resync=settings.device_audits_per_resync,
        metrics=metrics,
    )
    wakeups = Wakeups()
    policy = policy if policy is not None else load_policy(settings.policy_file)
    ledger = Ledger(kube, settings.ledger_namespace)
    reporter = Reporter(settings, kube, post_event, clock)
    executor = Executor(ledger, reporter, metrics)
    return Operator(
        settings=settings,
        kube=kube,
        connections=connections,
        connection_resources=ConnectionResources(settings, kube, connections, policy),
        wakeups=wakeups,
        ledger=ledger,
        policy=policy,
        loops=InstanceLoops(settings, connections, wakeups, ledger, reporter, executor, policy, metrics),
        deletion=Deletion(settings, connections, ledger, reporter, executor),
        metrics=metrics,
        reaper=Reaper(kube, connections, ledger, executor),
    )
