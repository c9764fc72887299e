"""The operator CLI against a real issuer: entries, tokens, sidecars, bundle."""

import json
import os
import re
import stat

from cryptography import x509


def test_token_create_prints_only_the_token(running):
    out = running.cli("token", "create", "--sidecar", "host-z").stdout
    assert re.fullmatch(r"[0-9a-f]{64}\n", out)  # 256 bits; never begins with "-"


def test_entry_lifecycle_through_the_cli(running):
    entry_id = running.entry("/agent/a", "host-a", "unix:uid:0", "unix:user:root", scope=["repo:read", "repo:write"],
                             tier="low", x509_ttl="5m")
    assert re.fullmatch(r"[0-9a-f-]{36}", entry_id)
    shown = json.loads(running.cli("entry", "show", entry_id, "--output", "json").stdout)
    assert shown["selectors"] == ["unix:uid:0", "unix:user:root"]
    assert shown["scopes"] == ["repo:read", "repo:write"] and shown["x509_ttl"] == 300
    assert shown["owner"] == "alice" and shown["created_by"] == f"uid:{os.getuid()}"

    updated = json.loads(running.cli("entry", "update", entry_id, "--owner", "bob", "--output", "json").stdout)
    assert updated["owner"] == "bob" and updated["revision"] == 2

    listed = json.loads(running.cli("entry", "list", "--output", "json").stdout)
    assert [e["id"] for e in listed] == [entry_id]
    table = running.cli("entry", "list").stdout
    assert "spiffe://example.org/agent/a" in table and "bob" in table

    running.cli("entry", "delete", entry_id)
    assert json.loads(running.cli("entry", "list", "--output", "json").stdout) == []


def test_extending_an_entry_expiry_needs_a_reason(running):
    entry_id = running.entry("/agent/a", "host-a", expires_in="1d")
    r = running.cli("entry", "update", entry_id, "--expires-in", "60d", check=False)
    assert r.returncode == 2 and "needs a reason" in r.stderr
    running.cli("entry", "update", entry_id, "--expires-in", "60d", "--reason", "project extended to Q3")
    shortened = running.cli("entry", "update", entry_id, "--expires-in", "2d", "--output", "json")
    assert json.loads(shortened.stdout)["revision"] == 3


def test_sidecar_list_and_show(running):
    listed = json.loads(running.cli("sidecar", "list", "--output", "json").stdout)
    assert [(s["id"], s["state"], s["connected"]) for s in listed] == [
        ("spiffe://example.org/tessera/sidecar/host-a", "active", True)]
    shown = json.loads(running.cli("sidecar", "show", "host-a", "--output", "json").stdout)
    assert shown["svid_serial"] and shown["svid_expires_at"] > shown["attested_at"]
    r = running.cli("sidecar", "show", "nobody", check=False)
    assert r.returncode == 2 and "no sidecar" in r.stderr


def test_bundle_show_prints_the_ca_certificate(running):
    certs = x509.load_pem_x509_certificates(running.cli("bundle", "show").stdout.encode())
    assert len(certs) == 1
    assert certs[0].extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_admin_socket_is_private_to_its_owner(running):
    mode = stat.S_IMODE(os.stat(running.admin_socket).st_mode)
    assert mode == 0o600


def test_missing_admin_socket_is_one_line(deployment):
    r = deployment.cli("entry", "list", check=False)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1 and "does not exist" in r.stderr


def test_operator_uid_is_checked_by_the_kernel_not_only_by_file_mode(running):
    # Widen the socket by hand: the issuer must still refuse a uid that is not an operator.
    os.chmod(running.admin_socket, 0o666)
    import subprocess

    from harness import BIN, as_uid

    r = subprocess.run(as_uid(65534, [str(BIN / "tessera"), "--admin-socket", str(running.admin_socket), "entry", "list"]),
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "uid 65534 is not an operator" in r.stderr and "PERMISSION_DENIED" in r.stderr
