"""End-to-end helpers: the operator as a subprocess, simulators, and IncusInstance shortcuts."""

from __future__ import annotations

import base64
import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from truenas_simulator import Simulator, SimulatorThread
from truenas_simulator.images import write_mirror

from .conftest import Cluster, wait_until

__all__ = [
    "Chaos",
    "Harness",
    "OperatorProcess",
    "module_operator",
    "operator_env",
    "operator_with_simulator",
    "start_simulator",
    "unique",
    "wait_until",
]

GIB = 2**30


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


@dataclass
class OperatorProcess:
    """``python -m truenas_incus_operator run`` against the local control plane."""

    cluster: Cluster
    env: dict[str, str]
    log_path: Path
    args: list[str] = field(default_factory=lambda: ["-A"])
    process: subprocess.Popen[bytes] | None = None
    starts: int = 0

    def start(self) -> OperatorProcess:
        if "TIO_LEDGER_NAMESPACE" not in self.env:
            # Its own ownership ledger, kept across restarts of this operator (never shared with another test's).
            ledger = f"tio-ledger-{uuid.uuid4().hex[:8]}"
            self.cluster.kubectl("create", "namespace", ledger)
            self.env["TIO_LEDGER_NAMESPACE"] = ledger
        env = {**os.environ, "KUBECONFIG": str(self.cluster.kubeconfig), **self.env}
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "truenas_incus_operator", "run", "--verbose", *self.args],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        self.starts += 1
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def kill(self) -> None:
        """SIGKILL: no cleanup, no goodbye, as a node failure would."""
        if self.process is not None:
            self.process.kill()
            self.process.wait()
        self.process = None

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None


@dataclass
class Harness:
    cluster: Cluster
    sim: SimulatorThread
    operator: OperatorProcess
    workdir: Path

    # ----- IncusInstance shortcuts ---------------------------------------------------------------------
    def apply(
        self,
        namespace: str,
        name: str,
        spec: dict[str, Any],
        annotations: dict[str, str] | None = None,
        check: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        manifest: dict[str, Any] = {
            "apiVersion": "incus.truenas.io/v1alpha1",
            "kind": "IncusInstance",
            "metadata": {"name": name, **({"annotations": annotations} if annotations else {})},
            "spec": {"type": "CONTAINER", "image": "debian/bookworm", **spec},
        }
        result = self.cluster.apply(manifest, namespace)
        if check:
            assert result.returncode == 0, result.stderr
        return result

    def get(self, namespace: str, name: str) -> dict[str, Any]:
        return self.cluster.get("incusinstance", name, namespace)

    def exists(self, namespace: str, name: str) -> bool:
        result = self.cluster.kubectl("get", "incusinstance", name, "-n", namespace, "-o", "name", check=False)
        return result.returncode == 0

    def condition(self, namespace: str, name: str, kind: str) -> dict[str, Any]:
        for condition in self.get(namespace, name).get("status", {}).get("conditions", []):
            if condition["type"] == kind:
                return dict(condition)
        return {}

    def wait_status(
        self, namespace: str, name: str, what: str, predicate: Any, timeout: float = 30.0
    ) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            status = self.get(namespace, name).get("status") or {}
            return status if predicate(status) else None

        result: dict[str, Any] = self.cluster.wait_for(check, timeout=timeout, what=f"{namespace}/{name}: {what}")
        return result

    def wait_ready(self, namespace: str, name: str, timeout: float = 30.0) -> dict[str, Any]:
        return self.wait_status(namespace, name, "Ready=True", lambda s: _cond(s, "Ready") == "True", timeout)

    def wait_synced_false(self, namespace: str, name: str, reason: str, timeout: float = 30.0) -> dict[str, Any]:
        return self.wait_status(
            namespace,
            name,
            f"Synced=False/{reason}",
            lambda s: _cond(s, "Synced") == "False" and _reason(s, "Synced") == reason,
            timeout,
        )

    def events(self, namespace: str, name: str) -> list[dict[str, Any]]:
        out = self.cluster.kubectl(
            "get", "events", "-n", namespace, "--field-selector", f"involvedObject.name={name}", "-o", "json"
        ).stdout
        items: list[dict[str, Any]] = json.loads(out)["items"]
        return items

    def wait_event(self, namespace: str, name: str, reason: str, timeout: float = 30.0) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            return next((e for e in self.events(namespace, name) if e["reason"] == reason), None)

        result: dict[str, Any] = self.cluster.wait_for(check, timeout=timeout, what=f"Event {reason} on {name}")
        return result

    def delete(self, namespace: str, name: str, wait: bool = True) -> subprocess.CompletedProcess[str]:
        return self.cluster.kubectl(
            "delete",
            "incusinstance",
            name,
            "-n",
            namespace,
            f"--wait={str(wait).lower()}",
            "--timeout=60s",
            check=False,
        )

    # ----- simulator shortcuts ---------------------------------------------------------------------------
    def instance(self, name: str, sim: SimulatorThread | None = None) -> Any:
        """The instance (25.x) or container (26) named ``name`` on the simulator, or None."""
        target = sim or self.sim

        def find() -> Any:
            try:
                return target.sim.find(name)
            except Exception:
                return None

        return target.run(find)

    def instance_names(self, sim: SimulatorThread | None = None) -> set[str]:
        target = sim or self.sim
        return target.run(target.sim.names)

    def calls(self, sim: SimulatorThread | None = None) -> dict[str, int]:
        target = sim or self.sim
        return target.run(lambda: dict(target.sim.counters.by_method))

    def connect_namespace(
        self, namespace: str, sim: SimulatorThread, name: str = "nas", transport: str = "websocket"
    ) -> str:
        """A TrueNASConnection (with its key and CA Secrets) in ``namespace`` for ``sim``."""
        assert sim.ca_file is not None
        secret_key = secret_manifest(f"{name}-key", {"apiKey": sim.api_key}, labels=CREDENTIALS)
        secret_ca = secret_manifest(f"{name}-ca", {"ca.crt": sim.ca_file.read_text()}, labels=CREDENTIALS)
        connection = {
            "apiVersion": "incus.truenas.io/v1alpha1",
            "kind": "TrueNASConnection",
            "metadata": {"name": name},
            "spec": {
                "url": sim.ws_url if transport == "websocket" else sim.url,
                "transport": transport,
                "apiKeySecretRef": {"name": f"{name}-key", "key": "apiKey"},
                "tls": {"caSecretRef": {"name": f"{name}-ca", "key": "ca.crt"}},
            },
        }
        for manifest in (secret_key, secret_ca, connection):
            result = self.cluster.apply(manifest, namespace)
            assert result.returncode == 0, result.stderr
        return name


@dataclass
class Chaos:
    """SIGKILLs the operator at random moments (seeded, so a failure can be replayed)."""

    operator: OperatorProcess
    seed: int
    kills: int = 0

    def __post_init__(self) -> None:
        self.random = random.Random(self.seed)

    def rounds(self, count: int) -> None:
        for _ in range(count):
            time.sleep(self.random.uniform(0.2, 2.5))
            self.operator.kill()
            self.kills += 1
            self.operator.start()


ADOPT_ANYWHERE: dict[str, Any] = {"adoption": [{"namespaces": ["*"], "connections": ["*"]}]}
"""A policy for tests of the operator's mechanics: adoption allowed (tenancy tests use their own)."""


def write_policy(workdir: Path, policy: dict[str, Any]) -> dict[str, str]:
    """The administrator's policy as a file, and the environment that points the operator at it."""
    path = workdir / "policy.yaml"
    path.write_text(yaml.safe_dump(policy))
    return {"TIO_POLICY_FILE": str(path)}


def operator_with_simulator(
    cluster: Cluster,
    workdir: Path,
    profile: str,
    job_duration: float,
    args: list[str] | None = None,
    policy: dict[str, Any] | None = None,
) -> Harness:
    """A simulator of ``profile`` and the operator (default connection to it) as a subprocess."""
    sim = start_simulator(profile, job_duration=job_duration)
    env = {**operator_env(sim, workdir), **write_policy(workdir, ADOPT_ANYWHERE if policy is None else policy)}
    # VM images from a local mirror of the simulator's images (no internet here).
    env["TIO_VM_IMAGE_SERVER"] = str(write_mirror(list(sim.sim.images.values()), workdir / "vm-image-mirror"))
    operator = OperatorProcess(cluster, env, workdir / "operator.log", args=args or ["-A"])
    return Harness(cluster, sim, operator.start(), workdir)


def module_operator(
    cluster: Cluster, workdir: Path, prefix: str, profile: str, policy: dict[str, Any] | None = None
) -> Iterator[Harness]:
    """A module's operator (and simulator), watching only that module's namespaces (``prefix*``)."""
    running = operator_with_simulator(
        cluster, workdir, profile, job_duration=0.05, args=["-n", f"{prefix}*"], policy=policy
    )
    try:
        yield running
    finally:
        running.operator.stop()
        running.sim.stop()


CREDENTIALS = {"incus.truenas.io/credentials": "true"}
"""The label a Secret needs before the operator uses it for a TrueNASConnection."""


def secret_manifest(
    name: str,
    data: dict[str, str],
    labels: dict[str, str] | None = None,
    annotations: dict[str, str] | None = None,
) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": name}
    if labels:
        metadata["labels"] = labels
    if annotations:
        metadata["annotations"] = annotations
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": metadata,
        "type": "Opaque",
        "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()},
    }


def _cond(status: dict[str, Any], kind: str) -> str | None:
    return next((c["status"] for c in status.get("conditions", []) if c["type"] == kind), None)


def _reason(status: dict[str, Any], kind: str) -> str | None:
    return next((c["reason"] for c in status.get("conditions", []) if c["type"] == kind), None)


def start_simulator(
    profile: str = "25.10", tls: bool = True, cert_dir: Path | None = None, **knobs: Any
) -> SimulatorThread:
    sim = Simulator(profile, seed=11)
    knobs.setdefault("scram_iterations", 50_000)  # TrueNAS's 500 000 PBKDF2 rounds cost ~0.5 s a side
    for key, value in knobs.items():
        setattr(sim.knobs, key, value)
    return SimulatorThread(sim, tls=tls, cert_dir=cert_dir).start()


def operator_env(sim: SimulatorThread, workdir: Path, resync: float = 2.0, **extra: str) -> dict[str, str]:
    key_file = workdir / "api-key"
    key_file.write_text(sim.api_key)
    key_file.chmod(0o600)
    assert sim.ca_file is not None
    env = {
        "TIO_TRUENAS_URL": sim.ws_url,
        "TIO_TRUENAS_API_KEY_FILE": str(key_file),
        "TIO_TRUENAS_CA_FILE": str(sim.ca_file),
        "TIO_RESYNC_SECONDS": str(resync),
        "TIO_RETRY_MIN_SECONDS": "0.5",
        "TIO_RETRY_MAX_SECONDS": "4",
    }
    env.update(extra)
    return env
