"""Many TrueNASConnections to one NAS with one key: sockets and memory, shared transport vs one each
(BENCHMARKS.md, "Connections to one NAS"; issue 19 item 4 measured 600 connections at 601 WebSockets).

Run: ``PYTHONPATH=operator .venv/bin/python benchmarks/shared_connections.py [N]``. Each mode runs in
its own process (RSS is a process's high-water mark); the simulator runs in a thread of its own.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time

from truenas_incus_operator.connections import ConnectionManager
from truenas_incus_operator.connections.config import ConnectionConfig
from truenas_incus_operator.truenas import Secret, Timings
from truenas_simulator import Simulator
from truenas_simulator.runner import SimulatorThread


def rss_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


async def connect_many(count: int, shared: bool, sim: SimulatorThread) -> dict[str, float]:
    manager = ConnectionManager(resync_seconds=300, retry_max_seconds=5, timings=Timings(call=30, job=60))
    before = rss_mib()
    config = ConnectionConfig(url=sim.ws_url, api_key=Secret(sim.api_key), transport="websocket")
    started = time.monotonic()
    for index in range(count):
        connection = await manager.configure(f"tenant-{index % 50}/nas-{index}", config)
        if not shared:
            connection.pool = None
    for connection in manager.connections.values():
        await asyncio.wait_for(connection.ready.wait(), 120)
    elapsed = time.monotonic() - started
    await asyncio.sleep(1)
    server = sim.server
    assert server is not None
    sockets = sim.run(lambda: len(server.websockets))
    after = rss_mib()
    await manager.close()
    return {"connections": count, "sockets": sockets, "rss_before_mib": before, "rss_after_mib": after,
            "seconds_to_ready": elapsed}  # fmt: skip


def child(count: int, shared: bool) -> None:
    sim = SimulatorThread(Simulator("25.10", seed=1)).start()
    try:
        print(json.dumps(asyncio.run(connect_many(count, shared, sim))))
    finally:
        sim.stop()


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        child(int(sys.argv[2]), sys.argv[3] == "shared")
        return
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 300
    for mode in ("shared", "one-each"):
        result = subprocess.run(
            [sys.executable, __file__, "--child", str(count), mode], capture_output=True, text=True, check=True
        )
        print(mode, result.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
