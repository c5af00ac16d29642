"""``POST /_upload`` with ``filesystem.put`` (apps/file_app.py): a file onto the NAS, as a job.

Both transports upload the same way (the endpoint is HTTP beside the JSON-RPC socket and the REST
API); this is the one place that speaks it, under the same boundary as every other call: the key is
scrubbed from whatever is raised, a library's error leaves as the client's own (``map_exception``),
a refusal is ``CallFailed``, an answer that is not a job id ``MalformedAnswer``.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp

from ..errors import CallFailed, MalformedAnswer, NotAuthorized
from ..jobs import is_finished, job_result
from .base import ConnectionOptions, Secret, Transport, scrubbing

MAX_ANSWER_BYTES = 4096
"""The endpoint answers ``{"job_id": N}``; anything longer is not its answer."""


async def upload_file(
    transport: Transport,
    options: ConnectionOptions,
    path: str,
    data: bytes | Path,
    *,
    mode: int,
    on_progress: Callable[[dict[str, Any]], None] | None = None,
    token: Secret | None = None,
) -> None:
    """Writes ``data`` (bytes, or a file streamed from disk in pieces) to ``path`` on the NAS with
    ``mode``, then follows the ``filesystem.put`` job to its end through ``transport``. ``token``: a
    single-use ``auth.generate_token`` token to send (``Authorization: Token``, apps/file_app.py)
    instead of the API key, where the login kept the key off the wire (SCRAM)."""
    with scrubbing(options.api_key), scrubbing(token or options.api_key):
        job_id = await _post(options, path, data, mode, token)
        # The job may be over already (small files): its events went by before anyone listened for them.
        jobs = await transport.call("core.get_jobs", [["id", "=", job_id]], {}, idempotent=True)
        if jobs and is_finished(jobs[0]):
            if on_progress is not None:
                on_progress(jobs[0])
            job_result(jobs[0], job_id)
            return
        await transport.wait_job(job_id, None, on_progress, method="filesystem.put")


async def _post(options: ConnectionOptions, path: str, data: bytes | Path, mode: int, token: Secret | None) -> int:
    parts = urlsplit(options.url)
    scheme = {"wss": "https", "ws": "http"}.get(parts.scheme, parts.scheme)
    url = urlunsplit((scheme, parts.netloc, "/_upload", "", ""))
    form = aiohttp.FormData()
    form.add_field("data", json.dumps({"method": "filesystem.put", "params": [path, {"mode": mode}]}))
    if token is not None:
        headers = {"Authorization": f"Token {token.reveal()}"}
    else:
        headers = {"Authorization": f"Bearer {options.api_key.reveal()}"}
    ssl_option: Any = options.ssl_context if scheme == "https" and options.ssl_context is not None else None
    with contextlib.ExitStack() as files:
        content: Any = files.enter_context(data.open("rb")) if isinstance(data, Path) else data
        form.add_field("file", content, filename=path.rsplit("/", 1)[-1], content_type="application/octet-stream")
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=options.job_timeout)) as http,
            http.post(url, data=form, headers=headers, ssl=ssl_option) as response,
        ):
            body = await response.content.read(MAX_ANSWER_BYTES + 1)
            text = body[:MAX_ANSWER_BYTES].decode("utf-8", "replace")
            if response.status == 403:
                # The file app authorizes the method for the key (apps/file_app.py), and
                # filesystem.put is FULL_ADMIN only (plugins/filesystem.py).
                raise NotAuthorized(
                    "filesystem.put: not authorized (HTTP 403). Uploading a VM's image and seed needs the "
                    "FULL_ADMIN role on TrueNAS: give the API key's user FULL_ADMIN to create VMs (README, "
                    '"Roles"); containers need only the virtualization roles'
                )
            if response.status != 200:
                raise CallFailed(f"upload of {path} refused: HTTP {response.status} {text[:200]}", method="_upload")
    try:
        answer = json.loads(text) if len(body) <= MAX_ANSWER_BYTES else None
        job_id = answer["job_id"] if isinstance(answer, dict) else None
    except ValueError:
        job_id = None
    if not isinstance(job_id, int) or isinstance(job_id, bool):
        raise MalformedAnswer(f"upload of {path}: TrueNAS did not answer a job id")
    return job_id
