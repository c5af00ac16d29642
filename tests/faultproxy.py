"""A fault proxy in front of the real API server (tests only): plain HTTP on loopback in, the
control plane's https out with its admin credentials (as ``kubectl proxy``), and faults switched on
and off while the operator runs behind it.

- ``hang(predicate)``: matching requests get no answer (held until the fault ends; then dropped);
- ``fail(status, predicate)``: matching requests are answered ``status`` (500, 429 with Retry-After)
  without reaching the API server;
- ``reset_watches(every)``: every watch stream is cut (connection reset) ``every`` seconds;
- ``reset(predicate)``: matching requests get their connection reset without an answer.

The operator subprocess gets ``kubeconfig`` (pointing here, no credentials of its own).
"""

from __future__ import annotations

import asyncio
import base64
import ssl
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from aiohttp import ClientSession, ClientTimeout, TCPConnector, web

Predicate = Callable[[str, str], bool]
"""``(method, path with query)`` -> whether the fault applies."""

HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "content-length", "host", "content-encoding"}


def is_write(method: str, path: str) -> bool:
    return method not in ("GET", "HEAD", "OPTIONS")


def is_watch(method: str, path: str) -> bool:
    return "watch=true" in path or "watch=1" in path


def is_lease(method: str, path: str) -> bool:
    return "/coordination.k8s.io/" in path and "/leases" in path


def is_status_patch(method: str, path: str) -> bool:
    return method == "PATCH" and path.split("?")[0].endswith("/status")


@dataclass
class Faults:
    hang: Predicate | None = None
    fail: tuple[int, Predicate] | None = None
    reset: Predicate | None = None
    reset_watches_every: float | None = None
    seen: Counter[str] = field(default_factory=Counter)
    """How many requests each fault touched: ``hang``, ``fail``, ``reset``, ``watch-reset``."""


class FaultProxy:
    def __init__(self, upstream_kubeconfig: Path, workdir: Path) -> None:
        config = yaml.safe_load(upstream_kubeconfig.read_text())
        cluster = config["clusters"][0]["cluster"]
        user = config["users"][0]["user"]
        self.upstream = cluster["server"].rstrip("/")
        self.context = ssl.create_default_context(
            cadata=base64.b64decode(cluster["certificate-authority-data"]).decode()
        )
        with tempfile.TemporaryDirectory(dir=workdir) as scratch:
            cert, key = Path(scratch) / "c", Path(scratch) / "k"
            cert.write_bytes(base64.b64decode(user["client-certificate-data"]))
            key.write_bytes(base64.b64decode(user["client-key-data"]))
            self.context.load_cert_chain(str(cert), str(key))
        self.faults = Faults()
        self.lock = threading.Lock()
        self.workdir = workdir
        self.port = 0
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="fault proxy", daemon=True)
        self._ended = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self._session: ClientSession | None = None

    # ----- switches (from the test's thread) ------------------------------------------------------
    def set(self, **faults: object) -> None:
        """Replaces the active faults (``hang=``, ``fail=``, ``reset=``, ``reset_watches_every=``)."""
        with self.lock:
            seen = self.faults.seen
            self.faults = Faults(**faults, seen=seen)  # type: ignore[arg-type]
        self.loop.call_soon_threadsafe(self._wake_hung)

    def clear(self) -> None:
        self.set()

    def seen(self, fault: str) -> int:
        with self.lock:
            return self.faults.seen[fault]

    def kubeconfig(self) -> Path:
        path = self.workdir / "proxy-kubeconfig"
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "proxy", "cluster": {"server": f"http://127.0.0.1:{self.port}"}}],
            "users": [{"name": "proxy", "user": {}}],
            "contexts": [{"name": "proxy", "context": {"cluster": "proxy", "user": "proxy"}}],
            "current-context": "proxy",
        }
        path.write_text(yaml.safe_dump(config))
        return path

    # ----- lifecycle ---------------------------------------------------------------------------------
    def start(self) -> FaultProxy:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(30)
        return self

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()

    async def _start(self) -> None:
        self._session = ClientSession(
            connector=TCPConnector(ssl=self.context, limit=0), timeout=ClientTimeout(total=None), auto_decompress=False
        )
        app = web.Application(client_max_size=64 * 2**20)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = int(self._runner.addresses[0][1])

    async def _stop(self) -> None:
        self._wake_hung()
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()
        others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in others:
            task.cancel()
        await asyncio.gather(*others, return_exceptions=True)

    def _wake_hung(self) -> None:
        self._ended.set()
        self._ended = asyncio.Event()

    # ----- the proxy -----------------------------------------------------------------------------------
    async def _handle(self, request: web.Request) -> web.StreamResponse:
        method, path = request.method, request.path_qs
        with self.lock:
            faults = self.faults
        if faults.reset is not None and faults.reset(method, path):
            self._count("reset")
            assert request.transport is not None
            request.transport.abort()
            return web.Response(status=500)
        if faults.hang is not None and faults.hang(method, path):
            self._count("hang")
            await self._ended.wait()  # held while this fault lasts, then dropped unanswered
            assert request.transport is not None
            request.transport.abort()
            return web.Response(status=500)
        if faults.fail is not None and faults.fail[1](method, path):
            self._count("fail")
            status = faults.fail[0]
            payload = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": status, "message": "fault"}
            return web.json_response(payload, status=status, headers={"Retry-After": "1"})
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_HEADERS}
        assert self._session is not None
        async with self._session.request(method, self.upstream + path, data=body or None, headers=headers) as upstream:
            response = web.StreamResponse(
                status=upstream.status,
                headers={k: v for k, v in upstream.headers.items() if k.lower() not in HOP_HEADERS},
            )
            await response.prepare(request)
            started = time.monotonic()
            watch = is_watch(method, path)
            while True:
                if watch:
                    with self.lock:
                        every = self.faults.reset_watches_every
                    if every is not None and time.monotonic() - started > every:
                        self._count("watch-reset")
                        assert request.transport is not None
                        request.transport.abort()
                        return response
                    try:
                        chunk = await asyncio.wait_for(upstream.content.readany(), 0.5)
                    except TimeoutError:
                        continue
                else:
                    chunk = await upstream.content.readany()
                if not chunk:
                    break
                await response.write(chunk)
            await response.write_eof()
            return response

    def _count(self, fault: str) -> None:
        with self.lock:
            self.faults.seen[fault] += 1
