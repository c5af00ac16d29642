"""REST v2.0 (``https://host/api/v2.0``, TrueNAS 25.x only; deprecated there, removed in 26).

httpx with ``Authorization: Bearer <key>``. Job methods answer a job id; the transport polls
``/core/get_jobs?id=N`` until the job ends. There are no events: callers poll.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import httpx

from ..errors import (
    APIUnavailable,
    AuthenticationFailed,
    CallFailed,
    CallTimeout,
    FieldError,
    MalformedAnswer,
    NotAuthorized,
    NotFound,
    TransportError,
    validation_error,
)
from ..jobs import is_finished, job_result
from .base import ConnectionOptions, EventCallback, refuse_malformed_key, scrubbed
from .upload import upload_file

log = logging.getLogger(__name__)


def rest_base(url: str) -> str:
    parts = urlsplit(url)
    scheme = {"wss": "https", "ws": "http"}.get(parts.scheme, parts.scheme)
    return urlunsplit((scheme, parts.netloc, "/api/v2.0", "", ""))


# method -> (HTTP verb, path, how params become the request); see truenas-api.md §2.2.
_ROUTES: dict[str, tuple[str, str, str]] = {
    "virt.instance.query": ("GET", "/virt/instance", "query"),
    "virt.instance.create": ("POST", "/virt/instance", "body0"),
    "virt.instance.update": ("PUT", "/virt/instance/id/{0}", "body1"),
    "virt.instance.delete": ("DELETE", "/virt/instance/id/{0}", "none"),
    "virt.instance.start": ("POST", "/virt/instance/start", "body0"),
    "virt.instance.stop": ("POST", "/virt/instance/stop", "named:id,stop_args"),
    "virt.instance.restart": ("POST", "/virt/instance/restart", "named:id,stop_args"),
    "virt.instance.get_instance": ("POST", "/virt/instance/get_instance", "named:id,options"),
    "virt.instance.image_choices": ("POST", "/virt/instance/image_choices", "body0"),
    "virt.instance.device_list": ("POST", "/virt/instance/device_list", "body0"),
    "virt.instance.device_add": ("POST", "/virt/instance/device_add", "named:id,device"),
    "virt.instance.device_update": ("POST", "/virt/instance/device_update", "named:id,device"),
    "virt.instance.device_delete": ("POST", "/virt/instance/device_delete", "named:id,name"),
    "virt.global.config": ("GET", "/virt/global", "none"),
    "core.get_jobs": ("GET", "/core/get_jobs", "query"),
    "core.job_abort": ("POST", "/core/job_abort", "body0"),
    "system.version": ("GET", "/system/version", "none"),
    "system.global.id": ("GET", "/system/global/id", "none"),
    # Snapshots (25.04: zfs.snapshot, 25.10: pool.snapshot; plugins/zfs_/snapshot*.py, pool_/snapshot.py):
    # CRUD plus rollback(id, options), which is not an item method: a body keyed by parameter name.
    **{
        f"{namespace}.{verb}": route
        for namespace in ("zfs.snapshot", "pool.snapshot")
        for verb, route in {
            "query": ("GET", f"/{namespace.replace('.', '/')}", "query"),
            "create": ("POST", f"/{namespace.replace('.', '/')}", "body0"),
            "delete": ("DELETE", f"/{namespace.replace('.', '/')}/id/{{0}}", "body1"),
            "rollback": ("POST", f"/{namespace.replace('.', '/')}/rollback", "named:id,options"),
        }.items()
    },
    "pool.dataset.query": ("GET", "/pool/dataset", "query"),
    "pool.snapshottask.query": ("GET", "/pool/snapshottask", "query"),
    "pool.snapshottask.create": ("POST", "/pool/snapshottask", "body0"),
    "pool.snapshottask.update": ("PUT", "/pool/snapshottask/id/{0}", "body1"),
    "pool.snapshottask.delete": ("DELETE", "/pool/snapshottask/id/{0}", "body1"),
}
_REST_OPS = {"=": "", "!=": "__neq", ">": "__gt", "<": "__lt", ">=": "__gte", "<=": "__lte", "~": "__regex"}


def _reread(value: str) -> bool:
    """Whether restful.py's ``_filterable_args`` would read the query value back as another type (all
    digits: an int; true, false, null in any case)."""
    return value.isdigit() or value.lower() in ("true", "false", "null")


def _pattern(op: str, value: Any) -> str | None:
    """A regular expression (filter_list's ``~`` is ``re.match``: anchored at the start) that matches
    what ``[field, op, value]`` does on a string field; None where no pattern can say it. (On a null
    field 25.04.0 raises where 25.04.1 and later match ""; the operator filters over REST only on
    fields TrueNAS never leaves null: ids, names, a snapshot's dataset, a job's state, an origin.)"""
    if op == "=" and isinstance(value, str):
        return f"{re.escape(value)}\\Z"
    if op == "^" and isinstance(value, str):
        return re.escape(value)
    if op == "$" and isinstance(value, str):
        return f"[\\s\\S]*{re.escape(value)}\\Z"
    if op == "in" and isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return f"(?:{'|'.join(re.escape(v) for v in value)})\\Z"
    if op == "~" and isinstance(value, str):
        return value
    return None


def _as_regex(filter_: Any) -> tuple[str, str] | None:
    """(field, pattern) for a filter the query string has no operator for (``^``, ``$``, ``in``, an OR
    of such filters on one field, a string equality restful.py would re-type); None when it cannot
    be said as one pattern (a ``~`` inside an OR is refused: its flags and groups would not survive)."""
    if len(filter_) == 2 and filter_[0] == "OR":
        flat = [branch[0] if len(branch) == 1 and isinstance(branch[0], list) else branch for branch in filter_[1]]
        if any(len(branch) == 3 and branch[1] == "~" for branch in flat):
            return None
        branches = [_as_regex(branch) for branch in flat]
        fields = {b[0] for b in branches if b is not None}
        if not branches or None in branches or len(fields) != 1:
            return None
        return fields.pop(), "(?:" + "|".join(f"(?:{b[1]})" for b in branches if b is not None) + ")"
    if len(filter_) == 3:
        name, op, value = filter_
        pattern = _pattern(op, value)
        return (name, pattern) if pattern is not None else None
    return None


def _text(value: Any) -> str | None:
    """The query value restful.py reads back as ``value``; None for one it cannot (a negative number,
    a float, a list: it would arrive as a string)."""
    if value is True or value is False or value is None:
        return "true" if value is True else "false" if value is False else "null"
    if isinstance(value, int) and value >= 0:
        return str(value)
    if isinstance(value, str) and not _reread(value):
        return value
    return None


def _query_string(params: tuple[Any, ...]) -> list[tuple[str, str]]:
    """Query filters and options as restful.py's ``_filterable_args`` reads them back: ``field[__op]``
    for the operators it names, a pattern (``__regex``) for ``^``, ``$``, ``in``, an OR on one field
    and a string equality it would re-type (a pattern is wrapped so that it is never all digits or a
    constant), ``extra.<key>=<json>``. ``select`` is left out (every field comes back). What the query
    string cannot say (``order_by``, ``get``, ``count``, a re-typed value under another operator, a
    ``~`` inside an OR) is refused: APIUnavailable, never a different answer."""
    filters = params[0] if params else []
    options = params[1] if len(params) > 1 else {}
    query: list[tuple[str, str]] = []
    for filter_ in filters:
        if len(filter_) == 3 and filter_[1] in _REST_OPS:
            name, op, value = filter_
            text = _text(value)
            if text is not None and not (op == "~" and _reread(value)):
                query.append((f"{name}{_REST_OPS[op]}", text))
                continue
        found = _as_regex(filter_)
        if found is None:
            raise APIUnavailable(f"REST cannot express the query filter {filter_!r}")
        pattern = found[1] if not _reread(found[1]) else f"(?:{found[1]})"
        query.append((f"{found[0]}__regex", pattern))
    unsaid = sorted(set(options) - {"limit", "offset", "extra", "select"})
    if unsaid:
        raise APIUnavailable(f"REST cannot express the query options {', '.join(unsaid)}")
    for key in ("limit", "offset"):
        if key in options:
            query.append((key, str(options[key])))
    for key, value in (options.get("extra") or {}).items():
        query.append((f"extra.{key}", json.dumps(value)))
    return query


def _path(template: str, params: tuple[Any, ...]) -> str:
    """The route with the item's id in it, percent-encoded whole: aiohttp matches ``id/{id_}`` against
    the encoded path, so a snapshot's ``pool/ds@name`` must come as ``pool%2Fds%40name``. An empty id
    or a dot segment (which HTTP clients resolve away: another route) is refused."""
    if "{0}" not in template:
        return template
    ident = str(params[0]) if params else ""
    if ident in ("", ".", ".."):
        raise APIUnavailable(f"REST cannot name the item {ident!r} in a path")
    return template.format(quote(ident, safe=""))


MAX_ANSWER_BYTES = 32 * 2**20
"""A query of thousands of instances is a few MiB; nothing TrueNAS answers comes near this."""


class RestTransport:
    name = "rest"
    supports_events = False

    def __init__(self, options: ConnectionOptions) -> None:
        self.options = options
        self.base = rest_base(options.url)
        self.system_version: str | None = None
        self.api_version: str | None = "v2.0"
        """REST has one version, v2.0."""
        self._limit = asyncio.Semaphore(options.max_concurrent_calls)
        self._client: httpx.AsyncClient | None = None

    @scrubbed
    async def connect(self) -> None:
        refuse_malformed_key(self.options.api_key)
        if self._client is None:
            verify: Any = self.options.ssl_context if self.options.ssl_context is not None else True
            self._client = httpx.AsyncClient(
                base_url=self.base,
                headers={"Authorization": f"Bearer {self.options.api_key.reveal()}"},
                verify=verify,
                timeout=httpx.Timeout(self.options.call_timeout, connect=self.options.connect_timeout),
                limits=httpx.Limits(max_connections=self.options.max_concurrent_calls),
            )
        self.system_version = await self.call("system.version", idempotent=True)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    @scrubbed
    async def call(self, method: str, *params: Any, timeout: float | None = None, idempotent: bool = False) -> Any:
        if self._client is None:
            raise TransportError("not connected")
        try:
            verb, template, shape = _ROUTES[method]
        except KeyError:
            raise APIUnavailable(f"{method} is not available over REST") from None
        path = _path(template, params)
        request: dict[str, Any] = {}
        if shape == "query":
            request["params"] = _query_string(params)
        elif shape == "body0" and params:
            request["json"] = params[0]
        elif shape == "body1" and len(params) > 1:
            request["json"] = params[1]
        elif shape.startswith("named:"):
            names = shape.removeprefix("named:").split(",")
            request["json"] = dict(zip(names, params, strict=False))
        attempts = 3 if idempotent else 1  # after a dropped connection or a 5xx; never after a timeout
        timeout = timeout or (self.options.read_timeout if idempotent else None)
        for attempt in range(attempts):
            try:
                async with self._limit:
                    response = await self._bounded(verb, path, timeout, request)
            except httpx.TimeoutException:
                raise CallTimeout(f"{method}: no answer from TrueNAS within the timeout") from None
            except httpx.HTTPError as exc:
                reason = (str(exc) or type(exc).__name__).splitlines()[0]
                error: TransportError = TransportError(f"{method}: cannot reach {self.base}: {reason}")
            else:
                if response.status_code in (502, 503, 504):
                    error = TransportError(f"{method}: TrueNAS answered HTTP {response.status_code}")
                else:
                    return self._result(method, response)
            if attempt + 1 == attempts:
                raise error
            await asyncio.sleep(0.2 * 2**attempt)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _bounded(self, verb: str, path: str, timeout: float | None, request: dict[str, Any]) -> httpx.Response:
        """The response, read up to MAX_ANSWER_BYTES: a server that answers more (a hostile URL in a
        TrueNASConnection, say) is refused instead of filling the operator's memory."""
        assert self._client is not None
        built = self._client.build_request(verb, path, timeout=timeout or httpx.USE_CLIENT_DEFAULT, **request)
        response = await self._client.send(built, stream=True)
        try:
            declared = int(response.headers.get("content-length") or 0)
            if declared > MAX_ANSWER_BYTES:
                raise TransportError(f"{path}: the answer is larger than {MAX_ANSWER_BYTES // 2**20} MiB; refused")
            chunks: list[bytes] = []
            size = 0
            async for chunk in response.aiter_bytes():
                size += len(chunk)
                if size > MAX_ANSWER_BYTES:
                    raise TransportError(f"{path}: the answer is larger than {MAX_ANSWER_BYTES // 2**20} MiB; refused")
                chunks.append(chunk)
        finally:
            await response.aclose()
        return httpx.Response(response.status_code, headers=response.headers, content=b"".join(chunks), request=built)

    def _result(self, method: str, response: httpx.Response) -> Any:
        status = response.status_code
        if status == 200:
            try:
                return response.json()
            except ValueError:
                kind = response.headers.get("content-type", "no content type").split(";")[0][:60]
                raise MalformedAnswer(f"{method}: HTTP 200 with a body that is not JSON ({kind})") from None
        if status == 401:
            raise AuthenticationFailed("TrueNAS refused the API key (wrong, revoked or expired)")
        if status == 403:
            raise NotAuthorized(f"{method}: not authorized")
        body: Any = None
        with contextlib.suppress(ValueError):
            body = response.json()
        if status == 404:
            if method.startswith("virt.") and isinstance(body, dict) and body.get("message") == "":
                raise NotFound([FieldError(None, "instance does not exist", errno.ENOENT)], method)
            raise APIUnavailable(f"{method}: REST endpoint not found (TrueNAS 26 removed the REST API)")
        if status == 422 and isinstance(body, dict):
            if "message" in body and "errno" in body:
                raise CallFailed(str(body["message"]), int(body["errno"] or errno.EFAULT), method)
            errors = [
                FieldError(None if attr == "null" else attr, item.get("message", ""), int(item.get("errno") or 22))
                for attr, items in body.items()
                for item in (items if isinstance(items, list) else [])
            ]
            raise validation_error(errors, method)
        message = body.get("message") if isinstance(body, dict) else response.text[:200]
        raise CallFailed(f"{method}: HTTP {status}: {message}", errno.EFAULT, method)

    @scrubbed
    async def call_job(
        self,
        method: str,
        *params: Any,
        on_progress: Callable[[dict[str, Any]], None] | None = None,
        timeout: float | None = None,
    ) -> Any:
        job_id = await self.call(method, *params)
        if not isinstance(job_id, int):
            raise MalformedAnswer(f"{method}: expected a job id, got {type(job_id).__name__}")
        return await self.wait_job(job_id, timeout, on_progress)

    @scrubbed
    async def wait_job(
        self,
        job_id: int,
        timeout: float | None = None,
        on_progress: Callable[[dict[str, Any]], None] | None = None,
        *,
        method: str = "",
    ) -> Any:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (timeout or self.options.job_timeout)
        delay = 0.05
        while True:
            jobs = await self.call("core.get_jobs", [["id", "=", job_id]], idempotent=True)
            if not jobs:
                raise CallFailed(f"job {job_id} is unknown to TrueNAS (restarted?)")
            job = jobs[0]
            if on_progress:
                on_progress(job)
            if is_finished(job):
                return job_result(job)
            if loop.time() + delay > deadline:
                raise CallTimeout(f"job {job_id} did not finish in time")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)

    async def subscribe(self, collection: str, callback: EventCallback) -> None:
        raise APIUnavailable("REST has no event subscriptions; poll instead")

    def unsubscribe(self, collection: str, callback: EventCallback) -> None:
        return None  # nothing was ever subscribed

    async def upload(
        self,
        path: str,
        data: bytes | Path,
        *,
        mode: int,
        on_progress: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        await upload_file(self, self.options, path, data, mode=mode, on_progress=on_progress)
