"""What one tenant cannot do to the others or to the operator: deny deletion with a spec the model
refuses, starve the shared connection, exhaust memory through a server of its own, reach another
namespace's NICs or names, or adopt through another spelling of the NAS. Each test replays one hole
a security review of the trust work (issue 11) found, as a hostile tenant. All failed on the code the review saw (commit 37ffc0e) and pass since the fixes
(R1-R6 in the commit "Review fixes: ..."); the docstrings keep the attack, impact and fix.

A tenant may manage IncusInstances and TrueNASConnections and create Secrets in its own namespace,
may not read Secrets, may not write status, has no access to the operator's namespace, and shares
the NAS with other tenants through the operator's default connection. The administrator's policy
and the chart are trusted.

Most tests use the fakes (tests/fakes.py); the admission test needs the local control plane and is
marked e2e.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

import pytest
from aiohttp import web
from pydantic import ValidationError

from truenas_incus_operator.connections import Connection, ConnectionConfig, truenas_identity
from truenas_incus_operator.instances.resource import LoopState
from truenas_incus_operator.models import IncusInstanceSpec
from truenas_incus_operator.policy import Grant, Policy, Rule
from truenas_incus_operator.problems import OperatorError
from truenas_incus_operator.truenas import Secret, TransportError, TrueNASClient
from truenas_incus_operator.truenas.transports.base import ConnectionOptions
from truenas_incus_operator.truenas.transports.rest import RestTransport

from .conftest import Cluster
from .fakes import FakeBackend, FakeOperator, NoTransport, fake_operator, resource


def no_wake() -> None:
    return None


async def one_pass(fake: FakeOperator, body: dict[str, Any]) -> LoopState:
    state = LoopState(status={})
    await fake.operator.loops.reconcile_once(body, state, no_wake)
    return state


# ----- R1: a spec admission accepts but the operator's model refuses makes deletion crash ------------------
async def test_deleting_a_resource_whose_spec_the_model_refuses_still_deletes_its_instance() -> None:
    """Attack: create an instance normally, then set an environment value made only of a Unicode
    space, e.g. ``{"X": "\\u00a0"}`` (or ``"\\x0b"``, ``"\\u2003"``), then delete the resource (or the
    namespace). Admission's rule ``!self[k].matches('^\\\\s*$')`` uses RE2, whose ``\\s`` is ASCII
    only, so the API server accepts it; the model's ``not item.strip()`` uses Python's Unicode
    whitespace and refuses it. ``Deletion.delete`` calls ``desired_from(body)`` before anything
    else, pydantic's ``ValidationError`` escapes the kopf delete handler (only ``OperatorError`` is
    turned into a TemporaryError), and kopf retries it for ever.

    Impact: the resource keeps its finalizer for ever, so the namespace never finishes deleting
    (a tenant can do this on purpose to wedge namespace deletion), and the instance is never deleted
    on TrueNAS (leaked; ``deletionPolicy: Orphan`` does not help, it is read from the same spec).

    Fix: make the models and the CRD agree (``item.strip(" \\t\\n\\r\\f")`` or ASCII-only, or CEL
    that refuses the same characters), and make deletion independent of the spec's validity: read
    only what it needs (uid, deletionPolicy, connectionRef) without validating the whole spec, and
    turn any remaining ValidationError into a reported OperatorError.
    """
    fake = fake_operator()
    await one_pass(fake, resource())
    assert "web01" in fake.backend.instances
    edited = resource(environment={"X": "\u00a0"}, deleting=True, generation=2)
    for retry in range(3):  # a reported, retried problem (OperatorError) is acceptable; a crash is not
        with contextlib.suppress(OperatorError):
            await fake.operator.deletion.delete(edited, retry)
            break
    assert "web01" not in fake.backend.instances, "the instance was left on TrueNAS"


@pytest.mark.e2e
@pytest.mark.parametrize("value", ["\u00a0", "\x0b", "\u2003", " \t", "\r\n", "x\u00a0"])
def test_admission_and_the_model_agree_on_blank_environment_values(
    cluster: Cluster, namespace: str, value: str
) -> None:
    """Attack (the admission half of the finding above): ``environment: {X: "\\u00a0"}`` is
    accepted by the API server although the operator's model refuses it as blank.

    Impact: every spec admission accepts must parse in the operator, or the resource can only be
    reported InvalidSpec (never reconciled) and, worse, cannot be deleted (see the test above).

    Fix: refuse the same characters in CEL (e.g. ``matches('^[\\\\s\\\\x{85}\\\\x{a0}\\\\x{1680}
    \\\\x{2000}-\\\\x{200a}\\\\x{2028}\\\\x{2029}\\\\x{202f}\\\\x{205f}\\\\x{3000}\\\\x0b\\\\x1c-\\\\x1f]*$')``)
    or relax the model to RE2's ASCII ``\\s``; add a test that feeds both with every whitespace.
    """
    spec = {"type": "CONTAINER", "image": "debian/bookworm", "environment": {"X": value}}
    manifest = {"apiVersion": "incus.truenas.io/v1alpha1", "kind": "IncusInstance", "metadata": {"name": "ws"}}
    result = cluster.kubectl(
        "apply",
        "--dry-run=server",
        "-n",
        namespace,
        "-f",
        "-",
        input=json.dumps({**manifest, "spec": spec}),
        check=False,
    )
    try:
        IncusInstanceSpec.model_validate(spec)
        model_accepts = True
    except ValidationError:
        model_accepts = False
    # Closed by reading blank as RE2 does (ASCII \s): every spec admission accepts parses in the operator.
    assert (result.returncode == 0) == model_accepts, (value, result.stderr)
    if not model_accepts:
        assert "blank" in result.stderr


# ----- R2: a noisy neighbour starves every other tenant of the default connection's job slots ---------------
class GuestIgnoresShutdown(FakeBackend):
    """A guest whose init ignores the shutdown signal: a graceful stop lasts the whole timeout."""

    async def stop(self, name: str, timeout: int | None = None, force: bool = False) -> None:
        self._log(f"stop {name}")
        if not force and name.startswith("hog"):
            await asyncio.sleep(timeout or 0)
        await super().stop(name, timeout, force)


async def test_one_tenant_cannot_starve_others_of_the_shared_connection() -> None:
    """Attack: a tenant on the default connection creates 20 instances whose init ignores SIGPWR
    (any image with ``trap '' PWR``, or simply a busy guest) and sets ``powerState: Stopped`` with
    ``stopTimeoutSeconds: 3600`` (the admitted maximum). ``Executor.stop`` holds one of the
    connection's ``job_slots`` (20 by default, shared by every namespace using the connection) for
    the whole graceful stop.

    Impact: for an hour every other tenant on the default connection can neither create, start,
    stop nor delete (deletion waits on the same slots, so namespace deletions hang too). Repeatable
    at will (Running/Stopped flip).

    Fix: share slots fairly (a per-namespace or per-resource cap well below the connection's total,
    e.g. ``max(1, slots // 4)``), do not hold a slot while waiting out a graceful stop (TrueNAS runs
    the job; the operator only needs a slot to submit it and can poll), and/or let the policy cap
    ``stopTimeoutSeconds``.
    """
    fake = fake_operator(GuestIgnoresShutdown())
    for i in range(20):
        await one_pass(fake, resource(f"hog{i}", namespace="team-a"))
    hogs = [
        asyncio.create_task(
            one_pass(
                fake,
                resource(f"hog{i}", namespace="team-a", generation=2, powerState="Stopped", stopTimeoutSeconds=3600),
            )
        )
        for i in range(20)
    ]
    try:
        await asyncio.sleep(0.1)
        try:
            await asyncio.wait_for(one_pass(fake, resource("victim", namespace="team-b")), 3)
        except TimeoutError:
            pytest.fail("tenant team-b's create waited behind tenant team-a's graceful stops (all job slots held)")
    finally:
        for task in hogs:
            task.cancel()
    assert "victim" in fake.backend.instances


# ----- R3: a hostile "TrueNAS" (any URL a tenant names) can exhaust the shared operator's memory ------------
async def test_rest_transport_bounds_the_size_of_an_answer() -> None:
    """Attack: a tenant creates a TrueNASConnection (``transport: rest``) to a server of its own
    (with a key Secret of its own, so no rule refuses it) that answers ``GET /api/v2.0/system/version``
    with an endless or huge body. ``RestTransport`` reads whole bodies (httpx, no limit) and parses
    them; the WebSocket transport caps a message at 64 MiB but not the number of messages (an
    endless stream of ``collection_update`` ADDED events grows the connection's cache without bound).

    Impact: the operator, shared by all tenants, is OOM-killed and restarts into the same connection
    (crash loop): nobody's instances are reconciled or deleted. The test uses 72 MiB; the same
    server with an endless body takes any amount.

    Fix: stream REST answers and refuse more than a few MiB (``client.stream`` + a byte counter, or
    httpx ``max_content_length``-style check on ``Content-Length`` and the stream), lower the
    WebSocket cap to what TrueNAS really sends (a few MiB), and bound the cache (instances per
    connection) and the size of strings copied into status (``version``).
    """
    size = 72 * 2**20

    async def version(request: web.Request) -> web.StreamResponse:
        answer = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
        await answer.prepare(request)
        await answer.write(b'"')
        for _ in range(size // 2**20):
            await answer.write(b"a" * 2**20)
        await answer.write(b'"')
        return answer

    app = web.Application()
    app.router.add_get("/api/v2.0/system/version", version)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    transport = RestTransport(ConnectionOptions(url=f"http://127.0.0.1:{port}", api_key=Secret("1-" + "a" * 64)))
    try:
        with pytest.raises(TransportError, match="larger than 32 MiB; refused"):
            await transport.connect()  # never read and kept whole
    finally:
        await transport.close()
        await runner.cleanup()


# ----- R4: the policy's NIC rules look only at spec.nics -------------------------------------------------------
def test_nic_parents_also_govern_nics_declared_under_devices() -> None:
    """Attack: the policy restricts NICs (``nicParents: [br-tenants]``). The tenant declares the NIC
    under ``spec.devices`` instead of ``spec.nics``: ``{name: n1, type: NIC, extra: {network:
    admin-net}}``. ``extra`` may not set ``nic_type``/``parent``/``mac``, but TrueNAS 25.04/25.10's
    virt NIC also takes ``network`` (an Incus managed network, schemas v25_*.virt.device.json),
    which is not an owned key; ``_nic_parents`` never looks at ``spec.devices``; ``device_payload``
    passes ``network`` through to ``virt.instance.device_add``.

    Impact: the tenant's instance joins any managed network on the NAS (another tenant's or the
    administrator's), whatever ``nicParents`` says.

    Fix: refuse ``type: NIC`` in ``spec.devices`` (NICs only through ``spec.nics``), or add
    ``network`` to EXTRA_NIC_OWNED_KEYS and, if managed networks are wanted, a typed ``spec.nics[].network``
    checked by a policy list; mirror it in the admission policy.
    """
    # Closed by refusing extra.network on a NIC (the model here, the CRD's CEL at admission: the
    # generated rule uses the same EXTRA_NIC_OWNED_KEYS), so no such spec reaches the policy.
    with pytest.raises(ValidationError, match="network"):
        IncusInstanceSpec.model_validate(
            {
                "type": "CONTAINER",
                "image": "debian/bookworm",
                "devices": [{"name": "n1", "type": "NIC", "extra": {"network": "admin-net"}}],
            }
        )
    # A NIC declared under devices without extra has no parent: the default network, as in spec.nics.
    policy = Policy(default_rule=Rule(nic_parents=["br-tenants"]))
    plain = IncusInstanceSpec.model_validate(
        {"type": "CONTAINER", "image": "debian/bookworm", "devices": [{"name": "n1", "type": "NIC"}]}
    )
    assert not policy.violations("team-a", "<default>", plain, "web")


# ----- R5: the name prefix {namespace}- does not separate namespaces --------------------------------------------
def test_instance_name_prefix_keeps_one_namespace_out_of_anothers_names() -> None:
    """Attack: the policy gives every namespace ``instanceNamePrefix: "{namespace}-"`` (the README's
    example) so that names cannot be squatted. Namespace ``team`` creates ``team-b-web``: it starts
    with ``team-``, so it is allowed, and it is exactly the name namespace ``team-b`` will want
    (instance names are global per NAS; namespace names may contain '-').

    Impact: one tenant squats another's names (their creates end in Conflict/AlreadyExists), which is
    what the prefix was meant to prevent.

    Fix: refuse a name that also falls in another namespace's prefix (the operator can list
    namespaces, or keep the claim in the ledger), or use a prefix form no namespace name can extend
    (e.g. derive it from a hash, or require the remainder not to start with a label that makes
    ``{namespace}-...`` another existing namespace's prefix); document the limitation meanwhile.
    """
    policy = Policy(default_rule=Rule(instance_name_prefix="{namespace}-"))
    spec = IncusInstanceSpec.model_validate({"type": "CONTAINER", "image": "debian/bookworm", "name": "team-b-web"})
    assert policy.violations("team", "<default>", spec, "squat"), "namespace team took a name of namespace team-b"


# ----- R6: one NAS, two ledger identities ------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("one", "other"),
    [
        ("wss://nas.example/api/current", "wss://nas.example./api/current"),
        ("wss://[::1]/api/current", "wss://[0:0:0:0:0:0:0:1]/api/current"),
    ],
)
def test_the_ledger_identity_does_not_depend_on_how_the_host_is_spelled(one: str, other: str) -> None:
    """Attack: reach the NAS through a TrueNASConnection whose URL spells the host differently from
    the default connection (trailing dot, a non-canonical IPv6 form). ``truenas_identity``
    only lower-cases the host, so these are different ledger identities for one TrueNAS.

    Impact: see the next test: ownership recorded under one spelling is invisible under the other.

    Fix: canonicalise the host (strip one trailing dot, ``ipaddress.ip_address(...).compressed`` for
    IP literals, IDNA-encode names) and, better, key the ledger on an identity TrueNAS itself
    reports (e.g. ``system.host_id`` / ``system.info`` hostid) once logged in.
    """
    assert truenas_identity(one) == truenas_identity(other)


async def test_an_alias_url_cannot_adopt_an_instance_another_tenant_owns() -> None:
    """Attack: tenant A owns ``web01`` through the default connection (``wss://nas.invalid``).
    Tenant B, in a namespace where the administrator allows adoption (meant for instances nobody
    manages), has a TrueNASConnection to the same NAS spelled ``wss://nas.invalid.`` and an
    IncusInstance ``web01`` annotated ``incus.truenas.io/adopt: "true"``. The ledger has no record
    under ``nas.invalid.:443``, so B adopts A's instance, rewrites it, and deleting B's resource
    deletes A's instance.

    Impact: cross-tenant takeover and deletion through the operator, bypassing the ledger's
    "one owner per instance" rule (needs adoption allowed for B and a second spelling of the NAS
    that B's key may be sent to: a Secret without allowed-hosts, or the administrator's own
    connections using an IP in one namespace and a name in another).

    Fix: as above (canonical identity, ideally TrueNAS's host id), and refuse adoption when the
    instance's TrueNAS id (``status.instanceId`` / instance id) is in any ledger record.
    """
    fake = fake_operator(policy=Policy(adoption=[Grant(namespaces=["team-b"], connections=["team-b/*"])]))
    await one_pass(fake, resource("web01", namespace="team-a", uid="uid-a"))
    assert "web01" in fake.backend.instances
    alias = Connection(
        "team-b/nas",
        ConnectionConfig(url="wss://nas.invalid./api/current", api_key=Secret("1-tenant-b")),
        resync_seconds=30.0,
    )
    client = TrueNASClient(NoTransport(), fake.backend, (25, 10), "TrueNAS-25.10.1")  # type: ignore[arg-type]
    alias.attach(client, fake.backend.instances.values())
    fake.operator.connections.connections["team-b/nas"] = alias
    thief = resource(
        "web01",
        namespace="team-b",
        uid="uid-b",
        annotations={"incus.truenas.io/adopt": "true"},
        connectionRef={"name": "nas"},
        environment={"OWNED": "by-b"},
    )
    await one_pass(fake, thief)
    assert fake.backend.instances["web01"].environment != {"OWNED": "by-b"}, "tenant B rewrote tenant A's instance"
    assert not fake.operator.ledger.owned_by("uid-b"), "tenant B now owns tenant A's instance in the ledger"
