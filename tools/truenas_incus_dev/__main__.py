"""``python -m truenas_incus_dev start|controlplane`` (from the checkout, with ``PYTHONPATH=tools``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _controlplane(args: argparse.Namespace) -> int:
    from .localcluster import run_forever

    return run_forever(Path(args.dir))


def _start(args: argparse.Namespace) -> int:
    from .demo import start

    return start(Path(args.dir))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m truenas_incus_dev", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    main = commands.add_parser(
        "start",
        help="the main job: the operator against KUBECONFIG + TIO_TRUENAS_URL, else a local demo with simulators",
    )
    main.add_argument("--dir", default=".run", help="working folder (default: .run)")
    main.set_defaults(func=_start)
    plane = commands.add_parser("controlplane", help="start a local etcd + kube-apiserver until Ctrl-C")
    plane.add_argument("--dir", default=".run/controlplane", help="working folder (default: .run/controlplane)")
    plane.set_defaults(func=_controlplane)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
