"""Workload attestation: selectors for the process on the other end of a Unix socket.

Everything comes from the kernel: uid and gid from SO_PEERCRED of that very
connection, the executable from /proc/<pid>/exe. To be sure /proc/<pid> still
belongs to the process that connected (and not to a recycled pid), the pid is
pinned with a pidfd (SO_PEERPIDFD where the kernel has it) and checked alive
after reading.
"""

from __future__ import annotations

import grp
import hashlib
import os
import pwd
import signal
import socket
import threading
from dataclasses import dataclass

from tessera.peercred import PeerCred, from_socket

SO_PEERPIDFD = getattr(socket, "SO_PEERPIDFD", 77)


class AttestationError(Exception):
    pass


@dataclass(frozen=True)
class Workload:
    pid: int
    uid: int
    gid: int
    exe: str | None
    selectors: frozenset[str]

    def describe(self) -> dict:
        return {"pid": self.pid, "uid": self.uid, "gid": self.gid, "exe": self.exe}


class WorkloadAttestor:
    def __init__(self, hash_max_bytes: int):
        self.hash_max_bytes = hash_max_bytes
        self._hashes: dict[tuple[int, int, int, int], str] = {}
        self._lock = threading.Lock()

    def attest_socket(self, sock: socket.socket) -> Workload:
        cred = from_socket(sock)
        pidfd = peer_pidfd(sock, cred.pid)
        try:
            return self._attest(cred, pidfd)
        finally:
            if pidfd is not None:
                os.close(pidfd)

    def _attest(self, cred: PeerCred, pidfd: int | None) -> Workload:
        sels = {f"unix:uid:{cred.uid}", f"unix:gid:{cred.gid}"}
        try:
            sels.add(f"unix:user:{pwd.getpwuid(cred.uid).pw_name}")
        except KeyError:
            pass
        try:
            sels.add(f"unix:group:{grp.getgrgid(cred.gid).gr_name}")
        except KeyError:
            pass
        exe = None
        if cred.pid > 0:
            try:
                exe = os.readlink(f"/proc/{cred.pid}/exe")
                digest = self._exe_sha256(cred.pid)
            except OSError:
                exe, digest = None, None
            if exe is not None:
                if pidfd is None or not alive(pidfd):
                    # The connecting process is gone: what we read may belong to a recycled pid.
                    raise AttestationError("the calling process exited during attestation")
                if exe.endswith(" (deleted)"):
                    exe = exe[: -len(" (deleted)")]
                else:
                    sels.add(f"unix:path:{exe}")
                if digest:
                    sels.add(f"unix:sha256:{digest}")
        return Workload(cred.pid, cred.uid, cred.gid, exe, frozenset(sels))

    def _exe_sha256(self, pid: int) -> str | None:
        """SHA-256 of the running executable, cached by inode; None above the size cap."""
        path = f"/proc/{pid}/exe"
        st = os.stat(path)
        if st.st_size > self.hash_max_bytes:
            return None
        key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        with self._lock:
            cached = self._hashes.get(key)
        if cached:
            return cached
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        digest = h.hexdigest()
        with self._lock:
            if len(self._hashes) > 4096:
                self._hashes.clear()
            self._hashes[key] = digest
        return digest


def peer_pidfd(sock: socket.socket, pid: int) -> int | None:
    """A pidfd for the process at the other end of `sock`: from the connection itself (SO_PEERPIDFD)
    where the kernel has it, else opened by number (a small pid-reuse window on kernels < 6.5)."""
    try:
        return int.from_bytes(sock.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD, 4), "little", signed=True)
    except OSError:
        pass
    try:
        return os.pidfd_open(pid)
    except (OSError, AttributeError):
        return None


def alive(pidfd: int) -> bool:
    try:
        signal.pidfd_send_signal(pidfd, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone we may not signal
