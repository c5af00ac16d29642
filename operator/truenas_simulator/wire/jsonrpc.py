"""JSON-RPC 2.0 over WebSocket at ``/api/current`` and ``/api/vXX.YY.Z``, and ``GET /api/versions``:
one session per socket, calls run concurrently up to the knob's limit, events and replies written in
order; middleware exceptions mapped to JSON-RPC errors (truenas-api.md §2.1)."""

from __future__ import annotations

import asyncio
import traceback
from typing import Any

from aiohttp import WSMsgType, web

from ..context import Session
from ..errors import CallError, MethodNotFound, ValidationErrors, errname
from ..simulator import Simulator
from .common import is_loopback, send_from
from .limits import MessageTooBig, SoftHardLimit, TooManyCalls, parse_message

JSONRPC_CONCURRENCY_ERROR = "Maximum number of concurrent calls ({}) has exceeded"


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


class JsonRpcEndpoint:
    """The WebSocket side of one server: its open sockets, which a network fault or an upgrade drops."""

    def __init__(self, sim: Simulator) -> None:
        self.sim = sim
        self.websockets: set[web.WebSocketResponse] = set()

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

    async def versions(self, request: web.Request) -> web.Response:
        return web.json_response(list(self.sim.profile.api_versions))

    async def websocket(self, request: web.Request) -> web.StreamResponse:
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
                loopback=is_loopback(request),
                send_event=outbox.put_nowait,
            )
        )
        in_flight: set[asyncio.Task[None]] = set()
        limit = SoftHardLimit(self.sim.knobs.running_calls, self.sim.knobs.max_concurrent_calls)

        writer_task = asyncio.create_task(send_from(outbox, ws))
        try:
            async for message in ws:
                if message.type != WSMsgType.TEXT:  # rpc.py: UNSUPPORTED_DATA, and the socket is done
                    await ws.close(code=1003, message=f"Invalid websocket message type: {message.type!r}".encode())
                    break
                try:
                    payload = parse_message(session.authenticated, message.data)
                except MessageTooBig as too_big:
                    # utils/limits.py MsgSizeError: the socket is closed, with no reply first.
                    await ws.close(code=too_big.code, message=too_big.message.encode())
                    break
                except ValueError as exc:
                    outbox.put_nowait({"jsonrpc": "2.0", "id": None, "error": {"code": -32700, "message": str(exc)}})
                    continue
                self._dispatch(payload, session, outbox, in_flight, ws, limit)
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
        request: dict[str, Any],
        session: Session,
        outbox: asyncio.Queue[dict[str, Any] | None],
        in_flight: set[asyncio.Task[None]],
        ws: web.WebSocketResponse,
        limit: SoftHardLimit,
    ) -> None:
        problem = _envelope_problem(request)
        if problem:
            ident = request.get("id") if isinstance(request, dict) else None
            outbox.put_nowait({"jsonrpc": "2.0", "id": ident, "error": {"code": -32600, "message": problem}})
            return
        ident = request.get("id")
        notification = "id" not in request

        async def run() -> None:
            try:
                async with limit:
                    await call()
            except TooManyCalls as refused:
                if not notification:
                    message = JSONRPC_CONCURRENCY_ERROR.format(refused.hard)
                    outbox.put_nowait({"jsonrpc": "2.0", "id": ident, "error": {"code": -32000, "message": message}})

        async def call() -> None:
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
