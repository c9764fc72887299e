"""The one place typed errors become gRPC statuses, for grpcio and grpclib servers alike.

Unexpected exceptions are logged with their traceback on the server and reach
the caller as INTERNAL with a short message, never as a traceback.
"""

from __future__ import annotations

import functools
import inspect

import grpc
from grpclib import GRPCError
from grpclib.const import Status

from tessera import logs
from tessera.errors import TesseraError

log = logs.get("rpc")


def _grpcio_code(code: int) -> grpc.StatusCode:
    for sc in grpc.StatusCode:
        if sc.value[0] == code:
            return sc
    return grpc.StatusCode.INTERNAL


def grpcio_handler(fn):
    """Wrap a grpcio servicer method (unary or server-streaming) so typed errors become statuses."""
    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def stream(self, request, context):
            try:
                yield from fn(self, request, context)
            except TesseraError as e:
                context.abort(_grpcio_code(int(e.code)), e.message)
            except Exception as e:  # noqa: BLE001 - last-resort boundary
                if context.is_active() and not isinstance(e, grpc.RpcError):
                    log.exception("unhandled error", method=fn.__name__)
                    context.abort(grpc.StatusCode.INTERNAL, "internal error")
                raise

        return stream

    @functools.wraps(fn)
    def unary(self, request, context):
        try:
            return fn(self, request, context)
        except TesseraError as e:
            context.abort(_grpcio_code(int(e.code)), e.message)
        except Exception as e:  # noqa: BLE001
            # Handlers raise TesseraError and never call context.abort themselves.
            if isinstance(e, grpc.RpcError) or not context.is_active():
                raise
            log.exception("unhandled error", method=fn.__name__)
            context.abort(grpc.StatusCode.INTERNAL, "internal error")

    return unary


def grpclib_handler(fn):
    """Wrap a grpclib handler (async, takes a stream) so typed errors become statuses."""

    @functools.wraps(fn)
    async def handler(self, stream, *args, **kwargs):
        try:
            return await fn(self, stream, *args, **kwargs)
        except TesseraError as e:
            raise GRPCError(Status(int(e.code)), e.message) from None
        except GRPCError:
            raise
        except Exception:  # noqa: BLE001
            log.exception("unhandled error", method=fn.__name__)
            raise GRPCError(Status.INTERNAL, "internal error") from None

    return handler
