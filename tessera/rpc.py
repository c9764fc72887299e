"""The one place typed errors become gRPC statuses, for grpcio and grpclib servers alike.

Unexpected exceptions are logged with their traceback on the server and reach
the caller as INTERNAL with a short message, never as a traceback.
"""

from __future__ import annotations

import contextlib
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
    """Wrap a grpc.aio servicer method (unary coroutine or async-generator stream) so typed errors become statuses.

    Cancellation (the caller went away) and an abort already under way pass through untouched.
    """
    async def fail(context, fn_name: str, e: Exception):
        if isinstance(e, TesseraError):
            await context.abort(_grpcio_code(int(e.code)), e.message)
        log.exception("unhandled error", method=fn_name, exc_info=e)
        await context.abort(grpc.StatusCode.INTERNAL, "internal error")

    if inspect.isasyncgenfunction(fn):
        @functools.wraps(fn)
        async def stream(self, request, context):
            try:
                # aclosing: a cancelled call runs the handler's cleanup now, not when it is collected.
                async with contextlib.aclosing(fn(self, request, context)) as messages:
                    async for message in messages:
                        yield message
            except (grpc.aio.AbortError, grpc.RpcError):
                raise
            except Exception as e:  # noqa: BLE001 - last-resort boundary
                await fail(context, fn.__name__, e)

        return stream

    @functools.wraps(fn)
    async def unary(self, request, context):
        try:
            return await fn(self, request, context)
        except (grpc.aio.AbortError, grpc.RpcError):
            raise
        except Exception as e:  # noqa: BLE001 - last-resort boundary
            await fail(context, fn.__name__, e)

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
