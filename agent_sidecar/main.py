"""tessera-sidecar: run the sidecar, or use its socket from shell scripts."""

from __future__ import annotations

import argparse
import asyncio
import gc
import signal
import sys
from pathlib import Path

import grpc

from tessera import logs, pem
from tessera.cliutil import CliError, Parser, duration_arg, fail, path_arg, run_main, seconds_arg
from tessera.errors import ConfigError, TesseraError
from tessera.version import add_version_flag

PROG = "tessera-sidecar"


def build_parser() -> Parser:
    p = Parser(prog=PROG, description="Tessera sidecar: local identity for agent processes")
    add_version_flag(p)
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)
    run = sub.add_parser("run", help="run the sidecar")
    run.add_argument("--config", required=True, type=path_arg)
    run.add_argument("--join-token-file", default=None, metavar="FILE", type=path_arg,
                     help="file holding the one-time join token (mode 0600, yours or root's), or - for stdin; "
                          "or join_token / join_token_file in the config file")
    # Defined only to refuse it with a clear line: a token in argv is readable by every local user.
    run.add_argument("--join-token", nargs="?", const="", default=None, help=argparse.SUPPRESS)

    api = sub.add_parser("api", help="Workload API from the shell").add_subparsers(dest="api_cmd", required=True,
                                                                                  parser_class=Parser)
    fetch = api.add_parser("fetch", help="fetch this process's X.509-SVID into PEM files")
    fetch.add_argument("--socket", required=True, type=path_arg, help="Workload API socket path")
    fetch.add_argument("--out", required=True, type=path_arg, help="directory for svid.pem, key.pem, bundle.pem, crl.pem")
    fetch.add_argument("--timeout", type=seconds_arg(0.1, 3600), default=15.0)
    watch = api.add_parser("watch", help="keep svid.pem, key.pem, bundle.pem, crl.pem current and reload the "
                                         "application after each change (run as the application's user)")
    watch.add_argument("--socket", required=True, type=path_arg, help="Workload API socket path")
    watch.add_argument("--out", required=True, type=path_arg, help="directory for svid.pem, key.pem (0600), bundle.pem, crl.pem")
    how = watch.add_mutually_exclusive_group()
    how.add_argument("--exec", dest="exec_cmd", metavar="CMD",
                     help="run CMD after each change (split like a shell would, but no shell runs it)")
    how.add_argument("--signal", help="send this signal (HUP, SIGHUP, 1) after each change, to the pid in --pid-file")
    watch.add_argument("--pid-file", type=path_arg, help="the application's pid file, for --signal")

    hc = sub.add_parser("healthcheck", help="exit 0 when the sidecar is healthy (synced, own SVID valid), 1 if not")
    where = hc.add_mutually_exclusive_group(required=True)
    where.add_argument("--socket", type=path_arg, help="the sidecar's socket path")
    where.add_argument("--config", type=path_arg, help="the sidecar's config file (its socket_path)")
    hc.add_argument("--timeout", type=seconds_arg(0.1, 3600), default=5.0)
    task = sub.add_parser("task", help="per-task credentials from the shell").add_subparsers(
        dest="task_cmd", required=True, parser_class=Parser)
    ts = task.add_parser("start", help="obtain a task credential into PEM files; prints the serial. "
                                       "The task ends when the calling shell (this command's parent) exits")
    ts.add_argument("--socket", required=True, type=path_arg, help="sidecar socket path")
    ts.add_argument("--task-id", required=True)
    ts.add_argument("--scope", action="append", default=[], help="repeatable")
    ts.add_argument("--ttl", default="5m", help="requested lifetime (capped by policy)")
    ts.add_argument("--context", action="append", default=[], help="KEY=VALUE, repeatable")
    ts.add_argument("--spiffe-id", default="", help="which identity, if the caller has several")
    ts.add_argument("--out", required=True, type=path_arg, help="directory for svid.pem, key.pem, bundle.pem")
    ts.add_argument("--wait", default="2m", help="how long to wait, including for a human approval")
    te = task.add_parser("end", help="end a task: its credential is revoked at once")
    te.add_argument("--socket", required=True, type=path_arg)
    te.add_argument("--task-id", required=True)
    return p


def cmd_task_start(args) -> int:
    from agent_sidecar.workload_client import start_task, write_svid_files

    context = {}
    for item in args.context:
        k, sep, v = item.partition("=")
        if not sep or not k:
            raise CliError(f"--context must be KEY=VALUE, got {item!r}")
        context[k] = v
    cred = start_task(
        args.socket, args.task_id, args.scope, duration_arg(args.ttl, "--ttl"), context, duration_arg(args.wait, "--wait"),
        spiffe_id=args.spiffe_id, bind_to_parent=True,
        on_pending=lambda p: print(f"pending approval {p.approval_id}: {p.reason}", file=sys.stderr, flush=True))
    write_svid_files(Path(args.out), cred.cert_chain, cred.key, cred.bundle)
    print(cred.serial)
    print(f"task {cred.task_id} {cred.spiffe_id} scopes {','.join(cred.scopes) or '-'} expires "
          f"{pem.split_der(cred.cert_chain)[0].not_valid_after_utc.isoformat()}", file=sys.stderr)
    return 0


def cmd_task_end(args) -> int:
    from agent_sidecar.workload_client import end_task

    for serial in end_task(args.socket, args.task_id):
        print(serial)
    return 0


async def _run(cfg) -> int:
    from agent_sidecar.sidecar import SidecarRuntime

    rt = SidecarRuntime(cfg)
    await rt.start()
    gc.freeze()  # as the issuer does: start-up state is permanent, so full collections skip it
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await rt.stop()
    return 0


JOIN_TOKEN_REFUSED = ("--join-token is refused: a token on the command line is visible to every local user; "
                      "use --join-token-file FILE (mode 0600), --join-token-file - (stdin), "
                      "or join_token or join_token_file in the config file (mode 0600)")


def cmd_run(args) -> int:
    from agent_sidecar import config as config_mod

    if args.join_token is not None:
        return fail(PROG, JOIN_TOKEN_REFUSED)
    try:
        cfg = config_mod.load(args.config, join_token_file=args.join_token_file)
        logs.setup(cfg.log_level)
        return asyncio.run(_run(cfg))
    except (ConfigError, TesseraError, OSError) as e:
        return fail(PROG, getattr(e, "message", None) or str(e))


def cmd_fetch(args) -> int:
    from agent_sidecar.workload_client import fetch_x509, write_svid_files
    resp = fetch_x509(args.socket, args.timeout)
    svid = resp.svids[0]
    out = Path(args.out)
    write_svid_files(out, svid.x509_svid, svid.x509_svid_key, svid.bundle, resp.crl)
    leaf = pem.split_der(svid.x509_svid)[0]
    print(svid.spiffe_id)
    print(f"serial {leaf.serial_number:x} expires {leaf.not_valid_after_utc.isoformat()}", file=sys.stderr)
    return 0


def cmd_watch(args) -> int:
    from agent_sidecar.watch import Reload, Watch

    reload = Reload.from_args(args.exec_cmd, args.signal, args.pid_file)
    logs.setup("info")
    return Watch(args.socket, Path(args.out), reload).run()


def cmd_healthcheck(args) -> int:
    """The standard gRPC health check against the sidecar's socket."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from tessera.uds import socket_target

    socket_path = args.socket
    if socket_path is None:
        from agent_sidecar import config as config_mod

        try:
            socket_path = str(config_mod.load(args.config).socket_path)
        except ConfigError as e:
            return fail(PROG, str(e))
    with grpc.insecure_channel(socket_target(socket_path)) as ch:
        try:
            resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=args.timeout)
        except grpc.RpcError as e:
            return fail(PROG, f"unhealthy: {socket_path}: {e.details()}", 1)
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
    if resp.status != health_pb2.HealthCheckResponse.SERVING:
        return fail(PROG, f"unhealthy: {status}", 1)
    print(status)
    return 0


def dispatch(args) -> int:
    if args.command == "run":
        return cmd_run(args)
    if args.command == "healthcheck":
        return cmd_healthcheck(args)
    if args.command == "task":
        return cmd_task_start(args) if args.task_cmd == "start" else cmd_task_end(args)
    return cmd_watch(args) if args.api_cmd == "watch" else cmd_fetch(args)


def main(argv: list[str] | None = None) -> int:
    return run_main(PROG, dispatch, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
