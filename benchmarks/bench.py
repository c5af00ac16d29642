"""Benchmarks: convergence, throughput, TrueNAS call economy, drift, memory, restart, job latency.

Runs against a fresh local control plane and TrueNAS simulators, with the operator as a separate
process (as in production). Measures and prints; asserts nothing. ``--smoke`` is the reduced run CI
uses so that this code cannot rot.

    python benchmarks/bench.py                 # the full set (N=1000, 5-minute idle), ~20 minutes
    python benchmarks/bench.py --smoke         # N=50, short idle, ~3 minutes
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kubernetes import client, config, watch

from truenas_incus_dev.localcluster import LocalControlPlane, binaries_dir
from truenas_simulator import Simulator, SimulatorThread

GROUP, VERSION, PLURAL = "incus.truenas.io", "v1alpha1", "incusinstances"
ROOT = Path(__file__).resolve().parents[1]


# ----- plumbing ---------------------------------------------------------------------------------------------
class PhaseWatcher:
    """Watches every IncusInstance and remembers when each first reached each phase."""

    def __init__(self, api: client.ApiClient) -> None:
        self.custom = client.CustomObjectsApi(api)
        self.seen: dict[tuple[str, str, str], float] = {}
        self.messages: dict[tuple[str, str], str] = {}
        self.condition = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop:
            stream = watch.Watch()
            try:
                for event in stream.stream(
                    self.custom.list_cluster_custom_object, GROUP, VERSION, PLURAL, timeout_seconds=30
                ):
                    obj = event["object"]
                    meta, status = obj["metadata"], obj.get("status") or {}
                    now = time.monotonic()
                    with self.condition:
                        phase = status.get("phase")
                        if phase:
                            self.seen.setdefault((meta["namespace"], meta["name"], phase), now)
                        self.messages[(meta["namespace"], meta["name"])] = status.get("message", "")
                        self.condition.notify_all()
                    if self._stop:
                        break
            except Exception:  # the watch ends now and then; start another
                time.sleep(0.1)

    def when(self, namespace: str, name: str, phase: str) -> float | None:
        return self.seen.get((namespace, name, phase))

    def wait(self, predicate: Callable[[], bool], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self.condition:
            while not predicate():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self.condition.wait(min(remaining, 1.0))
        return True

    def forget(self, namespace: str) -> None:
        with self.condition:
            for key in [k for k in self.seen if k[0] == namespace]:
                del self.seen[key]

    def stop(self) -> None:
        self._stop = True


def kube_clients(plane: LocalControlPlane) -> tuple[client.ApiClient, client.CustomObjectsApi, PhaseWatcher]:
    """The benchmarks' own Kubernetes clients (the operator does not use this library)."""
    configuration = client.Configuration()
    config.load_kube_config(config_file=str(plane.kubeconfig), client_configuration=configuration)
    configuration.connection_pool_maxsize = 32
    api = client.ApiClient(configuration)
    return api, client.CustomObjectsApi(api), PhaseWatcher(api)


@dataclass
class Environment:
    workdir: Path
    plane: LocalControlPlane
    sim: SimulatorThread
    resync: float
    max_calls: int = 20
    operator_env: dict[str, str] = field(default_factory=dict)
    operator: subprocess.Popen[bytes] | None = None
    api: client.ApiClient = field(init=False)
    custom: client.CustomObjectsApi = field(init=False)
    watcher: PhaseWatcher = field(init=False)

    def __post_init__(self) -> None:
        self.api, self.custom, self.watcher = kube_clients(self.plane)

    def start_operator(self) -> float:
        key = self.workdir / "api-key"
        key.write_text(self.sim.api_key)
        env = {
            **os.environ,
            "KUBECONFIG": str(self.plane.kubeconfig),
            "TIO_TRUENAS_URL": self.sim.ws_url,
            "TIO_TRUENAS_API_KEY_FILE": str(key),
            "TIO_TRUENAS_CA_FILE": str(self.sim.ca_file),
            "TIO_RESYNC_SECONDS": str(self.resync),
            "TIO_TRUENAS_MAX_CONCURRENT_CALLS": str(self.max_calls),
            **self.operator_env,
        }
        # As in the image: without the `kubernetes` client, which kopf would import if it could (~20 MB).
        paths = [str(without_kubernetes(self.workdir)), env.get("PYTHONPATH", "")]
        env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
        log = (self.workdir / "operator.log").open("ab")
        started = time.monotonic()
        self.operator = subprocess.Popen(
            [sys.executable, "-m", "truenas_incus_operator", "run", "-A"], env=env, stdout=log, stderr=log
        )
        log.close()
        return started

    def stop_operator(self) -> None:
        if self.operator is not None:
            self.operator.terminate()
            self.operator.wait(timeout=60)
            self.operator = None

    def rss_mb(self, key: str = "VmRSS") -> float:
        assert self.operator is not None
        for line in Path(f"/proc/{self.operator.pid}/status").read_text().splitlines():
            if line.startswith(f"{key}:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError(f"no {key}")

    def namespace(self, name: str) -> str:
        self.plane.kubectl("create", "namespace", name)
        return name

    def create(self, namespace: str, names: list[str], spec: dict[str, Any] | None = None) -> dict[str, float]:
        """Creates IncusInstances (8 at a time); returns when each create call was made."""
        sent: dict[str, float] = {}

        def one(name: str) -> None:
            body = {
                "apiVersion": f"{GROUP}/{VERSION}",
                "kind": "IncusInstance",
                "metadata": {"name": name},
                "spec": {"type": "CONTAINER", "image": "debian/bookworm", **(spec or {})},
            }
            sent[name] = time.monotonic()
            self.custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(one, names))
        return sent

    def all_in_phase(self, namespace: str, names: list[str], phase: str, timeout: float) -> bool:
        return self.watcher.wait(lambda: all(self.watcher.when(namespace, n, phase) for n in names), timeout)

    def calls(self) -> dict[str, Any]:
        return self.sim.run(self.sim.sim.counters.snapshot)

    def close(self) -> None:
        self.stop_operator()
        self.watcher.stop()
        self.api.close()


def without_kubernetes(workdir: Path) -> Path:
    """A folder whose ``kubernetes`` package cannot be imported (the benchmarks themselves use it)."""
    folder = workdir / "no-kubernetes"
    (folder / "kubernetes").mkdir(parents=True, exist_ok=True)
    (folder / "kubernetes" / "__init__.py").write_text('raise ImportError("not in the operator image")\n')
    return folder


@contextmanager
def environment(
    workdir: Path,
    resync: float,
    job_duration: float = 0.0,
    max_calls: int = 20,
    operator_env: dict[str, str] | None = None,
) -> Iterator[Environment]:
    plane = LocalControlPlane(workdir=workdir / "controlplane", bin_dir=binaries_dir()).start()
    sim = Simulator("25.10", seed=1)
    sim.knobs.job_duration = job_duration
    sim.knobs.host_memory = 4096 * 2**30
    thread = SimulatorThread(sim, tls=True, cert_dir=workdir / "tls").start()
    env = None
    try:
        plane.kubectl("apply", "-f", str(ROOT / "crds"))
        plane.kubectl("wait", "--for=condition=Established", "crd", "--all", "--timeout=60s")
        plane.kubectl("create", "namespace", "truenas-incus-operator")  # the ownership ledger's home
        env = Environment(workdir, plane, thread, resync, max_calls, dict(operator_env or {}))
        yield env
    finally:
        if env is not None:
            env.close()
        thread.stop()
        plane.stop()


def percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(pct / 100 * (len(ordered) - 1))))
    return ordered[index]


def calls_between(before: dict[str, Any], after: dict[str, Any]) -> dict[str, int]:
    """TrueNAS calls per method between two counter snapshots."""
    old, new = before["by_method"], after["by_method"]
    return {m: new[m] - old.get(m, 0) for m in new if new[m] != old.get(m, 0)}


def names(prefix: str, count: int) -> list[str]:
    return [f"{prefix}-{i:04d}" for i in range(count)]


# ----- the benchmarks ------------------------------------------------------------------------------------
def single(env: Environment, count: int) -> dict[str, Any]:
    ns = env.namespace("single")
    latencies = []
    for name in names("one", count):
        sent = env.create(ns, [name])[name]
        env.all_in_phase(ns, [name], "Running", 30)
        reached = env.watcher.when(ns, name, "Running")
        assert reached is not None, f"{name} never reached Running"
        latencies.append(reached - sent)
    return {
        "count": count,
        "p50_s": round(percentile(latencies, 50), 3),
        "p95_s": round(percentile(latencies, 95), 3),
        "max_s": round(max(latencies), 3),
    }


def bulk(env: Environment, count: int, namespace: str = "bulk") -> dict[str, Any]:
    ns = env.namespace(namespace)
    batch = names("bulk", count)
    started = time.monotonic()
    env.create(ns, batch)
    created = time.monotonic() - started
    ok = env.all_in_phase(ns, batch, "Running", 900)
    elapsed = max(env.watcher.when(ns, n, "Running") or float("inf") for n in batch) - started
    return {
        "count": count,
        "all_running": ok,
        "seconds": round(elapsed, 2),
        "rate_per_s": round(count / elapsed, 1),
        "create_calls_s": round(created, 2),
    }


def drift(
    env: Environment,
    trials: int,
    label: str,
    target: SimulatorThread | None = None,
    spec: dict[str, Any] | None = None,
    namespace: str | None = None,
    spread: float = 0.0,
) -> dict[str, Any]:
    """Out-of-band stops of `powerState: Manual` instances; latency until status says Stopped.

    Each trial waits a random 0..``spread`` s first, so that the trials land at random points of the
    resync cycle (the pauses add up over many intervals): right after the previous trial, every
    trial would fall at the same point of the cycle, after a poll (REST) or away from the query
    that an event can race (JSON-RPC)."""
    sim = target or env.sim
    ns = namespace or env.namespace(f"drift-{label}")
    batch = names(f"drift-{label}", trials)
    env.create(ns, batch, {"powerState": "Manual", **(spec or {})})
    env.all_in_phase(ns, batch, "Running", 120)
    delays = []
    rng = random.Random(3)
    for name in batch:
        if spread:
            time.sleep(rng.uniform(0, spread))
        started = time.monotonic()
        sim.run(functools.partial(sim.sim.set_power, name, "STOPPED"))
        env.all_in_phase(ns, [name], "Stopped", 4 * env.resync + 10)
        reached = env.watcher.when(ns, name, "Stopped")
        assert reached is not None, f"{name}: status never showed Stopped"
        delays.append(reached - started)
    return {
        "trials": trials,
        "p50_s": round(statistics.median(delays), 3),
        "p99_s": round(percentile(delays, 99), 3),
        "max_s": round(max(delays), 3),
        "over_1s": sum(1 for d in delays if d > 1.0),
    }


def restart(env: Environment, namespace: str, batch: list[str]) -> dict[str, Any]:
    """Stops the operator, marks every status stale, restarts, times until all were re-observed."""
    env.stop_operator()
    stale = {"status": {"message": "stale (benchmark)"}}

    def mark(name: str) -> None:
        env.custom.patch_namespaced_custom_object_status(GROUP, VERSION, namespace, PLURAL, name, stale)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(mark, batch))
    env.watcher.wait(lambda: all(env.watcher.messages.get((namespace, n)) == "stale (benchmark)" for n in batch), 60)
    before = env.calls()
    started = env.start_operator()
    ok = env.watcher.wait(
        lambda: all(env.watcher.messages.get((namespace, n), "").startswith("Running") for n in batch), 300
    )
    elapsed = time.monotonic() - started
    after = env.calls()
    per_method = calls_between(before, after)
    return {
        "count": len(batch),
        "all_observed": ok,
        "seconds_from_process_start": round(elapsed, 2),
        "truenas_calls": per_method,
        "truenas_writes": after["writes"] - before["writes"],
    }


# ----- orchestration ---------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "parameters": {
            "n": args.n,
            "idle_s": args.idle,
            "resync_s": args.resync,
            "smoke": args.smoke,
            "operator_env": args.operator_env,
        },
    }
    workdir = Path(tempfile.mkdtemp(prefix="tio-bench-"))
    if args.only:
        try:
            if "memory" in args.only:
                print("5. memory ...", flush=True)
                results["memory_mb"] = run_memory(args, workdir)
            if "drift" in args.only:
                with environment(workdir / "drift-ws", resync=args.resync, operator_env=args.operator_env) as env:
                    env.start_operator()
                    # Other instances make the resync query as large (and as slow) as in the full run.
                    background = names("bg", args.n)
                    env.create(env.namespace("bg"), background, {"powerState": "Manual"})
                    env.all_in_phase("bg", background, "Running", 600)
                    print(f"4. drift over JSON-RPC events, {args.n} other instances ...", flush=True)
                    results["drift_websocket"] = drift(env, args.drift, "ws", spread=args.drift_spread)
                    results["drift_websocket"]["other_instances"] = args.n
                    print(f"   {results['drift_websocket']}", flush=True)
            if "drift_rest" in args.only:
                with environment(workdir / "drift", resync=args.resync, operator_env=args.operator_env) as env:
                    env.start_operator()
                    print("4. drift over REST (polling) ...", flush=True)
                    results["drift_rest"] = drift_rest(env, args.drift_rest, workdir)
                    print(f"   {results['drift_rest']}", flush=True)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        return results
    try:
        with environment(workdir / "main", resync=args.resync, operator_env=args.operator_env) as env:
            env.start_operator()
            time.sleep(3)
            results["memory_mb"] = {"0": round(env.rss_mb(), 1)}
            print("1. single CR ...", flush=True)
            results["single"] = single(env, args.single)
            print(f"   {results['single']}", flush=True)
            eco_small = env.namespace("eco-small")
            env.create(eco_small, names("eco", 10), {"powerState": "Manual"})
            env.all_in_phase(eco_small, names("eco", 10), "Running", 60)
            print(f"3a. economy with N={10 + args.single} for {args.idle}s ...", flush=True)
            small = economy_measure(env, args.idle)
            print(f"   {small}", flush=True)
            print(f"2. bulk: {args.n} at once ...", flush=True)
            results["bulk"] = bulk(env, args.n)
            print(f"   {results['bulk']}", flush=True)
            time.sleep(3)
            results["memory_mb"][str(args.n + 10 + args.single)] = round(env.rss_mb(), 1)
            print(f"3b. economy with N={args.n + 10 + args.single} for {args.idle}s ...", flush=True)
            large = economy_measure(env, args.idle)
            print(f"   {large}", flush=True)
            results["economy"] = {"resync_s": args.resync, "idle_s": args.idle, "small": small, "large": large}
            print("6. restart ...", flush=True)
            results["restart"] = restart(env, "bulk", names("bulk", args.n))
            print(f"   {results['restart']}", flush=True)
            print("4. drift over JSON-RPC events ...", flush=True)
            results["drift_websocket"] = drift(env, args.drift, "ws", spread=args.drift_spread)
            print(f"   {results['drift_websocket']}", flush=True)
            print("4. drift over REST (polling) ...", flush=True)
            results["drift_rest"] = drift_rest(env, args.drift_rest, workdir)
            print(f"   {results['drift_rest']}", flush=True)
        with environment(workdir / "memory100", resync=args.resync, operator_env=args.operator_env) as env:
            env.start_operator()
            env.create(env.namespace("m"), names("m", 100))
            env.all_in_phase("m", names("m", 100), "Running", 120)
            time.sleep(3)
            results["memory_mb"]["100"] = round(env.rss_mb(), 1)
        print(f"5. memory: {results['memory_mb']}", flush=True)
        print(f"7. bulk with {args.job}s jobs, {args.limit} concurrent calls ...", flush=True)
        with environment(
            workdir / "latency",
            resync=args.resync,
            job_duration=args.job / 2,
            max_calls=args.limit,
            operator_env=args.operator_env,
        ) as env:
            env.start_operator()
            measured = bulk(env, args.n, "slow")
            bound = args.n * args.job / args.limit
            measured["bound_s"] = round(bound, 1)
            measured["of_bound"] = round(measured["seconds"] / bound, 3)
            results["job_latency"] = measured
            print(f"   {measured}", flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return results


def run_memory(args: argparse.Namespace, workdir: Path) -> dict[str, float]:
    """Operator RSS with 0, 100 and N IncusInstances (one environment, growing), then N after a restart.

    The N figure is read 5 s after the last CR reached Running (as before), and again 30 s and
    60 s later (a burst's memory can come back once the loops settle); ``peak`` is VmHWM."""
    memory: dict[str, float] = {}
    with environment(workdir / "memory", resync=args.resync, operator_env=args.operator_env) as env:
        env.start_operator()
        time.sleep(3)
        memory["0"] = round(env.rss_mb(), 1)
        created = 0
        for target in (100, args.n):
            ns = env.namespace(f"mem{target}")
            batch = names(f"mem{target}", target - created)
            started = time.monotonic()
            env.create(ns, batch)
            env.all_in_phase(ns, batch, "Running", 600)
            if target == args.n:
                memory[f"{target} burst seconds"] = round(time.monotonic() - started, 1)
            created = target
            time.sleep(5)
            memory[str(target)] = round(env.rss_mb(), 1)
            print(f"   {memory}", flush=True)
        for later in (30, 60):
            time.sleep(30)
            memory[f"{args.n} +{later}s"] = round(env.rss_mb(), 1)
        memory[f"{args.n} peak"] = round(env.rss_mb("VmHWM"), 1)
        print(f"   {memory}", flush=True)
        # The figures above include the high-water mark of creating them all at once; a restarted
        # operator with the same CRs shows the steady-state footprint.
        env.stop_operator()
        env.start_operator()
        time.sleep(20)
        memory[f"{args.n} after restart"] = round(env.rss_mb(), 1)
        print(f"   {memory}", flush=True)
    return memory


def economy_measure(env: Environment, idle: float) -> dict[str, Any]:
    before = env.calls()
    time.sleep(idle)
    after = env.calls()
    per_method = calls_between(before, after)
    instances = env.sim.run(lambda: len(env.sim.sim.instances))
    return {
        "instances": instances,
        "calls_per_min": round(sum(per_method.values()) / (idle / 60), 2),
        "by_method": per_method,
        "writes": after["writes"] - before["writes"],
        "queries_per_resync_interval": round(per_method.get("virt.instance.query", 0) / (idle / env.resync), 2),
        # The device audit: at most TIO_DEVICE_AUDITS_PER_RESYNC (10) instances per interval, whatever N.
        "device_reads_per_resync_interval": round(
            per_method.get("virt.instance.device_list", 0) / (idle / env.resync), 2
        ),
    }


def drift_rest(env: Environment, trials: int, workdir: Path) -> dict[str, Any]:
    """A second TrueNAS reached over REST through a TrueNASConnection: drift shows on the next poll."""
    rest = SimulatorThread(Simulator("25.10", seed=2), tls=True, cert_dir=workdir / "rest-tls").start()
    try:
        ns = env.namespace("drift-rest")
        assert rest.ca_file is not None
        env.plane.kubectl("create", "secret", "generic", "key", "-n", ns, f"--from-literal=apiKey={rest.api_key}")
        env.plane.kubectl("create", "secret", "generic", "ca", "-n", ns, f"--from-file=ca.crt={rest.ca_file}")
        env.plane.kubectl("label", "secret", "key", "ca", "-n", ns, "incus.truenas.io/credentials=true")
        connection = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "TrueNASConnection",
            "metadata": {"name": "rest"},
            "spec": {
                "url": rest.url,
                "transport": "rest",
                "apiKeySecretRef": {"name": "key", "key": "apiKey"},
                "tls": {"caSecretRef": {"name": "ca", "key": "ca.crt"}},
            },
        }
        env.custom.create_namespaced_custom_object(GROUP, VERSION, ns, "truenasconnections", connection)
        return drift(env, trials, "rest", rest, {"connectionRef": {"name": "rest"}}, ns, spread=env.resync)
    finally:
        rest.stop()


def machine() -> dict[str, Any]:
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    memory = Path("/proc/meminfo").read_text().splitlines()[0].split()[1]
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(int(memory) / 2**20, 1),
        "os": platform.platform(),
        "python": platform.python_version(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="reduced run for CI: N=50, short idle")
    parser.add_argument("--n", type=int, default=1000, help="CRs for bulk, economy, memory, restart (default 1000)")
    parser.add_argument("--single", type=int, default=50, help="CRs applied one at a time (default 50)")
    parser.add_argument(
        "--idle", type=float, default=300.0, help="idle seconds for the economy benchmark (default 300)"
    )
    parser.add_argument("--resync", type=float, default=30.0, help="operator resync interval (default 30)")
    parser.add_argument("--drift", type=int, default=100, help="drift trials over JSON-RPC (default 100)")
    parser.add_argument("--drift-rest", type=int, default=10, help="drift trials over REST (default 10)")
    parser.add_argument(
        "--drift-spread", type=float, default=3.0, help="random pause before each JSON-RPC drift trial (default 3 s)"
    )
    parser.add_argument("--job", type=float, default=2.0, help="create job seconds for benchmark 7 (default 2)")
    parser.add_argument("--limit", type=int, default=20, help="concurrent calls per connection for benchmark 7")
    parser.add_argument("--output", type=Path, help="write the results as JSON here too")
    parser.add_argument(
        "--only", type=lambda v: set(v.split(",")), default=set(), help="run only some: memory,drift,drift_rest"
    )
    parser.add_argument(
        "--operator-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra environment for the operator process (e.g. to compare memory settings); repeatable",
    )
    args = parser.parse_args(argv)
    args.operator_env = dict(item.split("=", 1) for item in args.operator_env)
    if args.smoke:
        args.n, args.single, args.idle, args.drift, args.resync, args.job = 50, 10, 10.0, 10, 5.0, 0.2
        args.drift_rest, args.drift_spread = 3, 0.5
    results = run(args)
    text = json.dumps(results, indent=2)
    print(text)
    if args.output:
        args.output.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
