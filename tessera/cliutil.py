"""Shared CLI behaviour: one-line errors with exit code 2, gRPC errors rendered as one line."""

from __future__ import annotations

import argparse
import math
import re
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
    """A duration flag (30s, 10m, 24h, 30d) in seconds, at most durations.MAX_DURATION; CliError naming the flag."""
    from tessera.durations import parse_duration
    from tessera.errors import InvalidArgument

    try:
        return parse_duration(value)
    except InvalidArgument as e:
        raise CliError(f"{flag}: {e.message}") from None


# argparse `type=` converters: a bad value is a usage error, one line and exit 2 (Parser.error).

def path_arg(value: str) -> str:
    """A file system path: no NUL, at most PATH_MAX bytes."""
    from tessera.configfile import check_path_text

    try:
        return check_path_text(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{value[:80]!r} {e}") from None


def int_arg(lo: int, hi: int):
    """An integer between lo and hi (ASCII digits), for `type=`."""
    def convert(value: str) -> int:
        if not re.fullmatch(r"-?[0-9]{1,12}", value.strip(), re.ASCII) or not lo <= int(value) <= hi:
            raise argparse.ArgumentTypeError(f"must be a whole number from {lo} to {hi}, got {value[:40]!r}")
        return int(value)
    return convert


def seconds_arg(lo: float, hi: float):
    """A number of seconds between lo and hi (finite), for `type=`."""
    def convert(value: str) -> float:
        try:
            v = float(value) if re.fullmatch(r"[0-9.eE+-]{1,20}", value.strip(), re.ASCII) else math.nan
        except ValueError:
            v = math.nan
        if not lo <= v <= hi:  # NaN fails this too
            raise argparse.ArgumentTypeError(f"must be a number of seconds from {lo:g} to {hi:g}, got {value[:40]!r}")
        return v
    return convert


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
