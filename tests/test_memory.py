"""Memory after bursts: the trim once the loops' writes settle (memory.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import kopf
import pytest

from truenas_incus_operator.kube import kopf_login
from truenas_incus_operator.memory import MemoryRelease, _glibc_trim

from .fakes import fake_operator, resource


class Stopped:
    """kopf's DaemonStopped, as far as the loop uses it."""

    def __init__(self) -> None:
        self.event = asyncio.Event()

    def __bool__(self) -> bool:
        return self.event.is_set()

    async def wait(self) -> bool:
        return await self.event.wait()


def counting(trims: list[int]) -> Callable[[], int]:
    def trim() -> int:
        trims.append(1)
        return 1

    return trim


async def test_the_trim_runs_once_after_activity_settles_not_during_it() -> None:
    trims: list[int] = []
    release = MemoryRelease(0.05, trim=counting(trims))
    for _ in range(5):  # a burst: activity keeps coming, the trim waits
        release.activity()
        await asyncio.sleep(0.02)
    assert trims == []
    await asyncio.sleep(0.1)
    assert trims == [1], "one trim, once quiet for the settle time"
    await asyncio.sleep(0.1)
    assert trims == [1], "nothing without new activity"
    release.activity()
    release.close()
    await asyncio.sleep(0.1)
    assert trims == [1], "close() cancels a pending trim"


async def test_settle_zero_never_trims() -> None:
    trims: list[int] = []
    release = MemoryRelease(0, trim=counting(trims))
    release.activity()
    await asyncio.sleep(0.02)
    assert trims == []


def test_glibc_trim_is_found_and_callable_here() -> None:
    trim = _glibc_trim()  # Debian (glibc), as the image
    assert trim is not None
    assert trim() in (0, 1)


async def test_a_burst_of_loops_converges_then_trims_once() -> None:
    fake = fake_operator(memory_release_seconds=0.05)
    trims: list[int] = []
    trimmed = asyncio.Event()

    def trim() -> int:
        trims.append(1)
        trimmed.set()
        return 1

    fake.operator.release.trim = trim
    in_pass = 0
    most = 0
    original = fake.operator.loops.reconcile_once

    async def counted(*args: object, **kwargs: object) -> float:
        nonlocal in_pass, most
        in_pass += 1
        most = max(most, in_pass)
        try:
            await asyncio.sleep(0.001)  # let the others try to enter
            return await original(*args, **kwargs)  # type: ignore[arg-type]
        finally:
            in_pass -= 1

    fake.operator.loops.reconcile_once = counted  # type: ignore[method-assign]
    stopped = Stopped()
    bodies = [resource(f"web{i:02d}", instance=f"web{i:02d}") for i in range(20)]
    tasks = [asyncio.create_task(fake.operator.loops.run(body, stopped)) for body in bodies]
    try:
        async with asyncio.timeout(10):
            await trimmed.wait()  # the writes settled
    finally:
        stopped.event.set()
        await asyncio.gather(*tasks)
    assert all(fake.kube.statuses(b["metadata"]["name"])[-1].get("phase") == "Running" for b in bodies)
    assert most > 1, "the loops ran passes concurrently (a burst)"
    assert len(fake.backend.instances) == 20
    assert trims == [1], "one trim after the burst settled"


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
