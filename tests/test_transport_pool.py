"""One transport per URL, key and TLS settings (issue 19 item 4: 600 TrueNASConnections to one NAS
were 601 WebSockets): clients of one pool share a socket, against the simulator over real sockets."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from truenas_incus_operator.connections import ConnectionManager
from truenas_incus_operator.connections.config import ConnectionConfig
from truenas_incus_operator.truenas import (
    AuthenticationFailed,
    CallTimeout,
    InstanceConfig,
    Secret,
    Timings,
    TransportError,
    TransportPool,
    TrueNASClient,
)
from truenas_incus_operator.truenas.transports.jsonrpc import JsonRpcTransport

from .fakes import connect_to
from .test_client import serve
from .test_simulator import session as sim_session


def sockets(server: Any) -> int:
    return len(server.websockets)


async def sockets_become(server: Any, count: int) -> None:
    """The server drops a closed socket a moment after the client closes it."""
    for _ in range(100):
        if sockets(server) == count:
            return
        await asyncio.sleep(0.05)
    assert sockets(server) == count


async def pooled(server: Any, pool: TransportPool, **kwargs: Any) -> TrueNASClient:
    return await connect_to(server.ws_url, kwargs.pop("api_key", server.sim.api_key), pool=pool, **kwargs)


async def test_clients_of_one_url_and_key_share_one_socket_and_each_hears_its_events() -> None:
    async with serve("25.10") as (sim, server):
        pool = TransportPool()
        first, second = await pooled(server, pool), await pooled(server, pool)
        assert sockets(server) == 1 and len(pool) == 1
        heard: dict[str, asyncio.Queue[str]] = {"first": asyncio.Queue(), "second": asyncio.Queue()}
        await first.instances.watch(lambda kind, name, fields: heard["first"].put_nowait(name))
        await second.instances.watch(lambda kind, name, fields: heard["second"].put_nowait(name))
        await first.instances.create(InstanceConfig(name="c1", type="CONTAINER", image="debian/bookworm"))
        assert await asyncio.wait_for(heard["second"].get(), 5) == "c1"
        assert await asyncio.wait_for(heard["first"].get(), 5) == "c1"
        # One closes: the other goes on over the same socket, and the closed one hears nothing more.
        await first.close()
        while not heard["first"].empty():
            heard["first"].get_nowait()
        sim.set_power("c1", "STOPPED")
        assert await asyncio.wait_for(heard["second"].get(), 5) == "c1"
        await asyncio.sleep(0.2)
        assert heard["first"].empty(), "a closed client's callback still hears events"
        assert [i.name for i in await second.instances.list_instances()] == ["c1"]
        assert sockets(server) == 1
        # The last one closes the socket.
        await second.close()
        await sockets_become(server, 0)
        assert len(pool) == 0


async def test_other_tls_settings_or_limits_or_keys_never_share() -> None:
    async with serve("25.10") as (_sim, server):
        pool = TransportPool()
        clients = [
            await pooled(server, pool),
            await pooled(server, pool, max_concurrent_calls=5),
            await pooled(server, pool, call_timeout=30.0),
        ]
        assert sockets(server) == 3
        try:
            await pooled(server, pool, api_key="1-" + "x" * 64)
        except AuthenticationFailed:
            pass
        else:
            raise AssertionError("a wrong key was let in over another key's socket")
        await sockets_become(server, 3)
        assert len(pool) == 3, "the refused key's transport is left in the pool"
        for client in clients:
            await client.close()
        await sockets_become(server, 0)


async def test_a_failed_transport_is_not_handed_to_new_clients() -> None:
    """A holder that saw the transport fail (a hung socket) retires it: the next connect opens a
    fresh socket while the other holder keeps the old one until it lets go."""
    async with serve("25.10") as (_sim, server):
        pool = TransportPool()
        first, second = await pooled(server, pool), await pooled(server, pool)
        await first.close(broken=True)
        third = await pooled(server, pool)
        assert sockets(server) == 2
        assert third.transport is not second.transport
        assert await second.instances.list_instances() == []
        await second.close()
        await sockets_become(server, 1)
        assert await third.instances.list_instances() == []
        await third.close()


async def test_a_refused_first_connect_leaves_nothing_for_the_next() -> None:
    async with serve("25.10") as (_sim, server):
        pool = TransportPool()
        server.sim.knobs.hung_calls.add("auth.login_with_api_key")
        try:
            await pooled(server, pool, connect_timeout=0.5)
        except Exception as exc:
            assert type(exc).__name__ in ("CallTimeout", "TransportError"), repr(exc)
        else:
            raise AssertionError("connected through a hung login")
        server.sim.knobs.hung_calls.discard("auth.login_with_api_key")
        assert len(pool) == 0
        client = await pooled(server, pool, connect_timeout=0.5)
        assert await client.instances.list_instances() == []
        await client.close()


async def test_connections_of_one_nas_and_key_open_one_socket() -> None:
    """Through the connection manager, as TrueNASConnections use it: ten connections with the same
    URL and key are one WebSocket; each still has its own cache and its own readiness."""
    async with serve("25.10") as (_sim, server):
        manager = ConnectionManager(resync_seconds=30, retry_max_seconds=5, timings=Timings(call=10, job=60))
        config = ConnectionConfig(url=server.ws_url, api_key=Secret(server.sim.api_key), transport="websocket")
        connections = [await manager.configure(f"tenant/c{i}", config) for i in range(10)]
        for connection in connections:
            await asyncio.wait_for(connection.ready.wait(), 10)
        assert sockets(server) == 1
        await connections[0].client.instances.create(  # type: ignore[union-attr]
            InstanceConfig(name="c1", type="CONTAINER", image="debian/bookworm")
        )
        for connection in connections:
            assert (await connection.refresh_one("c1")) is not None
        for i in range(10):
            await manager.remove(f"tenant/c{i}")
        await sockets_become(server, 0)


async def test_one_ca_read_from_a_file_and_from_a_secret_is_one_socket(tmp_path: Any) -> None:
    """The default connection reads its CA from a file (with its last newline); a TrueNASConnection's
    CA comes from a Secret, stripped: the same CA, so one socket (seen in the README walk-through)."""
    async with serve("25.10", tls=True, cert_dir=tmp_path) as (_sim, server):
        pem = (tmp_path / "ca.crt").read_text()
        pool = TransportPool()
        first = await pooled(server, pool, ca_pem=pem if pem.endswith("\n") else pem + "\n")
        second = await pooled(server, pool, ca_pem=pem.strip())
        assert sockets(server) == 1
        await first.close()
        await second.close()


# ----- review findings on the shared transport (hostile-tenant review, 2026-12-04) --------------------------
async def test_connections_of_one_transport_share_its_job_slots_and_a_namespace_its_half() -> None:
    """Finding 1: job slots were per connection while the call limit is the socket's: a tenant with
    four TrueNASConnections of one key held 4 x 5 job slots, the socket's whole limit."""
    manager = ConnectionManager(resync_seconds=30, retry_max_seconds=5, timings=Timings(call=10, job=60))
    config = ConnectionConfig(url="wss://nas.invalid", api_key=Secret("1-" + "k" * 64))
    first, second = manager.job_slots_for(config), manager.job_slots_for(config)
    assert first is second
    other = ConnectionConfig(url="wss://nas.invalid", api_key=Secret("2-" + "k" * 64))
    assert manager.job_slots_for(other) is not first
    # TrueNAS admits 20 calls a socket but runs 10 (utils/lock.py SoftHardSemaphore(10, 20)), and a
    # 25.10 job holds its call until it ends: jobs take at most 6 of the 10, 4 stay for reads.
    assert (first.jobs, first.per_namespace) == (6, 3), "4 of the 10 running calls stay for reads"
    held = [first.slot("team-a") for _ in range(first.per_namespace)]
    for slot in held:
        await slot.__aenter__()
    try:
        with pytest.raises(TimeoutError):  # the namespace's half is of the socket
            await asyncio.wait_for(second.slot("team-a").__aenter__(), 0.2)
        async with second.slot("team-b"):  # another namespace goes on
            pass
    finally:
        for slot in held:
            await slot.__aexit__(None, None, None)


async def test_a_failed_first_subscribe_does_not_silence_the_next_holder() -> None:
    """Finding 2: the collection was recorded before ``core.subscribe`` answered; when that failed,
    every later holder of the transport skipped the subscribe and heard no events."""
    async with serve("25.10") as (sim, server):
        pool = TransportPool()
        first = await pooled(server, pool, call_timeout=0.5)
        second = await pooled(server, pool, call_timeout=0.5)  # the same socket, held throughout
        sim.knobs.hung_calls.add("core.subscribe")
        with pytest.raises(CallTimeout):
            await first.instances.watch(lambda *args: None)
        sim.knobs.hung_calls.discard("core.subscribe")
        await first.close(broken=True)
        heard: asyncio.Queue[str] = asyncio.Queue()
        await second.instances.watch(lambda kind, name, fields: heard.put_nowait(name))
        await second.instances.create(InstanceConfig(name="c1", type="CONTAINER", image="debian/bookworm"))
        assert await asyncio.wait_for(heard.get(), 5) == "c1"
        await second.close()


async def test_one_holders_ended_wait_does_not_end_anothers_watch_of_the_job() -> None:
    """Finding 3: the first waiter on a job removed its watch for every holder."""
    async with serve("25.10") as (_sim, server):
        pool = TransportPool()
        first, second = await pooled(server, pool), await pooled(server, pool)
        assert first.shared is not None and second.shared is not None
        inner = first.shared.shared.inner
        assert isinstance(inner, JsonRpcTransport) and inner is second.shared.shared.inner
        waits = [asyncio.create_task(c.transport.wait_job(987654)) for c in (first, second)]
        await asyncio.sleep(0.1)
        waits[0].cancel()
        await asyncio.sleep(0.1)
        assert 987654 in inner._jobs, "the other holder's wait lost its watch"
        waits[1].cancel()
        await asyncio.gather(*waits, return_exceptions=True)
        assert 987654 not in inner._jobs
        await first.close()
        await second.close()


async def test_a_transport_whose_key_was_refused_is_not_handed_to_the_next_connect() -> None:
    """Finding 4: a holder that failed while connecting did not retire the transport, so new holders
    kept joining a socket that could no longer log in, and were told "not connected" instead of
    "key refused"."""
    async with serve("25.10", auth_fail_delay=0.0) as (sim, server):
        pool = TransportPool()
        first = await pooled(server, pool, connect_timeout=0.5)
        for key in sim.api_keys.values():
            key.revoked = True
        await server.drop_connections()  # the inner reconnects, and its key is refused
        with pytest.raises((TransportError, AuthenticationFailed)):
            await pooled(server, pool, connect_timeout=0.5)
        with pytest.raises(AuthenticationFailed):  # a fresh transport, told the truth
            await pooled(server, pool, connect_timeout=0.5)
        await first.close()


async def test_a_later_holder_is_not_subscribed_twice_and_hears_each_event_once() -> None:
    """The server-side subscription is one per collection and socket: a holder that subscribes
    after another closed must not ask again (two subscriptions deliver every event twice)."""
    async with serve("25.10") as (sim, server):
        pool = TransportPool()
        keeper = await pooled(server, pool)  # keeps the socket open throughout
        first = await pooled(server, pool)
        await first.instances.watch(lambda *args: None)
        await first.close()
        heard: list[tuple[str, str]] = []
        await keeper.instances.watch(lambda kind, name, fields: heard.append((kind, name)))
        await keeper.instances.create(InstanceConfig(name="c1", type="CONTAINER", image="debian/bookworm"))
        await asyncio.sleep(0.3)
        heard.clear()
        sim.set_power("c1", "STOPPED")
        for _ in range(50):
            if heard:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)
        assert heard == [("changed", "c1")], heard
        await keeper.close()


def test_job_slots_leave_reads_room_among_the_calls_truenas_runs_at_once() -> None:
    """The 11th to 20th calls of a socket wait for one of the first 10 to end: jobs holding 16 of them
    (as 20 - 4 did) would leave the resync query and every read waiting behind minutes-long stops."""
    from truenas_incus_operator.connections.slots import READ_RESERVE, RUNNING_CALLS, JobSlots

    assert RUNNING_CALLS == 10
    for total in (20, 12, 10):
        slots = JobSlots(total)
        assert slots.jobs + READ_RESERVE == RUNNING_CALLS, total
    assert (JobSlots(8).jobs, JobSlots(2).jobs, JobSlots(1).jobs) == (4, 1, 1)  # a lower limit still applies


# ----- 25.x's libvirt domain events (issue 23 item 6) -------------------------------------------------------
@pytest.mark.parametrize("profile", ["25.04.2", "25.10", "26.0", "27.0"])
async def test_a_vm_stopped_behind_the_operators_back_is_seen_stopped_without_waiting_for_a_resync(
    profile: str,
) -> None:
    """25.x sends no CRUD event for a stop, only libvirt's domain events, whose ``status.state`` is a
    libvirt name (SHUTOFF): the cache must read the VM again instead of keeping it RUNNING until
    the next full query (here five minutes away)."""
    async with serve(profile) as (sim, server):
        manager = ConnectionManager(resync_seconds=300, retry_max_seconds=5, timings=Timings(call=10, job=60))
        config = ConnectionConfig(url=server.ws_url, api_key=Secret(sim.api_key), transport="websocket")
        connection = await manager.configure("tenant/nas", config)
        try:
            await seen_stopped_and_started_again(sim, connection)
        finally:
            await manager.remove("tenant/nas")


async def seen_stopped_and_started_again(sim: Any, connection: Any) -> None:
    await asyncio.wait_for(connection.ready.wait(), 10)
    session = sim_session(sim)
    entry = await sim.call(session, "vm.create", [{"name": "web_01", "memory": 512, "autostart": False}])
    await sim.call(session, "vm.start", [entry["id"]])
    assert (await connection.refresh_one("web-01")) is not None

    async def becomes(status: str) -> None:
        for _ in range(200):
            found = connection.cache.get("web-01")
            if found is not None and found.status == status:
                return
            await asyncio.sleep(0.02)
        raise AssertionError(f"still {connection.cache.get('web-01')!r}, expected {status}")

    await becomes("RUNNING")
    for _ in range(200):  # no lookup left over from the start: only the stop's events may tell
        if not connection._lookups:
            break
        await asyncio.sleep(0.02)
    await sim.call(session, "vm.poweroff", [entry["id"]])  # the TrueNAS UI, another client
    await becomes("STOPPED")
    await sim.call(session, "vm.start", [entry["id"]])
    await becomes("RUNNING")
