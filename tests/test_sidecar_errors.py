"""The sidecar's handlers raise Tessera's typed errors; one adapter (tessera.rpc.grpclib_handler) turns them
into the status and message a caller sees, and anything unexpected into INTERNAL without its details."""

from __future__ import annotations

import asyncio
import threading

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpclib.server import Server

from agent_sidecar.health import HealthService
from agent_sidecar.workload_api import WorkloadAPI
from tessera import rpc
from tessera.errors import Code, for_code
from tessera.workload import workload_pb2, workload_pb2_grpc

HEADER = (("workload.spiffe.io", "true"),)


class Served:
    """Real sidecar handlers on a real grpclib server (the sidecar's codec) on a Unix socket, in a thread."""

    def __init__(self, handlers, path: str):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

        async def start():
            server = Server(handlers, codec=rpc.Codec())  # made on its loop
            await server.start(path=path)
            return server
        self.server = asyncio.run_coroutine_threadsafe(start(), self.loop).result(10)

    def close(self) -> None:
        async def stop():
            self.server.close()
            await self.server.wait_closed()
        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def _health_that_fails() -> bool:
    raise RuntimeError("secret detail: /var/lib/tessera/key.pem is unreadable")


@pytest.fixture
def channel(tmp_path):
    path = str(tmp_path / "s.sock")
    served = Served([WorkloadAPI(cache=None, trust_domain="example.org"), HealthService(_health_that_fails)], path)
    with grpc.insecure_channel(f"unix://{path}") as ch:
        yield ch
    served.close()


def failure(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as e:
        call()
    return e.value


def test_a_typed_error_from_a_workload_api_handler_reaches_the_client_as_its_status_and_message(channel):
    stub = workload_pb2_grpc.SpiffeWorkloadAPIStub(channel)
    e = failure(lambda: stub.FetchJWTSVID(workload_pb2.JWTSVIDRequest(audience=["x"]), metadata=HEADER, timeout=5))
    assert (e.code(), e.details()) == (grpc.StatusCode.UNIMPLEMENTED, "JWT-SVIDs are not supported by this sidecar")
    e = failure(lambda: stub.FetchJWTSVID(workload_pb2.JWTSVIDRequest(audience=["x"]), timeout=5))
    assert (e.code(), e.details()) == (grpc.StatusCode.INVALID_ARGUMENT, "security header missing from request")


def test_an_unexpected_exception_in_a_handler_is_internal_error_without_its_details(channel):
    stub = health_pb2_grpc.HealthStub(channel)
    e = failure(lambda: stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5))
    assert (e.code(), e.details()) == (grpc.StatusCode.INTERNAL, "internal error")
    # The Workload API's handlers go through the same adapter: here its missing cache is the bug.
    stream = workload_pb2_grpc.SpiffeWorkloadAPIStub(channel).FetchX509SVID(
        workload_pb2.X509SVIDRequest(), metadata=HEADER, timeout=5)
    e = failure(lambda: next(stream))
    assert (e.code(), e.details()) == (grpc.StatusCode.INTERNAL, "internal error")
    # The typed path still answers from the same handler.
    e = failure(lambda: stub.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=5))
    assert (e.code(), e.details()) == (grpc.StatusCode.NOT_FOUND, "unknown service 'nope'")


def test_a_status_relayed_from_the_issuer_keeps_its_code_and_words():
    assert (for_code(9, "entry e1 is disabled").code, for_code(9, "entry e1 is disabled").message) == \
        (Code.FAILED_PRECONDITION, "entry e1 is disabled")
    assert for_code(10, "aborted").code == Code.ABORTED  # a code no handler raises on its own
    assert for_code(99, "?").code == Code.UNKNOWN
