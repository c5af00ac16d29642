"""Carries out one planned action on TrueNAS, and records what it did (in the connection's cache,
in the ownership annotation, in an Event)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from ..connections import Connection
from ..kube import Kube
from ..models import Phase
from ..reconcile import (
    CREATED_ANNOTATION,
    Action,
    AddDevice,
    Create,
    Delete,
    Desired,
    MarkCreating,
    RemoveDevice,
    Start,
    Stop,
    Update,
    UpdateDevice,
)
from ..truenas import AlreadyExists, InstanceBackend, JobFailed, ObservedInstance, TransportError, TrueNASError
from .reporter import Reporter
from .resource import PLURAL, LoopState, ResourceKey

log = logging.getLogger(__name__)


def is_device_action(action: Action) -> bool:
    return isinstance(action, AddDevice | UpdateDevice | RemoveDevice)


class Executor:
    def __init__(self, kube: Kube, reporter: Reporter) -> None:
        self.kube = kube
        self.reporter = reporter
        self.creating: set[ResourceKey] = set()
        """Resources whose create call is in flight in this process (deletion waits for them)."""

    async def execute(
        self,
        body: Mapping[str, Any],
        state: LoopState,
        desired: Desired,
        connection: Connection,
        observed: ObservedInstance | None,
        action: Action,
    ) -> None:
        backend = _backend(connection)
        name = desired.instance_name
        version = connection.version
        if isinstance(action, MarkCreating):
            await self.kube.patch_annotations(PLURAL, desired.namespace, desired.name, {CREATED_ANNOTATION: name})
            state.annotations[CREATED_ANNOTATION] = name
        elif isinstance(action, Create):
            await self._create(body, state, desired, connection, action)
        elif isinstance(action, Update):
            async with connection.job_slots:
                connection.remember(await backend.update(name, action.changes))
        elif isinstance(action, AddDevice):
            await backend.add_device(name, action.device)
        elif isinstance(action, UpdateDevice):
            await backend.update_device(name, action.device, action.target)
        elif isinstance(action, RemoveDevice):
            await backend.delete_device(name, action.name)
        elif isinstance(action, Start):
            await self.reporter.write(state, desired, observed, activity=Phase.STARTING, version=version)
            async with connection.job_slots:
                await backend.start(name)
            await connection.refresh_one(name)
        elif isinstance(action, Stop):
            await self.reporter.write(state, desired, observed, activity=Phase.STOPPING, version=version)
            await self.stop(connection, name, action.timeout)
            await connection.refresh_one(name)
        elif isinstance(action, Delete):
            async with connection.job_slots:
                await backend.delete(name)
            connection.remember_gone(name)
        if is_device_action(action):
            await connection.refresh_one(name)

    async def _create(
        self, body: Mapping[str, Any], state: LoopState, desired: Desired, connection: Connection, action: Create
    ) -> None:
        key = (desired.namespace, desired.name)
        name = desired.instance_name
        await self.reporter.write(state, desired, None, activity=Phase.CREATING, version=connection.version)
        self.creating.add(key)
        try:
            async with connection.job_slots:
                created = await _backend(connection).create(action.config)
        except AlreadyExists:
            if desired.created_by_us and await connection.refresh_one(name) is not None:
                return  # an earlier attempt (before a crash) created it: it is ours
            # Someone else's instance took the name between our look and our create.
            await self._forget_creation(desired, state)
            await connection.refresh_one(name)
            raise
        except TrueNASError:
            if await connection.refresh_one(name) is None:
                await self._forget_creation(desired, state)
            raise
        finally:
            self.creating.discard(key)
        connection.remember(created)
        self.reporter.post_event(body, "Normal", "Created", f"created {created.type} {name} on TrueNAS")

    async def stop(self, connection: Connection, name: str, timeout: int) -> None:
        """Graceful within ``timeout`` seconds, then forced."""
        backend = _backend(connection)
        async with connection.job_slots:
            try:
                await backend.stop(name, timeout=timeout)
                return
            except JobFailed as exc:
                log.info("graceful stop of %s failed (%s); forcing", name, exc.message)
            await backend.stop(name, force=True)

    async def _forget_creation(self, desired: Desired, state: LoopState) -> None:
        await self.kube.patch_annotations(PLURAL, desired.namespace, desired.name, {CREATED_ANNOTATION: None})
        state.annotations[CREATED_ANNOTATION] = None


def _backend(connection: Connection) -> InstanceBackend:
    if connection.client is None:
        raise TransportError(connection.problem.message if connection.problem else "not connected")
    return connection.client.instances
