"""The TrueNAS client against the simulator over real sockets: both transports, every profile."""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from truenas_incus_operator.truenas import (
    UNSET,
    APIUnavailable,
    AuthenticationFailed,
    CallFailed,
    CallTimeout,
    DeviceConfig,
    ImageNotFound,
    InstanceChanges,
    InstanceConfig,
    JobFailed,
    NotAuthorized,
    NotFound,
    TransportError,
    TrueNASClient,
    ValidationFailed,
)
from truenas_incus_operator.truenas.transports.base import ConnectionOptions, Secret
from truenas_simulator import ApiKey, Simulator, SimulatorServer
from truenas_simulator.tls import CertificateAuthority, server_context

from .fakes import connect_to

GIB = 2**30
Served = tuple[Simulator, SimulatorServer]


@asynccontextmanager
async def serve(
    profile: str = "25.10", tls: bool = False, cert_dir: Path | None = None, **knobs: Any
) -> AsyncIterator[Served]:
    sim = Simulator(profile, seed=7)  # fault injection draws from a seeded RNG: runs are repeatable
    knobs.setdefault("scram_iterations", 50_000)  # TrueNAS 26's SCRAM: 500 000 rounds cost ~0.5 s a side
    for key, value in knobs.items():
        setattr(sim.knobs, key, value)
    context, certificate = None, None
    if tls:
        assert cert_dir is not None
        context = server_context(CertificateAuthority.create("test CA"), cert_dir, ["localhost", "127.0.0.1"])
        certificate = (cert_dir / "server.crt").read_bytes()  # SCRAM's channel binding checks its hash
    server = await SimulatorServer(sim, ssl_context=context, certificate=certificate).start()
    try:
        yield sim, server
    finally:
        await server.stop()


@asynccontextmanager
async def client_for(server: SimulatorServer, transport: str, **kwargs: Any) -> AsyncIterator[TrueNASClient]:
    url = server.ws_url if transport == "websocket" else server.url
    client = await connect_to(url, kwargs.pop("api_key", server.sim.api_key), transport=transport, **kwargs)
    try:
        yield client
    finally:
        await client.close()


PROFILES = ["25.04.0", "25.04.2", "25.10"]
TRANSPORTS = ["websocket", "rest"]


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("profile", PROFILES)
async def test_lifecycle(profile: str, transport: str) -> None:
    async with serve(profile) as (sim, server), client_for(server, transport) as client:
        backend = client.instances
        assert client.api_family == (
            "virt.instance+vm" if profile != "25.04.0" and transport == "websocket" else "virt.instance"
        )
        assert client.version[:2] == {"25.04.0": (25, 4), "25.04.2": (25, 4), "25.10": (25, 10)}[profile]
        config = InstanceConfig(
            name="web01",
            type="CONTAINER",
            image="debian/bookworm",
            cpu="2",
            memory=2 * GIB,
            environment={"TZ": "UTC"},
            devices=(DeviceConfig("data", "DISK", source="/mnt/tank/data", destination="/data"),),
        )
        created = await backend.create(config)
        assert created.status == "RUNNING" and created.memory == 2 * GIB and created.addresses
        assert sim.instances["web01"].environment == {"TZ": "UTC"}

        updated = await backend.update("web01", InstanceChanges(cpu="4", memory=UNSET, autostart=False))
        assert (updated.cpu, updated.memory, updated.autostart) == ("4", None, False)
        assert sim.instances["web01"].cpu == "4"

        await backend.stop("web01", timeout=5)
        stopped = await backend.get_instance("web01")
        assert stopped is not None and stopped.status == "STOPPED" and stopped.addresses == ()
        await backend.start("web01")
        assert sim.instances["web01"].status == "RUNNING"

        proxy = DeviceConfig(
            "http",
            "PROXY",
            extra={"source_proto": "TCP", "source_port": 8080, "dest_proto": "TCP", "dest_port": 80},
        )
        await backend.add_device("web01", proxy)
        await backend.update_device(
            "web01", DeviceConfig("data", "DISK", source="/mnt/tank/data", destination="/srv", readonly=True)
        )
        devices = {d.name: d for d in await backend.list_devices("web01")}
        assert devices["eth0"].inherited and devices["root"].inherited
        assert devices["data"].destination == "/srv" and devices["data"].readonly
        assert devices["http"].extra["source_port"] == 8080
        await backend.delete_device("web01", "http")
        assert "http" not in sim.instances["web01"].devices

        assert [i.name for i in await backend.list_instances()] == ["web01"]
        await backend.delete("web01")
        assert await backend.get_instance("web01") is None
        assert sim.instances == {}


async def test_vm_on_25_04_0() -> None:
    async with serve("25.04.0") as (sim, server), client_for(server, "websocket") as client:
        vm = await client.instances.create(InstanceConfig(name="vm1", type="VM", image="ubuntu/noble", autostart=False))
        assert vm.type == "VM" and vm.status == "STOPPED"
        assert sim.instances["vm1"].type == "VM"
        assert client.instances.unsupported_fields(InstanceConfig(name="x", type="VM", image="i")) == []
    # From 25.04.2 on VMs live in vm.* (test_client_vm.py), which the REST facade does not map.
    async with serve("25.10") as (_sim, server), client_for(server, "rest") as client:
        assert client.instances.unsupported_fields(InstanceConfig(name="x", type="VM", image="i")) == ["type"]
        with pytest.raises(ValidationFailed) as caught:
            await client.instances.create(InstanceConfig(name="vm1", type="VM", image="ubuntu/noble"))
        assert caught.value.errors[0].attribute == "virt_instance_create.instance_type"


# ----- each error class -----------------------------------------------------------------------------------
@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_validation_error_carries_truenas_field_errors(transport: str) -> None:
    async with serve("25.10", host_memory=GIB) as (_sim, server), client_for(server, transport) as client:
        with pytest.raises(ValidationFailed) as caught:
            await client.instances.create(
                InstanceConfig(name="big", type="CONTAINER", image="debian/bookworm", memory=2 * GIB)
            )
        error = caught.value
        assert [(e.attribute, e.message) for e in error.errors] == [
            ("virt_instance_create.memory", "Cannot reserve more than physical memory")
        ]
        assert error.job_id is not None or transport == "websocket"
        assert "Cannot reserve more than physical memory" in str(error)


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_not_found(transport: str) -> None:
    async with serve("25.10") as (_sim, server), client_for(server, transport) as client:
        with pytest.raises(NotFound) as caught:
            await client.instances.update("ghost", InstanceChanges(cpu="1"))
        assert "VirtInstance ghost does not exist" in str(caught.value)
        with pytest.raises(NotFound):
            await client.instances.delete("ghost")
        assert await client.instances.get_instance("ghost") is None


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_wrong_key_is_refused(transport: str) -> None:
    async with serve("25.10") as (_sim, server):
        with pytest.raises(AuthenticationFailed) as caught:
            async with client_for(server, transport, api_key="1-not-the-key"):
                pass
        assert "not-the-key" not in str(caught.value)


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_read_only_key_is_not_authorised_to_write(transport: str) -> None:
    async with serve("25.10") as (sim, server):
        sim.api_keys[2] = ApiKey(id=2, secret="reader", readonly=True)
        async with client_for(server, transport, api_key="2-reader") as client:
            assert await client.instances.list_instances() == []
            with pytest.raises(NotAuthorized):
                await client.instances.start("web01")


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_call_and_job_failures(transport: str) -> None:
    async with serve("25.10") as (_sim, server), client_for(server, transport) as client:
        # The create job fails with Incus's wording; the backend names the error's kind.
        with pytest.raises(ImageNotFound) as caught:
            await client.instances.create(InstanceConfig(name="x1", type="CONTAINER", image="nosuch/os"))
        assert "Image not found: nosuch/os" in caught.value.message
        await client.instances.create(InstanceConfig(name="c1", type="CONTAINER", image="debian/bookworm"))
        with pytest.raises(JobFailed, match="already running"):
            await client.instances.start("c1")
        with pytest.raises(CallFailed, match=r"Device not found\."):
            await client.instances.delete_device("c1", "ghost")


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_unreachable_and_timeouts(transport: str) -> None:
    async with serve("25.10") as (_sim, server):
        port = server.port
    with pytest.raises(TransportError):
        await connect_to(
            f"{'ws' if transport == 'websocket' else 'http'}://127.0.0.1:{port}", "1-x", transport=transport
        )
    async with (
        serve("25.10", hung_methods={"virt.instance.start"}) as (_sim, server),
        client_for(server, transport, job_timeout=0.5) as client,
    ):
        await client.instances.create(
            InstanceConfig(name="c1", type="CONTAINER", image="debian/bookworm", autostart=False)
        )
        with pytest.raises(CallTimeout):
            await client.instances.start("c1")


async def test_rest_5xx_is_retried_for_reads() -> None:
    async with serve("25.10", rest_5xx_rate=0.25) as (sim, server), client_for(server, "rest") as client:
        for _ in range(10):
            assert await client.instances.list_instances() == []
        assert sim.counters.faults["rest_5xx"] >= 2, "the seeded RNG should have injected some 502s"
        sim.knobs.rest_5xx_rate = 1.0
        with pytest.raises(TransportError, match="HTTP 502"):
            await client.instances.list_instances()
        with pytest.raises(TransportError, match="HTTP 502"):
            await client.instances.start("c1")  # a write is not retried
        assert sim.counters.by_method["virt.instance.start"] == 0


# ----- connection drops, concurrency, events ---------------------------------------------------------
@pytest.mark.parametrize("profile", ["25.04.2", "25.10"])
async def test_connection_dropped_mid_job_is_followed_after_reconnect(profile: str) -> None:
    async with serve(profile, job_duration=0.6) as (sim, server), client_for(server, "websocket") as client:
        create = asyncio.create_task(
            client.instances.create(InstanceConfig(name="c1", type="CONTAINER", image="debian/bookworm"))
        )
        await asyncio.sleep(0.3)
        assert await server.drop_connections() == 1
        created = await asyncio.wait_for(create, 15)
        assert created.status == "RUNNING"
        assert len(sim.instances) == 1
        # The connection came back, logged in again, and works.
        assert [i.name for i in await client.instances.list_instances()] == ["c1"]
        assert sim.counters.by_method["auth.login_with_api_key"] == 2


async def test_reads_retry_after_a_drop_but_writes_do_not() -> None:
    async with serve("25.10", latency=0.3) as (sim, server), client_for(server, "websocket") as client:
        read = asyncio.create_task(client.instances.list_instances())
        await asyncio.sleep(0.1)
        await server.drop_connections()
        assert await asyncio.wait_for(read, 10) == []
        sim.knobs.latency = 0.3
        containers = getattr(client.instances, "containers", client.instances)  # past the routing's reads
        write = asyncio.create_task(containers.delete_device("c1", "x"))
        await asyncio.sleep(0.1)
        await server.drop_connections()
        with pytest.raises(TransportError):
            await write


async def test_at_most_twenty_calls_in_flight() -> None:
    async with serve("25.10", latency=0.2) as (_sim, server):
        # The simulator refuses the 21st concurrent call, as TrueNAS does ...
        async with client_for(server, "websocket", max_concurrent_calls=40) as greedy:
            results = await asyncio.gather(
                *(greedy.instances.list_instances() for _ in range(30)), return_exceptions=True
            )
            refused = [r for r in results if isinstance(r, CallFailed)]
            assert refused and "Maximum number of concurrent calls (20) has exceeded" in str(refused[0])
        # ... and the client, by default, never sends it.
        async with client_for(server, "websocket") as client:
            results = await asyncio.gather(
                *(client.instances.list_instances() for _ in range(30)), return_exceptions=True
            )
            assert results == [[]] * 30


async def test_watch_reports_out_of_band_changes() -> None:
    async with serve("25.10") as (sim, server), client_for(server, "websocket") as client:
        await client.instances.create(InstanceConfig(name="c1", type="CONTAINER", image="debian/bookworm"))
        events: asyncio.Queue[tuple[str, str, Any]] = asyncio.Queue()
        await client.instances.watch(lambda kind, name, fields: events.put_nowait((kind, name, fields)))
        sim.set_power("c1", "STOPPED")
        kind, name, fields = await asyncio.wait_for(events.get(), 5)
        assert (kind, name, fields) == ("changed", "c1", {"status": "STOPPED"})
        # Subscriptions survive a reconnect.
        await server.drop_connections()
        await asyncio.sleep(0.5)
        sim.set_power("c1", "RUNNING")
        kind, name, fields = await asyncio.wait_for(events.get(), 10)
        assert fields == {"status": "RUNNING"}
    async with serve("25.10") as (sim, server), client_for(server, "rest") as client:
        assert client.transport.supports_events is False
        await client.instances.watch(lambda *a: None)  # nothing to follow over REST, and no error


# ----- version detection -----------------------------------------------------------------------------------
async def test_truenas_26_is_detected_and_served_by_container_backend() -> None:
    async with serve("26.0") as (sim, server):
        client = await connect_to(server.ws_url, sim.api_key)
        try:
            assert client.api_family == "container+vm" and client.version[:2] == (26, 0)
        finally:
            await client.close()
        with pytest.raises(APIUnavailable, match="REST"):
            await connect_to(server.url, sim.api_key, transport="rest")


# ----- TLS and secrets ------------------------------------------------------------------------------------
async def test_tls_is_verified(tmp_path: Path) -> None:
    async with serve("25.10", tls=True, cert_dir=tmp_path) as (sim, server):
        ca = (tmp_path / "ca.crt").read_text()
        async with client_for(server, "websocket", ca_pem=ca) as client:
            assert await client.instances.list_instances() == []
        async with client_for(server, "rest", ca_pem=ca) as client:
            assert await client.instances.list_instances() == []
        for transport in TRANSPORTS:
            with pytest.raises(TransportError, match=r"(?i)certificate"):
                await connect_to(
                    server.ws_url if transport == "websocket" else server.url, sim.api_key, transport=transport
                )
        async with client_for(server, "websocket", insecure_skip_verify=True) as client:
            assert await client.instances.list_instances() == []


async def test_api_key_never_appears_in_logs_or_errors(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    texts: list[str] = []
    async with serve("25.10", job_duration=0.2) as (sim, server):
        key = sim.api_key
        secret = key.split("-", 1)[1]
        calls: list[Callable[[TrueNASClient], Awaitable[Any]]] = [
            lambda c: c.instances.create(InstanceConfig(name="bad_name", type="CONTAINER", image="debian/bookworm")),
            lambda c: c.instances.update("ghost", InstanceChanges(cpu="1")),
            lambda c: c.instances.start("ghost"),
        ]
        for transport in TRANSPORTS:
            async with client_for(server, transport) as client:
                texts.append(repr(client.transport.__dict__))
                for call in calls:
                    with pytest.raises(Exception) as caught:
                        await call(client)
                    texts += [str(caught.value), repr(caught.value)]
            with pytest.raises(AuthenticationFailed) as refused:
                await connect_to(
                    server.ws_url if transport == "websocket" else server.url, key + "x", transport=transport
                )
            texts.append(str(refused.value))
        await server.drop_connections()
    texts += [r.getMessage() for r in caplog.records]
    assert not [t for t in texts if secret in t]


def test_ssl_context_verifies_by_default() -> None:
    from truenas_incus_operator.truenas import ssl_context

    context = ssl_context()
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname


async def test_drop_rate_knob_drops_connections_and_reads_recover() -> None:
    async with serve("25.10") as (sim, server), client_for(server, "websocket") as client:
        sim.knobs.drop_rate = 0.1  # any call may be dropped, the reconnect's login included
        for _ in range(15):
            assert await client.instances.list_instances() == []
        sim.knobs.drop_rate = 0.0
        assert sim.counters.faults["dropped"] >= 1, "the seeded RNG should have dropped some calls"
        # Each connection attempt starts by asking for the login mechanisms (a dropped one ends it
        # before the login), and each drop costs one new attempt.
        assert sim.counters.by_method["auth.mechanism_choices"] == 1 + sim.counters.faults["dropped"]
        assert sim.counters.by_method["auth.login_with_api_key"] <= sim.counters.by_method["auth.mechanism_choices"]


# ----- faults injected live (issue 12, item 6) ---------------------------------------------------------------
@pytest.mark.parametrize("profile", ["25.04.2", "25.10"])
async def test_a_job_wait_fails_when_its_connection_is_closed_and_the_job_goes_on(profile: str) -> None:
    """The operator rebuilds its client after a lost connection: a job followed on the old one was
    stranded until the job timeout (15 min), its wait swallowing "connection closed"."""
    async with serve(profile, job_duration=2.0) as (sim, server):
        old = await connect_to(server.ws_url, sim.api_key, transport="websocket", job_timeout=600)
        create = asyncio.create_task(
            old.instances.create(InstanceConfig(name="c1", type="CONTAINER", image="debian/bookworm"))
        )
        await asyncio.sleep(0.3)
        await old.close()
        with pytest.raises(TransportError, match="closed"):
            await asyncio.wait_for(create, 2)
        # The job runs on; the new connection finds it and sees its result.
        async with client_for(server, "websocket") as new:
            assert await new.instances.create_in_progress("c1")
            for _ in range(100):
                if not await new.instances.create_in_progress("c1"):
                    break
                await asyncio.sleep(0.1)
            found = await new.instances.get_instance("c1")
            assert found is not None and found.status == "RUNNING"


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_hung_truenas_is_reported_after_one_read_timeout_not_three(transport: str) -> None:
    """A timed-out read was retried like a dropped one: a hung TrueNAS took 3 x 60 s to report.
    A timeout is an answer about TrueNAS, not about the connection: reads are not retried after it,
    and their own default timeout is shorter than a write's."""
    assert ConnectionOptions(url="wss://nas", api_key=Secret("1-x")).read_timeout <= 20
    kwargs = {"call_timeout": 600, "read_timeout": 1.0}
    async with serve("25.10") as (sim, server), client_for(server, transport, **kwargs) as client:
        sim.knobs.hung_calls = {"virt.instance.query"}
        before = sim.counters.by_method["virt.instance.query"]
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(CallTimeout):
            await asyncio.wait_for(client.instances.list_instances(), 60)
        assert loop.time() - started < 2.5, "a read times out after the read timeout, not the call timeout"
        assert sim.counters.by_method["virt.instance.query"] - before == 1, "a timed-out read is not retried"


async def test_frames_that_are_json_but_not_objects_are_logged_and_skipped(caplog: pytest.LogCaptureFixture) -> None:
    """A valid JSON frame that is not an object killed the reader: a reconnect, and another with every
    such frame (a storm), the cause never logged."""
    async with serve("25.10") as (sim, server), client_for(server, "websocket") as client:
        with caplog.at_level(logging.WARNING, logger="truenas_incus_operator"):
            for frame in ("[1, 2, 3]", '"hello"', "42", "null", '{"id": "x", "result": 1}'):
                assert await server.send_raw(frame) == 1
            assert await client.instances.list_instances() == []
        assert sim.counters.by_method["auth.login_with_api_key"] == 1, "the connection was never lost"
        skipped = [r.getMessage() for r in caplog.records if "not a JSON object" in r.getMessage()]
        assert len(skipped) == 4 and "list" in skipped[0]
