"""Shared CLI behaviour: one-line errors with exit code 2, gRPC errors rendered as one line."""

from __future__ import annotations

import argparse
import sys

EXIT_BAD_INPUT = 2
EXIT_UNAVAILABLE = 1


class CliError(Exception):
    def __init__(self, message: str, code: int = EXIT_BAD_INPUT):
        super().__init__(message)
        self.message = message
        self.code = code


class Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line on stderr and exits 2."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message}\n")


def duration_arg(value: str, flag: str) -> int:
    """A duration flag (30s, 10m, 24h, 30d) in seconds; CliError naming the flag."""
    from tessera.durations import parse_duration
    from tessera.errors import InvalidArgument

    try:
        return parse_duration(value)
    except InvalidArgument as e:
        raise CliError(f"{flag}: {e.message}") from None


def fail(prog: str, message: str, code: int = EXIT_BAD_INPUT) -> int:
    print(f"{prog}: {message}", file=sys.stderr)
    return code


def rpc_error_line(err) -> tuple[str, int]:
    """(message, exit code) for a grpcio RpcError."""
    import grpc

    code = err.code() if hasattr(err, "code") else None
    details = err.details() if hasattr(err, "details") else str(err)
    if code == grpc.StatusCode.UNAVAILABLE:
        return f"cannot reach the service: {details}", EXIT_UNAVAILABLE
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return f"timed out: {details}", EXIT_UNAVAILABLE
    name = code.name if code is not None else "ERROR"
    return f"{details} ({name})", EXIT_BAD_INPUT


def run_main(prog: str, fn, args) -> int:
    """The CLIs' one error boundary: typed and RPC errors become one line and an exit code."""
    import grpc

    from tessera.errors import ConfigError

    try:
        return fn(args)
    except CliError as e:
        return fail(prog, e.message, e.code)
    except grpc.RpcError as e:
        msg, code = rpc_error_line(e)
        return fail(prog, msg, code)
    except (OSError, ConfigError) as e:  # ConfigError: also a path refused by tessera.safefs
        return fail(prog, str(e))
    except KeyboardInterrupt:
        return 130
