"""tessera-sidecar: run the sidecar, or use its socket from shell scripts."""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path

from tessera import logs, pem
from tessera.cliutil import Parser, fail, run_main
from tessera.errors import ConfigError, TesseraError

PROG = "tessera-sidecar"


def build_parser() -> Parser:
    p = Parser(prog=PROG, description="Tessera sidecar: local identity for agent processes")
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)
    run = sub.add_parser("run", help="run the sidecar")
    run.add_argument("--config", required=True)
    run.add_argument("--join-token", default=None, help="one-time join token (or join_token in the config)")

    api = sub.add_parser("api", help="Workload API from the shell").add_subparsers(dest="api_cmd", required=True,
                                                                                  parser_class=Parser)
    fetch = api.add_parser("fetch", help="fetch this process's X.509-SVID into PEM files")
    fetch.add_argument("--socket", required=True, help="Workload API socket path")
    fetch.add_argument("--out", required=True, help="directory for svid.pem, key.pem, bundle.pem")
    fetch.add_argument("--timeout", type=float, default=15.0)
    return p


async def _run(cfg) -> int:
    from agent_sidecar.sidecar import SidecarRuntime

    rt = SidecarRuntime(cfg)
    await rt.start()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await rt.stop()
    return 0


def cmd_run(args) -> int:
    from agent_sidecar import config as config_mod

    try:
        cfg = config_mod.load(args.config, join_token=args.join_token)
        logs.setup(cfg.log_level)
        return asyncio.run(_run(cfg))
    except (ConfigError, TesseraError, OSError) as e:
        return fail(PROG, getattr(e, "message", None) or str(e))


def cmd_fetch(args) -> int:
    from agent_sidecar.workload_client import fetch_x509, write_svid_files
    resp = fetch_x509(args.socket, args.timeout)
    svid = resp.svids[0]
    out = Path(args.out)
    write_svid_files(out, svid.x509_svid, svid.x509_svid_key, svid.bundle)
    leaf = pem.split_der(svid.x509_svid)[0]
    print(svid.spiffe_id)
    print(f"serial {leaf.serial_number:x} expires {leaf.not_valid_after_utc.isoformat()}", file=sys.stderr)
    return 0


def dispatch(args) -> int:
    if args.command == "run":
        return cmd_run(args)
    return cmd_fetch(args)


def main(argv: list[str] | None = None) -> int:
    return run_main(PROG, dispatch, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
