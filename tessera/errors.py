"""Typed errors and their one mapping to gRPC status codes.

Handlers raise these; the server adapters (grpcio and grpclib) translate them
to a status with the message, so a caller never sees a traceback.
"""

from __future__ import annotations

import enum


class Code(enum.IntEnum):
    # Numeric values are the gRPC status codes (identical in grpcio and grpclib). Every non-OK code is
    # here so that a status relayed from another service keeps its code (see for_code).
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DEADLINE_EXCEEDED = 4
    UNAUTHENTICATED = 16
    ABORTED = 10
    OUT_OF_RANGE = 11
    DATA_LOSS = 15


class TesseraError(Exception):
    code: Code = Code.INTERNAL

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class InvalidArgument(TesseraError):
    code = Code.INVALID_ARGUMENT


class NotFound(TesseraError):
    code = Code.NOT_FOUND


class AlreadyExists(TesseraError):
    code = Code.ALREADY_EXISTS


class PermissionDenied(TesseraError):
    code = Code.PERMISSION_DENIED


class ResourceExhausted(TesseraError):
    code = Code.RESOURCE_EXHAUSTED


class FailedPrecondition(TesseraError):
    code = Code.FAILED_PRECONDITION


class Unauthenticated(TesseraError):
    code = Code.UNAUTHENTICATED


class Unavailable(TesseraError):
    code = Code.UNAVAILABLE


class DeadlineExceeded(TesseraError):
    code = Code.DEADLINE_EXCEEDED


class Unimplemented(TesseraError):
    code = Code.UNIMPLEMENTED


class Relayed(TesseraError):
    """Another service's status, passed on as it was: its code and message are that service's words."""

    def __init__(self, code: Code, message: str):
        super().__init__(message)
        self.code = code


def for_code(code: int, message: str) -> TesseraError:
    """The typed error for a gRPC status code (a code outside the enum, or OK, is UNKNOWN)."""
    try:
        known = Code(code)
    except ValueError:
        known = Code.UNKNOWN
    return Relayed(known, message)


class ConfigError(Exception):
    """A configuration file is unreadable or invalid; the message names the key."""
