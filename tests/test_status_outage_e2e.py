"""Status through outages, end to end (issue 21 items 1 and 3): a refused key (the operator restarted
with a bad key file) and an unreachable NAS keep what was observed (phase Unknown, Ready Unknown since
then), the immutability rules still hold, and a retried failing create never reports Synced=True."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from truenas_simulator import SimulatorThread
from truenas_simulator.images import write_mirror

from .conftest import Cluster
from .harness import ADOPT_ANYWHERE, Harness, OperatorProcess, operator_env, start_simulator, unique, write_policy

pytestmark = pytest.mark.e2e  # needs the local control plane (kube-apiserver + etcd)

KEPT = ("instanceId", "binding", "cpu", "memory", "autostart", "ipAddresses", "image")
SPECS = {
    "container": {"type": "CONTAINER", "image": "debian/bookworm", "cpu": "2", "memory": "1Gi"},
    "vm": {"type": "VM", "image": "debian/bookworm", "cpu": "2", "memory": "2Gi", "rootDiskSize": "10Gi"},
}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def own_operator(cluster: Cluster, namespace: str, workdir: Path, **env: str) -> Iterator[Harness]:
    """An operator of its own (it is restarted), serving /healthz, with a TLS simulator whose CA
    outlives a restart of the simulator."""
    sim = start_simulator("25.10", cert_dir=workdir / "certs", job_duration=0.05, auth_fail_delay=0.0)
    mirror = write_mirror(list(sim.sim.images.values()), workdir / "mirror")
    env = {
        **operator_env(sim, workdir, TIO_VM_IMAGE_SERVER=str(mirror)),
        **write_policy(workdir, ADOPT_ANYWHERE),
        **env,
    }
    health = f"http://127.0.0.1:{free_port()}/healthz"
    operator = OperatorProcess(cluster, env, workdir / "operator.log", args=["-n", namespace, f"--liveness={health}"])
    operator.env["HEALTH_URL_FOR_TEST"] = health
    running = Harness(cluster, sim, operator.start(), workdir)
    try:
        yield running
    finally:
        running.operator.stop()
        running.sim.stop()


@pytest.fixture
def outage(cluster: Cluster, namespace: str, tmp_path: Path) -> Iterator[Harness]:
    yield from own_operator(cluster, namespace, tmp_path)


def healthz(harness: Harness) -> dict[str, Any]:
    """The operator's /healthz, or {} while it does not answer yet."""
    try:
        with urllib.request.urlopen(harness.operator.env["HEALTH_URL_FOR_TEST"], timeout=5) as response:
            result: dict[str, Any] = json.load(response)
            return result
    except OSError:
        return {}


def _condition(status: dict[str, Any], kind: str) -> dict[str, Any]:
    return next((c for c in status.get("conditions", []) if c["type"] == kind), {})


def _unobserved(reason: str) -> Any:
    def check(status: dict[str, Any]) -> bool:
        synced = _condition(status, "Synced")
        return status.get("phase") == "Unknown" and (synced.get("status"), synced.get("reason")) == ("False", reason)

    return check


def _assert_kept(status: dict[str, Any], seen: dict[str, Any], reason: str) -> None:
    for key in KEPT:
        assert status.get(key) == seen.get(key), (key, status)
    ready = _condition(status, "Ready")
    assert (ready["status"], ready["reason"]) == ("Unknown", "NotObserved"), ready
    assert "not been observed since" in ready["message"] and reason in ready["message"], ready
    assert "does not exist" not in json.dumps(status)


def _refused(harness: Harness, namespace: str, name: str, patch: dict[str, Any]) -> str:
    result = harness.cluster.kubectl(
        "patch", "incusinstance", name, "-n", namespace, "--type=merge", "-p", json.dumps({"spec": patch}), check=False
    )
    assert result.returncode != 0, f"{patch} was accepted during the outage"
    assert "immutable" in result.stderr, result.stderr
    return result.stderr


@pytest.mark.parametrize("kind", sorted(SPECS))
def test_an_outage_keeps_the_observation_and_the_immutability(outage: Harness, namespace: str, kind: str) -> None:
    harness, spec = outage, SPECS[kind]
    name = unique(kind)
    harness.apply(namespace, name, spec)
    seen = harness.wait_ready(namespace, name, timeout=180 if kind == "vm" else 60)
    assert seen.get("instanceId"), seen
    key_file = harness.workdir / "api-key"
    good_key = key_file.read_text()

    # 1. A wrong key: the operator restarted with a bad key file.
    harness.operator.stop()
    key_file.write_text(good_key.split("-", 1)[0] + "-" + "x" * 64)
    harness.operator.start()
    status = harness.wait_status(
        namespace, name, "Unknown/AuthenticationFailed", _unobserved("AuthenticationFailed"), 90
    )
    _assert_kept(status, seen, "AuthenticationFailed")
    assert harness.cluster.wait_for(lambda: healthz(harness), 30, what="healthz")["truenas"] == {
        "<default>": "AuthenticationFailed"
    }
    _refused(harness, namespace, name, {"image": "ubuntu/noble"})
    _refused(harness, namespace, name, {"name": "renamed"})

    # The key fixed: the same instance, the same image, Ready again.
    harness.operator.stop()
    key_file.write_text(good_key)
    harness.operator.start()
    back = harness.wait_ready(namespace, name, timeout=90)
    assert back["instanceId"] == seen["instanceId"] and back["binding"] == seen["binding"]
    assert harness.get(namespace, name)["spec"]["image"] == "debian/bookworm"

    # 2. The NAS unreachable (stopped), then back on the same address with the same state.
    sim = harness.sim
    port = sim.port = sim.server.port  # type: ignore[union-attr]
    sim.stop()
    status = harness.wait_status(namespace, name, "Unknown/Unreachable", _unobserved("Unreachable"), 120)
    _assert_kept(status, seen, "Unreachable")
    _refused(harness, namespace, name, {"image": "ubuntu/noble"})
    revived = SimulatorThread(sim.sim, tls=True, port=port, cert_dir=harness.workdir / "certs").start()
    harness.sim = revived
    back = harness.wait_ready(namespace, name, timeout=120)
    assert back["instanceId"] == seen["instanceId"] and back["binding"] == seen["binding"]
    if kind == "vm":  # vm.* names have no '-'
        assert revived.run(lambda: revived.sim.vms.by_name(name.replace("-", "_"))) is not None
    else:
        assert name in harness.instance_names(revived)
    assert seen["binding"]["image"] == "debian/bookworm" and seen["binding"]["name"] == name, seen


class StatusWatch:
    """Every version of one object's status the API server sends (``kubectl get -w``)."""

    def __init__(self, cluster: Cluster, namespace: str, name: str) -> None:
        self.statuses: list[dict[str, Any]] = []
        self.process = subprocess.Popen(
            [str(cluster.bin_dir / "kubectl"), "--kubeconfig", str(cluster.kubeconfig), "get", "incusinstance",
             name, "-n", namespace, "-w", "-o", "json"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )  # fmt: skip
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        decoder, buffer = json.JSONDecoder(), ""
        for line in self.process.stdout:
            buffer += line
            while buffer.strip():
                try:
                    item, end = decoder.raw_decode(buffer.lstrip())
                except json.JSONDecodeError:
                    break
                buffer = buffer.lstrip()[end:]
                self.statuses.append(item.get("status") or {})

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)
        self.reader.join(timeout=10)
        if self.process.stdout is not None:
            self.process.stdout.close()


def test_synced_does_not_flap_while_a_failing_create_is_retried(outage: Harness, namespace: str) -> None:
    harness = outage
    harness.sim.run(lambda: harness.sim.sim.knobs.error_rates.update({"virt.instance.create": 1.0}))
    name = unique("flap")
    # Connected first: the first failure is then the create's (JobFailed), not Connecting.
    harness.cluster.wait_for(lambda: healthz(harness).get("truenas") == {"<default>": "ready"}, 60, what="healthz")
    harness.apply(namespace, name, {"cpu": "1"})
    watch = StatusWatch(harness.cluster, namespace, name)  # kubectl get -w needs the object to exist
    try:
        # Several retries (backoff 0.5 s doubling to 4 s): each writes Creating, then the failure.
        harness.cluster.wait_for(
            lambda: (
                sum(1 for s in watch.statuses if s.get("phase") == "Creating") >= 4
                and harness.calls().get("virt.instance.create", 0) >= 4
            ),
            timeout=90,
            what="four create attempts",
        )
        harness.sim.run(lambda: harness.sim.sim.knobs.error_rates.clear())
        harness.wait_ready(namespace, name, timeout=60)
        time.sleep(1.0)  # the last versions reach the watch
    finally:
        watch.stop()
    synced = [_condition(s, "Synced") for s in watch.statuses if _condition(s, "Synced")]
    first_false = next(i for i, c in enumerate(synced) if c["status"] == "False")
    first_true = next(i for i, c in enumerate(synced) if i > first_false and c["status"] == "True")
    failing = synced[first_false:first_true]
    assert len({c["reason"] for c in failing}) == 1, failing  # one reason, never "in sync" in between
    assert len({c["lastTransitionTime"] for c in failing}) == 1, failing  # no transition until success
    assert all(c["status"] == "True" for c in synced[first_true:]), synced[first_true:]
    creating = [s for s in watch.statuses if s.get("phase") == "Creating"]
    assert len(creating) >= 4
    # The Events: from the operator, one per distinct problem, with an action.
    events = harness.events(namespace, name)
    assert sorted(e["reason"] for e in events) == ["Created", "JobFailed"], events  # one per distinct problem
    for event in events:
        assert event["source"]["component"] == event["reportingComponent"] == "truenas-incus-operator", event
        assert event["reportingInstance"] not in ("", "dev") and event["action"] != "Action?", event
    table = harness.cluster.kubectl("get", "incusinstance", name, "-n", namespace).stdout.splitlines()
    start = table[0].index("SYNCED")  # columns by position: an empty one (MEMORY here) shifts split()
    assert table[1][start:].split()[0] == "True", table


def test_logs_name_the_object_and_can_be_json(cluster: Cluster, namespace: str, tmp_path: Path) -> None:
    for log_format in ("text", "json"):
        workdir = tmp_path / log_format
        workdir.mkdir()
        running = own_operator(cluster, namespace, workdir, TIO_LOG_FORMAT=log_format)
        harness = next(running)
        try:
            name = unique(f"log-{log_format}")
            harness.apply(namespace, name, {"image": "plan9/4th"})  # refused: a line about the object
            harness.wait_synced_false(namespace, name, "ImageNotFound", timeout=60)
            harness.wait_event(namespace, name, "ImageNotFound")
            harness.delete(namespace, name)
        finally:
            next(running, None)
        lines = [line for line in harness.operator.logs().splitlines() if line.strip()]
        about = [line for line in lines if name in line]
        assert about, lines[-20:]
        if log_format == "json":
            records = [json.loads(line) for line in lines]  # every line is one JSON object
            assert all("timestamp" in r and "severity" in r and "message" in r for r in records)
            mine = [r for r in records if (r.get("object") or {}).get("name") == name]
            assert mine and all(r["object"]["namespace"] == namespace for r in mine), about
        else:
            assert all(re.match(r"\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", line) for line in about), about
            assert all(f"[{namespace}/{name}]" in line for line in about), about


def test_secure_only_once_a_connection_was_verified(outage: Harness, namespace: str) -> None:
    harness = outage
    name = harness.connect_namespace(namespace, harness.sim, name="nas")
    url = harness.sim.ws_url
    harness.cluster.kubectl(
        "patch", "truenasconnection", name, "-n", namespace, "--type=merge",
        "-p", json.dumps({"spec": {"url": "wss://127.0.0.1:9"}}),
    )  # fmt: skip

    def conditions() -> dict[str, tuple[str, str]]:
        status = harness.cluster.get("truenasconnection", name, namespace).get("status") or {}
        return {c["type"]: (c["status"], c["reason"]) for c in status.get("conditions", [])}

    def shows(ready: tuple[str, str], secure: tuple[str, str]) -> Any:
        return lambda: (lambda c: c.get("Ready") == ready and c.get("Secure") == secure)(conditions())

    # Nothing listens there: nothing was verified, so Secure is not True.
    harness.cluster.wait_for(shows(("False", "Unreachable"), ("Unknown", "NotVerified")), 60, what="NotVerified")
    harness.cluster.kubectl(
        "patch", "truenasconnection", name, "-n", namespace, "--type=merge", "-p", json.dumps({"spec": {"url": url}})
    )
    harness.cluster.wait_for(shows(("True", "Connected"), ("True", "Verified")), 60, what="Verified")
