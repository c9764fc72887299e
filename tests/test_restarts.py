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


def test_authorities_are_made_once_and_their_changes_are_on_the_feed_across_restarts(running):
    from issuer.datastore import open_store

    running.restart_issuer(kill9=True)
    running.restart_issuer()
    store = open_store(running.issuer_dir / "tessera.db")  # a second store object beside the running issuer
    try:
        changes = [(c.op, c.payload["kind"], c.payload["state"]) for c in store.changes_after(0) if c.kind == "authority"]
        kinds = sorted(a.kind for a in store.list_authorities())
    finally:
        store.close()
    assert kinds == ["jwt", "root", "x509"]  # one of each, not one more per restart
    assert changes == [("add", "root", "active"), ("add", "x509", "prepared"), ("update", "x509", "active"),
                       ("add", "jwt", "prepared"), ("update", "jwt", "active")]
