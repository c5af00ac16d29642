"""What the HTTP endpoints share: where a request comes from and the REST-style bearer login."""

from __future__ import annotations

import ipaddress

from aiohttp import web

from ..context import Session
from ..simulator import Simulator


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
