"""kopf registration only: every handler hands over to the ``Operator`` built at startup."""

from __future__ import annotations

import asyncio
import logging
import random
import socket
import time
from collections.abc import Mapping
from typing import Any

import kopf

from .app import Operator, build
from .kube import Events, Kube, kopf_login
from .models import API_GROUP, API_VERSION
from .policy import PolicyError
from .problems import OperatorError, Problem
from .settings import Settings
from .snapshots import RESTORES as RESTORE_PLURAL
from .snapshots import SNAPSHOTS as SNAPSHOT_PLURAL

INSTANCES = (API_GROUP, API_VERSION, "incusinstances")
CONNECTIONS = (API_GROUP, API_VERSION, "truenasconnections")
SNAPSHOTS = (API_GROUP, API_VERSION, SNAPSHOT_PLURAL)
RESTORES = (API_GROUP, API_VERSION, RESTORE_PLURAL)
FINALIZER = f"{API_GROUP}/finalizer"


def _operator(memo: kopf.Memo) -> Operator:
    operator: Operator = memo["operator"]
    return operator


@kopf.on.login()
async def login(settings: kopf.OperatorSettings, **_: Any) -> kopf.ConnectionInfo | kopf.AiohttpSession | None:
    """kopf's login, with its requests to the API server bounded (TIO_KUBE_CONNECTIONS)."""
    bounded = kopf_login(settings, Settings().kube_connections)
    if bounded is not None:
        return bounded
    return kopf.login_with_service_account(settings=settings) or kopf.login_with_kubeconfig(settings=settings)


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=API_GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=API_GROUP)
    # Events come from the operator only (kube.Events: component, pod, action), as `kubectl describe`
    # and `kubectl get events` show. kopf's own (a handler failing temporarily, at every retry) say
    # `Action?` and repeat what the operator already reports once (DeleteFailed, InUse).
    settings.posting.enabled = False
    settings_ = Settings()
    instance = settings_.pod_name or socket.gethostname()
    settings.networking.request_timeout = 60
    kube = Kube(settings_.kube_timeout_seconds)
    events = Events(kube, instance)
    memo["events"] = events
    try:
        operator = build(settings_, kube, events)
    except PolicyError as exc:
        # Never run with a policy other than the administrator's: stop instead of allowing everything.
        raise kopf.PermanentError(str(exc)) from None
    try:
        await operator.ledger.load()  # before any loop acts: ownership survives restarts
        await operator.snapshot_ledger.load()
        await operator.schedule_ledger.load()
    except OperatorError as exc:
        await operator.close()
        raise kopf.PermanentError(f"cannot read the ownership ledger: {exc.problem.message}") from None
    try:
        operator.serve_metrics()
    except OSError as exc:
        await operator.close()
        raise kopf.PermanentError(f"cannot serve metrics on TIO_METRICS_PORT: {exc}") from None
    await operator.connection_resources.configure_default()
    # The namespaces kopf watches, from __main__ (None: every namespace, or patterns).
    operator.start_background(memo.get("namespaces"))
    memo["operator"] = operator


@kopf.on.cleanup()
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    events: Events | None = memo.get("events")
    if events is not None:
        await events.close()
    await _operator(memo).close()


@kopf.on.probe(id="truenas")
def probe(memo: kopf.Memo, **_: Any) -> dict[str, str]:
    """Per connection: ``ready``, ``connecting``, or why it is down (``AuthenticationFailed``, ``Unreachable``, ...).
    Keyed as the metrics label connections (a pseudonym per TrueNASConnection unless names are opted
    in): the endpoint has no authentication, so it does not list the tenants' resources."""
    operator = _operator(memo)
    label = operator.metrics.connection_label
    return {label(key): _health(c.ready.is_set(), c.problem) for key, c in operator.connections.connections.items()}


def _health(ready: bool, problem: Problem | None) -> str:
    if ready:
        return "ready"
    return "connecting" if problem is None or problem.reason == "Connecting" else problem.reason


@kopf.on.event(*INSTANCES)
async def instance_changed(type: str | None, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    operator = _operator(memo)
    key = (body.metadata.namespace or "", body.metadata.name or "")
    if type == "DELETED":
        operator.wakeups.resource_deleted(key)
        released = operator.users.forget(key)
    else:
        operator.wakeups.resource_changed(body)
        released = operator.users.observe(key, _connection_name(body.spec))
        await _hold_connection(memo, key[0], body.spec)
    if released is not None and released in _finalized(memo):
        # Its last instance went: kopf removes the finalizer at the connection's next event, so cause
        # one now; otherwise it stays until then, and a delete with the operator gone would hang.
        await _poke(memo, released)


# A cancellation_timeout without a cancellation_backoff: kopf cancels the loop at once when it stops it
# (the resource's deletion, the operator's exit); the loop's sleep relies on that (loop._sleep).
@kopf.daemon(*INSTANCES, cancellation_timeout=10.0, initial_delay=lambda **_: random.uniform(0, 0.2))
async def instance_loop(body: kopf.Body, stopped: kopf.DaemonStopped, memo: kopf.Memo, **_: Any) -> None:
    try:
        await _operator(memo).loops.run(body, stopped)
    except asyncio.CancelledError:
        if not stopped:
            raise
        # kopf's way of stopping it (the flag is set first): the loop's normal end, not a failure that
        # kopf would log as a warning for every resource at every exit and deletion


@kopf.on.delete(*INSTANCES)
async def instance_deleted(body: kopf.Body, retry: int, memo: kopf.Memo, **_: Any) -> None:
    try:
        await _operator(memo).deletion.delete(body, retry)
    except OperatorError as exc:
        raise kopf.TemporaryError(exc.problem.message, delay=exc.retry_after or 0) from None


def _connection_name(spec: Mapping[str, Any]) -> str | None:
    reference = spec.get("connectionRef") or {}
    name = reference.get("name") if isinstance(reference, Mapping) else None
    return name if isinstance(name, str) and name else None


def _named_by_instances(namespace: str | None, name: str | None, body: kopf.Body, memo: kopf.Memo, **_: Any) -> bool:
    """The delete handler's filter: kopf holds the finalizer only while this is true (instances/users.py)."""
    finalized = FINALIZER in (body.metadata.get("finalizers") or [])
    return _operator(memo).users.holds((namespace or "", name or ""), finalized)


@kopf.on.delete(*CONNECTIONS, when=_named_by_instances)
async def connection_deleted(body: kopf.Body, memo: kopf.Memo, retry: int, **_: Any) -> None:
    """Keeps the finalizer (and the credentials last loaded) until no IncusInstance uses it. kopf
    holds the finalizer only while the filter matches: a connection that nothing names has none, so
    it is deleted at once, with or without the operator. Before letting it go, a LIST of its
    namespace says who names it (an instance deleted unseen is no reason to hold it)."""
    namespace, name = body.metadata.namespace or "", body.metadata.name or ""
    operator = _operator(memo)
    # Each check LISTs the namespace's instances: 5 s doubling to 30 s between them, not 5 s for as
    # long as a tenant keeps its connections deleted and named.
    delay = min(30.0, 5.0 * 2 ** min(retry, 3))
    try:
        users = await operator.users.confirm((namespace, name))
    except OperatorError as exc:
        message = f"cannot tell which IncusInstances use it: {exc.problem.message}"
        raise kopf.TemporaryError(message, delay=delay) from None
    if users:
        message = f"still used by {users} IncusInstance(s); waiting for them to go"
        if retry == 0:  # once per deletion, not at every retry
            events: Events = memo["events"]
            events(body, "Normal", "InUse", message)
        raise kopf.TemporaryError(message, delay=delay)
    await operator.connection_resources.remove(f"{namespace}/{name}")


@kopf.on.event(*CONNECTIONS)
async def connection_changed(type: str | None, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    resources = _operator(memo).connection_resources
    key = (body.metadata.namespace or "", body.metadata.name or "")
    if type == "DELETED":
        _finalized(memo).discard(key)
        await resources.remove(f"{key[0]}/{key[1]}")
    else:
        if FINALIZER in (body.metadata.get("finalizers") or []):
            _finalized(memo).add(key)
        else:
            _finalized(memo).discard(key)
        await resources.sync(body)


def _finalized(memo: kopf.Memo) -> set[tuple[str, str]]:
    """TrueNASConnections last seen with the finalizer. On the operator, not in the memo: kopf hands
    every object a shallow copy of the memo, so a set made in one object's copy is not another's."""
    return _operator(memo).users.finalized


async def _hold_connection(memo: kopf.Memo, namespace: str, spec: Mapping[str, Any]) -> None:
    """An IncusInstance names a TrueNASConnection: kopf adds the connection's finalizer on the
    connection's next event (its delete handler's filter now matches), so cause one at once (an
    annotation the operator owns) rather than leave a window in which deleting the connection would
    strand the instance's teardown. The value changes at every ask: a connection that lost its
    finalizer (its last instance gone) and is named again must see an event again, and patching the
    same value again changes nothing, so the API server sends none."""
    name = _connection_name(spec)
    if not name or (namespace, str(name)) in _finalized(memo):
        return
    _finalized(memo).add((namespace, str(name)))  # once: its next event says whether it took
    if not await _poke(memo, (namespace, str(name))):
        _finalized(memo).discard((namespace, str(name)))


async def _poke(memo: kopf.Memo, connection: tuple[str, str]) -> bool:
    """An event for the connection (an annotation the operator owns, a new value each time), so kopf
    looks at its finalizer again; False when the patch failed (logged)."""
    namespace, name = connection
    try:
        await _operator(memo).kube.patch_annotations(
            CONNECTIONS[2], namespace, name, {f"{API_GROUP}/in-use": str(time.time_ns())}
        )
    except OperatorError as exc:
        logging.getLogger(__name__).info("TrueNASConnection %s/%s: %s", namespace, name, exc.problem.message)
        return False
    return True


# ----- IncusInstanceSnapshot and IncusInstanceRestore (snapshots/) -----------------------------------------
@kopf.on.event(*SNAPSHOTS)
@kopf.on.event(*RESTORES)
async def holder_changed(type: str | None, body: kopf.Body, resource: kopf.Resource, memo: kopf.Memo, **_: Any) -> None:
    """What a snapshot's or restore's status holds (instances/holds.py); the instance's loop looks again.
    Also where the metrics count them by phase (every object has an event at startup)."""
    operator = _operator(memo)
    deleted = type == "DELETED"
    operator.holds.observe(resource.plural, body, deleted=deleted)
    key = (body.metadata.namespace or "", body.metadata.name or "")
    operator.metrics.holder_phase(resource.plural, key, None if deleted else body.status.get("phase"))


def _temporary(exc: OperatorError, retry: int) -> kopf.TemporaryError:
    """kopf retries with a backoff: what is waited for (a snapshot to be Ready, an instance to appear)
    may take long or never come; never more than 2 minutes apart."""
    return kopf.TemporaryError(exc.problem.message, delay=min(120.0, (exc.retry_after or 5) * 2 ** min(retry, 5)))


@kopf.on.create(*SNAPSHOTS)
async def snapshot_created(body: kopf.Body, memo: kopf.Memo, retry: int, **_: Any) -> None:
    try:
        await _operator(memo).snapshots.take(body)
    except OperatorError as exc:
        raise _temporary(exc, retry) from None


@kopf.on.delete(*SNAPSHOTS)
async def snapshot_deleted(body: kopf.Body, memo: kopf.Memo, retry: int, **_: Any) -> None:
    try:
        await _operator(memo).snapshots.delete(body)
    except OperatorError as exc:
        raise _temporary(exc, retry) from None


@kopf.on.create(*RESTORES)
async def restore_created(body: kopf.Body, memo: kopf.Memo, retry: int, **_: Any) -> None:
    try:
        await _operator(memo).restores.restore(body)
    except OperatorError as exc:
        raise _temporary(exc, retry) from None
