"""What the operator tells a person (issue 21 items 1 and 8), with fakes: the status a loop writes
while its connection is down, Event types, /healthz, the Secure condition, the printer columns."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from truenas_incus_operator import handlers
from truenas_incus_operator.crd import incus_instance_crd
from truenas_incus_operator.instances.resource import LoopState
from truenas_incus_operator.kube import Events
from truenas_incus_operator.metrics import Metrics
from truenas_incus_operator.problems import Problem, Reason
from truenas_incus_operator.status import applied, differs, secure_condition

from .fakes import fake_operator, resource


def no_wake() -> None:
    return None


def condition(status: dict[str, Any], kind: str) -> dict[str, Any]:
    return next(c for c in status["conditions"] if c["type"] == kind)


async def test_a_loop_keeps_the_observation_when_the_key_is_refused() -> None:
    fake = fake_operator()
    state = LoopState(status={})
    body = resource(cpu="2")
    await fake.operator.loops.reconcile_once(body, state, no_wake)
    await fake.operator.loops.reconcile_once(body, state, no_wake)  # created, then observed running
    seen = dict(state.status)
    assert seen["phase"] == "Running" and seen["instanceId"], seen
    fake.connection.detach(Problem(Reason.AUTHENTICATION_FAILED, "TrueNAS refused the API key"))
    body["status"] = seen
    await fake.operator.loops.reconcile_once(body, state, no_wake)
    status = fake.kube.statuses("web01")[-1]
    for key in ("instanceId", "cpu", "ipAddresses", "binding"):
        assert state.status.get(key) == seen.get(key), key
    assert status["phase"] == "Unknown" and seen["binding"]["name"] == "web01"
    assert condition(status, "Ready")["status"] == "Unknown"
    assert condition(status, "Synced")["reason"] == "AuthenticationFailed"
    assert ("Warning", "AuthenticationFailed") in [e[:2] for e in fake.events]


async def test_connecting_is_not_a_warning() -> None:
    fake = fake_operator()
    fake.connection.detach()  # no problem known yet: the loop reports Connecting
    await fake.operator.loops.reconcile_once(resource(), LoopState(status={}), no_wake)
    assert [e[:2] for e in fake.events] == [("Normal", "Connecting")]


def test_healthz_says_why_a_connection_is_down() -> None:
    def connection(ready: bool, problem: Problem | None) -> Any:
        return SimpleNamespace(ready=SimpleNamespace(is_set=lambda: ready), problem=problem)

    connections = {
        "<default>": connection(True, None),
        "a/key": connection(False, Problem(Reason.AUTHENTICATION_FAILED, "refused")),
        "a/new": connection(False, Problem(Reason.CONNECTING, "connecting to wss://nas")),
    }
    metrics = Metrics(connection_names=False)
    memo: Any = {"operator": SimpleNamespace(connections=SimpleNamespace(connections=connections), metrics=metrics)}
    probe: Any = handlers.probe  # kopf's decorator keeps the function; its type wants kopf's kwargs
    assert probe(memo=memo) == {
        "<default>": "ready",
        metrics.connection_label("a/key"): "AuthenticationFailed",
        metrics.connection_label("a/new"): "connecting",
    }
    # Unauthenticated: a tenant's namespace and connection name are not listed (issue 19 item 9).
    assert not any(key.startswith("a/") for key in probe(memo=memo))


def test_secure_is_true_only_once_a_connection_was_verified() -> None:
    assert secure_condition("wss://nas", False, verified=True)[:2] == ("True", "Verified")
    assert secure_condition("wss://nas", False, verified=False)[:2] == ("Unknown", "NotVerified")
    # What is insecure by configuration says so before any connection.
    assert secure_condition("wss://nas", True, verified=False)[:2] == ("False", "InsecureSkipVerify")
    assert secure_condition("ws://127.0.0.1:6000", False, verified=False)[:2] == ("False", "PlainTransport")


def test_kubectl_get_shows_synced() -> None:
    columns = incus_instance_crd()["spec"]["versions"][0]["additionalPrinterColumns"]
    names = [c["name"] for c in columns]
    assert names.index("Synced") == names.index("Ready") + 1
    synced = columns[names.index("Synced")]
    assert synced["jsonPath"] == '.status.conditions[?(@.type=="Synced")].status'


async def test_events_come_from_the_operator() -> None:
    posted: list[tuple[str, dict[str, Any]]] = []

    class Recording:
        async def create_event(self, namespace: str, event: dict[str, Any]) -> None:
            posted.append((namespace, event))

    events = Events(Recording(), "operator-7f9c", limit=3)  # type: ignore[arg-type]
    body = resource()
    body["metadata"]["uid"] = "u-1"
    events(body, "Normal", "Created", "created CONTAINER web01 on TrueNAS")
    events(body, "Warning", "ImageNotFound", "x" * 5000)
    await events.close()
    (namespace, created), (_, refused) = posted
    assert namespace == "apps" and created["involvedObject"] == {
        "apiVersion": "incus.truenas.io/v1alpha1", "kind": "IncusInstance", "name": "web01", "namespace": "apps",
        "uid": "u-1",
    }  # fmt: skip
    for event in (created, refused):
        assert event["source"] == {"component": "truenas-incus-operator"}
        assert (event["reportingComponent"], event["reportingInstance"]) == ("truenas-incus-operator", "operator-7f9c")
    assert (created["action"], refused["action"]) == ("Create", "Reconcile")
    assert len(refused["message"]) == 1024
    # Never blocks the loops: past the limit waiting, Events are dropped, not queued without bound.
    for _ in range(10):
        events(body, "Warning", "Unreachable", "down")
    assert events.dropped == 7
    await events.close()
    assert len(posted) == 5


async def test_an_operator_restart_does_not_flap_a_running_status() -> None:
    fake = fake_operator()
    state = LoopState(status={})
    body = resource(cpu="2")
    for _ in range(2):
        await fake.operator.loops.reconcile_once(body, state, no_wake)
    writes = len(fake.kube.statuses("web01"))
    # A restart: the loop starts again from the resource's status, its connection still connecting.
    fake.connection.detach(Problem(Reason.CONNECTING, "connecting to wss://nas.invalid"))
    body["status"] = dict(state.status)
    await fake.operator.loops.reconcile_once(body, LoopState(status=dict(state.status)), no_wake)
    assert len(fake.kube.statuses("web01")) == writes, "nothing to say while connecting: the status stays"
    assert [e for e in fake.events if e[1] == "Connecting"] == []


def as_stored(value: Any) -> Any:
    """What the API server keeps of a merge-patched status: no null anywhere (kube-apiserver drops them)."""
    if isinstance(value, dict):
        return {k: as_stored(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [as_stored(v) for v in value]
    return value


async def test_a_restarted_loop_does_not_write_a_status_that_only_lost_its_nulls() -> None:
    """A restart read back every status without the nulls the operator sent (binding.source,
    addresses[].interface, ...); each loop's first pass saw a difference and wrote the same status
    again: 5000 writes, and most of a restart's time, at 5000 resources."""
    fake = fake_operator()
    body = resource(cpu="2")
    state = LoopState(status={})
    for _ in range(3):
        await fake.operator.loops.reconcile_once(body, state, no_wake)
    written = fake.kube.statuses("web01")
    assert written and written[-1]["phase"] == "Running"
    assert as_stored(written[-1]) != written[-1], "the status sent holds nulls (the case at hand)"
    stored = as_stored(state.status)
    restarted = LoopState(status=stored)  # a new loop, from the body the API server serves
    body["status"] = stored
    await fake.operator.loops.reconcile_once(body, restarted, no_wake)
    assert fake.kube.statuses("web01") == written, "nothing new to say: nothing written"


def test_a_null_that_removes_nothing_is_no_difference() -> None:
    stored = {"binding": {"name": "a"}, "addresses": [{"address": "10.0.0.1"}], "phase": "Running"}
    assert not differs(stored, {"binding": {"name": "a", "source": None}, "phase": "Running", "gone": None})
    assert not differs(stored, {"addresses": [{"address": "10.0.0.1", "interface": None}]})
    assert differs(stored, {"binding": {"name": "b", "source": None}})
    assert differs(stored, {"binding": None}), "a top-level null removes a field that is there"
    assert differs(stored, {"addresses": [{"address": "10.0.0.1"}, {"address": "10.0.0.2"}]})
    assert applied(stored, {"binding": {"name": "a", "source": None}, "phase": None}) == {
        "binding": {"name": "a"},
        "addresses": [{"address": "10.0.0.1"}],
    }, "what the API server then keeps"
