"""Binding Unix sockets with the permissions they must have from the first instant."""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path


def socket_target(path: str) -> str:
    """A grpc target for a Unix socket path, also accepting the unix:// and unix: URI forms."""
    if path.startswith("unix:"):
        path = path[len("unix://"):] if path.startswith("unix://") else path[len("unix:"):]
    return f"unix://{os.path.abspath(path)}"


def bind_unix(path: str | Path, mode: int) -> socket.socket:
    """A listening Unix socket at `path` with `mode`; a stale socket file there is replaced."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    try:
        st = p.lstat()
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise OSError(f"{p} exists and is not a socket; refusing to replace it")
        p.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o777 & ~mode)  # no window where the socket is wider than `mode`
    try:
        sock.bind(str(p))
    finally:
        os.umask(old)
    os.chmod(p, mode)
    sock.listen(128)
    sock.setblocking(False)
    return sock
