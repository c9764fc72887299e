"""A small Workload API client for the sidecar's shell commands (`api fetch`, `api watch`, `task`).

SVID files have one writer, `write_svid_files`. DIR/svid.pem, key.pem, bundle.pem and crl.pem are
fixed symlinks through DIR/.live, a symlink to the directory holding one complete set
(DIR/.svid-XXXXXXXX). A new set is written into a new directory and published by renaming one
symlink over .live, so at every instant the four names resolve to files written together: a key and
a certificate that match, even if the writer dies halfway. Every file is created new in a directory
this process just made (O_EXCL), so no link planted in DIR is ever followed or written through.
"""

from __future__ import annotations

import os
import secrets
import shutil
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import grpc

from tessera import crl as crl_mod
from tessera import pem, safefs
from tessera.uds import socket_target
from tessera.v1 import task_pb2, task_pb2_grpc
from tessera.workload import workload_pb2, workload_pb2_grpc

HEADER = (("workload.spiffe.io", "true"),)


@contextmanager
def x509_stream(socket_path: str, timeout: float | None = None) -> Iterator:
    """The FetchX509SVID stream: the complete state at once, then again on every change."""
    with grpc.insecure_channel(socket_target(socket_path)) as ch:
        stream = workload_pb2_grpc.SpiffeWorkloadAPIStub(ch).FetchX509SVID(
            workload_pb2.X509SVIDRequest(), metadata=HEADER, timeout=timeout)
        try:
            yield stream
        finally:
            stream.cancel()


def fetch_x509(socket_path: str, timeout: float = 15.0) -> workload_pb2.X509SVIDResponse:
    with x509_stream(socket_path, timeout) as stream:
        return next(iter(stream))


def start_task(socket_path: str, task_id: str, scopes: list[str], ttl: int, context: dict[str, str],
               wait: float, spiffe_id: str = "", bind_to_parent: bool = False,
               on_pending=lambda p: None) -> task_pb2.TaskCredential:
    """One task credential; `on_pending` sees each pending update while a human decides."""
    with grpc.insecure_channel(socket_target(socket_path)) as ch:
        stream = task_pb2_grpc.TasksStub(ch).StartTask(
            task_pb2.StartTaskRequest(task_id=task_id, scopes=scopes, ttl_seconds=ttl, context=context,
                                      spiffe_id=spiffe_id, bind_to_parent=bind_to_parent),
            metadata=HEADER, timeout=wait)
        try:
            for update in stream:
                if update.WhichOneof("update") == "pending":
                    on_pending(update.pending)
                else:
                    return update.credential
        finally:
            stream.cancel()
    raise grpc.RpcError("the sidecar ended the stream without a credential")


def end_task(socket_path: str, task_id: str, timeout: float = 30.0) -> list[str]:
    with grpc.insecure_channel(socket_target(socket_path)) as ch:
        resp = task_pb2_grpc.TasksStub(ch).EndTask(task_pb2.EndTaskRequest(task_id=task_id), metadata=HEADER,
                                                   timeout=timeout)
    return list(resp.revoked_serials)


LIVE = ".live"
SET_PREFIX = ".svid-"
CERT, KEY, BUNDLE, CRL = "svid.pem", "key.pem", "bundle.pem", "crl.pem"


def svid_files(chain_der: bytes, key_der: bytes, bundle_der: bytes,
               crls: Sequence[bytes] | None = None) -> dict[str, tuple[bytes, int]]:
    """{name: (content, mode)}: svid.pem (leaf first), key.pem (0600), bundle.pem, and crl.pem when
    there is a CRL (every CRL, PEM, one after another: what nginx's ssl_crl and openssl take)."""
    files = {KEY: (pem.key_pem_from_der(key_der), 0o600),
             CERT: (pem.certs_pem(pem.split_der(chain_der)), 0o644),
             BUNDLE: (pem.certs_pem(pem.split_der(bundle_der)), 0o644)}
    if crls:
        files[CRL] = (b"".join(crl_mod.pem(crl_mod.load(c)) for c in crls), 0o644)
    return files


def write_svid_files(out: Path, chain_der: bytes, key_der: bytes, bundle_der: bytes,
                     crls: Sequence[bytes] | None = None) -> None:
    """Like `spire-agent api fetch x509`, published as one set (see the module docstring)."""
    publish(out, svid_files(chain_der, key_der, bundle_der, crls))


def publish(out: Path, files: dict[str, tuple[bytes, int]]) -> None:
    """Write `files` as a new set in `out` and switch the names to it at once; the old set goes.

    `out` (made 0700 if missing) must be a directory only root and this user can write, reached
    without another user's links (tessera.safefs)."""
    out = safefs.make_dir(out, "--out", 0o700)
    new = Path(tempfile.mkdtemp(prefix=SET_PREFIX, dir=out))
    os.chmod(new, 0o755)  # readable like a plain directory of PEM files; key.pem itself is 0600
    for name, (data, mode) in files.items():
        safefs.atomic_write(new / name, data, mode, "--out")
    for name in files:  # the fixed links first: until the switch they show the set in place, if any
        _symlink(out / name, f"{LIVE}/{name}")
    _symlink(out / LIVE, new.name)  # the switch
    for name in {CERT, KEY, BUNDLE, CRL} - files.keys():
        (out / name).unlink(missing_ok=True)  # a name this set lacks (no CRL yet) is absent, not stale
    for old in out.glob(SET_PREFIX + "*"):
        if old != new:
            shutil.rmtree(old, ignore_errors=True)  # never follows a link


def read_published(out: Path) -> dict[str, bytes]:
    """What the names in `out` show now, if they are this module's links into a set of its own;
    a name that is anything else is left out (so it differs, and the next write replaces it)."""
    try:
        live = os.readlink(out / LIVE)
        if not live.startswith(SET_PREFIX) or "/" in live:
            return {}
        dir_fd = os.open(out / live, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError:
        return {}
    found = {}
    try:
        for name in (CERT, KEY, BUNDLE, CRL):
            try:
                if os.readlink(out / name) != f"{LIVE}/{name}":
                    continue
                fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=dir_fd)
            except OSError:
                continue
            with os.fdopen(fd, "rb") as f:
                if stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                    found[name] = f.read()
    finally:
        os.close(dir_fd)
    return found


def remove_key_and_svid(out: Path) -> None:
    """After a revocation: key.pem and svid.pem go, in every set; bundle.pem and crl.pem stay."""
    sets = []
    for d in out.glob(SET_PREFIX + "*"):
        try:
            sets.append(os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW))  # a set, never a link
        except OSError:
            pass
    try:
        for name in (KEY, CERT):
            for dir_fd in (None, *sets):
                try:
                    os.unlink(name if dir_fd is not None else out / name, dir_fd=dir_fd)
                except FileNotFoundError:
                    pass
    finally:
        for fd in sets:
            os.close(fd)


def _symlink(link: Path, target: str) -> None:
    """`link` -> `target`, replacing whatever name was there in one rename (never following it)."""
    try:
        if os.readlink(link) == target:
            return
    except OSError:
        pass
    tmp = link.with_name(f".{link.name}.{secrets.token_hex(4)}")
    os.symlink(target, tmp)
    try:
        os.replace(tmp, link)
    except BaseException:
        tmp.unlink()
        raise
