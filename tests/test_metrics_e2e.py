"""The metrics endpoint end to end: the operator as a subprocess with TIO_METRICS_PORT, scraped during a
create, an update and a delete, its counts checked against the simulator's call counters with
prometheus-client's own parser."""

from __future__ import annotations

import socket
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from .conftest import Cluster, module_prefix
from .harness import (
    ADOPT_ANYWHERE,
    Harness,
    OperatorProcess,
    operator_env,
    start_simulator,
    unique,
    wait_until,
    write_policy,
)

pytestmark = pytest.mark.e2e

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class Scraper:
    def __init__(self, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}/metrics"

    def text(self) -> str:
        with urllib.request.urlopen(self.url, timeout=5) as answer:
            return str(answer.read().decode())

    def reachable(self) -> bool:
        try:
            self.text()
        except OSError:
            return False
        return True

    def samples(self) -> Samples:
        return {
            (sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(self.text())
            for sample in family.samples
        }

    def value(self, name: str, **labels: str) -> float:
        return self.samples().get((name, frozenset(labels.items())), 0.0)

    def total(self, name: str, **labels: str) -> float:
        """The sum over every series of ``name`` whose labels include ``labels``."""
        wanted = set(labels.items())
        return sum(v for (n, have), v in self.samples().items() if n == name and wanted <= have)


@pytest.fixture(scope="module")
def running(
    cluster: Cluster, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[tuple[Harness, Scraper]]:
    workdir: Path = tmp_path_factory.mktemp("metrics")
    sim = start_simulator("25.10", job_duration=0.05)
    port = free_port()
    env = {
        **operator_env(sim, workdir, TIO_METRICS_PORT=str(port), TIO_METRICS_ADDRESS="127.0.0.1"),
        **write_policy(workdir, ADOPT_ANYWHERE),
    }
    operator = OperatorProcess(cluster, env, workdir / "operator.log", args=["-n", f"{module_prefix(request)}*"])
    harness = Harness(cluster, sim, operator.start(), workdir)
    try:
        yield harness, Scraper(port)
    finally:
        operator.stop()
        sim.stop()


def test_create_update_delete_are_counted_as_they_happen(running: tuple[Harness, Scraper], namespace: str) -> None:
    harness, scrape = running
    wait_until(scrape.reachable, what="the metrics endpoint")
    wait_until(
        lambda: scrape.value("tio_truenas_connection_up", connection="<default>") == 1, what="the connection is up"
    )
    info = {
        "connection": "<default>",
        "version": "TrueNAS-25.10.1",
        "api_family": "virt.instance+vm",
    }  # VMs through vm.* on 25.10
    assert scrape.value("tio_truenas_connection_info", **info, transport="websocket") == 1
    assert scrape.value("tio_truenas_calls_limit", connection="<default>") == 20

    # ----- create
    name = unique("m")
    harness.apply(namespace, name, {"cpu": "1"})
    harness.wait_ready(namespace, name)
    wait_until(lambda: scrape.value("tio_incusinstances", phase="Running") == 1, what="Running counted")
    assert scrape.value("tio_actions_total", kind="create", result="ok") == 1
    assert scrape.value("tio_actions_total", kind="claim", result="ok") == 1
    assert scrape.value("tio_incusinstances_synced", status="True", reason="ReconcileSuccess") == 1
    creates = harness.calls().get("virt.instance.create", 0)
    assert creates == 1
    assert (
        scrape.value("tio_truenas_jobs_total", connection="<default>", method="virt.instance.create", state="SUCCESS")
        == 1
    )
    assert scrape.total("tio_truenas_jobs_total", method="virt.instance.create") == creates
    assert scrape.value("tio_truenas_job_duration_seconds_count", method="virt.instance.create", state="SUCCESS") == 1
    assert scrape.total("tio_truenas_event_lag_seconds_count", connection="<default>") >= 1, "job ends carry a time"
    assert scrape.total("tio_truenas_events_total", collection="virt.instance.query") >= 1
    # Our plain calls, per method, as the simulator counted them (it also counts the transport's own
    # login, subscriptions and job polls, which are not operator calls).
    before = harness.calls().get("virt.instance.query", 0)
    ours = scrape.total("tio_truenas_calls_total", method="virt.instance.query")
    after = harness.calls().get("virt.instance.query", 0)
    assert before - 1 <= ours <= after and ours >= 1  # a resync may land between the three reads
    assert scrape.total("tio_truenas_calls_total", method="virt.global.config") == harness.calls()["virt.global.config"]
    assert scrape.total("tio_reconcile_passes_total", result="ok") >= 1
    assert scrape.total("tio_reconcile_duration_seconds_count") == scrape.total("tio_reconcile_passes_total")

    # ----- update
    harness.apply(namespace, name, {"cpu": "2"})
    harness.wait_status(namespace, name, "cpu 2", lambda s: s.get("cpu") == "2" and s.get("observedGeneration") == 2)
    wait_until(lambda: scrape.value("tio_actions_total", kind="update", result="ok") == 1, what="update counted")
    updates = harness.calls().get("virt.instance.update", 0)
    assert updates == 1
    assert scrape.total("tio_truenas_jobs_total", method="virt.instance.update") == updates
    assert scrape.value("tio_actions_total", kind="create", result="ok") == 1, "no second create"

    # ----- delete
    assert harness.delete(namespace, name).returncode == 0
    wait_until(lambda: scrape.value("tio_actions_total", kind="delete", result="ok") == 1, what="delete counted")
    assert (
        scrape.total("tio_truenas_jobs_total", method="virt.instance.delete") == harness.calls()["virt.instance.delete"]
    )
    wait_until(lambda: scrape.value("tio_incusinstances", phase="Running") == 0, what="the resource leaves the gauges")
    assert scrape.total("tio_incusinstances_synced") == 0
    assert scrape.value("tio_truenas_calls_in_flight", connection="<default>") == 0
    assert scrape.total("tio_actions_total", result="error") == 0

    text = scrape.text()
    assert name not in text, "no label names an instance or a resource"
    assert harness.sim.api_key not in text and harness.sim.api_key.partition("-")[2] not in text


@pytest.fixture(scope="module")
def resyncing(
    cluster: Cluster, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[tuple[Harness, Scraper]]:
    """An operator resyncing every second, no device audit rotation: every idle pass shows at once."""
    workdir: Path = tmp_path_factory.mktemp("resyncing")
    sim = start_simulator("25.10", job_duration=0.05)
    port = free_port()
    env = operator_env(
        sim,
        workdir,
        TIO_METRICS_PORT=str(port),
        TIO_METRICS_ADDRESS="127.0.0.1",
        TIO_RESYNC_SECONDS="1",
        TIO_DEVICE_AUDITS_PER_RESYNC="0",
    )
    operator = OperatorProcess(cluster, env, workdir / "operator.log", args=["-n", f"{module_prefix(request)}*"])
    harness = Harness(cluster, sim, operator.start(), workdir)
    try:
        yield harness, Scraper(port)
    finally:
        operator.stop()
        sim.stop()


def test_an_idle_resource_costs_no_pass_call_or_write(resyncing: tuple[Harness, Scraper], namespace: str) -> None:
    """Issue 27 item 1 against the real API server and simulator: once settled, the timer's passes are
    counted as unchanged and make no TrueNAS call beyond the connection's own resync query, and no
    status write; a spec change brings the full pass back."""
    harness, scrape = resyncing
    wait_until(scrape.reachable, what="the metrics endpoint")
    name = unique("idle")
    harness.apply(namespace, name, {"cpu": "1"})
    harness.wait_ready(namespace, name)
    time.sleep(3)  # the passes that follow the create's own events
    made = scrape.value("tio_reconcile_passes_total", result="ok")
    skipped = scrape.value("tio_reconcile_passes_total", result="unchanged")
    version = harness.get(namespace, name)["metadata"]["resourceVersion"]
    calls = harness.calls()
    time.sleep(6)
    assert scrape.value("tio_reconcile_passes_total", result="unchanged") - skipped >= 3, "one a second, about"
    assert scrape.value("tio_reconcile_passes_total", result="ok") == made, "none made"
    assert harness.get(namespace, name)["metadata"]["resourceVersion"] == version, "no status written"
    now = harness.calls()
    idle = {method: n - calls.get(method, 0) for method, n in now.items() if n != calls.get(method, 0)}
    assert set(idle) <= {"virt.instance.query", "vm.query"}, f"the connection's resync query only: {idle}"
    harness.apply(namespace, name, {"cpu": "2"})
    harness.wait_status(namespace, name, "cpu 2", lambda s: s.get("cpu") == "2" and s.get("observedGeneration") == 2)
    # The pass is counted as it ends, just after its status write: look until it is.
    wait_until(lambda: scrape.value("tio_reconcile_passes_total", result="ok") > made, what="the pass counted")
    assert harness.delete(namespace, name).returncode == 0
