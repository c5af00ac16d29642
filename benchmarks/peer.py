"""Side by side with the textbook kopf operator (``../shared/bench/baseline_operator.py``), in one run
on one control plane (issue 27 items 3 and 4): its figures are only valid measured this way.

Each operator gets a fresh TrueNAS simulator (25.10, jobs 0 s, a process of its own) and a namespace of
its own (``ours`` / ``peer``; each operator watches only its own), and the same steps, one operator
after the other:

1. started with nothing to do: the seconds until kopf's health endpoint answers (``ready``), then one
   IncusInstance is created and timed until its status reads Running (``first_running``: start to
   first action after kopf is ready);
2. N1 resources (default 200) created by 8 client threads, all Running, RSS after ``--settle`` s;
3. N2 in all (default 1000), RSS after ``--settle`` s and the peak;
4. TrueNAS calls over ``--idle`` s of idling;
5. the operator restarted over the N2 resources: seconds until ready, RSS after ``--settle`` s.

Neither operator can import the ``kubernetes`` client (kopf imports it when it can: ~20 MB): ours runs
as in its image, the peer as its README says (kopf and httpx). Asserts nothing.

    python benchmarks/peer.py                 # 200 and 1000, ~12 minutes
    python benchmarks/peer.py --smoke         # 5 and 10, for CI (tests/test_benchmarks_smoke.py)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import GROUP, PLURAL, ROOT, VERSION, PhaseWatcher, kube_clients, machine, without_kubernetes
from kubernetes import client
from scale import SimulatorProcess, cpu_seconds, free_port, status_mb

from truenas_incus_dev.localcluster import LocalControlPlane, binaries_dir

BASELINE = ROOT.parent / "shared" / "bench" / "baseline_operator.py"


class Contender:
    """One operator under test: how it is started, over which simulator and namespace."""

    def __init__(
        self, name: str, workdir: Path, plane: LocalControlPlane, sim: SimulatorProcess, extra: dict[str, str]
    ) -> None:
        self.name, self.workdir, self.plane, self.sim = name, workdir, plane, sim
        self.extra = extra
        """More environment for the operator (a lever being measured)."""
        self.namespace = name
        self.process: subprocess.Popen[bytes] | None = None
        self.health = f"http://127.0.0.1:{free_port()}/healthz"

    def argv_env(self) -> tuple[list[str], dict[str, str]]:
        key = self.workdir / "api-key"
        key.write_text(self.sim.api_key)
        base = {k: v for k, v in os.environ.items() if not k.startswith(("TIO_", "TRUENAS_"))}
        base["KUBECONFIG"] = str(self.plane.kubeconfig)
        paths = [str(without_kubernetes(self.workdir)), str(ROOT / "operator")]
        base["PYTHONPATH"] = os.pathsep.join(paths)
        if self.name == "peer":
            env = {
                **base,
                "TRUENAS_URL": f"https://127.0.0.1:{self.sim.port}",
                "TRUENAS_API_KEY_FILE": str(key),
                "TRUENAS_CA_FILE": str(self.sim.ca_file),
            }
            argv = [sys.executable, "-m", "kopf", "run", "--standalone", "--namespace", self.namespace]
            return [*argv, "--liveness", self.health, str(BASELINE)], env
        env = {
            **base,
            "TIO_TRUENAS_URL": self.sim.url,
            "TIO_TRUENAS_API_KEY_FILE": str(key),
            "TIO_TRUENAS_CA_FILE": str(self.sim.ca_file),
        }
        argv = [sys.executable, "-m", "truenas_incus_operator", "run", "-n", self.namespace]
        return [*argv, "--liveness", self.health], {**env, **self.extra}

    def start(self) -> float:
        """Starts the operator; returns the seconds until kopf's health endpoint answered 200."""
        argv, env = self.argv_env()
        log = (self.workdir / f"{self.name}.log").open("ab")
        started = time.monotonic()
        self.process = subprocess.Popen(argv, env=env, stdout=log, stderr=log)
        log.close()
        deadline = started + 120
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited: {(self.workdir / f'{self.name}.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(self.health, timeout=1) as answer:
                    if answer.status == 200:
                        return time.monotonic() - started
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.01)
        raise RuntimeError(f"{self.name} not ready in 120 s")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=120)
        self.process = None

    def rss(self, key: str = "VmRSS") -> float:
        assert self.process is not None
        return round(status_mb(self.process.pid, key), 1)

    def cpu(self) -> float:
        assert self.process is not None
        return cpu_seconds(self.process.pid)


def create(custom: client.CustomObjectsApi, namespace: str, names: list[str]) -> None:
    from concurrent.futures import ThreadPoolExecutor

    def one(name: str) -> None:
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "IncusInstance",
            "metadata": {"name": name},
            "spec": {"type": "CONTAINER", "image": "debian/bookworm"},
        }
        custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(one, names))


def all_running(watcher: PhaseWatcher, namespace: str, names: list[str], timeout: float) -> bool:
    return watcher.wait(lambda: all(watcher.when(namespace, n, "Running") for n in names), timeout)


def contend(
    contender: Contender, plane: LocalControlPlane, watcher: PhaseWatcher, custom: client.CustomObjectsApi, args: Any
) -> dict[str, Any]:
    ns = contender.namespace
    plane.kubectl("create", "namespace", ns)
    result: dict[str, Any] = {"rss_mb": {}}
    contender.sim.start()
    try:
        result["ready_s"] = round(contender.start(), 3)
        created = time.monotonic()  # right after ready: the create call is part of the figure
        create(custom, ns, ["first"])
        running = watcher.wait(lambda: watcher.when(ns, "first", "Running") is not None, 60)
        seen = watcher.when(ns, "first", "Running")
        result["first_running_after_ready_s"] = round(seen - created, 3) if running and seen else None
        time.sleep(args.settle)
        result["rss_mb"]["1"] = contender.rss()
        held = ["first"]
        for count in (args.n1, args.n2):
            batch = [f"i-{i:05d}" for i in range(len(held) - 1, count - 1)]
            cpu, started = contender.cpu(), time.monotonic()
            create(custom, ns, batch)
            done = all_running(watcher, ns, batch, args.timeout)
            last = max((watcher.when(ns, n, "Running") or time.monotonic()) for n in batch)
            result[f"burst_to_{count}"] = {
                "created": len(batch),
                "all_running": done,
                "seconds": round(last - started, 2),
                "operator_cpu_s": round(contender.cpu() - cpu, 2),
            }
            held += batch
            time.sleep(args.settle)
            result["rss_mb"][str(count)] = contender.rss()
            print(
                f"   {contender.name} {count}: {result[f'burst_to_{count}']} rss {result['rss_mb'][str(count)]}",
                flush=True,
            )
        result["rss_mb"]["peak"] = contender.rss("VmHWM")
        before, cpu = contender.sim.calls(), contender.cpu()
        time.sleep(args.idle)
        after = contender.sim.calls()
        result["idle"] = {
            "seconds": args.idle,
            "truenas_calls": sum(after["by_method"].values()) - sum(before["by_method"].values()),
            "truenas_writes": after["writes"] - before["writes"],
            "operator_cpu_share": round((contender.cpu() - cpu) / args.idle, 4),
        }
        contender.stop()
        result["restart_ready_s"] = round(contender.start(), 3)
        time.sleep(args.settle)
        result["rss_mb"][f"{args.n2} after restart"] = contender.rss()
    finally:
        contender.stop()
        contender.sim.stop()
    return result


def run(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "load_before": Path("/proc/loadavg").read_text().split()[:3],
        "parameters": {k: v for k, v in vars(args).items() if k != "output"},
    }
    workdir = Path(tempfile.mkdtemp(prefix="tio-peer-"))
    plane = LocalControlPlane(workdir=workdir / "controlplane", bin_dir=binaries_dir()).start()
    api: Any = None
    try:
        plane.kubectl("apply", "-f", str(ROOT / "crds"))
        plane.kubectl("wait", "--for=condition=Established", "crd", "--all", "--timeout=60s")
        plane.kubectl("create", "namespace", "truenas-incus-operator")  # the ownership ledger's home
        api, custom, watcher = kube_clients(plane)
        for name in args.order:
            print(f"{name} ...", flush=True)
            sim = SimulatorProcess(len(results), workdir / f"sim-{name}")
            contender = Contender(name, workdir, plane, sim, args.ours_env if name == "ours" else {})
            results[name] = contend(contender, plane, watcher, custom, args)
            print(f"   {json.dumps(results[name])}", flush=True)
        watcher.stop()
    finally:
        if api is not None:
            api.close()
        plane.stop()
        results["load_after"] = Path("/proc/loadavg").read_text().split()[:3]
        if args.keep:
            print(f"kept {workdir}", flush=True)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="reduced run for CI: 5 and 10 resources")
    parser.add_argument("--n1", type=int, default=200, help="first figure (default 200)")
    parser.add_argument("--n2", type=int, default=1000, help="second figure (default 1000)")
    parser.add_argument("--settle", type=float, default=20.0, help="seconds after each step before RSS")
    parser.add_argument("--idle", type=float, default=60.0, help="idle seconds whose TrueNAS calls are counted")
    parser.add_argument("--timeout", type=float, default=600.0, help="longest wait for all Running")
    parser.add_argument("--order", nargs="+", default=["ours", "peer"], choices=["ours", "peer"])
    parser.add_argument(
        "--ours-env", action="append", default=[], metavar="NAME=VALUE", help="extra environment for this operator"
    )
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    parser.add_argument("--output", type=Path, help="write the results as JSON here too")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    args.ours_env = dict(item.split("=", 1) for item in args.ours_env)
    if args.smoke:
        args.n1, args.n2, args.settle, args.idle = 5, 10, 2.0, 2.0
    results = run(args)
    text = json.dumps(results, indent=2)
    print(text)
    if args.output:
        args.output.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
