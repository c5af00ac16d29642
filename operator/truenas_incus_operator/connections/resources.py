"""TrueNASConnection resources and the default connection: configure the connection each one
describes, and keep the resource's status true to the connection (written when it connects, when
it is lost and when its configuration cannot be loaded).

A configuration that cannot be loaded (its Secret missing, not labelled, bound to other hosts, ...)
is loaded again with a backoff of 1 s doubling to at most ``RELOAD_MAX_SECONDS``, until it loads or
the resource changes: a Secret created or corrected later is used without touching the resource.
Not a Secret watch: kopf would need ``list``/``watch`` on every Secret the operator may read, and
the operator's RBAC on tenants' Secrets stays ``get`` only (docs/security.md; the one Secret it
writes is its credentials' copies, by name, in its own namespace). One GET per Secret per 10 s at most, and
only for connections that cannot be used."""

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
from ..policy import Policy
from ..problems import OperatorError, Problem, Reason
from ..settings import Settings
from ..status import applied, as_patch, differs, render_connection, secure_condition, utc_now
from .config import DEFAULT_KEY, ConnectionConfig, Loader, resource_loader, settings_loader
from .connection import Connection
from .credentials import CredentialCopies
from .manager import ConnectionManager

log = logging.getLogger(__name__)
PLURAL = "truenasconnections"
RELOAD_MIN_SECONDS = 1.0
RELOAD_MAX_SECONDS = 10.0


@dataclass
class _Reported:
    namespace: str
    name: str
    generation: int
    status: dict[str, Any]
    transport_security: tuple[str, bool] | None = None
    """(url, insecureSkipVerify) of the spec: what the Secure condition is about."""
    verified: bool = False
    """A connection with this url and TLS setting was made (its certificate was verified)."""


class ConnectionResources:
    def __init__(
        self, settings: Settings, kube: Kube, manager: ConnectionManager, policy: Policy | None = None
    ) -> None:
        self.settings = settings
        self.policy = policy or Policy()
        self.kube = kube
        self.manager = manager
        manager.on_state = self._state_changed
        self.copies = CredentialCopies(kube, settings.ledger_namespace, settings.credentials_secret)
        self._reported: dict[str, _Reported] = {}
        self._writes: dict[str, asyncio.Task[None]] = {}
        self._stale: set[str] = set()
        self._reloads: dict[str, asyncio.Task[None]] = {}
        """A connection's reload until it is done; a new event cancels one still waiting."""
        self._waiting: set[str] = set()

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
        key = f"{meta['namespace']}/{meta['name']}"
        self._cancel_reload(key)  # this event's body is newer than the one a pending reload holds
        await self._sync(key, body, attempt=0)

    async def _sync(self, key: str, body: Mapping[str, Any], attempt: int) -> None:
        meta = body["metadata"]
        namespace, name = meta["namespace"], meta["name"]
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
            await self._unusable(key, Problem(Reason.INVALID_SPEC, str(exc.errors()[0]["msg"])))
            return
        security = (spec.url, bool(spec.tls and spec.tls.insecure_skip_verify))
        if self._reported[key].transport_security != security:
            self._reported[key].transport_security = security
            self._reported[key].verified = False  # Secure=True again only once this configuration connects
        # A connection being deleted is not refused by the quota: its instances' teardown needs it.
        over = None if deleting else self._over_quota(namespace, key)
        if over is not None:
            await self._unusable(key, over)
            if not deleting:
                self._reload_later(key, body, attempt)  # a connection of the namespace may go meanwhile
            return

        read = resource_loader(self.kube, namespace, spec, self.settings, self.policy, name)

        async def load() -> ConnectionConfig:
            # Every load refreshes the copy, also the connection's own reload after TrueNAS refused
            # the key: a rotated key must reach the copy a teardown may need after a restart.
            loaded = await read()
            await self.copies.keep(key, loaded)
            return loaded

        reload: Loader | None = load
        try:
            config = await load()
        except OperatorError as exc:
            kept = await self.copies.recall(key) if deleting else None
            if kept is None:
                await self._unusable(key, exc.problem)
                if not deleting:
                    self._reload_later(key, body, attempt)
                return
            # Being deleted, its Secret already gone (a namespace torn down, the operator restarted
            # meanwhile): the instances it owns are deleted with the credentials last used.
            log.info(
                "TrueNASConnection %s: %s; deleting its instances with the kept credentials", key, exc.problem.reason
            )
            config, reload = kept, None
        connection = await self.manager.configure(key, config, reload=reload)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(connection.ready.wait(), 15)
        await self._write(key, connection.problem, connection)

    def _over_quota(self, namespace: str, key: str) -> Problem | None:
        """The policy's connection quota: at most ``maxConnections`` of a namespace's TrueNASConnections
        hold a client (and a WebSocket) at once; the others are refused until one goes."""
        label, quota = self.policy.quota_for(namespace)
        if quota.max_connections is None or key in self.manager.connections:
            return None
        used = sum(1 for k in self.manager.connections if k.startswith(f"{namespace}/"))
        if used < quota.max_connections:
            return None
        return Problem(
            Reason.QUOTA_EXCEEDED,
            f"{label}.maxConnections: namespace {namespace} already uses {used} TrueNASConnections, the most "
            f"the policy allows ({quota.max_connections}); it is used once one of them goes",
        )

    def _reload_later(self, key: str, body: Mapping[str, Any], attempt: int) -> None:
        """Loads the configuration again after a backoff: its Secrets may come or be fixed later."""
        self._cancel_reload(key)  # one reload per connection: a sync that ran alongside leaves none behind
        delay = min(RELOAD_MIN_SECONDS * 2 ** min(attempt, 16), RELOAD_MAX_SECONDS)

        async def reload() -> None:
            await asyncio.sleep(delay)
            self._waiting.discard(key)  # from here on an event starts a sync of its own, this one goes on
            await self._sync(key, body, attempt + 1)

        task = asyncio.get_running_loop().create_task(reload(), name=f"reload {key}")
        self._reloads[key] = task
        self._waiting.add(key)

        def done(_: asyncio.Task[None]) -> None:
            if self._reloads.get(key) is task:
                del self._reloads[key]

        task.add_done_callback(done)

    def _cancel_reload(self, key: str, running: bool = False) -> None:
        """Cancels the reload still waiting (or, with ``running``, also one under way)."""
        if key in self._waiting or running:
            task = self._reloads.pop(key, None)
            if task is not None:
                task.cancel()
        self._waiting.discard(key)

    async def remove(self, key: str) -> None:
        self._cancel_reload(key, running=True)
        self._reported.pop(key, None)
        task = self._writes.pop(key, None)
        if task is not None:
            task.cancel()
        await self.manager.remove(key)
        await self.copies.forget(key)

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
        if client is not None:
            reported.verified = True
        security = reported.transport_security
        secure = None if security is None else secure_condition(*security, verified=reported.verified)
        status = render_connection(
            reported.status,
            problem,
            generation=reported.generation,
            now=utc_now(),
            version=client.system_version if client else None,
            api_version=client.transport.api_version if client else None,
            transport=client.transport.name if client else None,
            api_family=client.api_family if client else None,
            secure=secure,
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
        reloads = list(self._reloads.values())
        self._reloads.clear()
        self._waiting.clear()
        for reload in reloads:
            reload.cancel()
        for reload in reloads:
            with contextlib.suppress(asyncio.CancelledError):
                await reload
        for task in list(self._writes.values()):
            task.cancel()
        for task in list(self._writes.values()):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._writes.clear()
