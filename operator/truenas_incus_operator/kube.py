"""The few Kubernetes calls kopf does not make for us: status and annotation patches from the
reconcile loops, and reading the Secrets that TrueNASConnections name.

Uses the official ``kubernetes`` client (synchronous) in worker threads, so the event loop never
blocks. kopf posts the Events.
"""

from __future__ import annotations

import asyncio
import base64
from typing import Any

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from .models import API_GROUP, API_VERSION


class KubeError(Exception):
    """A Kubernetes API call failed; ``status`` is the HTTP status (0 when unreachable)."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


def load_config() -> client.ApiClient:
    """In-cluster service account when running in a pod, else the kubeconfig (KUBECONFIG)."""
    configuration = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
    except config.ConfigException:
        config.load_kube_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
    configuration.connection_pool_maxsize = 16
    return client.ApiClient(configuration)


class Kube:
    def __init__(self, api: client.ApiClient | None = None) -> None:
        self.api = api or load_config()
        self.custom = client.CustomObjectsApi(self.api)
        self.core = client.CoreV1Api(self.api)

    async def _run(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return await asyncio.to_thread(fn, *args, **kwargs)
        except ApiException as exc:
            raise KubeError(f"Kubernetes API: {exc.status} {exc.reason}", exc.status or 0) from None
        except Exception as exc:  # urllib3 errors: connection refused, timeouts
            raise KubeError(f"Kubernetes API unreachable: {type(exc).__name__}") from None

    async def patch_status(self, plural: str, namespace: str, name: str, status: dict[str, Any]) -> None:
        await self._run(
            self.custom.patch_namespaced_custom_object_status,
            API_GROUP,
            API_VERSION,
            namespace,
            plural,
            name,
            {"status": status},
        )

    async def patch_annotations(
        self, plural: str, namespace: str, name: str, annotations: dict[str, str | None]
    ) -> None:
        await self._run(
            self.custom.patch_namespaced_custom_object,
            API_GROUP,
            API_VERSION,
            namespace,
            plural,
            name,
            {"metadata": {"annotations": annotations}},
        )

    async def read_secret_key(self, namespace: str, name: str, key: str) -> str:
        secret = await self._run(self.core.read_namespaced_secret, name, namespace)
        data = secret.data or {}
        if key not in data:
            raise KubeError(f"Secret {namespace}/{name} has no key {key!r}", 404)
        return base64.b64decode(data[key]).decode().strip()

    def close(self) -> None:
        self.api.close()  # type: ignore[no-untyped-call]
