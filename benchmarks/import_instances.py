"""``import`` against a NAS with many instances (BENCHMARKS.md, "Import"): the simulator in process
with N instances (each with a disk device on 25.x), the read-only client over a real socket, every
manifest written to /dev/null as it comes. Prints the wall time, the Python heap's peak while
importing (tracemalloc: what the import itself holds, the simulator's own objects excluded by
taking the peak over the import only) and the process's peak RSS.

Run: ``PYTHONPATH=operator:. .venv/bin/python benchmarks/import_instances.py [--counts 100 1000 3000] [--adopt]``.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import platform
import resource
import time
import tracemalloc
from pathlib import Path
from typing import Any

from truenas_incus_operator.importer import Output, import_instances
from truenas_incus_operator.truenas import connect
from truenas_incus_operator.truenas.client import Endpoint
from truenas_incus_operator.truenas.transports.base import Secret
from truenas_simulator import Simulator, SimulatorServer


async def one(count: int, profile: str, adopt: bool = False) -> dict[str, Any]:
    sim = Simulator(profile, seed=1)
    sim.knobs.scram_iterations = 50_000
    for i in range(count):
        sim.seed_instance(name=f"ct{i:05d}", type="CONTAINER", status="RUNNING", cpu="2")
    server = await SimulatorServer(sim).start()
    try:
        client = await connect(Endpoint(url=server.ws_url, api_key=Secret(sim.api_key)), read_only=True)
        sink = Output(stream=io.StringIO())
        written = 0
        tracemalloc.start()
        tracemalloc.reset_peak()
        started = time.monotonic()
        try:
            async for found in import_instances(client, adopt=adopt):
                sink(found)
                written += 1
                sink.stream = io.StringIO()  # as a file would: nothing kept once written
        finally:
            seconds = time.monotonic() - started
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
            await client.close()
    finally:
        await server.stop()
    return {"profile": profile, "instances": count, "adopt": adopt, "written": written, "seconds": round(seconds, 2),
            "heap_peak_mib": round(peak / 2**20, 1)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--counts", type=int, nargs="+", default=[100, 1000, 3000])
    parser.add_argument("--profile", default="25.10")
    parser.add_argument("--output", type=Path)
    parser.add_argument("--adopt", action="store_true", help="--adopt manifests (the Full planner runs on each)")
    args = parser.parse_args()
    results: list[dict[str, Any]] = []
    for count in args.counts:
        figures = asyncio.run(one(count, args.profile, args.adopt))
        results.append(figures)
        print(
            f"{figures['instances']} instances ({args.profile}{', --adopt' if args.adopt else ''}): "
            f"{figures['seconds']:.2f} s, "
            f"heap peak {figures['heap_peak_mib']} MiB during the import",
            flush=True,
        )
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"process peak RSS (simulator included): {rss:.0f} MiB")
    if args.output:
        machine = f"{platform.node()} {platform.machine()} Python {platform.python_version()}"
        args.output.write_text(json.dumps({"machine": machine, "results": results, "peak_rss_mib": rss}, indent=2))


if __name__ == "__main__":
    main()
