"""The kernel's credentials for the peer of a Unix socket connection (SO_PEERCRED).

These are recorded by the kernel when the peer called connect(), so they name
the process that opened this very connection; nothing the peer sends can change them.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass


@dataclass(frozen=True)
class PeerCred:
    pid: int
    uid: int
    gid: int


def from_socket(sock) -> PeerCred:
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return PeerCred(pid, uid, gid)


def grpclib_socket(stream) -> socket.socket:
    """The Unix socket a grpclib server stream arrived on."""
    transport = stream.peer._transport  # grpclib exposes no public accessor for the socket
    sock = transport.get_extra_info("socket")
    if sock is None or sock.family != socket.AF_UNIX:
        raise RuntimeError("peer credentials need a Unix socket connection")
    return sock


def from_grpclib_stream(stream) -> PeerCred:
    """Credentials of the connection a grpclib server stream arrived on."""
    return from_socket(grpclib_socket(stream))
