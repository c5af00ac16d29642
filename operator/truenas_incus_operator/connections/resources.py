"""TrueNASConnection resources and the default connection: configure the connection each one
describes, and keep the resource's status true to the connection (written when it connects, when
it is lost and when its configuration cannot be loaded)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from ..kube import Kube
from ..models import TrueNASConnectionSpec
from ..problems import OperatorError, Problem
from ..settings import Settings
from ..status import ConditionUpdate, applied, as_patch, differs, render_connection, secure_condition, utc_now
from .config import DEFAULT_KEY, resource_loader, settings_loader
from .connection import Connection
from .manager import ConnectionManager

log = logging.getLogger(__name__)
PLURAL = "truenasconnections"


@dataclass
class _Reported:
    namespace: str
    name: str
    generation: int
    status: dict[str, Any]
    secure: ConditionUpdate | None = None


class ConnectionResources:
    def __init__(self, settings: Settings, kube: Kube, manager: ConnectionManager) -> None:
        self.settings = settings
        self.kube = kube
        self.manager = manager
        manager.on_state = self._state_changed
        self._reported: dict[str, _Reported] = {}
        self._writes: dict[str, asyncio.Task[None]] = {}
        self._stale: set[str] = set()

    async def configure_default(self) -> None:
        """The connection from the operator's settings (``TIO_TRUENAS_*``), if any."""
        if not self.settings.truenas_url:
            return
        secure = secure_condition(str(self.settings.truenas_url), self.settings.truenas_insecure_skip_verify)
        if secure[0] == "False":
            log.warning("default connection: %s (%s)", secure[2], secure[1])
        load = settings_loader(self.settings)
        try:
            config = await load()
        except OperatorError as exc:
            await self.manager.unusable(DEFAULT_KEY, exc.problem)
            return
        await self.manager.configure(DEFAULT_KEY, config, reload=load)

    async def sync(self, body: Mapping[str, Any]) -> None:
        """(Re)configures the connection a TrueNASConnection describes, and reports on it."""
        meta = body["metadata"]
        namespace, name = meta["namespace"], meta["name"]
        key = f"{namespace}/{name}"
        deleting = bool(meta.get("deletionTimestamp"))
        if deleting and key in self.manager.connections:
            return  # keep the credentials last loaded: the IncusInstances being deleted still need them
        generation = int(meta.get("generation") or 0)
        reported = self._reported.get(key)
        if reported is None:
            self._reported[key] = _Reported(namespace, name, generation, dict(body.get("status") or {}))
        else:
            # The same record: a copy would miss what a write in flight is about to record, and the
            # next write would then compare with a status the API server no longer holds.
            reported.generation = generation
        try:
            spec = TrueNASConnectionSpec.model_validate(dict(body.get("spec") or {}))
        except ValidationError as exc:
            await self._unusable(key, Problem("InvalidSpec", str(exc.errors()[0]["msg"])))
            return
        self._reported[key].secure = secure_condition(spec.url, bool(spec.tls and spec.tls.insecure_skip_verify))

        load = resource_loader(self.kube, namespace, spec, self.settings.vm_image_server)
        try:
            config = await load()
        except OperatorError as exc:
            await self._unusable(key, exc.problem)
            return
        connection = await self.manager.configure(key, config, reload=load)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(connection.ready.wait(), 15)
        await self._write(key, connection.problem, connection)

    async def remove(self, key: str) -> None:
        self._reported.pop(key, None)
        task = self._writes.pop(key, None)
        if task is not None:
            task.cancel()
        await self.manager.remove(key)

    async def _unusable(self, key: str, problem: Problem) -> None:
        await self.manager.unusable(key, problem)
        await self._write(key, problem, None)

    def _state_changed(self, connection: Connection) -> None:
        """The connection came up or went down: the resource's Ready condition follows."""
        key = connection.key
        if key == DEFAULT_KEY or key not in self._reported:
            return
        self._stale.add(key)
        if key in self._writes:
            return  # the write in flight writes again when it is done: a change is never dropped

        async def write() -> None:
            try:
                while key in self._stale:
                    self._stale.discard(key)
                    await self._write(key, connection.problem, connection)
            finally:
                self._writes.pop(key, None)
                self._stale.discard(key)

        self._writes[key] = asyncio.get_running_loop().create_task(write(), name=f"status {key}")

    async def _write(self, key: str, problem: Problem | None, connection: Connection | None) -> None:
        reported = self._reported.get(key)
        if reported is None:
            return
        client = connection.client if connection is not None and problem is None else None
        status = render_connection(
            reported.status,
            problem,
            generation=reported.generation,
            now=utc_now(),
            version=client.system_version if client else None,
            api_version=client.transport.api_version if client else None,
            transport=client.transport.name if client else None,
            api_family=client.api_family if client else None,
            secure=reported.secure,
        )
        patch = as_patch(status)
        if not differs(reported.status, patch):
            return
        try:
            await self.kube.patch_status(PLURAL, reported.namespace, reported.name, patch)
        except OperatorError as exc:
            log.warning("TrueNASConnection %s: cannot write status: %s", key, exc.problem.message)
            return
        reported.status = applied(reported.status, patch)

    async def close(self) -> None:
        for task in list(self._writes.values()):
            task.cancel()
        for task in list(self._writes.values()):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._writes.clear()
