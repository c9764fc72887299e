"""Bad input gets one clear line (CLI exit code 2) or INVALID_ARGUMENT naming the problem; never a traceback."""

import socket
import sqlite3
import subprocess
import time

import grpc
import pytest
import yaml

from harness import BIN, one_line_error, write_private
from tessera.v1 import admin_pb2_grpc, types_pb2


@pytest.fixture
def issuer(deployment):
    deployment.start_issuer()
    return deployment


BASE = ["entry", "create", "--parent", "host-a", "--selector", "unix:uid:0", "--owner", "o", "--purpose", "p",
        "--expires-in", "1d"]


@pytest.mark.parametrize("args, fragments", [
    (["--spiffe-id", "spiffe://example.org/a/../b"], ["'.' and '..'"]),
    (["--spiffe-id", "http://example.org/a"], ["must start with spiffe://"]),
    (["--spiffe-id", "spiffe://other.org/a"], ["not in trust domain example.org"]),
    (["--spiffe-id", "spiffe://example.org/a", "--selector", "docker:label:x"], ["unknown selector type"]),
    (["--spiffe-id", "spiffe://example.org/a", "--selector", "unix:uid:abc"], ["bad value for unix:uid"]),
    (["--spiffe-id", "spiffe://example.org/a", "--x509-ttl", "10 years"], ["invalid duration"]),
])
def test_cli_rejects_bad_entry_fields_with_one_line(issuer, args, fragments):
    one_line_error(issuer.cli(*BASE, *args, check=False), *fragments)
    assert issuer.cli("entry", "list", "--output", "json").stdout.strip() == "[]"


@pytest.mark.parametrize("drop, fragment", [("--owner", "--owner is required"), ("--purpose", "--purpose is required"),
                                            ("--expires-in", "--expires-in is required")])
def test_cli_requires_owner_purpose_and_expiry(issuer, drop, fragment):
    args = list(BASE) + ["--spiffe-id", "spiffe://example.org/a"]
    i = args.index(drop)
    del args[i:i + 2]
    one_line_error(issuer.cli(*args, check=False), fragment)


def test_cli_usage_error_is_one_line(issuer):
    one_line_error(issuer.cli("entry", "create", "--bogus", check=False), "required: --spiffe-id")
    one_line_error(issuer.cli("entry", "list", "--bogus", check=False), "unrecognized arguments")
    one_line_error(issuer.cli("entry", "show", "no-such-id", check=False), "no entry with id", "NOT_FOUND")


@pytest.mark.parametrize("field, message", [("owner", "owner is required"), ("purpose", "purpose is required"),
                                            ("expires_at", "expiry is required")])
def test_admin_api_rejects_missing_required_fields_even_without_the_cli(issuer, field, message):
    entry = dict(spiffe_id="spiffe://example.org/a", parent_id="host-a", selectors=["unix:uid:0"], owner="o",
                 purpose="p", expires_at=int(time.time()) + 3600)
    entry.pop(field)
    with grpc.insecure_channel(f"unix://{issuer.admin_socket}") as ch:
        with pytest.raises(grpc.RpcError) as e:
            admin_pb2_grpc.AdminStub(ch).CreateEntry(types_pb2.Entry(**entry), timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in e.value.details()


def good_issuer_cfg(tmp_path) -> dict:
    return {"trust_domain": "example.org", "data_dir": str(tmp_path / "d"), "listen_address": "127.0.0.1:0",
            "admin_socket": str(tmp_path / "a.sock")}


@pytest.mark.parametrize("change, fragments", [
    ({"trust_domain": None}, ["trust_domain: is required"]),
    ({"trust_domain": "Bad Domain"}, ["trust_domain:", "invalid trust domain"]),
    ({"default_x509_ttl": "ten minutes"}, ["default_x509_ttl:", "invalid duration"]),
    ({"listen_address": "nowhere"}, ["listen_address: must be HOST:PORT"]),
    ({"max_workrs": 5}, ["max_workrs: unknown key"]),
    ({"ca_cert": "/nonexistent/ca.pem"}, ["ca_key", "together"]),
])
def test_invalid_issuer_config_stops_start_with_one_line_naming_the_key(deployment, tmp_path, change, fragments):
    cfg = good_issuer_cfg(tmp_path)
    for k, v in change.items():
        if v is None:
            cfg.pop(k)
        else:
            cfg[k] = v
    one_line_error(deployment.run_issuer_once(cfg), *fragments)


def test_a_listen_port_already_taken_stops_the_issuer_with_one_line(deployment, tmp_path):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        cfg = good_issuer_cfg(tmp_path)
        cfg["listen_address"] = f"127.0.0.1:{taken.getsockname()[1]}"
        one_line_error(deployment.run_issuer_once(cfg), "listen_address: cannot listen on", cfg["listen_address"],
                       "in use")
    finally:
        taken.close()


def test_malformed_yaml_is_reported_with_its_position(deployment):
    one_line_error(deployment.run_issuer_once("trust_domain: [unclosed\n"), "malformed YAML", "line")


def test_unreadable_or_invalid_ca_key_stops_the_issuer(deployment, tmp_path):
    cfg = good_issuer_cfg(tmp_path)
    ca = tmp_path / "ca.pem"
    key = tmp_path / "ca-key.pem"
    ca.write_text("not a certificate")
    key.write_text("not a key")
    key.chmod(0o600)
    cfg.update(ca_cert=str(ca), ca_key=str(key))
    one_line_error(deployment.run_issuer_once(cfg), "ca_cert:", "holds no PEM certificate")
    # A real certificate with a key file that is garbage, missing, or readable by others.
    from cautil import write_root

    real_dir = tmp_path / "real"
    real_dir.mkdir()
    write_root(real_dir)  # writes ca.pem and its key there
    cfg.update(ca_cert=str(real_dir / "ca.pem"), ca_key=str(tmp_path / "missing.pem"))
    one_line_error(deployment.run_issuer_once(cfg), "ca_key:", "cannot read")
    bad = tmp_path / "garbage.pem"
    bad.write_text("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    bad.chmod(0o600)
    cfg.update(ca_key=str(bad))
    one_line_error(deployment.run_issuer_once(cfg), "ca_key:", "not an unencrypted PEM private key")
    (real_dir / "ca-key.pem").chmod(0o644)
    cfg.update(ca_key=str(real_dir / "ca-key.pem"))
    one_line_error(deployment.run_issuer_once(cfg), "ca_key:", "readable by others")


def test_invalid_sidecar_config_and_refused_join_token_are_one_line(deployment, tmp_path):
    deployment.start_issuer()
    path = tmp_path / "sc.yaml"
    path.write_text(yaml.safe_dump({"issuer_address": f"127.0.0.1:{deployment.port}", "data_dir": str(tmp_path / "s"),
                                    "socket_path": str(tmp_path / "s.sock")}))
    r = subprocess.run([str(BIN / "tessera-sidecar"), "run", "--config", str(path)], capture_output=True, text=True,
                       timeout=30)
    one_line_error(r, "trust_bundle: is required")
    path.write_text(yaml.safe_dump({"issuer_address": f"127.0.0.1:{deployment.port}",
                                    "trust_bundle": str(deployment.bundle_path), "data_dir": str(tmp_path / "s"),
                                    "socket_path": str(tmp_path / "s.sock")}))
    r = subprocess.run([str(BIN / "tessera-sidecar"), "run", "--config", str(path), "--join-token-file", "-"],
                       input="bogus\n", capture_output=True, text=True, timeout=30)
    one_line_error(r, "join_token:", "refused")


@pytest.mark.parametrize("signing_workers", [0, 1])
def test_one_entry_that_cannot_be_signed_fails_alone_in_its_batch(deployment, signing_workers):
    """An entry whose expiry no certificate can carry (written before expiries were bounded) fails with its
    own status; the good entries of the same batch are signed, and the next batch works as well."""
    from issuer_client import attested_stub
    from tessera import x509svid
    from tessera.v1 import issuer_pb2

    deployment.start_issuer(signing_workers=signing_workers)
    stub = attested_stub(deployment, "host-a")
    good = [deployment.entry(f"/agent/good{i}", "host-a") for i in range(2)]
    bad = deployment.entry("/agent/bad", "host-a")
    deployment.issuer.stop()
    with sqlite3.connect(deployment.issuer_dir / "tessera.db") as db:  # as an old issuer would have stored it
        db.execute("UPDATE entries SET expires_at=? WHERE id=?", (int(time.time()) + 99999999999999 * 86400, bad))
    deployment.issuer.start()
    for _ in range(2):
        resp = stub.SignX509SVIDs(issuer_pb2.SignX509SVIDsRequest(items=[
            issuer_pb2.CSRItem(entry_id=e, csr=x509svid.make_csr(x509svid.new_key())) for e in (good[0], bad, good[1])
        ]), timeout=30)
        by_id = {i.entry_id: i for i in resp.items}
        assert [by_id[e].status_code for e in good] == [0, 0] and all(by_id[e].cert_chain for e in good)
        assert by_id[bad].status_code == grpc.StatusCode.FAILED_PRECONDITION.value[0] and not by_id[bad].cert_chain
        assert bad in by_id[bad].error and "expiry" in by_id[bad].error


# -- bounded durations, timestamps, numbers and text at every entry point -------------------------------

def entries(d) -> str:
    return d.cli("entry", "list", "--output", "json").stdout


@pytest.mark.parametrize("args, fragments", [
    (["--spiffe-id", "spiffe://example.org/a", "--expires-in", "99999999999999d"], ["--expires-in", "too long",
                                                                                   "at most 3650d"]),
    (["--spiffe-id", "spiffe://example.org/a", "--expires-in", "１０d"], ["--expires-in", "invalid duration"]),
    (["--spiffe-id", "spiffe://example.org/a", "--x509-ttl", "31d"], ["x509_ttl must be between 10s and 30d"]),
    (["--spiffe-id", "spiffe://example.org/a", "--selector", "unix:uid:4294967296"], ["bad value for unix:uid"]),
    (["--spiffe-id", "spiffe://example.org/a", "--selector", "unix:gid:１０００"], ["bad value for unix:gid"]),
    (["--spiffe-id", "spiffe://example.org/a", "--owner", "o" * 5000], ["owner is longer than 1024"]),
    (["--spiffe-id", "spiffe://example.org/a", "--purpose", "two\nlines"], ["purpose must not contain control"]),
    (["--spiffe-id", "spiffe://example.org/a", *["--scope", "s"] * 65], ["at most 64 scopes"]),
    (["--spiffe-id", "spiffe://example.org/a", *sum((["--selector", f"unix:uid:{i}"] for i in range(33)), [])],
     ["at most 32 selectors"]),
])
def test_cli_refuses_unbounded_entry_fields_and_changes_nothing(issuer, args, fragments):
    one_line_error(issuer.cli(*BASE, *args, check=False), *fragments)
    assert entries(issuer).strip() == "[]"


@pytest.mark.parametrize("args, fragments", [
    (["token", "create", "--sidecar", "host-a", "--ttl", "99999999999999999999999d"], ["--ttl", "too long"]),
    (["token", "create", "--sidecar", "host-a", "--ttl", "8d"], ["ttl must be between 1s and 7d"]),
    (["token", "create", "--sidecar", "h" * 5000], ["invalid sidecar name", "longer than 253"]),
    (["audit", "tail", "-n", "2147483648"], ["--lines", "from 0 to 1000000"]),
    (["audit", "tail", "-n", "-1"], ["--lines", "from 0 to 1000000"]),
    (["report", "--unused-days", "99999999999"], ["--unused-days", "from 0 to 3650"]),
    (["audit", "export", "--since", "99999999999999999999d"], ["--since"]),
])
def test_cli_refuses_out_of_range_numbers_with_one_line(issuer, args, fragments):
    one_line_error(issuer.cli(*args, check=False), *fragments)
    assert not issuer.audit("join_token.create")


def test_nul_in_a_cli_path_is_one_line(capsys):
    from issuer import cli
    with pytest.raises(SystemExit) as e:
        cli.main(["--admin-socket", "/tmp/a\0b", "entry", "list"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "NUL" in err[0]


def admin(d):
    return admin_pb2_grpc.AdminStub(grpc.insecure_channel(f"unix://{d.admin_socket}"))


def invalid(call) -> str:
    with pytest.raises(grpc.RpcError) as e:
        call()
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value
    return e.value.details()


def test_admin_api_refuses_unbounded_fields_set_directly(issuer):
    from tessera.v1 import admin_pb2

    stub = admin(issuer)
    now = int(time.time())
    good = dict(spiffe_id="spiffe://example.org/a", parent_id="host-a", selectors=["unix:uid:0"], owner="o",
                purpose="p", expires_at=now + 3600)
    for change, fragment in [({"expires_at": 2**62}, "at most 3650d"), ({"expires_at": now + 3651 * 86400}, "3650d"),
                             ({"x509_ttl_seconds": 2**62}, "x509_ttl must be between"),
                             ({"selectors": ["unix:uid:99999999999"]}, "bad value for unix:uid"),
                             ({"selectors": [f"unix:uid:{i}" for i in range(1000)]}, "at most 32 selectors"),
                             ({"selectors": ["unix:path:/" + "a" * 5000]}, "longer than"),
                             ({"scopes": ["s" * 129]}, "invalid scope"),
                             ({"owner": "x" * 5000}, "owner is longer"), ({"purpose": "a\0b"}, "control")]:
        assert fragment in invalid(lambda: stub.CreateEntry(types_pb2.Entry(**{**good, **change}), timeout=10))
    entry = stub.CreateEntry(types_pb2.Entry(**good), timeout=10)
    for change, fragment in [({"expires_at": 2**62}, "at most 3650d"), ({"x509_ttl_seconds": -5}, "between"),
                             ({"reason": "r" * 5000}, "reason is longer")]:
        assert fragment in invalid(lambda: stub.UpdateEntry(admin_pb2.UpdateEntryRequest(id=entry.id, **change),
                                                            timeout=10))
    assert stub.GetEntry(admin_pb2.EntryRef(id=entry.id), timeout=10) == entry  # nothing changed
    assert "longer than 253" in invalid(lambda: stub.CreateJoinToken(
        admin_pb2.CreateJoinTokenRequest(sidecar_name="n" * 5000), timeout=10))
    assert "between 1s and 7d" in invalid(lambda: stub.CreateJoinToken(
        admin_pb2.CreateJoinTokenRequest(sidecar_name="h", ttl_seconds=2**62), timeout=10))
    assert "unused_days must be between" in invalid(lambda: stub.Report(
        admin_pb2.ReportRequest(unused_days=2**62), timeout=10))
    long = "spiffe://example.org/" + "x" * 5000
    assert "longer than 2048" in invalid(lambda: stub.Revoke(admin_pb2.RevokeRequest(spiffe_id=long, reason="r"),
                                                             timeout=10))
    assert "longer than 2048" in invalid(lambda: stub.BanSidecar(admin_pb2.BanSidecarRequest(sidecar=long, reason="r"),
                                                                 timeout=10))
    assert "longer than 2048" in invalid(lambda: stub.GetSidecar(admin_pb2.SidecarRef(id=long), timeout=10))
    assert "longer than 2048" in invalid(lambda: list(stub.ReadAudit(admin_pb2.AuditQuery(subject=long), timeout=10)))
    assert "reason is longer" in invalid(lambda: stub.DecideApproval(
        admin_pb2.DecideApprovalRequest(id="x", approve=True, reason="r" * 5000), timeout=10))
    assert not issuer.audit("join_token.create")


@pytest.mark.parametrize("change, fragments", [
    ({"ca_ttl": "366d"}, ["ca_ttl:", "too long", "365d"]),
    ({"ca_ttl": "30s"}, ["ca_ttl:", "at least 1m"]),
    ({"root_ttl": "1h"}, ["root_ttl:", "at least 1d"]),
    ({"ca_offline": True}, ["ca_offline:", "takes ca_cert"]),
    ({"crl_validity": "99999999999d"}, ["crl_validity:", "too long", "7d"]),
    ({"crl_validity": "5s"}, ["crl_validity:", "at least 10s"]),
    ({"default_x509_ttl": "１０m"}, ["default_x509_ttl:", "invalid duration"]),
    ({"default_x509_ttl": "31d"}, ["default_x509_ttl:", "30d"]),
    ({"join_token_ttl": "8d"}, ["join_token_ttl:", "7d"]),
    ({"resync_interval": 10**30}, ["resync_interval:", "too long"]),
    ({"data_dir": "/tmp/a\0b"}, ["data_dir:", "NUL"]),
    ({"admin_socket": "/" + "a" * 5000}, ["admin_socket:", "longer than 4096"]),
    ({"server_name": "not a dns name!"}, ["server_name:", "not a DNS name"]),
    ({"server_name": "-bad-.example"}, ["server_name:", "not a DNS name"]),
    ({"log_level": "loud"}, ["log_level:", "unknown log level", "debug, info, warning, error"]),
    ({"admin_uids": [4294967296]}, ["admin_uids:", "4294967294"]),
    ({"max_workers": 10**30}, ["max_workers:", "between 8 and 4096"]),
    ({"signing_workers": -1}, ["signing_workers:", "between 0 and 64"]),
    ({"listen_address": "127.0.0.1:８４４３"}, ["listen_address: must be HOST:PORT"]),
    ({"listen_address": "a\0b:8443"}, ["listen_address: must be HOST:PORT"]),
    # Each SQLite process would keep its own file: peers sharing a port must share a PostgreSQL database.
    ({"share_port": True}, ["share_port:", "needs datastore: {engine: postgres}"]),
    ({"share_port": "yes"}, ["share_port:"]),
])
def test_out_of_range_issuer_config_stops_start_with_one_line(deployment, tmp_path, change, fragments):
    cfg = {**good_issuer_cfg(tmp_path), **change}
    one_line_error(deployment.run_issuer_once(cfg), *fragments)
    assert not (tmp_path / "d").exists()  # nothing was created


def test_audit_file_that_is_a_directory_stops_start(deployment, tmp_path):
    cfg = good_issuer_cfg(tmp_path)
    (tmp_path / "audit-dir").mkdir()
    one_line_error(deployment.run_issuer_once({**cfg, "audit_file": str(tmp_path / "audit-dir")}),
                   "audit_file:", "is a directory")


@pytest.mark.parametrize("text, fragments", [
    ("trust_domain: example.org\ntrust_domain: evil.org\n", ["duplicate key 'trust_domain'", "line 2"]),
    ("[" * 10000, ["malformed YAML"]),
    ("{a: " * 10000, ["malformed YAML"]),
    ("a: " + "x" * (1 << 20) + "\n", ["larger than 1048576 bytes"]),
])
def test_malformed_issuer_config_files_are_one_line(deployment, text, fragments):
    one_line_error(deployment.run_issuer_once(text), *fragments)


def test_duplicate_keys_in_the_policy_file_stop_start(deployment, tmp_path):
    policy = tmp_path / "policy.yaml"
    policy.write_text("approval_timeout: 5m\napproval_timeout: 1h\n")
    one_line_error(deployment.run_issuer_once({**good_issuer_cfg(tmp_path), "policy_file": str(policy)}),
                   str(policy), "duplicate key 'approval_timeout'")


def test_expired_ca_certificate_stops_start_with_one_line(deployment, tmp_path):
    import datetime as dt

    from tessera import pem, x509svid

    key = x509svid.new_key()
    cert = x509svid.build_ca(key, "example.org", dt.timedelta(seconds=-5))  # valid from -30s to -5s
    ca, ca_key = tmp_path / "ca.pem", tmp_path / "ca-key.pem"
    ca.write_bytes(pem.certs_pem([cert]))
    write_private(ca_key, pem.key_pem(key).decode())
    cfg = {**good_issuer_cfg(tmp_path), "ca_cert": str(ca), "ca_key": str(ca_key)}
    one_line_error(deployment.run_issuer_once(cfg), "ca_cert:", "expired at", "renew")


@pytest.mark.parametrize("change, fragments", [
    ({"socket_path": "/tmp/s\0ck"}, ["socket_path:", "NUL"]),
    ({"server_name": "tessera issuer"}, ["server_name:", "not a DNS name"]),
    ({"log_level": "verbose"}, ["log_level:", "unknown log level"]),
    ({"crl_check_interval": "99999999999999d"}, ["crl_check_interval:", "too long"]),
    ({"crl_check_interval": "2d"}, ["crl_check_interval:", "at most 1d"]),
    ({"socket_mode": "０６６６"}, ["socket_mode:", "octal"]),
    ({"exe_hash_max_bytes": 10**30}, ["exe_hash_max_bytes:", "between 0 and"]),
    # Several issuer addresses (failover): each entry checked, named by its index.
    ({"issuer_address": []}, ["issuer_address: must list at least one HOST:PORT"]),
    ({"issuer_address": ["127.0.0.1:1", "no-port"]}, ["issuer_address[1]: must be HOST:PORT", "'no-port'"]),
    ({"issuer_address": ["127.0.0.1:1", 7]}, ["issuer_address[1]: must be str, got int"]),
    ({"issuer_address": ["127.0.0.1:1", "127.0.0.1:1"]}, ["issuer_address[1]: 127.0.0.1:1 is listed twice"]),
    ({"issuer_address": {"a": 1}}, ["issuer_address: must be HOST:PORT or a list of them, got dict"]),
    ({"issuer_bootstrap_address": []}, ["issuer_bootstrap_address: must list at least one"]),
    ({"issuer_bootstrap_address": ["x:1", "x:99999"]}, ["issuer_bootstrap_address[1]: must be HOST:PORT"]),
])
def test_out_of_range_sidecar_config_stops_start_with_one_line(deployment, change, fragments):
    deployment.bundle_path.write_text("")
    cfg = deployment.sidecar_config("host-a", **change)
    r = subprocess.run([str(BIN / "tessera-sidecar"), "run", "--config", str(cfg)], capture_output=True, text=True,
                       timeout=30)
    one_line_error(r, *fragments)
    assert not (deployment.sidecar_dir("host-a") / "data").exists()


@pytest.mark.parametrize("text, fragments", [
    ("issuer_address: 127.0.0.1:1\nissuer_address: 127.0.0.1:2\n", ["duplicate key 'issuer_address'"]),
    ("[" * 10000, ["malformed YAML"]),
])
def test_malformed_sidecar_config_files_are_one_line(tmp_path, text, fragments):
    path = tmp_path / "sc.yaml"
    path.write_text(text)
    r = subprocess.run([str(BIN / "tessera-sidecar"), "run", "--config", str(path)], capture_output=True, text=True,
                       timeout=30)
    one_line_error(r, *fragments)


@pytest.mark.parametrize("args, fragments", [
    (["api", "fetch", "--socket", "/tmp/x", "--out", "/tmp/o", "--timeout", "nan"], ["--timeout"]),
    (["api", "fetch", "--socket", "/tmp/x", "--out", "/tmp/o", "--timeout", "1e308"], ["--timeout"]),
    (["healthcheck", "--socket", "/tmp/x", "--timeout", "-1"], ["--timeout"]),
    (["task", "start", "--socket", "/tmp/x", "--task-id", "t", "--out", "/tmp/o", "--ttl", "99999999999999d"],
     ["--ttl", "too long"]),
])
def test_sidecar_cli_refuses_out_of_range_flags_with_one_line(args, fragments):
    r = subprocess.run([str(BIN / "tessera-sidecar"), *args], capture_output=True, text=True, timeout=30)
    one_line_error(r, *fragments)


def test_each_signing_job_fails_alone_whatever_it_raises(tmp_path):
    """The mechanism, in-process and in a worker alike: sign_jobs turns whatever one job raises into that job's
    own status, and signs the others."""
    from cautil import write_root
    from issuer.issuance.pool import SignJob, sign_jobs
    from tessera import x509svid
    from tessera.errors import Code

    ca = write_root(tmp_path)
    now = int(time.time())

    def job(entry_id, ttl=600, cap=now + 3600, sid="spiffe://example.org/a"):
        return SignJob(x509svid.make_csr(x509svid.new_key()), sid, ttl, cap, entry_id, "sc", now)

    out = sign_jobs(ca, [job("good1"), job("hugettl", ttl=10**20), job("hugecap", cap=10**18),
                         job("badid", sid="spiffe://example.org/a/../b"), job("good2")])
    assert [bool(s.chain_der) for s in out] == [True, False, False, False, True]
    assert [s.code for s in out] == [0, Code.INTERNAL, Code.FAILED_PRECONDITION, Code.INVALID_ARGUMENT, 0]
    assert all(f"entry {e}" in s.error for e, s in zip(("hugettl", "hugecap", "badid"), out[1:4]))
