"""The simulator's HTTP server (aiohttp): JSON-RPC 2.0 over WebSocket at ``/api/current`` and
``/api/vXX.YY.Z``, the legacy DDP protocol at ``/websocket``, ``GET /api/versions``, the REST v2.0
facade (25.x profiles), ``POST /_upload`` and
the control API under ``/_simulator/`` for out-of-band changes, knobs and call counters. The
endpoints are in ``wire/``; this assembles their routes and runs the app."""

from __future__ import annotations

import asyncio
import ssl

from aiohttp import web

from .simulator import Simulator
from .wire import rest, upload
from .wire.control import ControlApi
from .wire.ddp import DdpEndpoint
from .wire.jsonrpc import JsonRpcEndpoint


class SimulatorServer:
    """Serves one ``Simulator``; ``await start()`` then use ``url`` / ``ws_url``."""

    def __init__(
        self,
        sim: Simulator,
        host: str = "127.0.0.1",
        port: int = 0,
        ssl_context: ssl.SSLContext | None = None,
        certificate: bytes | None = None,
    ) -> None:
        """``certificate``: the one ``ssl_context`` serves (PEM or DER), which SCRAM's channel
        binding is checked against (``Simulator.ui_certificate``); without it a client asking for
        binding is refused, as TrueNAS refuses one when it has published no binding."""
        self.sim = sim
        if certificate is not None:
            sim.ui_certificate = certificate
        self.host = host
        self.port = port
        self.ssl_context = ssl_context
        self.app = web.Application(client_max_size=4 * 2**20)
        self.runner: web.AppRunner | None = None
        self.jsonrpc = JsonRpcEndpoint(sim)
        self.control = ControlApi(sim, self.jsonrpc)
        self.ddp = DdpEndpoint(sim, self.jsonrpc.websockets)
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

    @property
    def websockets(self) -> set[web.WebSocketResponse]:
        """The open JSON-RPC sockets."""
        return self.jsonrpc.websockets

    async def drop_connections(self) -> int:
        """Closes every WebSocket abruptly, as a network failure or a middleware restart would."""
        return await self.jsonrpc.drop_connections()

    async def send_raw(self, text: str) -> int:
        """Sends ``text`` as is to every WebSocket client: frames TrueNAS should never send (faults)."""
        return await self.jsonrpc.send_raw(text)

    # ----- routes -----------------------------------------------------------------------------------
    def _routes(self) -> None:
        r = self.app.router
        jsonrpc, control = self.jsonrpc, self.control
        r.add_get("/api/versions", jsonrpc.versions)
        r.add_get("/api/current", jsonrpc.websocket)
        r.add_get("/websocket", self.ddp.websocket)  # the legacy protocol (apps/websocket_app.py)
        r.add_get("/api/{version:v[0-9.]+}", jsonrpc.websocket)
        r.add_route("*", "/api/v2.0/{path:.*}", self._rest)
        r.add_get("/_simulator/state", control.state)
        r.add_get("/_simulator/calls", control.calls)
        r.add_delete("/_simulator/calls", control.reset_calls)
        r.add_get("/_simulator/knobs", control.knobs)
        r.add_patch("/_simulator/knobs", control.knobs)
        r.add_post("/_simulator/instances", control.seed)
        r.add_patch("/_simulator/instances/{name}", control.change)
        r.add_delete("/_simulator/instances/{name}", control.remove)
        r.add_post("/_simulator/instances/{name}/power", control.power)
        r.add_post("/_simulator/drop-connections", control.drop)
        r.add_post("/_simulator/virt-state", control.virt_state)
        r.add_post("/_simulator/images", control.add_image)
        r.add_post("/_simulator/upgrade", control.upgrade)
        r.add_post("/_upload", self._upload)
        r.add_get("/_simulator/vms", control.vms)
        r.add_patch("/_simulator/vms/{name}", control.change_vm)
        r.add_get("/_simulator/storage", control.storage)
        r.add_get("/_simulator/simplestreams/{path:.*}", control.simplestreams)

    async def _rest(self, request: web.Request) -> web.StreamResponse:
        return await rest.handle(self.sim, request)

    async def _upload(self, request: web.Request) -> web.Response:
        return await upload.handle(self.sim, request)
