"""What the HTTP endpoints share: where a request comes from and the REST-style bearer login."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
from typing import Any

from aiohttp import web

from ..context import Session
from ..simulator import Simulator


async def send_from(outbox: asyncio.Queue[dict[str, Any] | None], ws: web.WebSocketResponse) -> None:
    """A socket's one writer: each message of ``outbox`` as JSON text, in order, until ``None`` or the
    socket closes (a send to a socket closing under it is dropped)."""
    while (message := await outbox.get()) is not None:
        if ws.closed:
            return
        with contextlib.suppress(ConnectionError, RuntimeError):
            await ws.send_str(json.dumps(message))


def is_loopback(request: web.Request) -> bool:
    try:
        return ipaddress.ip_address(request.remote or "").is_loopback
    except ValueError:
        return request.remote is None  # unix sockets and in-process test clients


async def bearer_session(sim: Simulator, request: web.Request, header: str) -> Session | None:
    """A REST session logged in by ``Authorization: Bearer <api key>`` (``header``, not empty); None,
    after the refusal delay, when the scheme or the key is refused."""
    session = Session(transport="rest", secure=request.secure, loopback=is_loopback(request))
    scheme, _, credential = header.partition(" ")
    if scheme != "Bearer" or sim.auth.authenticate_key(credential.strip(), session) != "SUCCESS":
        await sim.auth.refusal_delay()
        return None
    return session
