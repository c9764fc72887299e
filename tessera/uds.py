"""Binding Unix sockets with the permissions they must have from the first instant."""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path

from tessera import safefs


def socket_target(path: str) -> str:
    """A grpc target for a Unix socket path, also accepting the unix:// and unix: URI forms."""
    if path.startswith("unix:"):
        path = path[len("unix://"):] if path.startswith("unix://") else path[len("unix:"):]
    return f"unix://{os.path.abspath(path)}"


def check_socket_path(path: str | Path) -> Path | None:
    """Where a socket may be bound at `path`: its directory (made 0755 if missing) checked by tessera.safefs's
    rules, sticky ones (like /tmp) accepted, since nobody else can rename or remove a socket there once
    bound. Returns the stale socket of ours to replace, if any. Anything else at the name (a file, a link,
    another user's socket) is left alone and refused (UnsafePath): never unlinked. Daemons call it at
    start too, so a bad path stops them before anything runs."""
    p = Path(path)
    name = safefs.make_dir(p.parent, str(p), 0o755, private=False) / p.name
    try:
        st = os.lstat(name)
    except FileNotFoundError:
        return None
    if not stat.S_ISSOCK(st.st_mode) or st.st_uid != os.geteuid():
        raise safefs.UnsafePath(f"{p} exists and is not a socket owned by uid {os.geteuid()}; refusing to replace it")
    return name


def bind_unix(path: str | Path, mode: int) -> socket.socket:
    """A listening Unix socket at `path` with `mode`; a stale socket of ours there is replaced (check_socket_path)."""
    p = Path(path)
    stale = check_socket_path(p)
    if stale is not None:
        os.unlink(stale)
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
