"""The operator's parts, wired together once at startup (``handlers.py`` calls ``build``).

Tests build the same graph with a fake Kube, fake backends and their own clock.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from .connections import ConnectionManager, ConnectionResources
from .instances import Deletion, Executor, InstanceLoops, Ledger, Reporter, Wakeups
from .instances.resource import EventPoster
from .kube import Kube
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

    async def close(self) -> None:
        await self.connection_resources.close()
        await self.connections.close()
        await self.kube.close()


def build(
    settings: Settings,
    kube: Kube,
    post_event: EventPoster,
    clock: Callable[[], datetime] = utc_now,
    policy: Policy | None = None,
) -> Operator:
    """Raises ``PolicyError`` when the policy file cannot be used: never run with a policy other than
    the administrator's."""
    connections = ConnectionManager(
        settings.resync_seconds, settings.retry_max_seconds, settings.call_timeout_seconds, settings.job_timeout_seconds
    )
    wakeups = Wakeups()
    policy = policy if policy is not None else load_policy(settings.policy_file)
    ledger = Ledger(kube, settings.ledger_namespace)
    reporter = Reporter(settings, kube, post_event, clock)
    executor = Executor(ledger, reporter)
    return Operator(
        settings=settings,
        kube=kube,
        connections=connections,
        connection_resources=ConnectionResources(settings, kube, connections),
        wakeups=wakeups,
        ledger=ledger,
        policy=policy,
        loops=InstanceLoops(settings, connections, wakeups, ledger, reporter, executor, policy),
        deletion=Deletion(settings, connections, ledger, reporter, executor),
    )
