"""The administrator's policy (policy.py): parsing, which rule applies, and every check, without a cluster."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from truenas_incus_operator.__main__ import main
from truenas_incus_operator.instances.ledger import RecordState
from truenas_incus_operator.instances.resource import LoopState
from truenas_incus_operator.models import IncusInstanceSpec
from truenas_incus_operator.policy import (
    DEFAULT_CONNECTION,
    Policy,
    PolicyError,
    Violation,
    load_policy,
    path_under,
)

from .fakes import TRUENAS, FakeBackend, FakeOperator, fake_operator, observed, resource

NS = "team-a"
TNC = f"{NS}/nas"


def spec(**fields: Any) -> IncusInstanceSpec:
    return IncusInstanceSpec.model_validate({"type": "CONTAINER", "image": "debian/bookworm", **fields})


def disk(source: str, name: str = "data") -> dict[str, Any]:
    return {"name": name, "type": "DISK", "source": source, "destination": "/srv/data"}


def proxy(port: int | str | None, name: str = "http") -> dict[str, Any]:
    extra: dict[str, int | str] = {"source_proto": "TCP", "dest_proto": "TCP", "dest_port": 80}
    if port is not None:
        extra["source_port"] = port
    return {"name": name, "type": "PROXY", "extra": extra}


def policy(**rule: Any) -> Policy:
    """One rule for team-* on every connection."""
    return Policy.model_validate({"rules": [{"namespaces": ["team-*"], **rule}]})


def rules_of(violations: list[Violation]) -> list[tuple[str, str]]:
    return [(v.rule, v.field) for v in violations]


# ----- defaults: the homelab needs no policy ------------------------------------------------------------------
def test_no_file_is_the_default_policy() -> None:
    assert load_policy(None) == Policy()


EVERYTHING_BUT_PASSTHROUGH = spec(
    name="anything",
    storagePool="whatever",
    devices=[
        disk("/mnt/tank/anything"),
        proxy(22),
        {"name": "tpm", "type": "TPM"},
    ],
    nics=[{"name": "eth1", "type": "macvlan", "parent": "enp1s0"}],
)


@pytest.mark.parametrize("connection", [DEFAULT_CONNECTION, TNC, "other/nas"])
@pytest.mark.parametrize("namespace", ["default", NS, "kube-system"])
def test_default_policy_allows_everything_but_passthrough(namespace: str, connection: str) -> None:
    assert Policy().violations(namespace, connection, EVERYTHING_BUT_PASSTHROUGH, "x") == []


@pytest.mark.parametrize("kind", ["USB", "GPU"])
def test_default_policy_refuses_container_passthrough(kind: str) -> None:
    found = Policy().violations(NS, DEFAULT_CONNECTION, spec(devices=[{"name": "pt", "type": kind}]))
    assert rules_of(found) == [("policy.defaultRule.deviceTypes", "spec.devices[pt].type")]
    assert f"{kind} devices are not allowed" in found[0].message


def test_default_policy_refuses_pci_on_a_vm() -> None:
    found = Policy().violations(NS, DEFAULT_CONNECTION, spec(type="VM", devices=[{"name": "pt", "type": "PCI"}]))
    assert rules_of(found) == [("policy.defaultRule.deviceTypes", "spec.devices[pt].type")]


def test_default_policy_allows_no_adoption() -> None:
    assert not Policy().may_adopt(NS, DEFAULT_CONNECTION)
    assert Policy().may_use_default_connection(NS)


# ----- which rule applies -------------------------------------------------------------------------------------
LAYERED = Policy.model_validate(
    {
        "rules": [
            {"namespaces": ["gpu-lab"], "connections": ["<default>"], "deviceTypes": ["DISK", "GPU"]},
            {"namespaces": ["team-*"], "connections": ["team-*/*"], "deviceTypes": ["DISK"]},
            {"namespaces": ["*"], "connections": ["<default>"], "deviceTypes": ["NIC"]},
        ],
        "defaultRule": {"deviceTypes": []},
    }
)


@pytest.mark.parametrize(
    "namespace,connection,expected",
    [
        ("gpu-lab", DEFAULT_CONNECTION, "policy.rules[0]"),
        ("gpu-lab", "gpu-lab/nas", "policy.defaultRule"),
        ("team-a", "team-a/nas", "policy.rules[1]"),
        ("team-a", DEFAULT_CONNECTION, "policy.rules[2]"),
        ("other", DEFAULT_CONNECTION, "policy.rules[2]"),
        ("other", "other/nas", "policy.defaultRule"),
        ("team-a", "team-a/backup", "policy.rules[1]"),
        ("teams", "teams/nas", "policy.defaultRule"),
    ],
)
def test_first_matching_rule_applies(namespace: str, connection: str, expected: str) -> None:
    assert LAYERED.rule_for(namespace, connection)[0] == expected


@pytest.mark.parametrize(
    "namespace,connection,device,refused_by",
    [
        ("gpu-lab", DEFAULT_CONNECTION, "GPU", None),
        ("gpu-lab", DEFAULT_CONNECTION, "USB", "policy.rules[0].deviceTypes"),
        ("team-a", "team-a/nas", "DISK", None),
        ("team-a", "team-a/nas", "GPU", "policy.rules[1].deviceTypes"),
        ("team-a", DEFAULT_CONNECTION, "DISK", "policy.rules[2].deviceTypes"),
        ("other", "other/nas", "DISK", "policy.defaultRule.deviceTypes"),
    ],
)
def test_device_types_per_rule(namespace: str, connection: str, device: str, refused_by: str | None) -> None:
    entry: dict[str, Any] = disk("/mnt/x", "d") if device == "DISK" else {"name": "d", "type": device}
    found = LAYERED.violations(namespace, connection, spec(devices=[entry]))
    assert [v.rule for v in found] == ([refused_by] if refused_by else [])


def test_nics_count_as_nic_devices() -> None:
    found = policy(deviceTypes=["DISK"]).violations(NS, TNC, spec(nics=[{"name": "eth1", "parent": "br0"}]))
    assert rules_of(found) == [("policy.rules[0].deviceTypes", "spec.nics[eth1]")]
    assert policy(deviceTypes=["NIC"]).violations(NS, TNC, spec(nics=[{"name": "eth1"}])) == []


# ----- the default connection ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "globs,namespace,allowed",
    [
        (["*"], "anything", True),
        ([], "anything", False),
        (["home"], "home", True),
        (["home"], "homer", False),
        (["team-?"], "team-a", True),
        (["team-?"], "team-ab", False),
        (["infra-*", "home"], "infra-dns", True),
    ],
)
def test_default_connection_namespaces(globs: list[str], namespace: str, allowed: bool) -> None:
    p = Policy.model_validate({"defaultConnectionNamespaces": globs})
    assert p.may_use_default_connection(namespace) is allowed
    found = p.violations(namespace, DEFAULT_CONNECTION, spec())
    assert rules_of(found) == ([] if allowed else [("policy.defaultConnectionNamespaces", "spec.connectionRef")])
    assert p.violations(namespace, f"{namespace}/nas", spec()) == [], "a TrueNASConnection is not the default one"


@pytest.mark.parametrize(
    "grants,namespace,connection,allowed",
    [
        ([], NS, DEFAULT_CONNECTION, False),
        ([{}], NS, DEFAULT_CONNECTION, True),
        ([{"namespaces": ["home"]}], NS, DEFAULT_CONNECTION, False),
        ([{"namespaces": ["team-*"], "connections": ["team-*/*"]}], NS, TNC, True),
        ([{"namespaces": ["team-*"], "connections": ["team-*/*"]}], NS, DEFAULT_CONNECTION, False),
    ],
)
def test_adoption(grants: list[dict[str, Any]], namespace: str, connection: str, allowed: bool) -> None:
    assert Policy.model_validate({"adoption": grants}).may_adopt(namespace, connection) is allowed


# ----- host paths -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "path,prefix,under",
    [
        ("/mnt/tank/tenants/a", "/mnt/tank/tenants/a", True),
        ("/mnt/tank/tenants/a/data", "/mnt/tank/tenants/a", True),
        ("/mnt/tank/tenants/a/data/", "/mnt/tank/tenants/a", True),
        ("/mnt/tank/tenants/a//data", "/mnt/tank/tenants/a", True),
        ("/mnt/tank/tenants/a/./data", "/mnt/tank/tenants/a", True),
        ("/mnt/tank/tenants/ab", "/mnt/tank/tenants/a", False),  # components, not characters
        ("/mnt/tank/tenants", "/mnt/tank/tenants/a", False),
        ("/mnt/tank/tenants/a/../b", "/mnt/tank/tenants/a", False),
        ("/mnt/tank/tenants/a/..", "/mnt/tank/tenants/a", False),
        ("/mnt/tank/tenants/a/data/../../b", "/mnt/tank/tenants/a", False),
        ("/mnt/tank/tenants/a/..data", "/mnt/tank/tenants/a", True),  # a name, not a traversal
        ("mnt/tank/tenants/a", "/mnt/tank/tenants/a", False),
        ("tenants/a", "/mnt/tank/tenants/a", False),
        ("//mnt/tank/tenants/a", "/mnt/tank/tenants/a", False),
        ("/dev/zvol/tank/a/disk0", "/dev/zvol/tank/a", True),
        ("/anything", "/", True),
    ],
)
def test_path_under(path: str, prefix: str, under: bool) -> None:
    assert path_under(path, prefix) is under


@pytest.mark.parametrize(
    "source,allowed",
    [
        ("/mnt/tank/tenants/team-a", True),
        ("/mnt/tank/tenants/team-a/media", True),
        ("/mnt/tank/shared/iso", True),
        ("/mnt/tank/tenants/team-b/media", False),
        ("/mnt/tank/tenants/team-a/../team-b", False),
        ("/mnt/tank/tenants/team-ab", False),
        ("/mnt/tank/tenants/{namespace}", False),
        ("/mnt/tank", False),
        ("/dev/zvol/tank/tenants/team-a/disk", False),
    ],
)
def test_host_path_prefixes_with_the_namespace(source: str, allowed: bool) -> None:
    p = policy(hostPathPrefixes=["/mnt/tank/tenants/{namespace}", "/mnt/tank/shared/iso"])
    found = p.violations(NS, TNC, spec(devices=[disk(source)]))
    assert rules_of(found) == ([] if allowed else [("policy.rules[0].hostPathPrefixes", "spec.devices[data].source")])
    if not allowed:
        assert source in found[0].message and "/mnt/tank/tenants/team-a" in found[0].message


def test_traversal_is_named() -> None:
    (found,) = policy(hostPathPrefixes=["/mnt/tank"]).violations(NS, TNC, spec(devices=[disk("/mnt/tank/../etc")]))
    assert "'..'" in found.message


def test_host_path_prefixes_cover_cdrom_sources() -> None:
    vm = spec(type="VM", devices=[{"name": "iso", "type": "CDROM", "source": "/mnt/other/x.iso"}])
    found = policy(hostPathPrefixes=["/mnt/tank/iso"]).violations(NS, TNC, vm)
    assert rules_of(found) == [("policy.rules[0].hostPathPrefixes", "spec.devices[iso].source")]


def test_empty_prefix_list_allows_no_host_path() -> None:
    found = policy(hostPathPrefixes=[]).violations(NS, TNC, spec(devices=[disk("/mnt/tank/x")]))
    assert rules_of(found) == [("policy.rules[0].hostPathPrefixes", "spec.devices[data].source")]


def test_every_offending_device_is_named() -> None:
    devices = [disk("/mnt/a", "one"), disk("/mnt/tank/tenants/team-a/ok", "two"), disk("/mnt/b", "three")]
    found = policy(hostPathPrefixes=["/mnt/tank/tenants/{namespace}"]).violations(NS, TNC, spec(devices=devices))
    assert [v.field for v in found] == ["spec.devices[one].source", "spec.devices[three].source"]


# ----- declared addresses (issue 26 item 5) ---------------------------------------------------------------
@pytest.mark.parametrize(
    ("addresses", "allowed"),
    [
        (["192.168.50.20/24"], True),
        (["192.168.50.20/16"], True),  # the address counts, not its prefix
        (["192.168.51.20/24"], False),  # another tenant's range
        (["192.168.50.20/24", "192.168.1.2/24"], False),  # the NAS's LAN
        (["2001:db8:50::20/64"], True),
        (["2001:db8:51::20/64"], False),
    ],
)
def test_declared_addresses_lie_in_the_rules_networks(addresses: list[str], allowed: bool) -> None:
    nics = [{"name": "lan", "hwaddr": "10:66:6a:01:02:03", "addresses": addresses}]
    vm = IncusInstanceSpec.model_validate({"type": "VM", "image": "debian/bookworm", "nics": nics})
    found = policy(addressCIDRs=["192.168.50.0/24", "2001:db8:50::/48"]).violations(NS, TNC, vm)
    assert rules_of(found) == ([] if allowed else [("policy.rules[0].addressCIDRs", "spec.nics[lan].addresses")])
    assert Policy().violations(NS, TNC, vm) == [], "no rule: any address (single tenant)"
    none = policy(addressCIDRs=[]).violations(NS, TNC, vm)
    assert rules_of(none) == [("policy.rules[0].addressCIDRs", "spec.nics[lan].addresses")] * len(addresses)


def test_where_addresses_are_bounded_a_network_config_of_ones_own_is_refused() -> None:
    """Review H1: cloudInit.networkConfig could name any address, past addressCIDRs."""
    vm = IncusInstanceSpec.model_validate(
        {"type": "VM", "image": "debian/bookworm", "cloudInit": {"networkConfig": "version: 2\n"}}
    )
    found = policy(addressCIDRs=["192.168.50.0/24"]).violations(NS, TNC, vm)
    assert rules_of(found) == [("policy.rules[0].addressCIDRs", "spec.cloudInit.networkConfig")]
    assert policy().violations(NS, TNC, vm) == [], "unbounded: a network-config of its own is fine"


def test_an_address_network_that_is_not_one_is_refused_when_the_policy_loads() -> None:
    with pytest.raises(ValueError, match="not a network"):
        policy(addressCIDRs=["192.168.50.0/33"])
    with pytest.raises(ValueError, match="prefix length"):
        policy(addressCIDRs=["192.168.50.1"])
    with pytest.raises(ValueError, match="IPv4-mapped"):  # cidr() would refuse it in the admission policy
        policy(addressCIDRs=["::ffff:192.168.50.0/120"])


# ----- NIC parents ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "nic,allowed",
    [
        ({"name": "eth1", "parent": "br-tenants"}, True),
        ({"name": "eth1", "type": "macvlan", "parent": "br-tenants"}, True),
        ({"name": "eth1", "parent": "br0"}, False),
        ({"name": "eth1", "parent": "enp1s0"}, False),
        ({"name": "eth1"}, True),  # TrueNAS's default network
    ],
)
def test_nic_parents(nic: dict[str, Any], allowed: bool) -> None:
    found = policy(nicParents=["br-tenants"]).violations(NS, TNC, spec(nics=[nic]))
    assert rules_of(found) == ([] if allowed else [("policy.rules[0].nicParents", "spec.nics[eth1].parent")])


# ----- pools ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "pools,pool,allowed",
    [
        (None, None, True),
        (None, "anything", True),
        (["fast"], "fast", True),
        (["fast"], "slow", False),
        (["fast"], None, False),  # TrueNAS's default pool must be allowed explicitly
        (["<default>"], None, True),
        (["<default>"], "fast", False),
        (["<default>", "fast"], "fast", True),
        ([], None, False),
    ],
)
def test_storage_pools(pools: list[str] | None, pool: str | None, allowed: bool) -> None:
    fields = {"storagePool": pool} if pool else {}
    found = policy(storagePools=pools).violations(NS, TNC, spec(**fields))
    assert rules_of(found) == ([] if allowed else [("policy.rules[0].storagePools", "spec.storagePool")])


# ----- PROXY ports ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "port,allowed",
    [
        (8000, True),
        (8999, True),
        ("8080", True),
        (9000, False),
        (7999, False),
        (22, False),
        (2222, True),
        ("http", False),
        (None, False),  # no host port: cannot be judged, so refused
    ],
)
def test_proxy_ports(port: int | str | None, allowed: bool) -> None:
    p = policy(proxyPorts=[{"from": 8000, "to": 8999}, {"from": 2222}])
    found = p.violations(NS, TNC, spec(devices=[proxy(port)]))
    assert rules_of(found) == (
        [] if allowed else [("policy.rules[0].proxyPorts", "spec.devices[http].extra.source_port")]
    )
    if not allowed:
        assert "8000-8999, 2222" in found[0].message


def test_proxy_ports_only_judge_proxies() -> None:
    devices = [disk("/mnt/x"), {"name": "tpm", "type": "TPM"}]
    assert policy(proxyPorts=[]).violations(NS, TNC, spec(devices=devices)) == []
    found = policy(proxyPorts=[]).violations(NS, TNC, spec(devices=[proxy(8080)]))
    assert [v.rule for v in found] == ["policy.rules[0].proxyPorts"]


# ----- instance names ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "spec_name,resource_name,field",
    [
        ("team-a-web", "whatever", None),
        (None, "team-a-web", None),
        ("web", "team-a-web", "spec.name"),  # spec.name wins over metadata.name
        (None, "web", "metadata.name"),
        (None, "team-ab", "metadata.name"),
        ("team-b-web", "x", "spec.name"),
    ],
)
def test_instance_name_prefix(spec_name: str | None, resource_name: str, field: str | None) -> None:
    fields = {"name": spec_name} if spec_name else {}
    found = policy(instanceNamePrefix="{namespace}-").violations(NS, TNC, spec(**fields), resource_name)
    assert rules_of(found) == ([] if field is None else [("policy.rules[0].instanceNamePrefix", field)])
    if field:
        assert "'team-a-'" in found[0].message


# ----- everything at once, and the message ----------------------------------------------------------------
def test_all_violations_are_reported_in_order() -> None:
    p = Policy.model_validate(
        {
            "defaultConnectionNamespaces": ["home"],
            "defaultRule": {
                "deviceTypes": ["DISK", "PROXY", "NIC"],
                "hostPathPrefixes": ["/mnt/tank/tenants/{namespace}"],
                "nicParents": ["br1"],
                "storagePools": ["fast"],
                "proxyPorts": [{"from": 8000, "to": 8999}],
                "instanceNamePrefix": "{namespace}-",
            },
        }
    )
    s = spec(
        storagePool="slow",
        devices=[disk("/mnt/tank/other"), {"name": "gpu0", "type": "GPU"}, proxy(80)],
        nics=[{"name": "eth1", "parent": "br0"}],
    )
    found = p.violations(NS, DEFAULT_CONNECTION, s, "web")
    assert rules_of(found) == [
        ("policy.defaultConnectionNamespaces", "spec.connectionRef"),
        ("policy.defaultRule.deviceTypes", "spec.devices[gpu0].type"),
        ("policy.defaultRule.hostPathPrefixes", "spec.devices[data].source"),
        ("policy.defaultRule.nicParents", "spec.nics[eth1].parent"),
        ("policy.defaultRule.storagePools", "spec.storagePool"),
        ("policy.defaultRule.proxyPorts", "spec.devices[http].extra.source_port"),
        ("policy.defaultRule.instanceNamePrefix", "metadata.name"),
    ]
    assert str(found[2]).startswith("policy.defaultRule.hostPathPrefixes: spec.devices[data].source: /mnt/tank/other")


# ----- loading ----------------------------------------------------------------------------------------------
MULTI_TENANT = """
defaultConnectionNamespaces: [home]
adoption:
  - namespaces: [infra]
rules:
  - namespaces: ["team-*"]
    connections: ["<default>"]
    hostPathPrefixes: ["/mnt/tank/tenants/{namespace}"]
    nicParents: [br-tenants]
    storagePools: ["<default>"]
    proxyPorts: [{from: 20000, to: 20999}]
    instanceNamePrefix: "{namespace}-"
defaultRule:
  deviceTypes: [NIC]
  hostPathPrefixes: []
  storagePools: ["<default>"]
  proxyPorts: []
"""


def test_load_policy(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(MULTI_TENANT)
    loaded = load_policy(path)
    assert loaded.may_adopt("infra", DEFAULT_CONNECTION) and not loaded.may_adopt("team-a", DEFAULT_CONNECTION)
    assert loaded.rules[0].proxy_ports is not None and str(loaded.rules[0].proxy_ports[0]) == "20000-20999"
    path.write_text("")
    assert load_policy(path) == Policy()


def test_chart_example_values_parse() -> None:
    """The multi-tenant example the chart ships is a valid policy (its `policy` block minus `admission`)."""
    import yaml

    from .conftest import ROOT

    values = yaml.safe_load((ROOT / "charts" / "truenas-incus-operator" / "examples" / "multi-tenant.yaml").read_text())
    block = {k: v for k, v in values["policy"].items() if k != "admission"}
    loaded = Policy.model_validate(block)
    assert loaded.may_use_default_connection("team-a") and not loaded.may_use_default_connection("other")
    assert loaded.rule_for("team-a", DEFAULT_CONNECTION)[0] == "policy.rules[0]"
    assert loaded.rule_for("team-a", "team-a/nas")[0] == "policy.defaultRule"
    assert loaded.may_adopt("infra", DEFAULT_CONNECTION) and not loaded.may_adopt("team-a", DEFAULT_CONNECTION)


@pytest.mark.parametrize(
    "text,message",
    [
        ("- a list", "the policy must be a mapping"),
        ("rules: [{deviceTypes: [FLOPPY]}]", "rules.0.deviceTypes.0"),
        ("rules: [{hostPathPrefixes: [relative/path]}]", "rules.0.hostPathPrefixes.0"),
        ("rules: [{hostPathPrefixes: [/mnt/tank/../etc]}]", "without '//', '.' or '..'"),
        ("rules: [{hostPathPrefixes: ['/mnt//tank']}]", "without '//', '.' or '..'"),
        ("rules: [{proxyPorts: [{from: 9000, to: 8000}]}]", "to (8000) is below from (9000)"),
        ("rules: [{proxyPorts: [{from: 70000}]}]", "rules.0.proxyPorts.0.from"),
        ("rules: [{namespaces: ['team-[ab]']}]", "rules.0.namespaces.0"),
        ("rules: [{instanceNamePrefix: 'bad_prefix'}]", "rules.0.instanceNamePrefix"),
        ("defaultConnectionNamespace: [x]", "Extra inputs are not permitted"),
        ("rules: [unclosed", "cannot read the policy file"),
    ],
)
def test_bad_policy_files_are_refused_with_the_reason(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    with pytest.raises(PolicyError) as caught:
        load_policy(path)
    assert message in str(caught.value) and str(path) in str(caught.value)


def test_missing_policy_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="cannot read the policy file"):
        load_policy(tmp_path / "absent.yaml")


# ----- the operator: refused before any TrueNAS call (tests/fakes.py) ------------------------------------------
def fake_with_policy(tmp_path: Path, text: str, backend: FakeBackend | None = None) -> FakeOperator:
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    return fake_operator(backend, policy_file=path)


async def one_pass(fake: FakeOperator, body: dict[str, Any], state: LoopState | None = None) -> LoopState:
    state = state or LoopState(status={})
    await fake.operator.loops.reconcile_once(body, state, lambda: None)
    return state


def synced(fake: FakeOperator, name: str) -> dict[str, Any]:
    last = fake.kube.statuses(name)[-1]
    return next(c for c in last["conditions"] if c["type"] == "Synced")


TEAMS = """
rules:
  - namespaces: ["team-*"]
    hostPathPrefixes: ["/mnt/tank/tenants/{namespace}"]
"""


async def test_operator_refuses_a_host_path_without_touching_truenas(tmp_path: Path) -> None:
    fake = fake_with_policy(tmp_path, TEAMS)
    fake.backend.on_call = fake.kube.calls.append
    body = resource(namespace="team-a", devices=[disk("/mnt/tank/tenants/team-b/secrets")])
    state = await one_pass(fake, body)
    await one_pass(fake, body, state)
    assert fake.backend.calls == [], "no TrueNAS call at all"
    assert "create_configmap" not in fake.kube.calls, "no ownership record: nothing will be created"
    condition = synced(fake, "web01")
    assert (condition["status"], condition["reason"]) == ("False", "PolicyDenied")
    assert condition["message"].startswith("policy.rules[0].hostPathPrefixes: spec.devices[data].source: ")
    assert fake.kube.statuses("web01")[-1]["phase"] == "Error"
    assert [e[1] for e in fake.events] == ["PolicyDenied"], "one Event for two refused passes"


async def test_operator_allows_what_the_rule_allows(tmp_path: Path) -> None:
    fake = fake_with_policy(tmp_path, TEAMS)
    await one_pass(fake, resource(namespace="team-a", devices=[disk("/mnt/tank/tenants/team-a/media")]))
    assert "create web01" in fake.backend.calls
    assert synced(fake, "web01")["reason"] == "ReconcileSuccess"


async def test_a_tightened_policy_stops_changes_but_never_deletes(tmp_path: Path) -> None:
    """An instance the resource created, and a spec change the policy refuses: nothing is written,
    updated, stopped or deleted; the instance stays as it was."""
    backend = FakeBackend(instances={"web01": observed("web01")})
    fake = fake_with_policy(tmp_path, "defaultRule: {deviceTypes: [DISK]}", backend)
    await fake.operator.ledger.claim(
        TRUENAS, "web01", owner_uid="uid-web01", owner="apps/web01", connection="<default>", state=RecordState.CREATED
    )
    body = resource(
        namespace="apps",
        cpu="4",
        devices=[{"name": "gpu0", "type": "GPU"}],
        powerState="Stopped",
    )
    await one_pass(fake, body)
    assert fake.backend.calls == [] and "web01" in fake.backend.instances
    assert fake.backend.instances["web01"].status == "RUNNING"
    assert synced(fake, "web01")["message"] == (
        "policy.defaultRule.deviceTypes: spec.devices[gpu0].type: GPU devices are not allowed (allowed: DISK)"
    )
    # Still its instance: status keeps the id (so admission keeps image, name, ... immutable).
    assert fake.kube.statuses("web01")[-1]["instanceId"] == "web01"


async def test_default_connection_refused_even_while_it_is_down(tmp_path: Path) -> None:
    fake = fake_with_policy(tmp_path, "defaultConnectionNamespaces: [home]")
    fake.connection.detach()
    await one_pass(fake, resource(namespace="team-a"))
    condition = synced(fake, "web01")
    assert condition["reason"] == "PolicyDenied" and condition["message"].startswith(
        "policy.defaultConnectionNamespaces: spec.connectionRef: namespace team-a may not use"
    )
    assert fake.backend.calls == []
    home = fake_with_policy(tmp_path, "defaultConnectionNamespaces: [home]")
    await one_pass(home, resource(namespace="home"))
    assert "create web01" in home.backend.calls


async def test_deleting_resource_is_not_judged(tmp_path: Path) -> None:
    fake = fake_with_policy(tmp_path, "defaultConnectionNamespaces: []")
    await one_pass(fake, resource(deleting=True))
    assert fake.kube.patches == [] and fake.backend.calls == []


def test_build_refuses_a_bad_policy_file(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text("rules: [{deviceTypes: [FLOPPY]}]")
    with pytest.raises(PolicyError, match=r"invalid policy file .*rules\.0\.deviceTypes\.0"):
        fake_operator(policy_file=path)
    with pytest.raises(PolicyError, match="cannot read the policy file"):
        fake_operator(policy_file=tmp_path / "absent.yaml")


def test_command_refuses_to_start_with_a_bad_policy_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text("defaultConnectionNamespaces: ['Bad_NS']")
    monkeypatch.setenv("TIO_POLICY_FILE", str(path))
    assert main(["run", "-A"]) == 2
    err = capsys.readouterr().err
    assert "refusing to start" in err and str(path) in err and "defaultConnectionNamespaces.0" in err
