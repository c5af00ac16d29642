"""Deleting an IncusInstance: stop and delete its instance on TrueNAS (or leave it, with
``deletionPolicy: Orphan``). kopf keeps the finalizer until this succeeds."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping
from typing import Any

from ..connections import ConnectionManager
from ..models import Phase
from ..problems import OperatorError, Problem, fail, problem_of
from ..reconcile import plan_delete
from ..settings import Settings
from ..truenas import NotFound, TrueNASError
from .executor import Executor
from .reporter import Reporter
from .resource import LoopState, ResourceKey, connection_key, desired_from, resource_key

CONNECT_WAIT_SECONDS = 10.0
DELETE_ATTEMPTS = 4


class Deletion:
    def __init__(
        self, settings: Settings, connections: ConnectionManager, reporter: Reporter, executor: Executor
    ) -> None:
        self.settings = settings
        self.connections = connections
        self.reporter = reporter
        self.executor = executor
        self._posted: dict[ResourceKey, LoopState] = {}
        """Per resource being deleted: which problem was posted last (one Event per distinct problem)."""

    def forget(self, key: ResourceKey) -> None:
        self._posted.pop(key, None)

    async def delete(self, body: Mapping[str, Any], retry: int) -> None:
        """Raises ``OperatorError`` with ``retry_after`` when deletion cannot finish yet."""
        desired = desired_from(body)
        key = resource_key(body)
        state = LoopState(status=dict(body.get("status") or {}))
        version = None
        try:
            if desired.deletion_policy == "Orphan":
                self.reporter.post_event(
                    body, "Normal", "Orphaned", f"left {desired.instance_name} on TrueNAS (deletionPolicy: Orphan)"
                )
                self.forget(key)
                return
            connection = self.connections.get(connection_key(desired.namespace, desired.spec))
            if not connection.ready.is_set():
                try:
                    await asyncio.wait_for(connection.ready.wait(), CONNECT_WAIT_SECONDS)
                except TimeoutError:
                    problem = connection.problem or Problem("Unreachable", "TrueNAS is not connected")
                    raise OperatorError(problem) from None
            version = connection.version
            if (desired.namespace, desired.name) in self.executor.creating:
                raise fail("CreateInProgress", f"{desired.instance_name} is being created", retry_after=1.0)
            for _ in range(DELETE_ATTEMPTS):
                observed = await connection.refresh_one(desired.instance_name)
                current = plan_delete(desired, observed)
                if current.waiting:
                    await asyncio.sleep(1)
                    continue
                if not current.actions:
                    client = connection.client
                    if (
                        observed is None
                        and desired.created_by_us
                        and client is not None
                        and await client.instances.create_in_progress(desired.instance_name)
                    ):
                        # Started before a crash: it would leave an instance behind once it ends.
                        raise fail(
                            "CreateInProgress",
                            f"a create job for {desired.instance_name} is still running",
                            retry_after=2.0,
                        )
                    if observed is None and desired.may_manage_existing:
                        self.reporter.post_event(
                            body, "Normal", "Deleted", f"deleted {desired.instance_name} on TrueNAS"
                        )
                    self.forget(key)
                    return
                await self.reporter.write(state, desired, observed, activity=Phase.DELETING, version=version)
                for action in current.actions:
                    try:
                        await self.executor.execute(body, state, desired, connection, observed, action)
                    except NotFound:
                        connection.remember_gone(desired.instance_name)
            raise fail("DeleteFailed", "the instance is still there after deleting it")
        except OperatorError as exc:
            if exc.retry_after is not None:
                raise  # waiting for something that will end by itself (a create in flight): no report
            problem = exc.problem
        except TrueNASError as exc:
            reason = problem_of(exc)
            problem = Problem("DeleteFailed", f"{reason.reason}: {reason.message}")
        delay = min(self.settings.retry_max_seconds, self.settings.retry_min_seconds * 2.0**retry)
        with contextlib.suppress(OperatorError):  # the status is a report; deletion goes on either way
            await self.reporter.write(state, desired, None, problem=problem, version=version)
        self.reporter.post_once(body, self._posted.setdefault(key, state), "Warning", problem.reason, problem.message)
        raise OperatorError(problem, retry_after=delay)
