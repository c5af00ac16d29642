"""Memory after bursts: kopf's connections to the API server are bounded (BENCHMARKS.md)."""

from __future__ import annotations

from pathlib import Path

import kopf
import pytest

from truenas_incus_operator.kube import kopf_login


async def test_kopf_talks_to_the_api_server_over_a_bounded_pool(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """kopf's own session has no bound (``limit=0``); ours caps it (TIO_KUBE_CONNECTIONS)."""
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: c\n"
        "clusters: [{name: k, cluster: {server: 'https://127.0.0.1:6443', insecure-skip-tls-verify: true}}]\n"
        "users: [{name: u, user: {token: abc}}]\n"
        "contexts: [{name: c, context: {cluster: k, user: u, namespace: apps}}]\n"
    )
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    settings = kopf.OperatorSettings()
    bounded = kopf_login(settings, 32)
    assert isinstance(bounded, kopf.AiohttpSession)
    try:
        assert bounded.server == "https://127.0.0.1:6443" and bounded.default_namespace == "apps"
        assert bounded.aiohttp_session.connector is not None and bounded.aiohttp_session.connector.limit == 32
        assert bounded.aiohttp_session.headers["Authorization"] == "Bearer abc"
    finally:
        await bounded.aiohttp_session.close()
    assert kopf_login(settings, 0) is None, "0: kopf's own login and session"
