"""The REST v2.0 facade of the 25.x profiles (``/api/v2.0/...``): a request mapped to (method, params)
as ``restful.py`` does (truenas-api.md §2.2), the call, and the middleware's exceptions as HTTP."""

from __future__ import annotations

import errno
import json
import traceback
from typing import Any

from aiohttp import web

from ..errors import CallError, MatchNotFound, MethodNotFound, ValidationErrors
from ..simulator import Simulator
from .common import bearer_session


async def handle(sim: Simulator, request: web.Request) -> web.StreamResponse:
    if not sim.profile.has_rest:
        raise web.HTTPNotFound(text="404: Not Found")
    if sim.knobs.rest_5xx_rate and sim.random.random() < sim.knobs.rest_5xx_rate:
        sim.counters.faults["rest_5xx"] += 1
        return web.Response(status=502, text="502: Bad Gateway")
    header = request.headers.get("Authorization", "")
    if not header:
        return web.Response(status=401, text="401: Unauthorized")
    session = await bearer_session(sim, request, header)
    if session is None:
        return web.Response(status=401, text="Invalid API key")
    try:
        method, params = await _rest_call(request)
    except _RestBadRequest as exc:
        return web.json_response(exc.body, status=400)
    except LookupError:
        raise web.HTTPNotFound(text="404: Not Found") from None
    try:
        result = await sim.call(session, method, params)
    except MethodNotFound:
        raise web.HTTPNotFound(text="404: Not Found") from None
    except ValidationErrors as exc:
        body: dict[str, list[dict[str, Any]]] = {}
        for attr, msg, err in exc.errors:
            body.setdefault("null" if attr is None else attr, []).append({"message": msg, "errno": err})
        return web.json_response(body, status=422)
    except CallError as exc:
        if exc.errno == errno.EACCES and exc.errmsg == "Not authorized":
            return web.Response(status=403)  # REST checks roles before the call: empty 403
        return web.json_response({"message": exc.errmsg, "errno": exc.errno}, status=422)
    except MatchNotFound:
        return web.json_response({"message": ""}, status=404)
    except Exception as exc:
        return web.json_response({"message": str(exc) or repr(exc), "traceback": traceback.format_exc()}, status=500)
    return web.json_response(result)


class _RestBadRequest(Exception):
    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.body: dict[str, Any] = {"message": message}
        if errno is not None:
            self.body["errno"] = errno


def _query_value(text: str) -> Any:
    if text.isdigit():
        return int(text)
    return {"true": True, "false": False, "null": None}.get(text, text)


_REST_OPS = {"eq": "=", "neq": "!=", "gt": ">", "lt": "<", "gte": ">=", "lte": "<=", "regex": "~"}


def _filterable(request: web.Request) -> list[Any]:
    filters: list[Any] = []
    options: dict[str, Any] = {}
    for key, value in request.query.items():
        if key in ("limit", "offset"):
            options[key] = int(value)
        elif key == "count":
            options["count"] = value == "true"
        elif key == "sort":
            options["sort"] = value.split(",")
        elif key.startswith("extra."):
            options.setdefault("extra", {})[key[6:]] = json.loads(value)
        else:
            name, _, op = key.partition("__")
            filters.append([name, _REST_OPS.get(op, op or "="), _query_value(value)])
    return [filters, options]


async def _body(request: web.Request) -> Any:
    text = await request.text()
    if not text:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise _RestBadRequest(f"json parse error: {exc}", 22) from None


def _named(body: Any, names: list[str], required: int) -> list[Any]:
    if not isinstance(body, dict):
        raise _RestBadRequest("Endpoint accepts multiple params, object/dict expected.")
    unexpected = [k for k in body if k not in names]
    if unexpected:
        raise _RestBadRequest(f"The following attributes are not expected: {', '.join(unexpected)}")
    for name in names[:required]:
        if name not in body:
            raise _RestBadRequest(f"{name} attribute expected.")
    return [body[name] for name in names if name in body]


async def _rest_call(request: web.Request) -> tuple[str, list[Any]]:
    """Maps a REST v2.0 request to (method, params) as ``restful.py`` does (truenas-api.md §2.2)."""
    path = request.match_info["path"].strip("/")
    verb = request.method
    if path == "virt/instance":
        if verb == "GET":
            return "virt.instance.query", _filterable(request)
        if verb == "POST":
            return "virt.instance.create", [await _body(request)]
    if path.startswith("virt/instance/id/"):
        ident: Any = path.removeprefix("virt/instance/id/")
        ident = int(ident) if ident.isdigit() else ident
        if verb == "GET":
            return "virt.instance.query", [[["id", "=", ident]], {"get": True, "force_sql_filters": True}]
        if verb == "PUT":
            body = await _body(request)
            return "virt.instance.update", [ident, {} if body is None else body]
        if verb == "DELETE":
            return "virt.instance.delete", [ident]
    if path == "virt/global" and verb == "GET":
        return "virt.global.config", []
    if path == "core/get_jobs" and verb == "GET":
        return "core.get_jobs", _filterable(request)
    if verb == "POST":
        body = await _body(request)
        single = {
            "virt/instance/start": "virt.instance.start",
            "virt/instance/device_list": "virt.instance.device_list",
            "core/job_abort": "core.job_abort",
            "core/ping": "core.ping",
        }
        if path in single:
            return single[path], [] if body is None and path == "core/ping" else [body]
        multi = {
            "virt/instance/stop": ("virt.instance.stop", ["id", "stop_args"], 1),
            "virt/instance/restart": ("virt.instance.restart", ["id", "stop_args"], 1),
            "virt/instance/get_instance": ("virt.instance.get_instance", ["id", "options"], 1),
            "virt/instance/device_add": ("virt.instance.device_add", ["id", "device"], 2),
            "virt/instance/device_update": ("virt.instance.device_update", ["id", "device"], 2),
            "virt/instance/device_delete": ("virt.instance.device_delete", ["id", "name"], 2),
            "virt/instance/set_bootable_disk": ("virt.instance.set_bootable_disk", ["id", "disk"], 2),
        }
        if path in multi:
            method, names, required = multi[path]
            return method, _named(body, names, required)
        if path == "virt/instance/image_choices":
            return "virt.instance.image_choices", [] if body is None else [body]
    if path == "system/version" and verb == "GET":
        return "system.version", []
    if path == "system/global/id" and verb == "GET":
        return "system.global.id", []
    raise LookupError(path)
