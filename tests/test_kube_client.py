"""The real ``Kube`` client against a fake API server over HTTP (issue 22 item 5: the tests used a
subclass that overrode every method): the ledger's conditional writes as the API server answers
them, 404 and 409 with resourceVersion preconditions, through the client's own request path."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import BaseTestServer, TestServer

from truenas_incus_operator.kube import Kube
from truenas_incus_operator.problems import OperatorError

NS = "tio-system"


class ConfigMaps:
    """ConfigMaps as the API server keeps them: resourceVersion per write, 409 on a name taken or a
    stale version (PUT, or DELETE with a precondition), 404 on a missing one."""

    def __init__(self) -> None:
        self.objects: dict[str, dict[str, Any]] = {}
        self.version = 100

    def _stamp(self, body: dict[str, Any]) -> dict[str, Any]:
        self.version += 1
        body = json.loads(json.dumps(body))
        body.setdefault("metadata", {})["resourceVersion"] = str(self.version)
        return body

    @staticmethod
    def _status(code: int, reason: str) -> web.Response:
        return web.json_response({"kind": "Status", "code": code, "reason": reason}, status=code)

    async def handle(self, request: web.Request) -> web.Response:
        name = request.match_info.get("name", "")
        body: dict[str, Any] = (await request.json() if request.can_read_body else None) or {}
        if request.method == "POST":
            name = body["metadata"]["name"]
            if name in self.objects:
                return self._status(409, "AlreadyExists")
            self.objects[name] = self._stamp(body)
            return web.json_response(self.objects[name], status=201)
        current = self.objects.get(name)
        if current is None:
            return self._status(404, "NotFound")
        if request.method == "GET":
            return web.json_response(current)
        if request.method == "PUT":
            if body["metadata"].get("resourceVersion") != current["metadata"]["resourceVersion"]:
                return self._status(409, "Conflict")
            self.objects[name] = self._stamp(body)
            return web.json_response(self.objects[name])
        if request.method == "DELETE":
            wanted = (body.get("preconditions") or {}).get("resourceVersion")
            if wanted and wanted != current["metadata"]["resourceVersion"]:
                return self._status(409, "Conflict")
            del self.objects[name]
            return web.json_response({"kind": "Status", "status": "Success"})
        return self._status(405, "MethodNotAllowed")


@pytest.fixture
async def served(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[tuple[Kube, ConfigMaps]]:
    store = ConfigMaps()
    app = web.Application()
    app.router.add_route("*", f"/api/v1/namespaces/{NS}/configmaps", store.handle)
    app.router.add_route("*", f"/api/v1/namespaces/{NS}/configmaps/{{name}}", store.handle)
    async with TestServer(app) as server:
        point_kubeconfig(server, tmp_path, monkeypatch)
        kube = Kube(timeout=5.0)
        try:
            yield kube, store
        finally:
            await kube.close()


def point_kubeconfig(server: BaseTestServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """KUBECONFIG naming ``server`` (a fake API server) with a token, for ``Kube``'s own login."""
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "c", "cluster": {"server": str(server.make_url("")).rstrip("/")}}],
        "users": [{"name": "u", "user": {"token": "a-token"}}],
        "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
        "current-context": "x",
    }
    path = tmp_path / "kubeconfig"
    path.write_text(json.dumps(config))
    monkeypatch.setenv("KUBECONFIG", str(path))


def manifest(name: str, version: str = "", **data: str) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": NS}
    if version:
        meta["resourceVersion"] = version
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": data}


async def test_a_taken_name_is_none_and_a_new_one_is_the_created_object(served: tuple[Kube, ConfigMaps]) -> None:
    kube, _ = served
    created = await kube.create_configmap(NS, manifest("owner", state="creating"))
    assert created is not None and created["metadata"]["resourceVersion"]
    assert await kube.create_configmap(NS, manifest("owner", state="creating")) is None  # 409: someone holds it


async def test_a_replace_of_a_stale_or_deleted_version_is_none(served: tuple[Kube, ConfigMaps]) -> None:
    kube, store = served
    created = await kube.create_configmap(NS, manifest("owner", state="creating"))
    assert created is not None
    version = created["metadata"]["resourceVersion"]
    joined = await kube.replace_configmap(NS, manifest("owner", version, state="creating", joins="1"))
    assert joined is not None and joined["data"]["joins"] == "1"
    assert await kube.replace_configmap(NS, manifest("owner", version, state="created")) is None  # 409: stale
    del store.objects["owner"]
    assert await kube.replace_configmap(NS, manifest("owner", version, state="created")) is None  # 404: gone


async def test_a_delete_on_a_changed_version_is_refused_and_a_missing_one_counts_as_deleted(
    served: tuple[Kube, ConfigMaps],
) -> None:
    kube, store = served
    created = await kube.create_configmap(NS, manifest("owner"))
    assert created is not None
    first = created["metadata"]["resourceVersion"]
    changed = await kube.replace_configmap(NS, manifest("owner", first, joins="1"))
    assert changed is not None
    with pytest.raises(OperatorError, match="changed while deleting it"):
        await kube.delete_configmap(NS, "owner", first)  # the claimer's release after a join: refused
    assert "owner" in store.objects
    await kube.delete_configmap(NS, "owner", changed["metadata"]["resourceVersion"])
    assert "owner" not in store.objects
    await kube.delete_configmap(NS, "owner")  # already gone: no error
    assert await kube.read_configmap(NS, "owner") is None
