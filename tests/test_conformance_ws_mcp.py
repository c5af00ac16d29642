"""Conformance: the simulator driven through ``truenas-ws-mcp`` 0.1.1 (PyPI, MIT), a TrueNAS MCP server
the project did not write, on every profile (25.04.0, 25.04.2, 25.10, 26.0).

What that client does (read from its source): it speaks only the legacy DDP-style protocol of
``/websocket`` (``connect`` version 1, then ``method`` messages; apps/websocket_app.py), logs in with
``auth.login_with_api_key``, answers each MCP tool with one call, raises ``RuntimeError("API error in
<method>: <reason>")`` for an error, and ignores events (it subscribes to nothing). A job method
answers its job id there, so a tool such as ``stop_vm`` returns at once; the job is then followed
through its ``list_jobs`` tool (``core.get_jobs``). Its tools are called as plain coroutines: fastmcp
4's ``@mcp.tool()`` returns the function itself; the server's client is configured from the
environment (``TRUENAS_URL``, ``TRUENAS_API_KEY``) as its ``Settings`` reads it.

The other TrueNAS clients on PyPI that were asked for are not used: ``aiotruenas`` 1.7.0 requires
Python >= 3.13 (this project supports 3.11, the version its tools run on), and ``truenaspy`` 1.0.3
requires Python >= 3.12 (pip offers 3.11 no release newer than 0.6.6), so neither could be pinned as
asked.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
import truenas_ws_mcp.server as mcp_server
from truenas_ws_mcp.tools import storage, system, vms

from truenas_simulator import Simulator, SimulatorServer

PROFILES = ["25.04.0", "25.04.2", "25.10", "26.0"]
VM_PROFILES = ["25.04.2", "25.10", "26.0"]


@pytest.fixture
async def served(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Simulator]:
    sim = Simulator(request.param, seed=9)
    sim.knobs.auth_fail_delay = 0.0
    server = await SimulatorServer(sim).start()
    monkeypatch.chdir(request.config.rootpath / "tests")  # no stray .env for its Settings to read
    monkeypatch.setenv("TRUENAS_URL", server.url)  # http://... : it makes ws://.../websocket of it
    monkeypatch.setenv("TRUENAS_API_KEY", sim.api_key)
    monkeypatch.setattr(mcp_server, "_settings", None)
    monkeypatch.setattr(mcp_server, "_client", None)
    try:
        yield sim
    finally:
        client = mcp_server._client
        if client is not None:
            await client.close()
        await server.stop()


async def call(method: str, params: list[Any]) -> Any:
    """A raw call through the MCP server's own client, for what no tool offers (creating a VM)."""
    client = await mcp_server.get_client()
    return await client.call(method, params)


async def finished(job_id: int) -> dict[str, Any]:
    for _ in range(200):
        jobs = {job["id"]: job for job in await system.list_jobs()}
        if jobs[job_id]["state"] in ("SUCCESS", "FAILED", "ABORTED"):
            return dict(jobs[job_id])
        await asyncio.sleep(0.05)
    raise AssertionError(f"job {job_id} did not finish")


@pytest.mark.parametrize("served", PROFILES, indirect=True)
async def test_system_tools_and_errors_through_ws_mcp(served: Simulator) -> None:
    sim = served
    info = await system.system_info()
    assert info["version"] == sim.profile.system_version.removeprefix("TrueNAS-")
    assert info["cores"] == sim.knobs.host_cores
    assert await system.list_jobs() == []
    if not sim.profile.has_vm:  # 25.04.0 keeps its VMs in virt.instance: there is no vm service
        with pytest.raises(RuntimeError) as missing:
            await vms.list_vms()
        assert str(missing.value) == "API error in vm.query: [ENOMETHOD] Service 'vm' not found"
    # A tool for a service the simulator does not serve fails as TrueNAS says it would.
    with pytest.raises(RuntimeError, match=r"^API error in alert\.list: \[ENOMETHOD\] Service 'alert' not found$"):
        await system.list_alerts()
    # Arguments a method does not take: a validation error (EAGAIN on this protocol), its reason shown.
    with pytest.raises(RuntimeError) as invalid:
        await call("core.get_jobs", [[], {"colour": 1}])
    assert str(invalid.value) == "API error in core.get_jobs: [EINVAL] options.colour: Extra inputs are not permitted\n"


@pytest.mark.parametrize("served", PROFILES, indirect=True)
async def test_a_wrong_key_is_refused_through_ws_mcp(served: Simulator, monkeypatch: pytest.MonkeyPatch) -> None:
    key_id = served.api_key.partition("-")[0]
    monkeypatch.setenv("TRUENAS_API_KEY", f"{key_id}-wrong")
    with pytest.raises(ConnectionError, match="Authentication failed"):
        await mcp_server.get_client()
    client = mcp_server._client  # get_client keeps it before connecting: close its socket
    assert client is not None
    await client.close()
    monkeypatch.setattr(mcp_server, "_client", None)


@pytest.mark.parametrize("served", VM_PROFILES, indirect=True)
async def test_datasets_and_vms_through_ws_mcp(served: Simulator) -> None:
    created = await storage.create_dataset("tank/guests", comments="for VMs")
    assert created["id"] == "tank/guests" and created["type"] == "FILESYSTEM"
    assert (await storage.get_dataset("tank/guests"))["name"] == "tank/guests"
    assert "tank/guests" in [d["id"] for d in await storage.list_datasets(pool="tank")]
    with pytest.raises(ValueError, match="Dataset 'tank/nope' not found"):  # the tool's own check
        await storage.get_dataset("tank/nope")

    vm = await call("vm.create", [{"name": "web01", "memory": 1024, "autostart": False}])
    assert [v["name"] for v in await vms.list_vms()] == ["web01"]
    assert await vms.start_vm(vm["id"]) == f"VM {vm['id']} started successfully."
    assert (await vms.list_vms())[0]["status"]["state"] == "RUNNING"
    # vm.stop is a job: over /websocket it answers the job's id, so the tool returns at once.
    assert await vms.stop_vm(vm["id"]) == f"VM {vm['id']} stopped successfully."
    (stop_job,) = [job for job in await system.list_jobs() if job["method"] == "vm.stop"]
    assert (await finished(stop_job["id"]))["state"] == "SUCCESS"
    assert (await vms.list_vms())[0]["status"]["state"] == "STOPPED"
    assert served.vms.vms[vm["id"]].state == "STOPPED"  # the simulator agrees with what the tool read
    updated = await vms.update_vm(vm["id"], {"memory": 2048})
    assert updated["memory"] == 2048

    with pytest.raises(RuntimeError) as missing:  # vm.get_instance's InstanceNotFound: ENOENT
        await vms.start_vm(99)
    assert str(missing.value) == "API error in vm.start: [ENOENT] None: VM 99 does not exist"
    # Stopping a stopped VM: the job fails, which the tool cannot see; core.get_jobs tells why.
    assert await vms.stop_vm(vm["id"]) == f"VM {vm['id']} stopped successfully."
    failed = [job for job in await system.list_jobs() if job["method"] == "vm.stop"][-1]
    failed = await finished(failed["id"])
    assert failed["state"] == "FAILED"
    assert failed["error"] in ("[EFAULT] VM state is currently not 'RUNNING'", "Domain 'web01' is not active")
    assert await storage.delete_dataset("tank/guests", confirm=True) == "Dataset 'tank/guests' deleted successfully."
    assert "tank/guests" not in [d["id"] for d in await storage.list_datasets()]
