"""A real local Kubernetes control plane (etcd + kube-apiserver) for tests, demos and the main command.

The binaries come from ``tools/build-controlplane.sh``, which compiles them from the upstream Go
modules and caches them per version. This module writes certificates, starts etcd and
kube-apiserver on free loopback ports with RBAC on, and writes a kubeconfig for an admin (client
certificate in ``system:masters``). There is no controller manager: no garbage collection, and
namespaces stay Terminating once deleted, as with controller-runtime's envtest.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from truenas_simulator.tls import CertificateAuthority, key_pem

REPO_ROOT = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO_ROOT / "tools" / "build-controlplane.sh"
BINARIES = ("etcd", "kube-apiserver", "kubectl", "helm")


class ControlPlaneError(RuntimeError):
    """The control plane could not be built or started; the message says which part and why."""


def binaries_dir(progress: bool = True) -> Path:
    """Returns the folder with etcd, kube-apiserver, kubectl and helm, building them on first use.

    ``TIO_CONTROLPLANE_BIN`` points at prebuilt binaries and skips the build.
    """
    override = os.environ.get("TIO_CONTROLPLANE_BIN")
    if override:
        path = Path(override)
        missing = [name for name in BINARIES if not (path / name).exists()]
        if missing:
            raise ControlPlaneError(f"TIO_CONTROLPLANE_BIN={path} lacks {', '.join(missing)}")
        return path
    if not BUILD_SCRIPT.exists():
        raise ControlPlaneError(f"{BUILD_SCRIPT} not found; set TIO_CONTROLPLANE_BIN to prebuilt binaries")
    result = subprocess.run(
        ["bash", str(BUILD_SCRIPT)],
        stdout=subprocess.PIPE,
        stderr=None if progress else subprocess.PIPE,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise ControlPlaneError(f"building the control plane failed (exit {result.returncode}): {result.stderr or ''}")
    return Path(result.stdout.strip().splitlines()[-1])


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class LocalControlPlane:
    """etcd + kube-apiserver in ``workdir``; ``start()`` returns once the API is ready."""

    workdir: Path
    bin_dir: Path
    start_timeout: float = 90.0
    etcd_port: int = 0
    api_port: int = 0
    ca: CertificateAuthority | None = None
    _processes: list[tuple[str, subprocess.Popen[bytes]]] = field(default_factory=list)

    @property
    def kubeconfig(self) -> Path:
        return self.workdir / "kubeconfig"

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.api_port}"

    def kubectl(self, *args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Runs the built kubectl against this control plane."""
        result = subprocess.run(
            [str(self.bin_dir / "kubectl"), "--kubeconfig", str(self.kubeconfig), *args],
            input=input,
            capture_output=True,
            text=True,
            check=False,
        )
        if check and result.returncode != 0:
            raise ControlPlaneError(f"kubectl {' '.join(args)} failed: {result.stderr.strip()}")
        return result

    def start(self) -> LocalControlPlane:
        self.workdir.mkdir(parents=True, exist_ok=True)
        certs = self.workdir / "certs"
        certs.mkdir(exist_ok=True)
        self.etcd_port, peer_port, self.api_port = free_port(), free_port(), free_port()
        self.ca = CertificateAuthority.create("truenas-incus-operator local CA")
        (certs / "ca.crt").write_bytes(self.ca.cert_pem)
        serving_cert, serving_key = self.ca.issue("localhost", hosts=["localhost", "127.0.0.1"])
        (certs / "apiserver.crt").write_bytes(serving_cert)
        (certs / "apiserver.key").write_bytes(serving_key)
        sa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        (certs / "sa.key").write_bytes(key_pem(sa_key))
        (certs / "sa.pub").write_bytes(
            sa_key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
        self.write_kubeconfig(self.kubeconfig, "admin", ["system:masters"])

        etcd_url = f"http://127.0.0.1:{self.etcd_port}"
        self._spawn(
            "etcd",
            [
                str(self.bin_dir / "etcd"),
                f"--data-dir={self.workdir / 'etcd'}",
                f"--listen-client-urls={etcd_url}",
                f"--advertise-client-urls={etcd_url}",
                f"--listen-peer-urls=http://127.0.0.1:{peer_port}",
                f"--initial-advertise-peer-urls=http://127.0.0.1:{peer_port}",
                f"--initial-cluster=default=http://127.0.0.1:{peer_port}",
                "--unsafe-no-fsync=true",
                "--log-level=warn",
            ],
        )
        self._wait(f"{etcd_url}/health", None, "etcd")
        self._spawn(
            "kube-apiserver",
            [
                str(self.bin_dir / "kube-apiserver"),
                f"--etcd-servers={etcd_url}",
                "--bind-address=127.0.0.1",
                f"--secure-port={self.api_port}",
                "--advertise-address=127.0.0.1",
                "--endpoint-reconciler-type=none",
                f"--tls-cert-file={certs / 'apiserver.crt'}",
                f"--tls-private-key-file={certs / 'apiserver.key'}",
                f"--client-ca-file={certs / 'ca.crt'}",
                "--authorization-mode=RBAC",
                f"--service-account-issuer=https://127.0.0.1:{self.api_port}/",
                f"--service-account-key-file={certs / 'sa.pub'}",
                f"--service-account-signing-key-file={certs / 'sa.key'}",
                "--service-cluster-ip-range=10.0.0.0/24",
                "--disable-admission-plugins=ServiceAccount",
                "--allow-privileged=true",
                "--profiling=false",
                "--v=0",
            ],
        )
        context = ssl.create_default_context(cafile=str(certs / "ca.crt"))
        self._wait(f"{self.server}/readyz", context, "kube-apiserver")
        deadline = time.monotonic() + self.start_timeout
        while self.kubectl("get", "namespace", "default", check=False).returncode != 0:
            if time.monotonic() > deadline:
                raise ControlPlaneError("kube-apiserver never created namespace default")
            time.sleep(0.2)
        return self

    def write_kubeconfig(self, path: Path, user: str, groups: list[str] | None = None) -> Path:
        """Writes a kubeconfig for ``user`` (client certificate with ``groups``) to ``path``."""
        assert self.ca is not None, "start() first"
        cert, key = self.ca.issue(user, organizations=groups or [], client=True)
        import base64

        def b64(data: bytes) -> str:
            return base64.b64encode(data).decode()

        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "local",
                    "cluster": {"server": self.server, "certificate-authority-data": b64(self.ca.cert_pem)},
                }
            ],
            "users": [{"name": user, "user": {"client-certificate-data": b64(cert), "client-key-data": b64(key)}}],
            "contexts": [{"name": "local", "context": {"cluster": "local", "user": user}}],
            "current-context": "local",
        }
        path.write_text(yaml.safe_dump(config))
        path.chmod(0o600)
        return path

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = open(self.workdir / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        self._processes.append((name, process))

    def _wait(self, url: str, context: ssl.SSLContext | None, name: str) -> None:
        deadline = time.monotonic() + self.start_timeout
        process = self._processes[-1][1]
        while True:
            if process.poll() is not None:
                raise ControlPlaneError(f"{name} exited with {process.returncode}:\n{self._tail(name)}")
            try:
                with urllib.request.urlopen(url, context=context, timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError, ssl.SSLError):
                pass
            if time.monotonic() > deadline:
                raise ControlPlaneError(f"{name} not ready after {self.start_timeout}s:\n{self._tail(name)}")
            time.sleep(0.1)

    def _tail(self, name: str, lines: int = 30) -> str:
        log = self.workdir / f"{name}.log"
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:]) if log.exists() else ""

    def stop(self) -> None:
        for _, process in reversed(self._processes):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for _, process in reversed(self._processes):
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self._processes.clear()

    def __enter__(self) -> LocalControlPlane:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def wait_for_interrupt() -> None:
    """Blocks until Ctrl-C or SIGTERM; afterwards both are ignored so cleanup is not interrupted."""
    stop = threading.Event()

    def handler(signum: int, frame: object) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not stop.wait(0.5):
            pass
    finally:
        for sig in previous:
            signal.signal(sig, signal.SIG_IGN)


def start_for_people(workdir: Path) -> tuple[LocalControlPlane, float] | None:
    """A fresh control plane in ``workdir`` for the commands people run; None (after saying why) on failure."""
    bin_dir = binaries_dir()
    shutil.rmtree(workdir, ignore_errors=True)
    plane = LocalControlPlane(workdir=workdir, bin_dir=bin_dir)
    started = time.monotonic()
    try:
        plane.start()
    except ControlPlaneError as exc:
        plane.stop()
        print(f"error: {exc}", file=sys.stderr)
        return None
    return plane, time.monotonic() - started


def run_forever(workdir: Path) -> int:
    """The people-facing command: start, print how to use it, stop cleanly on Ctrl-C."""
    started = start_for_people(workdir)
    if started is None:
        return 1
    plane, seconds = started
    print(f"control plane ready in {seconds:.1f}s at {plane.server}")
    print(f"export KUBECONFIG={plane.kubeconfig}")
    print(f"export PATH={plane.bin_dir}:$PATH   # kubectl and helm")
    print("Ctrl-C stops it.")
    try:
        wait_for_interrupt()
    finally:
        plane.stop()
    return 0
