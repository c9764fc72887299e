"""`tessera-sidecar api watch`: SVID files kept current for programs that read PEM files (nginx, ...).

Runs as the application's own user and holds one FetchX509SVID stream on the sidecar's socket.
Every response that changes what DIR holds (a rotation, a new bundle, a new CRL) is published as
one set by `workload_client.write_svid_files` (key and certificate always match), then the
application is told: `--exec` runs a command (argv split with shlex, no shell unless the command
is one), `--signal` sends a signal to the pid in `--pid-file`. A failed reload is logged and the
watch goes on. A response that changes nothing on disk, such as the first one after a restart of
the watch or of the sidecar, writes nothing and reloads nothing.

PERMISSION_DENIED on the stream is the Workload API's "stop using all SVIDs": the identity was
revoked, or is not (or no longer) issued to this user. key.pem and svid.pem are removed at once,
so no later start or reload of the application can use them (what it already loaded stays in its
memory until it restarts); bundle.pem and crl.pem stay, they still serve to verify peers; the
watch exits with EXIT_DENIED. Any other failure (the sidecar restarting, its socket missing) is
retried with exponential backoff.
"""

from __future__ import annotations

import os
import random
import shlex
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import grpc

from agent_sidecar import workload_client as wc
from tessera import logs, pem, safefs
from tessera.cliutil import CliError
from tessera.errors import ConfigError

log = logs.get("sidecar.watch")

EXIT_DENIED = 3
RELOAD_TIMEOUT = 60.0  # a reload command still running after this is killed and counted as failed
BACKOFF_MIN, BACKOFF_MAX = 0.5, 30.0
PID_FILE_MAX_BYTES = 64


@dataclass(frozen=True)
class Reload:
    """What tells the application that its files changed: a command, a signal to a pid, or nothing."""

    argv: tuple[str, ...] = ()
    sig: signal.Signals | None = None
    pid_file: Path | None = None

    @classmethod
    def from_args(cls, command: str | None, sig: str | None, pid_file: str | None) -> "Reload":
        """CliError for a command that cannot run or a signal that does not exist (exit 2 at start)."""
        if command is not None:
            try:
                argv = tuple(shlex.split(command))
            except ValueError as e:
                raise CliError(f"--exec: {e}") from None
            if not argv:
                raise CliError("--exec: empty command")
            if shutil.which(argv[0]) is None:
                raise CliError(f"--exec: command not found: {argv[0]}")
            return cls(argv=argv)
        if sig is not None:
            if pid_file is None:
                raise CliError("--signal needs --pid-file")
            return cls(sig=parse_signal(sig), pid_file=Path(pid_file))
        if pid_file is not None:
            raise CliError("--pid-file needs --signal")
        return cls()

    def __call__(self) -> bool:
        """Tell the application; False (and one logged line) if that failed."""
        if self.argv:
            return _run(self.argv)
        if self.sig is not None:
            return _send(self.sig, self.pid_file)
        return True


def parse_signal(name: str) -> signal.Signals:
    """HUP, SIGHUP or 1."""
    try:
        if name.isdigit():
            return signal.Signals(int(name))
        return signal.Signals[name.upper() if name.upper().startswith("SIG") else "SIG" + name.upper()]
    except (KeyError, ValueError):
        raise CliError(f"--signal: unknown signal {name!r}") from None


def read_pid(path: Path) -> int:
    """The pid in a pid file; ValueError unless it names one process (never 0, -1 or 1: kill(2)
    would take those as this process group, every process, or init)."""
    # Not through a link, a FIFO or a file of another user's: a planted pid file would aim the signal.
    try:
        data = safefs.read_regular(path, "--pid-file", limit=PID_FILE_MAX_BYTES)
    except ConfigError as e:
        raise ValueError(str(e)) from None
    text = data.decode("ascii", "replace").strip()
    if len(data) > PID_FILE_MAX_BYTES or not text.isdigit() or int(text) <= 1:
        raise ValueError(f"{path} does not hold a process id: {text[:20]!r}")
    return int(text)


def _send(sig: signal.Signals, pid_file: Path) -> bool:
    try:
        pid = read_pid(pid_file)
        os.kill(pid, sig)
    except FileNotFoundError:
        log.warning("not reloaded: no pid file (the application is not running?)", pid_file=str(pid_file))
        return False
    except (OSError, ValueError) as e:
        log.error("reload failed", signal=sig.name, pid_file=str(pid_file), error=str(e))
        return False
    log.info("reload signalled", signal=sig.name, pid=pid)
    return True


def _run(argv: tuple[str, ...]) -> bool:
    try:
        r = subprocess.run(argv, stdin=subprocess.DEVNULL, timeout=RELOAD_TIMEOUT)
    except subprocess.TimeoutExpired:
        log.error("reload command timed out and was killed", command=shlex.join(argv), timeout=RELOAD_TIMEOUT)
        return False
    except OSError as e:
        log.error("reload command failed to start", command=shlex.join(argv), error=str(e))
        return False
    if r.returncode != 0:
        log.error("reload command failed", command=shlex.join(argv), exit_code=r.returncode)
        return False
    log.info("reload command ran", command=shlex.join(argv))
    return True


class _Stopped(Exception):
    pass


class Watch:
    def __init__(self, socket_path: str, out: Path, reload: Reload):
        self.socket_path, self.out, self.reload = socket_path, out, reload
        self.on_disk = wc.read_published(out)  # an unchanged set is neither rewritten nor reloaded
        self._stopping = False
        self._blocked = False  # True only while waiting: a stop signal then interrupts the wait

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_stop)
        try:
            return self._loop()
        except _Stopped:
            log.info("stopped")
            return 0

    def _on_stop(self, signum, frame) -> None:
        self._stopping = True
        if self._blocked:
            raise _Stopped

    def _wait(self, fn, *args):
        self._blocked = True
        try:
            if self._stopping:
                raise _Stopped
            return fn(*args)
        finally:
            self._blocked = False

    def _loop(self) -> int:
        delay = BACKOFF_MIN
        while True:
            try:
                with wc.x509_stream(self.socket_path) as stream:
                    it = iter(stream)
                    while True:
                        resp = self._wait(next, it)
                        delay = BACKOFF_MIN
                        self._apply(resp)
                        if self._stopping:
                            raise _Stopped
            except StopIteration:
                log.warning("the sidecar ended the stream; reconnecting", socket=self.socket_path)
            except grpc.RpcError as e:
                if e.code() == grpc.StatusCode.PERMISSION_DENIED:
                    wc.remove_key_and_svid(self.out)
                    log.error("identity revoked or not issued: key.pem and svid.pem removed",
                              out=str(self.out), detail=e.details())
                    raise CliError(f"identity revoked or not issued ({e.details()}): removed "
                                   f"{self.out / wc.KEY} and {self.out / wc.CERT}", EXIT_DENIED) from None
                log.warning("cannot watch the sidecar; retrying", socket=self.socket_path, code=e.code().name,
                            detail=e.details(), retry_in=round(delay, 1))
            except (OSError, ValueError) as e:
                # A full disk, a directory made unwritable: the stream is dropped and opened again after
                # the backoff, and its first response (the complete state) is written then.
                log.error("cannot write the SVID files; retrying", out=str(self.out), error=str(e),
                          retry_in=round(delay, 1))
            self._wait(time.sleep, delay * random.uniform(0.8, 1.2))
            delay = min(BACKOFF_MAX, delay * 2)

    def _apply(self, resp) -> None:
        if not resp.svids:
            return
        svid = resp.svids[0]  # the default identity, as the Workload API orders them
        files = wc.svid_files(svid.x509_svid, svid.x509_svid_key, svid.bundle, resp.crl)
        contents = {name: data for name, (data, _) in files.items()}
        if contents == self.on_disk:
            return
        changed = sorted(n for n in contents if contents[n] != self.on_disk.get(n))
        wc.publish(self.out, files)
        self.on_disk = contents
        leaf = pem.split_der(svid.x509_svid)[0]
        log.info("SVID files written", out=str(self.out), spiffe_id=svid.spiffe_id, changed=changed,
                 serial=f"{leaf.serial_number:x}", expires=leaf.not_valid_after_utc.isoformat())
        self.reload()

