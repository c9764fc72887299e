"""Real issuer, real sidecar daemon: what `tessera ca taint` and `tessera ca revoke` do to what a sidecar serves
and publishes. The authority a test acts on is read from the SVID it was served (a leaf's authority key
identifier is its signer's id), so the tests need nothing of `tessera ca list`'s output format."""

from __future__ import annotations

import queue
import subprocess
import threading

from cryptography import x509

from agent_sidecar import workload_client
from harness import wait_for
from tessera import chain, crl, pem, x509svid


def _leaf_and_intermediate(resp):
    certs = pem.split_der(resp.svids[0].x509_svid)
    assert len(certs) == 2, "an SVID is served with its intermediate"
    return certs[0], certs[1]


class _Stream:
    """An open FetchX509SVID stream read on a thread."""

    def __init__(self, socket_path: str):
        self.responses: queue.Queue = queue.Queue()
        self._cm = workload_client.x509_stream(socket_path)
        self._call = self._cm.__enter__()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        try:
            for r in self._call:
                self.responses.put(r)
        except Exception as e:  # noqa: BLE001 - reported by next() as what the test waited for
            self.responses.put(e)

    def next(self, timeout: float = 10.0):
        r = self.responses.get(timeout=timeout)
        if isinstance(r, Exception):
            raise r
        return r

    def close(self) -> None:
        self._cm.__exit__(None, None, None)


def _openssl(tmp_path, bundle, crl_file, leaf, intermediate) -> subprocess.CompletedProcess:
    (tmp_path / "leaf.pem").write_bytes(pem.certs_pem([leaf]))
    (tmp_path / "untrusted.pem").write_bytes(pem.certs_pem([intermediate]))
    argv = ["openssl", "verify", "-CAfile", str(bundle), "-untrusted", str(tmp_path / "untrusted.pem")]
    if crl_file is not None:
        argv += ["-crl_check_all", "-CRLfile", str(crl_file)]
    return subprocess.run([*argv, str(tmp_path / "leaf.pem")], capture_output=True, text=True)


def test_ca_taint_replaces_the_svid_on_an_open_stream_with_one_from_another_authority(running, tmp_path):
    running.entry("/agent/tainted", "host-a")
    stream = _Stream(str(running.socket("host-a")))
    try:
        leaf, intermediate = _leaf_and_intermediate(stream.next())
        tainted = chain.authority_key_id(leaf)
        running.cli("ca", "taint", tainted, "--reason", "test: key exposure drill")
        while True:  # the next responses; the replacement arrives within the wait, not at half-life
            new_leaf, new_intermediate = _leaf_and_intermediate(stream.next(10))
            if chain.authority_key_id(new_leaf) != tainted:
                break
        assert new_leaf.not_valid_after_utc <= new_intermediate.not_valid_after_utc  # no SVID outlives its signer
        r = _openssl(tmp_path, running.bundle_path, None, new_leaf, new_intermediate)
        assert r.returncode == 0, r.stdout + r.stderr
    finally:
        stream.close()


def test_a_revoked_intermediate_is_refused_by_openssl_with_the_sidecars_files(deployment, tmp_path):
    out = tmp_path / "sidecar-out"
    deployment.start_issuer()
    deployment.start_sidecar("host-a", output_dir=str(out))
    deployment.entry("/agent/revoked-under", "host-a")
    old_leaf, old_intermediate = _leaf_and_intermediate(workload_client.fetch_x509(str(deployment.socket("host-a"))))
    old = chain.authority_key_id(old_leaf)
    deployment.cli("ca", "taint", old, "--reason", "test: compromised")  # a successor signs from now on
    deployment.cli("ca", "revoke", old, "--force", "--reason", "test: compromised")
    withdrawn = x509svid.serial_hex(old_intermediate.serial_number)

    def listed() -> bool:
        try:
            return any(withdrawn in crl.serials(c) for c in crl.load_all((out / "crl.pem").read_bytes()))
        except (OSError, crl.CrlError):
            return False

    wait_for(listed, 10, what="the root's CRL withdrawing the intermediate in the sidecar's crl.pem")
    r = _openssl(tmp_path, out / "bundle.pem", out / "crl.pem", old_leaf, old_intermediate)
    assert r.returncode != 0 and "certificate revoked" in r.stdout + r.stderr, r.stdout + r.stderr
    new_leaf, new_intermediate = _leaf_and_intermediate(workload_client.fetch_x509(str(deployment.socket("host-a"))))
    assert chain.authority_key_id(new_leaf) != old
    r = _openssl(tmp_path, out / "bundle.pem", out / "crl.pem", new_leaf, new_intermediate)
    assert r.returncode == 0, r.stdout + r.stderr


def test_a_taint_replaces_every_svid_across_a_fleet_of_light_sidecars_and_a_real_one(deployment):
    """Ten light sidecars (real join tokens, mTLS Sync streams, ten SVIDs each) and a real sidecar whose workload
    holds an open unmodified `spiffe` stream: every SVID the tainted intermediate signed is replaced, pushed."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    from benchlib import fleet

    deployment.start_issuer()
    deployment.start_sidecar("host-a")
    deployment.entry("/agent/real", "host-a")
    reader = deployment.stream("host-a")
    first = reader.next(timeout=20)
    assert first["event"] == "update", first
    result = fleet.measure_taint(deployment, sidecars=10, svids=10, procs=2, timeout=30)
    assert result.replaced_svids == 100 and result.sidecars == 10
    # The real sidecar's workload got a replacement on its open stream, signed by another authority.
    update = reader.until(lambda m: m["event"] == "update" and m["svids"][0]["serial"] != first["svids"][0]["serial"],
                          timeout=10)
    leaf = x509.load_pem_x509_certificates(update["svids"][0]["svid_pem"].encode())[0]
    assert chain.authority_key_id(leaf) != result.authority
    print(f"taint to replaced, 10 light sidecars x 10 SVIDs: p50 {result.p50_ms:.0f} ms, max {result.max_ms:.0f} ms")
