"""Memory after bursts: kopf's connections to the API server are bounded (BENCHMARKS.md)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import kopf
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from truenas_incus_operator.kube import _bounded_requests, kopf_login


async def test_kopf_talks_to_the_api_server_over_a_bounded_pool(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """kopf's own session has no bound (``limit=0``); ours caps the requests in flight (TIO_KUBE_CONNECTIONS)."""
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
        assert bounded.aiohttp_session.trace_configs, "the bound on requests in flight"
        assert bounded.aiohttp_session.headers["Authorization"] == "Bearer abc"
    finally:
        await bounded.aiohttp_session.close()
    assert kopf_login(settings, 0) is None, "0: kopf's own login and session"


async def test_at_most_the_bound_in_flight_and_watch_streams_never_wait() -> None:
    """Watch-streams hold their connection for minutes: were they counted, enough of them (one per
    kind and namespace) would leave no room for the patches."""
    in_flight = most = 0
    release = asyncio.Event()

    async def handler(request: web.Request) -> web.StreamResponse:
        nonlocal in_flight, most
        if request.query.get("watch") == "true":
            response = web.StreamResponse()
            await response.prepare(request)
            await release.wait()
            return response
        in_flight += 1
        most = max(most, in_flight)
        await asyncio.sleep(0.02)
        in_flight -= 1
        return web.json_response({})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    async with TestServer(app) as server:
        session = aiohttp.ClientSession(trace_configs=[_bounded_requests(3)])
        try:
            watches = [await session.get(server.make_url("/w"), params={"watch": "true"}) for _ in range(5)]
            patches = [session.patch(server.make_url(f"/p{i}")) for i in range(20)]
            async with asyncio.timeout(10):
                responses = await asyncio.gather(*patches)
            assert all(r.status == 200 for r in responses)
            assert most == 3, f"{most} requests at once"
            release.set()
            for watch in watches:
                watch.close()
            for response in responses:
                response.release()
        finally:
            await session.close()
