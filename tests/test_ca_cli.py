"""`tessera ca` and `tessera crl show`: the operator's authority commands, through the real CLI, against the issuer's
admin handlers served on a real Unix socket over services built as tessera-issuer builds them (issuer.app.build).

The argument checks at the top need no issuer: bad input is refused before anything is asked of it."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import subprocess
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from grpclib.server import Server

from harness import BIN, one_line_error, write_private
from tessera import crl as crl_mod
from tessera import pem, rpc, x509svid
from tessera.uds import bind_unix

TD = "example.org"


def tessera(socket: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run([str(BIN / "tessera"), "--admin-socket", str(socket), *args], capture_output=True, text=True,
                       timeout=60)
    if check and r.returncode != 0:
        raise AssertionError(f"tessera {' '.join(args)} failed ({r.returncode}): {r.stderr!r}")
    return r


# -- bad input, refused before the issuer is asked -------------------------------------------------


@pytest.fixture
def nowhere(tmp_path) -> Path:
    """An admin socket that does not exist: a command that got as far as connecting would fail with exit 1."""
    return tmp_path / "no-issuer.sock"


@pytest.mark.parametrize("bad_id", ["zz", "abc", "ABCDEF0123", "0" * 65, "abcdef01;rm"])
def test_an_id_that_is_not_an_authority_id_is_one_line_exit_2(nowhere, bad_id):
    for cmd in ("activate", "taint", "revoke"):
        one_line_error(tessera(nowhere, "ca", cmd, bad_id, "--reason", "r", check=False), "is not an authority id")


@pytest.mark.parametrize("cmd", [["prepare", "--kind", "x509"], ["activate", "abcdef0123"], ["taint", "abcdef0123"],
                                 ["revoke", "abcdef0123"]])
def test_every_ca_change_needs_a_reason(nowhere, cmd):
    one_line_error(tessera(nowhere, "ca", *cmd, check=False), "--reason")
    one_line_error(tessera(nowhere, "ca", *cmd, "--reason", "  ", check=False), "--reason must not be empty")


def test_prepare_names_the_kinds_it_knows(nowhere):
    one_line_error(tessera(nowhere, "ca", "prepare", "--kind", "rsa", "--reason", "r", check=False), "x509", "root")


def test_an_unreadable_cert_file_is_one_line_exit_2(nowhere, tmp_path):
    missing = tmp_path / "missing.pem"
    one_line_error(tessera(nowhere, "ca", "activate", "abcdef0123", "--cert", str(missing), "--reason", "r",
                           check=False), "--cert", "does not exist")
    # Read as tessera.safefs reads files: not through a link, not a directory, not binary junk.
    real = tmp_path / "real.pem"
    real.write_text("-----BEGIN CERTIFICATE-----\n")
    (tmp_path / "link.pem").symlink_to(real)
    one_line_error(tessera(nowhere, "ca", "activate", "abcdef0123", "--cert", str(tmp_path / "link.pem"),
                           "--reason", "r", check=False), "--cert", "symbolic link")
    one_line_error(tessera(nowhere, "ca", "activate", "abcdef0123", "--cert", str(tmp_path), "--reason", "r",
                           check=False), "--cert")
    junk = tmp_path / "junk.pem"
    junk.write_bytes(b"\xff\xfe\x00binary")
    one_line_error(tessera(nowhere, "ca", "activate", "abcdef0123", "--cert", str(junk), "--reason", "r",
                           check=False), "--cert", "not a PEM certificate")
    big = tmp_path / "big.pem"
    big.write_text("A" * (64 * 1024 + 1))
    one_line_error(tessera(nowhere, "ca", "activate", "abcdef0123", "--cert", str(big), "--reason", "r",
                           check=False), "--cert", "larger than")


def test_a_csr_out_in_a_missing_directory_is_refused_before_anything_is_prepared(nowhere, tmp_path):
    one_line_error(tessera(nowhere, "ca", "prepare", "--kind", "x509", "--reason", "r", "--csr-out",
                           str(tmp_path / "nope" / "next.csr"), check=False), "--csr-out", "does not exist")
    one_line_error(tessera(nowhere, "ca", "prepare", "--kind", "x509", "--reason", "r", "--csr-out",
                           str(tmp_path), check=False), "--csr-out", "is a directory")


def test_crl_show_der_is_one_crl_so_not_json(nowhere):
    one_line_error(tessera(nowhere, "crl", "show", "--der", "--output", "json", check=False), "--der")


def test_ca_help_tells_how_a_root_is_rotated(nowhere):
    out = tessera(nowhere, "ca", "--help").stdout
    assert "tessera ca prepare --kind root" in out and "tessera ca activate ROOT_ID" in out


# -- against the issuer's admin handlers ---------------------------------------------------------------


class AdminSocket:
    """The issuer's AdminService on a real Unix socket (grpclib, with the issuer's codec) on its own loop: the CLI is
    a separate process, its uid checked by the kernel as on the issuer's admin socket."""

    def __init__(self, services, path: Path):
        self.services = services
        self.api = services.admin_api
        self.path = path
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = self.call(self._start())

    async def _start(self) -> Server:
        server = Server([self.api], codec=rpc.Codec())  # made on its loop, as grpclib expects
        await server.start(sock=bind_unix(self.path, 0o600))
        return server

    def call(self, coro, timeout: float = 30):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return tessera(self.path, *args, check=check)

    def authorities(self) -> list[dict]:
        return json.loads(self.cli("ca", "list", "--output", "json").stdout)

    def one(self, kind: str, state: str) -> dict:
        [a] = [a for a in self.authorities() if a["kind"] == kind and a["state"] == state]
        return a

    def close(self) -> None:
        self.server.close()
        self.call(self.server.wait_closed())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)
        self.services.close()


@pytest.fixture
def admin(tmp_path):
    from inproc import issuer_services  # the composition root: needs the issuer's authority wiring

    a = AdminSocket(issuer_services(tmp_path / "issuer"), tmp_path / "admin.sock")
    yield a
    a.close()


def ca_audit(admin: AdminSocket) -> list:
    return [r for r in admin.services.store.audit_records() if r.action.startswith("ca.") and r.actor["kind"] == "operator"]


def test_ca_list_shows_the_root_the_signing_intermediate_and_the_jwt_key(admin):
    listed = admin.authorities()
    assert sorted((a["kind"], a["state"]) for a in listed) == [("jwt", "active"), ("root", "active"),
                                                             ("x509", "active")]
    root, inter = admin.one("root", "active"), admin.one("x509", "active")
    assert inter["parent"] == root["id"] and root["source"] == "created" and inter["source"] == "root"
    assert x509svid.authority_id(x509.load_pem_x509_certificate(inter["cert_pem"].encode()).public_key()) == inter["id"]
    assert inter["outstanding"] >= 1  # the attested sidecar's SVID
    assert root["outstanding"] >= 1  # its live intermediate
    assert not any(a["expired"] for a in listed)
    table = admin.cli("ca", "list").stdout.splitlines()
    assert table[0].split() == ["KIND", "ID", "STATE", "SOURCE", "NOT", "BEFORE", "NOT", "AFTER", "OUTSTANDING"]
    assert [line.split()[0] for line in table[1:]] == ["root", "x509", "jwt"]
    assert table[2].split()[1] == inter["id"][:16]


def test_prepare_then_activate_an_intermediate_audits_the_operator_and_the_reason(admin):
    old = admin.one("x509", "active")
    new_id = admin.cli("ca", "prepare", "--kind", "x509", "--reason", "rotate early").stdout.strip()
    assert admin.one("x509", "prepared")["id"] == new_id
    shown = admin.cli("ca", "activate", new_id[:12], "--reason", "ready").stdout.split()
    assert shown == [new_id, "active"]
    states = {a["id"]: a["state"] for a in admin.authorities()}
    assert states[new_id] == "active" and states[old["id"]] == "retired"
    audit = ca_audit(admin)
    assert [(r.action, r.subject, r.reason) for r in audit if r.action in ("ca.prepare", "ca.activate")] == [
        ("ca.prepare", new_id, "rotate early"), ("ca.activate", new_id, "ready")]
    assert {r.actor["id"] for r in audit} == {f"uid:{os.getuid()}"}


def test_taint_answers_after_the_crls_are_re_signed_and_every_sidecar_is_told(admin):
    async def subscribe():
        return admin.services.hub.subscribe(f"spiffe://{TD}/tessera/sidecar/h")

    sub = admin.call(subscribe())
    tainted = admin.one("x509", "active")
    before = {c["authority"]: c["number"] for c in json.loads(admin.cli("crl", "show", "--output", "json").stdout)}
    out = admin.cli("ca", "taint", tainted["id"], "--reason", "key copied to a laptop").stdout.split()
    assert out == [tainted["id"]]
    successor = admin.one("x509", "active")
    assert successor["id"] != tainted["id"]
    assert {a["id"]: a["state"] for a in admin.authorities()}[tainted["id"]] == "tainted"
    # When the command returns, the successor's CRL is published and the others were re-signed.
    after = {c["authority"]: c["number"] for c in json.loads(admin.cli("crl", "show", "--output", "json").stdout)}
    assert successor["id"] in after
    assert all(after[k] > n for k, n in before.items() if k in after)
    events = []
    while (ev := admin.call(sub.get(5))) is not None:
        events.append(ev)
        if ev[0] == "taint":
            break
    assert events and events[-1][:2] == ("taint", (tainted["id"],))
    sub.close()
    [rec] = [r for r in ca_audit(admin) if r.action == "ca.taint"]
    assert rec.subject == tainted["id"] and rec.reason == "key copied to a laptop"


def test_a_sidecar_that_missed_a_taint_is_told_when_it_catches_up(admin):
    sidecar = f"spiffe://{TD}/tessera/sidecar/h"
    assert [ev.WhichOneof("event") for ev in admin.services.sidecar_api.full_state(sidecar)] == ["snapshot", "crls"]
    tainted = admin.one("x509", "active")["id"]
    admin.cli("ca", "taint", tainted, "--reason", "exposed while host h was offline")
    state = admin.services.sidecar_api.full_state(sidecar)  # what its next Sync (or resync) opens with
    assert [ev.WhichOneof("event") for ev in state] == ["snapshot", "crls", "taint"]
    assert list(state[-1].taint.authority_ids) == [tainted]


def test_revoke_waits_for_dependants_unless_forced_and_withdraws_the_intermediate_by_its_roots_crl(admin):
    inter = admin.one("x509", "active")
    root = admin.one("root", "active")
    r = admin.cli("ca", "revoke", inter["id"], "--reason", "r", check=False)
    one_line_error(r, "active", "taint it first")
    admin.cli("ca", "taint", inter["id"], "--reason", "compromised")
    r = admin.cli("ca", "revoke", inter["id"], "--reason", "compromised", check=False)
    one_line_error(r, "unexpired certificates depend", "--force")
    assert {a["id"]: a["state"] for a in admin.authorities()}[inter["id"]] == "tainted"  # nothing changed
    revoked = json.loads(admin.cli("ca", "revoke", inter["id"], "--reason", "compromised", "--force",
                                   "--output", "json").stdout)
    assert revoked["id"] == inter["id"] and revoked["state"] == "revoked" and revoked["revoked_at"] > 0
    crls = json.loads(admin.cli("crl", "show", "--output", "json").stdout)
    assert inter["id"] in [c["authority"] for c in crls]  # its own CRL goes on until it expires (openssl asks for it)
    [root_crl] = [c for c in crls if c["authority"] == root["id"]]
    serial = x509.load_pem_x509_certificate(inter["cert_pem"].encode()).serial_number
    assert x509svid.serial_hex(serial) in crl_mod.serials(crl_mod.load(root_crl["pem"].encode()))
    [rec] = [r for r in ca_audit(admin) if r.action == "ca.revoke"]
    assert rec.details["forced"] is True and rec.details["outstanding"] >= 1


def test_bad_requests_are_one_line_and_change_nothing(admin, tmp_path):
    before = admin.authorities()
    one_line_error(admin.cli("ca", "taint", "0123456789abcdef", "--reason", "r", check=False), "no authority",
                   "NOT_FOUND")
    active = admin.one("x509", "active")["id"]
    one_line_error(admin.cli("ca", "activate", active, "--reason", "r", check=False), "only a prepared")
    one_line_error(admin.cli("ca", "revoke", admin.one("root", "active")["id"], "--reason", "r", check=False),
                   "FAILED_PRECONDITION")
    one_line_error(admin.cli("ca", "taint", admin.one("root", "active")["id"], "--reason", "r", check=False),
                   "prepare a new root")
    assert admin.authorities() == before
    # A certificate for an intermediate the root here already signed: refused, nothing installed.
    prepared = admin.cli("ca", "prepare", "--kind", "x509", "--reason", "r").stdout.strip()
    other = tmp_path / "other.pem"
    other.write_text(admin.one("x509", "active")["cert_pem"])
    one_line_error(admin.cli("ca", "activate", prepared, "--cert", str(other), "--reason", "r", check=False),
                   "already has its certificate")
    assert admin.one("x509", "prepared")["id"] == prepared


def test_root_rotation_publishes_the_new_root_before_it_signs(admin):
    old_root = admin.one("root", "active")
    new_root = admin.cli("ca", "prepare", "--kind", "root", "--reason", "yearly rotation").stdout.strip()
    bundle = x509.load_pem_x509_certificates(admin.cli("bundle", "show").stdout.encode())
    assert sorted(x509svid.authority_id(c.public_key()) for c in bundle) == sorted([old_root["id"], new_root])
    assert admin.one("x509", "active")["parent"] == old_root["id"]  # the new root signs nothing yet
    admin.cli("ca", "activate", new_root, "--reason", "the fleet has it")
    assert admin.one("root", "active")["id"] == new_root
    assert admin.one("x509", "active")["parent"] == new_root
    assert len(x509.load_pem_x509_certificates(admin.cli("bundle", "show").stdout.encode())) == 2


def test_crl_show_prints_every_crl_as_one_file_openssl_reads(admin, tmp_path):
    crls = json.loads(admin.cli("crl", "show", "--output", "json").stdout)
    assert crls[0]["authority"] == admin.one("x509", "active")["id"]  # the active intermediate's first
    text = admin.cli("crl", "show").stdout
    headers = [line for line in text.splitlines() if line.startswith("# authority ")]
    assert [h.split()[2].rstrip(":") for h in headers] == [c["authority"] for c in crls]
    assert all(f"CRL number {c['number']}," in h for h, c in zip(headers, crls))
    path = tmp_path / "crl.pem"
    path.write_text(text)
    r = subprocess.run(["openssl", "crl", "-in", str(path), "-noout", "-crlnumber"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    der = subprocess.run([str(BIN / "tessera"), "--admin-socket", str(admin.path), "crl", "show", "--der"],
                         capture_output=True, timeout=30).stdout
    assert crl_mod.load(der).public_bytes(Encoding.PEM).decode() == crls[0]["pem"]


# -- an offline root: the key never reaches the issuer ---------------------------------------------


def sign_csr(csr_pem: bytes, root_cert: x509.Certificate, root_key, days: int = 30) -> bytes:
    csr = x509.load_pem_x509_csr(csr_pem)
    not_after = dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=days)
    return x509svid.build_intermediate(csr.public_key(), TD, not_after, root_cert, root_key).public_bytes(Encoding.PEM)


def test_offline_root_prepare_writes_the_csr_and_activate_installs_only_a_matching_certificate(deployment, tmp_path):
    d = deployment
    root_key = x509svid.new_key()
    root_cert = x509svid.build_ca(root_key, TD, dt.timedelta(days=365))
    root_pem = tmp_path / "root.pem"
    root_pem.write_bytes(root_cert.public_bytes(Encoding.PEM))
    offline = {"ca_cert": str(root_pem), "ca_offline": True}
    # First start: no intermediate can sign, so the issuer stops, naming the CSR to sign and where its certificate goes.
    line = one_line_error(d.run_issuer_once(d.issuer_config(**offline)), "offline root")
    [csr_path] = d.issuer_dir.glob("intermediate-*.csr")
    assert str(csr_path) in line
    first = csr_path.name.removeprefix("intermediate-").removesuffix(".csr")
    (d.issuer_dir / f"intermediate-{first}.pem").write_bytes(sign_csr(csr_path.read_bytes(), root_cert, root_key))
    d.start_issuer(**offline)

    def one(kind: str, state: str) -> dict:
        [a] = [a for a in json.loads(d.cli("ca", "list", "--output", "json").stdout)
               if a["kind"] == kind and a["state"] == state]
        return a

    assert one("x509", "active")["id"] == first
    assert one("root", "active")["source"] == "offline"
    csr_out = tmp_path / "next.csr"
    next_id = d.cli("ca", "prepare", "--kind", "x509", "--reason", "next one", "--csr-out", str(csr_out)).stdout.strip()
    pending = one("x509", "prepared")
    assert pending["id"] == next_id and pending["not_after"] == 0  # no validity until it is signed
    assert x509svid.authority_id(x509.load_pem_x509_csr(csr_out.read_bytes()).public_key()) == next_id

    wrong = tmp_path / "wrong.pem"
    wrong.write_bytes(sign_csr(x509svid.intermediate_csr(x509svid.new_key(), TD).public_bytes(Encoding.PEM),
                               root_cert, root_key))
    one_line_error(d.cli("ca", "activate", next_id, "--cert", str(wrong), "--reason", "r", check=False),
                   "not for the prepared intermediate")
    stranger_key = x509svid.new_key()
    stranger = tmp_path / "stranger.pem"
    stranger.write_bytes(sign_csr(csr_out.read_bytes(), x509svid.build_ca(stranger_key, TD, dt.timedelta(days=1)),
                                  stranger_key))
    one_line_error(d.cli("ca", "activate", next_id, "--cert", str(stranger), "--reason", "r", check=False),
                   "not signed by root")
    one_line_error(d.cli("ca", "activate", next_id, "--reason", "r", check=False), "--cert")
    assert one("x509", "active")["id"] == first and one("x509", "prepared")["id"] == next_id  # nothing changed

    # Signed as docs/authorities.md tells the operator to, with openssl at the offline CA.
    root_key_pem = write_private(tmp_path / "root.key", pem.key_pem(root_key).decode())
    ext = tmp_path / "ext.cnf"
    ext.write_text("subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid:always\n")
    good = tmp_path / "good.pem"
    subprocess.run(["openssl", "x509", "-req", "-in", str(csr_out), "-CA", str(root_pem), "-CAkey", str(root_key_pem),
                    "-days", "30", "-copy_extensions", "copyall", "-extfile", str(ext), "-out", str(good)],
                   check=True, capture_output=True)
    d.cli("ca", "activate", next_id, "--cert", str(good), "--reason", "signed at the offline CA")
    assert one("x509", "active")["id"] == next_id
    # Without --csr-out the CSR follows the id on stdout.
    shown = d.cli("ca", "prepare", "--kind", "x509", "--reason", "spare").stdout
    spare, csr_text = shown.split("\n", 1)
    assert x509svid.authority_id(x509.load_pem_x509_csr(csr_text.encode()).public_key()) == spare
    # Withdrawing the old intermediate takes a CRL signed by the root, whose key is not here.
    one_line_error(d.cli("ca", "revoke", first, "--reason", "r", "--force", check=False), "offline root")
