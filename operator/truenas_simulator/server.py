"""HTTP side of the simulator (aiohttp): JSON-RPC 2.0 over WebSocket at ``/api/current`` and
``/api/vXX.YY.Z``, ``GET /api/versions``, the REST v2.0 facade (25.x profiles) and the control API
under ``/_simulator/`` for out-of-band changes, knobs and call counters."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import json
import ssl
import traceback
from dataclasses import asdict
from typing import Any

from aiohttp import WSMsgType, web

from .context import Session
from .errors import CallError, MatchNotFound, MethodNotFound, ValidationErrors, errname
from .images import simplestreams_file
from .simulator import Simulator
from .state import Image

JSONRPC_CONCURRENCY_ERROR = "Maximum number of concurrent calls ({}) has exceeded"


def _is_loopback(request: web.Request) -> bool:
    try:
        return ipaddress.ip_address(request.remote or "").is_loopback
    except ValueError:
        return request.remote is None  # unix sockets and in-process test clients


def _trace(exc: BaseException) -> dict[str, Any]:
    return {
        "class": type(exc).__name__,
        "frames": [],
        "formatted": "".join(traceback.format_exception(exc)),
        "repr": repr(exc),
    }


def jsonrpc_error(exc: BaseException) -> dict[str, Any]:
    """Maps a middleware exception to a JSON-RPC error object (truenas-api.md §2.1)."""
    if isinstance(exc, MethodNotFound):
        return {"code": -32601, "message": "Method does not exist"}
    if isinstance(exc, ValidationErrors):
        data = {"error": 22, "errname": "EINVAL", "reason": str(exc), "trace": _trace(exc), "extra": exc.extra()}
        return {"code": -32602, "message": "Invalid params", "data": data}
    if isinstance(exc, CallError):
        data = {
            "error": exc.errno,
            "errname": errname(exc.errno),
            "reason": str(exc),
            "trace": _trace(exc),
            "extra": exc.extra,
        }
        return {"code": -32001, "message": "Method call error", "data": data}
    data = {"error": 22, "errname": "EINVAL", "reason": str(exc) or repr(exc), "trace": _trace(exc), "extra": None}
    return {"code": -32001, "message": "Method call error", "data": data}


class SimulatorServer:
    """Serves one ``Simulator``; ``await start()`` then use ``url`` / ``ws_url``."""

    def __init__(
        self,
        sim: Simulator,
        host: str = "127.0.0.1",
        port: int = 0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.sim = sim
        self.host = host
        self.port = port
        self.ssl_context = ssl_context
        self.app = web.Application(client_max_size=4 * 2**20)
        self.runner: web.AppRunner | None = None
        self.websockets: set[web.WebSocketResponse] = set()
        self._routes()

    @property
    def scheme(self) -> str:
        return "https" if self.ssl_context else "http"

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"{'wss' if self.ssl_context else 'ws'}://{self.host}:{self.port}"

    async def start(self) -> SimulatorServer:
        self.runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=1.0)
        await self.runner.setup()
        site = web.TCPSite(self.runner, self.host, self.port, ssl_context=self.ssl_context)
        await site.start()
        server = site._server
        if self.port == 0 and server is not None:
            sockets = getattr(server, "sockets", None) or []
            self.port = sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        await self.drop_connections()
        if self.runner is not None:
            # Idle keep-alive (REST) connections too: a TLS close would otherwise wait for the peer.
            server = self.runner.server
            for handler in list(server.connections if server is not None else []):
                if handler.transport is not None:
                    handler.transport.abort()
            await self.runner.cleanup()
            self.runner = None
            await asyncio.sleep(0)

    async def drop_connections(self) -> int:
        """Closes every WebSocket abruptly, as a network failure or a middleware restart would."""
        dropped = 0
        for ws in list(self.websockets):
            transport = ws._req.transport if ws._req is not None else None
            if transport is not None:
                transport.abort()
            dropped += 1
        return dropped

    async def send_raw(self, text: str) -> int:
        """Sends ``text`` as is to every WebSocket client: frames TrueNAS should never send (faults)."""
        sent = 0
        for ws in list(self.websockets):
            if not ws.closed:
                await ws.send_str(text)
                sent += 1
        return sent

    # ----- routes -----------------------------------------------------------------------------------
    def _routes(self) -> None:
        r = self.app.router
        r.add_get("/api/versions", self._versions)
        r.add_get("/api/current", self._websocket)
        r.add_get("/api/{version:v[0-9.]+}", self._websocket)
        r.add_route("*", "/api/v2.0/{path:.*}", self._rest)
        r.add_get("/_simulator/state", self._control_state)
        r.add_get("/_simulator/calls", self._control_calls)
        r.add_delete("/_simulator/calls", self._control_reset_calls)
        r.add_get("/_simulator/knobs", self._control_knobs)
        r.add_patch("/_simulator/knobs", self._control_knobs)
        r.add_post("/_simulator/instances", self._control_seed)
        r.add_patch("/_simulator/instances/{name}", self._control_change)
        r.add_delete("/_simulator/instances/{name}", self._control_remove)
        r.add_post("/_simulator/instances/{name}/power", self._control_power)
        r.add_post("/_simulator/drop-connections", self._control_drop)
        r.add_post("/_simulator/virt-state", self._control_virt_state)
        r.add_post("/_simulator/images", self._control_add_image)
        r.add_post("/_simulator/upgrade", self._control_upgrade)
        r.add_post("/_upload", self._upload)
        r.add_get("/_simulator/vms", self._control_vms)
        r.add_patch("/_simulator/vms/{name}", self._control_change_vm)
        r.add_get("/_simulator/storage", self._control_storage)
        r.add_get("/_simulator/simplestreams/{path:.*}", self._simplestreams)

    async def _versions(self, request: web.Request) -> web.Response:
        return web.json_response(list(self.sim.profile.api_versions))

    # ----- JSON-RPC over WebSocket -------------------------------------------------------------------
    async def _websocket(self, request: web.Request) -> web.StreamResponse:
        version = request.match_info.get("version", "current")
        if version != "current" and version not in self.sim.profile.api_versions:
            raise web.HTTPNotFound(text=f"API version {version} is not supported")
        ws = web.WebSocketResponse(heartbeat=None, max_msg_size=16 * 2**20)
        await ws.prepare(request)
        self.websockets.add(ws)
        outbox: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        session = self.sim.open_session(
            Session(
                transport="websocket",
                api_version=version,
                secure=request.secure,
                loopback=_is_loopback(request),
                send_event=outbox.put_nowait,
            )
        )
        in_flight: set[asyncio.Task[None]] = set()

        async def writer() -> None:
            while (message := await outbox.get()) is not None:
                if ws.closed:
                    return
                with contextlib.suppress(ConnectionError, RuntimeError):
                    await ws.send_str(json.dumps(message))

        writer_task = asyncio.create_task(writer())
        try:
            async for message in ws:
                if message.type != WSMsgType.TEXT:
                    continue
                self._dispatch(message.data, session, outbox, in_flight, ws)
        finally:
            for task in in_flight:
                task.cancel()
            self.sim.close_session(session)
            outbox.put_nowait(None)
            await asyncio.gather(writer_task, return_exceptions=True)
            self.websockets.discard(ws)
        return ws

    def _dispatch(
        self,
        text: str,
        session: Session,
        outbox: asyncio.Queue[dict[str, Any] | None],
        in_flight: set[asyncio.Task[None]],
        ws: web.WebSocketResponse,
    ) -> None:
        try:
            request = json.loads(text)
        except json.JSONDecodeError as exc:
            outbox.put_nowait(
                {"jsonrpc": "2.0", "id": None, "error": {"code": -32700, "message": f"Parse error: {exc}"}}
            )
            return
        problem = _envelope_problem(request)
        if problem:
            ident = request.get("id") if isinstance(request, dict) else None
            outbox.put_nowait({"jsonrpc": "2.0", "id": ident, "error": {"code": -32600, "message": problem}})
            return
        ident = request.get("id")
        notification = "id" not in request
        if len(in_flight) >= self.sim.knobs.max_concurrent_calls:
            message = JSONRPC_CONCURRENCY_ERROR.format(self.sim.knobs.max_concurrent_calls)
            if not notification:
                outbox.put_nowait({"jsonrpc": "2.0", "id": ident, "error": {"code": -32000, "message": message}})
            return

        async def run() -> None:
            if self.sim.knobs.drop_rate and self.sim.random.random() < self.sim.knobs.drop_rate:
                self.sim.counters.count(request["method"])
                self.sim.counters.faults["dropped"] += 1
                transport = ws._req.transport if ws._req is not None else None
                if transport is not None:
                    transport.abort()
                return
            try:
                result = await self.sim.call(session, request["method"], request.get("params", []), ident)
                reply: dict[str, Any] = {"jsonrpc": "2.0", "id": ident, "result": result}
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                reply = {"jsonrpc": "2.0", "id": ident, "error": jsonrpc_error(exc)}
            if not notification:
                outbox.put_nowait(reply)

        task = asyncio.create_task(run())
        in_flight.add(task)
        task.add_done_callback(in_flight.discard)

    # ----- REST v2.0 --------------------------------------------------------------------------------
    async def _rest(self, request: web.Request) -> web.StreamResponse:
        if not self.sim.profile.has_rest:
            raise web.HTTPNotFound(text="404: Not Found")
        if self.sim.knobs.rest_5xx_rate and self.sim.random.random() < self.sim.knobs.rest_5xx_rate:
            self.sim.counters.faults["rest_5xx"] += 1
            return web.Response(status=502, text="502: Bad Gateway")
        session = Session(transport="rest", secure=request.secure, loopback=_is_loopback(request))
        header = request.headers.get("Authorization", "")
        if not header:
            return web.Response(status=401, text="401: Unauthorized")
        scheme, _, credential = header.partition(" ")
        if scheme != "Bearer" or self.sim.auth.authenticate_key(credential.strip(), session) != "SUCCESS":
            await self.sim.auth.refusal_delay()
            return web.Response(status=401, text="Invalid API key")
        try:
            method, params = await _rest_call(request)
        except _RestBadRequest as exc:
            return web.json_response(exc.body, status=400)
        except LookupError:
            raise web.HTTPNotFound(text="404: Not Found") from None
        try:
            result = await self.sim.call(session, method, params)
        except MethodNotFound:
            raise web.HTTPNotFound(text="404: Not Found") from None
        except ValidationErrors as exc:
            body: dict[str, list[dict[str, Any]]] = {}
            for attr, msg, err in exc.errors:
                body.setdefault("null" if attr is None else attr, []).append({"message": msg, "errno": err})
            return web.json_response(body, status=422)
        except CallError as exc:
            if exc.errno == errno.EACCES and exc.errmsg == "Not authorized":
                return web.Response(status=403)  # REST checks roles before the call: empty 403
            return web.json_response({"message": exc.errmsg, "errno": exc.errno}, status=422)
        except MatchNotFound:
            return web.json_response({"message": ""}, status=404)
        except Exception as exc:
            return web.json_response(
                {"message": str(exc) or repr(exc), "traceback": traceback.format_exc()}, status=500
            )
        return web.json_response(result)

    # ----- control API ------------------------------------------------------------------------------
    async def _control_state(self, request: web.Request) -> web.Response:
        sim = self.sim
        return web.json_response(
            {
                "profile": sim.profile.name,
                "version": sim.profile.system_version,
                "virt_state": sim.global_config.state,
                "instances": [i.entry(sim.profile) for i in sim.instances.values()]
                + [c.entry() for c in sim.containers.containers.values()],
                "jobs": len(sim.jobs.jobs),
                "connections": len(self.websockets),
            }
        )

    async def _control_calls(self, request: web.Request) -> web.Response:
        return web.json_response(self.sim.counters.snapshot())

    async def _control_reset_calls(self, request: web.Request) -> web.Response:
        self.sim.counters.reset()
        return web.json_response(self.sim.counters.snapshot())

    async def _control_knobs(self, request: web.Request) -> web.Response:
        knobs = self.sim.knobs
        if request.method == "PATCH":
            changes = await request.json()
            for key, value in changes.items():
                if not hasattr(knobs, key):
                    return web.json_response({"message": f"unknown knob {key!r}"}, status=400)
                setattr(knobs, key, set(value) if key in ("hung_methods", "hung_calls") else value)
        data = asdict(knobs)
        data["hung_methods"] = sorted(knobs.hung_methods)
        data["hung_calls"] = sorted(knobs.hung_calls)
        return web.json_response(data)

    async def _control_seed(self, request: web.Request) -> web.Response:
        fields = await request.json()
        try:
            instance = self.sim.seed_instance(**fields)
        except (TypeError, KeyError) as exc:
            return web.json_response({"message": f"cannot seed instance: {exc}"}, status=400)
        return web.json_response(self.sim.entry_of(instance), status=201)

    async def _control_change(self, request: web.Request) -> web.Response:
        try:
            instance = self.sim.change_instance(request.match_info["name"], await request.json())
        except ValidationErrors:
            raise web.HTTPNotFound() from None
        except ValueError as exc:
            return web.json_response({"message": str(exc)}, status=400)
        return web.json_response(self.sim.entry_of(instance))

    async def _control_remove(self, request: web.Request) -> web.Response:
        try:
            self.sim.remove_instance(request.match_info["name"])
        except ValidationErrors:
            raise web.HTTPNotFound() from None
        return web.json_response(None)

    async def _control_power(self, request: web.Request) -> web.Response:
        status = (await request.json()).get("status")
        if status not in self.sim.profile.statuses and status not in ("STARTING", "STOPPING"):
            return web.json_response({"message": f"unknown status {status!r}"}, status=400)
        try:
            instance = self.sim.set_power(request.match_info["name"], status)
        except ValidationErrors:
            raise web.HTTPNotFound() from None
        return web.json_response(self.sim.entry_of(instance))

    async def _control_drop(self, request: web.Request) -> web.Response:
        return web.json_response({"dropped": await self.drop_connections()})

    async def _control_upgrade(self, request: web.Request) -> web.Response:
        """Upgrades the simulated TrueNAS (e.g. 25.10 -> 26.0, migrating containers) and drops connections."""
        target = (await request.json()).get("profile", "26.0")
        try:
            log = self.sim.upgrade(target)
        except ValueError as exc:
            return web.json_response({"message": str(exc)}, status=400)
        await self.drop_connections()
        return web.json_response({"profile": self.sim.profile.name, "migration": log})

    async def _control_add_image(self, request: web.Request) -> web.Response:
        """Adds an image to the catalogue: {"alias", "os", "release", "variant"?, "instance_types"?}."""
        fields = await request.json()
        try:
            image = Image(
                alias=fields["alias"],
                os=fields["os"],
                release=fields["release"],
                variant=fields.get("variant", "default"),
                instance_types=tuple(fields.get("instance_types", ("CONTAINER", "VM"))),
            )
        except KeyError as exc:
            return web.json_response({"message": f"missing {exc.args[0]}"}, status=400)
        self.sim.images[image.alias] = image
        return web.json_response({"alias": image.alias}, status=201)

    async def _upload(self, request: web.Request) -> web.Response:
        """``POST /_upload`` (apps/file_app.py): multipart ``data`` (``{"method", "params"}``) then ``file``;
        ``Authorization: Bearer <api key>``; answers ``{"job_id": N}``."""
        reader = await request.multipart()
        part = await reader.next()
        if part is None or getattr(part, "name", None) != "data":
            return web.Response(status=405, text='"data" part must be the first on payload')
        try:
            data = json.loads(await part.read())  # type: ignore[union-attr]
        except Exception as exc:
            return web.Response(status=400, text=str(exc))
        if not isinstance(data, dict) or "method" not in data:
            return web.Response(status=422)
        header = request.headers.get("Authorization", "")
        if not header:
            return web.Response(status=401)
        session = Session(transport="rest", secure=request.secure, loopback=_is_loopback(request))
        scheme, _, credential = header.partition(" ")
        if scheme != "Bearer" or self.sim.auth.authenticate_key(credential.strip(), session) != "SUCCESS":
            await self.sim.auth.refusal_delay()
            return web.Response(status=401, text="Invalid API key")
        filepart = await reader.next()
        if filepart is None or getattr(filepart, "name", None) != "file":
            return web.Response(status=405, text='"file" not found as second part on payload')
        content = await filepart.read()  # type: ignore[union-attr]
        try:
            job_id = await self.sim.upload(session, data["method"], data.get("params") or [], bytes(content))
        except MethodNotFound:
            return web.Response(status=422, text=f"[ENOMETHOD] Method {data['method']!r} not found")
        except PermissionError:
            return web.Response(status=403, text="403: Forbidden")  # aiohttp's HTTPForbidden()
        return web.json_response({"job_id": job_id})

    async def _control_vms(self, request: web.Request) -> web.Response:
        """Every VM with what its guest saw at its last start (root disk image, NoCloud seed)."""
        return web.json_response(
            [{**vm.entry(self.sim.profile.name), "guest": vm.guest} for vm in self.sim.vms.vms.values()]
        )

    async def _control_change_vm(self, request: web.Request) -> web.Response:
        """Out-of-band changes to a VM: ``{"state": "STOPPED"}``, ``{"memory": 1024}``,
        ``{"ignores_shutdown": true}``."""
        vm = self.sim.vms.by_name(request.match_info["name"])
        if vm is None:
            raise web.HTTPNotFound()
        changes = await request.json()
        if "ignores_shutdown" in changes:
            vm.ignores_shutdown = bool(changes.pop("ignores_shutdown"))
        state = changes.pop("state", None)
        vm.config.update(changes)
        if state is not None:
            self.sim.vms.set_state(vm, state)
        else:
            self.sim.vms.emit("changed", vm)
        return web.json_response(vm.entry(self.sim.profile.name))

    async def _control_storage(self, request: web.Request) -> web.Response:
        storage = self.sim.storage
        return web.json_response(
            {
                "datasets": [d.entry() for d in storage.datasets.values()],
                "snapshots": sorted(storage.snapshots),
                "files": {path: len(content) for path, content in storage.files.items()},
            }
        )

    async def _simplestreams(self, request: web.Request) -> web.Response:
        """A tiny simplestreams mirror of the catalogue's VM images (tests; not a TrueNAS endpoint)."""
        data = simplestreams_file(list(self.sim.images.values()), request.match_info["path"])
        if data is None:
            raise web.HTTPNotFound()
        kind = "application/json" if request.match_info["path"].endswith(".json") else "application/octet-stream"
        return web.Response(body=data, content_type=kind)

    async def _control_virt_state(self, request: web.Request) -> web.Response:
        self.sim.global_config.state = (await request.json())["state"]
        return web.json_response(self.sim.global_config.entry())


def _envelope_problem(request: Any) -> str | None:
    if not isinstance(request, dict):
        return "Invalid Request"
    if request.get("jsonrpc") != "2.0":
        return "Invalid 'jsonrpc' member"
    if "method" not in request:
        return "Missing 'method' member"
    if not isinstance(request["method"], str):
        return "Invalid 'method' member"
    if "params" in request and not isinstance(request["params"], list):
        return "Invalid 'params' member"
    return None


class _RestBadRequest(Exception):
    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.body: dict[str, Any] = {"message": message}
        if errno is not None:
            self.body["errno"] = errno


def _query_value(text: str) -> Any:
    if text.isdigit():
        return int(text)
    return {"true": True, "false": False, "null": None}.get(text, text)


_REST_OPS = {"eq": "=", "neq": "!=", "gt": ">", "lt": "<", "gte": ">=", "lte": "<=", "regex": "~"}


def _filterable(request: web.Request) -> list[Any]:
    filters: list[Any] = []
    options: dict[str, Any] = {}
    for key, value in request.query.items():
        if key in ("limit", "offset"):
            options[key] = int(value)
        elif key == "count":
            options["count"] = value == "true"
        elif key == "sort":
            options["sort"] = value.split(",")
        elif key.startswith("extra."):
            options.setdefault("extra", {})[key[6:]] = json.loads(value)
        else:
            name, _, op = key.partition("__")
            filters.append([name, _REST_OPS.get(op, op or "="), _query_value(value)])
    return [filters, options]


async def _body(request: web.Request) -> Any:
    text = await request.text()
    if not text:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise _RestBadRequest(f"json parse error: {exc}", 22) from None


def _named(body: Any, names: list[str], required: int) -> list[Any]:
    if not isinstance(body, dict):
        raise _RestBadRequest("Endpoint accepts multiple params, object/dict expected.")
    unexpected = [k for k in body if k not in names]
    if unexpected:
        raise _RestBadRequest(f"The following attributes are not expected: {', '.join(unexpected)}")
    for name in names[:required]:
        if name not in body:
            raise _RestBadRequest(f"{name} attribute expected.")
    return [body[name] for name in names if name in body]


async def _rest_call(request: web.Request) -> tuple[str, list[Any]]:
    """Maps a REST v2.0 request to (method, params) as ``restful.py`` does (truenas-api.md §2.2)."""
    path = request.match_info["path"].strip("/")
    verb = request.method
    if path == "virt/instance":
        if verb == "GET":
            return "virt.instance.query", _filterable(request)
        if verb == "POST":
            return "virt.instance.create", [await _body(request)]
    if path.startswith("virt/instance/id/"):
        ident: Any = path.removeprefix("virt/instance/id/")
        ident = int(ident) if ident.isdigit() else ident
        if verb == "GET":
            return "virt.instance.query", [[["id", "=", ident]], {"get": True, "force_sql_filters": True}]
        if verb == "PUT":
            body = await _body(request)
            return "virt.instance.update", [ident, {} if body is None else body]
        if verb == "DELETE":
            return "virt.instance.delete", [ident]
    if path == "virt/global" and verb == "GET":
        return "virt.global.config", []
    if path == "core/get_jobs" and verb == "GET":
        return "core.get_jobs", _filterable(request)
    if verb == "POST":
        body = await _body(request)
        single = {
            "virt/instance/start": "virt.instance.start",
            "virt/instance/device_list": "virt.instance.device_list",
            "core/job_abort": "core.job_abort",
            "core/ping": "core.ping",
        }
        if path in single:
            return single[path], [] if body is None and path == "core/ping" else [body]
        multi = {
            "virt/instance/stop": ("virt.instance.stop", ["id", "stop_args"], 1),
            "virt/instance/restart": ("virt.instance.restart", ["id", "stop_args"], 1),
            "virt/instance/get_instance": ("virt.instance.get_instance", ["id", "options"], 1),
            "virt/instance/device_add": ("virt.instance.device_add", ["id", "device"], 2),
            "virt/instance/device_update": ("virt.instance.device_update", ["id", "device"], 2),
            "virt/instance/device_delete": ("virt.instance.device_delete", ["id", "name"], 2),
            "virt/instance/set_bootable_disk": ("virt.instance.set_bootable_disk", ["id", "disk"], 2),
        }
        if path in multi:
            method, names, required = multi[path]
            return method, _named(body, names, required)
        if path == "virt/instance/image_choices":
            return "virt.instance.image_choices", [] if body is None else [body]
    if path == "system/version" and verb == "GET":
        return "system.version", []
    if path == "system/global/id" and verb == "GET":
        return "system.global.id", []
    raise LookupError(path)
