"""The ownership ledger: which IncusInstance (by UID) owns which instance on which TrueNAS.

One ConfigMap per owned instance, in the operator's own namespace, where tenants cannot write:
named after a hash of (TrueNAS identity, instance name), so the API server itself refuses a second
owner (409 on create). Written before the create call (crash safety: never a second create, never
someone else's instance), checked before every write and every delete, read back at startup
(durable across restarts). Annotations and status never count: tenants write those.

The TrueNAS identity is the normalised ``host:port`` of the connection's URL: the default
connection and a TrueNASConnection that reach one NAS by the same address share one ledger entry
per instance name.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, replace
from typing import Any

from ..connections import truenas_identity
from ..kube import Kube
from ..models import API_GROUP
from ..problems import fail

log = logging.getLogger(__name__)
LEDGER_LABEL = f"{API_GROUP}/ownership"

__all__ = ["LEDGER_LABEL", "Ledger", "Record", "record_name", "truenas_identity"]


def record_name(truenas: str, instance: str) -> str:
    digest = hashlib.sha256(f"{truenas}\n{instance}".encode()).hexdigest()[:40]
    return f"tio-owner-{digest}"


@dataclass(frozen=True)
class Record:
    truenas: str
    instance: str
    owner_uid: str
    owner: str
    """``namespace/name`` of the owning IncusInstance (for messages; the UID decides)."""
    connection: str
    """The connection key the owner used (``<default>`` or ``namespace/name``)."""
    state: str
    """creating (claimed before the create call), created, or adopted."""
    resource_version: str = ""

    @property
    def name(self) -> str:
        return record_name(self.truenas, self.instance)

    def manifest(self, namespace: str) -> dict[str, Any]:
        metadata: dict[str, Any] = {
            "name": self.name,
            "namespace": namespace,
            "labels": {LEDGER_LABEL: "true", "app.kubernetes.io/managed-by": "truenas-incus-operator"},
        }
        if self.resource_version:
            metadata["resourceVersion"] = self.resource_version
        return {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": metadata,
            "data": {
                "truenas": self.truenas,
                "instance": self.instance,
                "ownerUID": self.owner_uid,
                "owner": self.owner,
                "connection": self.connection,
                "state": self.state,
            },
        }

    @classmethod
    def from_manifest(cls, body: dict[str, Any]) -> Record | None:
        data = body.get("data") or {}
        try:
            record = cls(
                truenas=data["truenas"],
                instance=data["instance"],
                owner_uid=data["ownerUID"],
                owner=data["owner"],
                connection=data.get("connection", ""),
                state=data.get("state", "created"),
                resource_version=str(body.get("metadata", {}).get("resourceVersion", "")),
            )
        except KeyError:
            return None
        return record if record.name == body.get("metadata", {}).get("name") else None


class Ledger:
    def __init__(self, kube: Kube, namespace: str) -> None:
        self.kube = kube
        self.namespace = namespace
        self.records: dict[tuple[str, str], Record] = {}

    async def load(self) -> None:
        """Reads every record (at startup, before any loop acts)."""
        items = await self.kube.list_configmaps(self.namespace, f"{LEDGER_LABEL}=true")
        records = [r for r in (Record.from_manifest(item) for item in items) if r is not None]
        self.records = {(r.truenas, r.instance): r for r in records}
        log.info("ownership ledger: %d records in namespace %s", len(self.records), self.namespace)

    def get(self, truenas: str, instance: str) -> Record | None:
        return self.records.get((truenas, instance))

    def owned_by(self, owner_uid: str) -> list[Record]:
        return [r for r in self.records.values() if r.owner_uid == owner_uid]

    async def claim(
        self, truenas: str, instance: str, *, owner_uid: str, owner: str, connection: str, state: str
    ) -> Record:
        """Records ``owner_uid`` as the owner; raises ``OperatorError`` (Conflict) if another holds it."""
        wanted = Record(truenas, instance, owner_uid, owner, connection, state)
        created = await self.kube.create_configmap(self.namespace, wanted.manifest(self.namespace))
        if created is None:
            held = await self.reread(truenas, instance)
            if held is not None and held.owner_uid == owner_uid:
                return held
            holder = held.owner if held is not None else "another resource"
            raise fail("Conflict", f"the instance {instance!r} is already managed by IncusInstance {holder}")
        record = Record.from_manifest(created) or wanted
        self.records[(truenas, instance)] = record
        return record

    async def set_state(self, record: Record, state: str) -> Record:
        if record.state == state:
            return record
        updated = await self.kube.replace_configmap(
            self.namespace, replace(record, state=state).manifest(self.namespace)
        )
        if updated is None:
            raise fail("Conflict", f"the ownership record of {record.instance!r} changed meanwhile")
        fresh = Record.from_manifest(updated) or replace(record, state=state)
        self.records[(record.truenas, record.instance)] = fresh
        return fresh

    async def reread(self, truenas: str, instance: str) -> Record | None:
        """The record as the API server has it now (before a delete, and after a lost race)."""
        body = await self.kube.read_configmap(self.namespace, record_name(truenas, instance))
        record = Record.from_manifest(body) if body is not None else None
        if record is None:
            self.records.pop((truenas, instance), None)
        else:
            self.records[(truenas, instance)] = record
        return record

    async def release(self, record: Record) -> None:
        """Forgets an owner (its instance is gone, or left on TrueNAS with Orphan)."""
        await self.kube.delete_configmap(self.namespace, record.name, record.resource_version or None)
        self.records.pop((record.truenas, record.instance), None)
