"""kopf registration only: every handler hands over to the ``Operator`` built at startup."""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping
from typing import Any, cast

import kopf

from .app import Operator, build
from .kube import Kube, kopf_login
from .models import API_GROUP, API_VERSION
from .policy import PolicyError
from .problems import OperatorError
from .settings import Settings

INSTANCES = (API_GROUP, API_VERSION, "incusinstances")
CONNECTIONS = (API_GROUP, API_VERSION, "truenasconnections")


def _post_event(body: Mapping[str, Any], kind: str, reason: str, message: str) -> None:
    kopf.event(cast(kopf.Body, body), type=kind, reason=reason, message=message[:1024])


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
    settings.persistence.finalizer = f"{API_GROUP}/finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=API_GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=API_GROUP)
    settings.posting.level = logging.WARNING
    settings.networking.request_timeout = 60
    try:
        settings_ = Settings()
        operator = build(settings_, Kube(settings_.kube_timeout_seconds), _post_event)
    except PolicyError as exc:
        # Never run with a policy other than the administrator's: stop instead of allowing everything.
        raise kopf.PermanentError(str(exc)) from None
    try:
        await operator.ledger.load()  # before any loop acts: ownership survives restarts
    except OperatorError as exc:
        await operator.close()
        raise kopf.PermanentError(f"cannot read the ownership ledger: {exc.problem.message}") from None
    try:
        operator.serve_metrics()
    except OSError as exc:
        await operator.close()
        raise kopf.PermanentError(f"cannot serve metrics on TIO_METRICS_PORT: {exc}") from None
    await operator.connection_resources.configure_default()
    memo["operator"] = operator


@kopf.on.cleanup()
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    await _operator(memo).close()


@kopf.on.probe(id="truenas")
def probe(memo: kopf.Memo, **_: Any) -> dict[str, str]:
    connections = _operator(memo).connections.connections
    return {key: "ready" if c.ready.is_set() else "connecting" for key, c in connections.items()}


@kopf.on.event(*INSTANCES)
async def instance_changed(type: str | None, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    wakeups = _operator(memo).wakeups
    if type == "DELETED":
        wakeups.resource_deleted((body.metadata.namespace or "", body.metadata.name or ""))
    else:
        wakeups.resource_changed(body)


@kopf.daemon(*INSTANCES, cancellation_timeout=10.0, initial_delay=lambda **_: random.uniform(0, 0.2))
async def instance_loop(body: kopf.Body, stopped: kopf.DaemonStopped, memo: kopf.Memo, **_: Any) -> None:
    await _operator(memo).loops.run(body, stopped)


@kopf.on.delete(*INSTANCES)
async def instance_deleted(body: kopf.Body, retry: int, memo: kopf.Memo, **_: Any) -> None:
    try:
        await _operator(memo).deletion.delete(body, retry)
    except OperatorError as exc:
        raise kopf.TemporaryError(exc.problem.message, delay=exc.retry_after or 0) from None


@kopf.index(*INSTANCES)
def instances_by_connection(namespace: str | None, spec: kopf.Spec, **_: Any) -> dict[tuple[str, str], bool]:
    """IncusInstances by the TrueNASConnection they name: a connection in use is not let go."""
    reference = spec.get("connectionRef") or {}
    name = reference.get("name") if isinstance(reference, Mapping) else None
    return {(namespace or "", str(name)): True} if name else {}


@kopf.on.delete(*CONNECTIONS)
async def connection_deleted(body: kopf.Body, memo: kopf.Memo, **kwargs: Any) -> None:
    """Keeps the finalizer (and the credentials last loaded) until no IncusInstance uses it."""
    index = cast(kopf.Index[tuple[str, str], bool], kwargs["instances_by_connection"])
    namespace, name = body.metadata.namespace or "", body.metadata.name or ""
    users = index.get((namespace, name))
    if users:
        raise kopf.TemporaryError(f"still used by {len(users)} IncusInstance(s); waiting for them to go", delay=5)
    await _operator(memo).connection_resources.remove(f"{namespace}/{name}")


@kopf.on.event(*CONNECTIONS)
async def connection_changed(type: str | None, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    resources = _operator(memo).connection_resources
    if type == "DELETED":
        await resources.remove(f"{body.metadata.namespace}/{body.metadata.name}")
    else:
        await resources.sync(body)
