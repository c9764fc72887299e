"""Bad input gets one clear line (CLI exit code 2) or INVALID_ARGUMENT naming the problem; never a traceback."""

import socket
import subprocess
import time

import grpc
import pytest
import yaml

from harness import BIN, one_line_error
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
    from issuer.ca import CertificateAuthority

    real_dir = tmp_path / "real"
    real_dir.mkdir()
    CertificateAuthority.load_or_create("example.org", real_dir)  # writes ca.pem and its key there
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
