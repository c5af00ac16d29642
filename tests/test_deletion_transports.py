"""Deleting an IncusInstance over each transport, in process against the simulator (real client, the
operator's graph over a FakeKube): over REST (25.x) too, where the snapshot listing deletion does
first goes over restful.py's routes (a defect once: deletion failed for ever there)."""

from __future__ import annotations

from typing import Any

import pytest

from truenas_incus_operator.app import build
from truenas_incus_operator.connections import Connection, ConnectionConfig
from truenas_incus_operator.instances.resource import LoopState
from truenas_incus_operator.policy import Policy
from truenas_incus_operator.settings import Settings
from truenas_incus_operator.truenas import Secret

from .fakes import LEDGER_NAMESPACE, NOW, FakeKube, resource
from .test_client import client_for, serve


class Kube(FakeKube):
    """No IncusInstanceSnapshot or IncusInstanceRestore holds anything here (holds.confirm lists them)."""

    async def list_objects(self, plural: str, namespace: str) -> list[dict[str, Any]]:
        return []


@pytest.mark.parametrize("transport", ["websocket", "rest"])
@pytest.mark.parametrize("profile", ["25.04.2", "25.10"])
async def test_an_instance_is_deleted_over_either_transport(profile: str, transport: str) -> None:
    async with serve(profile) as (sim, server), client_for(server, transport) as client:
        events: list[tuple[Any, ...]] = []
        settings = Settings(resync_seconds=30.0, ledger_namespace=LEDGER_NAMESPACE)
        operator = build(settings, Kube(), lambda *e: events.append(e), clock=lambda: NOW, policy=Policy())
        url = server.ws_url if transport == "websocket" else server.url
        connection = Connection("<default>", ConnectionConfig(url=url, api_key=Secret("x")), resync_seconds=30)
        connection.attach(client, await client.instances.list_instances())
        operator.connections.connections["<default>"] = connection
        state = LoopState(status={})
        for _ in range(2):
            await operator.loops.reconcile_once(resource("web01"), state, lambda: None)
        assert "web01" in sim.names()
        await operator.deletion.delete(resource("web01", deleting=True), retry=0)
        assert "web01" not in sim.names() and operator.ledger.owned_by("uid-web01") == []
