"""The one place typed errors become gRPC statuses, for grpcio and grpclib servers alike.

Unexpected exceptions are logged with their traceback on the server and reach
the caller as INTERNAL with a short message, never as a traceback. Request bytes that
are not the method's message are the caller's fault: INVALID_ARGUMENT, nothing logged.
"""

from __future__ import annotations

import contextlib
import functools
import inspect

import grpc
from google.protobuf.message import DecodeError
from grpclib import GRPCError
from grpclib.const import Status
from grpclib.encoding.proto import ProtoCodec
from grpclib.exceptions import ProtocolError, StreamTerminatedError

from tessera import logs
from tessera.errors import TesseraError

log = logs.get("rpc")


def _grpcio_code(code: int) -> grpc.StatusCode:
    for sc in grpc.StatusCode:
        if sc.value[0] == code:
            return sc
    return grpc.StatusCode.INTERNAL


class Malformed:
    """What a grpcio method receives for request bytes that do not decode (see add_servicer)."""

    __slots__ = ("error",)

    def __init__(self, error: str):
        self.error = error


def _tolerant(deserializer):
    def decode(data: bytes):
        try:
            return deserializer(data)
        except DecodeError as e:
            return Malformed(str(e))
    return decode


class _Registrar:
    """Stands in for the server while a generated add_*Servicer_to_server registers its handlers."""

    def __init__(self, server):
        self.server = server
        self.registered = False

    def add_generic_rpc_handlers(self, handlers):
        pass  # the same handlers arrive by name below, where they can be rewritten

    def add_registered_method_handlers(self, service: str, handlers: dict):
        fixed = {name: h._replace(request_deserializer=_tolerant(h.request_deserializer))
                 for name, h in handlers.items()}
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, fixed),))
        self.server.add_registered_method_handlers(service, fixed)
        self.registered = True


def add_servicer(add_to_server, servicer, server) -> None:
    """`add_to_server(servicer, server)` (generated code) with requests that fail to decode reaching the
    handler as Malformed, which grpcio_handler answers with INVALID_ARGUMENT. Left to grpcio, they get
    UNKNOWN and a traceback in the log per request: any peer could fill the log at will."""
    registrar = _Registrar(server)
    add_to_server(servicer, registrar)
    if not registrar.registered:
        raise RuntimeError(f"{add_to_server.__name__} registered no handlers by name")


async def _refuse_malformed(request, context) -> None:
    if isinstance(request, Malformed):
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed request: {request.error}")


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
            await _refuse_malformed(request, context)
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
        await _refuse_malformed(request, context)
        try:
            return await fn(self, request, context)
        except (grpc.aio.AbortError, grpc.RpcError):
            raise
        except Exception as e:  # noqa: BLE001 - last-resort boundary
            await fail(context, fn.__name__, e)

    return unary


class Codec(ProtoCodec):
    """grpclib's protobuf codec, except that request bytes that do not decode are INVALID_ARGUMENT
    (raised where the handler receives them) instead of UNKNOWN and a traceback in the log."""

    def decode(self, data, message_type):
        try:
            return message_type.FromString(data)
        except DecodeError as e:
            raise GRPCError(Status.INVALID_ARGUMENT, f"malformed request: {e}") from None


def grpclib_status(e: TesseraError) -> tuple[Status, str]:
    """The grpclib status and message a typed error reaches the caller as."""
    return Status(int(e.code)), e.message


def grpclib_handler(fn):
    """Wrap a grpclib handler (async, takes a stream) so typed errors become statuses.

    grpclib's own errors pass through untouched: a GRPCError from its codec or deadline (and the Codec
    above), and a stream the caller reset or a connection that broke, which grpclib logs as such.
    Anything else is a bug: logged with its traceback here, INTERNAL "internal error" to the caller.
    """

    @functools.wraps(fn)
    async def handler(self, stream, *args, **kwargs):
        try:
            return await fn(self, stream, *args, **kwargs)
        except TesseraError as e:
            raise GRPCError(*grpclib_status(e)) from None
        except (GRPCError, StreamTerminatedError, ProtocolError):
            raise
        except Exception:  # noqa: BLE001 - last-resort boundary
            log.exception("unhandled error", method=fn.__name__)
            raise GRPCError(Status.INTERNAL, "internal error") from None

    return handler
