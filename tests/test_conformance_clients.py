"""Conformance: the simulator driven through a TrueNAS client the project did not write.

``pytruenas`` (PyPI, MIT; a synchronous JSON-RPC 2.0 client that logs in with ``auth.login_with_api_key``
or ``auth.login_ex``, reads ``system.info`` and ``core.get_methods``, waits for jobs by polling
``core.get_jobs`` and subscribes with ``core.subscribe``) on every profile: 25.04.0, 25.04.2 and 25.10
through ``virt.instance.*``, 26.0 through ``container.*``. TrueNAS's own ``truenas_api_client`` is not
on PyPI, so it is not installed here; its SCRAM exchange (with channel binding) is modelled from its
source in official_scram_client.py and run against the simulator in test_simulator_scram.py.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest
from pytruenas import TrueNASClient
from pytruenas.auth import APIKeyAuth
from pytruenas.exceptions import AuthenticationError, JobFailed, ValidationErrors

from truenas_simulator import Simulator
from truenas_simulator.runner import SimulatorThread

VIRT_PROFILES = ["25.04.0", "25.04.2", "25.10"]


@pytest.fixture(autouse=True)
def _pytruenas_cache(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """pytruenas caches core.get_methods answers on disk; keep them out of the home directory."""
    with tempfile.TemporaryDirectory(prefix="pytruenas-") as cache:
        monkeypatch.setenv("PYTRUENAS_CACHE", cache)
        yield


@pytest.fixture
def served(request: pytest.FixtureRequest) -> Iterator[SimulatorThread]:
    sim = Simulator(request.param, seed=5)
    sim.knobs.auth_fail_delay = 0.2  # refusals still wait, but the suite stays quick
    with SimulatorThread(sim) as running:
        yield running


def client(running: SimulatorThread, key: str | None = None, username: str | None = None) -> TrueNASClient:
    credentials = APIKeyAuth(key or running.api_key, username)
    return TrueNASClient(f"{running.ws_url}/api/current", credentials=credentials)


def drain(subscription: Any, count: int) -> list[tuple[str, Any, Any]]:
    seen = []
    for event in subscription.events(timeout=5):
        seen.append((event.msg, event.id, event.fields))
        if len(seen) == count:
            break
    return seen


@pytest.mark.parametrize("served", VIRT_PROFILES, indirect=True)
@pytest.mark.parametrize("login_ex", [False, True])
def test_virt_lifecycle_through_pytruenas(served: SimulatorThread, login_ex: bool) -> None:
    truenas = client(served, username="root" if login_ex else None)
    try:
        truenas.login(login_ex=login_ex)
        assert truenas.api.system.info()["version"] == served.sim.profile.system_version.removeprefix("TrueNAS-")
        assert truenas.api.system.version() == served.sim.profile.system_version
        assert truenas.api.virt.instance.query() == []

        events = truenas.conn.subscribe("virt.instance.query")
        created = truenas.api.virt.instance.create(
            {"name": "web1", "image": "debian/bookworm", "autostart": False}, job=True
        )
        assert created["name"] == "web1" and created["status"] == "STOPPED"
        assert truenas.api.virt.instance.start("web1", job=True) is True
        assert truenas.api.virt.instance.stop("web1", {"force": False, "timeout": 5}, job=True) is True
        updated = truenas.api.virt.instance.update("web1", {"cpu": "2", "memory": 512 * 2**20}, job=True)
        assert updated["cpu"] == "2" and updated["memory"] == 512 * 2**20
        assert truenas.api.virt.instance.query([["name", "=", "web1"]], {"get": True})["cpu"] == "2"
        assert truenas.api.virt.instance.delete("web1", job=True) is True
        assert truenas.api.virt.instance.query() == []

        # What TrueNAS announces: ADDED when create returns, only RUNNING/STOPPED from Incus, the
        # full entry on update, the id alone on delete.
        seen = drain(events, 5)
        assert [(msg, ident) for msg, ident, _ in seen] == [
            ("added", "web1"),
            ("changed", "web1"),
            ("changed", "web1"),
            ("changed", "web1"),
            ("removed", "web1"),
        ]
        assert [fields for _, _, fields in seen[1:3]] == [{"status": "RUNNING"}, {"status": "STOPPED"}]
        assert seen[3][2]["cpu"] == "2" and seen[4][2] is None
    finally:
        truenas.close()


@pytest.mark.parametrize("served", VIRT_PROFILES, indirect=True)
def test_virt_errors_through_pytruenas(served: SimulatorThread) -> None:
    truenas = client(served)
    try:
        with pytest.raises(JobFailed) as failed:
            truenas.api.virt.instance.create({"name": "web1", "image": "debian/bookworm", "memory": 1024}, job=True)
        job = failed.value.job
        assert job["exc_info"]["type"] == "VALIDATION"
        assert job["exc_info"]["extra"] == [
            ["virt_instance_create.memory", "Value error, Value must be 32MiB or larger", 22]
        ]
        with pytest.raises(ValidationErrors) as missing:  # not a job: -32602 at once, attribute null
            truenas.api.virt.instance.get_instance("nope")
        assert missing.value.errors == [(None, "VirtInstance nope does not exist", 2)]
    finally:
        truenas.close()


@pytest.mark.parametrize("served", [*VIRT_PROFILES, "26.0", "27.0"], indirect=True)
@pytest.mark.parametrize("login_ex", [False, True])
def test_a_wrong_key_is_refused(served: SimulatorThread, login_ex: bool) -> None:
    key_id = served.api_key.partition("-")[0]
    truenas = client(served, key=f"{key_id}-wrong", username="root" if login_ex else None)
    try:
        with pytest.raises(AuthenticationError) as refused:
            truenas.login(login_ex=login_ex)
        assert refused.value.response_type == "AUTH_ERR"
    finally:
        truenas.close()


@pytest.mark.parametrize("served", ["26.0", "27.0"], indirect=True)
@pytest.mark.parametrize("login_ex", [False, True])
def test_container_lifecycle_through_pytruenas(served: SimulatorThread, login_ex: bool) -> None:
    truenas = client(served, username="root" if login_ex else None)
    twenty_seven = served.sim.profile.name == "27.0"
    try:
        truenas.login(login_ex=login_ex)
        assert truenas.api.system.info()["version"] == ("27.0.0-BETA.1" if twenty_seven else "26.0.0")
        image = truenas.api.container.image.query_registry()[0]
        events = truenas.conn.subscribe("container.query")
        created = truenas.api.container.create(
            {"name": "web1", "image": {"name": image["name"], "version": image["versions"][-1]["version"]}},
            job=True,
        )
        ident = created["id"]
        assert created["status"]["state"] == "STOPPED"
        assert truenas.api.container.start(ident) is None  # not a job on 26
        assert truenas.api.container.stop(ident, {"force": True}, job=True) is None
        assert truenas.api.container.update(ident, {"description": "front"})["description"] == "front"
        assert truenas.api.container.query([["id", "=", ident]], {"get": True})["description"] == "front"
        with pytest.raises(ValidationErrors) as invalid:
            truenas.api.container.update(ident, {"shutdown_timeout": 1})
        assert invalid.value.errors[0][0] == "container_update.shutdown_timeout"
        if twenty_seven:  # a job on 27, with {force, recursive}
            assert truenas.api.container.delete(ident, {"force": False}, job=True) is None
        else:
            assert truenas.api.container.delete(ident) is None
        assert truenas.api.container.query() == []
        seen = drain(events, 5)
        assert [msg for msg, _, _ in seen] == ["added", "changed", "changed", "changed", "removed"]
        assert [fields["status"]["state"] for _, _, fields in seen[1:3]] == ["RUNNING", "STOPPED"]
    finally:
        truenas.close()


@pytest.mark.parametrize("served", [*VIRT_PROFILES, "26.0", "27.0"], indirect=True)
def test_pytruenas_reads_job_flags_from_core_get_methods(served: SimulatorThread) -> None:
    truenas = client(served)
    try:
        service, method = (
            ("container", "container.create")
            if served.sim.profile.has_container
            else (
                "virt.instance",
                "virt.instance.create",
            )
        )
        assert truenas._is_job(method) is True
        assert truenas._is_job(f"{service}.query") is False
        assert os.listdir(os.environ["PYTRUENAS_CACHE"])  # it really asked the simulator
    finally:
        truenas.close()
