"""Issue 13: where the simulator differed from TrueNAS's middleware, each test names what the real
server does and where that is in the middleware source (truenas/middleware, tags TS-25.04.0 ..
TS-26.0.0-BETA.3, paths under src/middlewared/middlewared/)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from truenas_simulator import Simulator
from truenas_simulator.context import Session
from truenas_simulator.errors import CallError, MethodNotFound, ValidationErrors

from .official_scram_client import Call, OfficialClientRefused, official_scram_login


def quick(profile: str) -> Simulator:
    sim = Simulator(profile, seed=3)
    sim.knobs.auth_fail_delay = 0
    sim.knobs.scram_iterations = 50_000  # the lowest count TrueNAS's own client accepts
    return sim


def logged_in(sim: Simulator, **kwargs: Any) -> Session:
    s = Session(**kwargs)
    assert sim.auth.authenticate_key(sim.api_key, s) == "SUCCESS"
    return s


# ----- 1: core.set_options ---------------------------------------------------------------------------
@pytest.mark.parametrize("profile", ["25.04.0", "25.04.2"])
async def test_set_options_on_25_04_ignores_unknown_keys_and_answers_null(profile: str) -> None:
    """api/v25_04_0/core.py CoreSetOptionsOptions (TS-25.04.0, TS-25.04.2.6) has ``extra="ignore"``
    and knows only ``py_exceptions``; service/core_service.py ``set_options`` returns nothing. So a
    client's ``legacy_jobs: false`` is dropped and jobs keep answering with their id."""
    sim = quick(profile)
    s = logged_in(sim)
    options = {"legacy_jobs": False, "private_methods": True, "py_exceptions": True, "colour": "red"}
    assert await sim.call(s, "core.set_options", [options]) is None
    assert s.legacy_jobs is True and s.py_exceptions is True
    job = await sim.call(s, "virt.instance.create", [{"name": "c1", "image": "debian/bookworm"}])
    assert isinstance(job, int)
    with pytest.raises(ValidationErrors) as caught:  # the model is strict: a known key must be a bool
        await sim.call(s, "core.set_options", [{"py_exceptions": "yes"}])
    assert caught.value.extra() == [["options.py_exceptions", "Input should be a valid boolean", 22]]


@pytest.mark.parametrize("profile", ["25.10", "26.0"])
async def test_set_options_on_25_10_and_later_returns_the_options_and_ignores_unknown_keys(profile: str) -> None:
    """api/v25_10_0/core.py CoreOptions (``extra="ignore"``; legacy_jobs, private_methods,
    py_exceptions) and core_service.py ``set_options`` returning the three (TS-25.10.0)."""
    sim = quick(profile)
    s = logged_in(sim)
    result = await sim.call(s, "core.set_options", [{"legacy_jobs": False, "private_methods": True, "later": 1}])
    assert result == {"legacy_jobs": False, "private_methods": True, "py_exceptions": False}
    assert s.legacy_jobs is False


# ----- 2: an older versioned endpoint -------------------------------------------------------------
async def test_older_endpoint_validates_set_options_with_its_own_model() -> None:
    """On a 25.10 server, /api/v25.04.2 validates with api/v25_04_2/core.py (no legacy_jobs, which
    ``extra="ignore"`` drops) and CoreSetOptionsResult.to_previous answers null (TS-25.10.0), so
    old-style jobs stay on for that connection."""
    sim = quick("25.10")
    s = logged_in(sim, api_version="v25.04.2")
    assert await sim.call(s, "core.set_options", [{"legacy_jobs": False, "private_methods": True}]) is None
    assert s.legacy_jobs is True and s.private_methods is True
    job = await sim.call(s, "virt.instance.create", [{"name": "c1", "image": "debian/bookworm"}])
    assert isinstance(job, int)
    current = logged_in(sim)
    assert (await sim.call(current, "core.set_options", [{"legacy_jobs": False}]))["legacy_jobs"] is False


# ----- 3 and 6: mechanisms and SCRAM -----------------------------------------------------------------
@pytest.mark.parametrize(
    "profile,expected",
    [
        ("25.04.0", ["API_KEY_PLAIN", "TOKEN_PLAIN", "PASSWORD_PLAIN"]),
        ("25.10", ["API_KEY_PLAIN", "TOKEN_PLAIN", "PASSWORD_PLAIN"]),
        ("26.0", ["API_KEY_PLAIN", "TOKEN_PLAIN", "PASSWORD_PLAIN", "SCRAM"]),
    ],
)
async def test_mechanism_choices(profile: str, expected: list[str]) -> None:
    """utils/auth.py AA_LEVEL1.mechanisms: SCRAM joins in 26 (TS-26.0.0-BETA.3). From 25.04.2 to
    25.10.x, plugins/auth.py ``mechanism_choices`` reads ``app.authenticated_credentials`` without a
    None check, so an anonymous call fails with an AttributeError; 25.04.0 and 26 answer it."""
    sim = quick(profile)
    assert await sim.call(logged_in(sim), "auth.mechanism_choices", []) == expected
    anonymous = Session()
    if profile == "25.10":
        with pytest.raises(AttributeError, match="may_create_auth_token"):
            await sim.call(anonymous, "auth.mechanism_choices", [])
    else:
        assert await sim.call(anonymous, "auth.mechanism_choices", []) == expected


def direct(sim: Simulator, session: Session) -> Call:
    async def call(method: str, params: list[Any]) -> Any:
        return await sim.call(session, method, params)

    return call


async def test_scram_login_on_26_as_truenas_own_client_does_it() -> None:
    """plugins/auth.py login_ex case AuthMech.SCRAM and auth_/login_ex_impl.py login_ex_scram
    (TS-26.0.0-BETA.3): CLIENT_FIRST_MESSAGE -> SCRAM_RESPONSE/SERVER_FIRST_RESPONSE with
    user_info null; CLIENT_FINAL_MESSAGE -> SERVER_FINAL_RESPONSE whose ``v=`` the client checks,
    with auth.me as user_info. ``n=<user>:<key id>``; the key material after ``<id>-`` is the
    password (api_client auth_api_key.py); SHA-512 (api/v26_0_0/auth.py AuthSCRAM). The client is
    tests/official_scram_client.py (a generic RFC 5802 client cannot: test_simulator_scram.py)."""
    sim = quick("26.0")
    s = Session()
    final = await official_scram_login(direct(sim, s), "root", sim.api_key, peer_cert_der=None, channel_binding=False)
    assert final["user_info"]["pw_name"] == "root" and s.authenticated
    assert await sim.call(s, "container.query", []) == []


async def test_scram_refuses_a_wrong_key_and_a_final_message_out_of_turn() -> None:
    """A wrong proof is AUTH_ERR after the failure delay (login_ex falls through to AUTH_ERR); a
    CLIENT_FINAL_MESSAGE with no exchange in progress is CallError('SCRAM authentication is not in
    progress') (login_ex_impl.py, TS-26.0.0-BETA.3); 25.x's login_ex model has no SCRAM tag."""
    sim = quick("26.0")
    s = Session()
    key_id = sim.api_key.partition("-")[0]
    with pytest.raises(OfficialClientRefused, match="Failed to authenticate"):
        await official_scram_login(direct(sim, s), "root", f"{key_id}-notthekey", peer_cert_der=None,
                                   channel_binding=False)  # fmt: skip
    assert not s.authenticated
    final_message = {"mechanism": "SCRAM", "scram_type": "CLIENT_FINAL_MESSAGE", "rfc_str": "c=biws,r=x,p=y"}
    with pytest.raises(CallError, match="SCRAM authentication is not in progress"):
        await sim.call(s, "auth.login_ex", [final_message])
    with pytest.raises(OfficialClientRefused, match="Invalid API key"):  # the key is root's, not admin's
        await official_scram_login(direct(sim, s), "admin", sim.api_key, peer_cert_der=None, channel_binding=False)
    with pytest.raises(ValidationErrors, match="Input tag 'SCRAM'"):
        await quick("25.10").call(Session(), "auth.login_ex", [{**final_message, "scram_type": "CLIENT_FIRST_MESSAGE"}])


# ----- 6: methods ---------------------------------------------------------------------------------
@pytest.mark.parametrize("profile", ["25.04.0", "25.10", "26.0"])
async def test_system_info_has_the_nineteen_keys(profile: str) -> None:
    """plugins/system/info.py ``info`` (the same 19 keys at TS-25.04.0, TS-25.10.0, TS-26.0.0-BETA.3);
    ``version`` is system.version_short."""
    sim = quick(profile)
    info = await sim.call(logged_in(sim), "system.info", [])
    assert list(info) == [
        "version", "buildtime", "hostname", "physmem", "model", "cores", "physical_cores", "loadavg",
        "uptime", "uptime_seconds", "system_serial", "system_product", "system_product_version", "license",
        "boottime", "datetime", "timezone", "system_manufacturer", "ecc_memory",
    ]  # fmt: skip
    assert info["version"] == await sim.call(logged_in(sim), "system.version_short", [])
    with pytest.raises(CallError, match="Not authenticated"):
        await sim.call(Session(), "system.info", [])


async def test_core_get_methods_describes_jobs_per_service() -> None:
    """service/core_service.py ``get_methods(service, target)`` (TS-25.10.0): one entry per method
    with ``job``, ``item_method``, ``no_auth_required``, ``filterable``, ``accepts``... ."""
    sim = quick("25.10")
    methods = await sim.call(logged_in(sim), "core.get_methods", ["virt.instance"])
    assert set(methods) >= {"virt.instance.create", "virt.instance.query", "virt.instance.stop"}
    assert all(name.startswith("virt.instance.") for name in methods)
    assert methods["virt.instance.create"]["job"] is True and methods["virt.instance.query"]["job"] is False
    assert methods["virt.instance.query"]["filterable"] is True
    assert methods["virt.instance.update"]["item_method"] is True
    every = await sim.call(logged_in(sim), "core.get_methods", [])
    assert every["auth.login_ex"]["no_auth_required"] is True and every["core.job_wait"]["job"] is True


async def test_core_job_wait_is_a_job_that_ends_as_its_target() -> None:
    """core_service.py ``job_wait`` is ``@job()``: legacy sessions get a new job id; its result is
    the target's; a missing id fails with 'Job with id N does not exist' (TS-25.10.0)."""
    sim = quick("25.10")
    s = logged_in(sim)
    sim.knobs.job_duration = 0.1
    target = await sim.call(s, "virt.instance.create", [{"name": "c1", "image": "debian/bookworm"}])
    waiter = await sim.call(s, "core.job_wait", [target])
    assert isinstance(waiter, int) and waiter != target
    await asyncio.wait_for(sim.jobs.jobs[waiter].done.wait(), 5)
    assert sim.jobs.jobs[waiter].result == sim.jobs.jobs[target].result and sim.jobs.jobs[waiter].result["name"] == "c1"
    missing = await sim.call(s, "core.job_wait", [999])
    await sim.jobs.jobs[missing].done.wait()
    assert sim.jobs.jobs[missing].error == "[ENOENT] None: Job with id 999 does not exist"


async def test_logout_login_and_login_with_token() -> None:
    """plugins/auth.py: ``logout`` answers true and ends the session; ``login`` and
    ``login_with_token`` are registered, allowed before login, and answer false for bad
    credentials (TS-26.0.0-BETA.3; the same in 25.x)."""
    sim = quick("25.10")
    anonymous = Session()
    assert await sim.call(anonymous, "auth.login", ["root", "wrong"]) is False
    assert await sim.call(anonymous, "auth.login_with_token", ["not-a-token"]) is False
    s = logged_in(sim)
    assert await sim.call(s, "auth.logout", []) is True
    with pytest.raises(CallError, match="Not authenticated"):
        await sim.call(s, "virt.instance.query", [])
    with pytest.raises(MethodNotFound):
        await sim.call(s, "auth.no_such_method", [])


# ----- 7: refusal delay and user info --------------------------------------------------------------
async def test_a_refused_api_key_is_answered_after_one_to_two_seconds() -> None:
    """plugins/auth.py ``login_with_api_key``: an unknown key sleeps random.uniform(1, 2); a wrong one
    fails in PAM and login_ex sleeps CURRENT_AAL.get_delay_interval() = uniform(1, 2) at AAL1
    (utils/auth.py min_fail_delay=1, TS-26.0.0-BETA.3). The default knob reproduces it."""
    sim = Simulator("25.10", seed=1)
    started = time.monotonic()
    assert await sim.call(Session(), "auth.login_with_api_key", ["1-wrong"]) is False
    assert 1.0 <= time.monotonic() - started < 2.5
    started = time.monotonic()
    assert await sim.call(Session(), "auth.login_with_api_key", [sim.api_key]) is True
    assert time.monotonic() - started < 0.5
    sim.knobs.auth_fail_delay = 0
    started = time.monotonic()
    refused = await sim.call(
        Session(), "auth.login_ex", [{"mechanism": "API_KEY_PLAIN", "username": "root", "api_key": "1-x"}]
    )
    assert refused == {"response_type": "AUTH_ERR"} and time.monotonic() - started < 0.5


@pytest.mark.parametrize("profile", ["25.04.0", "25.10", "26.0"])
async def test_login_ex_user_info_is_auth_me(profile: str) -> None:
    """api/v*/auth.py AuthUserInfo = user.get_user_obj's 10 keys + attributes, two_factor_config,
    privilege, account_attributes; plugins/auth.py ``me`` (TS-25.04.0 .. TS-26.0.0-BETA.3)."""
    sim = quick(profile)
    s = Session()
    response = await sim.call(
        s, "auth.login_ex", [{"mechanism": "API_KEY_PLAIN", "username": "root", "api_key": sim.api_key}]
    )
    assert response["response_type"] == "SUCCESS" and response["authenticator"] == "LEVEL_1"
    assert set(response["user_info"]) == {
        "pw_name", "pw_gecos", "pw_dir", "pw_shell", "pw_uid", "pw_gid", "grouplist", "sid", "source", "local",
        "attributes", "two_factor_config", "privilege", "account_attributes",
    }  # fmt: skip
    assert response["user_info"] == await sim.call(s, "auth.me", [])
    assert response["user_info"]["privilege"]["roles"] == {"$set": ["FULL_ADMIN"]}
    assert ("reconnect_token" in response) is (profile == "26.0")  # AuthRespSuccess gained it in 26


# ----- 5: event order -----------------------------------------------------------------------------
async def test_25_x_create_with_autostart_announces_changed_before_added() -> None:
    """service/crud_service.py _get_crud_wrapper_func sends ADDED after do_create returns, and
    plugins/virt/instance.py do_create starts the instance first (TS-25.10.0); the Incus listener
    (plugins/virt/websocket.py) announces the finished start as ``changed {status: RUNNING}``."""
    sim = quick("25.10")
    events: list[dict[str, Any]] = []
    sim.events.subscribe("virt.instance.query", lambda n: events.append(n["params"]))
    s = logged_in(sim)
    job = await sim.call(s, "virt.instance.create", [{"name": "c1", "image": "debian/bookworm", "autostart": True}])
    await sim.jobs.jobs[job].done.wait()
    assert [(e["msg"], e["id"]) for e in events] == [("changed", "c1"), ("added", "c1")]
    assert events[0]["fields"] == {"status": "RUNNING"}
    assert events[1]["fields"]["status"] == "RUNNING" and events[1]["fields"]["name"] == "c1"
    await sim.jobs.jobs[await sim.call(s, "virt.instance.delete", ["c1"])].done.wait()
    assert [(e["msg"], e.get("fields")) for e in events[2:]] == [("changed", {"status": "STOPPED"}), ("removed", None)]
