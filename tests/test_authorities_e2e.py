"""Authorities that last, end to end: real issuer and sidecar daemons, the real `tessera` CLI, workloads that use
only the unmodified `spiffe` / `spiffe-tls` packages (tests/clients/spiffe_client.py), and `openssl verify`.

What the in-process suites (test_authorities.py, test_ca_cli.py) and the taint/revoke e2e tests
(test_sidecar_authorities_e2e.py) already prove is not repeated here: a certificate that does not match the prepared
key is refused through the daemon in test_ca_cli.py's offline-root test."""

from __future__ import annotations

import json
import os
import socket
import ssl
import subprocess
import time
from pathlib import Path

from cryptography import x509

from harness import free_ports, one_line_error, openssl_verify, wait_for, write_private
from cautil import write_root
from tessera import chain, x509svid

TD = "example.org"


# -- helpers -------------------------------------------------------------------------------------------


def ca_list(d) -> list[dict]:
    return json.loads(d.cli("ca", "list", "--output", "json").stdout)


def states(d) -> list[dict]:
    """`ca list` but `outstanding`, a count of live certificates: each issuer start signs itself a serving certificate."""
    return [{k: v for k, v in a.items() if k != "outstanding"} for a in ca_list(d)]


def one(d, kind: str, state: str) -> dict:
    [a] = [a for a in ca_list(d) if a["kind"] == kind and a["state"] == state]
    return a


def certs(text: str) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(text.encode())


def ids(text: str) -> list[str]:
    """The authority ids of the certificates in a PEM text (a bundle's roots, a chain's certificates)."""
    return [x509svid.authority_id(c.public_key()) for c in certs(text)]


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def signed_by(svid: dict) -> str:
    """The intermediate that signed an SVID a workload holds, after checking the chain it was served with."""
    leaf, intermediate = certs(svid["svid_pem"])  # leaf + its intermediate, the root left to the bundle
    inter_id = x509svid.authority_id(intermediate.public_key())
    assert chain.authority_key_id(leaf) == inter_id
    assert leaf.not_valid_after_utc <= intermediate.not_valid_after_utc  # no SVID outlives its signer
    return inter_id


def verified(tmp_path: Path, roots_pem: str, svid: dict, name: str = "svid") -> subprocess.CompletedProcess:
    """`openssl verify` of a held SVID (now, so an expired one fails) against `roots_pem` alone."""
    return openssl_verify(write(tmp_path / f"{name}-roots.pem", roots_pem), write(tmp_path / f"{name}.pem",
                                                                                   svid["svid_pem"]))


def changes(before: list[dict], after: list[dict]) -> list:
    """What differs between two `ca list` outputs, field by field (for an assertion's message)."""
    b, a = {x["id"]: x for x in before}, {x["id"]: x for x in after}
    return [(i, k, b.get(i, {}).get(k), a.get(i, {}).get(k)) for i in b.keys() | a.keys()
            for k in (b.get(i, {}).keys() | a.get(i, {}).keys()) if b.get(i, {}).get(k) != a.get(i, {}).get(k)]


def cert_pem(a: dict) -> str:
    return a["cert_pem"]


# -- 1. automatic rotation ---------------------------------------------------------------------------------


# Automatic rotations to watch: one in the suite (about 45 s); scripts/rotations watches three or more (the issue's
# acceptance, about 110 s), a long run kept out of the suite's time budget.
ROTATIONS = int(os.environ.get("TESSERA_ROTATIONS", "1"))


def test_an_open_stream_and_mtls_between_workloads_keep_working_across_automatic_rotations(deployment, tmp_path):
    d = deployment
    d.start_issuer(ca_ttl="60s")  # the smallest allowed: rotations at 40 s, 70 s, 100 s (prepared at 1/2, active at 2/3)
    d.start_sidecar("host-a")
    for name, uid in (("watcher", 65532), ("server", 65534), ("client", 65533)):
        d.entry(f"/agent/{name}", "host-a", f"unix:uid:{uid}")
    sock = str(d.socket("host-a"))
    stream = d.stream("host-a", uid=65532)
    port = free_ports(1)[0]
    server = d.spawn_as(65534, "mtls-serve", sock, str(port), f"spiffe://{TD}/agent/client")
    assert server.next(30)["event"] == "listening"

    t0 = time.monotonic()
    # Both ends hold one X509Source across the rotations; the client connects every 5 s, each attempt must succeed.
    client = d.spawn_as(65533, "mtls-dial", sock, str(port), f"spiffe://{TD}/agent/server", "5")
    seen: list[str] = []  # the intermediates that signed the watcher's SVIDs, in order of change
    client_signers: list[str] = []  # and the client's, when it connected
    held = None
    checks = connections = 0
    last_check = 0.0
    connected_after_last_change = False
    deadline = time.monotonic() + 70 + 30 * ROTATIONS
    while not (len(seen) >= ROTATIONS + 1 and connected_after_last_change):
        assert time.monotonic() < deadline, f"intermediates seen: {seen}"
        try:
            msg = stream.next(0.5)
        except AssertionError:  # nothing new within the half second
            msg = None
        if msg is not None:
            assert msg["event"] == "update", msg
            held = msg
            inter = signed_by(msg["svids"][0])
            r = verified(tmp_path, msg["bundle_pem"], msg["svids"][0])
            assert r.returncode == 0, r.stdout + r.stderr
            if not seen or seen[-1] != inter:
                seen.append(inter)
                connected_after_last_change = False
        now = time.monotonic()
        if held is not None and now - last_check >= 2:
            # What the workload holds right now is still valid: it was replaced before it or its signer expired.
            r = verified(tmp_path, held["bundle_pem"], held["svids"][0])
            assert r.returncode == 0, r.stdout + r.stderr
            checks, last_check = checks + 1, now
        while not client.q.empty():
            reply = client.next(0)
            assert reply["event"] == "reply" and reply["data"] == "echo:hello", (reply, seen, now - t0)
            served = server.next(10)
            assert served["event"] == "served", served
            connections += 1
            if not client_signers or client_signers[-1] != reply["signer"]:
                client_signers.append(reply["signer"])
            connected_after_last_change = len(seen) >= ROTATIONS + 1
    print(f"{time.monotonic() - t0:.0f} s: watcher's intermediates {len(seen)}, openssl checks {checks}, "
          f"mTLS connections {connections}, client's intermediates {len(client_signers)}")
    assert len(client_signers) >= min(ROTATIONS, 2)  # the client's own SVID rotated too while it kept connecting
    listed = {a["id"]: a for a in ca_list(d)}
    assert all(listed[i]["kind"] == "x509" for i in seen)
    assert len(set(seen)) == len(seen)  # each rotation moved on to a new intermediate, never back


# -- 2. root rotation ------------------------------------------------------------------------------------------


def roots_in(msg: dict) -> list[str]:
    assert msg["event"] == "bundles", msg
    return ids(msg["bundles"][TD])


def present(port: int, chain_file: Path, key_file: Path) -> None:
    """A TLS client that presents a held certificate, as a peer that kept an old SVID would."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # the server's side is what is tested
    ctx.load_cert_chain(chain_file, key_file)
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, ctx.wrap_socket(raw) as tls:
            tls.sendall(b"hello")
            tls.recv(1024)  # TLS 1.3: a refused client certificate shows here, as an alert
    except (ssl.SSLError, ConnectionError, OSError):
        pass


def test_a_new_root_reaches_the_bundles_stream_before_it_signs_and_a_revoked_root_leaves_it(deployment, tmp_path):
    d = deployment
    out = tmp_path / "sidecar-out"
    d.start_issuer()
    d.start_sidecar("host-a", output_dir=str(out))
    d.entry("/agent/old", "host-a", "unix:uid:65534")
    sock = str(d.socket("host-a"))
    bundles = d.spawn_as(65534, "bundles", sock)
    old_root = one(d, "root", "active")
    assert roots_in(bundles.next(20)) == [old_root["id"]]

    new_root = d.cli("ca", "prepare", "--kind", "root", "--reason", "test: yearly rotation").stdout.strip()
    two = bundles.until(lambda m: len(roots_in(m)) == 2, 10)
    assert sorted(roots_in(two)) == sorted([old_root["id"], new_root])
    # At that moment nothing is signed under the new root: what is held, and what is signed now, chain to the old.
    held = d.fetch("host-a", uid=65534)["svids"][0]
    d.entry("/agent/probe", "host-a", "unix:uid:65531")
    fresh = d.fetch("host-a", uid=65531)["svids"][0]
    for i, svid in enumerate((held, fresh)):
        assert one(d, "x509", "active")["parent"] == old_root["id"]
        r = verified(tmp_path, cert_pem(old_root), svid, f"before-{i}")
        assert r.returncode == 0, r.stdout + r.stderr

    d.cli("ca", "activate", new_root, "--reason", "test: the fleet has it")
    new_root_pem = cert_pem(one(d, "root", "active"))
    d.entry("/agent/new", "host-a", "unix:uid:65533")
    newer = d.fetch("host-a", uid=65533)["svids"][0]
    r = verified(tmp_path, new_root_pem, newer, "after")
    assert r.returncode == 0, r.stdout + r.stderr
    assert verified(tmp_path, cert_pem(old_root), newer, "after-old").returncode != 0
    assert d.fetch("host-a", uid=65534)["svids"][0]["serial"] == held["serial"]  # the old-root SVID, still held
    # Both roots are in every workload's bundle, so an old-root SVID and a new-root SVID accept each other.
    port = free_ports(1)[0]
    server = d.spawn_as(65534, "mtls-server", sock, str(port), f"spiffe://{TD}/agent/new")
    assert server.next(30)["event"] == "listening"
    client = d.spawn_as(65533, "mtls-client", sock, str(port), f"spiffe://{TD}/agent/old")
    assert client.next(30) == {"event": "reply", "data": "echo:hello"}
    assert server.next(10)["event"] == "served"

    d.cli("ca", "revoke", old_root["id"], "--force", "--reason", "test: retire the old root")
    assert roots_in(bundles.until(lambda m: len(roots_in(m)) == 1, 10)) == [new_root]

    def sidecar_bundle() -> list[str]:
        try:
            return ids((out / "bundle.pem").read_text())
        except (OSError, ValueError):
            return []

    wait_for(lambda: sidecar_bundle() == [new_root], 10, what="the sidecar's bundle.pem without the old root")
    held_file = write(tmp_path / "held.pem", held["svid_pem"])
    r = openssl_verify(out / "bundle.pem", held_file)
    assert r.returncode != 0, r.stdout + r.stderr
    # A spiffe-tls server (its bundle from the sidecar) refuses the peer that kept its old-root SVID.
    key_file = write_private(tmp_path / "held.key", held["key_pem"])
    port2 = free_ports(1)[0]
    guard = d.spawn_as(65533, "mtls-server", sock, str(port2), f"spiffe://{TD}/agent/old")
    assert guard.next(30)["event"] == "listening"
    present(port2, held_file, key_file)
    refused = guard.next(10)
    assert refused["event"] == "error" and "certificate verify failed" in refused["error"], refused
    # Forced, so what it still signed is replaced at once: the workload is served an SVID under the new root.
    wait_for(lambda: d.fetch("host-a", uid=65534)["svids"][0]["serial"] != held["serial"], 10,
             what="the old-root SVID replaced after the forced revoke")
    r = verified(tmp_path, new_root_pem, d.fetch("host-a", uid=65534)["svids"][0], "replaced")
    assert r.returncode == 0, r.stdout + r.stderr


# -- 3. a root from outside: upstream, offline ---------------------------------------------------------------


def test_svids_chain_to_an_upstream_enterprise_root_through_tesseras_intermediate(deployment, tmp_path):
    d = deployment
    enterprise = tmp_path / "enterprise"
    enterprise.mkdir()
    write_root(enterprise)
    d.start_issuer(ca_cert=str(enterprise / "ca.pem"), ca_key=str(enterprise / "ca-key.pem"))
    d.start_sidecar("host-a")
    d.entry("/agent/upstream", "host-a")
    svid = d.fetch("host-a")["svids"][0]
    root = one(d, "root", "active")
    assert root["source"] == "upstream" and root["id"] == ids((enterprise / "ca.pem").read_text())[0]
    assert signed_by(svid) == one(d, "x509", "active")["id"]
    assert one(d, "x509", "active")["parent"] == root["id"]
    r = openssl_verify(enterprise / "ca.pem", write(tmp_path / "svid.pem", svid["svid_pem"]))
    assert r.returncode == 0, r.stdout + r.stderr


INTERMEDIATE_EXT = """basicConstraints=critical,CA:TRUE,pathlen:0
keyUsage=critical,keyCertSign,cRLSign
subjectKeyIdentifier=hash
authorityKeyIdentifier=keyid:always
"""


def openssl_sign(csr: Path, root_dir: Path, out: Path) -> Path:
    """The offline CA's step, as an operator does it: `openssl x509 -req` with the intermediate's extensions."""
    ext = write(root_dir / "intermediate.ext", INTERMEDIATE_EXT)
    subprocess.run(["openssl", "x509", "-req", "-in", str(csr), "-CA", str(root_dir / "ca.pem"), "-CAkey",
                    str(root_dir / "ca-key.pem"), "-days", "30", "-extfile", str(ext), "-out", str(out)],
                   check=True, capture_output=True)
    return out


def test_an_offline_root_signs_intermediates_from_csrs_and_svids_chain_to_it(deployment, tmp_path):
    d = deployment
    offline_dir = tmp_path / "offline-ca"
    offline_dir.mkdir()
    write_root(offline_dir)
    offline = {"ca_cert": str(offline_dir / "ca.pem"), "ca_offline": True}
    # First start: nothing can sign; the issuer exits with one line naming the CSR and where its certificate goes.
    line = one_line_error(d.run_issuer_once(d.issuer_config(**offline)), "offline root")
    [csr] = d.issuer_dir.glob("intermediate-*.csr")
    first = csr.name.removeprefix("intermediate-").removesuffix(".csr")
    target = d.issuer_dir / f"intermediate-{first}.pem"
    assert str(csr) in line and str(target) in line
    openssl_sign(csr, offline_dir, target)
    d.start_issuer(**offline)
    d.start_sidecar("host-a")
    d.entry("/agent/before", "host-a", "unix:uid:65534")
    before = d.fetch("host-a", uid=65534)["svids"][0]
    assert signed_by(before) == first
    r = openssl_verify(offline_dir / "ca.pem", write(tmp_path / "before.pem", before["svid_pem"]))
    assert r.returncode == 0, r.stdout + r.stderr

    csr_out = tmp_path / "next.csr"
    next_id = d.cli("ca", "prepare", "--kind", "x509", "--reason", "test: next", "--csr-out", str(csr_out)).stdout.strip()
    signed = openssl_sign(csr_out, offline_dir, tmp_path / "next.pem")
    d.cli("ca", "activate", next_id, "--cert", str(signed), "--reason", "test: signed at the offline CA")
    assert one(d, "x509", "active")["id"] == next_id
    d.entry("/agent/after", "host-a", "unix:uid:65533")
    after = d.fetch("host-a", uid=65533)["svids"][0]
    assert signed_by(after) == next_id  # the signer switched
    r = openssl_verify(offline_dir / "ca.pem", write(tmp_path / "after.pem", after["svid_pem"]))
    assert r.returncode == 0, r.stdout + r.stderr
    r = openssl_verify(offline_dir / "ca.pem", tmp_path / "before.pem")  # and what the first one signed stays valid
    assert r.returncode == 0, r.stdout + r.stderr


# -- 4. kill -9 loses nothing ----------------------------------------------------------------------------------


def test_every_authority_state_and_the_signer_survive_kill_9_of_the_issuer(deployment):
    d = deployment
    d.start_issuer()
    d.start_sidecar("host-a")
    probes = iter(range(65500, 65530))

    def signer_now() -> str:
        # An entry made now gets an SVID signed now: its intermediate is the issuer's signer.
        uid = next(probes)
        d.entry(f"/agent/probe-{uid}", "host-a", f"unix:uid:{uid}")
        return signed_by(d.fetch("host-a", uid=uid)["svids"][0])

    def serving_signer() -> str:
        # The issuer signs itself a serving certificate at each start, with the signer it starts with.
        leaf = x509.load_pem_x509_certificate(ssl.get_server_certificate(("127.0.0.1", d.port)).encode())
        return chain.authority_key_id(leaf)

    def restart_loses_nothing(step: str) -> None:
        signer = signer_now()
        before = states(d)
        d.restart_issuer(kill9=True)
        after = states(d)
        assert after == before, (step, changes(before, after))
        assert serving_signer() == signer == one(d, "x509", "active")["id"], step

    prepared = d.cli("ca", "prepare", "--kind", "x509", "--reason", "test: spare").stdout.strip()
    restart_loses_nothing("prepared")
    assert {a["id"]: a["state"] for a in ca_list(d)}[prepared] == "prepared"
    d.cli("ca", "activate", prepared, "--reason", "test: now")
    restart_loses_nothing("activated")
    assert one(d, "x509", "active")["id"] == prepared
    d.cli("ca", "taint", prepared, "--reason", "test: exposed")
    restart_loses_nothing("tainted")
    assert {a["id"]: a["state"] for a in ca_list(d)}[prepared] == "tainted"
    new_root = d.cli("ca", "prepare", "--kind", "root", "--reason", "test: rotation").stdout.strip()
    restart_loses_nothing("root prepared")
    d.cli("ca", "activate", new_root, "--reason", "test: rotation")
    restart_loses_nothing("root activated")
    assert one(d, "root", "active")["id"] == new_root
    assert signer_now() == one(d, "x509", "active")["id"]  # and the sidecar is served by it after all that


# -- 5. bad input through the real CLI and daemon --------------------------------------------------------------


def test_a_wrong_kek_at_start_is_one_line_and_a_refused_command_changes_nothing(deployment, monkeypatch):
    d = deployment
    d.start_issuer()
    before = states(d)
    active = one(d, "x509", "active")["id"]
    # What test_ca_cli.py proves against the admin handlers, here through the daemon: refused, nothing changed.
    one_line_error(d.cli("ca", "activate", "0123456789abcdef", "--reason", "r", check=False), "no authority")
    one_line_error(d.cli("ca", "revoke", "0123456789abcdef", "--reason", "r", check=False), "no authority")
    one_line_error(d.cli("ca", "revoke", active, "--reason", "r", "--force", check=False), "active", "taint it first")
    assert states(d) == before
    d.issuer.stop()
    import base64
    import os

    monkeypatch.setenv("TESSERA_KEK", base64.b64encode(os.urandom(32)).decode())  # a 32-byte key, not the one used
    one_line_error(d.run_issuer_once(d.issuer_config()), "wrong KEK")
    monkeypatch.delenv("TESSERA_KEK")
    d.issuer.start()
    assert states(d) == before
