"""Teardown survives restarts (issue 19 item 7), with fakes: the credentials a deletion needs
outlive the tenant's Secret, as a copy in the operator's namespace (docs/security.md)."""

from __future__ import annotations

import base64
import json
from typing import Any

from truenas_incus_operator.connections import Connection, ConnectionConfig, ConnectionManager, ConnectionResources
from truenas_incus_operator.connections.config import Loader
from truenas_incus_operator.policy import Policy, Quota
from truenas_incus_operator.settings import Settings

from .fakes import LEDGER_NAMESPACE, FakeKube

KEY = "7-" + "k" * 64
COPIES = "tio-credentials"


class RecordingManager(ConnectionManager):
    """Configures without connecting (no TrueNAS here): what would be used is recorded."""

    def __init__(self) -> None:
        super().__init__(30.0, 300.0)
        self.reloads: dict[str, Loader | None] = {}
        """The loader each connection would call again after TrueNAS refused its key."""

    async def configure(self, key: str, config: ConnectionConfig, reload: Loader | None = None) -> Connection:
        self.reloads[key] = reload
        connection = Connection(key, config, resync_seconds=30.0)
        connection.ready.set()
        self.connections[key] = connection
        self.problems.pop(key, None)
        return connection


def connection_body(deleting: bool = False) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": "nas", "namespace": "apps", "generation": 1, "uid": "uid-nas"}
    if deleting:
        meta["deletionTimestamp"] = "2026-12-03T13:00:00Z"
    return {
        "apiVersion": "incus.truenas.io/v1alpha1",
        "kind": "TrueNASConnection",
        "metadata": meta,
        "spec": {"url": "wss://nas.invalid", "apiKeySecretRef": {"name": "nas-key", "key": "apiKey"}},
    }


def operator_process(kube: FakeKube, policy: Policy | None = None) -> tuple[RecordingManager, ConnectionResources]:
    manager = RecordingManager()
    settings = Settings(ledger_namespace=LEDGER_NAMESPACE, credentials_secret=COPIES)
    return manager, ConnectionResources(settings, kube, manager, policy)


def with_key_secret() -> FakeKube:
    kube = FakeKube()
    kube.add_secret("apps", "nas-key", {"apiKey": KEY}, labels={"incus.truenas.io/credentials": "true"})
    return kube


def delete_key_secret(kube: FakeKube) -> None:
    kube.secrets.pop(("apps", "nas-key", "apiKey"))
    kube.secret_labels.pop(("apps", "nas-key"))


async def test_a_connection_being_deleted_after_a_restart_uses_the_copy_when_its_secret_is_gone() -> None:
    """The finding: a namespace's contents deleted, the operator restarted 1 s later: the Secret was
    gone, the TrueNASConnection (held by its finalizer) reported SecretNotFound for ever, and the
    instances it owned were never deleted."""
    kube = with_key_secret()
    first, resources = operator_process(kube)
    await resources.sync(connection_body())
    loaded = first.connections["apps/nas"].config
    delete_key_secret(kube)  # kubectl delete all,secrets,... -n apps; then the operator restarts
    manager, restarted = operator_process(kube)
    await restarted.sync(connection_body(deleting=True))
    assert "apps/nas" in manager.connections, manager.problems
    config = manager.connections["apps/nas"].config
    assert config.api_key.reveal() == KEY and config.url == "wss://nas.invalid"
    assert config.vm_image_server is not None and config.vm_image_server == loaded.vm_image_server


async def test_a_live_connection_whose_secret_is_gone_does_not_use_the_copy() -> None:
    """Deleting the Secret of a connection that stays revokes it: the copy is for teardown only."""
    kube = with_key_secret()
    _, resources = operator_process(kube)
    await resources.sync(connection_body())
    delete_key_secret(kube)
    manager, restarted = operator_process(kube)
    await restarted.sync(connection_body())
    assert "apps/nas" not in manager.connections
    assert manager.problems["apps/nas"].reason == "SecretNotFound"


async def test_the_copy_goes_with_the_connection_and_holds_the_key_only_in_its_data() -> None:
    kube = with_key_secret()
    _, resources = operator_process(kube)
    await resources.sync(connection_body())
    stored = kube.secret_manifests[(LEDGER_NAMESPACE, COPIES)]
    assert KEY not in json.dumps(stored["metadata"]), "names and annotations carry no key"
    entries = [json.loads(base64.b64decode(value)) for value in stored["data"].values()]
    assert [(e["connection"], e["apiKey"]) for e in entries] == [("apps/nas", KEY)]
    await resources.remove("apps/nas")
    assert kube.secret_manifests[(LEDGER_NAMESPACE, COPIES)].get("data") in (None, {})


async def test_a_key_rotated_after_truenas_refused_the_old_one_reaches_the_copy() -> None:
    """The connection reloads its configuration itself when TrueNAS refuses the key (the documented
    rotation): the copy must follow, or a teardown after a restart used the revoked key for ever."""
    kube = with_key_secret()
    manager, resources = operator_process(kube)
    await resources.sync(connection_body())
    rotated = "8-" + "r" * 64
    kube.secrets[("apps", "nas-key", "apiKey")] = rotated
    reload = manager.reloads["apps/nas"]
    assert reload is not None
    await reload()  # what Connection does on AuthenticationFailed
    delete_key_secret(kube)
    restarted_manager, restarted = operator_process(kube)
    await restarted.sync(connection_body(deleting=True))
    assert restarted_manager.connections["apps/nas"].config.api_key.reveal() == rotated


async def test_a_connection_being_deleted_is_not_refused_by_the_quota() -> None:
    """After a restart a connection being deleted is not yet in use: at the namespace's quota it
    was refused (QuotaExceeded) and its instances' teardown never got credentials."""
    kube = with_key_secret()
    policy = Policy(default_quota=Quota(max_connections=1))
    manager, resources = operator_process(kube, policy)
    other = connection_body()
    other["metadata"] = {**other["metadata"], "name": "other", "uid": "uid-other"}
    await resources.sync(other)  # the namespace's one connection in use
    await resources.sync(connection_body(deleting=True))
    assert "apps/nas" in manager.connections, manager.problems
