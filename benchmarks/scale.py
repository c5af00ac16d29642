"""Scale beyond one NAS: N IncusInstances spread over C TrueNAS connections (issue 15 item 5).

Every simulator runs in its own process (``python -m truenas_simulator``), so that its CPU is
measured apart from the operator's; so are kube-apiserver and etcd (the local control plane). Each
simulator is a TrueNASConnection in a namespace of its own (``scale-0`` … ``scale-<C-1>``, Secrets
labelled ``incus.truenas.io/credentials: "true"``); the operator has no default connection.

Measures: time from the first create to the last Running; the operator's RSS (5 s and 60 s after
the burst, the peak, and after a restart over the same resources); CPU seconds of each process
(operator, simulators, kube-apiserver, etcd) while creating and while idle; TrueNAS calls per
connection per resync interval while idle; API-server writes per minute while idle (from
kube-apiserver's ``apiserver_request_total``, by resource and verb). Asserts nothing.

    python benchmarks/scale.py --n 5000 --connections 10      # ~15 minutes
    python benchmarks/scale.py --smoke                        # N=60 over 3 connections, ~2 minutes
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import GROUP, PLURAL, ROOT, VERSION, PhaseWatcher, kube_clients, machine, without_kubernetes
from kubernetes import client

from truenas_incus_dev.localcluster import LocalControlPlane, binaries_dir

CLK_TCK = os.sysconf("SC_CLK_TCK")
WRITE_VERBS = {"POST", "PUT", "PATCH", "DELETE", "APPLY", "CREATE", "UPDATE", "DELETECOLLECTION"}


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (its threads included)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def status_mb(pid: int, key: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return round(int(line.split()[1]) / 1024, 1)
    raise RuntimeError(f"no {key}")


@dataclass
class SimulatorProcess:
    """``python -m truenas_simulator`` in a process of its own, with TLS and a control API."""

    index: int
    workdir: Path
    process: subprocess.Popen[bytes] | None = None
    port: int = 0
    api_key: str = ""

    @property
    def ca_file(self) -> Path:
        return self.workdir / "tls" / "ca.crt"

    def start(self) -> SimulatorProcess:
        self.workdir.mkdir(parents=True, exist_ok=True)
        port_file, key_file = self.workdir / "port", self.workdir / "api-key"
        log = (self.workdir / "simulator.log").open("wb")
        argv = [sys.executable, "-m", "truenas_simulator", "--tls", "--port", "0", "--job-duration", "0"]
        argv += ["--cert-dir", str(self.workdir / "tls"), "--api-key-file", str(key_file)]
        argv += ["--port-file", str(port_file), "--host-memory-gib", "100000", "--host-cores", "100000"]
        env = {**os.environ, "PYTHONPATH": str(ROOT / "operator")}
        self.process = subprocess.Popen(argv, stdout=log, stderr=log, env=env)
        log.close()
        deadline = time.monotonic() + 60
        while not (port_file.exists() and key_file.exists() and key_file.read_text()):
            if self.process.poll() is not None or time.monotonic() > deadline:
                log_text = (self.workdir / "simulator.log").read_text()
                raise RuntimeError(f"simulator {self.index} did not start: {log_text}")
            time.sleep(0.05)
        self.port = int(port_file.read_text())
        self.api_key = key_file.read_text().strip()
        return self

    @property
    def url(self) -> str:
        return f"wss://127.0.0.1:{self.port}"

    def calls(self) -> dict[str, Any]:
        context = ssl.create_default_context(cafile=str(self.ca_file))
        context.check_hostname = False
        with urllib.request.urlopen(f"https://127.0.0.1:{self.port}/_simulator/calls", context=context) as r:
            result: dict[str, Any] = json.load(r)
            return result

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=30)


@dataclass
class Scale:
    workdir: Path
    plane: LocalControlPlane
    sims: list[SimulatorProcess]
    resync: float
    operator_env: dict[str, str] = field(default_factory=dict)
    operator: subprocess.Popen[bytes] | None = None
    health_port: int = 0
    metrics_port: int = 0
    api: client.ApiClient = field(init=False)
    custom: client.CustomObjectsApi = field(init=False)
    watcher: PhaseWatcher = field(init=False)

    def __post_init__(self) -> None:
        self.api, self.custom, self.watcher = kube_clients(self.plane)

    def connect(self) -> None:
        for sim in self.sims:
            ns = f"scale-{sim.index}"
            self.plane.kubectl("create", "namespace", ns)
            key = f"--from-literal=apiKey={sim.api_key}"
            self.plane.kubectl("create", "secret", "generic", "nas-key", "-n", ns, key)
            self.plane.kubectl("create", "secret", "generic", "nas-ca", "-n", ns, f"--from-file=ca.crt={sim.ca_file}")
            self.plane.kubectl("label", "secret", "nas-key", "nas-ca", "-n", ns, "incus.truenas.io/credentials=true")
            connection = {
                "apiVersion": f"{GROUP}/{VERSION}",
                "kind": "TrueNASConnection",
                "metadata": {"name": "nas"},
                "spec": {
                    "url": sim.url,
                    "transport": "websocket",
                    "apiKeySecretRef": {"name": "nas-key", "key": "apiKey"},
                    "tls": {"caSecretRef": {"name": "nas-ca", "key": "ca.crt"}},
                },
            }
            self.custom.create_namespaced_custom_object(GROUP, VERSION, ns, "truenasconnections", connection)

    def start_operator(self) -> float:
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("TIO_")},
            "KUBECONFIG": str(self.plane.kubeconfig),
            "TIO_RESYNC_SECONDS": str(self.resync),
            "TIO_METRICS_PORT": str(self.metrics_port),
            **self.operator_env,
        }
        paths = [str(without_kubernetes(self.workdir)), str(ROOT / "operator")]
        env["PYTHONPATH"] = os.pathsep.join(paths)
        log = (self.workdir / "operator.log").open("ab")
        started = time.monotonic()
        argv = [sys.executable, "-m", "truenas_incus_operator", "run", "-A"]
        argv += ["--liveness", f"http://127.0.0.1:{self.health_port}/healthz"]
        self.operator = subprocess.Popen(argv, env=env, stdout=log, stderr=log)
        log.close()
        return started

    def wait_ready(self, started: float, timeout: float = 300.0) -> float:
        """Seconds from ``started`` until kopf's health endpoint answers (the operator is up)."""
        while time.monotonic() - started < timeout:
            assert self.operator is not None
            if self.operator.poll() is not None:
                raise RuntimeError("the operator exited; see operator.log")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.health_port}/healthz", timeout=1) as answer:
                    if answer.status == 200:
                        return time.monotonic() - started
            except (OSError, urllib.error.URLError):
                pass
            time.sleep(0.02)
        raise RuntimeError("the operator was not ready in time")

    def passed(self) -> float:
        """Resources whose loop made its first pass (the sum of the operator's tio_incusinstances)."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as answer:
                text = answer.read().decode()
        except (OSError, urllib.error.URLError):
            return 0.0
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("tio_reconcile_passes_total{")
        )

    def stop_operator(self) -> None:
        if self.operator is not None:
            self.operator.terminate()
            self.operator.wait(timeout=120)
            self.operator = None

    def spread(self, count: int) -> list[tuple[str, str]]:
        """(namespace, name) of ``count`` resources, round robin over the connections' namespaces."""
        return [(f"scale-{i % len(self.sims)}", f"vm-{i:05d}") for i in range(count)]

    def create(self, resources: list[tuple[str, str]]) -> None:
        def one(item: tuple[str, str]) -> None:
            ns, name = item
            body = {
                "apiVersion": f"{GROUP}/{VERSION}",
                "kind": "IncusInstance",
                "metadata": {"name": name},
                "spec": {"type": "CONTAINER", "image": "debian/bookworm", "connectionRef": {"name": "nas"}},
            }
            for attempt in range(5):
                try:
                    self.custom.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, body)
                    return
                except client.ApiException as exc:
                    if exc.status == 409 or attempt == 4:
                        if exc.status == 409:
                            return
                        raise
                    time.sleep(1)

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(one, resources))

    def all_running(self, resources: list[tuple[str, str]], timeout: float) -> bool:
        return self.watcher.wait(lambda: all(self.watcher.when(ns, n, "Running") for ns, n in resources), timeout)

    def cpu(self) -> dict[str, float]:
        """CPU seconds so far of every process in the benchmark."""
        result = {f"simulator-{s.index}": cpu_seconds(s.process.pid) for s in self.sims if s.process is not None}
        result["simulators"] = round(sum(result.values()), 2)
        for name, process in self.plane._processes:
            result[name] = cpu_seconds(process.pid)
        if self.operator is not None:
            result["operator"] = cpu_seconds(self.operator.pid)
        return result

    def api_requests(self) -> dict[tuple[str, str], float]:
        """kube-apiserver's request counters by (verb, resource), summed over codes and scopes."""
        text = self.plane.kubectl("get", "--raw", "/metrics").stdout
        totals: dict[tuple[str, str], float] = {}
        for line in text.splitlines():
            if not line.startswith("apiserver_request_total{"):
                continue
            labels = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}", 1)[0]))
            key = (labels.get("verb", ""), labels.get("resource", ""))
            totals[key] = totals.get(key, 0.0) + float(line.rsplit(" ", 1)[1])
        return totals

    def close(self) -> None:
        self.stop_operator()
        self.watcher.stop()
        self.api.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def first_running(env: Scale, name: str) -> float | None:
    """Created now (the operator just ready): seconds until its status reads Running."""
    created = time.monotonic()
    env.create([("scale-0", name)])
    if not env.all_running([("scale-0", name)], 120):
        return None
    return round((env.watcher.when("scale-0", name, "Running") or created) - created, 3)


def delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: round(after[k] - before.get(k, 0.0), 2) for k in after}


@contextmanager
def scale_environment(workdir: Path, connections: int, resync: float, operator_env: dict[str, str]) -> Iterator[Scale]:
    plane = LocalControlPlane(workdir=workdir / "controlplane", bin_dir=binaries_dir()).start()
    sims: list[SimulatorProcess] = []
    env = None
    try:
        with ThreadPoolExecutor(connections) as pool:
            sims = list(pool.map(lambda i: SimulatorProcess(i, workdir / f"sim-{i}").start(), range(connections)))
        plane.kubectl("apply", "-f", str(ROOT / "crds"))
        plane.kubectl("wait", "--for=condition=Established", "crd", "--all", "--timeout=60s")
        plane.kubectl("create", "namespace", "truenas-incus-operator")  # the ownership ledger's home
        env = Scale(workdir, plane, sims, resync, operator_env)
        env.connect()
        yield env
    finally:
        if env is not None:
            env.close()
        for sim in sims:
            sim.stop()
        plane.stop()


def truenas_calls_per_resource(before: list[dict[str, Any]], env: Scale, n: int) -> dict[str, float]:
    """TrueNAS calls since ``before``, by method, summed over the simulators, per resource."""
    total: dict[str, float] = {}
    for previous, now in zip(before, (s.calls() for s in env.sims), strict=True):
        for method, count in now["by_method"].items():
            total[method] = total.get(method, 0.0) + count - previous["by_method"].get(method, 0)
    return {method: round(count / n, 2) for method, count in sorted(total.items()) if count}


def idle(env: Scale, seconds: float) -> dict[str, Any]:
    """TrueNAS calls per connection and API-server writes while nothing changes."""
    calls_before = [s.calls() for s in env.sims]
    requests_before = env.api_requests()
    cpu_before = env.cpu()
    time.sleep(seconds)
    cpu_after = env.cpu()
    requests_after = env.api_requests()
    calls_after = [s.calls() for s in env.sims]
    intervals = seconds / env.resync
    per_connection = []
    for before, after in zip(calls_before, calls_after, strict=True):
        methods = {
            m: n - before["by_method"].get(m, 0)
            for m, n in after["by_method"].items()
            if n != before["by_method"].get(m, 0)
        }
        per_connection.append(
            {
                "calls_per_interval": round(sum(methods.values()) / intervals, 2),
                "by_method": methods,
                "writes": after["writes"] - before["writes"],
            }
        )
    writes = {
        f"{verb} {resource}": round(n - requests_before.get((verb, resource), 0.0))
        for (verb, resource), n in requests_after.items()
        if verb in WRITE_VERBS and n != requests_before.get((verb, resource), 0.0)
    }
    # kube-apiserver renews its own identity Lease; nothing else runs but the operator.
    operator_writes = {k: v for k, v in writes.items() if not k.endswith(" leases")}
    cpu = delta(cpu_before, cpu_after)
    methods_per_interval: dict[str, float] = {}
    for c in per_connection:
        for m, n in c["by_method"].items():
            methods_per_interval[m] = max(methods_per_interval.get(m, 0.0), round(n / intervals, 2))
    return {
        "seconds": seconds,
        "resync_s": env.resync,
        "truenas_calls_per_connection_per_interval": {
            "min": min(c["calls_per_interval"] for c in per_connection),
            "max": max(c["calls_per_interval"] for c in per_connection),
        },
        # The busiest connection's calls per interval, by method (queries; device_list is the audit rotation).
        "by_method_per_interval": methods_per_interval,
        "truenas_writes": sum(c["writes"] for c in per_connection),
        "per_connection": per_connection,
        "api_writes_by_resource": writes,
        "operator_api_writes_per_min": round(sum(operator_writes.values()) / (seconds / 60), 2),
        "cpu_seconds": cpu,
        "operator_cpu_share": round(cpu.get("operator", 0.0) / seconds, 3),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "load_before": Path("/proc/loadavg").read_text().split()[:3],
        "parameters": {
            "n": args.n,
            "connections": args.connections,
            "idle_s": args.idle,
            "resync_s": args.resync,
            "smoke": args.smoke,
            "operator_env": args.operator_env,
        },
    }
    workdir = Path(tempfile.mkdtemp(prefix="tio-scale-"))
    try:
        with scale_environment(workdir, args.connections, args.resync, args.operator_env) as env:
            env.health_port, env.metrics_port = free_port(), free_port()
            results["start_empty"] = {"ready_s": round(env.wait_ready(env.start_operator()), 3)}
            results["start_empty"]["first_running_s"] = first_running(env, "first-empty")
            time.sleep(5)
            assert env.operator is not None
            results["rss_mb"] = {"0": status_mb(env.operator.pid)}
            resources = env.spread(args.n)
            print(f"burst: {args.n} over {args.connections} connections ...", flush=True)
            cpu_before = env.cpu()
            requests_before = env.api_requests()
            calls_before = [s.calls() for s in env.sims]
            started = time.monotonic()
            env.create(resources)
            created = time.monotonic() - started
            ok = env.all_running(resources, args.timeout)
            last = max((env.watcher.when(ns, n, "Running") or float("inf")) for ns, n in resources)
            elapsed = last - started
            cpu = delta(cpu_before, env.cpu())
            requests = env.api_requests()
            writes = sum(n - requests_before.get(k, 0.0) for k, n in requests.items() if k[0] in WRITE_VERBS)
            results["burst"] = {
                "count": args.n,
                "all_running": ok,
                "seconds": round(elapsed, 2),
                "rate_per_s": round(args.n / elapsed, 1),
                "create_calls_s": round(created, 2),
                "cpu_seconds": cpu,
                # Share of one core over the burst: near 1.0 means that process is the bottleneck.
                "cpu_share": {
                    k: round(v / elapsed, 2)
                    for k, v in cpu.items()
                    if k in ("operator", "simulators") or not k.startswith("simulator-")
                },
                "api_writes": round(writes),
                "api_writes_per_resource": round(writes / args.n, 2),
                # Per resource: where the simulators' and the API server's work comes from.
                "api_writes_per_resource_by_kind": {
                    f"{verb} {kind}": round((n - requests_before.get((verb, kind), 0.0)) / args.n, 2)
                    for (verb, kind), n in requests.items()
                    if verb in WRITE_VERBS and n != requests_before.get((verb, kind), 0.0)
                },
                "truenas_calls_per_resource": truenas_calls_per_resource(calls_before, env, args.n),
            }
            print(f"   {results['burst']}", flush=True)
            time.sleep(5)
            results["rss_mb"][f"{args.n} +5s"] = status_mb(env.operator.pid)
            time.sleep(args.settle - 5)
            results["rss_mb"][f"{args.n} +{args.settle:g}s"] = status_mb(env.operator.pid)
            results["rss_mb"][f"{args.n} peak"] = status_mb(env.operator.pid, "VmHWM")
            print(f"   {results['rss_mb']}", flush=True)
            print(f"idle for {args.idle}s ...", flush=True)
            results["idle"] = idle(env, args.idle)
            print(f"   {json.dumps({k: v for k, v in results['idle'].items() if k != 'per_connection'})}", flush=True)
            print("restart ...", flush=True)
            env.stop_operator()
            before = [s.calls()["writes"] for s in env.sims]
            started = env.start_operator()
            ready = env.wait_ready(started)
            restart: dict[str, Any] = {"ready_s": round(ready, 3)}
            restart["first_running_after_ready_s"] = first_running(env, "first-restarted")
            # Every loop's first pass (its status compared with TrueNAS's state): the restart's whole work.
            while env.passed() < args.n + 2 and time.monotonic() - started < args.timeout:
                time.sleep(0.2)
            restart["all_passed_s"] = round(time.monotonic() - started, 2)
            results["restart"] = restart
            print(f"   {restart}", flush=True)
            time.sleep(max(args.restart_settle - (time.monotonic() - started), 0.0))
            results["rss_mb"][f"{args.n} after restart"] = status_mb(env.operator.pid)
            results["restart_truenas_writes"] = sum(s.calls()["writes"] for s in env.sims) - sum(before)
            print(f"   {results['rss_mb']}", flush=True)
    finally:
        results["load_after"] = Path("/proc/loadavg").read_text().split()[:3]
        if args.keep:
            print(f"kept {workdir}", flush=True)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="reduced run for CI: N=60 over 3 connections")
    parser.add_argument("--n", type=int, default=5000, help="IncusInstances (default 5000)")
    parser.add_argument("--connections", type=int, default=10, help="TrueNAS simulators/connections (default 10)")
    parser.add_argument("--idle", type=float, default=180.0, help="idle seconds measured (default 180)")
    parser.add_argument("--resync", type=float, default=30.0, help="operator resync interval (default 30)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="longest wait for all Running (default 1800)")
    parser.add_argument("--settle", type=float, default=60.0, help="seconds after the burst before RSS again")
    parser.add_argument("--restart-settle", type=float, default=60.0, help="seconds after a restart before RSS")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    parser.add_argument("--output", type=Path, help="write the results as JSON here too")
    parser.add_argument(
        "--operator-env", action="append", default=[], metavar="NAME=VALUE", help="extra operator environment"
    )
    args = parser.parse_args(argv)
    # A plain SIGTERM would skip the clean-up and leave the simulators and the control plane running.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    args.operator_env = dict(item.split("=", 1) for item in args.operator_env)
    if args.smoke:
        args.n, args.connections, args.idle, args.resync = 60, 3, 10.0, 5.0
        args.settle, args.restart_settle = 10.0, 10.0
    results = run(args)
    text = json.dumps(results, indent=2)
    print(text)
    if args.output:
        args.output.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
