"""Which IncusInstances name which TrueNASConnection (instances/users.py), without a kopf index
(issue 27 item 4: kopf's index made a restart O(N^2)): what the watch says, what a LIST says, and
which wins; and the paged LIST itself against a fake API server that pages, expires, lies and hangs."""

from __future__ import annotations

import asyncio
import copy
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, cast

import kopf
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from truenas_incus_operator import handlers
from truenas_incus_operator.instances.users import ConnectionUsers
from truenas_incus_operator.kube import Kube
from truenas_incus_operator.problems import OperatorError, Reason, fail

from .fakes import fake_operator, resource
from .test_kube_client import point_kubeconfig

Row = tuple[str, str, str | None]


class Listing:
    """A LIST the test controls: ``rows`` per namespace (None: all), ``gate`` holds it open, ``fail``
    makes the next ones raise."""

    def __init__(self, rows: list[Row]) -> None:
        self.rows = rows
        self.asked: list[str | None] = []
        self.gate: asyncio.Event | None = None
        self.failures = 0

    async def __call__(self, namespace: str | None) -> list[Row]:
        self.asked.append(namespace)
        snapshot = [r for r in self.rows if namespace is None or r[0] == namespace]
        if self.gate is not None:
            await self.gate.wait()
        if self.failures:
            self.failures -= 1
            raise fail(Reason.KUBERNETES_ERROR, "Kubernetes API: 503 Service Unavailable")
        return snapshot


async def test_the_watch_alone_counts_users_per_connection() -> None:
    users = ConnectionUsers(Listing([]))
    users.observe(("a", "web"), "nas")
    users.observe(("a", "db"), "nas")
    users.observe(("b", "web"), "nas")  # another namespace's connection of the same name
    users.observe(("a", "plain"), None)
    assert users.count(("a", "nas")) == 2 and users.count(("b", "nas")) == 1
    users.observe(("a", "db"), "other")  # its connectionRef changed
    assert users.count(("a", "nas")) == 1 and users.count(("a", "other")) == 1
    users.forget(("a", "web"))
    users.forget(("a", "never-seen"))
    assert users.count(("a", "nas")) == 0 and not users.holds(("a", "nas"), finalized=False)


async def test_before_the_startup_list_a_connection_keeps_the_finalizer_it_has() -> None:
    listing = Listing([("a", "old", "nas")])
    users = ConnectionUsers(listing)
    # Nothing seen yet: a connection with the finalizer keeps it, one without gets none.
    assert users.holds(("a", "nas"), finalized=True)
    assert not users.holds(("a", "unused"), finalized=False)
    await users.load(["a"])
    assert users.complete and listing.asked == ["a"]
    assert users.holds(("a", "nas"), finalized=True) and users.count(("a", "nas")) == 1
    # Once every instance is known, a finalizer nothing needs goes.
    assert not users.holds(("a", "unused"), finalized=True)


async def test_the_startup_list_covers_every_named_namespace_or_the_cluster() -> None:
    listing = Listing([("a", "x", "nas"), ("b", "y", "nas"), ("c", "z", "nas")])
    users = ConnectionUsers(listing)
    await users.load(["a", "b"])
    assert listing.asked == ["a", "b"] and users.count(("b", "nas")) == 1 and users.count(("c", "nas")) == 0
    everywhere = Listing(listing.rows)
    users = ConnectionUsers(everywhere)
    await users.load(None)
    assert everywhere.asked == [None] and users.count(("c", "nas")) == 1


async def test_events_during_the_startup_list_win_over_it() -> None:
    listing = Listing([("a", "deleted", "nas"), ("a", "moved", "nas"), ("a", "kept", "nas")])
    listing.gate = asyncio.Event()
    users = ConnectionUsers(listing)
    loading = asyncio.create_task(users.load(["a"]))
    await asyncio.sleep(0)  # the LIST has begun (its answer is the rows as they were)
    users.forget(("a", "deleted"))
    users.observe(("a", "moved"), "other")
    users.observe(("a", "new"), "nas")
    listing.gate.set()
    await loading
    assert users.count(("a", "nas")) == 2, "kept + new; the deleted one is not brought back"
    assert users.count(("a", "other")) == 1


async def test_the_startup_list_is_retried_until_it_succeeds(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="truenas_incus_operator.instances.users")
    listing = Listing([("a", "x", "nas")])
    listing.failures = 2
    users = ConnectionUsers(listing)
    await users.load(["a"], retry_max=0.01)
    assert listing.asked == ["a", "a", "a"] and users.complete and users.count(("a", "nas")) == 1
    said = [r for r in caplog.records if "cannot list the IncusInstances" in r.getMessage()]
    assert [r.levelname for r in said] == ["WARNING", "DEBUG"], "said once, not at every retry"


async def test_a_failing_startup_list_leaves_the_finalizers_where_they_are() -> None:
    listing = Listing([])
    listing.failures = 10**6
    users = ConnectionUsers(listing)
    loading = asyncio.create_task(users.load(["a"], retry_max=0.001))
    await asyncio.sleep(0.05)
    assert not users.complete and len(listing.asked) > 3
    assert users.holds(("a", "nas"), finalized=True)
    loading.cancel()
    with pytest.raises(asyncio.CancelledError):
        await loading


async def test_confirm_forgets_instances_deleted_unseen() -> None:
    listing = Listing([("a", "ghost", "nas"), ("a", "real", "nas"), ("b", "ghost", "nas")])
    users = ConnectionUsers(listing)
    await users.load(None)
    listing.rows = [("a", "real", "nas"), ("b", "ghost", "nas")]  # a/ghost went while no watch ran
    assert users.count(("a", "nas")) == 2
    assert await users.confirm(("a", "nas")) == 1
    assert users.count(("a", "nas")) == 1 and listing.asked[-1] == "a"
    assert users.count(("b", "nas")) == 1, "another namespace is not touched"
    listing.rows = [("b", "ghost", "nas")]
    assert await users.confirm(("a", "nas")) == 0 and not users.holds(("a", "nas"), finalized=True)


async def test_confirm_keeps_what_the_watch_saw_during_it_and_counts_what_it_lists() -> None:
    listing = Listing([("a", "listed-only", "nas")])
    listing.gate = asyncio.Event()
    users = ConnectionUsers(listing)
    confirming = asyncio.create_task(users.confirm(("a", "nas")))
    await asyncio.sleep(0)
    users.observe(("a", "created-meanwhile"), "nas")
    listing.gate.set()
    assert await confirming == 2, "the one created during the LIST and the one it listed before its event came"
    assert users.count(("a", "nas")) == 1, "a listed one is counted, not recorded: its event records it"


async def test_a_failing_confirm_raises_and_forgets_nothing() -> None:
    listing = Listing([])
    users = ConnectionUsers(listing)
    users.observe(("a", "web"), "nas")
    listing.failures = 1
    with pytest.raises(OperatorError):
        await users.confirm(("a", "nas"))
    assert users.count(("a", "nas")) == 1


async def test_an_instance_event_asks_for_the_connection_finalizer_once_per_connection() -> None:
    """kopf hands every object a shallow copy of the operator's memo: a set made in one object's copy
    was never seen by the next, so every instance's first event patched its connection (5000 patches
    at every restart at 5000 resources, and one per create)."""
    fake = fake_operator()
    memo = kopf.Memo(operator=fake.operator)
    changed: Any = handlers.instance_changed  # kopf's decorator keeps the function; its type wants kopf's kwargs
    for n in range(5):
        body = resource(f"web{n}", connectionRef={"name": "nas"})
        await changed(type=None, body=kopf.Body(cast(kopf.RawBody, body)), memo=copy.copy(memo))
    other = cast(kopf.RawBody, resource("db", connectionRef={"name": "other"}))
    await changed(type=None, body=kopf.Body(other), memo=copy.copy(memo))
    asked = [(p.plural, p.name) for p in fake.kube.patches if p.kind == "annotations"]
    assert asked == [("truenasconnections", "nas"), ("truenasconnections", "other")]
    assert fake.operator.users.count(("apps", "nas")) == 5


async def test_a_connection_that_lost_its_finalizer_is_asked_again_with_a_new_value() -> None:
    """The ask is an annotation patch, so that kopf sees an event and adds the finalizer. It always
    wrote the same value: once a connection had lost its finalizer (its last instance gone), the next
    instance's ask changed nothing, no event came, and the connection stayed deletable while named."""
    fake = fake_operator()
    memo = kopf.Memo(operator=fake.operator)
    changed: Any = handlers.instance_changed
    first = cast(kopf.RawBody, resource("web", connectionRef={"name": "nas"}))
    await changed(type=None, body=kopf.Body(first), memo=copy.copy(memo))
    fake.operator.users.finalized.discard(("apps", "nas"))  # its event showed it without the finalizer
    second = cast(kopf.RawBody, resource("db", connectionRef={"name": "nas"}))
    await changed(type=None, body=kopf.Body(second), memo=copy.copy(memo))
    values = [p.body["incus.truenas.io/in-use"] for p in fake.kube.patches if p.kind == "annotations"]
    assert len(values) == 2 and values[0] != values[1], "the second ask is a change the API server reports"


async def test_a_connection_held_for_its_instances_is_checked_less_and_less_often() -> None:
    """Each check LISTs the namespace: 5 s doubling to 30 s apart, not every 5 s for as long as a
    tenant keeps connections deleted and named."""
    fake = fake_operator()
    fake.kube.incus_instances[("apps", "web")] = resource("web", connectionRef={"name": "nas"})
    posted: list[str] = []
    memo = kopf.Memo(operator=fake.operator, events=lambda body, kind, reason, message: posted.append(reason))
    deleted: Any = handlers.connection_deleted
    body = kopf.Body(cast(kopf.RawBody, {"metadata": {"namespace": "apps", "name": "nas"}}))
    delays = []
    for retry in range(6):
        with pytest.raises(kopf.TemporaryError) as held:
            await deleted(body=body, memo=memo, retry=retry)
        delays.append(held.value.delay)
    assert delays == [5, 10, 20, 30, 30, 30] and posted == ["InUse"]
    del fake.kube.incus_instances[("apps", "web")]
    await deleted(body=body, memo=memo, retry=6)  # nothing names it: let go


async def test_a_connection_whose_last_instance_goes_is_told_at_once() -> None:
    """kopf removes a finalizer nothing needs only at the connection's next event: with the operator
    gone before one came, deleting the connection hung. The last instance's going causes one."""
    fake = fake_operator()
    memo = kopf.Memo(operator=fake.operator)
    changed: Any = handlers.instance_changed

    def event(name: str, connection: str, kind: str | None = None) -> Any:
        body = kopf.Body(cast(kopf.RawBody, resource(name, connectionRef={"name": connection})))
        return changed(type=kind, body=body, memo=copy.copy(memo))

    def asked() -> list[str]:
        return [p.name for p in fake.kube.patches if p.kind == "annotations"]

    await event("web", "nas")
    await event("db", "nas")
    assert asked() == ["nas"]
    await event("web", "nas", "DELETED")
    assert asked() == ["nas"], "db still names it"
    await event("db", "other")  # its connectionRef moved: nothing names nas any more
    assert asked() == ["nas", "other", "nas"]
    await event("db", "other", "DELETED")
    assert asked() == ["nas", "other", "nas", "other"]
    values = [p.body["incus.truenas.io/in-use"] for p in fake.kube.patches]
    assert len(set(values)) == 4, "each a change the API server reports"
    await event("x", "nas")
    fake.operator.users.finalized.clear()  # the connections' events showed them without the finalizer
    await event("x", "nas", "DELETED")
    assert asked() == ["nas", "other", "nas", "other"], "nas was asked for already; then none to remove"


def test_the_operator_registers_no_kopf_index() -> None:
    """kopf holds every handler until its indexes are filled, one toggle per object (O(N^2) at a
    restart): the operator keeps its own registry instead."""
    registry = kopf.get_default_registry()
    assert registry._indexing.get_all_handlers() == []
    assert registry._changing.get_all_handlers(), "the handlers are registered (the check above can fail)"


# ----- Kube.list_instance_connections against a fake API server ------------------------------------------
def instance(namespace: str, name: str, connection: Any = "nas") -> dict[str, Any]:
    spec: dict[str, Any] = {"connectionRef": {"name": connection}} if connection is not None else {}
    return {"metadata": {"namespace": namespace, "name": name}, "spec": spec}


Handler = Callable[[web.Request], Any]


@pytest.fixture
async def api(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Callable[[Handler], Any]]:
    """Serves incusinstances (everywhere and per namespace) by the handler a test sets; yields a setter."""
    served: dict[str, Handler] = {}
    requests: list[web.Request] = []

    async def route(request: web.Request) -> web.StreamResponse:
        requests.append(request)
        answer = served["handler"](request)
        if asyncio.iscoroutine(answer):
            answer = await answer
        assert isinstance(answer, web.StreamResponse)
        return answer

    app = web.Application()
    app.router.add_get("/apis/incus.truenas.io/v1alpha1/incusinstances", route)
    app.router.add_get("/apis/incus.truenas.io/v1alpha1/namespaces/{ns}/incusinstances", route)
    async with TestServer(app) as server:
        point_kubeconfig(server, tmp_path, monkeypatch)

        def serve(handler: Handler) -> list[web.Request]:
            served["handler"] = handler
            requests.clear()
            return requests

        yield serve


@pytest.fixture
async def kube() -> AsyncIterator[Kube]:
    client = Kube(timeout=2.0)
    try:
        yield client
    finally:
        await client.close()


def paged(objects: list[dict[str, Any]], size: int) -> Handler:
    def handle(request: web.Request) -> web.Response:
        start = int(request.query.get("continue") or 0)
        end = start + min(size, int(request.query["limit"]))
        token = str(end) if end < len(objects) else ""
        return web.json_response({"items": objects[start:end], "metadata": {"continue": token}})

    return handle


async def test_the_list_is_read_page_by_page(api: Callable[[Handler], Any], kube: Kube) -> None:
    objects = [instance("a", f"i{n}", "nas" if n % 2 else None) for n in range(7)]
    requests = api(paged(objects, 3))
    found = await kube.list_instance_connections("a", page=3)
    assert found == [("a", f"i{n}", "nas" if n % 2 else None) for n in range(7)]
    assert [r.query.get("continue") for r in requests] == [None, "3", "6"]
    assert all(r.query["limit"] == "3" and r.path.endswith("/namespaces/a/incusinstances") for r in requests)
    requests = api(paged(objects, 500))
    assert len(await kube.list_instance_connections(None)) == 7
    assert requests[0].path == "/apis/incus.truenas.io/v1alpha1/incusinstances"


async def test_an_expired_continuation_starts_over_once(api: Callable[[Handler], Any], kube: Kube) -> None:
    objects = [instance("a", f"i{n}") for n in range(4)]
    expired = {"times": 1}

    def handle(request: web.Request) -> web.Response:
        if request.query.get("continue") and expired["times"]:
            expired["times"] -= 1
            return web.json_response({"kind": "Status", "code": 410, "reason": "Expired"}, status=410)
        answer: web.Response = paged(objects, 2)(request)
        return answer

    requests = api(handle)
    assert [row[1] for row in await kube.list_instance_connections("a", page=2)] == [f"i{n}" for n in range(4)]
    assert [r.query.get("continue") for r in requests] == [None, "2", None, "2"], "no duplicates kept"
    expired["times"] = 2
    with pytest.raises(OperatorError, match="410"):
        await kube.list_instance_connections("a", page=2)


@pytest.mark.parametrize(
    ("answer", "said"),
    [
        ({"items": "nope", "metadata": {}}, "not a list of objects"),
        ({"items": [], "metadata": []}, "not a list of objects"),
        ({"items": [{"metadata": {"name": "x"}}], "metadata": {}}, "without a namespace and name"),
        ({"items": ["x"], "metadata": {}}, "without a namespace and name"),
        ({"items": [], "metadata": {"continue": 7}}, "continuation that is not one"),
        ({"items": [], "metadata": {"continue": "x" * 5000}}, "continuation that is not one"),
    ],
)
async def test_a_list_that_lies_is_an_error(
    api: Callable[[Handler], Any], kube: Kube, answer: dict[str, Any], said: str
) -> None:
    api(lambda _: web.json_response(answer))
    with pytest.raises(OperatorError, match=said):
        await kube.list_instance_connections("a")


async def test_a_list_that_never_ends_is_an_error(api: Callable[[Handler], Any], kube: Kube) -> None:
    api(lambda _: web.json_response({"items": [instance("a", "same")], "metadata": {"continue": "more"}}))
    with pytest.raises(OperatorError, match="longer than 5 pages of 500"):
        await kube.list_instance_connections("a", pages=5)


async def test_odd_connection_refs_name_no_connection(api: Callable[[Handler], Any], kube: Kube) -> None:
    odd = [
        {"metadata": {"namespace": "a", "name": "n1"}, "spec": {"connectionRef": {"name": 5}}},
        {"metadata": {"namespace": "a", "name": "n2"}, "spec": {"connectionRef": "nas"}},
        {"metadata": {"namespace": "a", "name": "n3"}, "spec": None},
        {"metadata": {"namespace": "a", "name": "n4"}, "spec": {"connectionRef": {"name": ""}}},
    ]
    api(lambda _: web.json_response({"items": odd, "metadata": {}}))
    assert [row[2] for row in await kube.list_instance_connections("a")] == [None] * 4


async def test_a_missing_kind_is_an_error_not_no_instances(api: Callable[[Handler], Any], kube: Kube) -> None:
    """A 404 (the CRD being upgraded, a proxy) proves nothing: taken as "none", it let every connection
    of the namespace go (confirm) or marked the startup list complete with nothing in it."""
    api(lambda _: web.json_response({"kind": "Status", "code": 404}, status=404))
    with pytest.raises(OperatorError, match="not served"):
        await kube.list_instance_connections("a")
    objects = [instance("a", f"i{n}") for n in range(4)]

    def vanishing(request: web.Request) -> web.Response:
        if request.query.get("continue"):
            return web.json_response({"kind": "Status", "code": 404}, status=404)
        answer: web.Response = paged(objects, 2)(request)
        return answer

    api(vanishing)
    with pytest.raises(OperatorError, match="not served"):
        await kube.list_instance_connections("a", page=2)


async def test_a_hanging_or_refusing_server_is_an_operator_error(api: Callable[[Handler], Any], kube: Kube) -> None:
    async def hang(_: web.Request) -> web.Response:
        await asyncio.sleep(30)
        raise AssertionError("not reached")

    api(hang)
    with pytest.raises(OperatorError, match="no answer within 2 s"):
        await kube.list_instance_connections("a")
    api(lambda _: web.json_response({"kind": "Status", "code": 403}, status=403))
    with pytest.raises(OperatorError, match="403"):
        await kube.list_instance_connections("a")
