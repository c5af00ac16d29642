"""``truenas-simulator``: a TrueNAS middleware simulator for trying the operator without a NAS.

Serves JSON-RPC over WebSocket (``/api/current``), REST v2.0 on 25.x profiles, and a control API
under ``/_simulator/`` for out-of-band changes, knobs and call counters.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import ssl
import sys
from pathlib import Path

from .profiles import PROFILES
from .server import SimulatorServer
from .simulator import Simulator
from .state import GIB, ApiKey, Knobs
from .tls import CertificateAuthority, server_context


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="truenas-simulator", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--profile", default="25.10", help=f"TrueNAS version to behave as: {', '.join(PROFILES)} (default 25.10)"
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8443, help="port (default 8443; 0 picks a free one)")
    parser.add_argument("--tls", action="store_true", help="serve HTTPS/WSS with a certificate from a fresh local CA")
    parser.add_argument("--cert-dir", type=Path, default=Path(".run/simulator-tls"), help="where --tls writes ca.crt")
    parser.add_argument("--cert", type=Path, help="serve this PEM certificate (with --key) instead")
    parser.add_argument("--key", type=Path, help="private key for --cert")
    parser.add_argument(
        "--api-key", help="accepted API key '<id>-<secret>' (default: a random one, see --api-key-file)"
    )
    parser.add_argument(
        "--api-key-file",
        type=Path,
        default=Path(".run/simulator-api-key"),
        help="where a generated key is written (mode 0600)",
    )
    parser.add_argument("--job-duration", type=float, default=0.5, help="seconds each job works (default 0.5)")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds added to every call")
    parser.add_argument("--host-memory-gib", type=int, default=64, help="host memory limit for instances")
    parser.add_argument("--host-cores", type=int, default=16, help="host cores limit for instances")
    parser.add_argument(
        "--error-rate", action="append", default=[], metavar="METHOD=RATE", help="fail METHOD with probability RATE"
    )
    parser.add_argument("--seed-file", type=Path, help="JSON list of instances to start with (control API fields)")
    parser.add_argument("--port-file", type=Path, help="write the chosen port here once listening")
    return parser


def make_simulator(args: argparse.Namespace) -> Simulator:
    keys = None
    if args.api_key:
        ident, _, secret = args.api_key.partition("-")
        if not ident.isdigit() or not secret:
            raise SystemExit("--api-key must look like '<id>-<secret>', e.g. 1-abcdef")
        keys = [ApiKey(id=int(ident), secret=secret)]
    error_rates = {}
    for item in args.error_rate:
        method, _, rate = item.partition("=")
        error_rates[method] = float(rate)
    knobs = Knobs(
        job_duration=args.job_duration,
        latency=args.latency,
        host_memory=args.host_memory_gib * GIB,
        host_cores=args.host_cores,
        error_rates=error_rates,
    )
    sim = Simulator(args.profile, knobs=knobs, api_keys=keys)
    if args.seed_file:
        for fields in json.loads(args.seed_file.read_text()):
            sim.seed_instance(**fields)
    return sim


def tls_setup(args: argparse.Namespace) -> tuple[ssl.SSLContext | None, bytes | None]:
    """The serving context and the certificate it serves (SCRAM's channel binding checks its hash)."""
    context, certificate = None, None
    if args.cert:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(args.cert, args.key)
        certificate = Path(args.cert).read_bytes()  # the leaf comes first: SCRAM binds to it
    elif args.tls:
        context = server_context(
            CertificateAuthority.load_or_create(args.cert_dir, "truenas-simulator CA"),
            args.cert_dir,
            ["localhost", args.host],
        )
        certificate = (Path(args.cert_dir) / "server.crt").read_bytes()
    return context, certificate


async def serve(args: argparse.Namespace) -> None:
    sim = make_simulator(args)
    context, certificate = tls_setup(args)
    server = await SimulatorServer(
        sim, host=args.host, port=args.port, ssl_context=context, certificate=certificate
    ).start()
    if args.port_file:
        args.port_file.write_text(str(server.port))
    print(f"TrueNAS simulator ({sim.profile.system_version}) listening on {server.url}", flush=True)
    print(f"  JSON-RPC:  {server.ws_url}/api/current", flush=True)
    if sim.profile.has_rest:
        print(f"  REST:      {server.url}/api/v2.0", flush=True)
    print(f"  control:   {server.url}/_simulator/state", flush=True)
    if args.tls and not args.cert:
        print(f"  CA:        {args.cert_dir / 'ca.crt'}", flush=True)
    if not args.api_key:
        args.api_key_file.parent.mkdir(parents=True, exist_ok=True)
        args.api_key_file.touch(mode=0o600)
        args.api_key_file.write_text(sim.api_key)
        print(f"  API key:   written to {args.api_key_file}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        asyncio.run(serve(args))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
