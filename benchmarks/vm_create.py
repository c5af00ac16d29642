"""First vs second VM create on vm.* against the simulator (BENCHMARKS.md, "VM create").

Run: ``PYTHONPATH=operator .venv/bin/python benchmarks/vm_create.py``. Simulator timing: every simulated
job (upload, conversion) takes the ``job_duration`` knob; a real NAS's times depend on the image and disks.
"""

from __future__ import annotations

import asyncio
import time

from truenas_incus_operator.truenas import Endpoint, InstanceConfig, Secret, connect
from truenas_incus_operator.truenas.images import ImageSource
from truenas_simulator import Simulator, SimulatorServer


async def measure(job_duration: float) -> tuple[float, float, int]:
    sim = Simulator("25.10", seed=1)
    sim.knobs.job_duration = job_duration
    server = await SimulatorServer(sim).start()
    client = await connect(
        Endpoint(
            server.ws_url, Secret(sim.api_key), vm_image_server=ImageSource(f"{server.url}/_simulator/simplestreams/")
        )
    )
    times = []
    try:
        for index in range(2):
            started = time.monotonic()
            config = InstanceConfig(name=f"vm-{index}", type="VM", image="debian/bookworm", autostart=False)
            await client.instances.create(config)
            times.append(time.monotonic() - started)
    finally:
        await client.close()
        await server.stop()
    return times[0], times[1], sim.counters.by_method["vm.device.convert"]


def main() -> None:
    for job_duration in (0.0, 0.5, 2.0):
        for run in range(3):
            first, second, conversions = asyncio.run(measure(job_duration))
            print(
                f"job_duration={job_duration}s run {run}: first {first * 1000:.0f} ms, "
                f"second {second * 1000:.0f} ms, conversions {conversions}"
            )


if __name__ == "__main__":
    main()
