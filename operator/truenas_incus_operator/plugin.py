"""``kubectl truenas``: the operator's kubectl plugin (the ``kubectl-truenas`` console script; kubectl
runs any ``kubectl-<name>`` on PATH as ``kubectl <name>``).

It talks to the Kubernetes API as the user does (the kubeconfig's current context, or ``-n``), with
the user's own RBAC: it never reads the operator's Secrets nor uses the operator's credentials.
``import`` and ``doctor`` talk to TrueNAS with the user's settings, as the operator's own commands do.

- ``status NAME``: the IncusInstance, its connection, its ownership record, its conditions, its
  snapshots and its last Events, on one screen (``-o json|yaml`` for scripts);
- ``pause NAME`` / ``resume NAME``: the ``incus.truenas.io/paused`` annotation, and the status that
  follows;
- ``snapshot NAME`` / ``restore NAME``: an IncusInstanceSnapshot / IncusInstanceRestore, waited for
  with its progress (phase and message as they change);
- ``import``, ``doctor``: the same as ``truenas-incus-operator import|doctor``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TextIO

import yaml

from .instances.ledger import LEDGER_LABEL
from .models import API_GROUP, API_VERSION, PAUSED_ANNOTATION
from .problems import OperatorError

INSTANCES, SNAPSHOTS, RESTORES, CONNECTIONS = (
    "incusinstances",
    "incusinstancesnapshots",
    "incusinstancerestores",
    "truenasconnections",
)
EVENTS_SHOWN = 10


class Failed(Exception):
    """What the plugin tells the user before exiting 1 (no traceback)."""


def _conditions(obj: dict[str, Any] | None) -> list[dict[str, Any]]:
    status = (obj or {}).get("status") or {}
    return [c for c in status.get("conditions") or [] if isinstance(c, dict)]


def _condition(obj: dict[str, Any] | None, kind: str) -> dict[str, Any]:
    return next((c for c in _conditions(obj) if c.get("type") == kind), {})


async def gather_status(kube: Any, namespace: str, name: str, ledger_namespace: str) -> dict[str, Any]:
    """Everything ``status`` shows, as data (``-o json`` prints it as it is)."""
    instance = await kube.read_object(INSTANCES, namespace, name)
    if instance is None:
        raise Failed(f"IncusInstance {namespace}/{name} does not exist (or you may not read it)")
    spec = instance.get("spec") or {}
    ref = (spec.get("connectionRef") or {}).get("name")
    connection: dict[str, Any] = {"name": f"{namespace}/{ref}" if ref else "<default> (the operator's own)"}
    if ref:
        found = await _optional(kube.read_object(CONNECTIONS, namespace, ref))
        if isinstance(found, str):
            connection["error"] = found
        elif found is None:
            connection["error"] = "does not exist"
        else:
            connection["spec"] = {k: v for k, v in (found.get("spec") or {}).items() if k in ("url", "transport")}
            connection["conditions"] = _conditions(found)
    uid = (instance.get("metadata") or {}).get("uid")
    records = await _optional(kube.list_configmaps(ledger_namespace, f"{LEDGER_LABEL}=true"))
    ownership: dict[str, Any]
    if isinstance(records, str):
        ownership = {"error": f"cannot read the ledger in namespace {ledger_namespace}: {records}"}
    else:
        mine = [r.get("data") or {} for r in records or [] if (r.get("data") or {}).get("ownerUID") == uid]
        ownership = {
            "records": [
                {k: d.get(k) for k in ("instance", "truenas", "state", "connection", "deletionPolicy") if d.get(k)}
                for d in mine
            ]
        }
    snapshots = await _optional(kube.list_objects(SNAPSHOTS, namespace))
    taken = [] if isinstance(snapshots, str) else [
        {
            "name": s["metadata"]["name"],
            "phase": (s.get("status") or {}).get("phase"),
            "snapshot": (s.get("status") or {}).get("snapshotName"),
            "created": (s.get("status") or {}).get("creationTime"),
        }
        for s in snapshots or []
        if ((s.get("spec") or {}).get("instanceRef") or {}).get("name") == name
    ]  # fmt: skip
    events = await _optional(kube.list_events(namespace, name, kind="IncusInstance", uid=uid or None))
    recent = [] if isinstance(events, str) else sorted(events or [], key=_event_time)[-EVENTS_SHOWN:]
    status = instance.get("status") or {}
    return {
        "instance": {
            "name": f"{namespace}/{name}",
            "uid": uid,
            "paused": ((instance.get("metadata") or {}).get("annotations") or {}).get(PAUSED_ANNOTATION) == "true",
            "spec": spec,
            "phase": status.get("phase"),
            "message": status.get("message"),
            "observed": {k: status.get(k) for k in ("instanceId", "cpu", "memory", "autostart", "ipAddresses")},
            "conditions": _conditions(instance),
        },
        "connection": connection,
        "ownership": ownership,
        "snapshots": {
            "resources": taken,
            "onTrueNAS": status.get("snapshotCount"),
            "newest": [s.get("name") for s in (status.get("snapshots") or [])[:5]],
        },
        "events": [
            {
                "time": _event_time(e),
                "type": e.get("type"),
                "reason": e.get("reason"),
                "message": e.get("message"),
                "count": e.get("count"),
            }
            for e in recent
        ],
    }


async def _optional(call: Any) -> Any:
    """The call's answer, or the reason it failed as text (403: the user's RBAC does not allow it)."""
    try:
        return await call
    except OperatorError as exc:
        return exc.problem.message


def _event_time(event: dict[str, Any]) -> str:
    return str(event.get("lastTimestamp") or event.get("eventTime") or event.get("firstTimestamp") or "")


def _shown(value: Any) -> str:
    """A value for the terminal: lists joined, and no control characters (an Event's message is written
    by whoever may create Events in the namespace: no escape sequence reaches the user's terminal)."""
    text = ", ".join(map(str, value)) if isinstance(value, list) else str(value)
    return "".join(ch if ch.isprintable() else "?" for ch in text)


def render_status(data: dict[str, Any]) -> str:
    """``status`` for a terminal: one screen."""
    instance, lines = data["instance"], []
    ready: dict[str, Any] = next((c for c in instance["conditions"] if c.get("type") == "Ready"), {})
    head = f"IncusInstance {instance['name']}: {instance.get('phase') or 'no status yet'}"
    if ready:
        head += f", Ready={ready.get('status')} ({ready.get('reason')})"
    if instance["paused"]:
        head += ", PAUSED"
    lines.append(head)
    spec = instance["spec"]
    described = [str(spec.get("type")), str(spec.get("image") or spec.get("source") or "(no image)")]
    described += [f"{k} {spec[k]}" for k in ("cpu", "memory", "powerState", "managementPolicy") if spec.get(k)]
    lines.append(f"  spec:        {', '.join(described)}")
    if instance.get("message"):
        lines.append(f"  instance:    {instance['message']}")
    observed = {k: v for k, v in instance["observed"].items() if v not in (None, [], "")}
    if observed:
        lines.append("  observed:    " + ", ".join(f"{k} {_shown(v)}" for k, v in observed.items()))
    connection = data["connection"]
    shown = connection["name"]
    if "error" in connection:
        shown += f": {connection['error']}"
    for condition in connection.get("conditions", []):
        if condition.get("type") == "Ready":
            shown += f": Ready={condition.get('status')} ({condition.get('reason')}) {condition.get('message', '')}"
    lines.append(f"  connection:  {shown}")
    ownership = data["ownership"]
    if "error" in ownership:
        lines.append(f"  ownership:   {ownership['error']}")
    elif not ownership["records"]:
        lines.append("  ownership:   no ledger record (it created, adopted and observes nothing yet)")
    for record in ownership.get("records", []):
        lines.append(
            f"  ownership:   {record.get('state')} {record.get('instance')} on {record.get('truenas')}"
            + (f" (deletionPolicy {record['deletionPolicy']})" if record.get("deletionPolicy") else "")
        )
    lines.append("  conditions:")
    for condition in instance["conditions"]:
        lines.append(
            f"    {condition.get('type', ''):<8} {condition.get('status', ''):<7} {condition.get('reason', ''):<22} "
            f"{condition.get('message', '')}"
        )
    snapshots = data["snapshots"]
    listed = ", ".join(f"{s['name']} ({s['phase']})" for s in snapshots["resources"]) or "none"
    lines.append(f"  snapshots:   IncusInstanceSnapshots: {listed}")
    if snapshots.get("onTrueNAS") is not None:
        lines.append(f"               on TrueNAS: {snapshots['onTrueNAS']}, newest {', '.join(snapshots['newest'])}")
    lines.append(f"  events (last {EVENTS_SHOWN}):")
    for event in data["events"] or [{"time": "", "type": "", "reason": "none", "message": ""}]:
        lines.append(
            f"    {event['time']:<20} {event['type'] or '':<7} {event['reason'] or '':<22} {event['message'] or ''}"
        )
    return "\n".join(_shown(line) for line in lines) + "\n"


def emit(data: Any, output: str | None, text: Callable[[Any], str], out: TextIO) -> None:
    if output == "json":
        out.write(json.dumps(data, indent=2, default=str) + "\n")
    elif output == "yaml":
        out.write(yaml.safe_dump(data, sort_keys=False, default_flow_style=False))
    else:
        out.write(text(data))


async def set_paused(kube: Any, namespace: str, name: str, paused: bool, wait: float, out: TextIO) -> dict[str, Any]:
    try:
        await kube.patch_annotations(INSTANCES, namespace, name, {PAUSED_ANNOTATION: "true" if paused else None}, True)
    except OperatorError as exc:
        raise Failed(f"cannot {'pause' if paused else 'resume'} {namespace}/{name}: {exc.problem.message}") from None
    out.write(f"{'paused' if paused else 'resumed'} IncusInstance {namespace}/{name}\n")
    deadline = time.monotonic() + wait
    body: dict[str, Any] | None = None
    while time.monotonic() < deadline:
        body = await kube.read_object(INSTANCES, namespace, name)
        shown = _condition(body, "Paused").get("status") == "True"
        if shown == paused:
            synced = _condition(body, "Synced")
            out.write(
                _shown(f"  Synced={synced.get('status')} ({synced.get('reason')}): {synced.get('message', '')}") + "\n"
            )
            return body or {}
        await asyncio.sleep(0.5)
    if wait:
        out.write("  the operator has not reported it yet (is it running and watching this namespace?)\n")
    return body or {}


async def create_and_wait(
    kube: Any,
    plural: str,
    namespace: str,
    body: dict[str, Any],
    done: tuple[str, ...],
    failed: str,
    wait: float,
    out: TextIO,
) -> dict[str, Any]:
    """Creates the object, then prints each new phase and message until ``done`` or ``failed``."""
    name = body["metadata"]["name"]
    kind = body["kind"]
    try:
        await kube.create_object(plural, namespace, body)
    except OperatorError as exc:
        raise Failed(f"cannot create {kind} {namespace}/{name}: {exc.problem.message}") from None
    out.write(f"created {kind} {namespace}/{name}\n")
    deadline = time.monotonic() + wait
    last: tuple[Any, Any] | None = None
    current: dict[str, Any] = {}
    while time.monotonic() < deadline:
        current = await kube.read_object(plural, namespace, name) or {}
        phase = (current.get("status") or {}).get("phase")
        message = _condition(current, "Ready").get("message")
        if (phase, message) != last and phase is not None:
            out.write(_shown(f"  {datetime.now(UTC).strftime('%H:%M:%S')} {phase}: {message or ''}") + "\n")
            out.flush()
            last = (phase, message)
        if phase in done:
            return current
        if phase == failed:
            raise Failed(f"{kind} {namespace}/{name} failed: {message}")
        await asyncio.sleep(0.5)
    raise Failed(f"{kind} {namespace}/{name} is not done after {wait:.0f} s (still {last[0] if last else 'pending'})")


def _stamp() -> str:
    return datetime.now(UTC).strftime("%Y%m%d-%H%M%S")


async def _run(args: argparse.Namespace, out: TextIO) -> int:
    from .kube import Kube, context_namespace
    from .settings import Settings

    namespace = args.namespace or context_namespace()
    kube = Kube(args.request_timeout, prefer_kubeconfig=True)
    try:
        if args.verb == "status":
            data = await gather_status(kube, namespace, args.name, args.ledger_namespace or Settings().ledger_namespace)
            emit(data, args.output, render_status, out)
        elif args.verb in ("pause", "resume"):
            await set_paused(kube, namespace, args.name, args.verb == "pause", args.wait, out)
        elif args.verb == "snapshot":
            spec: dict[str, Any] = {"instanceRef": {"name": args.name}}
            if args.consistency:
                spec["consistency"] = args.consistency
            body = _object("IncusInstanceSnapshot", args.snapshot_name or f"{args.name}-{_stamp()}", spec)
            found = await create_and_wait(kube, SNAPSHOTS, namespace, body, ("Ready",), "Failed", args.wait, out)
            status = found.get("status") or {}
            out.write(_shown(f"snapshot {status.get('snapshotName')} of {_shown(status.get('datasets') or [])}") + "\n")
        elif args.verb == "restore":
            spec = {"instanceRef": {"name": args.name}}
            if args.from_snapshot:
                spec["snapshotRef"] = {"name": args.from_snapshot}
            if args.truenas_snapshot:
                spec["truenasSnapshot"] = args.truenas_snapshot
            if args.allow_destroying_newer_snapshots:
                spec["allowDestroyingNewerSnapshots"] = True
            body = _object("IncusInstanceRestore", args.restore_name or f"{args.name}-restore-{_stamp()}", spec)
            await create_and_wait(kube, RESTORES, namespace, body, ("Succeeded",), "Failed", args.wait, out)
    finally:
        await kube.close()
    return 0


def _object(kind: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": f"{API_GROUP}/{API_VERSION}", "kind": kind, "metadata": {"name": name}, "spec": spec}


def build_parser() -> argparse.ArgumentParser:
    from .__main__ import DOCTOR_DESCRIPTION, IMPORT_DESCRIPTION, add_doctor_arguments, add_import_arguments

    parser = argparse.ArgumentParser(
        prog="kubectl truenas",
        description="The truenas-incus-operator kubectl plugin: status, pause/resume, snapshot/restore, import "
        "and doctor. Kubernetes is reached as kubectl does (KUBECONFIG, the current context, your RBAC).",
    )
    verbs = parser.add_subparsers(dest="verb", required=True)

    def instance_verb(verb: str, summary: str) -> argparse.ArgumentParser:
        sub = verbs.add_parser(verb, help=summary, description=summary)
        sub.add_argument("name", help="the IncusInstance")
        sub.add_argument("-n", "--namespace", help="its namespace (default: the current context's)")
        sub.add_argument("--request-timeout", type=float, default=30.0, help="seconds per Kubernetes request")
        return sub

    status = instance_verb(
        "status",
        "the IncusInstance on one screen: spec, what TrueNAS reports, its connection, its ownership record (when "
        "your RBAC may read the ledger), its conditions, its snapshots and its last Events",
    )
    status.add_argument("-o", "--output", choices=("json", "yaml"), help="machine-readable output")
    status.add_argument(
        "--ledger-namespace", help="where the ownership ledger lives (default: TIO_LEDGER_NAMESPACE, else the chart's)"
    )
    for verb, summary in (
        ("pause", f"set {PAUSED_ANNOTATION}: the operator writes nothing to TrueNAS for the instance until resumed"),
        ("resume", f"remove {PAUSED_ANNOTATION}: the operator reconciles the instance again"),
    ):
        sub = instance_verb(verb, summary)
        sub.add_argument("--wait", type=float, default=30.0, help="seconds to wait for the status to show it (0: none)")
    snapshot = instance_verb("snapshot", "take an IncusInstanceSnapshot of the instance and wait until it is Ready")
    snapshot.add_argument("--snapshot-name", help="the IncusInstanceSnapshot's name (default: NAME-<UTC time>)")
    snapshot.add_argument("--consistency", choices=("Crash", "Stopped"), help="Stopped: stop, snapshot, start again")
    snapshot.add_argument("--wait", type=float, default=300.0, help="seconds to wait (default 300)")
    restore = instance_verb(
        "restore", "roll the instance back in place (an IncusInstanceRestore) and wait until it has succeeded"
    )
    source = restore.add_mutually_exclusive_group(required=True)
    source.add_argument("--from-snapshot", metavar="SNAPSHOT", help="an IncusInstanceSnapshot of the instance")
    source.add_argument("--truenas-snapshot", metavar="NAME", help="a snapshot TrueNAS lists (status.snapshots)")
    restore.add_argument(
        "--allow-destroying-newer-snapshots", action="store_true", help="allow ZFS to destroy newer snapshots"
    )
    restore.add_argument("--restore-name", help="the IncusInstanceRestore's name (default: NAME-restore-<UTC time>)")
    restore.add_argument("--wait", type=float, default=600.0, help="seconds to wait (default 600)")
    summary = "IncusInstance manifests for the instances a NAS has (read-only)"
    add_import_arguments(verbs.add_parser("import", help=summary, description=IMPORT_DESCRIPTION))
    summary = "check a NAS before installing (read-only)"
    add_doctor_arguments(verbs.add_parser("doctor", help=summary, description=DOCTOR_DESCRIPTION))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.verb == "import":
        from .importer import main as importer

        return importer(args)
    if args.verb == "doctor":
        from .doctor import main as doctor

        return doctor(args)
    try:
        return asyncio.run(_run(args, sys.stdout))
    except Failed as exc:
        print(_shown(f"kubectl truenas {args.verb}: {exc}"), file=sys.stderr)
        return 1
    except OperatorError as exc:
        print(_shown(f"kubectl truenas {args.verb}: {exc.problem.message}"), file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
