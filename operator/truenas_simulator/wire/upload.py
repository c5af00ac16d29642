"""``POST /_upload`` (apps/file_app.py): a multipart upload that feeds ``filesystem.put``'s job."""

from __future__ import annotations

import json

from aiohttp import web

from ..errors import MethodNotFound
from ..simulator import Simulator
from .common import bearer_session


async def handle(sim: Simulator, request: web.Request) -> web.Response:
    """``POST /_upload`` (apps/file_app.py): multipart ``data`` (``{"method", "params"}``) then ``file``;
    ``Authorization: Bearer <api key>``; answers ``{"job_id": N}``."""
    reader = await request.multipart()
    part = await reader.next()
    if part is None or getattr(part, "name", None) != "data":
        return web.Response(status=405, text='"data" part must be the first on payload')
    try:
        data = json.loads(await part.read())  # type: ignore[union-attr]
    except Exception as exc:
        return web.Response(status=400, text=str(exc))
    if not isinstance(data, dict) or "method" not in data:
        return web.Response(status=422)
    header = request.headers.get("Authorization", "")
    if not header:
        return web.Response(status=401)
    session = await bearer_session(sim, request, header)
    if session is None:
        return web.Response(status=401, text="Invalid API key")
    filepart = await reader.next()
    if filepart is None or getattr(filepart, "name", None) != "file":
        return web.Response(status=405, text='"file" not found as second part on payload')
    content = await filepart.read()  # type: ignore[union-attr]
    try:
        job_id = await sim.upload(session, data["method"], data.get("params") or [], bytes(content))
    except MethodNotFound:
        return web.Response(status=422, text=f"[ENOMETHOD] Method {data['method']!r} not found")
    except PermissionError:
        return web.Response(status=403, text="403: Forbidden")  # aiohttp's HTTPForbidden()
    return web.json_response({"job_id": job_id})
