"""Prometheus metrics: what the operator does, what TrueNAS answers, and where resources stand.

One ``Metrics`` per operator (``app.build``), with its own registry, served from a thread by
``prometheus_client``'s HTTP server on ``TIO_METRICS_PORT`` (0 or unset: not served; the chart sets
9090). The event loop only updates values (a lock each, no I/O); the scrape runs in the server's
thread.

Labels are bounded and hold no secret: results, action kinds, TrueNAS method names (literals in the
backends), error class names, job states, phases and Synced reasons (the operator's vocabulary),
and connection labels (``<default>``, or a TrueNASConnection's pseudonym ``tnc-<12 hex>``; its
``namespace/name`` only with ``TIO_METRICS_CONNECTION_NAMES=true``: as many as there are
connections, and all of a connection's series go when it does). No label names an instance or a
resource; histograms carry no connection label except the event lag's.

Metric names are listed in README.md ("Metrics").
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, start_http_server

from .models import Phase, RestorePhase, SnapshotPhase

log = logging.getLogger(__name__)

PASS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
CALL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
JOB_BUCKETS = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 900.0)
RESTORE_BUCKETS = (1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)
LAG_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

LEADER_METRIC = "tio_leader"
LEADER_HELP = "1 in the replica that acts (holds the Lease, or runs without election), 0 in a standby"

ACTION_KINDS: Mapping[str, str] = {
    "Create": "create",
    "Update": "update",
    "Start": "start",
    "Stop": "stop",
    "AddDevice": "device_add",
    "UpdateDevice": "device_update",
    "RemoveDevice": "device_remove",
    "Delete": "delete",
    "Claim": "claim",
    "Adopt": "adopt",
    "Observe": "observe",
    "Unobserve": "unobserve",
}
"""reconcile.py's actions by class name -> the ``kind`` label."""

_REASON = re.compile(r"[A-Za-z][A-Za-z0-9]{0,63}")


def _reason_label(reason: object) -> str:
    """A Synced reason as a label: the operator's CamelCase vocabulary, anything else ``Other``."""
    return reason if isinstance(reason, str) and _REASON.fullmatch(reason) else "Other"


class PassState(Protocol):
    """What a loop remembers between passes (instances/resource.py ``LoopState``), as seen here."""

    failures: int
    status: dict[str, Any]


class _Named(Protocol):
    @property
    def name(self) -> str: ...


class ClientFacts(Protocol):
    """What the info metric shows of a connected ``truenas.TrueNASClient``."""

    @property
    def system_version(self) -> str: ...

    @property
    def api_family(self) -> str: ...

    @property
    def transport(self) -> _Named: ...


SAME_OUTAGE_SECONDS = 60.0
"""A connection that comes back up within this long of its transport's own reconnect recovers from
the same outage (``tio_truenas_reconnects`` counts it once)."""


class Metrics:
    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        connection_names: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``connection_names``: label TrueNASConnections ``namespace/name``; False (the operator's
        default, ``TIO_METRICS_CONNECTION_NAMES``): a pseudonym (``connection_label``)."""
        self.registry = registry if registry is not None else CollectorRegistry()
        self.connection_names = connection_names
        self.clock = clock
        self._series: dict[str, set[tuple[Any, tuple[str, ...]]]] = {}
        """Per connection label: the (metric, label values) it has, so that forgetting it removes all."""
        r = self.registry
        self.passes = Counter(
            "tio_reconcile_passes",
            "Reconcile passes of IncusInstance loops, by result (ok, error; unchanged: nothing it acts on moved "
            "since the last pass that had nothing to do, so none was made)",
            ["result"],
            registry=r,
        )
        self.pass_seconds = Histogram(
            "tio_reconcile_duration_seconds",
            "Duration of a reconcile pass",
            ["result"],
            buckets=PASS_BUCKETS,
            registry=r,
        )
        self.actions = Counter(
            "tio_actions",
            "Actions carried out on TrueNAS (or the ledger), by kind and result",
            ["kind", "result"],
            registry=r,
        )
        self.calls = Counter(
            "tio_truenas_calls",
            "TrueNAS calls (not job calls) by connection, method and outcome (ok or the error's class)",
            ["connection", "method", "outcome"],
            registry=r,
        )
        self.call_seconds = Histogram(
            "tio_truenas_call_duration_seconds",
            "Latency of TrueNAS calls",
            ["method"],
            buckets=CALL_BUCKETS,
            registry=r,
        )
        self.jobs = Counter(
            "tio_truenas_jobs",
            "TrueNAS job calls by connection, method and final state",
            ["connection", "method", "state"],
            registry=r,
        )
        self.job_seconds = Histogram(
            "tio_truenas_job_duration_seconds",
            "Duration of TrueNAS job calls, from the call to the job's end",
            ["method", "state"],
            buckets=JOB_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge(
            "tio_truenas_calls_in_flight",
            "Calls and job calls waiting for TrueNAS's answer",
            ["connection"],
            registry=r,
        )
        self.limit = Gauge(
            "tio_truenas_calls_limit",
            "Most calls in flight allowed per connection (TrueNAS's limit: 20)",
            ["connection"],
            registry=r,
        )
        self.up = Gauge(
            "tio_truenas_connection_up", "1 while the connection is established", ["connection"], registry=r
        )
        self.reconnects = Counter(
            "tio_truenas_reconnects", "Connections re-established after being lost", ["connection"], registry=r
        )
        self.info = Info(
            "tio_truenas_connection", "The TrueNAS version, API family and transport in use", ["connection"], registry=r
        )
        self.events = Counter(
            "tio_truenas_events",
            "Events received from TrueNAS, by connection and collection",
            ["connection", "collection"],
            registry=r,
        )
        self.bases_collected = Counter(
            "tio_vm_bases_collected",
            "Cached VM bases deleted after no VM used them for TIO_VM_BASE_GRACE_SECONDS",
            registry=r,
        )
        self.event_lag = Histogram(
            "tio_truenas_event_lag_seconds",
            "An event's arrival vs the time TrueNAS gives for the change (only job ends carry one)",
            ["connection"],
            buckets=LAG_BUCKETS,
            registry=r,
        )
        self.by_phase = Gauge("tio_incusinstances", "IncusInstances by phase", ["phase"], registry=r)
        self.by_synced = Gauge(
            "tio_incusinstances_synced", "IncusInstances by Synced status and reason", ["status", "reason"], registry=r
        )
        for phase in Phase:
            self.by_phase.labels(phase.value)
        self.snapshots_by_phase = Gauge(
            "tio_incusinstancesnapshots", "IncusInstanceSnapshots by phase", ["phase"], registry=r
        )
        self.restores_by_phase = Gauge(
            "tio_incusinstancerestores", "IncusInstanceRestores by phase", ["phase"], registry=r
        )
        for snapshot_phase in SnapshotPhase:
            self.snapshots_by_phase.labels(snapshot_phase.value)
        for restore_phase in RestorePhase:
            self.restores_by_phase.labels(restore_phase.value)
        self.restore_seconds = Histogram(
            "tio_restore_seconds",
            "From a restore's start (status.startTime) to Succeeded: stop, rollback and start together",
            buckets=RESTORE_BUCKETS,
            registry=r,
        )
        self._holders: dict[tuple[str, Any], str] = {}
        self.leader = Gauge(LEADER_METRIC, LEADER_HELP, registry=r)
        self.leader.set(1)  # a Metrics exists only in the replica that acts
        self._resources: dict[Any, tuple[str, str, str]] = {}
        self._ever_up: set[str] = set()
        self._announced: set[str] = set()
        self._transport_reconnected: dict[str, float] = {}
        """When each connection's transport last re-established itself (``reconnected``)."""
        self._server: Any = None
        self._thread: threading.Thread | None = None

    # ----- IncusInstance loops ---------------------------------------------------------------------
    @contextlib.contextmanager
    def reconcile_pass(self, key: Any, state: PassState) -> Iterator[None]:
        """Around one pass: its result and duration, then where the resource stands."""
        failures = state.failures
        started = time.monotonic()
        yield  # an exception (the daemon stopped) is not a pass
        result = "error" if state.failures > failures else "unchanged" if getattr(state, "unchanged", False) else "ok"
        self.passes.labels(result).inc()
        self.pass_seconds.labels(result).observe(time.monotonic() - started)
        self.resource_status(key, state.status)

    def unchanged_pass(self, seconds: float) -> None:
        """A pass found unnecessary in the loop's timer (instances/loop.py ``_due``)."""
        self.passes.labels("unchanged").inc()
        self.pass_seconds.labels("unchanged").observe(seconds)

    def resource_status(self, key: Any, status: Mapping[str, Any]) -> None:
        phase = status.get("phase")
        synced = next((c for c in status.get("conditions") or [] if c.get("type") == "Synced"), None)
        if not phase and synced is None:
            return  # nothing written yet
        current = (
            str(phase) if phase in set(Phase) else Phase.UNKNOWN.value,
            str(synced.get("status")) if synced and synced.get("status") in ("True", "False") else "Unknown",
            _reason_label(synced.get("reason")) if synced else "None",
        )
        previous = self._resources.get(key)
        if previous == current:
            return
        if previous is not None:
            self._count(previous, -1)
        self._resources[key] = current
        self._count(current, +1)

    def forget_resource(self, key: Any) -> None:
        """The resource's loop ended (deleted, or the operator stops)."""
        previous = self._resources.pop(key, None)
        if previous is not None:
            self._count(previous, -1)

    def _count(self, entry: tuple[str, str, str], delta: int) -> None:
        phase, status, reason = entry
        self.by_phase.labels(phase).inc(delta)
        self.by_synced.labels(status, reason).inc(delta)

    # ----- IncusInstanceSnapshots and IncusInstanceRestores (as their watch events show them) ----------
    def holder_phase(self, plural: str, key: Any, phase: object) -> None:
        """``phase`` None: the object is gone. A phase this version does not write counts as Unknown
        (bounded labels whatever a status says)."""
        snapshots = plural == "incusinstancesnapshots"
        gauge = self.snapshots_by_phase if snapshots else self.restores_by_phase
        known = {p.value for p in (SnapshotPhase if snapshots else RestorePhase)}
        current = None if phase is None else (str(phase) if phase in known else "Unknown")
        previous = self._holders.pop((plural, key), None)
        if previous is not None:
            gauge.labels(previous).dec()
        if current is not None:
            self._holders[(plural, key)] = current
            gauge.labels(current).inc()

    @contextlib.contextmanager
    def action(self, action: object) -> Iterator[None]:
        kind = ACTION_KINDS.get(type(action).__name__, "other")
        try:
            yield
        except BaseException:
            self.actions.labels(kind, "error").inc()
            raise
        self.actions.labels(kind, "ok").inc()

    # ----- connections ---------------------------------------------------------------------------------
    def connection_label(self, connection: str) -> str:
        """The ``connection`` label of a connection key: ``<default>`` as it is; a TrueNASConnection's
        ``namespace/name`` only when names are opted in, else ``tnc-`` and 12 hex digits of its
        SHA-256 (stable across restarts, so dashboards keep their series; not a secret: it confirms
        a guessed name, it does not list names). The operator logs each key's label once."""
        if self.connection_names or "/" not in connection:
            return connection
        return "tnc-" + hashlib.sha256(connection.encode()).hexdigest()[:12]

    def series(self, connection: str, metric: Any, *values: str) -> Any:
        """``metric.labels(connection_label, *values)``, remembered for ``forget_connection``."""
        label = self.connection_label(connection)
        self._series.setdefault(label, set()).add((metric, values))
        return metric.labels(label, *values)

    def truenas(self, connection: str, max_concurrent_calls: int) -> ConnectionObserver:
        """The observer for one connection's client (``truenas.connect(observer=...)``)."""
        if self.connection_label(connection) != connection and connection not in self._announced:
            self._announced.add(connection)
            log.info("metrics: TrueNASConnection %s is labelled %s", connection, self.connection_label(connection))
        self.series(connection, self.limit).set(max_concurrent_calls)
        return ConnectionObserver(self, connection)

    def connection_state(self, connection: str, client: ClientFacts | None) -> None:
        """The connection came up (with ``client``) or was lost (None)."""
        label = self.connection_label(connection)
        if client is None:
            self.series(connection, self.up).set(0)
            with contextlib.suppress(KeyError):
                self.info.remove(label)
            return
        counted = self._transport_reconnected.pop(connection, None)
        if connection in self._ever_up and (counted is None or self.clock() - counted > SAME_OUTAGE_SECONDS):
            self.series(connection, self.reconnects).inc()
        self._ever_up.add(connection)
        self.series(connection, self.up).set(1)
        self.series(connection, self.info).info(
            {"version": client.system_version, "api_family": client.api_family, "transport": client.transport.name}
        )

    def transport_reconnected(self, connection: str) -> None:
        """The transport re-established itself (JSON-RPC). Counted here; the connection coming back up
        soon after (a read failed during the same gap) is the same outage, not a second one."""
        self.series(connection, self.reconnects).inc()
        self._transport_reconnected[connection] = self.clock()

    def forget_connection(self, connection: str) -> None:
        """The connection was closed for good (removed or reconfigured): every series of it goes
        (counters too: a deleted tenant's connection is not listed for ever; Prometheus takes a
        reconfigured connection's restart from zero as a counter reset)."""
        self._ever_up.discard(connection)
        self._transport_reconnected.pop(connection, None)
        label = self.connection_label(connection)
        for metric, values in self._series.pop(label, set()):
            with contextlib.suppress(KeyError):
                metric.remove(label, *values)

    # ----- serving ---------------------------------------------------------------------------------------
    def serve(self, port: int, address: str = "0.0.0.0") -> int:
        """Serves ``/metrics`` from a thread; returns the port (0 picks a free one)."""
        self._server, self._thread = start_http_server(port, address, registry=self.registry)
        bound: int = self._server.server_port
        log.info("serving Prometheus metrics on %s:%d", address, bound)
        return bound

    def stop(self) -> None:
        """Stops serving (blocks up to half a second: call it from a thread)."""
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None


def serve_standby_metrics(port: int, address: str = "0.0.0.0") -> Callable[[], None] | None:
    """A standby's ``/metrics`` (``tio_leader 0`` only), when ``port`` is set; returns the function
    that stops it (blocking: call it from a thread) before the operator serves its own."""
    if not port:
        return None
    registry = CollectorRegistry()
    Gauge(LEADER_METRIC, LEADER_HELP, registry=registry).set(0)
    server, thread = start_http_server(port, address, registry=registry)

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)

    return stop


class ConnectionObserver:
    """A ``truenas.Observer`` for one connection: its calls, jobs and events into ``Metrics``.
    (Structurally: metrics never import the client.)"""

    def __init__(self, metrics: Metrics, connection: str) -> None:
        self.metrics = metrics
        self.connection = connection
        self._in_flight = metrics.series(connection, metrics.in_flight)

    def call_started(self) -> None:
        self._in_flight.inc()

    def call_finished(self, method: str, outcome: str, seconds: float) -> None:
        self._in_flight.dec()
        self.metrics.series(self.connection, self.metrics.calls, method, outcome).inc()
        self.metrics.call_seconds.labels(method).observe(seconds)

    def job_finished(self, method: str, state: str, seconds: float) -> None:
        self._in_flight.dec()
        self.metrics.series(self.connection, self.metrics.jobs, method, state).inc()
        self.metrics.job_seconds.labels(method, state).observe(seconds)

    def event_received(self, collection: str, lag: float | None) -> None:
        self.metrics.series(self.connection, self.metrics.events, collection).inc()
        if lag is not None:
            self.metrics.series(self.connection, self.metrics.event_lag).observe(lag)

    def reconnected(self) -> None:
        self.metrics.transport_reconnected(self.connection)

    def base_collected(self) -> None:
        """The VM backend deleted an unused cached base (backends/vm/bases.py ``collect_bases``)."""
        self.metrics.bases_collected.inc()
