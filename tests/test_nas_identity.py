"""One identity per NAS, from what the NAS says about itself (issue 19 item 5), with fakes: the
ledger keys ownership on ``system.global.id``, not on how a URL spells the address."""

from __future__ import annotations

from typing import Any

import pytest

from truenas_incus_operator.connections import Connection, ConnectionConfig
from truenas_incus_operator.instances.ledger import Record, record_name
from truenas_incus_operator.instances.resource import LoopState
from truenas_incus_operator.policy import Grant, Policy
from truenas_incus_operator.truenas import CallFailed, Secret, TrueNASClient
from truenas_simulator import Simulator, SimulatorServer

from .fakes import (
    LEDGER_NAMESPACE,
    TRUENAS,
    FakeBackend,
    FakeOperator,
    NoTransport,
    connect_to,
    fake_operator,
    resource,
)

SYSTEM_ID = "0123456789abcdef0123456789abcdef"
NAS = f"nas-{SYSTEM_ID}"


def no_wake() -> None:
    return None


async def one_pass(fake: FakeOperator, body: dict[str, Any]) -> LoopState:
    state = LoopState(status={})
    await fake.operator.loops.reconcile_once(body, state, no_wake)
    return state


def synced(fake: FakeOperator, name: str) -> tuple[str, str]:
    last = fake.kube.statuses(name)[-1]
    condition = next(c for c in last["conditions"] if c["type"] == "Synced")
    return condition["status"], condition["reason"]


def connected(key: str, url: str, backend: FakeBackend, system_id: str = SYSTEM_ID) -> Connection:
    connection = Connection(key, ConnectionConfig(url=url, api_key=Secret("1-test")), resync_seconds=30.0)
    client = TrueNASClient(NoTransport(), backend, (25, 10), "TrueNAS-25.10.1", system_id)  # type: ignore[arg-type]
    connection.attach(client, backend.instances.values())
    return connection


def one_nas_two_spellings(policy: Policy | None = None) -> FakeOperator:
    fake = fake_operator(policy=policy)
    manager = fake.operator.connections
    manager.connections["<default>"] = fake.connection = connected("<default>", "wss://localhost:8443", fake.backend)
    manager.connections["bob/other"] = connected("bob/other", "wss://127.0.0.1:8443", fake.backend)
    return fake


async def test_another_spelling_of_the_nas_url_does_not_let_a_tenant_adopt_an_owned_instance() -> None:
    """The finding: ``wss://localhost:PORT`` and ``wss://127.0.0.1:PORT`` were two identities, so a
    namespace with an adoption grant on its own connection adopted (rewrote, deleted) an instance
    another resource owned through the default connection."""
    fake = one_nas_two_spellings(Policy(adoption=[Grant(namespaces=["bob"], connections=["bob/other"])]))
    await one_pass(fake, resource("payroll", namespace="alice", instance="shared", environment={"A": "1"}))
    assert "shared" in fake.backend.instances
    fake.operator.connections.connections["bob/other"].cache.replace_all(fake.backend.instances.values())
    calls = len(fake.backend.calls)
    thief = resource(
        "thief",
        namespace="bob",
        instance="shared",
        environment={"B": "2"},
        connectionRef={"name": "other"},
        annotations={"incus.truenas.io/adopt": "true"},
    )
    await one_pass(fake, thief)
    assert synced(fake, "thief") == ("False", "Conflict")
    assert fake.backend.calls[calls:] == [], "nothing written to the owned instance"
    assert fake.backend.instances["shared"].environment == {"A": "1"}
    records = [cm["data"] for cm in fake.kube.configmaps.values()]
    assert [(r["truenas"], r["ownerUID"]) for r in records] == [(NAS, "uid-payroll")]


async def test_a_record_keyed_by_the_url_is_migrated_to_the_nas_identity_on_upgrade() -> None:
    """Records an earlier version wrote under ``host:port`` move to the NAS's identity when a
    connection to that address first comes up: the owner keeps its instance, nothing is created."""
    fake = fake_operator(FakeBackend())
    await one_pass(fake, resource())  # an operator of today: identity nas.invalid:443 (no system id)
    old = (LEDGER_NAMESPACE, record_name(TRUENAS, "web01"))
    assert old in fake.kube.configmaps
    upgraded = fake_operator(fake.backend)
    upgraded.kube.configmaps = fake.kube.configmaps
    await upgraded.operator.ledger.load()
    upgraded.operator.connections.connections["<default>"] = upgraded.connection = connected(
        "<default>", "wss://nas.invalid", fake.backend
    )
    calls = len(fake.backend.calls)
    await one_pass(upgraded, resource(environment={"X": "1"}))
    assert synced(upgraded, "web01") == ("True", "ReconcileSuccess")
    assert "create web01" not in fake.backend.calls[calls:]
    assert old not in upgraded.kube.configmaps
    migrated = upgraded.kube.configmaps[(LEDGER_NAMESPACE, record_name(NAS, "web01"))]
    assert Record.from_manifest(migrated) is not None
    assert migrated["data"]["truenas"] == NAS and migrated["data"]["ownerUID"] == "uid-web01"
    assert migrated["data"]["state"] == "created"
    # Deleting the resource deletes the instance through the migrated record.
    await upgraded.operator.deletion.delete(resource(environment={"X": "1"}, deleting=True), 0)
    assert "web01" not in fake.backend.instances
    assert upgraded.kube.configmaps == {}


# ----- the client against the simulator (each supported version, both transports) -------------------
@pytest.mark.parametrize("profile", ["25.04.0", "25.04.2", "25.10", "26.0", "27.0"])
async def test_every_supported_version_answers_the_same_identity_for_every_spelling_of_its_url(profile: str) -> None:
    sim = Simulator(profile)
    server = await SimulatorServer(sim).start()
    try:
        assert "127.0.0.1" in server.ws_url
        seen = set()
        for url in (server.ws_url, server.ws_url.replace("127.0.0.1", "localhost")):
            client = await connect_to(url, sim.api_key)
            try:
                seen.add(client.system_id)
            finally:
                await client.close()
        if profile not in ("26.0", "27.0"):  # the REST facade (deprecated) is gone from 26
            rest = await connect_to(server.url, sim.api_key, transport="rest")
            try:
                seen.add(rest.system_id)
            finally:
                await rest.close()
        assert seen == {sim.system_uuid}, seen
        assert len(sim.system_uuid) == 32
    finally:
        await server.stop()
    assert Simulator(profile).system_uuid != sim.system_uuid, "one identity per NAS"


async def test_a_nas_that_answers_no_system_uuid_is_not_connected() -> None:
    """Hostile server: a missing or malformed identity fails the connect (no ledger key is made up)."""
    sim = Simulator("25.10")
    sim.system_uuid = "../../not-an-id"
    server = await SimulatorServer(sim).start()
    try:
        with pytest.raises(CallFailed, match=r"system\.global\.id"):
            await connect_to(server.ws_url, sim.api_key)
    finally:
        await server.stop()


async def test_a_key_that_may_not_read_the_nas_identity_is_told_which_role_it_needs() -> None:
    """No identity, no ledger key made up from the URL (a tenant could pick a restricted key to get
    a second identity for the same NAS): the connect fails, naming the role."""
    from truenas_incus_operator.truenas import NotAuthorized
    from truenas_incus_operator.truenas.client import read_system_id

    from .fakes import ScriptedTransport

    transport = ScriptedTransport(answers={"system.global.id": NotAuthorized("system.global.id: Not authorized")})
    with pytest.raises(NotAuthorized, match="READONLY_ADMIN"):
        await read_system_id(transport)
