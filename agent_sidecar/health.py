"""The standard gRPC health service (grpc.health.v1.Health) on the sidecar's grpclib socket.

Written against grpcio-health-checking's messages rather than grpclib.health:
both register the same protobuf names, and one process (a test, an embedding
tool) may load the issuer and the sidecar together.
"""

from __future__ import annotations

import asyncio
from typing import Callable

import grpclib.const
from grpc_health.v1.health_pb2 import HealthCheckRequest, HealthCheckResponse

from tessera.errors import NotFound
from tessera.rpc import grpclib_handler

WATCH_INTERVAL = 1.0
SERVICES = ("", "SpiffeWorkloadAPI")


class HealthService:
    def __init__(self, healthy: Callable[[], bool]):
        self.healthy = healthy

    def _status(self, service: str) -> int:
        if service not in SERVICES:
            raise NotFound(f"unknown service {service!r}")
        return HealthCheckResponse.SERVING if self.healthy() else HealthCheckResponse.NOT_SERVING

    @grpclib_handler
    async def Check(self, stream) -> None:
        req = await stream.recv_message()
        await stream.send_message(HealthCheckResponse(status=self._status(req.service)))

    @grpclib_handler
    async def Watch(self, stream) -> None:
        req = await stream.recv_message()
        last = None
        while True:
            status = self._status(req.service)
            if status != last:
                await stream.send_message(HealthCheckResponse(status=status))
                last = status
            await asyncio.sleep(WATCH_INTERVAL)

    def __mapping__(self) -> dict:
        return {
            "/grpc.health.v1.Health/Check": grpclib.const.Handler(
                self.Check, grpclib.const.Cardinality.UNARY_UNARY, HealthCheckRequest, HealthCheckResponse),
            "/grpc.health.v1.Health/Watch": grpclib.const.Handler(
                self.Watch, grpclib.const.Cardinality.UNARY_STREAM, HealthCheckRequest, HealthCheckResponse),
        }
