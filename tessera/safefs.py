"""Files and directories opened without trusting what another local user controls.

The daemons run as root (or a service uid) and take paths from their config. A path is used
only if nobody but root and the daemon's own uid can change what it names:

- every directory passed through, from / down with links resolved as the kernel would, is
  owned by root or the daemon's uid and not writable by group or others unless it has the sticky
  bit (like /tmp, where nobody renames or removes what they do not own);
- a symbolic link on the way to a directory is followed only if root or the daemon's uid owns it
  (the directory holding it is trusted by then); at most MAX_LINKS of them;
- the last component of a file is never followed (O_NOFOLLOW); once open, it must be a regular
  file owned by root or the daemon's uid; one opened for writing must have a single link (a hard
  link planted in a shared directory names someone else's file); a key file has no group or
  other permission bits;
- a directory Tessera keeps state in (make_dir, private) is also not writable by group or others
  even with the sticky bit;
- a replaced file is written to a new file (O_EXCL, its final mode from creation) in the checked
  directory, fsynced, renamed over the name (a rename never follows a link at its target), and
  the directory fsynced.

Checked paths are then opened by name: since no other user can change any component, there is no
race to win (the reasoning of OpenSSH's secure_filename). A problem raises UnsafePath, whose
message names the path and what is wrong: the one line before exit 2 at start, the logged error
while running.
"""

from __future__ import annotations

import fcntl
import os
import secrets
import stat
from pathlib import Path

from tessera.errors import ConfigError

MAX_LINKS = 40  # as the kernel's ELOOP limit
READ_LIMIT = 64 * 1024 * 1024  # the largest file read whole (a CRL of 100k serials is ~2.2 MB)


class UnsafePath(ConfigError):
    """A path another user could control, or a file that is not what it must be."""


# -- the rules (pure) ----------------------------------------------------------------------


def _owners(uid: int) -> str:
    return "root" if uid == 0 else f"root or uid {uid}"


def _mode(st: os.stat_result) -> str:
    return f"mode {stat.S_IMODE(st.st_mode):04o}"


def owner_problem(st: os.stat_result, uid: int) -> str | None:
    if st.st_uid not in (0, uid):
        return f"is owned by uid {st.st_uid}, not by {_owners(uid)}"
    return None


def dir_problem(st: os.stat_result, uid: int, private: bool = False) -> str | None:
    """Why a directory on the way (or, `private`, one holding state) cannot be trusted; None if it can."""
    if not stat.S_ISDIR(st.st_mode):
        return "is not a directory"
    problem = owner_problem(st, uid)
    if problem:
        return problem
    writable = st.st_mode & 0o022
    if writable and (private or not st.st_mode & stat.S_ISVTX):
        who = {0o020: "group", 0o002: "others", 0o022: "group and others"}[writable]
        return f"is writable by {who} ({_mode(st)}){'' if private else ' without the sticky bit'}"
    return None


def link_problem(st: os.stat_result, uid: int) -> str | None:
    if st.st_uid not in (0, uid):
        return f"is a symbolic link owned by uid {st.st_uid}, not by {_owners(uid)}; not following it"
    return None


def file_problem(st: os.stat_result, uid: int, writing: bool = False, key: bool = False) -> str | None:
    """Why an opened file must not be used; None if it may."""
    if not stat.S_ISREG(st.st_mode):
        return "is not a regular file"
    problem = owner_problem(st, uid)
    if problem:
        return problem
    if writing and st.st_nlink != 1:
        return f"has {st.st_nlink} hard links; refusing to write through one"
    if key and st.st_mode & 0o077:
        how = "readable" if st.st_mode & 0o044 else "writable" if st.st_mode & 0o022 else "accessible"
        return f"is {how} by others ({_mode(st)}); chmod 600 it"
    return None


# -- directories ------------------------------------------------------------------------------


def _fail(what: str, path: str, problem: str) -> UnsafePath:
    return UnsafePath(f"{what}: {path} {problem}")


def _absolute(path: str | os.PathLike) -> str:
    # Not os.path.abspath: folding "link/.." by name is not what the kernel does; the walk resolves it.
    path = os.fspath(path)
    return path if path.startswith("/") else os.path.join(os.getcwd(), path)


def resolve_dir(path: str | os.PathLike, what: str, create: int | None = None) -> str:
    """The physical path of directory `path`, every directory and link on the way checked.

    With `create` a mode, missing directories are made (the last one with that mode, those before it
    0755; the umask only narrows), else a missing one raises FileNotFoundError.
    """
    uid = os.geteuid()
    todo = [p for p in _absolute(path).split("/") if p][::-1]  # a stack: next component last
    cur, links = "/", 0
    problem = dir_problem(os.lstat("/"), uid)
    if problem:
        raise _fail(what, "/", problem)
    while todo:
        name = todo.pop()
        if name == ".":
            continue
        if name == "..":
            cur = os.path.dirname(cur)  # cur is physical, so this is the kernel's ".."
            continue
        nxt = os.path.join(cur, name)
        try:
            st = os.lstat(nxt)
        except FileNotFoundError:
            if create is None:
                raise
            try:
                os.mkdir(nxt, create if not todo else 0o755)
            except FileExistsError:  # made meanwhile: checked below like any other
                pass
            st = os.lstat(nxt)
        if stat.S_ISLNK(st.st_mode):
            problem = link_problem(st, uid)
            if problem:
                raise _fail(what, nxt, problem)
            links += 1
            if links > MAX_LINKS:
                raise _fail(what, str(path), "has too many symbolic links")
            target = os.readlink(nxt)
            if target.startswith("/"):
                cur = "/"
            todo.extend(p for p in reversed(target.split("/")) if p)
            continue
        problem = dir_problem(st, uid)
        if problem:
            raise _fail(what, nxt, problem)
        cur = nxt
    return cur


def make_dir(path: str | os.PathLike, what: str, mode: int = 0o700, private: bool = True,
             tighten: bool = False, create: bool = True) -> Path:
    """Directory `path`, made with `mode` if missing (`create`; else FileNotFoundError), its way checked;
    returns its physical path.

    `private`: it must not be writable by group or others even with the sticky bit (it holds
    state that others must not plant or swap). `tighten`: permission bits beyond `mode` are
    removed (a data_dir made 0755 by hand becomes 0700)."""
    real = resolve_dir(path, what, create=mode if create else None)
    st = os.lstat(real)
    problem = dir_problem(st, os.geteuid(), private=private)
    if problem:
        raise _fail(what, str(path), problem)
    if tighten and stat.S_IMODE(st.st_mode) & ~mode:
        fd = os.open(real, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            os.fchmod(fd, stat.S_IMODE(st.st_mode) & mode)
        finally:
            os.close(fd)
    return Path(real)


# -- files ------------------------------------------------------------------------------------


def open_regular(path: str | os.PathLike, flags: int, mode: int = 0o600, *, what: str, key: bool = False) -> int:
    """A descriptor of the regular file at `path` (see the module rules); FileNotFoundError if it (or
    its directory) is missing and `flags` has no O_CREAT. The caller owns the descriptor."""
    head, name = os.path.split(_absolute(path))
    full = os.path.join(resolve_dir(head, what), name)
    # O_NONBLOCK: a FIFO planted at the name must not hang the open; cleared again below.
    extra = os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK
    try:
        fd = os.open(full, flags | extra, mode)
    except OSError as e:
        # Say what is there: a link answers ELOOP, or EACCES with O_CREAT in a sticky directory; a FIFO ENXIO.
        try:
            st = os.lstat(full)
        except OSError:
            raise e from None
        if stat.S_ISLNK(st.st_mode):
            raise _fail(what, str(path), "is a symbolic link; not following it") from None
        if not stat.S_ISREG(st.st_mode):
            raise _fail(what, str(path), "is not a regular file") from None
        raise
    try:
        writing = bool(flags & (os.O_WRONLY | os.O_RDWR))
        problem = file_problem(os.fstat(fd), os.geteuid(), writing=writing, key=key)
        if problem:
            raise _fail(what, str(path), problem)
        if not flags & os.O_NONBLOCK:
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_regular(path: str | os.PathLike, what: str, *, key: bool = False, limit: int = READ_LIMIT) -> bytes:
    """The whole content of a regular file (see open_regular); ConfigError if larger than `limit`."""
    fd = open_regular(path, os.O_RDONLY, what=what, key=key)
    with os.fdopen(fd, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise ConfigError(f"{what}: {path} is larger than {limit} bytes")
    return data


def atomic_write(path: str | os.PathLike, data: bytes, mode: int = 0o644, what: str = "") -> None:
    """Replace `path` with `data` so readers see the old or the new file, never a mix.

    The new file has `mode` before any byte is written (a key is never readable by others, even
    for an instant), is written in the directory as checked (through its descriptor) and is
    durable, with its name, when this returns."""
    head, name = os.path.split(_absolute(path))
    dfd = os.open(resolve_dir(head, what or str(path)), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        tmp = f".{name}.{secrets.token_hex(6)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=dfd)
        try:
            os.fchmod(fd, mode)  # the umask may have narrowed it
            view, written = memoryview(data), 0
            while written < len(view):
                written += os.write(fd, view[written:])
            os.fsync(fd)
            os.close(fd)
            fd = -1
            os.replace(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
        except BaseException:
            if fd >= 0:
                os.close(fd)
            try:
                os.unlink(tmp, dir_fd=dfd)
            except FileNotFoundError:
                pass
            raise
        os.fsync(dfd)
    finally:
        os.close(dfd)
