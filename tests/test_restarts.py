"""Restarts: sidecars ride out an issuer restart; a sidecar comes back from its saved SVID; nothing recorded is lost."""

from harness import wait_for


def test_sidecar_keeps_serving_while_issuer_is_down_and_resyncs_after_restart(running):
    running.entry("/agent/a", "host-a")
    before = running.fetch("host-a")
    assert before["event"] == "update"
    running.issuer.stop()
    during = running.fetch("host-a")
    assert during["event"] == "update" and during["svids"][0]["serial"] == before["svids"][0]["serial"]
    running.issuer.start()
    stream = running.stream("host-a")
    assert stream.next(20)["event"] == "update"
    running.entry("/agent/b", "host-a")  # reaches the workload only if the sidecar reconnected
    stream.until(lambda m: len(m.get("svids", [])) == 2, timeout=15)


def test_sidecar_restart_comes_back_from_its_saved_svid_without_a_token(running):
    running.entry("/agent/a", "host-a")
    assert running.fetch("host-a")["event"] == "update"
    sidecar = running.sidecars["host-a"]
    sidecar.stop()
    assert any(a.startswith("--join-token-file=") for a in sidecar.argv)
    sidecar.argv = [a for a in sidecar.argv if not a.startswith("--join-token-file=")]
    sidecar.start()
    after = running.fetch("host-a")
    assert after["event"] == "update" and after["svids"][0]["spiffe_id"] == "spiffe://example.org/agent/a"
    assert "using saved sidecar SVID" in sidecar.log()


def test_issued_serials_survive_kill_9_of_the_issuer(running):
    running.entry("/agent/a", "host-a")
    serial = running.fetch("host-a")["svids"][0]["serial"]
    running.restart_issuer(kill9=True)
    assert running.issued(serial) is not None
    listed = running.cli("entry", "list", "--output", "json").stdout
    assert "spiffe://example.org/agent/a" in listed
    wait_for(lambda: running.fetch("host-a")["event"] == "update", timeout=15, what="serving after restart")


def test_the_ca_is_an_authority_change_on_the_feed_once_across_restarts(running):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    from issuer.datastore import open_store

    running.restart_issuer(kill9=True)
    running.restart_issuer()
    ca = x509.load_pem_x509_certificate((running.issuer_dir / "ca.pem").read_bytes())
    store = open_store(running.issuer_dir / "tessera.db")  # a second store object beside the running issuer
    try:
        authorities = [c for c in store.changes_after(0) if c.kind == "authority"]
    finally:
        store.close()
    assert [(c.op, c.key, c.payload["not_after"]) for c in authorities] == [
        ("add", ca.fingerprint(hashes.SHA256()).hex(), int(ca.not_valid_after_utc.timestamp()))]
