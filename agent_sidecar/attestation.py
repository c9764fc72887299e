"""Workload attestation: selectors for the process on the other end of a Unix socket, taken when it connects.

Everything comes from the kernel: uid and gid from SO_PEERCRED of that very connection, the
executable from /proc/<pid>/exe. The sidecar attests a connection as soon as it accepts it, before
reading a byte from it, and keeps the result (an `AttestedPeer`) for the connection's life:

- The pid is pinned with a pidfd (SO_PEERPIDFD where the kernel has it), held as long as the
  connection, and checked alive after every read of /proc, so /proc/<pid> is known to be the process
  that connected and not a recycled pid.
- The executable is recorded as an `Image`: the link target and the file's (dev, inode), read before
  and after hashing it; the hash is of the file opened through that link and checked to be the same
  file. A process that execs during attestation is refused.
- On every request, and before a stream hands out new SVIDs, `check_unchanged` re-reads the image: if
  the process that connected has exited or runs another program, the caller gets nothing
  (finding 8: connect, fork, exec a trusted binary in the parent, ask from the child).

What remains: the kernel records credentials at connect(), but the image can only be read at
accept(). A process that connects and execs another program *before* the sidecar accepts (normally
well under a millisecond; longer when the sidecar's loop is busy) is attested as that program. The
kernel exposes no exec time or exec counter in /proc to compare with (the start time in
/proc/<pid>/stat survives exec). SPIRE's unix attestor has the same limit and a wider one (it reads
the image at the first request). Entries should pair unix:path / unix:sha256 with unix:uid, as a
process of the same uid could also ptrace the trusted binary.
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
DELETED = " (deleted)"


class AttestationError(Exception):
    pass


@dataclass(frozen=True)
class Image:
    """The program a process runs: where /proc/<pid>/exe points (without " (deleted)") and which file it is."""
    path: str
    dev: int
    ino: int


@dataclass(frozen=True)
class Workload:
    pid: int
    uid: int
    gid: int
    exe: str | None
    selectors: frozenset[str]
    image: Image | None = None

    def describe(self) -> dict:
        return {"pid": self.pid, "uid": self.uid, "gid": self.gid, "exe": self.exe}


class AttestedPeer:
    """A connection's caller as attested when it connected; owns the pidfd pinning that process."""

    def __init__(self, workload: Workload, pidfd: int | None):
        self.workload = workload
        self.pidfd = pidfd

    def check_unchanged(self) -> None:
        """Raise AttestationError unless the process that connected is alive and runs the image it ran then.

        Without an image (none was readable at accept) there are no executable selectors to protect.
        """
        img, pid = self.workload.image, self.workload.pid
        if img is None:
            return
        if self.pidfd is None or not alive(self.pidfd):
            raise AttestationError(f"the process that connected (pid {pid}) has exited")
        try:
            now, _ = read_image(pid)
        except OSError:
            now = None
        if not alive(self.pidfd):
            raise AttestationError(f"the process that connected (pid {pid}) has exited")
        if now != img:
            raise AttestationError(f"the process that connected (pid {pid}, {img.path}) executed another program "
                                   "since connecting; make requests from a connection the requesting program opened")

    def close(self) -> None:
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None


def read_image(pid: int) -> tuple[Image, bool]:
    """(the image of `pid`, whether its file was deleted). Link and stat are two reads: callers compare
    two calls around whatever must see one image."""
    path = os.readlink(f"/proc/{pid}/exe")
    st = os.stat(f"/proc/{pid}/exe")
    deleted = path.endswith(DELETED)
    return Image(path[: -len(DELETED)] if deleted else path, st.st_dev, st.st_ino), deleted


class WorkloadAttestor:
    def __init__(self, hash_max_bytes: int):
        self.hash_max_bytes = hash_max_bytes
        self._hashes: dict[tuple[int, int, int, int], str] = {}
        self._lock = threading.Lock()

    def attest_socket(self, sock: socket.socket) -> AttestedPeer:
        """Attest the peer of an accepted connection (blocking: /proc reads and hashing)."""
        cred = from_socket(sock)
        pidfd = peer_pidfd(sock, cred.pid) if cred.pid > 0 else None
        try:
            return AttestedPeer(self._attest(cred, pidfd), pidfd)
        except BaseException:
            if pidfd is not None:
                os.close(pidfd)
            raise

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
        image = None
        if cred.pid > 0:
            try:
                image, deleted = read_image(cred.pid)
                digest = self._exe_sha256(cred.pid, image)
                after, _ = read_image(cred.pid)
            except OSError:
                image = None
            if image is not None:
                if pidfd is None or not alive(pidfd):
                    # The connecting process is gone: what we read may belong to a recycled pid.
                    raise AttestationError("the calling process exited during attestation")
                if after != image:
                    raise AttestationError("the calling process executed another program during attestation")
                if not deleted:
                    sels.add(f"unix:path:{image.path}")
                if digest:
                    sels.add(f"unix:sha256:{digest}")
        return Workload(cred.pid, cred.uid, cred.gid, image.path if image else None, frozenset(sels), image)

    def _exe_sha256(self, pid: int, image: Image) -> str | None:
        """SHA-256 of the running executable, cached by inode; None above the size cap."""
        with open(f"/proc/{pid}/exe", "rb") as f:
            st = os.fstat(f.fileno())
            if (st.st_dev, st.st_ino) != (image.dev, image.ino):
                raise AttestationError("the calling process executed another program during attestation")
            if st.st_size > self.hash_max_bytes:
                return None
            key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
            with self._lock:
                cached = self._hashes.get(key)
            if cached:
                return cached
            h = hashlib.sha256()
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
