"""Command line: ``truenas-incus-operator run|crd|doctor|import`` (also ``python -m truenas_incus_operator``).

The local control plane and the demo are development tooling: ``tools/truenas_incus_dev``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .settings import Settings

CHART_CRDS = "charts/truenas-incus-operator/files/crds"


def _crd(args: argparse.Namespace) -> int:
    from .crd import all_crds, render, write_crds

    if args.stdout:
        sys.stdout.write("---\n".join(render(crd) for crd in all_crds()))
        return 0
    for output in (args.output, CHART_CRDS):
        for path in write_crds(Path(output)):
            print(f"wrote {path}")
    return 0


def _check_policy() -> str | None:
    """Why the administrator's policy (TIO_POLICY_FILE) cannot be used, or None."""
    from .policy import PolicyError, load_policy
    from .settings import Settings

    try:
        load_policy(Settings().policy_file)
    except PolicyError as exc:
        return str(exc)
    return None


def _run(args: argparse.Namespace) -> int:
    import asyncio
    import contextlib
    import logging
    from collections.abc import Coroutine

    from .settings import Settings

    problem = _check_policy()
    if problem is not None:
        print(f"truenas-incus-operator: refusing to start: {problem}", file=sys.stderr)
        return 2

    import kopf

    from . import handlers  # noqa: F401 - registers the handlers

    patterns = any(any(ch in ns for ch in "*?[!") for ns in args.namespace or [])
    clusterwide = args.all_namespaces or not args.namespace
    if clusterwide or not patterns:

        @kopf.on.startup()
        def no_scanning(settings: kopf.OperatorSettings, **_: object) -> None:
            # Cluster-wide or named namespaces (not patterns) need no watch of namespaces, and the
            # CRDs are looked up once at startup: so no cluster-wide RBAC for them, and a CRD being
            # deleted stays served. kopf's CRD watch would stop serving it (a terminating CRD loses
            # the "patch" verb in discovery, though its resources can still be patched), and the
            # finalizers of its resources would then never be removed: the CRD delete would hang.
            # The cost: the CRDs must exist when the operator starts (Helm and make run install
            # them first); glob patterns still need the namespace watch, and with it kopf's.
            settings.scanning.disabled = True

    # Timestamps, and the object's namespace/name on every line about one (kopf's and ours, see
    # resource.about); TIO_LOG_FORMAT=json: one JSON object a line, the object under "object".
    json_logs = Settings().log_format == "json"
    log_format = kopf.LogFormat.JSON if json_logs else kopf.LogFormat.FULL
    kopf.configure(verbose=args.verbose, debug=args.debug, log_format=log_format, log_prefix=not json_logs)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)

    settings = Settings()
    watched = None if args.all_namespaces or not args.namespace or patterns else list(args.namespace)

    def operator() -> Coroutine[None, None, None]:
        # Standalone: kopf's peering is not used; TIO_LEADER_ELECTION elects over a Lease (election.py).
        return kopf.operator(
            standalone=True,
            clusterwide=clusterwide,
            namespaces=args.namespace or (),
            liveness_endpoint=args.liveness,
            memo=kopf.Memo(namespaces=watched),  # what handlers.startup lists (instances/users.py)
        )

    problems = asyncio.run(_preconditions(settings, watched, scanning=patterns))
    if problems:
        for problem in problems:
            print(f"truenas-incus-operator: refusing to start: {problem}", file=sys.stderr)
        return 2
    if not settings.leader_election:
        with contextlib.suppress(asyncio.CancelledError):
            asyncio.run(operator())
        return 0

    from .election import run_elected

    with contextlib.suppress(asyncio.CancelledError):
        return asyncio.run(run_elected(settings, args.liveness, operator))
    return 0


async def _preconditions(settings: Settings, namespaces: list[str] | None, scanning: bool) -> list[str]:
    """The ledger namespace, the CRDs and their served version, and the RBAC (app.check_preconditions)."""
    from .app import check_preconditions
    from .kube import Kube
    from .problems import OperatorError

    kube = Kube(settings.kube_timeout_seconds)
    try:
        return await check_preconditions(settings, kube, namespaces, scanning)
    except OperatorError as exc:
        return [f"cannot check the cluster's preconditions: {exc.problem.message}"]
    finally:
        await kube.close()


def _doctor(args: argparse.Namespace) -> int:
    from .doctor import main as doctor

    return doctor(args)


def _import(args: argparse.Namespace) -> int:
    from .importer import main as importer

    return importer(args)


def _settings_help() -> str:
    """Every TIO_* setting ``run`` reads, with its default (from settings.py, so it stays complete)."""
    import textwrap

    from .settings import Settings

    lines = ['configuration (environment; README.md, "Configuration"):']
    for name, info in Settings.model_fields.items():
        if info.default_factory is not None:
            default = "computed"
        elif info.default is None:
            default = "unset"
        else:
            default = str(getattr(info.default, "value", info.default))
        lines.append(f"  TIO_{name.upper()} (default {default})")
        lines += textwrap.wrap(info.description or "", width=96, initial_indent="      ", subsequent_indent="      ")
    return "\n".join(lines)


def add_doctor_arguments(doctor: argparse.ArgumentParser) -> None:
    """doctor's options (also ``kubectl truenas doctor``)."""
    doctor.add_argument("-f", "--file", action="append", help="an IncusInstance manifest to check (repeatable)")
    doctor.add_argument("--json", action="store_true", help="machine-readable output")
    doctor.add_argument("--timeout", type=float, default=15.0, help="seconds per connection attempt and call")


DOCTOR_DESCRIPTION = (
    "Reachability, TLS (the presented certificate when untrusted), version and API family, the key's roles, "
    "virtualization, the image registry, the VM image server, and for the given manifests what the operator "
    "would refuse (VMs it cannot create, missing images, memory the NAS lacks) or leave unhonoured. Connects "
    "with the TIO_TRUENAS_* settings (TIO_TRUENAS_URL, TIO_TRUENAS_API_KEY_FILE, TIO_TRUENAS_CA_FILE, ...). "
    "Never writes. Exit code 1 when a blocking problem is found."
)
IMPORT_DESCRIPTION = (
    "Lists the instances of the NAS (virt.instance, container.*, vm.*) and prints an IncusInstance manifest for "
    "each: type, image where TrueNAS knows it, cpu, memory, autostart, power state, environment, storage pool, "
    "devices and NICs, with spec.managementPolicy ObserveOnly (or the adopt annotation with --adopt) and "
    "spec.deletionPolicy Orphan. What the CRD cannot express is listed in YAML comments above each manifest "
    "(TrueNAS's text escaped; each manifest is read back before it is written). Connects as doctor does (the "
    "TIO_TRUENAS_* settings), or through a TrueNASConnection with --connection. Never writes to TrueNAS: every "
    "call but a read is refused before it is sent."
)


def add_import_arguments(imports: argparse.ArgumentParser) -> None:
    """import's options (also ``kubectl truenas import``)."""
    imports.add_argument(
        "--connection",
        metavar="NAMESPACE/NAME",
        help="use this TrueNASConnection and its Secrets (read with your kubeconfig's user); the manifests name "
        "it in spec.connectionRef and go to its namespace",
    )
    imports.add_argument(
        "--adopt",
        action="store_true",
        help="manifests that take the instances over (the adopt annotation, Full) instead of observing them; an "
        "instance whose image TrueNAS does not know, or whose manifest leaves out what Full would then change (a "
        "device the CRD cannot express, its power state), stays ObserveOnly with a note saying why",
    )
    imports.add_argument("-n", "--namespace", help="metadata.namespace of the manifests (default: none)")
    imports.add_argument(
        "-o",
        "--output",
        help="a file, or a folder (ending in /, or existing) for one file per instance; default: stdout",
    )
    imports.add_argument("--timeout", type=float, default=30.0, help="seconds per connection attempt and call")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="truenas-incus-operator", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser(
        "run",
        help="run the operator (configuration: the TIO_* environment, listed by run --help)",
        description="Run the operator against the cluster of the kubeconfig (KUBECONFIG, else ~/.kube/config) "
        "or the pod's service account.",
        epilog=_settings_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument(
        "-n", "--namespace", action="append", help="watch this namespace or glob pattern (repeatable); default: all"
    )
    run.add_argument("-A", "--all-namespaces", action="store_true", help="watch every namespace")
    run.add_argument("--liveness", default=None, help="serve kopf's health endpoint, e.g. http://0.0.0.0:8080/healthz")
    run.add_argument("-v", "--verbose", action="store_true", help="log at info level (kopf's verbose)")
    run.add_argument("--debug", action="store_true", help="log at debug level (kopf's debug; chart: logLevel=debug)")
    run.set_defaults(func=_run)

    crd = commands.add_parser("crd", help="write the CRD manifests generated from the models")
    crd.add_argument("--output", default="crds", help="folder to write into (default: crds)")
    crd.add_argument("--stdout", action="store_true", help="print the manifests instead")
    crd.set_defaults(func=_crd)

    doctor = commands.add_parser(
        "doctor",
        help="check a NAS before installing, read-only (the same TIO_TRUENAS_* settings as run)",
        description=DOCTOR_DESCRIPTION,
    )
    add_doctor_arguments(doctor)
    doctor.set_defaults(func=_doctor)

    imports = commands.add_parser(
        "import",
        help="print IncusInstance manifests for the instances a NAS has, read-only",
        description=IMPORT_DESCRIPTION,
    )
    add_import_arguments(imports)
    imports.set_defaults(func=_import)

    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
