"""The operator's parts, wired together once at startup (``handlers.py`` calls ``build``).

Tests build the same graph with a fake Kube, fake backends and their own clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from .connections import ConnectionManager, ConnectionResources
from .instances import Deletion, Executor, Holds, InstanceLoops, Ledger, Reaper, Reporter, Wakeups
from .instances.exposure import Exposer
from .instances.ledger import SCHEDULE_LEDGER_LABEL, SNAPSHOT_LEDGER_LABEL
from .instances.resource import EventPoster
from .instances.schedules import Schedules
from .instances.users import ConnectionUsers
from .kube import Kube
from .metrics import Metrics
from .models import API_GROUP, API_VERSION
from .policy import Policy, load_policy
from .settings import Settings
from .snapshots import RESTORES, SNAPSHOTS, CloneSources, Restorer, SnapshotTaker, StatusWriter, Subjects
from .status import utc_now
from .truenas import Timings

log = logging.getLogger(__name__)


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
    holds: Holds
    snapshot_ledger: Ledger
    schedule_ledger: Ledger
    snapshots: SnapshotTaker
    restores: Restorer
    users: ConnectionUsers
    _background: list[asyncio.Task[None]] = field(default_factory=list)

    def start_background(self, namespaces: Sequence[str] | None) -> None:
        """The ledger's sweep for records whose resource vanished unseen (instances/reaper.py), and the
        LIST of the instances that name each connection (instances/users.py) in ``namespaces`` (None:
        in every namespace)."""
        if not self._background:
            loop = asyncio.get_running_loop()
            self._background.append(loop.create_task(self.reaper.run(), name="ledger reaper"))
            self._background.append(loop.create_task(self.users.load(namespaces), name="connection users"))

    def serve_metrics(self) -> None:
        """Serves Prometheus metrics when ``TIO_METRICS_PORT`` is set (raises ``OSError`` if it cannot)."""
        if self.settings.metrics_port:
            self.metrics.serve(self.settings.metrics_port, self.settings.metrics_address)

    async def close(self) -> None:
        for task in self._background:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._background.clear()
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
        Timings(call=settings.call_timeout_seconds, job=settings.job_timeout_seconds),
        device_audits_per_resync=settings.device_audits_per_resync,
        metrics=metrics,
    )
    wakeups = Wakeups()
    holds = Holds(wakeups.wake, kube)
    policy = policy if policy is not None else load_policy(settings.policy_file)
    ledger = Ledger(kube, settings.ledger_namespace)
    reporter = Reporter(settings, kube, post_event, clock)
    executor = Executor(ledger, reporter, metrics)
    snapshot_ledger = Ledger(kube, settings.ledger_namespace, SNAPSHOT_LEDGER_LABEL)
    schedule_ledger = Ledger(kube, settings.ledger_namespace, SCHEDULE_LEDGER_LABEL)
    schedules = Schedules(schedule_ledger, connections, reporter.post_event, settings.resync_seconds, executor.fence)
    subjects = Subjects(kube, connections, ledger)
    sources = CloneSources(kube, snapshot_ledger, policy, wakeups.wake, ledger)
    exposer = Exposer(kube, settings.resync_seconds)
    return Operator(
        settings=settings,
        kube=kube,
        connections=connections,
        connection_resources=ConnectionResources(settings, kube, connections, policy),
        wakeups=wakeups,
        ledger=ledger,
        policy=policy,
        loops=InstanceLoops(
            settings,
            connections,
            wakeups,
            ledger,
            reporter,
            executor,
            policy,
            metrics,
            holds,
            schedules,
            sources,
            exposer,
        ),
        deletion=Deletion(settings, connections, ledger, reporter, executor, schedules, exposer),
        metrics=metrics,
        reaper=Reaper(kube, connections, ledger, executor),
        holds=holds,
        snapshot_ledger=snapshot_ledger,
        schedule_ledger=schedule_ledger,
        snapshots=SnapshotTaker(
            subjects,
            connections,
            snapshot_ledger,
            holds,
            StatusWriter(kube, SNAPSHOTS, post_event, clock),
            post_event,
            policy,
            sources.snapshot_ready,
        ),
        restores=Restorer(
            kube, subjects, holds, StatusWriter(kube, RESTORES, post_event, clock), post_event, policy, metrics
        ),
        users=ConnectionUsers(kube.list_instance_connections),
    )


# ----- startup preconditions -------------------------------------------------------------------------
@dataclass(frozen=True)
class Need:
    """One permission the operator needs, as a SelfSubjectAccessReview asks it."""

    verb: str
    group: str
    resource: str
    namespace: str = ""
    """"" : in every namespace."""
    name: str = ""
    subresource: str = ""

    def __str__(self) -> str:
        kind = f"{self.resource}/{self.subresource}" if self.subresource else self.resource
        kind = f"{kind}.{self.group}" if self.group else kind
        where = f"in namespace {self.namespace}" if self.namespace else "in every namespace (cluster-wide)"
        return f"{self.verb} {kind}{f' {self.name!r}' if self.name else ''} {where}"


KINDS = ("incusinstances", "truenasconnections", "incusinstancesnapshots", "incusinstancerestores")
SERVED = tuple(plural for kind in KINDS for plural in (kind, f"{kind}/status"))


def needs(settings: Settings, namespaces: Sequence[str] | None, scanning: bool = False) -> list[Need]:
    """What the operator does with the API: kopf watches and patches (finalizers, annotations) both
    kinds; the operator posts Events, patches status and reads Secrets; the ledger's ConfigMaps and
    the election's Lease live in the ledger namespace. ``namespaces`` None: in every namespace.
    ``scanning``: kopf also lists and watches CRDs and namespaces (only for namespace patterns;
    __main__ turns kopf's scanning off otherwise)."""
    found: list[Need] = []
    for namespace in namespaces or [""]:
        for resource in KINDS:
            found += [Need(verb, API_GROUP, resource, namespace) for verb in ("get", "list", "watch", "patch")]
            found.append(Need("patch", API_GROUP, resource, namespace, subresource="status"))
        found.append(Need("get", "", "secrets", namespace))
        found.append(Need("create", "", "events", namespace))
    if scanning:
        found += [Need(v, "apiextensions.k8s.io", "customresourcedefinitions") for v in ("list", "watch")]
        found += [Need(v, "", "namespaces") for v in ("list", "watch")]
    ledger = settings.ledger_namespace
    found += [Need(verb, "", "configmaps", ledger) for verb in ("get", "list", "create", "update", "delete")]
    # The credentials' copies for teardown across restarts (connections/credentials.py): without
    # them a connection works, but a teardown after a restart may find no key.
    found += [Need(verb, "", "secrets", ledger, settings.credentials_secret) for verb in ("get", "update")]
    if settings.leader_election:
        found.append(Need("create", "coordination.k8s.io", "leases", ledger))
        found += [Need(v, "coordination.k8s.io", "leases", ledger, settings.lease_name) for v in ("get", "update")]
    return found


MIN_KUBERNETES = (1, 31)
"""The oldest Kubernetes the CRDs and the chart work on (README "Kubernetes versions"; the chart's
kubeVersion; tests/test_oldest_kubernetes.py runs against it)."""


async def check_preconditions(
    settings: Settings, kube: Kube, namespaces: Sequence[str] | None, scanning: bool = False
) -> list[str]:
    """What keeps the operator from working, each a sentence naming the thing and the fix; [] when
    nothing does. Creates the ledger namespace when it is missing and the operator may create
    namespaces (and says so). Raises ``OperatorError`` when the API server cannot be asked."""
    problems: list[str] = []
    version = await kube.server_version()
    if version is not None and version < MIN_KUBERNETES:
        oldest = ".".join(map(str, MIN_KUBERNETES))
        problems.append(
            f"the API server is Kubernetes {version[0]}.{version[1]}; the oldest this operator supports is {oldest} "
            "(its CRDs' CEL rules use the IP and CIDR libraries, and the chart a ValidatingAdmissionPolicy v1): "
            "upgrade the cluster"
        )
        return problems  # the CRDs would not even apply: nothing else is worth checking
    ledger = settings.ledger_namespace
    if await kube.namespace_exists(ledger) is False:
        if await kube.may("create", "", "namespaces"):
            await kube.create_namespace(ledger)
            log.warning("created namespace %s: the ownership ledger lives there (TIO_LEDGER_NAMESPACE)", ledger)
        else:
            problems.append(
                f"namespace {ledger} does not exist (the ownership ledger lives there, TIO_LEDGER_NAMESPACE): "
                f"create it with `kubectl create namespace {ledger}`"
            )
    served = await kube.served_resources(f"{API_GROUP}/{API_VERSION}")
    missing = [r for r in SERVED if r not in (served or set())]
    if served is None:
        problems.append(
            f"the API server serves no {API_GROUP}/{API_VERSION}: the CRDs are not installed (or are an older "
            "version): `kubectl apply -f crds/` (or the chart's files/crds)"
        )
    elif missing:
        problems.append(
            f"the API server's {API_GROUP}/{API_VERSION} lacks {', '.join(missing)}: the installed CRDs are not "
            "this version's; `kubectl apply -f crds/`"
        )
    denied = [need for need in needs(settings, namespaces, scanning) if not await _may(kube, need)]
    if denied:
        problems.append(
            "the operator's identity may not: " + "; ".join(map(str, denied)) + " (the chart's RBAC grants these)"
        )
    return problems


async def _may(kube: Kube, need: Need) -> bool:
    return await kube.may(need.verb, need.group, need.resource, need.namespace, need.name, need.subresource)
