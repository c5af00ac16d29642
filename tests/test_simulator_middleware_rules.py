"""Rules of TrueNAS's middleware that a client the project did not write would notice, checked on the
wire against the simulator on every profile: message size limits, too many arguments, how many calls
run at once, ``vm.restart``, ``auth.generate_token`` and the ``/_upload`` schemes, the query options
of ``utils/filter_list.py`` and the legacy ``/websocket`` endpoint. Each test names the middleware
file (truenas/middleware, ``src/middlewared/middlewared/``) its rule comes from.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from truenas_simulator import Simulator, SimulatorServer

PROFILES = ["25.04.0", "25.04.2", "25.10", "26.0"]
VM_PROFILES = ["25.04.2", "25.10", "26.0"]


@pytest.fixture
async def served(request: pytest.FixtureRequest) -> AsyncIterator[tuple[Simulator, SimulatorServer]]:
    sim = Simulator(request.param, seed=3)
    sim.knobs.auth_fail_delay = 0.0
    server = await SimulatorServer(sim).start()
    try:
        yield sim, server
    finally:
        await server.stop()


class Rpc:
    """A bare JSON-RPC 2.0 socket: what any client sends, nothing the project's client adds."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.next_id = 0

    async def send(self, method: str, params: list[Any] | None = None) -> int:
        self.next_id += 1
        await self.ws.send_str(
            json.dumps({"jsonrpc": "2.0", "id": self.next_id, "method": method, "params": params or []})
        )
        return self.next_id

    async def reply(self, ident: int) -> dict[str, Any]:
        while True:
            message = await asyncio.wait_for(self.ws.receive_json(), 10)
            if message.get("id") == ident:
                return dict(message)

    async def call(self, method: str, params: list[Any] | None = None) -> Any:
        reply = await self.reply(await self.send(method, params))
        if "error" in reply:
            raise RpcError(reply["error"])
        return reply["result"]


class RpcError(Exception):
    def __init__(self, error: dict[str, Any]) -> None:
        super().__init__(error)
        self.error = error


class Http:
    """A client session that closes the sockets it opened (aiohttp warns of one left open)."""

    async def __aenter__(self) -> Http:
        self.session = aiohttp.ClientSession()
        self.opened: list[aiohttp.ClientWebSocketResponse] = []
        return self

    async def __aexit__(self, *exc: object) -> None:
        for ws in self.opened:
            await ws.close()
        await self.session.close()

    async def ws(self, url: str) -> aiohttp.ClientWebSocketResponse:
        ws = await self.session.ws_connect(url, max_msg_size=0)
        self.opened.append(ws)
        return ws


async def connect(server: SimulatorServer, http: Http, path: str = "/api/current") -> Rpc:
    return Rpc(await http.ws(f"{server.ws_url}{path}"))


async def logged_in(sim: Simulator, server: SimulatorServer, http: Http) -> Rpc:
    rpc = await connect(server, http)
    assert await rpc.call("auth.login_with_api_key", [sim.api_key]) is True
    return rpc


# ----- 1. message size limits (utils/limits.py parse_message, api/base/server/ws_handler/rpc.py) --------
@pytest.mark.parametrize("served", PROFILES, indirect=True)
async def test_a_message_over_8_kib_before_login_closes_the_socket(served: tuple[Simulator, SimulatorServer]) -> None:
    _, server = served
    async with Http() as http:
        rpc = await connect(server, http)
        padding = "x" * 8192
        await rpc.ws.send_str(json.dumps({"jsonrpc": "2.0", "id": 1, "method": "core.ping", "params": [padding]}))
        closing = await asyncio.wait_for(rpc.ws.receive(), 10)
        assert closing.type == aiohttp.WSMsgType.CLOSE
        # MsgSizeError(UNAUTHENTICATED): WSCloseCode.INVALID_TEXT (1007) and its message, no reply first.
        assert closing.data == 1007
        assert closing.extra == "Anonymous connection max message length is 8 kB"


@pytest.mark.parametrize("served", PROFILES, indirect=True)
async def test_8_kib_exactly_is_answered_before_login(served: tuple[Simulator, SimulatorServer]) -> None:
    _, server = served
    async with Http() as http:
        rpc = await connect(server, http)
        envelope = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "core.ping", "params": []})
        filler = 8192 - len(envelope) - len(', "pad": ""')
        text = envelope[:-1] + f', "pad": "{"y" * filler}"' + "}"
        assert len(text) == 8192
        await rpc.ws.send_str(text)
        assert (await rpc.reply(1))["result"] == "pong"


@pytest.mark.parametrize("served", PROFILES, indirect=True)
async def test_a_message_over_64_kib_after_login_closes_the_socket(served: tuple[Simulator, SimulatorServer]) -> None:
    sim, server = served
    async with Http() as http:
        rpc = await logged_in(sim, server, http)
        # 20 KiB is fine once logged in ...
        assert (await rpc.reply(await rpc.send("core.ping", []))).get("result") == "pong"
        big = json.dumps({"jsonrpc": "2.0", "id": 7, "method": "core.get_jobs", "params": [[["id", "=", "x" * 20000]]]})
        await rpc.ws.send_str(big)
        assert (await rpc.reply(7))["result"] == []
        # ... 64 KiB and one byte is not: WSCloseCode.MESSAGE_TOO_BIG (1009).
        huge = {"jsonrpc": "2.0", "id": 8, "method": "core.get_jobs", "params": [[["id", "=", "x" * 65536]]]}
        await rpc.ws.send_str(json.dumps(huge))
        closing = await asyncio.wait_for(rpc.ws.receive(), 10)
        assert closing.type == aiohttp.WSMsgType.CLOSE
        assert (closing.data, closing.extra) == (1009, "Max message length is 64 kB")


@pytest.mark.parametrize("served", PROFILES, indirect=True)
async def test_a_binary_frame_closes_the_socket(served: tuple[Simulator, SimulatorServer]) -> None:
    """rpc.py (and main.py for /websocket): a frame that is not text closes with UNSUPPORTED_DATA."""
    _, server = served
    async with Http() as http:
        for path in ("/api/current", "/websocket"):
            rpc = await connect(server, http, path)
            await rpc.ws.send_bytes(b"{}")
            closing = await asyncio.wait_for(rpc.ws.receive(), 10)
            assert (closing.type, closing.data) == (aiohttp.WSMsgType.CLOSE, 1003), path
            assert closing.extra == "Invalid websocket message type: <WSMsgType.BINARY: 2>"


# ----- 7. too many positional arguments (api/base/handler/accept.py model_dict_from_list) ---------------
@pytest.mark.parametrize("served", PROFILES, indirect=True)
async def test_too_many_arguments_are_refused(served: tuple[Simulator, SimulatorServer]) -> None:
    sim, server = served
    async with Http() as http:
        rpc = await logged_in(sim, server, http)
        with pytest.raises(RpcError) as refused:
            await rpc.call("core.ping", ["extra"])
        error = refused.value.error
        assert (error["code"], error["message"]) == (-32602, "Invalid params")
        assert error["data"]["error"] == 22 and error["data"]["errname"] == "EINVAL"
        assert error["data"]["extra"] == [["", "Too many arguments (expected 0, found 1)", 22]]
        assert error["data"]["reason"] == "[EINVAL] : Too many arguments (expected 0, found 1)\n"
        with pytest.raises(RpcError) as query:
            await rpc.call("core.get_jobs", [[], {}, "third"])
        assert query.value.error["data"]["extra"] == [["", "Too many arguments (expected 2, found 3)", 22]]
        assert await rpc.call("core.get_jobs", [[], {}]) == []


@pytest.mark.parametrize("served", ["25.10"], indirect=True)
async def test_too_many_arguments_to_a_job_fail_the_job(served: tuple[Simulator, SimulatorServer]) -> None:
    """A job method validates its arguments inside the job (api/base/decorator.py wraps the method)."""
    sim, server = served
    async with Http() as http:
        rpc = await logged_in(sim, server, http)
        job_id = await rpc.call("virt.instance.start", ["web1", "extra"])
        job = sim.jobs.jobs[job_id]
        await asyncio.wait_for(job.done.wait(), 10)
        failed = job.as_dict(sim.profile.message_ids)
        assert failed["state"] == "FAILED"
        assert failed["exc_info"]["type"] == "VALIDATION"
        assert failed["exc_info"]["extra"] == [["", "Too many arguments (expected 1, found 2)", 22]]


# ----- 8. 10 calls run at once, 10 more wait, the 21st is refused (utils/lock.py SoftHardSemaphore) -----
@pytest.mark.parametrize("served", PROFILES, indirect=True)
async def test_ten_calls_run_ten_wait_and_the_rest_are_refused(served: tuple[Simulator, SimulatorServer]) -> None:
    sim, server = served
    async with Http() as http:
        rpc = await logged_in(sim, server, http)
        sim.knobs.hung_calls = {"system.info"}
        hung = [await rpc.send("system.info") for _ in range(10)]
        await asyncio.sleep(0.2)
        queued = await rpc.send("core.ping")  # the 11th waits for one of the 10 to finish
        more = [await rpc.send("core.ping") for _ in range(9)]
        refused = await rpc.send("core.ping")  # the 21st
        reply = await rpc.reply(refused)
        assert reply["error"] == {
            "code": -32000,
            "message": "Maximum number of concurrent calls (20) has exceeded",
        }
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(rpc.reply(queued), 0.5)
        assert sim.counters.by_method["core.ping"] == 0  # the queued ones have not started
        assert len(hung) == 10 and len(more) == 9


# ----- 3. vm.restart (plugins/vm/vm_lifecycle.py VMLifecycle.restart; api/v*/vm.py VMRestartArgs) -------
@pytest.mark.parametrize("served", VM_PROFILES, indirect=True)
async def test_vm_restart_is_a_job_that_stops_then_starts(served: tuple[Simulator, SimulatorServer]) -> None:
    sim, server = served
    async with Http() as http:
        rpc = await logged_in(sim, server, http)
        vm = await rpc.call("vm.create", [{"name": "web01", "memory": 1024, "autostart": False}])
        await rpc.call("vm.start", [vm["id"]])
        before = (await rpc.call("vm.get_instance", [vm["id"]]))["status"]["pid"]
        job_id = await rpc.call("vm.restart", [vm["id"]])
        assert isinstance(job_id, int)  # a job: its id on the legacy-jobs default
        job = sim.jobs.jobs[job_id]
        await asyncio.wait_for(job.done.wait(), 10)
        assert (job.state, job.result) == ("SUCCESS", None)
        after = await rpc.call("vm.get_instance", [vm["id"]])
        assert after["status"]["state"] == "RUNNING" and after["status"]["pid"] != before
        assert [j.method for j in sim.jobs.jobs.values()] == ["vm.restart", "vm.stop"]  # stop is its own job

        # A VM that is not running: the stop job fails and restart says so, wrapping its error.
        await rpc.call("vm.poweroff", [vm["id"]])
        failed_id = await rpc.call("vm.restart", [vm["id"]])
        failed = sim.jobs.jobs[failed_id]
        await asyncio.wait_for(failed.done.wait(), 10)
        assert failed.state == "FAILED"
        stop_error = (
            "Domain 'web01' is not active"
            if sim.profile.name == "26.0"
            else "[EFAULT] VM state is currently not 'RUNNING'"
        )
        assert failed.error == f"[EFAULT] Failed to stop 'web01' vm: {stop_error}"
        assert (await rpc.call("vm.get_instance", [vm["id"]]))["status"]["state"] == "STOPPED"

        missing = sim.jobs.jobs[await rpc.call("vm.restart", [99])]  # vm.get_instance first
        await asyncio.wait_for(missing.done.wait(), 10)
        assert missing.as_dict(sim.profile.message_ids)["exc_info"]["extra"] == [[None, "VM 99 does not exist", 2]]


# ----- 4. auth.generate_token, TOKEN_PLAIN and the /_upload schemes -----------------------------------
# plugins/auth.py generate_token / login_with_token / login_ex TOKEN_PLAIN, api/v*/auth.py
# AuthGenerateTokenArgs (ttl=600, attrs={}, match_origin=True, single_use=False); the file app's
# parse_credentials + authenticate (restful.py on 25.x, apps/file_app.py on 26).
@pytest.mark.parametrize("served", PROFILES, indirect=True)
async def test_a_generated_token_logs_another_socket_in(served: tuple[Simulator, SimulatorServer]) -> None:
    sim, server = served
    async with Http() as http:
        anonymous = await connect(server, http)
        with pytest.raises(RpcError) as refused:
            await anonymous.call("auth.generate_token", [])
        assert refused.value.error["data"]["error"] == 207  # ENOTAUTHENTICATED
        rpc = await logged_in(sim, server, http)
        token = await rpc.call("auth.generate_token", [])
        assert isinstance(token, str) and len(token) >= 48
        other = await connect(server, http)
        assert await other.call("auth.login_with_token", [token]) is True
        assert (await other.call("auth.me"))["pw_name"] == "root"
        third = await connect(server, http)
        logged = await third.call("auth.login_ex", [{"mechanism": "TOKEN_PLAIN", "token": token}])
        assert logged["response_type"] == "SUCCESS"  # multi-use by default
        # single_use: one login, then it is gone.
        once = await rpc.call("auth.generate_token", [600, {}, True, True])
        assert await (await connect(server, http)).call("auth.login_with_token", [once]) is True
        assert await (await connect(server, http)).call("auth.login_with_token", [once]) is False
        # A token with attributes is for downloads, not logins.
        tagged = await rpc.call("auth.generate_token", [600, {"purpose": "x"}])
        refused_ex = await (await connect(server, http)).call(
            "auth.login_ex", [{"mechanism": "TOKEN_PLAIN", "token": tagged}]
        )
        assert refused_ex == {"response_type": "AUTH_ERR"}
        with pytest.raises(RpcError) as invalid:
            await rpc.call("auth.generate_token", ["soon"])
        assert invalid.value.error["data"]["extra"][0][:2] == ["ttl", "Input should be a valid integer"]


@pytest.mark.parametrize("served", VM_PROFILES, indirect=True)
async def test_upload_takes_token_bearer_and_basic(served: tuple[Simulator, SimulatorServer]) -> None:
    sim, server = served
    async with Http() as http:
        rpc = await logged_in(sim, server, http)
        await rpc.call("pool.dataset.create", [{"name": "tank/images"}])
        token = await rpc.call("auth.generate_token", [600, {}, True, True])

        def form(name: str) -> aiohttp.FormData:
            data = aiohttp.FormData()
            data.add_field("data", json.dumps({"method": "filesystem.put", "params": [f"/mnt/tank/images/{name}", {}]}))
            data.add_field("file", b"disk", filename=name, content_type="application/octet-stream")
            return data

        async def upload(name: str, headers: dict[str, str] | None = None, query: str = "") -> tuple[int, str]:
            answer = await http.session.post(f"{server.url}/_upload{query}", data=form(name), headers=headers or {})
            return answer.status, await answer.text()

        status, body = await upload("a.img", {"Authorization": f"Token {token}"})
        assert status == 200 and "job_id" in json.loads(body)
        # single use: the second upload with it is forbidden, as an unknown token is.
        assert await upload("b.img", {"Authorization": f"Token {token}"}) == (403, "Invalid token")
        assert await upload("b.img", {"Authorization": "Token nope"}) == (403, "Invalid token")
        multi = await rpc.call("auth.generate_token", [])
        assert (await upload("c.img", query=f"?auth_token={multi}"))[0] == 200  # the query-string form
        assert (await upload("d.img", {"Authorization": f"Bearer {sim.api_key}"}))[0] == 200
        assert await upload("e.img", {"Authorization": "Bearer 1-wrong"}) == (401, "Invalid API key")
        # Basic is a username and password: the simulator has no password accounts.
        basic = base64.b64encode(b"root:secret").decode()
        assert await upload("f.img", {"Authorization": f"Basic {basic}"}) == (401, "Bad username or password")
        assert (await upload("g.img", {"Authorization": "Basic abc"}))[0] == 400  # bad padding
        assert (await upload("h.img", {"Authorization": "Digest x"}))[0] == 401
        assert sorted(p.rsplit("/", 1)[1] for p in sim.storage.files if p.startswith("/mnt/tank/images/")) == [
            "a.img",
            "c.img",
            "d.img",
        ]


# ----- 5. query options as utils/filter_list.py applies them ---------------------------------------------
ROWS = [
    {"id": 1, "name": "b", "pool": "tank", "status": {"state": "RUNNING", "pid": 10}},
    {"id": 2, "name": "a", "pool": None, "status": {"state": "STOPPED", "pid": None}},
    {"id": 3, "name": "c", "pool": "fast", "status": {"state": "RUNNING", "pid": 30}},
    {"id": 4, "name": "a", "pool": "tank", "status": {"state": "STOPPED", "pid": None}},
]


def test_count_is_taken_before_offset_and_limit() -> None:
    from truenas_simulator.filters import filter_list

    assert filter_list(ROWS, [], {"count": True, "limit": 1}) == 4
    assert filter_list(ROWS, [["pool", "=", "tank"]], {"count": True, "offset": 1, "limit": 1}) == 2


def test_order_by_sorts_once_per_key_so_the_last_key_leads() -> None:
    """do_order sorts the list by each key in turn (a stable sort): the last key is the primary one."""
    from truenas_simulator.filters import filter_list

    by = filter_list(ROWS, [], {"order_by": ["-id", "name"]})
    assert [r["id"] for r in by] == [4, 2, 1, 3]
    nulls_first = filter_list(ROWS, [], {"order_by": ["nulls_first:-pool"]})
    assert [r["id"] for r in nulls_first] == [2, 1, 4, 3]
    nulls_last = filter_list(ROWS, [], {"order_by": ["nulls_last:pool"]})
    assert [r["id"] for r in nulls_last] == [3, 1, 4, 2]


def test_select_takes_dotted_paths_and_renames() -> None:
    from truenas_simulator.filters import filter_list

    picked = filter_list(ROWS, [["id", "<", 3]], {"select": ["name", "status.state", ["status.pid", "pid"], "nope"]})
    assert picked == [
        {"name": "b", "status": {"state": "RUNNING"}, "pid": 10},
        {"name": "a", "status": {"state": "STOPPED"}, "pid": None},
    ]
    # select_path stops at a value that is not an object and keeps it; a missing key leaves it out.
    assert filter_list(ROWS[:1], [], {"select": ["name.first", "status.nope.x"]}) == [{"name": "b"}]


def test_get_ignores_limit_one_and_comes_after_ordering() -> None:
    from truenas_simulator.filters import filter_list

    assert filter_list(ROWS, [], {"get": True, "limit": 1, "order_by": ["-id"]})["id"] == 4
    assert filter_list(ROWS, [["name", "=", "a"]], {"get": True})["id"] == 2


@pytest.mark.parametrize("served", PROFILES, indirect=True)
async def test_get_with_a_limit_over_one_is_refused(served: tuple[Simulator, SimulatorServer]) -> None:
    """25.10 and 26 check the combination in QueryOptions' model validator (api/v25_10_0/common.py):
    a validation error on ``options``; 25.04's model has none, so filter_list's ValueError is a call error."""
    sim, server = served
    async with Http() as http:
        rpc = await logged_in(sim, server, http)
        with pytest.raises(RpcError) as refused:
            await rpc.call("core.get_jobs", [[], {"get": True, "limit": 2}])
        error = refused.value.error
        message = "Invalid options combination. `get` implies a single result."
        if sim.profile.name in ("25.10", "26.0"):
            assert error["code"] == -32602
            assert error["data"]["extra"] == [["options", f"Value error, {message}", 22]]
        else:
            assert error["code"] == -32001
            assert error["data"]["reason"] == message
        # 25.10 added a ceiling on limit (utils/filter_list.py MAX_LIMIT); 25.04 has none.
        if sim.profile.name in ("25.10", "26.0"):
            with pytest.raises(RpcError) as ceiling:
                await rpc.call("core.get_jobs", [[], {"limit": 10001}])
            assert ceiling.value.error["data"]["extra"] == [
                ["options", "Value error, Options limit must be between 1 and 10000", 22]
            ]
        else:
            assert await rpc.call("core.get_jobs", [[], {"limit": 10001}]) == []
        with pytest.raises(RpcError) as unknown:
            await rpc.call("core.get_jobs", [[], {"colour": 1}])
        assert unknown.value.error["data"]["extra"] == [["options.colour", "Extra inputs are not permitted", 22]]


# ----- 6. where an argument error is located ------------------------------------------------------------
# api/base/handler/accept.py validate_model joins pydantic's location: the Args model's field name
# first (``id``, ``event``, ``login_data``), never the method's; a ``@single_argument_args('x')``
# model's one field is ``x`` (``virt_instance_create.memory``), and a plugin's own
# ``verrors.add('pool_dataset_create.name', ...)`` keeps the name it writes.
@pytest.mark.parametrize("served", PROFILES, indirect=True)
async def test_argument_errors_are_located_at_the_args_field(served: tuple[Simulator, SimulatorServer]) -> None:
    sim, server = served
    async with Http() as http:
        rpc = await logged_in(sim, server, http)

        async def extra(method: str, params: list[Any]) -> Any:
            with pytest.raises(RpcError) as refused:
                await rpc.call(method, params)
            assert refused.value.error["code"] == -32602, refused.value.error
            return refused.value.error["data"]["extra"]

        assert await extra("core.job_abort", ["x"]) == [["id", "Input should be a valid integer", 22]]
        assert await extra("core.subscribe", [5]) == [["event", "Input should be a valid string", 22]]
        assert await extra("auth.login", ["root"]) == [["password", "Field required", 22]]
        wrong_tag = await extra("auth.login_ex", [{"mechanism": "NOPE"}])
        assert [row[0] for row in wrong_tag] == ["login_data"]
        assert await extra("auth.login_ex", [{"api_key": "x"}]) == [["login_data.mechanism", "Field required", 22]]
        if sim.profile.has_virt:
            assert await extra("virt.instance.get_instance", []) == [["id", "Field required", 22]]
            job = sim.jobs.jobs[await rpc.call("virt.instance.delete", [5])]
            await asyncio.wait_for(job.done.wait(), 10)
            assert job.as_dict(True)["exc_info"]["extra"] == [["id", "Input should be a valid string", 22]]
            job = sim.jobs.jobs[await rpc.call("virt.instance.start", [5])]
            await asyncio.wait_for(job.done.wait(), 10)
            assert job.as_dict(True)["exc_info"]["extra"] == [["id", "Input should be a valid string", 22]]


# ----- 2. the legacy /websocket endpoint (main.py ws_handler, apps/websocket_app.py) ----------------------
# Served on 25.04, 25.10 and 26 alike: the DDP-style protocol of ``WebSocketApplication``.
class Ddp:
    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.next_id = 0
        self.events: list[dict[str, Any]] = []  # what came while waiting for a result

    async def send(self, message: dict[str, Any]) -> None:
        await self.ws.send_str(json.dumps(message))

    async def receive(self) -> dict[str, Any]:
        return dict(await asyncio.wait_for(self.ws.receive_json(), 10))

    async def method(self, method: str, params: list[Any] | None = None) -> str:
        self.next_id += 1
        ident = f"m{self.next_id}"
        await self.send({"msg": "method", "id": ident, "method": method, "params": params or []})
        return ident

    async def result(self, ident: str) -> dict[str, Any]:
        while True:
            message = await self.receive()
            if message.get("msg") == "result" and message.get("id") == ident:
                return message
            self.events.append(message)

    async def call(self, method: str, params: list[Any] | None = None) -> Any:
        reply = await self.result(await self.method(method, params))
        assert "error" not in reply, reply
        return reply["result"]


async def ddp(server: SimulatorServer, http: Http) -> Ddp:
    return Ddp(await http.ws(f"{server.ws_url}/websocket"))


@pytest.mark.parametrize("served", PROFILES, indirect=True)
async def test_legacy_websocket_speaks_ddp(served: tuple[Simulator, SimulatorServer]) -> None:
    sim, server = served
    async with Http() as http:
        client = await ddp(server, http)
        await client.send({"msg": "method", "id": "early", "method": "core.ping"})
        assert await client.receive() == {"msg": "failed", "version": "1"}  # no handshake yet
        await client.send({"msg": "connect", "version": "2"})
        assert await client.receive() == {"msg": "failed", "version": "1"}
        await client.send({"msg": "connect", "version": "1", "support": ["1"]})
        connected = await client.receive()
        assert connected["msg"] == "connected" and isinstance(connected["session"], str)
        assert await client.call("core.ping") == "pong"

        refused = await client.result(await client.method("system.info"))
        assert refused["error"]["error"] == 207 and refused["error"]["errname"] == "ENOTAUTHENTICATED"
        assert refused["error"]["reason"] == "[ENOTAUTHENTICATED] Not authenticated"
        missing = await client.result(await client.method("core.nothing"))
        assert (missing["error"]["error"], missing["error"]["reason"]) == (
            201,
            "[ENOMETHOD] Method 'nothing' not found in 'core'",
        )
        assert await client.call("auth.login_with_api_key", [sim.api_key]) is True
        assert (await client.call("system.info"))["version"] == sim.profile.system_version.removeprefix("TrueNAS-")

        # A validation error: errno EAGAIN, type VALIDATION, the errors in extra.
        invalid = await client.result(await client.method("core.job_abort", ["x"]))
        assert invalid["error"]["error"] == 11 and invalid["error"]["type"] == "VALIDATION"
        assert invalid["error"]["extra"] == [["id", "Input should be a valid integer", 22]]

        # Subscriptions: "sub" -> "ready"; events carry collection, id, fields.
        await client.send({"msg": "sub", "id": "s1", "name": "core.get_jobs"})
        assert await client.receive() == {"msg": "ready", "subs": ["s1"]}
        method = "vm.restart" if sim.profile.has_vm else "virt.instance.start"
        await client.call("core.set_options", [{"legacy_jobs": False}])  # no say here (call_method)
        job_id = await client.call(method, [99 if sim.profile.has_vm else "nope"])
        assert isinstance(job_id, int)  # a job answers its id, whatever the options
        seen: list[dict[str, Any]] = []
        while not seen or seen[-1].get("fields", {}).get("state") not in ("FAILED", "SUCCESS"):
            event = client.events.pop(0) if client.events else await client.receive()
            assert event["collection"] == "core.get_jobs" and event["id"] == job_id
            seen.append(event)
        assert seen[0]["msg"] == "added" and seen[-1]["msg"] == "changed"
        assert seen[-1]["fields"]["state"] == "FAILED"


@pytest.mark.parametrize("served", PROFILES, indirect=True)
async def test_legacy_websocket_limits(served: tuple[Simulator, SimulatorServer]) -> None:
    sim, server = served
    async with Http() as http:
        client = await ddp(server, http)
        await client.send({"msg": "connect", "version": "1"})
        await client.receive()
        await client.ws.send_str(json.dumps({"msg": "method", "id": "x", "method": "core.ping", "pad": "p" * 8192}))
        closing = await asyncio.wait_for(client.ws.receive(), 10)
        assert (closing.type, closing.data, closing.extra) == (
            aiohttp.WSMsgType.CLOSE,
            1007,
            "Anonymous connection max message length is 8 kB",
        )
        # Text that is not JSON closes it too (1007, the parser's message), unlike /api/current.
        other = await ddp(server, http)
        await other.ws.send_str("{nope")
        closing = await asyncio.wait_for(other.ws.receive(), 10)
        assert closing.type == aiohttp.WSMsgType.CLOSE and closing.data == 1007
        # 10 at once, 10 more wait, the 21st is refused with ETOOMANYREFS.
        busy = await ddp(server, http)
        await busy.send({"msg": "connect", "version": "1"})
        await busy.receive()
        assert await busy.call("auth.login_with_api_key", [sim.api_key]) is True
        sim.knobs.hung_calls = {"system.info"}
        for _ in range(20):
            await busy.method("system.info")
        refused = await busy.result(await busy.method("system.info"))
        assert (refused["error"]["error"], refused["error"]["errname"]) == (109, "ETOOMANYREFS")
        assert refused["error"]["reason"] == "Maximum number of concurrent calls (20) has exceeded."


# ----- 9. REST v2.0 as restful.py maps a request onto a method (25.x only) ------------------------------
REST_PROFILES = ["25.04.0", "25.04.2", "25.10"]


class Rest:
    """Bare HTTP against ``/api/v2.0`` as any REST client sends it; paths are sent as written (encoded)."""

    def __init__(self, http: Http, server: SimulatorServer, key: str) -> None:
        self.http, self.base, self.headers = http, f"{server.url}/api/v2.0", {"Authorization": f"Bearer {key}"}

    async def __call__(self, verb: str, path: str, body: Any = None, **query: str) -> tuple[int, Any]:
        import yarl

        url = yarl.URL(f"{self.base}{path}", encoded=True)
        if query:
            url = url.update_query(query)
        data = None if body is None else json.dumps(body)
        async with self.http.session.request(verb, url, data=data, headers=self.headers) as answer:
            text = await answer.text()
            return answer.status, json.loads(text) if text and answer.content_type == "application/json" else text


@pytest.mark.parametrize("served", REST_PROFILES, indirect=True)
async def test_rest_maps_snapshot_calls_as_restful_py_does(served: tuple[Simulator, SimulatorServer]) -> None:
    """restful.py: a CRUD service's GET/POST, ``id/{id_}`` (aiohttp's ``[^{}/]+`` on the encoded path:
    a snapshot's id comes with ``%2F``), a two-parameter method's body keyed by parameter name."""
    sim, server = served
    snapshots = sim.profile.snapshot_namespace.replace(".", "/")
    async with Http() as http:
        rest = Rest(http, server, sim.api_key)
        assert (await rest("POST", "/pool/dataset", {"name": "tank/rest"}))[0] == 200
        for name in ("one", "two"):
            status, taken = await rest("POST", f"/{snapshots}", {"dataset": "tank/rest", "name": name})
            assert status == 200 and taken["id"] == f"tank/rest@{name}", taken
        status, found = await rest("GET", f"/{snapshots}", dataset__regex=r"^tank/rest(/|\Z)")
        assert status == 200 and sorted(s["id"] for s in found) == ["tank/rest@one", "tank/rest@two"]
        # filter_list's `~` is re.match: anchored at the start.
        assert (await rest("GET", f"/{snapshots}", dataset__regex="rest"))[1] == []
        # An unexpected key, a missing one: 400, restful.py's words.
        status, refused = await rest("POST", f"/{snapshots}/rollback", {"id": "tank/rest@one", "force": True})
        assert (status, refused["message"]) == (400, "The following attributes are not expected: force")
        status, refused = await rest("POST", f"/{snapshots}/rollback", {"options": {}})
        assert (status, refused["message"]) == (400, "id attribute expected.")
        status, _ = await rest(
            "POST", f"/{snapshots}/rollback", {"id": "tank/rest@one", "options": {"recursive": True}}
        )
        assert status == 200 and "tank/rest@two" not in sim.storage.snapshots
        # The id with a literal slash is another path: no route (aiohttp's plain 404).
        status, text = await rest("DELETE", f"/{snapshots}/id/tank/rest@one")
        assert (status, text) == (404, "404: Not Found") and "tank/rest@one" in sim.storage.snapshots
        status, _ = await rest("GET", f"/{snapshots}/id/tank%2Frest%40one")
        assert status == 200
        assert await rest("DELETE", f"/{snapshots}/id/tank%2Frest%40one") == (200, True)
        assert "tank/rest@one" not in sim.storage.snapshots
        status, missing = await rest("GET", f"/{snapshots}/id/tank%2Frest%40one")
        assert (status, missing) == (404, {"message": ""})
        # What the service's own routes serve has no route of its own (register_resources' blacklist).
        for verb, path in (
            ("GET", f"/{snapshots}/query"),
            ("POST", f"/{snapshots}/create"),
            ("GET", "/virt/global/config"),
        ):
            assert (await rest(verb, path, {"dataset": "tank/rest"} if verb == "POST" else None))[0] == 404, path
        assert (await rest("GET", f"/{snapshots}//"))[0] == 404
        # Query values convert as restful.py converts them: FALSE is False, whatever its case.
        status, plain = await rest("GET", "/pool/dataset", encrypted="FALSE")
        assert status == 200 and "tank/rest" in [d["id"] for d in plain]


@pytest.mark.parametrize("served", ["25.04.2", "25.10"], indirect=True)
async def test_rest_serves_item_methods_under_the_id(served: tuple[Simulator, SimulatorServer]) -> None:
    """``@item_method`` (vm.status) is ``id/{id_}/<name>``, POST since it accepts an argument (the id);
    ``/vm/status`` does not exist. A CRUD update takes its data as the whole body."""
    sim, server = served
    async with Http() as http:
        rest = Rest(http, server, sim.api_key)
        status, vm = await rest("POST", "/vm", {"name": "restvm", "memory": 512})
        assert status == 200, vm
        status, state = await rest("POST", f"/vm/id/{vm['id']}/status")
        assert status == 200 and state["state"] == "STOPPED"
        assert await rest("GET", f"/vm/id/{vm['id']}/status") == (405, "405: Method Not Allowed")
        assert (await rest("POST", "/vm/status", vm["id"]))[0] == 404
        status, updated = await rest("PUT", f"/vm/id/{vm['id']}", {"description": "over REST"})
        assert status == 200 and updated["description"] == "over REST"


def test_filter_regex_is_anchored_at_the_start_as_re_match() -> None:
    """utils/__init__.py (25.04.1 and later 25.x) and api/base/validators/filter_ops.py (26) ``op_re``:
    ``re.match(y, x or '')`` (25.04.0's is ``re.match(y, x)``, which raises on a null field: not modelled)."""
    from truenas_simulator.filters import filter_list

    assert [r["id"] for r in filter_list(ROWS, [["name", "~", "a"]], {})] == [2, 4]
    assert filter_list(ROWS, [["status.state", "~", "UNN"]], {}) == []  # re.search would find it
    assert filter_list(ROWS, [["name", "~", "^b"]], {})[0]["id"] == 1
    # A null field is matched as "" (a pattern that matches "" matches it).
    assert [r["id"] for r in filter_list(ROWS, [["pool", "~", "(tank)?$"]], {})] == [1, 2, 4]
