"""Metrics and tenancy (issue 19 item 9): the series of a deleted connection go, and the
unauthenticated endpoint does not list every tenant's connection names unless the administrator
opts in (``TIO_METRICS_CONNECTION_NAMES``)."""

from __future__ import annotations

from prometheus_client import generate_latest

from truenas_incus_operator.app import build
from truenas_incus_operator.metrics import Metrics
from truenas_incus_operator.settings import Settings

from .fakes import LEDGER_NAMESPACE, FakeKube, ScriptedTransport


class Client:
    system_version = "TrueNAS-25.10.1"
    api_family = "virt"
    transport = ScriptedTransport()


def exercise(metrics: Metrics, key: str) -> None:
    observer = metrics.truenas(key, 20)
    metrics.connection_state(key, Client())
    observer.call_started()
    observer.call_finished("virt.instance.query", "ok", 0.01)
    observer.call_started()
    observer.job_finished("virt.instance.create", "SUCCESS", 1.0)
    observer.event_received("virt.instance.query", 0.2)
    observer.reconnected()


def scrape(metrics: Metrics) -> str:
    return generate_latest(metrics.registry).decode()


def test_every_series_of_a_forgotten_connection_goes() -> None:
    """Counters (calls, jobs, events, reconnects) and the event lag stayed after the connection
    was removed: a deleted tenant's connection was listed for ever."""
    metrics = Metrics()
    exercise(metrics, "team-a/nas")
    exercise(metrics, "team-b/nas")
    assert "team-a/nas" in scrape(metrics)
    metrics.forget_connection("team-a/nas")
    text = scrape(metrics)
    assert "team-a/nas" not in text, [line for line in text.splitlines() if "team-a/nas" in line]
    assert 'connection="team-b/nas"' in text, "the other connection's series stay"


def test_the_operators_endpoint_shows_no_tenant_connection_names_by_default() -> None:
    operator = build(Settings(ledger_namespace=LEDGER_NAMESPACE), FakeKube(), lambda *a: None)
    exercise(operator.metrics, "team-a/payroll-nas")
    exercise(operator.metrics, "<default>")
    text = scrape(operator.metrics)
    assert "team-a" not in text and "payroll" not in text
    assert 'connection="<default>"' in text, "the default connection is the administrator's: named"
    label = operator.metrics.connection_label("team-a/payroll-nas")
    assert label.startswith("tnc-") and f'connection="{label}"' in text
    opted_in = build(
        Settings(ledger_namespace=LEDGER_NAMESPACE, metrics_connection_names=True), FakeKube(), lambda *a: None
    )
    exercise(opted_in.metrics, "team-a/payroll-nas")
    assert 'connection="team-a/payroll-nas"' in scrape(opted_in.metrics)
