"""The simulator behaves as truenas-api.md documents TrueNAS: validation wording, jobs, rules, profiles."""

from __future__ import annotations

import asyncio
from typing import Any

import jsonschema
import pytest

from truenas_simulator import Simulator
from truenas_simulator.context import Session
from truenas_simulator.errors import CallError, MethodNotFound, ValidationErrors
from truenas_simulator.validation import load_schema

GIB = 2**30
MIB = 2**20


def session(sim: Simulator, **kwargs: Any) -> Session:
    s = Session(**kwargs)
    assert sim.auth.authenticate_key(sim.api_key, s) == "SUCCESS"
    return s


async def run_job(sim: Simulator, method: str, *params: Any, api_version: str = "current") -> dict[str, Any]:
    """Calls a job method the legacy way (job id first) and returns the finished job object."""
    job_id = await sim.call(session(sim, api_version=api_version), method, list(params))
    assert isinstance(job_id, int)
    job = sim.jobs.jobs[job_id]
    await asyncio.wait_for(job.done.wait(), 10)
    return job.as_dict(sim.profile.message_ids)


async def create(sim: Simulator, **payload: Any) -> dict[str, Any]:
    body = {"name": "c1", "image": "debian/bookworm", **payload}
    return await run_job(sim, "virt.instance.create", body)


def field_errors(job: dict[str, Any]) -> list[list[Any]]:
    assert job["state"] == "FAILED", job
    assert job["exc_info"]["type"] == "VALIDATION"
    extra: list[list[Any]] = job["exc_info"]["extra"]
    return extra


# ----- validation wording ---------------------------------------------------------------------------
BAD_CREATE_PAYLOADS = [
    ("memory-too-small", {"memory": 1024}, "virt_instance_create.memory", "Value error, Value must be 32MiB or larger"),
    ("memory-as-string", {"memory": "2G"}, "virt_instance_create.memory", "Input should be a valid integer"),
    ("autostart-as-int", {"autostart": 1}, "virt_instance_create.autostart", "Input should be a valid boolean"),
    ("unknown-field", {"colour": "red"}, "virt_instance_create.colour", "Extra inputs are not permitted"),
    ("cpu-as-int", {"cpu": 2}, "virt_instance_create.cpu", "Input should be a valid string"),
    ("vm-on-25.10", {"instance_type": "VM"}, "virt_instance_create.instance_type", "Input should be 'CONTAINER'"),
    ("empty-name", {"name": ""}, "virt_instance_create.name", "String should have at least 1 character"),
    (
        "env-key",
        {"environment": {"1 bad": "x"}},
        "virt_instance_create.environment.1 bad.[key]",
        "Value error, ENV_KEY must not be empty, should start with alphanumeric characters, "
        "should not contain whitespaces, and can have _ and /",
    ),
    (
        "env-value-blank",
        {"environment": {"TZ": "  "}},
        "virt_instance_create.environment.TZ",
        "Value error, ENV_VALUE must have at least one non-whitespace character to be considered valid",
    ),
    (
        "device-unknown-type",
        {"devices": [{"dev_type": "FLOPPY"}]},
        "virt_instance_create.devices.0",
        "Input tag 'FLOPPY' found using 'dev_type' does not match any of the expected tags: "
        "'DISK', 'GPU', 'PROXY', 'TPM', 'USB', 'NIC', 'PCI', 'CDROM'",
    ),
    (
        "proxy-port-missing",
        {"devices": [{"dev_type": "PROXY", "source_proto": "TCP", "dest_proto": "TCP", "dest_port": 80}]},
        "virt_instance_create.devices.0.PROXY.source_port",
        "Field required",
    ),
    (
        "proxy-port-range",
        {
            "devices": [
                {"dev_type": "PROXY", "source_proto": "TCP", "source_port": 0, "dest_proto": "TCP", "dest_port": 80}
            ]
        },
        "virt_instance_create.devices.0.PROXY.source_port",
        "Input should be greater than or equal to 1",
    ),
    (
        "nic-bad-mac",
        {"devices": [{"dev_type": "NIC", "nic_type": "BRIDGED", "parent": "br0", "mac": "nope"}]},
        "virt_instance_create.devices.0.NIC.mac",
        "Value error, MAC address is not valid.",
    ),
    (
        "root-disk-too-small",
        {"root_disk_size": 1},
        "virt_instance_create.root_disk_size",
        "Input should be greater than or equal to 5",
    ),
]


@pytest.mark.parametrize(
    "payload,attribute,message", [c[1:] for c in BAD_CREATE_PAYLOADS], ids=[c[0] for c in BAD_CREATE_PAYLOADS]
)
async def test_bad_create_payload_fails_the_job_with_truenas_wording(
    payload: dict[str, Any], attribute: str, message: str
) -> None:
    sim = Simulator("25.10")
    job = await create(sim, **payload)
    assert [attribute, message, 22] in field_errors(job)
    assert job["error"].startswith("[EINVAL] ")
    assert "c1" not in sim.instances


async def test_older_endpoint_validates_before_the_job_exists() -> None:
    sim = Simulator("25.10")
    with pytest.raises(ValidationErrors) as caught:
        await sim.call(
            session(sim, api_version="v25.04.2"), "virt.instance.create", [{"name": "c1", "image": "x", "memory": 1}]
        )
    assert caught.value.extra() == [["virt_instance_create.memory", "Value error, Value must be 32MiB or larger", 22]]
    assert sim.jobs.jobs == {}


async def test_non_dict_create_argument_breaks_the_job_lock() -> None:
    sim = Simulator("25.10")
    with pytest.raises(CallError, match="Error handling job lock"):
        await sim.call(session(sim), "virt.instance.create", ["c1"])


# ----- business rules --------------------------------------------------------------------------------
async def test_duplicate_name() -> None:
    sim = Simulator("25.10")
    assert (await create(sim, autostart=False))["state"] == "SUCCESS"
    job = await create(sim)
    assert field_errors(job) == [["virt_instance_create.name", "Name 'c1' already exists", 22]]
    assert job["error"] == "[EINVAL] virt_instance_create.name: Name 'c1' already exists\n"


@pytest.mark.parametrize(
    "name,message",
    [
        ("Web_1", "Name can only contain alphanumeric and hyphen characters"),
        ("1web", "Name must not start with a number"),
        ("-web", 'Name must not start with "-" character'),
        ("web-", 'Name must not end with "-" character'),
        ("a" * 64, "Name must be 1-63 characters long"),
    ],
)
async def test_incus_name_rules(name: str, message: str) -> None:
    job = await create(Simulator("25.10"), name=name)
    assert job["state"] == "FAILED"
    assert job["exc_info"]["type"] == "CallError"
    assert job["error"] == f'[EFAULT] Invalid instance name "{name}": {message}'


async def test_memory_and_cpu_limits_of_the_host() -> None:
    sim = Simulator("25.10")
    sim.knobs.host_memory = 4 * GIB
    sim.knobs.host_cores = 4
    job = await create(sim, memory=8 * GIB, cpu="8")
    assert field_errors(job) == [
        ["virt_instance_create.memory", "Cannot reserve more than physical memory", 22],
        ["virt_instance_create.cpu", "Cannot reserve more than system cores", 22],
    ]
    # A CPU set is not a count: TrueNAS only checks all-digit values.
    assert (await create(sim, cpu="0-7", autostart=False))["state"] == "SUCCESS"


async def test_stop_needs_force_or_timeout() -> None:
    sim = Simulator("25.10")
    await create(sim)
    job = await run_job(sim, "virt.instance.stop", "c1")
    assert field_errors(job) == [["", "Value error, Timeout should be set if force is disabled", 22]]
    job = await run_job(sim, "virt.instance.restart", "c1", {"force": False})
    assert job["state"] == "FAILED"
    assert (await run_job(sim, "virt.instance.stop", "c1", {"timeout": 10}))["state"] == "SUCCESS"
    assert sim.instances["c1"].status == "STOPPED"


async def test_container_only_create_from_25_04_2() -> None:
    for profile in ("25.04.2", "25.10"):
        job = await create(Simulator(profile), instance_type="VM")
        assert ["virt_instance_create.instance_type", "Input should be 'CONTAINER'", 22] in field_errors(job)
    vm = await create(Simulator("25.04.0"), instance_type="VM", autostart=False, root_disk_size=20)
    assert vm["state"] == "SUCCESS"
    assert vm["result"]["type"] == "VM"
    assert vm["result"]["root_disk_size"] == 20 * GIB  # taken in GiB, returned in bytes


async def test_vm_autostart_is_forbidden_on_25_10_through_the_old_endpoint() -> None:
    sim = Simulator("25.10")
    job_id = await sim.call(
        session(sim, api_version="v25.04.0"),
        "virt.instance.create",
        [{"name": "vm1", "image": "ubuntu/noble", "instance_type": "VM", "autostart": True}],
    )
    job = sim.jobs.jobs[job_id]
    await job.done.wait()
    assert job.exc_info is not None
    assert job.exc_info["extra"] == [
        ["virt_instance_create.autostart", "Autostart cannot be enabled for VM instances", 22]
    ]


async def test_nic_without_nic_type_crashes_like_truenas() -> None:
    sim = Simulator("25.10")
    job = await create(sim, devices=[{"dev_type": "NIC", "network": "incusbr0"}])
    assert job["state"] == "FAILED"
    assert job["exc_info"]["type"] == "AttributeError"
    assert job["error"] == "'NoneType' object has no attribute 'lower'"


async def test_unknown_image_fails_the_job() -> None:
    job = await create(Simulator("25.10"), image="nosuch/os")
    assert job["state"] == "FAILED"
    assert "Image not found: nosuch/os" in job["error"]


# ----- state -------------------------------------------------------------------------------------------
async def test_autostart_starts_at_the_end_of_create_and_aliases_follow_power() -> None:
    sim = Simulator("25.10")
    job = await create(sim, memory=100 * MIB + 12345)
    assert job["result"]["status"] == "RUNNING"
    assert job["result"]["memory"] == 100 * MIB  # floored to whole MiB
    assert {a["type"] for a in job["result"]["aliases"]} == {"INET", "INET6"}
    await run_job(sim, "virt.instance.stop", "c1", {"force": True})
    entry = sim.virt.query(None, [[["id", "=", "c1"]], {"get": True}])  # type: ignore[arg-type]
    assert entry["status"] == "STOPPED" and entry["aliases"] == []
    stopped = await create(sim, name="c2", autostart=False)
    assert stopped["result"]["status"] == "STOPPED"


async def test_a_guest_whose_dhcp_has_not_answered_runs_without_aliases_until_it_has_a_lease() -> None:
    """Knobs.dhcp False: running, no aliases (Incus reports only global-scope addresses, and the guest
    has none yet); set_lease gives it one, with no event (virt events are start/stop only)."""
    sim = Simulator("25.10")
    sim.knobs.dhcp = False
    job = await create(sim)
    assert job["result"]["status"] == "RUNNING" and job["result"]["aliases"] == []
    events: list[Any] = []
    sim.virt.emit = lambda *args: events.append(args)  # type: ignore[method-assign]
    sim.set_lease("c1", True)
    entry = sim.virt.query(None, [[["id", "=", "c1"]], {"get": True}])  # type: ignore[arg-type]
    assert {a["type"] for a in entry["aliases"]} == {"INET", "INET6"} and events == []


async def test_query_is_empty_until_virt_is_initialised() -> None:
    sim = Simulator("25.10")
    await create(sim)
    sim.global_config.state = "NO_POOL"
    s = session(sim)
    assert await sim.call(s, "virt.instance.query", []) == []
    assert await sim.call(s, "virt.instance.query", [[], {"extra": {"skip_state": True}}]) != []
    job = await create(sim, name="c2")
    assert job["error"] == "[EFAULT] Virtualization not initialized."


@pytest.mark.parametrize("profile,during_start", [("25.04.0", "STOPPED"), ("25.10", "STARTING")])
async def test_transitional_statuses_show_in_queries_but_are_never_announced(profile: str, during_start: str) -> None:
    """Queries may show STARTING/STOPPING (not 25.04.0), but TrueNAS's Incus listener announces only a
    finished start or stop, as ``changed`` with ``{"status": "RUNNING"|"STOPPED"}``
    (middleware plugins/virt/websocket.py, TS-25.04.0 .. TS-25.10.6)."""
    sim = Simulator(profile)
    await create(sim, autostart=False)
    seen: list[dict[str, Any]] = []
    sim.events.subscribe("virt.instance.query", lambda n: seen.append(n["params"]))
    sim.knobs.job_duration = 0.2
    job_id = await sim.call(session(sim), "virt.instance.start", ["c1"])
    await asyncio.sleep(0.08)
    assert sim.instances["c1"].entry(sim.profile)["status"] == during_start
    await sim.jobs.jobs[job_id].done.wait()
    sim.knobs.job_duration = 0
    await run_job(sim, "virt.instance.stop", "c1", {"force": True})
    assert seen == [
        {"msg": "changed", "collection": "virt.instance.query", "id": "c1", "fields": {"status": "RUNNING"}},
        {"msg": "changed", "collection": "virt.instance.query", "id": "c1", "fields": {"status": "STOPPED"}},
    ]


async def test_jobs_on_one_instance_run_one_at_a_time() -> None:
    sim = Simulator("25.10")
    await create(sim, autostart=False)
    sim.knobs.job_duration = 0.2
    s = session(sim)
    first = await sim.call(s, "virt.instance.start", ["c1"])
    second = await sim.call(s, "virt.instance.update", ["c1", {"cpu": "2"}])
    await asyncio.sleep(0.05)
    assert sim.jobs.jobs[first].state == "RUNNING"
    assert sim.jobs.jobs[second].state == "WAITING"
    await sim.jobs.jobs[second].done.wait()
    assert sim.jobs.jobs[first].time_finished is not None
    assert sim.jobs.jobs[second].state == "SUCCESS"
    assert sim.jobs.jobs[second].progress["percent"] == 100
    assert set(sim.jobs.jobs[second].time_started) == {"$date"}


async def test_new_style_jobs_on_25_10_hold_the_answer_and_carry_message_ids() -> None:
    sim = Simulator("25.10")
    s = session(sim)
    added: list[dict[str, Any]] = []
    sim.events.subscribe(
        "core.get_jobs", lambda n: added.append(n["params"]) if n["params"]["msg"] == "added" else None
    )
    assert (await sim.call(s, "core.set_options", [{"legacy_jobs": False}]))["legacy_jobs"] is False
    result = await sim.call(s, "virt.instance.create", [{"name": "c1", "image": "debian/bookworm"}], message_id=77)
    assert result["name"] == "c1"
    assert added[0]["fields"]["message_ids"] == [77]
    with pytest.raises(ValidationErrors):
        await sim.call(s, "virt.instance.create", [{"name": "c1", "image": "debian/bookworm"}], message_id=78)


async def test_26_has_no_virt() -> None:
    sim = Simulator("26.0")
    with pytest.raises(MethodNotFound):
        await sim.call(session(sim), "virt.instance.query", [])


async def test_auth_gate_and_readonly_keys() -> None:
    sim = Simulator("25.10")
    anonymous = Session()
    with pytest.raises(CallError) as caught:
        await sim.call(anonymous, "virt.instance.query", [])
    assert caught.value.errno == 207 and str(caught.value) == "[ENOTAUTHENTICATED] Not authenticated"
    assert await sim.call(anonymous, "core.ping", []) == "pong"
    assert await sim.call(anonymous, "auth.login_with_api_key", ["1-wrong"]) is False
    next(iter(sim.api_keys.values())).readonly = True
    reader = session(sim)
    assert await sim.call(reader, "virt.instance.query", []) == []
    with pytest.raises(CallError, match="Not authorized"):
        await sim.call(reader, "virt.instance.create", [{"name": "c1", "image": "debian/bookworm"}])


async def test_key_sent_in_clear_over_the_network_is_revoked() -> None:
    sim = Simulator("25.10")
    remote = Session(secure=False, loopback=False)
    assert await sim.call(remote, "auth.login_with_api_key", [sim.api_key]) is False
    assert sim.auth.authenticate_key(sim.api_key, Session()) == "EXPIRED"


# ----- devices -------------------------------------------------------------------------------------------
async def test_device_calls() -> None:
    sim = Simulator("25.10")
    await create(sim, autostart=False)
    s = session(sim)
    proxy = {"dev_type": "PROXY", "source_proto": "TCP", "source_port": 8080, "dest_proto": "TCP", "dest_port": 80}
    assert await sim.call(s, "virt.instance.device_add", ["c1", {**proxy, "name": "http"}]) is True
    with pytest.raises(ValidationErrors) as caught:
        await sim.call(s, "virt.instance.device_add", ["c1", {**proxy, "name": "http2"}])
    assert caught.value.extra() == [["virt_device_add.source_port", "Source proto/port already in use.", 22]]
    disk = {"dev_type": "DISK", "name": "data", "source": "/mnt/tank/data", "destination": "/data"}
    assert await sim.call(s, "virt.instance.device_add", ["c1", disk]) is True
    with pytest.raises(ValidationErrors) as caught:
        await sim.call(s, "virt.instance.device_add", ["c1", {**disk, "name": "d2", "source": "/mnt/nopool/x"}])
    assert caught.value.extra() == [["virt_device_add.source", "Source path does not exist.", 22]]
    assert await sim.call(s, "virt.instance.device_update", ["c1", {**disk, "readonly": True}]) is True
    with pytest.raises(CallError, match=r"Device does not exist\."):
        await sim.call(s, "virt.instance.device_update", ["c1", {**disk, "name": "ghost"}])
    names = [d["name"] for d in await sim.call(s, "virt.instance.device_list", ["c1"])]
    assert names == ["eth0", "root", "http", "data"]
    assert await sim.call(s, "virt.instance.device_delete", ["c1", "http"]) is True
    with pytest.raises(CallError, match=r"Device not found\."):
        await sim.call(s, "virt.instance.device_delete", ["c1", "eth0"])


# ----- results conform to TrueNAS's schemas ------------------------------------------------------------
@pytest.mark.parametrize("profile,schema", [("25.04.0", "v25_04_0"), ("25.04.2", "v25_04_2"), ("25.10", "v25_10_0")])
async def test_query_and_device_entries_match_the_schemas(profile: str, schema: str) -> None:
    sim = Simulator(profile)
    devices = [
        {
            "dev_type": "PROXY",
            "name": "p",
            "source_proto": "TCP",
            "source_port": 2222,
            "dest_proto": "TCP",
            "dest_port": 22,
        },
        {"dev_type": "DISK", "name": "d", "source": "/mnt/tank/x", "destination": "/x"},
        {"dev_type": "NIC", "name": "eth1", "nic_type": "MACVLAN", "parent": "enp1s0"},
    ]
    await create(sim, devices=devices, cpu="2", memory=GIB, environment={"A": "b"})
    await create(sim, name="c2", autostart=False)
    if profile == "25.04.0":
        await create(sim, name="vm1", instance_type="VM", image="ubuntu/noble", autostart=False)
    entry_schema = load_schema(f"{schema}.virt.instance.query.entry")
    device_schema = load_schema(f"{schema}.virt.device")
    s = session(sim)
    entries = await sim.call(s, "virt.instance.query", [])
    assert len(entries) == (3 if profile == "25.04.0" else 2)
    for entry in entries:
        jsonschema.validate(entry, entry_schema)
        assert set(entry) == set(entry_schema["properties"])
        for device in await sim.call(s, "virt.instance.device_list", [entry["id"]]):
            jsonschema.validate(device, device_schema)


# ----- control API and knobs over HTTP ---------------------------------------------------------------
async def test_control_api() -> None:
    import httpx

    from truenas_simulator import SimulatorServer

    sim = Simulator("25.10", seed=1)
    server = await SimulatorServer(sim).start()
    try:
        async with httpx.AsyncClient(base_url=server.url) as http:
            seeded = await http.post(
                "/_simulator/instances", json={"name": "db1", "type": "CONTAINER", "status": "RUNNING"}
            )
            assert seeded.status_code == 201 and seeded.json()["aliases"]
            stopped = await http.post("/_simulator/instances/db1/power", json={"status": "STOPPED"})
            assert stopped.json()["status"] == "STOPPED" and sim.instances["db1"].status == "STOPPED"
            changed = await http.patch("/_simulator/instances/db1", json={"cpu": "3", "ignores_shutdown": True})
            assert changed.json()["cpu"] == "3" and sim.instances["db1"].ignores_shutdown
            assert (await http.patch("/_simulator/instances/db1", json={"name": "x"})).status_code == 400
            knobs = await http.patch(
                "/_simulator/knobs", json={"error_rates": {"virt.instance.query": 1.0}, "latency": 0.01}
            )
            assert knobs.json()["latency"] == 0.01
            assert (await http.patch("/_simulator/knobs", json={"nonsense": 1})).status_code == 400
            with pytest.raises(CallError, match="fault injection"):
                await sim.call(session(sim), "virt.instance.query", [])
            calls = (await http.get("/_simulator/calls")).json()
            assert calls["by_method"]["virt.instance.query"] == 1 and calls["faults"] == {
                "error:virt.instance.query": 1
            }
            assert (await http.delete("/_simulator/calls")).json()["total"] == 0
            state = (await http.get("/_simulator/state")).json()
            assert state["profile"] == "25.10" and [i["name"] for i in state["instances"]] == ["db1"]
            assert (await http.delete("/_simulator/instances/db1")).status_code == 200
            assert sim.instances == {}
            assert (await http.post("/_simulator/instances/db1/power", json={"status": "STOPPED"})).status_code == 404
            assert (await http.get("/api/versions")).json()[-1] == "v25.10.1"
            added = await http.post("/_simulator/images", json={"alias": "plan9/4th", "os": "Plan9", "release": "4th"})
            assert added.status_code == 201 and "plan9/4th" in sim.images
    finally:
        await server.stop()


async def test_graceful_stop_of_a_guest_that_ignores_it_times_out() -> None:
    sim = Simulator("25.10")
    await create(sim)
    sim.instances["c1"].ignores_shutdown = True
    job = await run_job(sim, "virt.instance.stop", "c1", {"timeout": 0})
    assert job["state"] == "FAILED" and "context deadline exceeded" in job["error"]
    assert sim.instances["c1"].status == "RUNNING"
    assert (await run_job(sim, "virt.instance.stop", "c1", {"force": True}))["state"] == "SUCCESS"


async def test_job_abort() -> None:
    sim = Simulator("25.10")
    await create(sim, autostart=False)
    sim.knobs.hung_methods = {"virt.instance.start"}
    s = session(sim)
    job_id = await sim.call(s, "virt.instance.start", ["c1"])
    await asyncio.sleep(0.05)
    assert sim.jobs.jobs[job_id].state == "RUNNING"
    assert await sim.call(s, "core.job_abort", [job_id]) is None
    await asyncio.wait_for(sim.jobs.jobs[job_id].done.wait(), 5)
    job = (await sim.call(s, "core.get_jobs", [[["id", "=", job_id]]]))[0]
    assert job["state"] == "ABORTED" and job["time_finished"] is not None
    with pytest.raises(CallError, match="Job does not exist"):
        await sim.call(s, "core.job_abort", [9999])
