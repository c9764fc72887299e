"""tessera-issuer: the certificate authority daemon."""

from __future__ import annotations

import argparse
import gc
import os
import signal
import socket
import sys
import threading

from tessera import fdlimits, logs
from tessera.configfile import split_address
from tessera.errors import ConfigError, TesseraError
from tessera.version import add_version_flag


def check_can_listen(key: str, address: str, share: bool = False) -> None:
    """Fail before anything starts (and logs) when a listen address is taken or not ours to bind.

    The gRPC server would fail too, but only after the issuer's start-up logging and with its own
    error lines; SO_REUSEADDR as gRPC sets it, so a previous run's TIME_WAIT sockets do not count.
    With `share` (share_port), SO_REUSEPORT too: a port held with it by a peer of the same user is ours to share.
    """
    host, port = split_address(address)
    if not port:
        return
    try:
        infos = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise ConfigError(f"{key}: cannot resolve {host!r}: {e.strerror}") from None
    for family, kind, proto, _, sockaddr in infos:
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if share:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            try:
                s.bind(sockaddr)
            except OSError as e:
                raise ConfigError(f"{key}: cannot listen on {address}: {e.strerror}") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tessera-issuer", description="Tessera issuer: the CA daemon")
    add_version_flag(parser)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the issuer")
    run.add_argument("--config", required=True, help="path of issuer.yaml")
    run.add_argument("--accept-restored-database", action="store_true",
                     help="start on a database behind this issuer's high-water mark (restored from an older backup): "
                          "record it, move CRL numbers past what sidecars saw, and go on from that database")
    args = parser.parse_args(argv)

    # grpc-core writes a line to stderr for every failed TLS handshake (INFO), which any peer can cause at
    # will: only its errors, unless the operator asks for more. Read when grpc is first imported, below.
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    from issuer import config as config_mod

    try:
        # All the descriptors we may have: the listeners' caps are derived from this (tessera/fdlimits.py).
        # Too few refuses the start here, before anything is written.
        fdlimits.connection_caps(fdlimits.raise_nofile_limit())
        cfg = config_mod.load(args.config)
        for key in ("listen_address", "bootstrap_address", "metrics_address"):
            if getattr(cfg, key):
                check_can_listen(key, getattr(cfg, key), cfg.share_port and key != "metrics_address")
        logs.setup(cfg.log_level)
        from issuer.app import IssuerApp

        server = IssuerApp(cfg, accept_restored_database=args.accept_restored_database)
        server.start()
        # Modules, code and start-up state live as long as the process: out of the cyclic collector's
        # way, full collections stay short (measured under load: longest pause 66 ms -> 24 ms).
        gc.freeze()
    except (ConfigError, TesseraError, OSError) as e:
        print(f"tessera-issuer: {getattr(e, 'message', None) or e}", file=sys.stderr)
        return 2

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(1.0):
        pass
    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
