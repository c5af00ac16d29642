"""Copies of TrueNASConnections' credentials in the operator's own namespace, for teardown.

Deleting a namespace's contents deletes the key Secret at once, while the TrueNASConnection waits
(its finalizer) for the IncusInstances being deleted through it. Kept only in memory, the
credentials were lost when the operator restarted in between: every resource stuck at
SecretNotFound and the instances kept running (issue 19, finding 7). So each connection's last
loaded configuration is copied into one Secret in the operator's namespace
(``TIO_CREDENTIALS_SECRET``: the chart creates it and grants ``get``/``update`` on that name only),
one data entry per connection, and removed with the connection. The copy is used only for a
TrueNASConnection that is being deleted and whose own credentials cannot be loaded any more; a
live connection whose Secret is gone reports SecretNotFound as before (deleting the Secret revokes).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..kube import KUBE_REASON, Kube
from ..problems import OperatorError, fail
from ..truenas import Secret
from ..truenas.images import ImageSource
from .config import ConnectionConfig

log = logging.getLogger(__name__)
ATTEMPTS = 5
MANAGED_BY = {"app.kubernetes.io/managed-by": "truenas-incus-operator"}


def entry_key(connection: str) -> str:
    """The data key of one connection (Secret data keys allow only ``[-._a-zA-Z0-9]``)."""
    return "c-" + hashlib.sha256(connection.encode()).hexdigest()[:40]


def _entry(connection: str, config: ConnectionConfig) -> dict[str, Any]:
    return {
        "connection": connection,
        "url": config.url,
        "apiKey": config.api_key.reveal(),
        "transport": config.transport,
        "caPem": config.ca_pem,
        "insecureSkipVerify": config.insecure_skip_verify,
        "maxConcurrentCalls": config.max_concurrent_calls,
        "vmImageServer": _image_source(config.vm_image_server),
    }


def _image_source(source: ImageSource | None) -> dict[str, Any] | None:
    """The image server as it was allowed when the credentials loaded (policy and settings applied)."""
    if source is None:
        return None
    fields = dataclasses.asdict(source)
    fields["scratch_dir"] = None if source.scratch_dir is None else str(source.scratch_dir)
    return fields


def _recalled_image_source(value: Any) -> ImageSource | None:
    if not isinstance(value, dict):
        return None  # also a copy written before image servers were bounded by the policy: the default
    scratch = value.get("scratch_dir")
    return ImageSource(
        url=str(value["url"]),
        trusted=bool(value["trusted"]),
        max_index_bytes=int(value["max_index_bytes"]),
        max_image_bytes=int(value["max_image_bytes"]),
        scratch_dir=None if scratch is None else Path(str(scratch)),
        base_grace_seconds=float(value["base_grace_seconds"]),
    )


def _config(entry: dict[str, Any]) -> ConnectionConfig:
    return ConnectionConfig(
        url=str(entry["url"]),
        api_key=Secret(str(entry["apiKey"])),
        transport=str(entry.get("transport") or "websocket"),
        ca_pem=entry.get("caPem") or None,
        insecure_skip_verify=bool(entry.get("insecureSkipVerify")),
        max_concurrent_calls=int(entry.get("maxConcurrentCalls") or 20),
        vm_image_server=_recalled_image_source(entry.get("vmImageServer")),
    )


class CredentialCopies:
    def __init__(self, kube: Kube, namespace: str, name: str) -> None:
        self.kube = kube
        self.namespace = namespace
        self.name = name
        self._kept: dict[str, ConnectionConfig] = {}
        """What this process last wrote per connection (no write when it did not change)."""

    async def keep(self, connection: str, config: ConnectionConfig) -> None:
        """Records ``config`` for ``connection``; a failure is logged (never the key), not raised:
        the connection works without its copy, only a teardown across a restart would need it."""
        if self._kept.get(connection) == config:
            return
        value = base64.b64encode(json.dumps(_entry(connection, config)).encode()).decode()
        try:
            await self._change(lambda data: {**data, entry_key(connection): value})
        except OperatorError as exc:
            log.warning(
                "TrueNASConnection %s: cannot keep a copy of its credentials: %s", connection, exc.problem.message
            )
            return
        self._kept[connection] = config

    async def recall(self, connection: str) -> ConnectionConfig | None:
        """The configuration last kept for ``connection``, or None."""
        try:
            body = await self.kube.read_secret_manifest(self.namespace, self.name)
        except OperatorError as exc:
            log.warning("TrueNASConnection %s: cannot read its credentials' copy: %s", connection, exc.problem.message)
            return None
        raw = ((body or {}).get("data") or {}).get(entry_key(connection))
        if not isinstance(raw, str):
            return None
        try:
            entry = json.loads(base64.b64decode(raw, validate=True))
            if entry.get("connection") != connection:
                return None
            return _config(entry)
        except (binascii.Error, ValueError, KeyError, TypeError, AttributeError):
            log.warning("TrueNASConnection %s: its credentials' copy is unreadable; ignored", connection)
            return None

    async def forget(self, connection: str) -> None:
        """Removes the copy (the connection is gone); a failure is logged."""
        self._kept.pop(connection, None)
        key = entry_key(connection)
        try:
            await self._change(lambda data: {k: v for k, v in data.items() if k != key}, create=False)
        except OperatorError as exc:
            log.warning(
                "TrueNASConnection %s: cannot remove its credentials' copy: %s", connection, exc.problem.message
            )

    async def _change(self, change: Callable[[dict[str, str]], dict[str, str]], create: bool = True) -> None:
        """Optimistic read-modify-write of the one Secret (created when missing, if allowed)."""
        for _ in range(ATTEMPTS):
            body = await self.kube.read_secret_manifest(self.namespace, self.name)
            if body is None:
                if not create:
                    return
                manifest = {
                    "apiVersion": "v1",
                    "kind": "Secret",
                    "type": "Opaque",
                    "metadata": {"name": self.name, "namespace": self.namespace, "labels": dict(MANAGED_BY)},
                    "data": change({}),
                }
                if await self.kube.create_secret(self.namespace, manifest) is not None:
                    return
                continue
            data = dict(body.get("data") or {})
            wanted = change(data)
            if wanted == data:
                return
            body["data"] = wanted
            if await self.kube.replace_secret(self.namespace, body) is not None:
                return
        raise fail(KUBE_REASON, f"Secret {self.namespace}/{self.name} kept changing while being written")
