"""Serving a daemon's Prometheus registry over HTTP."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, start_http_server

from tessera.configfile import split_address


def serve(address: str, registry: CollectorRegistry):
    """Serve /metrics on HOST:PORT; returns the HTTP server (its port is server.server_port)."""
    host, port = split_address(address)
    server, _thread = start_http_server(port, addr=host.strip("[]"), registry=registry)
    return server
