"""Prometheus metrics (metrics.py) and the client's observer (truenas/observe.py), with fakes
(tests/fakes.py) and an in-process simulator: no cluster."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import urllib.request
from typing import Any

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from truenas_incus_operator.metrics import Metrics
from truenas_incus_operator.truenas import CallFailed, CallTimeout, InstanceConfig, JobFailed, TransportError
from truenas_incus_operator.truenas.observe import ObservedTransport
from truenas_simulator import Simulator, SimulatorServer

from .fakes import ScriptedTransport, connect_to, fake_operator, resource

KEY = "1-test"


def value(metrics: Metrics, name: str, **labels: str) -> float:
    found = metrics.registry.get_sample_value(name, labels)
    return 0.0 if found is None else found


class Stopped:
    """kopf's DaemonStopped as the loop uses it: falsy until stopped, and awaitable."""

    def __init__(self) -> None:
        self.event = asyncio.Event()

    def __bool__(self) -> bool:
        return self.event.is_set()

    async def wait(self) -> None:
        await self.event.wait()


async def run_until(metrics: Metrics, fake: Any, body: dict[str, Any], passes: float) -> tuple[Stopped, Any]:
    stopped = Stopped()
    task = asyncio.create_task(fake.operator.loops.run(body, stopped))
    for _ in range(200):
        if sum(value(metrics, "tio_reconcile_passes_total", result=r) for r in ("ok", "error")) >= passes:
            break
        await asyncio.sleep(0.01)
    return stopped, task


async def stop(stopped: Stopped, task: Any, fake: Any, body: dict[str, Any]) -> None:
    """As kopf stops a daemon: the flag, then a cancel (cancellation_timeout without a backoff)."""
    stopped.event.set()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.wait_for(task, 5)


# ----- the loops ---------------------------------------------------------------------------------------------
async def test_a_pass_counts_its_result_duration_actions_and_where_the_resource_stands() -> None:
    metrics = Metrics()
    fake = fake_operator(metrics=metrics)
    body = resource(cpu="2")
    stopped, task = await run_until(metrics, fake, body, 1)
    passes = value(metrics, "tio_reconcile_passes_total", result="ok")
    assert passes >= 1, "the create wakes the loop once more (its own cache update): a pass with nothing to do"
    assert value(metrics, "tio_reconcile_duration_seconds_count", result="ok") == passes
    assert value(metrics, "tio_reconcile_passes_total", result="error") == 0
    assert value(metrics, "tio_actions_total", kind="claim", result="ok") == 1
    assert value(metrics, "tio_actions_total", kind="create", result="ok") == 1
    assert value(metrics, "tio_incusinstances", phase="Running") == 1
    assert value(metrics, "tio_incusinstances", phase="Pending") == 0, "every phase is shown, at 0"
    assert value(metrics, "tio_incusinstances_synced", status="True", reason="ReconcileSuccess") == 1
    await stop(stopped, task, fake, body)
    assert value(metrics, "tio_incusinstances", phase="Running") == 0, "a loop that ends takes its resource along"
    assert value(metrics, "tio_incusinstances_synced", status="True", reason="ReconcileSuccess") == 0


async def test_a_failed_pass_counts_as_an_error_with_its_reason_and_the_failed_action() -> None:
    metrics = Metrics()
    fake = fake_operator(metrics=metrics)

    def refuse(call: str) -> None:
        if call.startswith("create"):
            raise CallFailed("[EFAULT] no room on tank", errno.EFAULT, "virt.instance.create")

    fake.backend.on_call = refuse
    body = resource()
    stopped, task = await run_until(metrics, fake, body, 1)
    await stop(stopped, task, fake, body)
    assert value(metrics, "tio_reconcile_passes_total", result="error") >= 1
    assert value(metrics, "tio_reconcile_passes_total", result="ok") == 0
    assert value(metrics, "tio_actions_total", kind="create", result="error") >= 1
    assert value(metrics, "tio_actions_total", kind="create", result="ok") == 0
    assert value(metrics, "tio_incusinstances_synced", status="False", reason="CallFailed") == 0, "forgotten at the end"


async def test_phase_and_reason_move_between_series_instead_of_adding_up() -> None:
    metrics = Metrics()
    status = {"phase": "Creating", "conditions": [{"type": "Synced", "status": "True", "reason": "ReconcileSuccess"}]}
    metrics.resource_status(("apps", "a"), status)
    metrics.resource_status(("apps", "b"), status)
    metrics.resource_status(("apps", "a"), {**status, "phase": "Running"})
    metrics.resource_status(("apps", "a"), {**status, "phase": "Running"})
    assert value(metrics, "tio_incusinstances", phase="Creating") == 1
    assert value(metrics, "tio_incusinstances", phase="Running") == 1
    assert value(metrics, "tio_incusinstances_synced", status="True", reason="ReconcileSuccess") == 2
    odd = {"phase": "Weird", "conditions": [{"type": "Synced", "status": "False", "reason": "has spaces/and 1-test"}]}
    metrics.resource_status(("apps", "b"), odd)
    assert value(metrics, "tio_incusinstances", phase="Unknown") == 1, "no label outside the Phase vocabulary"
    assert value(metrics, "tio_incusinstances_synced", status="False", reason="Other") == 1
    metrics.forget_resource(("apps", "a"))
    metrics.forget_resource(("apps", "b"))
    metrics.forget_resource(("apps", "never-seen"))
    assert value(metrics, "tio_incusinstances", phase="Running") == 0
    assert value(metrics, "tio_incusinstances", phase="Unknown") == 0


# ----- the client's observer -----------------------------------------------------------------------------------
async def test_calls_are_counted_by_method_and_outcome_with_their_latency_and_in_flight() -> None:
    metrics = Metrics()
    inner = ScriptedTransport(
        answers={"virt.instance.query": [], "virt.instance.device_add": TransportError("connection lost")},
        gate=asyncio.Event(),
    )
    transport = ObservedTransport(inner, metrics.truenas("nas", 20))
    pending = [asyncio.create_task(transport.call("virt.instance.query")) for _ in range(3)]
    await asyncio.sleep(0.01)
    assert value(metrics, "tio_truenas_calls_in_flight", connection="nas") == 3
    assert value(metrics, "tio_truenas_calls_limit", connection="nas") == 20
    assert inner.gate is not None
    inner.gate.set()
    await asyncio.gather(*pending)
    with contextlib.suppress(TransportError):
        await transport.call("virt.instance.device_add", "web01", {})
    assert value(metrics, "tio_truenas_calls_in_flight", connection="nas") == 0
    assert value(metrics, "tio_truenas_calls_total", connection="nas", method="virt.instance.query", outcome="ok") == 3
    assert (
        value(
            metrics,
            "tio_truenas_calls_total",
            connection="nas",
            method="virt.instance.device_add",
            outcome="TransportError",
        )
        == 1
    )
    assert value(metrics, "tio_truenas_call_duration_seconds_count", method="virt.instance.query") == 3
    assert transport.name == "websocket" and transport.on_reconnect is inner.on_reconnect, "extras reach the inner one"


async def test_jobs_are_counted_by_final_state_and_a_stamped_job_end_gives_the_event_lag() -> None:
    metrics = Metrics()
    ended_ms = 1_000_000_000_000
    inner = ScriptedTransport(
        answers={
            "virt.instance.stop": JobFailed("stop failed", 12, "FAILED", errno.EFAULT, "virt.instance.stop"),
            "virt.instance.start": CallTimeout("job 13 did not finish in time"),
        },
        job_ends={"virt.instance.create": {"id": 11, "state": "SUCCESS", "time_finished": {"$date": ended_ms}}},
    )
    transport = ObservedTransport(inner, metrics.truenas("nas", 20), clock=lambda: ended_ms / 1000 + 0.3)
    progress: list[dict[str, Any]] = []
    await transport.call_job("virt.instance.create", {"name": "web01"}, on_progress=progress.append)
    assert progress and progress[0]["id"] == 11, "the caller still hears of progress"
    for method in ("virt.instance.stop", "virt.instance.start"):
        with contextlib.suppress(CallFailed, TransportError):
            await transport.call_job(method, "web01")
    jobs = "tio_truenas_jobs_total"
    assert value(metrics, jobs, connection="nas", method="virt.instance.create", state="SUCCESS") == 1
    assert value(metrics, jobs, connection="nas", method="virt.instance.stop", state="FAILED") == 1
    assert value(metrics, jobs, connection="nas", method="virt.instance.start", state="TIMEOUT") == 1
    assert value(metrics, "tio_truenas_job_duration_seconds_count", method="virt.instance.create", state="SUCCESS") == 1
    assert value(metrics, "tio_truenas_event_lag_seconds_count", connection="nas") == 1
    assert abs(value(metrics, "tio_truenas_event_lag_seconds_sum", connection="nas") - 0.3) < 1e-6
    assert value(metrics, "tio_truenas_calls_in_flight", connection="nas") == 0


async def test_rest_has_no_events_so_no_lag_and_instance_events_are_counted_without_one() -> None:
    metrics = Metrics()
    rest = ScriptedTransport(
        name="rest",
        supports_events=False,
        job_ends={"virt.instance.create": {"id": 1, "state": "SUCCESS", "time_finished": {"$date": 1}}},
    )
    await ObservedTransport(rest, metrics.truenas("rest", 20)).call_job("virt.instance.create", {})
    assert value(metrics, "tio_truenas_event_lag_seconds_count", connection="rest") == 0
    ws = ScriptedTransport()
    seen: list[str] = []
    observed = ObservedTransport(ws, metrics.truenas("ws", 20))
    await observed.subscribe("virt.instance.query", lambda msg, ident, fields: seen.append(msg))
    ws.subscriptions["virt.instance.query"]("changed", "web01", {"status": "RUNNING"})
    assert seen == ["changed"]
    assert value(metrics, "tio_truenas_events_total", connection="ws", collection="virt.instance.query") == 1
    assert value(metrics, "tio_truenas_event_lag_seconds_count", connection="ws") == 0
    ws.on_reconnect[0]()
    assert value(metrics, "tio_truenas_reconnects_total", connection="ws") == 1


async def test_connection_state_up_info_and_reconnects_and_forgetting_a_connection() -> None:
    metrics = Metrics()

    class Client:
        system_version = "TrueNAS-26.0.0"
        api_family = "container"
        transport = ScriptedTransport()

    metrics.connection_state("ns/nas", Client())
    assert value(metrics, "tio_truenas_connection_up", connection="ns/nas") == 1
    info = {"connection": "ns/nas", "version": "TrueNAS-26.0.0", "api_family": "container", "transport": "websocket"}
    assert metrics.registry.get_sample_value("tio_truenas_connection_info", info) == 1
    assert value(metrics, "tio_truenas_reconnects_total", connection="ns/nas") == 0
    metrics.connection_state("ns/nas", None)
    assert value(metrics, "tio_truenas_connection_up", connection="ns/nas") == 0
    assert metrics.registry.get_sample_value("tio_truenas_connection_info", info) is None
    metrics.connection_state("ns/nas", Client())
    assert value(metrics, "tio_truenas_reconnects_total", connection="ns/nas") == 1
    metrics.forget_connection("ns/nas")
    assert metrics.registry.get_sample_value("tio_truenas_connection_up", {"connection": "ns/nas"}) is None


async def test_the_client_against_the_simulator_reports_every_call_job_and_job_end() -> None:
    sim = Simulator("25.10", seed=3)
    server = await SimulatorServer(sim).start()
    metrics = Metrics()
    try:
        client = await connect_to(server.ws_url, sim.api_key, observer=metrics.truenas("<default>", 20))
        try:
            await client.instances.create(InstanceConfig(name="web01", type="CONTAINER", image="debian/bookworm"))
            await client.instances.list_instances()
        finally:
            await client.close()
    finally:
        await server.stop()
    calls = "tio_truenas_calls_total"
    assert value(metrics, calls, connection="<default>", method="virt.global.config", outcome="ok") == 1
    assert value(metrics, calls, connection="<default>", method="virt.instance.query", outcome="ok") >= 1
    assert (
        value(metrics, "tio_truenas_jobs_total", connection="<default>", method="virt.instance.create", state="SUCCESS")
        == 1
    )
    assert value(metrics, "tio_truenas_event_lag_seconds_count", connection="<default>") == 1, "25.10 stamps job ends"
    text = generate_latest(metrics.registry).decode()
    assert sim.api_key not in text and sim.api_key.partition("-")[2] not in text
    assert "web01" not in text, "no label names an instance"


# ----- serving ---------------------------------------------------------------------------------------------------
async def test_the_endpoint_serves_the_registry_from_a_thread() -> None:
    metrics = Metrics()
    metrics.actions.labels("create", "ok").inc()
    port = metrics.serve(0, "127.0.0.1")
    try:

        def scrape() -> str:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
                return str(answer.read().decode())

        text = await asyncio.to_thread(scrape)
    finally:
        await asyncio.to_thread(metrics.stop)
    families = {family.name: family for family in text_string_to_metric_families(text)}
    samples = [s for s in families["tio_actions"].samples if s.name == "tio_actions_total"]
    assert [(s.labels, s.value) for s in samples] == [({"kind": "create", "result": "ok"}, 1.0)]
    assert "python_gc_objects_collected" not in families, "only the operator's own registry"


def test_the_grafana_dashboard_queries_only_metrics_the_operator_has() -> None:
    import json
    import re
    from pathlib import Path

    dashboard = json.loads((Path(__file__).parent.parent / "docs" / "grafana-dashboard.json").read_text())
    exposed = {
        sample.name
        for family in text_string_to_metric_families(generate_latest(_populated().registry).decode())
        for sample in family.samples
    }
    queried = set()
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            queried |= set(re.findall(r"\btio_[a-z_]+", target["expr"]))
    assert queried and queried <= exposed, queried - exposed


def _populated() -> Metrics:
    """A Metrics with one value in every family, so every sample name shows."""
    metrics = Metrics()
    observer = metrics.truenas("nas", 20)
    observer.call_started()
    observer.call_finished("virt.instance.query", "ok", 0.01)
    observer.call_started()
    observer.job_finished("virt.instance.create", "SUCCESS", 1.0)
    observer.event_received("core.get_jobs", 0.1)
    observer.reconnected()
    with metrics.reconcile_pass(("apps", "a"), type("S", (), {"failures": 0, "status": {"phase": "Running"}})()):
        pass
    with metrics.action(object()):
        pass

    class Client:
        system_version = "TrueNAS-25.10.1"
        api_family = "virt.instance"
        transport = ScriptedTransport()

    metrics.connection_state("nas", Client())
    metrics.resource_status(("apps", "a"), {"conditions": [{"type": "Synced", "status": "True", "reason": "X"}]})
    return metrics


def test_snapshots_and_restores_are_counted_by_phase_with_bounded_labels() -> None:
    from truenas_incus_operator.metrics import Metrics

    metrics = Metrics()
    value = metrics.registry.get_sample_value
    metrics.holder_phase("incusinstancesnapshots", ("ns", "a"), "Creating")
    metrics.holder_phase("incusinstancesnapshots", ("ns", "a"), "Ready")
    metrics.holder_phase("incusinstancesnapshots", ("ns", "b"), "made-up by a tenant")
    assert value("tio_incusinstancesnapshots", {"phase": "Ready"}) == 1
    assert value("tio_incusinstancesnapshots", {"phase": "Creating"}) == 0
    assert value("tio_incusinstancesnapshots", {"phase": "Unknown"}) == 1
    assert value("tio_incusinstancesnapshots", {"phase": "made-up by a tenant"}) is None
    metrics.holder_phase("incusinstancesnapshots", ("ns", "a"), None)
    assert value("tio_incusinstancesnapshots", {"phase": "Ready"}) == 0
    metrics.holder_phase("incusinstancerestores", ("ns", "a"), "Succeeded")
    assert value("tio_incusinstancerestores", {"phase": "Succeeded"}) == 1
    assert value("tio_incusinstancerestores", {"phase": "RollingBack"}) == 0
    metrics.restore_seconds.observe(3.0)
    assert value("tio_restore_seconds_count") == 1


def test_a_restores_duration_is_measured_from_its_recorded_start() -> None:
    """tio_restore_seconds counts from status.startTime (a restart in between counts whole), by the
    writer's clock; a start that does not parse is not measured."""
    from datetime import UTC, datetime

    from truenas_incus_operator.metrics import Metrics
    from truenas_incus_operator.snapshots import Restorer, StatusWriter

    metrics = Metrics()
    clock = lambda: datetime(2026, 12, 7, 3, 0, 42, tzinfo=UTC)  # noqa: E731
    writer = StatusWriter(None, "incusinstancerestores", lambda *_: None, clock)  # type: ignore[arg-type]
    restorer = Restorer(None, None, None, writer, None, metrics=metrics)  # type: ignore[arg-type]
    restorer._measure("2026-12-07T03:00:00Z")
    restorer._measure("not a time")
    assert metrics.registry.get_sample_value("tio_restore_seconds_count") == 1
    assert metrics.registry.get_sample_value("tio_restore_seconds_sum") == 42.0
