"""The few Kubernetes calls kopf does not make for us: status and annotation patches from the
reconcile loops, the ownership ledger's ConfigMaps, the leader election's Lease, and reading the
Secrets that TrueNASConnections name (whether the operator may use one is
``connections/config.py``'s decision), and the Events the operator posts (``Events``: as the
operator, not as kopf).

Plain HTTP calls over aiohttp (already there for kopf), logged in with kopf's own helpers
(in-cluster service account, else the kubeconfig). The official ``kubernetes`` client would do the
same from worker threads; it is left out on purpose: it costs ~20 MB of imports (kopf imports it
whenever it is installed) and per-thread malloc arenas that grew the operator by ~80 KB per
IncusInstance in our benchmarks (BENCHMARKS.md).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
import re
import ssl
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import kopf

from .models import API_GROUP, API_VERSION
from .problems import OperatorError, Problem, Reason, fail

log = logging.getLogger(__name__)
CONNECTIONS = 8
"""The operator's own requests to the API server at once (status, ledger, Events, Services): every TLS
connection keeps a 128 KiB read buffer and OpenSSL's state after a burst. At 200 resources, just after
creating them: kopf's 32 and 16 of these 96.9 MB, kopf's 8 and 16 92.2 MB, 8 and 8 88.4 MB; no burst
was slower (BENCHMARKS.md, "Scale round 2")."""
MERGE_PATCH = {"Content-Type": "application/merge-patch+json"}
MANAGER = "?fieldManager=truenas-incus-operator"
"""Who wrote spec.expose's objects, as their managedFields say."""
EXPOSED_KINDS = {"services": "/api/v1", "endpointslices": "/apis/discovery.k8s.io/v1"}
EVENT_COMPONENT = "truenas-incus-operator"
"""Who reports the operator's Events (``kubectl describe``'s From, ``reportingComponent``)."""
KUBE_REASON = Reason.KUBERNETES_ERROR
_GONE = Problem(Reason.NOT_FOUND, "the object does not exist")
_FORBIDDEN = Problem(KUBE_REASON, "Kubernetes API: 403 Forbidden")
_EXPOSE_FORBIDDEN = Problem(
    KUBE_REASON, "Kubernetes API: 403 Forbidden: the operator's RBAC does not cover services and endpointslices here"
)
"""spec.expose's refusals, said without the API server's text (it names the operator's ServiceAccount)."""


class _Conflict(Exception):
    """409: the object exists already, or changed since it was read."""


class Fence:
    """Writes to TrueNAS and to the ledger happen only while the Lease is proven (with
    ``TIO_LEADER_ELECTION``; without it the fence is open). The elector arms it once it leads; every
    write re-checks it, so a leader that was paused (SIGSTOP, a stalled event loop, a long GC) past
    its renew deadline refuses to write before the watchdog thread has even noticed."""

    def __init__(self) -> None:
        self._proven: Callable[[], bool] | None = None
        self._where = ""

    def arm(self, proven: Callable[[], bool], where: str) -> None:
        self._proven, self._where = proven, where

    def disarm(self) -> None:
        self._proven = None

    def is_open(self) -> bool:
        """Whether writes may go now (no election, or the Lease proven)."""
        return self._proven is None or self._proven()

    def check(self) -> None:
        """Raises ``OperatorError`` (LeaseNotHeld) when the election is on and the Lease is not proven."""
        if self._proven is not None and not self._proven():
            raise fail(Reason.LEASE_NOT_HELD, f"the {self._where} is not proven held: no writes until it is renewed")


FENCE = Fence()
"""The process's one fence (election.py arms it; the executor, the deletion and the ledger's
writes check it)."""


def _pem(data: str | bytes | None) -> bytes | None:
    """kubeconfig ``*-data`` fields are base64 of the PEM."""
    if data is None:
        return None
    raw = data.encode() if isinstance(data, str) else data
    return raw if raw.lstrip().startswith(b"-----BEGIN") else base64.b64decode(raw)


@dataclass(frozen=True)
class SecretObject:
    """A Secret as the API returns it: ``data`` holds base64, and never shows in ``repr``."""

    namespace: str
    name: str
    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)
    data: Mapping[str, str] = field(default_factory=dict, repr=False)

    def text(self, key: str) -> str:
        """One key as text, surrounding whitespace removed; raises ``OperatorError``
        (SecretNotFound, SecretUnreadable)."""
        where = f"Secret {self.namespace}/{self.name}"
        if key not in self.data:
            raise fail(Reason.SECRET_NOT_FOUND, f"{where} has no key {key!r}")
        try:
            return base64.b64decode(self.data[key]).decode().strip()
        except (ValueError, UnicodeDecodeError):
            raise fail(Reason.SECRET_UNREADABLE, f"{where} key {key!r} is not UTF-8 text") from None


def kopf_login(settings: kopf.OperatorSettings, requests: int) -> kopf.AiohttpSession | None:
    """kopf's own login (service account, else kubeconfig), with at most ``requests`` API requests in
    flight at once, watch-streams apart.

    kopf's built-in session has no bound (``TCPConnector(limit=0)``): a burst of 1000 creates opens
    hundreds of TLS connections to the API server at once (finalizer patches, Events), each with a
    128 KiB asyncio buffer and OpenSSL's own, and the process keeps that memory afterwards
    (BENCHMARKS.md, "Memory after bursts"). A bound on the pool itself would not do: every
    watch-stream holds a connection for as long as it runs (one per resource kind, per namespace with
    ``-n``), so enough of them would leave no connection for the patches. 0: kopf's own session."""
    info = kopf.login_with_service_account(settings=settings) or kopf.login_with_kubeconfig(settings=settings)
    if info is None or not requests:
        return None
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, ssl=info.as_ssl_context()),
        headers=info.as_http_headers(),
        trust_env=info.trust_env,
        trace_configs=[_bounded_requests(requests)],
    )
    return kopf.AiohttpSession(
        server=info.server,
        default_namespace=info.default_namespace,
        expiration=info.expiration,
        aiohttp_session=session,
    )


def _bounded_requests(limit: int) -> aiohttp.TraceConfig:
    """Lets at most ``limit`` requests wait for their response at once; watch-streams pass freely.

    aiohttp awaits ``on_request_start`` before it takes a connection, and sends exactly one of
    ``on_request_end`` / ``on_request_exception`` for every request whose start completed."""
    gate = asyncio.Semaphore(limit)

    async def start(session: aiohttp.ClientSession, ctx: Any, params: aiohttp.TraceRequestStartParams) -> None:
        if params.url.query.get("watch") == "true":
            return
        await gate.acquire()
        ctx.holds = True

    async def end(session: aiohttp.ClientSession, ctx: Any, params: Any) -> None:
        if getattr(ctx, "holds", False):
            ctx.holds = False
            gate.release()

    config = aiohttp.TraceConfig()
    config.on_request_start.append(start)
    config.on_request_end.append(end)
    config.on_request_exception.append(end)
    return config


def credentials(prefer_kubeconfig: bool = False) -> Any:
    """kopf's ConnectionInfo: the pod's service account, else the kubeconfig (the operator, as kopf
    does); ``prefer_kubeconfig``: the kubeconfig, else the service account (a user's command, as
    kubectl does: inside a pod with a mounted token, ``kubectl truenas`` still acts as its user)."""
    settings = kopf.OperatorSettings()
    order = (kopf.login_with_kubeconfig, kopf.login_with_service_account)
    for login in order if prefer_kubeconfig else order[::-1]:
        info = login(settings=settings)
        if info is not None:
            return info
    return None


class Kube:
    def __init__(self, timeout: float = 60.0, prefer_kubeconfig: bool = False) -> None:
        self.timeout = timeout
        """Seconds for one request, answer included (``TIO_KUBE_TIMEOUT_SECONDS``)."""
        self.prefer_kubeconfig = prefer_kubeconfig
        """A user's command (the plugin, import): the kubeconfig before a service account (``credentials``)."""
        self._session: aiohttp.ClientSession | None = None
        self._server = ""

    def _login(self) -> tuple[str, ssl.SSLContext, dict[str, str]]:
        info = credentials(self.prefer_kubeconfig)
        if info is None:
            raise fail(KUBE_REASON, "no Kubernetes credentials: neither a service account nor a kubeconfig")
        ca = _pem(info.ca_data)
        if ca is not None:
            context = ssl.create_default_context(cadata=ca.decode())
        elif info.ca_path:
            context = ssl.create_default_context(cafile=os.fsdecode(info.ca_path))
        else:
            context = ssl.create_default_context()
        if info.insecure:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        if info.certificate_data and info.private_key_data:
            # OpenSSL reads a client key only from a file: written for the load, removed at once (a
            # re-login after a 401 leaves nothing behind either).
            files = [self._secret_file(_pem(info.certificate_data)), self._secret_file(_pem(info.private_key_data))]
            try:
                context.load_cert_chain(files[0], files[1])
            finally:
                _remove(files)
        elif info.certificate_path and info.private_key_path:
            context.load_cert_chain(os.fsdecode(info.certificate_path), os.fsdecode(info.private_key_path))
        headers = {"Authorization": f"Bearer {info.token}"} if info.token else {}
        return info.server.rstrip("/"), context, headers

    @staticmethod
    def _secret_file(data: bytes | None) -> str:
        handle, path = tempfile.mkstemp(prefix="tio-kube-")  # mode 0600
        with os.fdopen(handle, "wb") as f:
            f.write(data or b"")
        return path

    async def _request(
        self,
        method: str,
        path: str,
        json: Any = None,
        headers: dict[str, str] | None = None,
        not_found: Problem | None = None,
        conflict_ok: bool = False,
        forbidden: Problem | None = None,
        explain: bool = False,
    ) -> dict[str, Any]:
        """The answer, a JSON object. Raises ``OperatorError`` only (the one boundary of this edge):
        ``not_found`` for a 404 when given, else reason KubernetesError (unreachable, timed out, an
        error status, an answer that is not a JSON object); with ``conflict_ok`` a 409 raises
        ``_Conflict`` for the caller to handle; ``explain``: an error carries the API server's own message
        (an admission refusal, for a user at a terminal: ``kubectl truenas``)."""
        try:
            return await self._attempts(method, path, json, headers, not_found, conflict_ok, forbidden, explain)
        except (OperatorError, _Conflict):
            raise
        except TimeoutError:
            raise fail(KUBE_REASON, f"Kubernetes API: no answer within {self.timeout:.0f} s") from None
        except aiohttp.ClientError as exc:
            raise fail(KUBE_REASON, f"Kubernetes API unreachable: {type(exc).__name__}") from None
        except OSError as exc:
            raise fail(KUBE_REASON, f"Kubernetes API unreachable: {type(exc).__name__}") from None
        except Exception as exc:  # a login that failed, an answer we cannot read: never past this edge
            raise fail(KUBE_REASON, f"Kubernetes API: {type(exc).__name__}") from None

    async def _attempts(
        self,
        method: str,
        path: str,
        json: Any,
        headers: dict[str, str] | None,
        not_found: Problem | None,
        conflict_ok: bool,
        forbidden: Problem | None = None,
        explain: bool = False,
    ) -> dict[str, Any]:
        for attempt in (1, 2):
            if self._session is None:
                server, context, auth = self._login()
                self._server = server
                self._session = aiohttp.ClientSession(
                    headers=auth,
                    connector=aiohttp.TCPConnector(ssl=context, limit=CONNECTIONS),
                    timeout=aiohttp.ClientTimeout(total=self.timeout),
                )
            async with self._session.request(method, self._server + path, json=json, headers=headers) as response:
                if response.status == 401 and attempt == 1:
                    await self._reset()  # a rotated service-account token: log in again
                    continue
                if response.status == 404 and not_found is not None:
                    raise OperatorError(not_found)
                if response.status == 409 and conflict_ok:
                    raise _Conflict()
                if response.status == 403 and forbidden is not None:
                    raise OperatorError(forbidden)
                if response.status >= 400:
                    said = ""
                    if explain:
                        with contextlib.suppress(Exception):
                            body = await response.json(content_type=None)
                            said = f": {_printable(body.get('message'), 600)}" if isinstance(body, dict) else ""
                    raise fail(KUBE_REASON, f"Kubernetes API: {response.status} {_clean(response.reason)}{said}")
                try:
                    answer = await response.json(content_type=None)
                except ValueError:
                    raise fail(KUBE_REASON, f"Kubernetes API: {response.status} with a body that is not JSON") from None
                if not isinstance(answer, dict):
                    raise fail(KUBE_REASON, "Kubernetes API: the answer is not a JSON object")
                return answer
        raise fail(KUBE_REASON, "Kubernetes API: 401 Unauthorized")

    async def _reset(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @staticmethod
    def _object_path(plural: str, namespace: str, name: str) -> str:
        return f"/apis/{API_GROUP}/{API_VERSION}/namespaces/{quote(namespace)}/{plural}/{quote(name)}"

    async def patch_status(self, plural: str, namespace: str, name: str, status: dict[str, Any]) -> None:
        await self._request(
            "PATCH", self._object_path(plural, namespace, name) + "/status", {"status": status}, MERGE_PATCH
        )

    async def patch_annotations(
        self, plural: str, namespace: str, name: str, annotations: dict[str, str | None], explain: bool = False
    ) -> None:
        body = {"metadata": {"annotations": annotations}}
        await self._request("PATCH", self._object_path(plural, namespace, name), body, MERGE_PATCH, explain=explain)

    # ----- ConfigMaps (the ownership ledger, in the operator's own namespace) ---------------------
    async def list_configmaps(self, namespace: str, label_selector: str) -> list[dict[str, Any]]:
        missing = Problem(
            Reason.LEDGER_UNAVAILABLE, f"namespace {namespace} does not exist (the ownership ledger lives there)"
        )
        found = await self._request(
            "GET",
            f"/api/v1/namespaces/{quote(namespace)}/configmaps?labelSelector={quote(label_selector)}",
            not_found=missing,
        )
        items = found.get("items") or []
        if not isinstance(items, list) or not all(isinstance(item, dict) for item in items):
            raise fail(KUBE_REASON, "Kubernetes API: a ConfigMap list that is not a list of objects")
        return items

    async def create_configmap(self, namespace: str, body: dict[str, Any]) -> dict[str, Any] | None:
        """The created object, or None when one of that name exists already (409)."""
        FENCE.check()
        try:
            created: dict[str, Any] = await self._request(
                "POST", f"/api/v1/namespaces/{quote(namespace)}/configmaps", body, conflict_ok=True
            )
        except _Conflict:
            return None
        return created

    async def _get(self, path: str) -> dict[str, Any] | None:
        """The object at ``path``, or None on a 404; every other failure raises as ``_request`` does."""
        try:
            return await self._request("GET", path, not_found=_GONE)
        except OperatorError as exc:
            if exc.problem is _GONE:
                return None
            raise

    async def read_configmap(self, namespace: str, name: str) -> dict[str, Any] | None:
        return await self._get(f"/api/v1/namespaces/{quote(namespace)}/configmaps/{quote(name)}")

    async def replace_configmap(self, namespace: str, body: dict[str, Any]) -> dict[str, Any] | None:
        """Optimistic update (``metadata.resourceVersion`` must match); None when it changed meanwhile
        (a 409) or is gone (a 404): either way the caller reads it again."""
        FENCE.check()
        name = body["metadata"]["name"]
        try:
            replaced: dict[str, Any] = await self._request(
                "PUT",
                f"/api/v1/namespaces/{quote(namespace)}/configmaps/{quote(name)}",
                body,
                not_found=_GONE,
                conflict_ok=True,
            )
        except _Conflict:
            return None
        except OperatorError as exc:
            if exc.problem is _GONE:
                return None
            raise
        return replaced

    async def delete_configmap(self, namespace: str, name: str, resource_version: str | None = None) -> None:
        """Deletes (only that version, when given); a missing object counts as deleted."""
        options = {"preconditions": {"resourceVersion": resource_version}} if resource_version else None
        FENCE.check()
        try:
            await self._request(
                "DELETE",
                f"/api/v1/namespaces/{quote(namespace)}/configmaps/{quote(name)}",
                options,
                not_found=_GONE,
                conflict_ok=True,
            )
        except OperatorError as exc:
            if exc.problem is not _GONE:
                raise
        except _Conflict:
            raise fail(KUBE_REASON, f"ConfigMap {namespace}/{name} changed while deleting it") from None

    # ----- Leases (leader election, in the operator's own namespace) -------------------------------
    @staticmethod
    def _lease_path(namespace: str, name: str = "") -> str:
        path = f"/apis/coordination.k8s.io/v1/namespaces/{quote(namespace)}/leases"
        return f"{path}/{quote(name)}" if name else path

    async def read_lease(self, namespace: str, name: str) -> dict[str, Any] | None:
        return await self._get(self._lease_path(namespace, name))

    async def create_lease(self, namespace: str, body: dict[str, Any]) -> dict[str, Any] | None:
        """The created Lease, or None when another candidate created it first (409)."""
        try:
            created: dict[str, Any] = await self._request("POST", self._lease_path(namespace), body, conflict_ok=True)
        except _Conflict:
            return None
        return created

    async def replace_lease(self, namespace: str, body: dict[str, Any]) -> dict[str, Any] | None:
        """Optimistic update (``metadata.resourceVersion`` must match); None when another wrote it meanwhile."""
        try:
            replaced: dict[str, Any] = await self._request(
                "PUT", self._lease_path(namespace, body["metadata"]["name"]), body, conflict_ok=True
            )
        except _Conflict:
            return None
        return replaced

    async def read_secret(self, namespace: str, name: str) -> SecretObject:
        """A Secret, its labels and annotations; raises ``OperatorError`` (SecretNotFound)."""
        missing = Problem(Reason.SECRET_NOT_FOUND, f"Secret {namespace}/{name} does not exist")
        secret = await self._request(
            "GET", f"/api/v1/namespaces/{quote(namespace)}/secrets/{quote(name)}", not_found=missing
        )
        meta = secret.get("metadata") or {}
        try:
            return SecretObject(
                namespace,
                name,
                labels=_strings(meta.get("labels")),
                annotations=_strings(meta.get("annotations")),
                data=_strings(secret.get("data")),
            )
        except (AttributeError, TypeError, ValueError):
            raise fail(KUBE_REASON, f"Kubernetes API: Secret {namespace}/{name} is not shaped as a Secret") from None

    # ----- startup preconditions (app.check_preconditions) ----------------------------------------
    async def server_version(self) -> tuple[int, int] | None:
        """The API server's Kubernetes version (major, minor) from /version (every client may read
        it); None when it does not say (a minor such as "31+" reads as 31)."""
        found = await self._optional("GET", "/version")
        major = re.match(r"[0-9]+", str((found or {}).get("major") or ""))
        minor = re.match(r"[0-9]+", str((found or {}).get("minor") or ""))
        return (int(major.group()), int(minor.group())) if major and minor else None

    async def served_resources(self, group_version: str) -> set[str] | None:
        """The resources the API server serves under ``group/version`` (discovery; every
        authenticated user may read it), or None when it serves no such version."""
        found = await self._optional("GET", f"/apis/{group_version}")
        if found is None:
            return None
        resources = found.get("resources") or []
        return {str(r.get("name")) for r in resources if isinstance(r, dict)} if isinstance(resources, list) else set()

    async def namespace_exists(self, namespace: str) -> bool | None:
        """Whether ``namespace`` exists, told by a dry-run ConfigMap create (nothing is stored; the
        operator may create ConfigMaps there, not read namespaces): 404 when it does not exist.
        None when the identity may not create ConfigMaps there (403: the RBAC check says so)."""
        probe = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"generateName": "tio-preflight-"}}
        path = f"/api/v1/namespaces/{quote(namespace)}/configmaps?dryRun=All"
        try:
            return await self._optional("POST", path, probe) is not None
        except OperatorError as exc:
            if exc.problem is _FORBIDDEN:
                return None
            raise

    async def create_namespace(self, namespace: str) -> None:
        body = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}}
        try:
            await self._request("POST", "/api/v1/namespaces", body, conflict_ok=True)
        except _Conflict:
            return  # created meanwhile (another replica): as good

    async def may(
        self, verb: str, group: str, resource: str, namespace: str = "", name: str = "", subresource: str = ""
    ) -> bool:
        """A SelfSubjectAccessReview: whether the operator's own identity may do this."""
        attributes = {
            "verb": verb,
            "group": group,
            "resource": resource,
            "namespace": namespace,
            "name": name,
            "subresource": subresource,
        }
        review = {
            "apiVersion": "authorization.k8s.io/v1",
            "kind": "SelfSubjectAccessReview",
            "spec": {"resourceAttributes": {k: v for k, v in attributes.items() if v}},
        }
        answer = await self._request("POST", "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews", review)
        status = answer.get("status")
        return isinstance(status, dict) and status.get("allowed") is True

    async def _optional(self, method: str, path: str, body: Any = None) -> dict[str, Any] | None:
        try:
            return await self._request(method, path, body, not_found=_GONE, forbidden=_FORBIDDEN)
        except OperatorError as exc:
            if exc.problem is _GONE:
                return None
            raise

    async def create_event(self, namespace: str, event: dict[str, Any]) -> None:
        await self._request("POST", f"/api/v1/namespaces/{quote(namespace)}/events", event)

    # ----- the operator's own Secret (credential copies, in its namespace) --------------------------
    async def read_secret_manifest(self, namespace: str, name: str) -> dict[str, Any] | None:
        """The whole Secret (with ``resourceVersion``), or None when it does not exist."""
        return await self._get(f"/api/v1/namespaces/{quote(namespace)}/secrets/{quote(name)}")

    async def create_secret(self, namespace: str, body: dict[str, Any]) -> dict[str, Any] | None:
        """The created Secret, or None when one of that name exists already (409)."""
        try:
            created: dict[str, Any] = await self._request(
                "POST", f"/api/v1/namespaces/{quote(namespace)}/secrets", body, conflict_ok=True
            )
        except _Conflict:
            return None
        return created

    async def replace_secret(self, namespace: str, body: dict[str, Any]) -> dict[str, Any] | None:
        """Optimistic update (``metadata.resourceVersion`` must match); None when it changed meanwhile."""
        name = body["metadata"]["name"]
        try:
            replaced: dict[str, Any] = await self._request(
                "PUT", f"/api/v1/namespaces/{quote(namespace)}/secrets/{quote(name)}", body, conflict_ok=True
            )
        except _Conflict:
            return None
        return replaced

    # ----- spec.expose's Services and EndpointSlices (instances/exposure.py), in the resource's namespace --------
    @staticmethod
    def _exposed_path(kind: str, namespace: str, name: str = "") -> str:
        base = EXPOSED_KINDS[kind]
        path = f"{base}/namespaces/{quote(namespace)}/{kind}"
        return f"{path}/{quote(name)}" if name else path

    async def read_exposed(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        """A Service or an EndpointSlice (``kind``: services, endpointslices), or None when there is none."""
        try:
            return await self._request(
                "GET", self._exposed_path(kind, namespace, name), not_found=_GONE, forbidden=_EXPOSE_FORBIDDEN
            )
        except OperatorError as exc:
            if exc.problem is _GONE:
                return None
            raise

    async def create_exposed(self, kind: str, namespace: str, body: dict[str, Any]) -> dict[str, Any] | None:
        """Creates it; None when one of that name exists already (409: never written over)."""
        FENCE.check()
        try:
            created: dict[str, Any] = await self._request(
                "POST",
                self._exposed_path(kind, namespace) + MANAGER,
                body,
                conflict_ok=True,
                explain=True,
                forbidden=_EXPOSE_FORBIDDEN,
            )
        except _Conflict:
            return None
        return created

    async def replace_exposed(self, kind: str, namespace: str, body: dict[str, Any]) -> dict[str, Any] | None:
        """Optimistic update of the operator's own object (``metadata.resourceVersion`` must match): None
        when it changed or went meanwhile (a 409 or a 404): either way the caller reads it again."""
        FENCE.check()
        name = body["metadata"]["name"]
        try:
            replaced: dict[str, Any] = await self._request(
                "PUT",
                self._exposed_path(kind, namespace, name) + MANAGER,
                body,
                not_found=_GONE,
                conflict_ok=True,
                explain=True,
                forbidden=_EXPOSE_FORBIDDEN,
            )
        except _Conflict:
            return None
        except OperatorError as exc:
            if exc.problem is _GONE:
                return None
            raise
        return replaced

    async def delete_exposed(self, kind: str, namespace: str, name: str, uid: str) -> None:
        """Deletes that very object (``uid``: not one made again meanwhile); a missing one counts as deleted."""
        FENCE.check()
        options = {"preconditions": {"uid": uid}}
        try:
            await self._request(
                "DELETE",
                self._exposed_path(kind, namespace, name),
                options,
                not_found=_GONE,
                conflict_ok=True,
                forbidden=_EXPOSE_FORBIDDEN,
            )
        except OperatorError as exc:
            if exc.problem is not _GONE:
                raise
        except _Conflict:
            return  # another object of that name now: not ours to delete

    async def read_incus_instance(self, namespace: str, name: str) -> dict[str, Any] | None:
        """An IncusInstance, or None when it does not exist (the ledger's reaper asks)."""
        return await self._get(
            f"/apis/{API_GROUP}/{API_VERSION}/namespaces/{quote(namespace)}/incusinstances/{quote(name)}"
        )

    async def read_object(self, plural: str, namespace: str, name: str) -> dict[str, Any] | None:
        """One of the operator's own kinds (``incusinstancesnapshots``, ...), or None when it does not exist."""
        return await self._get(self._object_path(plural, namespace, name))

    async def list_objects(self, plural: str, namespace: str) -> list[dict[str, Any]]:
        """Every object of one of the operator's own kinds in ``namespace`` (a few, never paged); none
        when the kind is not served (its CRD deleted or not installed)."""
        found = await self._get(f"/apis/{API_GROUP}/{API_VERSION}/namespaces/{quote(namespace)}/{plural}")
        if found is None:
            return []
        items = found.get("items") or []
        if not isinstance(items, list) or not all(isinstance(item, dict) for item in items):
            raise fail(KUBE_REASON, f"Kubernetes API: a {plural} list that is not a list of objects")
        return items

    async def create_object(self, plural: str, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        """Creates one of the operator's own kinds (``kubectl truenas snapshot``); refusals carry the API
        server's message (admission's)."""
        path = f"/apis/{API_GROUP}/{API_VERSION}/namespaces/{quote(namespace)}/{plural}"
        return await self._request("POST", path, body, explain=True)

    async def list_events(
        self, namespace: str, name: str, kind: str | None = None, uid: str | None = None
    ) -> list[dict[str, Any]]:
        """The Events about the object ``name`` in ``namespace``; with ``kind`` and ``uid``, only about
        that object (not another kind of the same name, nor an earlier object deleted and made again)."""
        fields = [f"involvedObject.name={name}"]
        fields += [f"involvedObject.kind={kind}"] if kind else []
        fields += [f"involvedObject.uid={uid}"] if uid else []
        selector = quote(",".join(fields))
        found = await self._request("GET", f"/api/v1/namespaces/{quote(namespace)}/events?fieldSelector={selector}")
        items = found.get("items") or []
        return [item for item in items if isinstance(item, dict)] if isinstance(items, list) else []

    async def list_instance_connections(
        self, namespace: str | None, page: int = 500, pages: int = 1000
    ) -> list[tuple[str, str, str | None]]:
        """Every IncusInstance in ``namespace`` (None: in every namespace) as (namespace, name, the
        TrueNASConnection its spec.connectionRef names, or None), read ``page`` at a time and kept
        only as that. A continuation that expired (410) starts over once; the kind not served (404),
        or more than ``pages`` pages (a server that never ends the list), is an error."""
        where = f"/namespaces/{quote(namespace)}" if namespace is not None else ""
        path = f"/apis/{API_GROUP}/{API_VERSION}{where}/incusinstances?limit={page}"
        found: list[tuple[str, str, str | None]] = []
        token = ""
        restarted = False
        for _ in range(pages):
            try:
                answer = await self._get(path + (f"&continue={quote(token)}" if token else ""))
            except OperatorError as exc:
                if not token or restarted or not exc.problem.message.startswith("Kubernetes API: 410 "):
                    raise
                found, token, restarted = [], "", True  # the list changed too much meanwhile: again
                continue
            if answer is None:  # not "none": the kind not served (a CRD being upgraded) proves nothing
                raise fail(KUBE_REASON, "Kubernetes API: incusinstances are not served (404)")
            items = answer.get("items")
            metadata = answer.get("metadata")
            if not isinstance(items, list) or not isinstance(metadata, dict):
                raise fail(KUBE_REASON, "Kubernetes API: an incusinstances list that is not a list of objects")
            found += (_connection_ref(item) for item in items)
            token = metadata.get("continue") or ""
            if not isinstance(token, str) or len(token) > 4096:
                raise fail(KUBE_REASON, "Kubernetes API: an incusinstances list with a continuation that is not one")
            if not token:
                return found
        raise fail(KUBE_REASON, f"Kubernetes API: an incusinstances list longer than {pages} pages of {page}")

    async def incus_instances_served(self, namespace: str) -> bool:
        """Whether the API server serves IncusInstances in ``namespace`` (a 404 there: the CRD is
        missing, so a 404 for one of them proves nothing)."""
        path = f"/apis/{API_GROUP}/{API_VERSION}/namespaces/{quote(namespace)}/incusinstances?limit=1"
        return await self._get(path) is not None

    async def close(self) -> None:
        await self._reset()


def _strings(value: Any) -> dict[str, str]:
    """A map of strings from the API (labels, annotations, a Secret's data); raises TypeError otherwise."""
    found = dict(value or {})
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in found.items()):
        raise TypeError("not a map of strings")
    return found


def _connection_ref(item: Any) -> tuple[str, str, str | None]:
    """(namespace, name, spec.connectionRef.name or None) of one listed IncusInstance."""
    metadata = item.get("metadata") if isinstance(item, dict) else None
    namespace = metadata.get("namespace") if isinstance(metadata, dict) else None
    name = metadata.get("name") if isinstance(metadata, dict) else None
    if not isinstance(namespace, str) or not isinstance(name, str):
        raise fail(KUBE_REASON, "Kubernetes API: an incusinstances list item without a namespace and name")
    spec = item.get("spec")
    reference = spec.get("connectionRef") if isinstance(spec, dict) else None
    connection = reference.get("name") if isinstance(reference, dict) else None
    return namespace, name, connection if isinstance(connection, str) and connection else None


def _printable(text: Any, limit: int) -> str:
    return "".join(ch for ch in str(text or "") if " " <= ch <= "~")[:limit]


def context_namespace() -> str:
    """The namespace of the kubeconfig's current context (a pod's own namespace), else ``default``:
    where ``kubectl truenas`` acts when no ``-n`` is given, as kubectl does."""
    info = credentials(prefer_kubeconfig=True)
    return (info.default_namespace if info is not None else None) or "default"


def _clean(text: str | None) -> str:
    """A status line's reason phrase, as the server sent it: printable ASCII, bounded."""
    return "".join(ch for ch in (text or "") if " " <= ch <= "~")[:80]


ACTION_BY_REASON = {
    "Created": "Create",
    "Adopted": "Adopt",
    "Deleted": "Delete",
    "DeleteFailed": "Delete",
    "InUse": "Delete",
}
"""An Event's ``action`` (what the operator was doing); anything else happened while reconciling."""


class Events:
    """Posts Events about an object as the operator: source and reportingComponent
    ``truenas-incus-operator``, reportingInstance the pod, and an ``action`` (kopf's own say ``kopf``,
    ``dev`` and ``Action?``). ``events(body, type, reason, message)`` never blocks and never raises:
    one task posts them in order; past ``limit`` waiting, more are dropped (and said so in the log)."""

    def __init__(self, kube: Kube, instance: str, limit: int = 1000) -> None:
        self.kube = kube
        self.instance = instance
        self.limit = limit
        self.dropped = 0
        self._queue: asyncio.Queue[tuple[str, dict[str, Any]]] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

    def __call__(self, body: Mapping[str, Any], kind: str, reason: str, message: str) -> None:
        meta = body.get("metadata") or {}
        namespace, name = str(meta.get("namespace") or "default"), str(meta.get("name") or "")
        if self._queue.qsize() >= self.limit:
            self.dropped += 1
            log.warning("dropped an Event (%s %s on %s/%s): %d waiting", kind, reason, namespace, name, self.limit)
            return
        now = datetime.now(UTC)
        stamp = now.strftime("%Y-%m-%dT%H:%M:%SZ")
        event = {
            "metadata": {"generateName": f"{name}.", "namespace": namespace},
            "involvedObject": {
                "apiVersion": body.get("apiVersion"),
                "kind": body.get("kind"),
                "name": name,
                "namespace": namespace,
                "uid": meta.get("uid"),
            },
            "type": kind,
            "reason": reason,
            "message": message[:1024],
            "action": ACTION_BY_REASON.get(reason, "Reconcile"),
            "source": {"component": EVENT_COMPONENT},
            "reportingComponent": EVENT_COMPONENT,
            "reportingInstance": self.instance,
            "firstTimestamp": stamp,
            "lastTimestamp": stamp,
            "eventTime": now.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            "count": 1,
        }
        self._queue.put_nowait((namespace, event))
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._post(), name="events")

    async def _post(self) -> None:
        while not self._queue.empty():
            namespace, event = self._queue.get_nowait()
            try:
                await self.kube.create_event(namespace, event)
            except OperatorError as exc:
                log.warning("cannot post an Event (%s): %s", event["reason"], exc.problem.message)

    async def close(self) -> None:
        """Posts what is waiting (bounded by the API's own timeouts), then stops."""
        if self._task is not None and not self._task.done():
            try:
                await asyncio.wait_for(asyncio.shield(self._task), 5)
            except TimeoutError:
                self._task.cancel()


def _remove(paths: list[str]) -> None:
    for path in paths:
        Path(path).unlink(missing_ok=True)
