"""JSON-RPC 2.0 over WebSocket (``wss://host/api/current``): TrueNAS's supported API, the default.

- Logs in with SCRAM-SHA-512 where TrueNAS offers it (26: the key never crosses the wire, the
  exchange bound to the TLS channel), else with the API key (25.x); asks for new-style jobs
  (``core.set_options({"legacy_jobs": false})``, understood from 25.10; 25.04 keeps answering a
  job id), and reads ``system.version``.
- Follows jobs through ``core.get_jobs`` events, polling as a safety net.
- Reconnects with backoff after a dropped connection, logs in again, re-subscribes, and tells
  listeners (``on_reconnect``) so they can resynchronise what they missed.
- At most ``max_concurrent_calls`` requests in flight (TrueNAS refuses the 21st).

aiohttp is used for the WebSocket because kopf already depends on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import re
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp

from ..errors import AuthenticationFailed, CallFailed, CallTimeout, MalformedAnswer, TransportError, TrueNASError
from ..jobs import is_finished, job_result
from . import scram
from .base import (
    ConnectionOptions,
    EventCallback,
    Secret,
    error_from_job,
    error_from_jsonrpc,
    refuse_malformed_key,
    scrubbed,
)
from .upload import upload_file

log = logging.getLogger(__name__)
JOB_POLL_INTERVAL = 5.0
READ_ATTEMPTS = 3
"""Reads (queries) are retried after a dropped connection; writes never are, and nothing is
retried after a timeout (a hung TrueNAS would take attempts x timeout to report)."""


MAX_MESSAGE_BYTES = 32 * 2**20
"""Largest JSON-RPC message accepted (a query of thousands of instances is a few MiB)."""


def websocket_url(url: str, api_version: str = "current") -> str:
    parts = urlsplit(url)
    scheme = {"https": "wss", "http": "ws"}.get(parts.scheme, parts.scheme)
    path = parts.path.rstrip("/") or f"/api/{api_version}"
    return urlunsplit((scheme, parts.netloc, path, "", ""))


class _JobWatch:
    __slots__ = ("changed", "job", "waiters")

    def __init__(self) -> None:
        self.job: dict[str, Any] | None = None
        self.changed = asyncio.Event()
        self.waiters = 0
        """Waits on this job (two holders of a shared transport may follow one job)."""


class JsonRpcTransport:
    name = "websocket"
    supports_events = True

    def __init__(self, options: ConnectionOptions) -> None:
        self.options = options
        self.url = websocket_url(options.url, options.api_version)
        self.system_version: str | None = None
        self.api_version: str | None = None
        """The API version spoken (``/api/vXX.YY.Z``), None when the server does not say."""
        self.new_style_jobs = False
        self.login_mechanism: str | None = None
        """How the last login went: ``SCRAM-SHA-512`` (``+tls-server-end-point`` when bound to the
        TLS channel) or ``API_KEY_PLAIN`` (``auth.login_with_api_key``, TrueNAS 25.x)."""
        self.on_reconnect: list[Callable[[], Awaitable[None] | None]] = []
        self._session: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._reader: asyncio.Task[None] | None = None
        self._reconnector: asyncio.Task[None] | None = None
        self._connected = asyncio.Event()
        self._closed = False
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._limit = asyncio.Semaphore(options.max_concurrent_calls)
        self._subscriptions: dict[str, list[EventCallback]] = {}
        self._acknowledged: set[str] = set()
        """Collections the server has subscribed this socket to (once each, whoever listens)."""
        self._subscribing = asyncio.Lock()
        self._jobs: dict[int, _JobWatch] = {}
        self._job_by_message: dict[int, int] = {}
        self._progress_by_message: dict[int, Callable[[dict[str, Any]], None]] = {}
        self._progress_by_job: dict[int, Callable[[dict[str, Any]], None]] = {}
        """New-style jobs report progress only through events: who wants to hear of which job."""
        self._connect_lock = asyncio.Lock()
        self._generation = 0

    # ----- connection ----------------------------------------------------------------------------
    async def connect(self) -> None:
        async with self._connect_lock:
            if self._connected.is_set():
                return
            await self._open()

    @scrubbed
    async def _open(self) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None))
        try:
            self._ws = await self._session.ws_connect(
                self.url,
                ssl=(self.options.ssl_context or True) if self.url.startswith("wss") else False,
                timeout=aiohttp.ClientWSTimeout(ws_close=5.0),
                heartbeat=30.0,
                max_msg_size=MAX_MESSAGE_BYTES,
                autoping=True,
            )
        except aiohttp.WSServerHandshakeError as exc:
            if exc.status == 404:
                raise TransportError(
                    f"{self.url}: no JSON-RPC API here (HTTP 404); is this TrueNAS 25.04 or later?"
                ) from None
            raise TransportError(f"{self.url}: WebSocket handshake failed (HTTP {exc.status})") from None
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise TransportError(f"cannot connect to {self.url}: {_describe(exc)}") from None
        self._generation += 1
        self._reader = asyncio.create_task(self._read(self._ws, self._generation))
        try:
            await self._handshake()
        except BaseException:
            await self._ws.close()
            raise
        self._connected.set()

    async def _handshake(self) -> None:
        await self._login()
        try:
            options = await self._raw_call("core.set_options", [{"legacy_jobs": False}], self.options.connect_timeout)
        except CallFailed:
            options = None  # 25.04 accepts only py_exceptions
        self.new_style_jobs = isinstance(options, dict) and options.get("legacy_jobs") is False
        self.system_version = await self._raw_call("system.version", [], self.options.connect_timeout)
        if self.login_mechanism == "API_KEY_PLAIN" and _major(self.system_version) >= 26:
            # Every TrueNAS 26 offers SCRAM (utils/auth.py): one that did not is not what it says, or
            # something between here and it answered auth.mechanism_choices. Never again for this key.
            scram.pin(self.url, self.options.api_key)
            raise AuthenticationFailed(
                f"{str(self.system_version)[:40]} did not offer SCRAM, which every TrueNAS 26 does, so the API key "
                "went in clear: something between the operator and TrueNAS may have answered instead (a man in "
                "the middle where TLS is not verified). Rotate the key; this process will not log in in clear "
                "to this URL again"
            )
        await self._raw_call("core.subscribe", ["core.get_jobs"], self.options.connect_timeout)
        self._acknowledged = set()  # a new socket: nothing subscribed on it yet
        for collection in [c for c, callbacks in self._subscriptions.items() if callbacks]:
            await self._raw_call("core.subscribe", [collection], self.options.connect_timeout)
            self._acknowledged.add(collection)
        self.api_version = await self._api_version()

    async def _login(self) -> None:
        """SCRAM where the server lists it (TrueNAS 26, docs/scram.md): the key never crosses the
        wire, and a refusal is final, never retried in clear. Plain ``auth.login_with_api_key``
        only where SCRAM is not offered (25.x)."""
        refuse_malformed_key(self.options.api_key)
        timeout = self.options.connect_timeout
        if scram.MECHANISM in await self._mechanisms():

            async def call(method: str, params: list[Any]) -> Any:
                return await self._raw_call(method, params, timeout)

            scram.pin(self.url, self.options.api_key)
            self.login_mechanism = await scram.login(
                call,
                self.options.username,
                self.options.api_key,
                self._peer_certificate(),
                verified=self._verified(),
            )
            return
        if scram.pinned(self.url, self.options.api_key):
            raise AuthenticationFailed(
                "TrueNAS offered SCRAM to this process before and now does not: the API key is not sent in "
                "clear (a downgrade by something between the operator and TrueNAS, or a NAS moved back to "
                "25.x; restart the operator after a deliberate downgrade)"
            )
        ok = await self._raw_call("auth.login_with_api_key", [self.options.api_key.reveal()], timeout)
        if ok is not True:
            raise AuthenticationFailed(
                "TrueNAS refused the API key (wrong, revoked or expired; keys sent over plain ws:// are revoked)"
            )
        self.login_mechanism = "API_KEY_PLAIN"

    async def _mechanisms(self) -> list[str]:
        """``auth.mechanism_choices`` before login. 25.04.2 .. 25.10.x fail it for an anonymous
        caller (plugins/auth.py reads credentials that are not there yet) and older servers lack
        it; neither offers SCRAM."""
        try:
            answer = await self._raw_call("auth.mechanism_choices", [], self.options.connect_timeout)
        except (CallFailed, AuthenticationFailed):  # also a server that wants a login first: no SCRAM there
            return []
        if not isinstance(answer, list):  # every TrueNAS that has the call answers a list of names
            raise MalformedAnswer("auth.mechanism_choices answered something other than a list of mechanisms")
        return [str(m) for m in answer]

    def _verified(self) -> bool:
        """Whether TLS verifies the server's certificate on this connection (False over plain ws)."""
        if not self.url.startswith("wss"):
            return False
        context = self.options.ssl_context
        return context is None or context.verify_mode != ssl.CERT_NONE

    def _peer_certificate(self) -> bytes | None:
        """The certificate the server presented on this connection (DER), for SCRAM's channel
        binding; None over plain WebSocket. Read even when verification is off."""
        ssl_object = self._ws.get_extra_info("ssl_object") if self._ws is not None else None
        certificate = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        return certificate if isinstance(certificate, bytes) else None

    async def _api_version(self) -> str | None:
        """The pinned version, else the newest the server lists (``GET /api/versions``, which
        ``/api/current`` speaks). Unauthenticated, no key sent; None when the server does not say."""
        if self.options.api_version != "current":
            return self.options.api_version
        parts = urlsplit(self.url)
        url = urlunsplit(("https" if parts.scheme == "wss" else "http", parts.netloc, "/api/versions", "", ""))
        assert self._session is not None
        try:
            async with self._session.get(
                url,
                ssl=(self.options.ssl_context or True) if url.startswith("https") else False,
                timeout=aiohttp.ClientTimeout(total=self.options.connect_timeout),
            ) as response:
                versions = await response.json(content_type=None) if response.status == 200 else None
        except (TimeoutError, aiohttp.ClientError, OSError, ValueError):
            return None
        if isinstance(versions, list) and versions and isinstance(versions[-1], str):
            newest = versions[-1]
            return newest if re.fullmatch(r"v[0-9][0-9.]{0,30}", newest) else None
        return None

    async def close(self) -> None:
        self._closed = True
        for watch in self._jobs.values():
            watch.changed.set()  # their waits end: a job is followed on the connection that replaces this one
        if self._reconnector:
            self._reconnector.cancel()
        if self._ws is not None:
            await self._ws.close()
        if self._reader is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader
        if self._session is not None:
            await self._session.close()
        self._fail_pending(TransportError("connection closed"))

    def _fail_pending(self, error: TrueNASError) -> None:
        for future in self._pending.values():
            if not future.done():
                future.set_exception(error)
        self._pending.clear()

    def _lost(self, generation: int) -> None:
        if generation != self._generation:
            return
        self._connected.clear()
        self._fail_pending(TransportError(f"connection to {self.url} lost"))
        if not self._closed and (self._reconnector is None or self._reconnector.done()):
            self._reconnector = asyncio.create_task(self._reconnect())

    async def _reconnect(self) -> None:
        delay = 0.2
        while not self._closed:
            try:
                async with self._connect_lock:
                    await self._open()
                log.info("reconnected to %s", self.url)
                break
            except AuthenticationFailed as exc:
                log.warning("reconnect to %s: %s", self.url, exc.message)
            except TrueNASError as exc:
                log.info("reconnect to %s failed: %s; retrying in %.1fs", self.url, exc.message, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)
        for listener in list(self.on_reconnect):
            with contextlib.suppress(Exception):
                result = listener()
                if asyncio.iscoroutine(result):
                    await result

    async def wait_connected(self, timeout: float | None = None) -> None:
        if self._connected.is_set():
            return
        if self._closed:
            raise TransportError("connection closed")
        try:
            await asyncio.wait_for(self._connected.wait(), timeout or self.options.connect_timeout)
        except TimeoutError:
            raise TransportError(f"not connected to {self.url}") from None

    # ----- reading --------------------------------------------------------------------------------
    async def _read(self, ws: aiohttp.ClientWebSocketResponse, generation: int) -> None:
        try:
            async for message in ws:
                if message.type != aiohttp.WSMsgType.TEXT:
                    continue
                try:
                    data = json.loads(message.data)
                except json.JSONDecodeError:
                    log.warning("ignoring a message from TrueNAS that is not JSON")
                    continue
                if not isinstance(data, dict):
                    log.warning("ignoring a message from TrueNAS that is not a JSON object (%s)", type(data).__name__)
                    continue
                try:
                    self._dispatch(data)
                except Exception:
                    # One odd message must not cost the connection (and every call in flight).
                    log.exception("ignoring a message from TrueNAS that could not be handled")
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            log.info("connection to %s lost: %s", self.url, _describe(exc))
        except Exception:
            log.exception("reading from %s failed", self.url)
            raise
        finally:
            self._lost(generation)

    def _dispatch(self, data: dict[str, Any]) -> None:
        if "id" in data and ("result" in data or "error" in data):
            self._resolve(data)
        elif data.get("method") == "collection_update":
            params = data.get("params")
            self._event(params if isinstance(params, dict) else {})

    def _resolve(self, data: dict[str, Any]) -> None:
        future = self._pending.pop(data["id"], None) if isinstance(data["id"], int) else None
        if future is None or future.done():
            return
        if "error" in data:
            future.set_exception(_ErrorReply(data["error"]))
        else:
            future.set_result(data.get("result"))

    def _event(self, params: dict[str, Any]) -> None:
        collection = params.get("collection")
        fields = params.get("fields")
        if collection == "core.get_jobs" and isinstance(fields, dict):
            self._job_event(params.get("id"), fields)
        for callback in list(self._subscriptions.get(str(collection), ())):
            try:
                callback(str(params.get("msg")), params.get("id"), fields)
            except Exception:
                log.exception("event callback for %s failed", collection)

    def _job_event(self, job_id: Any, fields: dict[str, Any]) -> None:
        if not isinstance(job_id, int):
            return
        for message_id in fields.get("message_ids") or []:
            if isinstance(message_id, int) and message_id in self._pending:
                self._job_by_message[message_id] = job_id
                progress = self._progress_by_message.get(message_id)
                if progress is not None:
                    self._progress_by_job[job_id] = progress
        watch = self._jobs.get(job_id)
        if watch is not None:
            watch.job = {**(watch.job or {}), **fields}
            watch.changed.set()
        progress = self._progress_by_job.get(job_id)
        if progress is not None:
            progress({**fields, "id": job_id})

    # ----- calls ----------------------------------------------------------------------------------
    def _usable_socket(self) -> aiohttp.ClientWebSocketResponse:
        ws = self._ws
        if ws is None or ws.closed:
            # The reader may not have noticed yet: treat it as lost now, so callers wait for the reconnect.
            self._lost(self._generation)
            raise TransportError(f"not connected to {self.url}")
        return ws

    async def _raw_call(self, method: str, params: list[Any], timeout: float | None, ident: int | None = None) -> Any:
        """Sends one request and waits for its answer; ``ident`` lets the caller know the request id."""
        ws = self._usable_socket()
        ident = next(self._ids) if ident is None else ident
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[ident] = future
        try:
            await ws.send_str(json.dumps({"jsonrpc": "2.0", "id": ident, "method": method, "params": params}))
            return await asyncio.wait_for(future, timeout)
        except _ErrorReply as reply:
            raise error_from_jsonrpc(reply.error, method) from None
        except TimeoutError:
            raise CallTimeout(f"{method}: no answer from TrueNAS within {timeout:.0f}s") from None
        except (aiohttp.ClientError, ConnectionError) as exc:
            raise TransportError(f"{method}: {_describe(exc)}") from None
        finally:
            self._pending.pop(ident, None)

    @scrubbed
    async def call(self, method: str, *params: Any, timeout: float | None = None, idempotent: bool = False) -> Any:
        attempts = READ_ATTEMPTS if idempotent else 1
        timeout = timeout or (self.options.read_timeout if idempotent else self.options.call_timeout)
        for attempt in range(attempts):
            await self.wait_connected()
            try:
                async with self._limit:
                    return await self._raw_call(method, list(params), timeout)
            except CallTimeout:
                raise
            except TransportError:
                if attempt + 1 == attempts or self._closed:
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    @scrubbed
    async def call_job(
        self,
        method: str,
        *params: Any,
        on_progress: Callable[[dict[str, Any]], None] | None = None,
        timeout: float | None = None,
    ) -> Any:
        timeout = timeout or self.options.job_timeout
        await self.wait_connected()
        if not self.new_style_jobs:
            async with self._limit:
                job_id = await self._raw_call(method, list(params), self.options.call_timeout)
            if not isinstance(job_id, int):
                raise MalformedAnswer(f"{method}: expected a job id, got {type(job_id).__name__}")
            return await self.wait_job(job_id, timeout, on_progress)
        # New-style jobs (25.10): the answer comes when the job ends. The job's ADDED event names our
        # request id (message_ids), which is how a dropped connection or a failure finds the job.
        ident = next(self._ids)
        if on_progress is not None:
            self._progress_by_message[ident] = on_progress
        try:
            async with self._limit:
                return await self._raw_call(method, list(params), timeout, ident)
        except CallTimeout:
            raise
        except TransportError:
            job_id = self._job_by_message.get(ident)
            if job_id is None:
                raise
            log.info("connection lost during %s; following job %s after reconnect", method, job_id)
            return await self.wait_job(job_id, timeout, on_progress)
        except CallFailed:
            job_id = self._job_by_message.get(ident)
            if job_id is not None:
                # Job errors come back as call errors; the job object says more (its id, exc_info).
                jobs: Any = None
                with contextlib.suppress(TrueNASError):
                    jobs = await self._raw_call("core.get_jobs", [[["id", "=", job_id]]], self.options.call_timeout)
                if jobs and jobs[0].get("state") in ("FAILED", "ABORTED"):
                    raise error_from_job(jobs[0]) from None
            raise
        finally:
            job_id = self._job_by_message.pop(ident, None)
            self._progress_by_message.pop(ident, None)
            if job_id is not None:
                self._progress_by_job.pop(job_id, None)

    @scrubbed
    async def wait_job(
        self,
        job_id: int,
        timeout: float | None = None,
        on_progress: Callable[[dict[str, Any]], None] | None = None,
        *,
        method: str = "",
    ) -> Any:
        """Waits for a job to end: events first, a ``core.get_jobs`` poll when they are quiet."""
        watch = self._jobs.setdefault(job_id, _JobWatch())
        watch.waiters += 1
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (timeout or self.options.job_timeout)
        try:
            while True:
                job = watch.job
                if job is not None:
                    if on_progress and job.get("progress"):
                        on_progress(job)
                    if is_finished(job):
                        return job_result(job, job_id)
                if self._closed:
                    raise TransportError(f"connection closed while following job {job_id}")
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise CallTimeout(f"job {job_id} did not finish in time")
                watch.changed.clear()
                try:
                    await asyncio.wait_for(watch.changed.wait(), min(remaining, JOB_POLL_INTERVAL))
                except TimeoutError:
                    await self._poll_job(job_id, watch)
        finally:
            watch.waiters -= 1
            if watch.waiters <= 0 and self._jobs.get(job_id) is watch:
                del self._jobs[job_id]  # the last waiter: others still hear the job's events

    async def _poll_job(self, job_id: int, watch: _JobWatch) -> None:
        try:
            jobs = await self.call("core.get_jobs", [["id", "=", job_id]], idempotent=True)
        except TransportError:
            if self._closed:
                raise
            return  # dropped: the reconnect brings the events back; poll again later
        if jobs:
            watch.job = jobs[0]
        elif watch.job is None:
            raise CallFailed(f"job {job_id} is unknown to TrueNAS (restarted?)")

    @scrubbed
    async def subscribe(self, collection: str, callback: EventCallback) -> None:
        self._subscriptions.setdefault(collection, []).append(callback)
        async with self._subscribing:
            if collection in self._acknowledged or not self._connected.is_set():
                return  # subscribed already, or the (re)connect's handshake subscribes it
            try:
                await self.call("core.subscribe", collection)
            except BaseException:
                # Not subscribed: this callback goes, and the next subscriber (another holder of a
                # shared transport) asks the server again instead of hearing nothing.
                self.unsubscribe(collection, callback)
                raise
            self._acknowledged.add(collection)

    def unsubscribe(self, collection: str, callback: EventCallback) -> None:
        """Drops the callback; the server-side subscription stays (one per collection and socket, so
        a later subscriber is not subscribed twice and hears each event once; re-made on reconnects
        only while the collection has listeners)."""
        callbacks = self._subscriptions.get(collection, [])
        with contextlib.suppress(ValueError):
            callbacks.remove(callback)

    async def upload(
        self,
        path: str,
        data: bytes | Path,
        *,
        mode: int,
        on_progress: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        token = None
        if (self.login_mechanism or "").startswith(scram.MECHANISM):
            # The key never crossed the wire: the upload must not send it either. A token for this one
            # request, usable from this address only (plugins/auth.py generate_token: ttl, attrs,
            # match_origin, single_use).
            answer = await self.call("auth.generate_token", UPLOAD_TOKEN_TTL, {}, True, True)
            if not isinstance(answer, str) or not answer:
                raise MalformedAnswer("auth.generate_token answered no token")
            token = Secret(answer)
        await upload_file(self, self.options, path, data, mode=mode, on_progress=on_progress, token=token)


UPLOAD_TOKEN_TTL = 600
"""Seconds an upload's single-use token stays valid: it is used at once, by the next request."""


def _major(version: Any) -> int:
    """``TrueNAS-26.0.0`` -> 26; 0 when it says no version."""
    found = re.search(r"(\d+)\.\d+", str(version or ""))
    return int(found.group(1)) if found else 0


class _ErrorReply(Exception):
    def __init__(self, error: dict[str, Any]) -> None:
        super().__init__("error reply")
        self.error = error


def _describe(exc: BaseException) -> str:
    """The first line of an error, without object reprs (aiohttp prints ``ssl:<SSLContext ... at 0x...>``)."""
    text = (str(exc) or type(exc).__name__).splitlines()[0]
    return _REPR.sub("", text)


_REPR = re.compile(r" ?ssl:(<[^>]*>|default|None|True|False)")
