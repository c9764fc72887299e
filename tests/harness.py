"""Real daemons as subprocesses, for end-to-end tests: an issuer, sidecars, the CLI, workloads."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import queue
import signal
import socket
import sqlite3
import re
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import yaml

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parent.parent
CLIENTS = Path(__file__).resolve().parent / "clients"


def free_ports(n: int) -> list[int]:
    """n consecutive free TCP ports on 127.0.0.1 (the issuer uses port and port+1)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + n > 65535:
            continue
        ok = True
        for p in range(base, base + n):
            with socket.socket() as t:
                try:
                    t.bind(("127.0.0.1", p))
                except OSError:
                    ok = False
                    break
        if ok:
            return list(range(base, base + n))
    raise RuntimeError("no free ports")


def wait_for(pred, timeout: float = 10.0, interval: float = 0.02, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


async def wait_for_async(pred, timeout: float = 10.0, interval: float = 0.02, what: str = "condition"):
    """wait_for for a coroutine: the event loop runs while it waits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        await asyncio.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def as_uid(uid: int, argv: list[str], gid: int | None = None) -> list[str]:
    """argv run as another user (uid, and gid: the uid unless given), with no supplementary groups."""
    return ["setpriv", f"--reuid={uid}", f"--regid={uid if gid is None else gid}", "--clear-groups", *argv]


def write_private(path: Path, text: str) -> Path:
    """`text` in a new file only its owner may read (mode 0600 from the first byte), for secrets."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text + "\n")
    return path


def one_line_error(r: subprocess.CompletedProcess, *fragments: str) -> str:
    """Bad input: exit code 2 and exactly one line on stderr containing `fragments`, no traceback."""
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert "Traceback" not in r.stderr
    for f in fragments:
        assert f in lines[0], lines[0]
    return lines[0]


def openssl_verify(bundle: Path, leaf: Path, crl: Path | None = None) -> subprocess.CompletedProcess:
    """`openssl verify` of the chain in `leaf` (leaf first, then intermediates, as an SVID carries it) against the
    roots in `bundle`, the intermediates given as -untrusted; with a CRL file, every certificate of the chain must
    be covered by a CRL in it (-crl_check_all)."""
    blocks = re.findall(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----\n?", Path(leaf).read_bytes(), re.S)
    argv = ["openssl", "verify", "-CAfile", str(bundle)]
    if len(blocks) > 1:
        rest = Path(f"{leaf}.untrusted")
        rest.write_bytes(b"".join(blocks[1:]))
        argv += ["-untrusted", str(rest)]
    if crl is not None:
        argv += ["-crl_check_all", "-CRLfile", str(crl)]
    if len(blocks) > 1:
        first = Path(f"{leaf}.leaf")
        first.write_bytes(blocks[0])
        leaf = first
    return subprocess.run([*argv, str(leaf)], capture_output=True, text=True)


def openssl_says_revoked(bundle: Path, leaf: Path, crl: Path) -> bool:
    r = openssl_verify(bundle, leaf, crl)
    return r.returncode != 0 and "certificate revoked" in r.stdout + r.stderr


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    """A Prometheus /metrics page as {(sample name, sorted labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def metric(samples, name, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


class Daemon:
    def __init__(self, name: str, argv: list[str], log: Path, ready: Path | None, env=None, stdin: bytes | None = None):
        self.name, self.argv, self.log_path, self.ready = name, argv, log, ready
        self.env = env
        self.stdin = stdin  # written to the daemon's standard input at start, which is then closed
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 15.0) -> "Daemon":
        if self.ready is not None and self.ready.exists():
            self.ready.unlink()
        with open(self.log_path, "ab") as log:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                         start_new_session=True,
                                         stdin=subprocess.DEVNULL if self.stdin is None else subprocess.PIPE)
        if self.stdin is not None:
            self.proc.stdin.write(self.stdin)
            self.proc.stdin.close()
        if self.ready is not None:
            deadline = time.monotonic() + timeout
            while not self.ready.exists():
                if self.proc.poll() is not None:
                    raise AssertionError(f"{self.name} exited with {self.proc.returncode}:\n{self.log()}")
                if time.monotonic() > deadline:
                    raise AssertionError(f"{self.name} did not become ready:\n{self.log()}")
                time.sleep(0.02)
        return self

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-6000:]
        except OSError:
            return ""

    def stop(self, timeout: float = 10.0) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def kill9(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


    def json_lines(self) -> list[dict]:
        """The daemon's JSON log lines so far (lines that are not JSON, e.g. its start-up lines, are left out)."""
        lines = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                try:
                    lines.append(json.loads(line))
                except ValueError:
                    pass
        return lines


def sidecar_syncs(sidecar: Daemon) -> list[dict]:
    """A sidecar's "synced with issuer" log lines so far: one each time it (re)synced, naming the issuer."""
    return [x for x in sidecar.json_lines() if x.get("event") == "synced with issuer"]


class LineReader:
    """Reads a subprocess's JSON lines on a thread so tests can wait with timeouts.

    The process's stderr goes to a file whose tail is shown when a wait times out, so a
    workload that crashed or never started says why.
    """

    def __init__(self, proc: subprocess.Popen, stderr_path: Path | None = None):
        self.proc = proc
        self.stderr_path = stderr_path
        self.q: "queue.Queue[dict]" = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self):
        for line in self.proc.stdout:
            line = line.strip()
            if line.startswith("{"):
                self.q.put(json.loads(line))

    def _stderr_tail(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")[-2000:] if self.stderr_path else ""
        except OSError:
            return ""

    def next(self, timeout: float = 10.0) -> dict:
        try:
            return self.q.get(timeout=timeout)
        except queue.Empty:
            state = "running" if self.proc.poll() is None else f"exited {self.proc.returncode}"
            raise AssertionError(f"no output within {timeout}s (process {state}); stderr:\n"
                                 f"{self._stderr_tail()}") from None

    def until(self, pred, timeout: float = 10.0) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:  # messages kept coming, none matched
                raise AssertionError(f"no matching message within {timeout}s")
            msg = self.next(left)
            if pred(msg):
                return msg

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def peer_deployments(root: Path, n: int, dsn: str, trust_domain: str = "example.org") -> list["Deployment"]:
    """n issuers on one PostgreSQL database (`dsn`), each a Deployment of its own in root/issuer<i> (data_dir,
    ports, admin socket, sidecars), all with one key-encryption key (TESSERA_KEK): the authorities' keys are
    shared, sealed with it, through the database. Nothing is started."""
    kek = base64.b64encode(os.urandom(32)).decode()
    out: list[Deployment] = []
    for i in range(1, n + 1):
        (root / f"issuer{i}").mkdir()
        d = Deployment(root / f"issuer{i}", trust_domain)
        while {d.port, d.port + 1} & {p for o in out for p in (o.port, o.port + 1)}:
            d.port, _ = free_ports(2)  # free now, but not yet bound by the issuer picked before
        d.issuer_extra = {"datastore": {"engine": "postgres", "dsn": dsn}}
        d.issuer_env = {**os.environ, "TESSERA_KEK": kek}
        out.append(d)
    return out


def share_one_port(issuers: list["Deployment"]) -> None:
    """Make peer deployments serve one listen (and bootstrap) port, the first one's, with share_port: several
    issuer processes on one host behind one address."""
    for d in issuers:
        d.port = issuers[0].port
        d.issuer_extra["share_port"] = True


def accepted_connections(pids: list[int], port: int) -> dict[int, int]:
    """How many established TCP connections to local `port` (127.0.0.1) each of `pids` holds: which process the
    kernel handed each connection to, when several listen on the port."""
    # grpc-core listens on an IPv6 socket even for 127.0.0.1: its connections are in tcp6, the address v4-mapped.
    want = {f"0100007F:{port:04X}", f"0000000000000000FFFF00000100007F:{port:04X}"}
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            f = line.split()
            if f[1] in want and f[3] == "01":  # local address, state ESTABLISHED
                inodes.add(f"socket:[{f[9]}]")
    out = {}
    for pid in pids:
        n = 0
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                n += os.readlink(fd) in inodes
            except OSError:
                pass  # closed meanwhile
        out[pid] = n
    return out


def run_side_by_side(fns: list, timeout: float = 60) -> None:
    """Call each of `fns` on a thread of its own, all at once; the first failure is raised once all have finished."""
    errors: list[BaseException] = []

    def run(fn):
        try:
            fn()
        except BaseException as e:  # noqa: BLE001 - raised below, in the caller's thread
            errors.append(e)

    threads = [threading.Thread(target=run, args=(fn,)) for fn in fns]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    if errors:
        raise errors[0]


def start_issuers_at_once(deployments: list["Deployment"]) -> None:
    """Start every deployment's issuer at the same moment (peers on a fresh database race to create the
    authorities)."""
    run_side_by_side([d.start_issuer for d in deployments])


class Deployment:
    """An issuer and its sidecars in one temporary directory."""

    def __init__(self, root: Path, trust_domain: str = "example.org"):
        self.root = root
        # Workloads started under other uids must reach the sockets; pytest's temp dirs are 0700.
        os.chmod(root, 0o755)
        for parent in root.parents:
            if parent == Path("/tmp") or parent == Path("/"):
                break
            os.chmod(parent, os.stat(parent).st_mode | 0o011)
        self.td = trust_domain
        self.port, _ = free_ports(2)
        self.admin_socket = root / "admin.sock"
        self.issuer_dir = root / "issuer"
        self.issuer_cfg_path = root / "issuer.yaml"
        self.bundle_path = root / "bundle.pem"
        self.issuer: Daemon | None = None
        self.sidecars: dict[str, Daemon] = {}
        self.children: list = []
        self.issuer_extra: dict = {}  # config every start_issuer adds (peer_deployments: the shared database)
        self.issuer_env: dict | None = None  # the issuer's environment (None: this process's)

    # -- issuer ---------------------------------------------------------------------

    def issuer_config(self, **extra) -> dict:
        cfg = {"trust_domain": self.td, "data_dir": str(self.issuer_dir),
               "listen_address": f"127.0.0.1:{self.port}", "admin_socket": str(self.admin_socket)}
        cfg.update(self.issuer_extra)
        cfg.update(extra)
        return cfg

    @property
    def bootstrap_address(self) -> str:
        return f"127.0.0.1:{self.port + 1}"  # the issuer's default: listen port + 1

    def db(self) -> sqlite3.Connection:
        """A read-only view of the issuer's database (safe while the issuer runs)."""
        conn = sqlite3.connect(f"file:{self.issuer_dir / 'tessera.db'}?mode=ro", uri=True)
        conn.row_factory = sqlite3.Row
        return conn

    def issued(self, serial: str) -> sqlite3.Row | None:
        with self.db() as conn:
            return conn.execute("SELECT * FROM issued WHERE serial=?", (serial,)).fetchone()

    def audit(self, action: str) -> list[dict]:
        with self.db() as conn:
            rows = conn.execute("SELECT * FROM audit WHERE action=? ORDER BY seq", (action,)).fetchall()
        return [{**dict(r), "actor": json.loads(r["actor"]), "details": json.loads(r["details"])} for r in rows]

    def run_issuer_once(self, cfg: dict | str) -> subprocess.CompletedProcess:
        """Start an issuer with `cfg` (a mapping or raw YAML) that is expected to refuse to start."""
        path = self.root / "bad-issuer.yaml"
        path.write_text(cfg if isinstance(cfg, str) else yaml.safe_dump(cfg))
        return subprocess.run([str(BIN / "tessera-issuer"), "run", "--config", str(path)], capture_output=True,
                              text=True, timeout=30)

    def issuer_argv(self, *flags: str) -> list[str]:
        return [str(BIN / "tessera-issuer"), "run", "--config", str(self.issuer_cfg_path), *flags]

    def start_issuer(self, *flags: str, **extra) -> Daemon:
        """Write the issuer's config (issuer_config with `extra`) and start it, `flags` added to its command line."""
        self.issuer_cfg_path.write_text(yaml.safe_dump(self.issuer_config(**extra)))
        self.issuer = Daemon("issuer", self.issuer_argv(*flags), self.root / "issuer.log", self.admin_socket,
                             env=self.issuer_env).start()
        self.bundle_path.write_text(self.cli("bundle", "show").stdout)
        return self.issuer

    def restart_issuer(self, kill9: bool = False) -> Daemon:
        if kill9:
            self.issuer.kill9()
        else:
            self.issuer.stop()
        return self.issuer.start()

    # -- CLI ------------------------------------------------------------------------

    def cli(self, *args: str, check: bool = True, timeout: float = 30, text: bool = True) -> subprocess.CompletedProcess:
        env = {**os.environ, "TESSERA_ADMIN_SOCKET": str(self.admin_socket)}
        r = subprocess.run([str(BIN / "tessera"), *args], capture_output=True, text=text, env=env, timeout=timeout)
        if check and r.returncode != 0:
            raise AssertionError(f"tessera {' '.join(args)} failed ({r.returncode}): {r.stderr!r}")
        return r

    def cli_bytes(self, *args: str) -> bytes:
        return self.cli(*args, text=False).stdout

    def token(self, sidecar: str, ttl: str = "10m") -> str:
        return self.cli("token", "create", "--sidecar", sidecar, "--ttl", ttl).stdout.strip()

    def sidecar_id(self, name: str) -> str:
        return f"spiffe://{self.td}/tessera/sidecar/{name}"

    def entry(self, spiffe_path: str, sidecar: str, *selectors: str, owner: str = "alice",
              purpose: str = "testing", expires_in: str = "30d", **opts) -> str:
        args = ["entry", "create", "--spiffe-id", f"spiffe://{self.td}{spiffe_path}", "--parent",
                self.sidecar_id(sidecar), "--owner", owner, "--purpose", purpose, "--expires-in", expires_in]
        for s in selectors or (f"unix:uid:{os.getuid()}",):
            args += ["--selector", s]
        for k, v in opts.items():
            for item in (v if isinstance(v, (list, tuple)) else [v]):
                args += [f"--{k.replace('_', '-')}", str(item)]
        return self.cli(*args).stdout.strip()

    # -- sidecars -----------------------------------------------------------------------

    def sidecar_dir(self, name: str) -> Path:
        return self.root / f"sidecar-{name}"

    def socket(self, name: str) -> Path:
        return self.root / f"{name}.sock"

    def sidecar_config(self, name: str, **extra) -> Path:
        """Write sidecar `name`'s config file (mode 0600) and return its path."""
        d = self.sidecar_dir(name)
        cfg = {"issuer_address": f"127.0.0.1:{self.port}", "trust_bundle": str(self.bundle_path),
               "data_dir": str(d / "data"), "socket_path": str(self.socket(name))}
        cfg.update(extra)
        d.mkdir(exist_ok=True)
        return write_private(d / "sidecar.yaml", yaml.safe_dump(cfg))

    def start_sidecar(self, name: str, token: str | None = None, **extra) -> Daemon:
        d = self.sidecar_dir(name)
        argv = [str(BIN / "tessera-sidecar"), "run", "--config", str(self.sidecar_config(name, **extra))]
        if token is None and name not in self.sidecars:
            token = self.token(name)
        if token:
            # Never in argv (every local user reads /proc/PID/cmdline): a 0600 file named there instead.
            argv.append(f"--join-token-file={write_private(d / 'join-token', token)}")
        daemon = Daemon(f"sidecar-{name}", argv, d / "sidecar.log", self.socket(name)).start()
        self.sidecars[name] = daemon
        return daemon

    # -- workloads ------------------------------------------------------------------------

    def workload(self, *args: str, uid: int | None = None) -> list[str]:
        argv = [sys.executable, str(CLIENTS / "spiffe_client.py"), *args]
        return argv if uid is None else as_uid(uid, argv)

    def fetch(self, sidecar: str, uid: int | None = None, timeout: float = 30) -> dict:
        r = subprocess.run(self.workload("fetch", str(self.socket(sidecar)), uid=uid), capture_output=True,
                           text=True, timeout=timeout)
        lines = [json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")]
        if not lines:
            raise AssertionError(f"workload printed nothing: {r.stderr[-2000:]}")
        return lines[-1]

    def stream(self, sidecar: str, uid: int | None = None) -> LineReader:
        return self.spawn_as(uid, "stream", str(self.socket(sidecar)))

    def spawn(self, *args: str) -> LineReader:
        return self.spawn_as(None, *args)

    def spawn_as(self, uid: int | None, *args: str) -> LineReader:
        err = self.root / f"workload-{len(self.children)}.stderr"
        with open(err, "wb") as f:
            proc = subprocess.Popen(self.workload(*args, uid=uid), stdout=subprocess.PIPE, stderr=f, text=True)
        reader = LineReader(proc, err)
        self.children.append(reader)
        return reader

    def close(self) -> None:
        for c in self.children:
            c.close()
        for s in self.sidecars.values():
            s.stop()
        if self.issuer is not None:
            self.issuer.stop()
