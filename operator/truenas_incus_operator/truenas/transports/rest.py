"""REST v2.0 (``https://host/api/v2.0``, TrueNAS 25.x only; deprecated there, removed in 26).

httpx with ``Authorization: Bearer <key>``. Job methods answer a job id; the transport polls
``/core/get_jobs?id=N`` until the job ends. There are no events: callers poll.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

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
}
_REST_OPS = {"=": "", "!=": "__neq", ">": "__gt", "<": "__lt", ">=": "__gte", "<=": "__lte", "~": "__regex"}


def _query_string(params: tuple[Any, ...]) -> dict[str, str]:
    filters = params[0] if params else []
    options = params[1] if len(params) > 1 else {}
    query: dict[str, str] = {}
    for name, op, value in filters:
        if op not in _REST_OPS:
            raise ValueError(f"REST cannot express the filter operator {op!r}")
        text = "true" if value is True else "false" if value is False else "null" if value is None else str(value)
        query[f"{name}{_REST_OPS[op]}"] = text
    for key in ("limit", "offset"):
        if key in options:
            query[key] = str(options[key])
    return query


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
        path = template.format(*params) if "{0}" in template else template
        request: dict[str, Any] = {}
        if shape == "query":
            request["params"] = _query_string(params)
        elif shape == "body0" and params:
            request["json"] = params[0]
        elif shape == "body1":
            request["json"] = params[1] if len(params) > 1 else {}
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
