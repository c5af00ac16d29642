"""Runs a simulator in a background thread with its own event loop (tests, demos, benchmarks)."""

from __future__ import annotations

import asyncio
import tempfile
import threading
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

from .server import SimulatorServer
from .simulator import Simulator
from .tls import CertificateAuthority, server_context

T = TypeVar("T")


class SimulatorThread:
    """``with SimulatorThread(Simulator("25.10"), tls=True) as s: s.ws_url, s.ca_file, s.api_key``."""

    def __init__(self, sim: Simulator, tls: bool = False, port: int = 0, cert_dir: Path | None = None) -> None:
        self.sim = sim
        self.tls = tls
        self.port = port
        self.cert_dir = cert_dir
        self.ca_file: Path | None = None
        self.server: SimulatorServer | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="truenas-simulator", daemon=True)
        self._tmp: tempfile.TemporaryDirectory[str] | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return self.server.url

    @property
    def ws_url(self) -> str:
        assert self.server is not None
        return self.server.ws_url

    @property
    def api_key(self) -> str:
        return self.sim.api_key

    def run(self, fn: Callable[[], T]) -> T:
        """Runs ``fn`` on the simulator's loop (the simulator is not thread-safe) and returns its result."""

        async def call() -> T:
            return fn()

        result: T = self.submit(call()).result(timeout=30)
        return result

    def submit(self, coroutine: Any) -> Future[Any]:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop)

    def start(self) -> SimulatorThread:
        self._thread.start()
        context, certificate = None, None
        if self.tls:
            directory = self.cert_dir
            if directory is None:
                self._tmp = tempfile.TemporaryDirectory(prefix="truenas-sim-")
                directory = Path(self._tmp.name)
            context = server_context(
                CertificateAuthority.load_or_create(directory, "truenas-simulator CA"),
                directory,
                ["localhost", "127.0.0.1"],
            )
            self.ca_file = directory / "ca.crt"
            certificate = (directory / "server.crt").read_bytes()
        self.server = SimulatorServer(self.sim, port=self.port, ssl_context=context, certificate=certificate)
        self.submit(self.server.start()).result(timeout=30)
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.submit(self.server.stop()).result(timeout=30)
        self.submit(_drain()).result(timeout=30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> SimulatorThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


async def _drain() -> None:
    """Cancels what is left (jobs, handlers) and lets closed sockets finish closing."""
    tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await asyncio.sleep(0.05)
