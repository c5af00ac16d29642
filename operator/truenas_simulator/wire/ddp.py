"""The legacy ``/websocket`` endpoint: the DDP-style protocol TrueNAS still serves beside JSON-RPC
on 25.04, 25.10 and 26 (main.py ``ws_handler`` with ``apps/websocket_app.py``
``WebSocketApplication``; TS-25.04.2.6, TS-25.10.6 and TS-26.0.0-BETA.3 agree).

``{"msg": "connect", "version": "1"}`` first (``connected`` with a session id, else ``failed``);
then ``method`` (answered by ``result`` with ``result`` or ``error``; a job answers its id),
``sub``/``unsub`` (``ready``; events as ``added``/``changed``/``removed`` with ``collection``).
The middleware adapts a call to its 24.10 model when that version had the method; the simulator
has no 24.10 models and calls the current API (the methods it serves take the same arguments).
"""

from __future__ import annotations

import asyncio
import errno
import uuid
from typing import Any

from aiohttp import WSMsgType, web

from ..context import Session
from ..errors import ENOMETHOD, CallError, InstanceNotFound, MethodNotFound, ValidationErrors, errname
from ..simulator import Simulator
from .common import is_loopback, send_from
from .jsonrpc import _trace
from .limits import INVALID_TEXT, MessageTooBig, SoftHardLimit, TooManyCalls, parse_message

UNSUPPORTED_DATA = 1003
INTERNAL_ERROR = 1011


def error_dict(exc: BaseException, sim: Simulator, method: str) -> dict[str, Any]:
    """``WebSocketApplication.get_error_dict`` for what ``call_method`` catches: ``ValidationErrors``
    as EAGAIN with type VALIDATION; one ``ValidationError`` (``InstanceNotFound`` is one:
    service_exception.py) with its own errno, type VALIDATION; call errors with their errno; anything
    else EINVAL."""
    kind: str | None = None
    extra: Any = None
    if isinstance(exc, MethodNotFound):
        exc = _not_found(sim, method)
    if isinstance(exc, InstanceNotFound):
        code, reason, kind, extra = exc.errors[0][2], str(exc), "VALIDATION", exc.extra()
    elif isinstance(exc, ValidationErrors):
        code, reason, kind, extra = errno.EAGAIN, str(exc), "VALIDATION", exc.extra()
    elif isinstance(exc, CallError):
        code, reason, extra = exc.errno, str(exc), exc.extra
    else:
        code, reason = errno.EINVAL, str(exc) or repr(exc)
    return {
        "error": code,
        "errname": errname(code),
        "type": kind,
        "reason": reason,
        "trace": _trace(exc),
        "extra": extra,
    }


def _not_found(sim: Simulator, method: str) -> CallError:
    """utils/service/call.py ``get_method``: which of its three errors a missing method gets."""
    if "." not in method:
        return CallError("Invalid method name", errno.EBADMSG)
    service, name = method.rsplit(".", 1)
    if not any(known.rsplit(".", 1)[0] == service for known in sim.methods):
        return CallError(f"Service {service!r} not found", ENOMETHOD)
    return CallError(f"Method {name!r} not found in {service!r}", ENOMETHOD)


class DdpEndpoint:
    def __init__(self, sim: Simulator, websockets: set[web.WebSocketResponse]) -> None:
        self.sim = sim
        self.websockets = websockets  # shared with JSON-RPC: network faults drop both

    async def websocket(self, request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(heartbeat=None, max_msg_size=16 * 2**20)
        await ws.prepare(request)
        self.websockets.add(ws)
        outbox: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        subscriptions: dict[str, str] = {}  # DDP id -> event bus id

        session = self.sim.open_session(
            Session(transport="websocket", secure=request.secure, loopback=is_loopback(request))
        )
        tasks: set[asyncio.Task[None]] = set()
        limit = SoftHardLimit(self.sim.knobs.running_calls, self.sim.knobs.max_concurrent_calls)
        handshake = False

        writer_task = asyncio.create_task(send_from(outbox, ws))
        try:
            async for frame in ws:
                if frame.type != WSMsgType.TEXT:
                    await ws.close(
                        code=UNSUPPORTED_DATA, message=f"Invalid websocket message type: {frame.type!r}".encode()
                    )
                    break
                try:
                    message = parse_message(session.authenticated, frame.data)
                except MessageTooBig as too_big:
                    await ws.close(code=too_big.code, message=too_big.message.encode())
                    break
                except ValueError as exc:  # here bad JSON closes the socket (main.py ws_handler)
                    await ws.close(code=INVALID_TEXT, message=str(exc).encode())
                    break
                kind = message.get("msg")
                if kind is None:  # on_message reads message["msg"]: the KeyError closes the socket
                    await ws.close(code=INTERNAL_ERROR, message=b"'msg'")
                    break
                if kind == "connect":
                    if message.get("version") != "1":
                        outbox.put_nowait({"msg": "failed", "version": "1"})
                    else:
                        handshake = True
                        outbox.put_nowait({"msg": "connected", "session": str(uuid.uuid4())})
                elif not handshake:
                    outbox.put_nowait({"msg": "failed", "version": "1"})
                elif kind == "method":
                    task = asyncio.create_task(self._method(message, session, outbox, limit))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                elif kind == "sub":
                    self._subscribe(message, session, outbox, subscriptions)
                elif kind == "unsub":
                    ident = subscriptions.pop(str(message.get("id")), None)
                    if ident is not None:
                        self.sim.events.unsubscribe(ident)
        finally:
            for task in tasks:
                task.cancel()
            for ident in subscriptions.values():
                self.sim.events.unsubscribe(ident)
            self.sim.close_session(session)
            outbox.put_nowait(None)
            await asyncio.gather(writer_task, return_exceptions=True)
            self.websockets.discard(ws)
        return ws

    async def _method(
        self,
        message: dict[str, Any],
        session: Session,
        outbox: asyncio.Queue[dict[str, Any] | None],
        limit: SoftHardLimit,
    ) -> None:
        ident = message.get("id")
        method = message.get("method")
        if not isinstance(method, str):
            reason = "Message is malformed: 'method' is absent."
            outbox.put_nowait({"msg": "result", "id": ident, "error": _plain_error(errno.EINVAL, reason)})
            return
        params = message.get("params") or []
        if not isinstance(params, list):
            outbox.put_nowait(
                {"msg": "result", "id": ident, "error": _plain_error(errno.EINVAL, "`params` must be a list.")}
            )
            return
        # call_method turns a Job into its id whatever core.set_options said (legacy_jobs is for
        # JSON-RPC's Method.call, api/base/server/method.py).
        session.legacy_jobs = True
        try:
            async with limit:
                result = await self.sim.call(session, method, params, ident)
        except TooManyCalls as refused:
            reason = f"Maximum number of concurrent calls ({refused.hard}) has exceeded."
            outbox.put_nowait({"msg": "result", "id": ident, "error": _plain_error(errno.ETOOMANYREFS, reason)})
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            outbox.put_nowait({"msg": "result", "id": ident, "error": error_dict(exc, self.sim, method)})
        else:
            outbox.put_nowait({"msg": "result", "id": ident, "result": result})

    def _subscribe(
        self,
        message: dict[str, Any],
        session: Session,
        outbox: asyncio.Queue[dict[str, Any] | None],
        subscriptions: dict[str, str],
    ) -> None:
        ident = str(message.get("id"))
        name = str(message.get("name"))
        if not session.authenticated:  # main.py can_subscribe
            outbox.put_nowait({"msg": "result", "id": ident, "error": _plain_error(errno.EACCES, "Not authorized")})
            return

        def forward(notification: dict[str, Any]) -> None:
            params = notification["params"]
            event = {"msg": params["msg"], "collection": params["collection"], "id": params["id"]}
            if params["msg"] in ("added", "changed") and "fields" in params:
                event["fields"] = params["fields"]
            outbox.put_nowait(event)

        subscriptions[ident] = self.sim.events.subscribe(name.split(":", 1)[0], forward)
        outbox.put_nowait({"msg": "ready", "subs": [ident]})


def _plain_error(code: int, reason: str) -> dict[str, Any]:
    return {"error": code, "errname": errname(code), "type": None, "reason": reason, "trace": None, "extra": None}
