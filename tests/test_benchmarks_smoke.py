"""The benchmark code runs (reduced to N=50), so it cannot rot. Figures are not judged here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import ROOT

pytestmark = pytest.mark.e2e  # needs the local control plane (kube-apiserver + etcd, helm)


def test_benchmark_smoke_run_completes(tmp_path: Path) -> None:
    output = tmp_path / "results.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench.py"), "--smoke", "--output", str(output)],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
        env={**os.environ, "PYTHONPATH": str(ROOT / "tools")},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    results = json.loads(output.read_text())
    assert set(results) >= {
        "single",
        "bulk",
        "economy",
        "drift_websocket",
        "drift_rest",
        "memory_mb",
        "restart",
        "job_latency",
    }
    assert results["bulk"]["all_running"] and results["job_latency"]["all_running"]
    assert results["restart"]["all_observed"]
    assert results["single"]["count"] == 10 and results["bulk"]["count"] == 50
    assert results["drift_websocket"]["trials"] == 10
    assert set(results["drift_websocket"]) >= {"p50_s", "p99_s", "max_s"}
    assert set(results["memory_mb"]) == {"0", "70", "100"}


def test_scale_smoke_run_completes(tmp_path: Path) -> None:
    """benchmarks/scale.py with 60 instances over 3 simulator processes (the real run: 5000 over 10)."""
    output = tmp_path / "scale.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "scale.py"), "--smoke", "--output", str(output)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        env={**os.environ, "PYTHONPATH": str(ROOT / "tools")},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    results = json.loads(output.read_text())
    assert results["burst"]["all_running"] and results["burst"]["count"] == 60
    assert len(results["idle"]["per_connection"]) == 3
    assert set(results["idle"]["cpu_seconds"]) >= {"operator", "simulators", "kube-apiserver", "etcd"}
    assert set(results["rss_mb"]) == {"0", "60 +5s", "60 +10s", "60 peak", "60 after restart"}
    assert results["start_empty"]["first_running_s"] is not None
    assert results["restart"]["first_running_after_ready_s"] is not None


def test_side_by_side_benchmark_runs(tmp_path: Path) -> None:
    """benchmarks/peer.py with 5 and 10 resources, this operator's half (the peer's half needs
    ../shared/bench/baseline_operator.py, which is not this project's: the real run has it)."""
    output = tmp_path / "peer.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "peer.py"), "--smoke", "--order", "ours", "--output", str(output)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        env={**os.environ, "PYTHONPATH": str(ROOT / "tools")},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ours = json.loads(output.read_text())["ours"]
    assert ours["first_running_after_ready_s"] is not None and ours["ready_s"] > 0
    assert ours["burst_to_5"]["all_running"] and ours["burst_to_10"]["all_running"]
    assert set(ours["rss_mb"]) == {"1", "5", "10", "peak", "10 after restart"}
    assert ours["idle"]["truenas_writes"] == 0


def test_import_benchmark_runs(tmp_path: Path) -> None:
    """benchmarks/import_instances.py with 20 instances (the real run: up to 3000)."""
    output = tmp_path / "import.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "import_instances.py"), "--counts", "20", "--output", str(output)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={**os.environ, "PYTHONPATH": f"{ROOT / 'operator'}{os.pathsep}{ROOT}"},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (figures,) = json.loads(output.read_text())["results"]
    assert figures["instances"] == figures["written"] == 20
