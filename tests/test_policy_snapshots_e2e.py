"""The policy's snapshot rules at admission, on a real API server: the chart's second
ValidatingAdmissionPolicy refuses a new IncusInstanceSnapshot or IncusInstanceRestore, naming the
rules, exactly where every rule that may apply to the namespace forbids it (the connection is the
IncusInstance's, which admission cannot read), and agrees with policy.py there."""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from truenas_incus_operator.policy import DEFAULT_CONNECTION, Policy, SnapshotVerb

from .conftest import Cluster
from .test_chart import CHART, KUBE_VERSION, helm

pytestmark = pytest.mark.e2e  # needs the local control plane (kube-apiserver + etcd, helm)

KINDS: dict[SnapshotVerb, str] = {"snapshot": "IncusInstanceSnapshot", "restore": "IncusInstanceRestore"}
VALUES = """
policy:
  rules:
    # team: restores refused on the default connection, and on every other (a catch-all rule).
    - namespaces: ["snapteam-*"]
      connections: ["<default>"]
      snapshots: {{restore: false}}
    - namespaces: ["snapteam-*"]
      connections: ["*"]
      snapshots: {{restore: false, maxPerInstance: 3}}
    # mixed: snapshots and restores refused on the default connection only; elsewhere defaultRule.
    - namespaces: ["snapmixed-*"]
      connections: ["<default>"]
      snapshots: {{snapshot: false, restore: false}}
    # locked: neither, on any connection (connections left out: every one).
    - namespaces: ["snaplocked-*"]
      snapshots: {{snapshot: false, restore: false}}
  defaultRule:
    snapshots: {{snapshot: false}}
watch:
  namespaces: [{namespaces}]
"""


@dataclass
class Installed:
    namespaces: dict[str, str]  # "team" -> "snapteam-<suffix>"
    policy: Policy  # as the operator loads it from the same values


def manifest(verb: SnapshotVerb, name: str) -> dict[str, Any]:
    spec: dict[str, Any] = {"instanceRef": {"name": "web"}}
    if verb == "restore":
        spec["truenasSnapshot"] = "auto-2026-01-01_00-00"
    return {"apiVersion": "incus.truenas.io/v1alpha1", "kind": KINDS[verb], "metadata": {"name": name}, "spec": spec}


def create(cluster: Cluster, verb: SnapshotVerb, name: str, namespace: str) -> Any:
    return cluster.apply(manifest(verb, name), namespace)


@pytest.fixture(scope="module")
def installed(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installed]:
    cluster.kubectl(
        "wait", "--for=condition=Established", "crd/incusinstancesnapshots.incus.truenas.io",
        "crd/incusinstancerestores.incus.truenas.io", "--timeout=60s",
    )  # fmt: skip
    suffix = uuid.uuid4().hex[:6]
    namespaces = {kind: f"snap{kind}-{suffix}" for kind in ("team", "mixed", "locked", "other")}
    for ns in namespaces.values():
        cluster.kubectl("create", "namespace", ns)
    # A restore from before the policy, in a namespace where restores are now refused.
    legacy = create(cluster, "restore", "legacy", namespaces["team"])
    assert legacy.returncode == 0, legacy.stderr
    values = Path(tmp_path_factory.mktemp("snapshot-policy")) / "values.yaml"
    values.write_text(VALUES.format(namespaces=", ".join(namespaces.values())))
    release = f"snap-{suffix}"
    rendered = helm(
        "template", release, str(CHART), "-n", "tio-system", "--kube-version", KUBE_VERSION, "-f", str(values),
    ).stdout  # fmt: skip
    documents = [d for d in yaml.safe_load_all(rendered) if d]
    secret = next(d for d in documents if d["kind"] == "Secret" and d["metadata"]["name"].endswith("-policy"))
    policy = Policy.model_validate(yaml.safe_load(base64.b64decode(secret["data"]["policy.yaml"])))
    admission = [
        d
        for d in documents
        if d["kind"].startswith("ValidatingAdmissionPolicy") and "snapshot" in d["metadata"]["name"]
    ]
    assert [d["kind"] for d in admission] == ["ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"]
    text = yaml.safe_dump_all(admission)
    applied = cluster.kubectl("apply", "-f", "-", input=text, check=False)
    assert applied.returncode == 0, applied.stderr
    # The API server compiles and starts enforcing a new policy asynchronously.
    deadline = time.monotonic() + 30
    while create(cluster, "snapshot", "probe", namespaces["locked"]).returncode == 0:
        cluster.kubectl("delete", "incusinstancesnapshot", "probe", "-n", namespaces["locked"], "--wait=false")
        assert time.monotonic() < deadline, "the snapshot admission policy never took effect"
        time.sleep(0.5)
    name = f"{release}-truenas-incus-operator-snapshot-policy"
    vap = json.loads(cluster.kubectl("get", "validatingadmissionpolicy", name, "-o", "json").stdout)
    assert not vap.get("status", {}).get("typeChecking", {}).get("expressionWarnings"), vap["status"]
    try:
        yield Installed(namespaces, policy)
    finally:
        cluster.kubectl("delete", "-f", "-", input=text, check=False)


# (namespace, verb, refused by: the rules the message names, or None: admitted)
CASES: list[tuple[str, SnapshotVerb, list[str] | None]] = [
    ("team", "snapshot", None),
    ("team", "restore", ["policy.rules[0]", "policy.rules[1]"]),  # up to the catch-all rule
    ("mixed", "snapshot", ["policy.rules[2]", "policy.defaultRule"]),
    ("mixed", "restore", None),  # the default connection refuses it, a TrueNASConnection may not: the operator's
    ("locked", "snapshot", ["policy.rules[3]"]),
    ("locked", "restore", ["policy.rules[3]"]),
    ("other", "snapshot", ["policy.defaultRule"]),
    ("other", "restore", None),
]


@pytest.mark.parametrize("where,verb,refusers", CASES, ids=[f"{w}-{v}" for w, v, _ in CASES])
def test_admission_refuses_where_every_rule_that_may_apply_forbids(
    cluster: Cluster, installed: Installed, where: str, verb: SnapshotVerb, refusers: list[str] | None
) -> None:
    namespace = installed.namespaces[where]
    name = f"{verb}-{uuid.uuid4().hex[:6]}"
    result = create(cluster, verb, name, namespace)
    # policy.py with the instance's connection, for both kinds of connection the namespace can use.
    operator = [
        installed.policy.snapshot_violation(namespace, c, verb) for c in (DEFAULT_CONNECTION, f"{namespace}/nas")
    ]
    kind = KINDS[verb]
    if refusers is None:
        assert result.returncode == 0, result.stderr
        assert not all(operator), "admitted although the operator refuses it on every connection"
        return
    assert result.returncode != 0, f"{kind} in {namespace} was admitted"
    labels = ", ".join(f"{r}.snapshots.{verb}" for r in refusers)
    assert "ValidatingAdmissionPolicy" in result.stderr, result.stderr
    assert f"{labels}: kind {kind}: namespace {namespace} may not " in result.stderr, result.stderr
    assert "on any connection it may use" in result.stderr
    assert all(operator), "admission is never stricter than the operator"
    assert {v.rule for v in operator if v} <= {f"{r}.snapshots.{verb}" for r in refusers}
    listed = cluster.kubectl("get", kind.lower(), "-n", namespace, "-o", "name").stdout
    assert name not in listed


def test_an_existing_restore_can_still_be_annotated_and_deleted(cluster: Cluster, installed: Installed) -> None:
    """Creates only: the operator's metadata and status patches, and deletion, never wait on the policy."""
    namespace = installed.namespaces["team"]
    annotated = cluster.kubectl(
        "annotate", "incusinstancerestore", "legacy", "-n", namespace, "example.org/touched=yes", check=False
    )
    assert annotated.returncode == 0, annotated.stderr
    status = json.dumps({"status": {"phase": "Failed"}})
    patched = cluster.kubectl(
        "patch", "incusinstancerestore", "legacy", "-n", namespace, "--subresource=status", "--type=merge",
        "-p", status, check=False,
    )  # fmt: skip
    assert patched.returncode == 0, patched.stderr
    deleted = cluster.kubectl("delete", "incusinstancerestore", "legacy", "-n", namespace, check=False)
    assert deleted.returncode == 0, deleted.stderr


def test_instances_are_not_judged_by_the_snapshot_policy(cluster: Cluster, installed: Installed) -> None:
    namespace = installed.namespaces["locked"]
    instance = {
        "apiVersion": "incus.truenas.io/v1alpha1",
        "kind": "IncusInstance",
        "metadata": {"name": "web"},
        "spec": {"type": "CONTAINER", "image": "debian/bookworm"},
    }
    result = cluster.apply(instance, namespace)
    assert result.returncode == 0, result.stderr
