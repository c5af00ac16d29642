"""``POST /_upload`` (apps/file_app.py): a multipart upload that feeds ``filesystem.put``'s job."""

from __future__ import annotations

import base64
import binascii
import json

from aiohttp import web

from ..context import Session
from ..errors import MethodNotFound
from ..simulator import Simulator
from .common import bearer_session, is_loopback


async def file_app_session(sim: Simulator, request: web.Request, method: str) -> Session | web.Response:
    """The file app's ``parse_credentials`` and ``authenticate`` (restful.py on 25.04 and 25.10,
    apps/file_app.py on 26; the same rules): ``Token <t>`` or ``?auth_token=<t>`` (a token from
    ``auth.generate_token``: 403 ``Invalid token`` unless it is valid, has no attributes and allows
    ``method``), ``Basic <base64 user:password>`` (400 when it does not decode; the simulator has no
    password accounts, so 401 ``Bad username or password``) and ``Bearer <api key>`` (401
    ``Invalid API key``). No header and no query token, or another scheme: 401."""
    header = request.headers.get("Authorization")
    scheme = "query" if header is None else header.split(" ", 1)[0]
    sim.upload_schemes[scheme if scheme in ("Token", "Bearer", "Basic", "query") else "other"] += 1
    if header is None:
        token = request.query.get("auth_token")
        if token is None:
            return web.Response(status=401, text="401: Unauthorized")
    elif header.startswith("Token "):
        token = header.split(" ", 1)[1]
    elif header.startswith("Basic "):
        try:
            _username, _password = base64.b64decode(header[6:]).decode("utf-8").split(":", 1)
        except (UnicodeDecodeError, binascii.Error):
            return web.Response(status=400, text="400: Bad Request")
        except ValueError:  # no ':' in it: the middleware does not catch that unpacking error
            return web.Response(status=500, text="500 Internal Server Error")
        await sim.auth.refusal_delay()
        return web.Response(status=401, text="Bad username or password")
    elif header.startswith("Bearer "):
        session = await bearer_session(sim, request, header)
        return session if session is not None else web.Response(status=401, text="Invalid API key")
    else:
        return web.Response(status=401, text="401: Unauthorized")
    key = sim.auth.token_for_action(token, method)
    if key is None:
        return web.Response(status=403, text="Invalid token")
    session = Session(transport="rest", secure=request.secure, loopback=is_loopback(request))
    session.authenticated, session.api_key = True, key
    return session


async def handle(sim: Simulator, request: web.Request) -> web.Response:
    """``POST /_upload`` (apps/file_app.py): multipart ``data`` (``{"method", "params"}``) then ``file``;
    credentials as ``file_app_session`` reads them; answers ``{"job_id": N}``."""
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
    session = await file_app_session(sim, request, str(data["method"]))
    if isinstance(session, web.Response):
        return session
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
