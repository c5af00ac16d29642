"""kopf registration only: every handler hands over to the ``Controller``."""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping
from typing import Any, cast

import kopf

from .connections import ConnectionManager
from .controller import Controller, RetryLater
from .kube import Kube
from .models import API_GROUP, API_VERSION
from .settings import OperatorSettings

INSTANCES = (API_GROUP, API_VERSION, "incusinstances")
CONNECTIONS = (API_GROUP, API_VERSION, "truenasconnections")


def _post_event(body: Mapping[str, Any], kind: str, reason: str, message: str) -> None:
    kopf.event(cast(kopf.Body, body), type=kind, reason=reason, message=message[:1024])


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    settings.persistence.finalizer = f"{API_GROUP}/finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=API_GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=API_GROUP)
    settings.posting.level = logging.WARNING
    settings.networking.request_timeout = 60
    config = OperatorSettings()
    controller = Controller(
        settings=config,
        kube=Kube(),
        connections=ConnectionManager(
            config.resync_seconds, config.retry_max_seconds, config.call_timeout_seconds, config.job_timeout_seconds
        ),
        post_event=_post_event,
    )
    await controller.configure_default()
    memo["controller"] = controller


@kopf.on.cleanup()
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    controller: Controller = memo["controller"]
    await controller.connections.close()
    await controller.kube.close()


@kopf.on.probe(id="truenas")
def probe(memo: kopf.Memo, **_: Any) -> dict[str, str]:
    controller: Controller = memo["controller"]
    return {key: "ready" if c.ready.is_set() else "connecting" for key, c in controller.connections.connections.items()}


@kopf.on.event(*INSTANCES)
async def instance_changed(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    memo["controller"].resource_changed(body)


@kopf.daemon(*INSTANCES, cancellation_timeout=10.0, initial_delay=lambda **_: random.uniform(0, 0.2))
async def instance_loop(body: kopf.Body, stopped: kopf.DaemonStopped, memo: kopf.Memo, **_: Any) -> None:
    await memo["controller"].run_instance(body, stopped)


@kopf.on.delete(*INSTANCES)
async def instance_deleted(body: kopf.Body, retry: int, memo: kopf.Memo, **_: Any) -> None:
    try:
        await memo["controller"].delete_instance(body, retry)
    except RetryLater as exc:
        raise kopf.TemporaryError(exc.problem.message, delay=exc.delay) from None


@kopf.on.event(*CONNECTIONS)
async def connection_changed(type: str | None, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    controller: Controller = memo["controller"]
    if type == "DELETED":
        await controller.connections.remove(f"{body.metadata.namespace}/{body.metadata.name}")
    else:
        await controller.sync_connection(body)
