"""tessera-issuer: the certificate authority daemon."""

from __future__ import annotations

import argparse
import signal
import sys
import threading

from tessera import logs
from tessera.errors import ConfigError, TesseraError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tessera-issuer", description="Tessera issuer: the CA daemon")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the issuer")
    run.add_argument("--config", required=True, help="path of issuer.yaml")
    args = parser.parse_args(argv)

    from issuer import config as config_mod

    try:
        cfg = config_mod.load(args.config)
        logs.setup(cfg.log_level)
        from issuer.server import IssuerServer

        server = IssuerServer(cfg)
        server.start()
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
