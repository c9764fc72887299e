"""Prometheus metrics on issuer and sidecar, the issuer's gRPC health service, and `tessera-sidecar healthcheck`."""

import json
import subprocess
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from harness import BIN, free_ports, metric, one_line_error, scrape, wait_for
from issuer import metrics
from issuer.core.models import AuditRecord, Authority
from issuer_client import attest


def rec(action, decision, reason="", **details) -> AuditRecord:
    return AuditRecord(1, 1.0, action, {"kind": "sidecar", "id": "x"}, decision, reason, "", details, "", "")


# -- unit: what the audit listener counts -----------------------------------------------------


def test_allowed_records_with_a_serial_count_as_issuances_by_kind():
    before = metrics.ISSUANCES.labels("task")._value.get()
    ttc = metrics.TIME_TO_CREDENTIAL.labels("task")._sum.get()
    metrics.observe_audit([rec("task.issue", "allow", serial="ab", kind="task", latency_ms=250)])
    metrics.observe_audit([rec("task.request", "pending")])
    assert metrics.ISSUANCES.labels("task")._value.get() == before + 1
    assert metrics.TIME_TO_CREDENTIAL.labels("task")._sum.get() == pytest.approx(ttc + 0.25)
    # Only an allowed record naming a serial and its kind counts: every issuing path records the kind.
    assert metrics.issuance_kind(rec("sidecar.attest", "allow", serial="cd")) is None
    assert metrics.issuance_kind(rec("svid.deny", "deny", serial="cd", kind="identity")) is None


def test_denial_reasons_are_bounded_labels():
    why = "entry '{}' is not registered to spiffe://td/tessera/sidecar/{}"
    a = metrics.denial_reason(rec("svid.deny", "deny", why.format("e-1", "a")))
    b = metrics.denial_reason(rec("svid.deny", "deny", why.format("e-2", "b")))
    assert a == b == "entry <value> is not registered to <spiffe-id>"
    assert metrics.denial_reason(rec("task.deny", "deny", "whatever 123", rule="tier-cap")) == "tier-cap"


def authority_samples() -> dict:
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(generate_latest(metrics.REGISTRY).decode())
            for s in f.samples if s.name.startswith("tessera_authority_")}


def test_authority_expiry_is_seconds_to_not_after_at_scrape_time_for_live_authorities_only():
    now = int(time.time())

    def rec(i, kind, state, not_after, cert=b"c", source="root", not_before=None):
        return Authority(id=i, kind=kind, state=state, source=source, parent=None, public_der=b"k", cert_der=cert,
                         sealed_key=b"", kek_id="", not_before=now - 3600 if not_before is None else not_before,
                         not_after=not_after, created_at=now - 3600)

    metrics.set_authorities([
        rec("r1", "root", "active", now + 86400), rec("i1", "x509", "active", now + 600),
        rec("j1", "jwt", "prepared", now + 900, cert=b""), rec("old", "x509", "revoked", now + 600),
        rec("dead", "x509", "retired", now - 1), rec("csr", "x509", "prepared", now, cert=b"", source="offline"),
    ])
    s = authority_samples()
    expiry = {dict(k)["id"]: (dict(k), v) for (name, k), v in s.items() if name == "tessera_authority_expiry_seconds"}
    assert sorted(expiry) == ["i1", "j1", "r1"]
    assert expiry["i1"][0] == {"kind": "x509", "id": "i1", "state": "active"}
    assert 590 <= expiry["i1"][1] <= 600 and 86390 <= expiry["r1"][1] <= 86400
    assert s[("tessera_authority_awaiting_offline_signature", ())] == 0
    # An offline-signed intermediate past half its life with no signed successor: the operator must act.
    metrics.set_authorities([rec("off", "x509", "active", now + 600, source="offline")])
    s = authority_samples()
    assert s[("tessera_authority_awaiting_offline_signature", ())] == 1
    assert [dict(k)["id"] for (name, k) in s if name == "tessera_authority_expiry_seconds"] == ["off"]
    metrics.set_authorities([])


# -- end to end ------------------------------------------------------------------------------


def test_metrics_show_issuances_and_propagation_delay(deployment):
    d = deployment
    issuer_port, sidecar_port = free_ports(2)
    d.start_issuer(metrics_address=f"127.0.0.1:{issuer_port}")
    d.start_sidecar("host-a", metrics_address=f"127.0.0.1:{sidecar_port}")
    d.entry("/agent/a", "host-a")  # pushed to the sidecar: one entry_upsert with its commit time
    assert d.fetch("host-a")["event"] == "update"

    s = wait_for(lambda: (m := scrape(issuer_port)) and
                 metric(m, "tessera_issuer_issuances_total", kind="identity") >= 1 and m, what="issuance metric")
    assert metric(s, "tessera_issuer_issuances_total", kind="sidecar") >= 1
    assert metric(s, "tessera_issuer_issuance_latency_seconds_count", kind="identity") >= 1
    assert metric(s, "tessera_issuer_connected_sidecars") == 1
    for family in ("tessera_issuer_pending_approvals", "tessera_issuer_crl_size_bytes"):
        assert (family, ()) in s, family
    assert any(name == "tessera_issuer_crl_number" for name, _ in s)
    assert metric(s, "tessera_issuer_audit_file_behind") == 0
    # The issuer follows the change feed past its own entry's commit (peers' changes arrive the same way).
    s = wait_for(lambda: (m := scrape(issuer_port)) and metric(m, "tessera_issuer_change_feed_position") >= 1 and m,
                 what="change feed position")
    assert metric(s, "tessera_issuer_change_feed_failing") == 0

    sc = wait_for(lambda: (m := scrape(sidecar_port)) and metric(m, "tessera_sidecar_cached_svids") >= 1 and m,
                  what="sidecar cache metric")
    assert metric(sc, "tessera_sidecar_propagation_delay_seconds_count", event="entry_upsert") >= 1
    assert metric(sc, "tessera_sidecar_synced") == 1

    # A denial shows up by reason.
    with pytest.raises(grpc.RpcError):
        attest(d, "not-a-token")
    s = scrape(issuer_port)
    assert metric(s, "tessera_issuer_denials_total", action="sidecar.attest", reason="join token is not valid") == 1


def test_issuer_serves_standard_grpc_health(running):
    creds = grpc.ssl_channel_credentials(root_certificates=running.bundle_path.read_bytes())
    # The bootstrap port needs no client certificate, so a plain probe can use it.
    with grpc.secure_channel(f"127.0.0.1:{running.port + 1}", creds,
                             options=[("grpc.ssl_target_name_override", "tessera-issuer")]) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        assert stub.Check(health_pb2.HealthCheckRequest(), timeout=5).status == health_pb2.HealthCheckResponse.SERVING
        r = stub.Check(health_pb2.HealthCheckRequest(service="tessera.v1.Issuer"), timeout=5)
        assert r.status == health_pb2.HealthCheckResponse.SERVING


def test_sidecar_healthcheck_exits_0_when_synced_and_1_when_down(running):
    d = running
    ok = subprocess.run([str(BIN / "tessera-sidecar"), "healthcheck", "--socket", str(d.socket("host-a"))],
                        capture_output=True, text=True)
    assert ok.returncode == 0 and ok.stdout.strip() == "SERVING", ok.stderr
    by_config = subprocess.run([str(BIN / "tessera-sidecar"), "healthcheck", "--config",
                                str(d.sidecar_dir("host-a") / "sidecar.yaml")], capture_output=True, text=True)
    assert by_config.returncode == 0, by_config.stderr
    d.sidecars["host-a"].stop()
    down = subprocess.run([str(BIN / "tessera-sidecar"), "healthcheck", "--socket", str(d.socket("host-a"))],
                          capture_output=True, text=True)
    assert down.returncode == 1 and len(down.stderr.strip().splitlines()) == 1


def test_bad_metrics_address_names_the_key(deployment, tmp_path):
    one_line_error(deployment.run_issuer_once(deployment.issuer_config(metrics_address="nowhere")), "metrics_address")


def test_metrics_show_revocations_crl_and_revocation_propagation_delay(deployment):
    d = deployment
    issuer_port, sidecar_port = free_ports(2)
    d.start_issuer(metrics_address=f"127.0.0.1:{issuer_port}")
    d.start_sidecar("host-a", metrics_address=f"127.0.0.1:{sidecar_port}")
    entry_id = d.entry("/agent/a", "host-a")
    assert d.fetch("host-a")["event"] == "update"
    d.cli("revoke", "--entry", entry_id, "--reason", "agent retired")

    s = wait_for(lambda: (m := scrape(issuer_port)) and
                 metric(m, "tessera_issuer_revocations_total", target="entry") >= 1 and m, what="revocation metric")
    listed = json.loads(d.cli("ca", "list", "--output", "json").stdout)
    active = next(a["id"] for a in listed if a["kind"] == "x509" and a["state"] == "active")  # signed the SVID
    assert metric(s, "tessera_issuer_crl_entries") >= 1 and metric(s, "tessera_issuer_crl_number", authority=active) >= 2
    assert metric(s, "tessera_issuer_crl_size_bytes") > 0
    sc = wait_for(lambda: (m := scrape(sidecar_port)) and
                  metric(m, "tessera_sidecar_propagation_delay_seconds_count", event="revocation") >= 1 and m,
                  what="revocation propagation delay on the sidecar")
    assert metric(sc, "tessera_sidecar_crl_entries") >= 1
    assert metric(sc, "tessera_sidecar_crl_number", authority=active) == metric(s, "tessera_issuer_crl_number",
                                                                                 authority=active)
