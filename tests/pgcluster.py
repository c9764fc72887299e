"""A throwaway PostgreSQL cluster for tests, demos and benchmarks.

initdb + pg_ctl in a temporary directory, listening only on a Unix socket in that
directory (listen_addresses='': no TCP port, nothing another machine can reach), trust
authentication (only who can enter the directory can connect). PostgreSQL refuses to
run as root, so as root the cluster runs as the `postgres` OS user (Debian's package
creates it) and the directory is handed to it. Each caller gets databases of its own
(`new_database()`), as a `postgresql://` URI the issuer's datastore accepts.

    with Cluster.start() as pg:
        dsn = pg.new_database()
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

SUPERUSER = "tessera"


def bin_dir() -> Path:
    """Where initdb and pg_ctl are: on PATH, else Debian's /usr/lib/postgresql/<version>/bin (newest)."""
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return Path(found).resolve().parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                      key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0)
    if not versions:
        raise RuntimeError("PostgreSQL is not installed (no initdb on PATH or in /usr/lib/postgresql/*/bin): "
                           "scripts/test installs it (apt-get install postgresql)")
    return Path(versions[-1]).parent


class Cluster:
    def __init__(self, root: Path, bindir: Path, run_as: str | None):
        self.root = root
        self.data = root / "data"
        self.socket_dir = root
        self.bindir = bindir
        self.run_as = run_as
        self._names = itertools.count(1)

    @classmethod
    def start(cls, timeout: float = 30) -> "Cluster":
        bindir = bin_dir()
        run_as = "postgres" if os.geteuid() == 0 else None
        # Not under pytest's basetemp: its directories are 0700 root's, which the postgres user cannot enter.
        root = Path(tempfile.mkdtemp(prefix="tessera-pg-"))
        if run_as:
            try:
                pw = pwd.getpwnam(run_as)
            except KeyError:
                os.rmdir(root)
                raise RuntimeError("PostgreSQL will not run as root and there is no `postgres` user to run it as "
                                   "(Debian's postgresql package creates one)") from None
            os.chown(root, pw.pw_uid, pw.pw_gid)
        cluster = cls(root, bindir, run_as)
        try:
            cluster._run("initdb", "-D", str(cluster.data), "-U", SUPERUSER, "--auth=trust", "-E", "UTF8",
                         "--no-locale", "--no-sync", timeout=timeout)
            cluster.resume(timeout)
        except BaseException:
            cluster.stop()
            raise
        return cluster

    def resume(self, timeout: float = 30) -> None:
        """Start the server on the cluster's data (again, after halt())."""
        opts = (f"-c listen_addresses='' -c unix_socket_directories='{self.socket_dir}' -c max_connections=300"
                " -c fsync=on -c synchronous_commit=on")
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.root / "server.log"), "-w",
                  "-t", str(int(timeout)), "-o", opts, "start", timeout=timeout + 5)

    def halt(self) -> None:
        """Stop the server at once, as a crash would (-m immediate: no checkpoint); its data stays for resume()."""
        self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop", timeout=30)

    def _run(self, tool: str, *args: str, timeout: float) -> None:
        cmd = [str(self.bindir / tool), *args]
        if self.run_as:
            cmd = ["runuser", "-u", self.run_as, "--", *cmd]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=self.root)
        if r.returncode != 0:
            raise RuntimeError(f"{tool} failed ({r.returncode}): {r.stderr.strip() or r.stdout.strip()}")

    def dsn(self, dbname: str = "postgres") -> str:
        return f"postgresql://{SUPERUSER}@/{dbname}?host={self.socket_dir}"

    def new_database(self, prefix: str = "t") -> str:
        """A fresh, empty database; its DSN."""
        import psycopg

        name = f"{prefix}{os.getpid()}_{next(self._names)}"
        with psycopg.connect(self.dsn(), autocommit=True) as db:
            db.execute(f'CREATE DATABASE "{name}"')
        return self.dsn(name)

    def stop(self) -> None:
        """Immediate stop (the data is thrown away), then the directory goes."""
        if (self.data / "postmaster.pid").exists():
            try:
                self.halt()
            except (RuntimeError, subprocess.TimeoutExpired):
                pass
        for _ in range(3):
            shutil.rmtree(self.root, ignore_errors=True)
            if not self.root.exists():
                break
            time.sleep(0.1)

    def __enter__(self) -> "Cluster":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
