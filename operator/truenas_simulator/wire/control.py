"""The control API under ``/_simulator/`` that tests, demos and benchmarks use for what no TrueNAS
endpoint offers: out-of-band changes (instances, VMs, power, virt state, images, an upgrade),
knobs, call counters, dropped connections, and the image-server fixture's simplestreams mirror."""

from __future__ import annotations

from dataclasses import asdict

from aiohttp import web

from ..errors import ValidationErrors
from ..images import simplestreams_file
from ..simulator import Simulator
from ..state import Image
from .jsonrpc import JsonRpcEndpoint


class ControlApi:
    def __init__(self, sim: Simulator, jsonrpc: JsonRpcEndpoint) -> None:
        self.sim = sim
        self.jsonrpc = jsonrpc

    async def state(self, request: web.Request) -> web.Response:
        sim = self.sim
        return web.json_response(
            {
                "profile": sim.profile.name,
                "version": sim.profile.system_version,
                "virt_state": sim.global_config.state,
                "instances": [i.entry(sim.profile) for i in sim.instances.values()]
                + [c.entry() for c in sim.containers.containers.values()],
                "jobs": len(sim.jobs.jobs),
                "connections": len(self.jsonrpc.websockets),
            }
        )

    async def calls(self, request: web.Request) -> web.Response:
        return web.json_response(self.sim.counters.snapshot())

    async def reset_calls(self, request: web.Request) -> web.Response:
        self.sim.counters.reset()
        return web.json_response(self.sim.counters.snapshot())

    async def knobs(self, request: web.Request) -> web.Response:
        knobs = self.sim.knobs
        if request.method == "PATCH":
            changes = await request.json()
            for key, value in changes.items():
                if not hasattr(knobs, key):
                    return web.json_response({"message": f"unknown knob {key!r}"}, status=400)
                setattr(knobs, key, set(value) if key in ("hung_methods", "hung_calls") else value)
        data = asdict(knobs)
        data["hung_methods"] = sorted(knobs.hung_methods)
        data["hung_calls"] = sorted(knobs.hung_calls)
        return web.json_response(data)

    async def seed(self, request: web.Request) -> web.Response:
        fields = await request.json()
        try:
            instance = self.sim.seed_instance(**fields)
        except (TypeError, KeyError) as exc:
            return web.json_response({"message": f"cannot seed instance: {exc}"}, status=400)
        return web.json_response(self.sim.entry_of(instance), status=201)

    async def change(self, request: web.Request) -> web.Response:
        try:
            instance = self.sim.change_instance(request.match_info["name"], await request.json())
        except ValidationErrors:
            raise web.HTTPNotFound() from None
        except ValueError as exc:
            return web.json_response({"message": str(exc)}, status=400)
        return web.json_response(self.sim.entry_of(instance))

    async def remove(self, request: web.Request) -> web.Response:
        try:
            self.sim.remove_instance(request.match_info["name"])
        except ValidationErrors:
            raise web.HTTPNotFound() from None
        return web.json_response(None)

    async def power(self, request: web.Request) -> web.Response:
        status = (await request.json()).get("status")
        if status not in self.sim.profile.statuses and status not in ("STARTING", "STOPPING"):
            return web.json_response({"message": f"unknown status {status!r}"}, status=400)
        try:
            instance = self.sim.set_power(request.match_info["name"], status)
        except ValidationErrors:
            raise web.HTTPNotFound() from None
        return web.json_response(self.sim.entry_of(instance))

    async def drop(self, request: web.Request) -> web.Response:
        return web.json_response({"dropped": await self.jsonrpc.drop_connections()})

    async def upgrade(self, request: web.Request) -> web.Response:
        """Upgrades the simulated TrueNAS (e.g. 25.10 -> 26.0, migrating containers) and drops connections."""
        target = (await request.json()).get("profile", "26.0")
        try:
            log = self.sim.upgrade(target)
        except ValueError as exc:
            return web.json_response({"message": str(exc)}, status=400)
        await self.jsonrpc.drop_connections()
        return web.json_response({"profile": self.sim.profile.name, "migration": log})

    async def add_image(self, request: web.Request) -> web.Response:
        """Adds an image to the catalogue: {"alias", "os", "release", "variant"?, "instance_types"?}."""
        fields = await request.json()
        try:
            image = Image(
                alias=fields["alias"],
                os=fields["os"],
                release=fields["release"],
                variant=fields.get("variant", "default"),
                instance_types=tuple(fields.get("instance_types", ("CONTAINER", "VM"))),
            )
        except KeyError as exc:
            return web.json_response({"message": f"missing {exc.args[0]}"}, status=400)
        self.sim.images[image.alias] = image
        return web.json_response({"alias": image.alias}, status=201)

    async def vms(self, request: web.Request) -> web.Response:
        """Every VM with what its guest saw at its last start (root disk image, NoCloud seed)."""
        return web.json_response(
            [{**vm.entry(self.sim.profile.name), "guest": vm.guest} for vm in self.sim.vms.vms.values()]
        )

    async def change_vm(self, request: web.Request) -> web.Response:
        """Out-of-band changes to a VM: ``{"state": "STOPPED"}``, ``{"memory": 1024}``,
        ``{"ignores_shutdown": true}``."""
        vm = self.sim.vms.by_name(request.match_info["name"])
        if vm is None:
            raise web.HTTPNotFound()
        changes = await request.json()
        if "ignores_shutdown" in changes:
            vm.ignores_shutdown = bool(changes.pop("ignores_shutdown"))
        state = changes.pop("state", None)
        vm.config.update(changes)
        if state is not None:
            self.sim.vms.set_state(vm, state)
        else:
            self.sim.vms.emit("changed", vm)
        return web.json_response(vm.entry(self.sim.profile.name))

    async def storage(self, request: web.Request) -> web.Response:
        storage = self.sim.storage
        return web.json_response(
            {
                "datasets": [d.entry() for d in storage.datasets.values()],
                "snapshots": sorted(storage.snapshots),
                "files": {path: len(content) for path, content in storage.files.items()},
            }
        )

    async def simplestreams(self, request: web.Request) -> web.Response:
        """A tiny simplestreams mirror of the catalogue's VM images (tests; not a TrueNAS endpoint)."""
        data = simplestreams_file(list(self.sim.images.values()), request.match_info["path"])
        if data is None:
            raise web.HTTPNotFound()
        kind = "application/json" if request.match_info["path"].endswith(".json") else "application/octet-stream"
        return web.Response(body=data, content_type=kind)

    async def virt_state(self, request: web.Request) -> web.Response:
        self.sim.global_config.state = (await request.json())["state"]
        return web.json_response(self.sim.global_config.entry())
