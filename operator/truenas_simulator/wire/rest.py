"""The REST v2.0 facade of the 25.x profiles (``/api/v2.0/...``): a request mapped to (method, params)
as ``restful.py`` does (truenas-api.md §2.2), the call, and the middleware's exceptions as HTTP."""

from __future__ import annotations

import errno
import json
import traceback
from typing import Any
from urllib.parse import unquote

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
        method, params = await _rest_call(request, set(sim.methods))
    except _RestBadRequest as exc:
        return web.json_response(exc.body, status=400)
    except LookupError:
        raise web.HTTPNotFound(text="404: Not Found") from None
    except _MethodNotAllowed:
        return web.Response(status=405, text="405: Method Not Allowed")
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


class _MethodNotAllowed(Exception):
    pass


class _RestBadRequest(Exception):
    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.body: dict[str, Any] = {"message": message}
        if errno is not None:
            self.body["errno"] = errno


def _query_value(text: str) -> Any:
    """restful.py ``_filterable_args``: all digits an int; true, false, null (any case) the constants."""
    if text.isdigit():
        return int(text)
    return {"true": True, "false": False, "null": None}.get(text.lower(), text)


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
            try:
                options.setdefault("extra", {})[key[6:]] = json.loads(value)
            except ValueError:
                options["extra"][key[6:]] = value  # normalize_query_parameter keeps what is not JSON
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


# restful.py serves every public method of the middleware (core.get_methods(None, 'REST')); these are
# the ones the simulator has, with their parameters' names (the accepts titles restful.py keys a body
# by), from api/v25_04_2 and api/v25_10_0 (legacy @accepts for 25.04's zfs.snapshot.*). Item methods
# (CRUD update/delete, @item_method) take the id from the URL: their first name is that id.
_CRUD = ("virt.instance", "zfs.snapshot", "pool.snapshot", "pool.dataset", "pool.snapshottask", "vm", "vm.device")
_CONFIG = ("virt.global",)
_ITEM = {
    *(f"{service}.{verb}" for service in _CRUD for verb in ("update", "delete")),
    "vm.start", "vm.stop", "vm.poweroff", "vm.restart", "vm.status", "pool.snapshottask.run",
}  # fmt: skip
_QUERY = ("filters", "options")
_PARAMS: dict[str, tuple[str, ...]] = {
    "core.get_jobs": _QUERY,
    "core.job_abort": ("id",),
    "core.ping": (),
    "system.version": (),
    "system.version_short": (),
    "system.info": (),
    "system.host_id": (),
    "system.global.id": (),
    "virt.global.config": (),
    "virt.instance.start": ("id",),
    "virt.instance.stop": ("id", "stop_args"),
    "virt.instance.restart": ("id", "stop_args"),
    "virt.instance.image_choices": ("data",),
    "virt.instance.device_list": ("id",),
    "virt.instance.device_add": ("id", "device"),
    "virt.instance.device_update": ("id", "device"),
    "virt.instance.device_delete": ("id", "name"),
    "virt.instance.set_bootable_disk": ("id", "disk"),
    "pool.dataset.promote": ("id",),
    **{f"{s}.rollback": ("id", "options") for s in ("zfs.snapshot", "pool.snapshot")},
    **{f"{s}.hold": ("id", "options") for s in ("zfs.snapshot", "pool.snapshot")},
    **{f"{s}.release": ("id", "options") for s in ("zfs.snapshot", "pool.snapshot")},
    **{f"{s}.clone": ("data",) for s in ("zfs.snapshot", "pool.snapshot")},
    "pool.snapshottask.run": ("id",),
    "vm.start": ("id", "options"),
    "vm.stop": ("id", "options"),
    "vm.poweroff": ("id",),
    "vm.restart": ("id",),
    "vm.status": ("id",),
    "vm.get_available_memory": ("overcommit",),
    "vm.import_disk_image": ("data",),
    "vm.device.nic_attach_choices": (),
    "vm.device.convert": ("data",),
    **{f"{service}.query": _QUERY for service in _CRUD},
    **{f"{service}.get_instance": ("id", "options") for service in _CRUD},
    **{f"{service}.create": ("data",) for service in _CRUD},
    **{f"{service}.update": ("id", "data") for service in _CRUD},
    **{f"{service}.delete": ("id", "options") for service in _CRUD if service != "virt.instance"},
    "virt.instance.delete": ("id",),
}
_FILTERABLE = {name for name, params in _PARAMS.items() if params == _QUERY}


def _segments(request: web.Request) -> list[str]:
    """The path after ``/api/v2.0/`` in raw segments: aiohttp matches a route's ``{id_}`` against the
    percent-encoded path (``[^{}/]+``), so an id holding ``/`` (a dataset, a snapshot) must come as
    ``%2F``; a literal ``/`` in it makes another path, which no route serves."""
    raw = request.rel_url.raw_path.removeprefix("/api/v2.0/")
    raw = raw.removesuffix("/")  # each route is registered with and without one trailing slash
    return raw.split("/") if raw else []


def _item_id(raw: str) -> Any:
    """restful.py: ``int(id_)`` where that works (``-1`` too), else the text."""
    ident = unquote(raw)
    try:
        return int(ident)
    except ValueError:
        return ident


def _route(segments: list[str], verb: str, methods: set[str]) -> tuple[str, Any] | None:
    """(method, the item id or None) that ``verb`` on the path reaches, as restful.py's resources
    register them: a CRUD service's GET/POST and its ``id/{id_}`` GET/PUT/DELETE, a config service's
    GET/PUT, an item method under ``id/{id_}/<name>``, any other method under its service's path
    (POST when it takes arguments and is not filterable, GET otherwise)."""
    if "" in segments:
        return None  # "//": no route matches an empty segment
    for cut in range(len(segments), 0, -1):
        service = ".".join(unquote(s) for s in segments[:cut])
        rest = segments[cut:]
        if service in _CRUD and not rest:
            method = {"GET": f"{service}.query", "POST": f"{service}.create"}.get(verb)
            return (method, None) if method in methods else None
        if service in _CRUD and len(rest) == 2 and rest[0] == "id":
            method = {"GET": f"{service}.query", "PUT": f"{service}.update", "DELETE": f"{service}.delete"}.get(verb)
            return (method, rest[1]) if method in methods else None
        if service in _CRUD and len(rest) == 3 and rest[0] == "id":
            method = f"{service}.{unquote(rest[2])}"
            return (method, rest[1]) if method in _ITEM and method in methods and verb == _verb(method) else None
        if service in _CONFIG and not rest:
            method = {"GET": f"{service}.config", "PUT": f"{service}.update"}.get(verb)
            return (method, None) if method in methods else None
    if len(segments) >= 2:
        method = ".".join(unquote(s) for s in segments)
        service, _, short = method.rpartition(".")
        # register_resources blacklists what the service's own routes serve: no /<crud>/query, /<config>/config.
        served = (service in _CRUD and short in ("query", "create", "update", "delete")) or (
            service in _CONFIG and short in ("config", "update")
        )
        if method in methods and method in _PARAMS and method not in _ITEM and not served and verb == _verb(method):
            return method, None
    return None


def _verb(method: str) -> str:
    """restful.py: POST for a method that accepts arguments (an item method's id among them) and is not
    filterable, GET otherwise."""
    return "POST" if _PARAMS[method] and method not in _FILTERABLE else "GET"


async def _rest_call(request: web.Request, methods: set[str]) -> tuple[str, list[Any]]:
    """Maps a REST v2.0 request to (method, params) as ``restful.py`` does (truenas-api.md §2.2)."""
    verb = request.method
    found = _route(_segments(request), verb, methods)
    if found is None:
        if any(_route(_segments(request), other, methods) for other in ("GET", "POST", "PUT", "DELETE")):
            raise _MethodNotAllowed(verb)  # aiohttp: the path has a route, not for this verb
        raise LookupError(request.rel_url.raw_path)
    method, raw_id = found
    if method in _FILTERABLE and verb == "GET":
        if raw_id is not None:
            return method, [[["id", "=", _item_id(raw_id)]], {"get": True, "force_sql_filters": True}]
        return method, _filterable(request)
    body = await _body(request)
    names = list(_PARAMS.get(method, ("data",)))
    if method in _ITEM:
        names = names[1:]
    if body is None:
        params: list[Any] = []
    elif len(names) <= 1:
        params = [body]
    else:
        params = _named(body, names, 1 if method in _ITEM else _required(method))
    if raw_id is not None:
        params.insert(0, _item_id(raw_id))
    return method, params


def _required(method: str) -> int:
    """How many leading parameters a multi-parameter method requires (restful.py: "<p> attribute
    expected."): the id of rollback/hold/release, stop/restart's id; both of the device calls'."""
    return (
        2 if method.rsplit(".", 1)[-1] in ("device_add", "device_update", "device_delete", "set_bootable_disk") else 1
    )
