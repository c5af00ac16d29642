"""In-memory stand-ins for the operator's collaborators (the way httpx tests inject a
``MockTransport``): a Kube that records patches, a backend that keeps instances in a dict, and an
operator graph built from them with ``app.build``. For unit tests of everything beyond the pure
planner, without a cluster or a simulator."""

from __future__ import annotations

import asyncio
import base64
import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from truenas_incus_operator.app import Operator, build
from truenas_incus_operator.connections import Connection, ConnectionConfig
from truenas_incus_operator.kube import KUBE_REASON, Kube, SecretObject
from truenas_incus_operator.metrics import Metrics
from truenas_incus_operator.policy import Policy
from truenas_incus_operator.problems import Reason, fail
from truenas_incus_operator.settings import Settings
from truenas_incus_operator.truenas import (
    UNSET,
    AlreadyExists,
    DeviceConfig,
    Endpoint,
    FieldError,
    InstanceChanges,
    InstanceConfig,
    NotFound,
    ObservedImage,
    ObservedInstance,
    Secret,
    Timings,
    TransportPool,
    TrueNASClient,
    connect,
)
from truenas_incus_operator.truenas.images import ImageSource
from truenas_incus_operator.truenas.observe import Observer
from truenas_incus_operator.truenas.types import InstanceEventCallback, InstanceStatus, SnapshotTarget

NOW = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
LEDGER_NAMESPACE = "tio-system"
TRUENAS = "nas.invalid:443"
"""The fake connection's TrueNAS identity (wss://nas.invalid)."""


@dataclass
class Patch:
    kind: str
    """status or annotations"""
    plural: str
    namespace: str
    name: str
    body: dict[str, Any]


class FakeKube(Kube):
    """Records every patch; ``secrets`` (``(namespace, name, key) -> text``), ``secret_labels`` and
    ``secret_annotations`` (``(namespace, name) -> dict``) answer ``read_secret``; ``configmaps`` holds
    ConfigMaps (and ``leases`` Leases) with the API server's create/replace/delete semantics (409 on a
    name taken or a stale version)."""

    version: tuple[int, int] | None = (1, 37)

    async def server_version(self) -> tuple[int, int] | None:
        return self.version

    def __init__(self) -> None:
        super().__init__()
        self.patches: list[Patch] = []
        self.calls: list[str] = []
        self.secrets: dict[tuple[str, str, str], str] = {}
        self.secret_labels: dict[tuple[str, str], dict[str, str]] = {}
        self.secret_annotations: dict[tuple[str, str], dict[str, str]] = {}
        self.configmaps: dict[tuple[str, str], dict[str, Any]] = {}
        self.leases: dict[tuple[str, str], dict[str, Any]] = {}
        """Leases, with the same create/replace semantics as ``configmaps``."""
        self.secret_manifests: dict[tuple[str, str], dict[str, Any]] = {}
        """Secrets the operator writes (its credential copies), with create/replace semantics."""
        self.incus_instances: dict[tuple[str, str], dict[str, Any]] = {}
        """IncusInstances ``read_incus_instance`` answers (tests put the bodies they use)."""
        self.serves_incus_instances = True
        """False: the API server serves no IncusInstances (their CRD is missing)."""
        self._version = 0

    def _stamp(self, body: dict[str, Any]) -> dict[str, Any]:
        self._version += 1
        stored = copy.deepcopy(body)
        stored["metadata"]["resourceVersion"] = str(self._version)
        return stored

    async def list_configmaps(self, namespace: str, label_selector: str) -> list[dict[str, Any]]:
        key, _, value = label_selector.partition("=")
        return [
            copy.deepcopy(cm)
            for (ns, _name), cm in self.configmaps.items()
            if ns == namespace and cm["metadata"].get("labels", {}).get(key) == value
        ]

    async def create_configmap(self, namespace: str, body: dict[str, Any]) -> dict[str, Any] | None:
        self.calls.append("create_configmap")
        key = (namespace, body["metadata"]["name"])
        if key in self.configmaps:
            return None
        self.configmaps[key] = self._stamp(body)
        return copy.deepcopy(self.configmaps[key])

    async def read_configmap(self, namespace: str, name: str) -> dict[str, Any] | None:
        found = self.configmaps.get((namespace, name))
        return copy.deepcopy(found) if found is not None else None

    async def replace_configmap(self, namespace: str, body: dict[str, Any]) -> dict[str, Any] | None:
        key = (namespace, body["metadata"]["name"])
        current = self.configmaps.get(key)
        if current is None or current["metadata"]["resourceVersion"] != body["metadata"].get("resourceVersion"):
            return None
        self.configmaps[key] = self._stamp(body)
        return copy.deepcopy(self.configmaps[key])

    async def delete_configmap(self, namespace: str, name: str, resource_version: str | None = None) -> None:
        self.calls.append("delete_configmap")
        current = self.configmaps.get((namespace, name))
        if current is not None and resource_version and current["metadata"]["resourceVersion"] != resource_version:
            raise fail(KUBE_REASON, f"ConfigMap {namespace}/{name} changed while deleting it")  # 409, as the API server
        self.configmaps.pop((namespace, name), None)

    async def incus_instances_served(self, namespace: str) -> bool:
        return self.serves_incus_instances

    async def list_instance_connections(
        self, namespace: str | None, page: int = 500, pages: int = 1000
    ) -> list[tuple[str, str, str | None]]:
        if not self.serves_incus_instances:
            return []
        return [
            (ns, name, ((body.get("spec") or {}).get("connectionRef") or {}).get("name"))
            for (ns, name), body in self.incus_instances.items()
            if namespace is None or ns == namespace
        ]

    async def read_incus_instance(self, namespace: str, name: str) -> dict[str, Any] | None:
        if not self.serves_incus_instances:
            return None
        found = self.incus_instances.get((namespace, name))
        return copy.deepcopy(found) if found is not None else None

    async def read_secret_manifest(self, namespace: str, name: str) -> dict[str, Any] | None:
        found = self.secret_manifests.get((namespace, name))
        return copy.deepcopy(found) if found is not None else None

    async def create_secret(self, namespace: str, body: dict[str, Any]) -> dict[str, Any] | None:
        self.calls.append("create_secret")
        key = (namespace, body["metadata"]["name"])
        if key in self.secret_manifests:
            return None
        self.secret_manifests[key] = self._stamp(body)
        return copy.deepcopy(self.secret_manifests[key])

    async def replace_secret(self, namespace: str, body: dict[str, Any]) -> dict[str, Any] | None:
        self.calls.append("replace_secret")
        key = (namespace, body["metadata"]["name"])
        current = self.secret_manifests.get(key)
        if current is None or current["metadata"]["resourceVersion"] != body["metadata"].get("resourceVersion"):
            return None
        self.secret_manifests[key] = self._stamp(body)
        return copy.deepcopy(self.secret_manifests[key])

    async def read_lease(self, namespace: str, name: str) -> dict[str, Any] | None:
        found = self.leases.get((namespace, name))
        return copy.deepcopy(found) if found is not None else None

    async def create_lease(self, namespace: str, body: dict[str, Any]) -> dict[str, Any] | None:
        self.calls.append("create_lease")
        store = self.leases
        key = (namespace, body["metadata"]["name"])
        if key in store:
            return None
        store[key] = self._stamp(body)
        return copy.deepcopy(store[key])

    async def replace_lease(self, namespace: str, body: dict[str, Any]) -> dict[str, Any] | None:
        self.calls.append("replace_lease")
        store = self.leases
        key = (namespace, body["metadata"]["name"])
        current = store.get(key)
        if current is None or current["metadata"]["resourceVersion"] != body["metadata"].get("resourceVersion"):
            return None
        store[key] = self._stamp(body)
        return copy.deepcopy(store[key])

    async def patch_status(self, plural: str, namespace: str, name: str, status: dict[str, Any]) -> None:
        self.calls.append("patch_status")
        self.patches.append(Patch("status", plural, namespace, name, status))

    async def patch_annotations(
        self, plural: str, namespace: str, name: str, annotations: dict[str, str | None], explain: bool = False
    ) -> None:
        self.calls.append("patch_annotations")
        self.patches.append(Patch("annotations", plural, namespace, name, dict(annotations)))

    def add_secret(
        self,
        namespace: str,
        name: str,
        data: Mapping[str, str],
        labels: Mapping[str, str] | None = None,
        annotations: Mapping[str, str] | None = None,
    ) -> None:
        """A Secret with ``data`` (plain text) and its metadata."""
        for key, value in data.items():
            self.secrets[(namespace, name, key)] = value
        self.secret_labels[(namespace, name)] = dict(labels or {})
        self.secret_annotations[(namespace, name)] = dict(annotations or {})

    async def read_secret(self, namespace: str, name: str) -> SecretObject:
        self.calls.append(f"read_secret {namespace}/{name}")
        data = {
            key: base64.b64encode(value.encode()).decode()
            for (ns, secret, key), value in self.secrets.items()
            if (ns, secret) == (namespace, name)
        }
        if not data and (namespace, name) not in self.secret_labels:
            raise fail(Reason.SECRET_NOT_FOUND, f"Secret {namespace}/{name} does not exist")
        return SecretObject(
            namespace,
            name,
            labels=self.secret_labels.get((namespace, name), {}),
            annotations=self.secret_annotations.get((namespace, name), {}),
            data=data,
        )

    async def close(self) -> None:
        return None

    def statuses(self, name: str) -> list[dict[str, Any]]:
        return [p.body for p in self.patches if p.kind == "status" and p.name == name]


@dataclass
class FakeBackend:
    """A TrueNAS that keeps instances in a dict. ``calls`` logs every method; ``gate`` (when set)
    holds ``create`` until it is set, as a long create job would; ``answer_gate`` (when set) holds the
    answers of reads that TrueNAS has already computed, as a slow network or a busy client would."""

    family: str = "fake"
    supports_events: bool = False
    instances: dict[str, ObservedInstance] = field(default_factory=dict)
    devices: dict[str, list[DeviceConfig]] = field(default_factory=dict)
    calls: list[str] = field(default_factory=list)
    gate: asyncio.Event | None = None
    creating: set[str] = field(default_factory=set)
    on_call: Callable[[str], None] | None = None
    answer_gate: asyncio.Event | None = None

    def _log(self, call: str) -> None:
        self.calls.append(call)
        if self.on_call is not None:
            self.on_call(call)

    def deferred_fields(self, config: InstanceConfig, observed: ObservedInstance | None) -> list[str]:
        return []  # changes apply when made

    def unsupported_fields(self, config: InstanceConfig, observed: ObservedInstance | None = None) -> list[str]:
        return []

    def honoured(self, config: InstanceConfig, observed: ObservedInstance | None = None) -> InstanceConfig:
        return config

    def device_identity(self, device: DeviceConfig) -> str:
        return device.name

    async def list_instances(self) -> list[ObservedInstance]:
        self._log("list_instances")
        answer = list(self.instances.values())
        if self.answer_gate is not None:
            await self.answer_gate.wait()
        return answer

    async def get_instance(self, name: str) -> ObservedInstance | None:
        self._log(f"get_instance {name}")
        answer = self.instances.get(name)
        if self.answer_gate is not None:
            await self.answer_gate.wait()
        return answer

    async def create(
        self, config: InstanceConfig, on_progress: Callable[[dict[str, Any]], None] | None = None
    ) -> ObservedInstance:
        self._log(f"create {config.name}")
        if config.name in self.instances:
            raise AlreadyExists([FieldError("create.name", f"Name {config.name!r} already exists")])
        self.creating.add(config.name)
        if on_progress is not None:
            on_progress(
                {"id": 41, "method": "virt.instance.create", "state": "RUNNING",
                 "progress": {"percent": 30, "description": "Downloading image"}}
            )  # fmt: skip
        try:
            if self.gate is not None:
                await self.gate.wait()
        finally:
            self.creating.discard(config.name)
        instance = observed(config.name, cpu=config.cpu, memory=config.memory, environment=config.environment)
        self.instances[config.name] = instance
        self.devices[config.name] = list(config.devices)
        return instance

    async def update(self, name: str, changes: InstanceChanges) -> ObservedInstance:
        self._log(f"update {name}")
        current = self._get(name)
        values: dict[str, Any] = {}
        for key in ("cpu", "memory"):
            value = getattr(changes, key)
            if value is not None:
                values[key] = None if value is UNSET else value
        if changes.autostart is not None:
            values["autostart"] = changes.autostart
        if changes.environment is not None:
            values["environment"] = dict(changes.environment)
        self.instances[name] = replace(current, **values)
        return self.instances[name]

    async def delete(self, name: str) -> None:
        self._log(f"delete {name}")
        self._get(name)
        del self.instances[name]

    async def start(self, name: str, overcommit: bool = False) -> None:
        self._log(f"start {name}")
        self.instances[name] = replace(self._get(name), status=InstanceStatus.RUNNING)

    async def stop(self, name: str, timeout: int | None = None, force: bool = False) -> None:
        self._log(f"stop {name}")
        self.instances[name] = replace(self._get(name), status=InstanceStatus.STOPPED)

    async def restart(self, name: str, timeout: int | None = None, force: bool = False) -> None:
        self._log(f"restart {name}")

    async def create_in_progress(self, name: str) -> bool:
        return name in self.creating

    async def discard_unfinished(self, name: str) -> None:
        self._log(f"discard_unfinished {name}")

    async def list_devices(self, name: str) -> list[DeviceConfig]:
        self._log(f"list_devices {name}")
        return list(self.devices.get(name, []))

    async def add_device(self, name: str, device: DeviceConfig) -> None:
        self._log(f"add_device {name} {device.name}")
        self.devices.setdefault(name, []).append(device)

    async def update_device(self, name: str, device: DeviceConfig, target: str | None = None) -> None:
        self._log(f"update_device {name} {device.name}")
        self.devices[name] = [device if d.name == (target or device.name) else d for d in self.devices[name]]

    async def snapshot_target(self, name: str) -> SnapshotTarget | None:
        return SnapshotTarget(f"tank/{name}") if name in self.instances else None

    async def delete_device(self, name: str, device_name: str) -> None:
        self._log(f"delete_device {name} {device_name}")
        self.devices[name] = [d for d in self.devices.get(name, []) if d.name != device_name]

    def instance_from_event(self, fields: dict[str, Any]) -> ObservedInstance | None:
        if {"name", "status", "type"} <= set(fields):
            return observed(fields["name"], status=fields["status"])
        return None

    async def watch(self, callback: InstanceEventCallback) -> None:
        return None

    def _get(self, name: str) -> ObservedInstance:
        if name not in self.instances:
            raise NotFound([FieldError(None, f"Instance {name!r} not found", 2)])
        return self.instances[name]


def observed(name: str, status: str = "RUNNING", **values: Any) -> ObservedInstance:
    fields: dict[str, Any] = {
        "id": name,
        "name": name,
        "type": "CONTAINER",
        "status": InstanceStatus.of(status),
        "cpu": None,
        "memory": None,
        "autostart": True,
        "environment": {},
        "addresses": ("10.0.0.2",) if status == "RUNNING" else (),
        "image": ObservedImage(os="Debian", release="bookworm"),
    }
    fields.update({k: v for k, v in values.items() if k in fields})
    if fields["environment"] is None:
        fields["environment"] = {}
    return ObservedInstance(**fields)


class NoTransport:
    """The fake client's transport: the fake backend never uses it; snapshot queries (the client's
    Snapshots, which deletion asks) find none, and any other call is a test's mistake."""

    name = "fake"
    api_version = "v25.10.1"

    async def call(self, method: str, *params: Any, **_: Any) -> Any:
        if method.endswith("snapshot.query"):
            return []
        raise AssertionError(f"the fake transport was asked {method}")

    async def close(self) -> None:
        return None


@dataclass
class FakeOperator:
    operator: Operator
    kube: FakeKube
    backend: FakeBackend
    connection: Connection
    events: list[tuple[str, str, str]]


def fake_operator(
    backend: FakeBackend | None = None, policy: Policy | None = None, metrics: Metrics | None = None, **settings: Any
) -> FakeOperator:
    """The operator's real graph (``app.build``) over a FakeKube and a connected FakeBackend."""
    kube = FakeKube()
    backend = backend or FakeBackend()
    events: list[tuple[str, str, str]] = []

    def post_event(body: Mapping[str, Any], kind: str, reason: str, message: str) -> None:
        events.append((kind, reason, message))

    values = {"resync_seconds": 30.0, "retry_min_seconds": 1.0, "ledger_namespace": LEDGER_NAMESPACE, **settings}
    operator = build(Settings(**values), kube, post_event, clock=lambda: NOW, policy=policy, metrics=metrics)
    config = ConnectionConfig(url="wss://nas.invalid", api_key=Secret("1-test"))
    connection = Connection("<default>", config, resync_seconds=30.0)
    client = TrueNASClient(NoTransport(), backend, (25, 10), "TrueNAS-25.10.1")  # type: ignore[arg-type]
    connection.attach(client, backend.instances.values())
    operator.connections.connections["<default>"] = connection
    return FakeOperator(operator, kube, backend, connection, events)


def resource(
    name: str = "web01",
    *,
    namespace: str = "apps",
    generation: int = 1,
    created: str = "2026-11-30T10:00:00Z",
    uid: str | None = None,
    annotations: dict[str, str] | None = None,
    deleting: bool = False,
    instance: str | None = None,
    **spec: Any,
) -> dict[str, Any]:
    """An IncusInstance body as kopf hands it over; ``instance`` is spec.name."""
    if instance is not None:
        spec["name"] = instance
    meta: dict[str, Any] = {
        "name": name,
        "namespace": namespace,
        "generation": generation,
        "uid": uid or f"uid-{name}",
        "creationTimestamp": created,
        "annotations": dict(annotations or {}),
    }
    if deleting:
        meta["deletionTimestamp"] = "2026-11-30T12:00:00Z"
    return {
        "apiVersion": "incus.truenas.io/v1alpha1",
        "kind": "IncusInstance",
        "metadata": meta,
        "spec": {"type": "CONTAINER", "image": "debian/bookworm", **spec},
    }


@dataclass
class ScriptedTransport:
    """A transport whose answers a test scripts: ``answers`` (method -> result, or an exception to
    raise), jobs that end as ``job_ends`` says (a job dict passed to ``on_progress``), and ``gate``
    (when set) holding every call until it is set. For tests of what wraps a transport (observe.py)."""

    name: str = "websocket"
    system_version: str | None = "TrueNAS-25.10.1"
    api_version: str | None = "v25.10.1"
    supports_events: bool = True
    answers: dict[str, Any] = field(default_factory=dict)
    job_ends: dict[str, dict[str, Any]] = field(default_factory=dict)
    gate: asyncio.Event | None = None
    subscriptions: dict[str, Callable[[str, Any, dict[str, Any] | None], None]] = field(default_factory=dict)
    on_reconnect: list[Callable[[], None]] = field(default_factory=list)

    async def connect(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def _answer(self, method: str) -> Any:
        if self.gate is not None:
            await self.gate.wait()
        answer = self.answers.get(method)
        if isinstance(answer, BaseException):
            raise answer
        return answer

    async def call(self, method: str, *params: Any, timeout: float | None = None, idempotent: bool = False) -> Any:
        return await self._answer(method)

    async def call_job(
        self,
        method: str,
        *params: Any,
        on_progress: Callable[[dict[str, Any]], None] | None = None,
        timeout: float | None = None,
    ) -> Any:
        end = self.job_ends.get(method)
        if end is not None and on_progress is not None:
            on_progress(end)
        return await self._answer(method)

    async def subscribe(self, collection: str, callback: Callable[[str, Any, dict[str, Any] | None], None]) -> None:
        self.subscriptions[collection] = callback

    def unsubscribe(self, collection: str, callback: Callable[[str, Any, dict[str, Any] | None], None]) -> None:
        if self.subscriptions.get(collection) is callback:
            del self.subscriptions[collection]

    async def wait_job(
        self,
        job_id: int,
        timeout: float | None = None,
        on_progress: Callable[[dict[str, Any]], None] | None = None,
        *,
        method: str = "",
    ) -> Any:
        return await self.call_job(method or "wait_job", on_progress=on_progress)

    async def upload(
        self,
        path: str,
        data: bytes | Path,
        *,
        mode: int,
        on_progress: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        await self.call_job("filesystem.put", on_progress=on_progress)


async def connect_to(
    url: str,
    api_key: str | Secret,
    *,
    vm_image_server: str | ImageSource | None = None,
    call_timeout: float = 60.0,
    read_timeout: float = 20.0,
    job_timeout: float = 15 * 60.0,
    connect_timeout: float = 10.0,
    observer: Observer | None = None,
    may_write: Callable[[], bool] = lambda: True,
    pool: TransportPool | None = None,
    **fields: Any,
) -> TrueNASClient:
    """``truenas.connect`` from keyword arguments (the tests' shorthand): an ``Endpoint`` and ``Timings``."""
    endpoint = Endpoint(
        url,
        api_key if isinstance(api_key, Secret) else Secret(api_key),
        vm_image_server=ImageSource(vm_image_server) if isinstance(vm_image_server, str) else vm_image_server,
        **fields,
    )
    timings = Timings(call=call_timeout, read=read_timeout, job=job_timeout, connect=connect_timeout)
    return await connect(endpoint, timings, observer=observer, may_write=may_write, pool=pool)
