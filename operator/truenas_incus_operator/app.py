"""The operator's parts, wired together once at startup (``handlers.py`` calls ``build``).

Tests build the same graph with a fake Kube, fake backends and their own clock.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from .connections import ConnectionManager, ConnectionResources
from .instances import Claims, Deletion, Executor, InstanceLoops, Reporter, Wakeups
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
    claims: Claims
    loops: InstanceLoops
    deletion: Deletion
    policy: Policy

    async def close(self) -> None:
        await self.connection_resources.close()
        await self.connections.close()
        await self.kube.close()


def build(settings: Settings, kube: Kube, post_event: EventPoster, clock: Callable[[], datetime] = utc_now) -> Operator:
    """Raises ``PolicyError`` when the policy file cannot be used: never run with a policy other than
    the administrator's."""
    policy = load_policy(settings.policy_file)
    connections = ConnectionManager(
        settings.resync_seconds, settings.retry_max_seconds, settings.call_timeout_seconds, settings.job_timeout_seconds
    )
    wakeups = Wakeups()
    claims = Claims(wakeups.wake)
    reporter = Reporter(settings, kube, post_event, clock)
    executor = Executor(kube, reporter)
    return Operator(
        settings=settings,
        kube=kube,
        connections=connections,
        connection_resources=ConnectionResources(settings, kube, connections),
        wakeups=wakeups,
        claims=claims,
        loops=InstanceLoops(settings, connections, wakeups, claims, reporter, executor, policy),
        deletion=Deletion(settings, connections, reporter, executor),
        policy=policy,
    )
