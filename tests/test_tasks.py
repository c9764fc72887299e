"""Per-task credentials end to end: real issuer and sidecar processes, the shell task commands,
standard verifiers (openssl, the unmodified `spiffe` package), the issuer's SQLite datastore."""

import json
import shlex
import subprocess
import sys
import threading
import time

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from harness import CLIENTS, one_line_error, openssl_says_revoked, openssl_verify, wait_for
from inproc import issuer_services
from issuer.approvals import Approvals
from issuer.models import Actor
from issuer.policy import load_section
from issuer.tasks import TaskService, TaskSpec
from taskutil import end_task, policy, spiffe_parse, start_task, task_argv
from tessera import taskext, x509svid
from tessera.configfile import Section
from tessera.errors import NotFound, PermissionDenied, Unavailable


@pytest.fixture
def tasks(deployment):
    deployment.start_issuer(policy=policy())
    deployment.start_sidecar("host-a")
    deployment.entry_id = deployment.entry("/agent/a", "host-a", scope=["repo:read", "payments:write"],
                                           tier="low")
    return deployment


def leaf(out):
    return x509.load_pem_x509_certificates((out / "svid.pem").read_bytes())[0]


def test_two_tasks_get_distinct_keys_and_serials_and_carry_their_binding(tasks, tmp_path):
    r1 = start_task(tasks, "task-1", tmp_path / "t1", "repo:read")
    r2 = start_task(tasks, "task-2", tmp_path / "t2", "repo:read", "payments:write")
    assert r1.returncode == 0, r1.stderr
    assert r2.returncode == 0, r2.stderr
    c1, c2 = leaf(tmp_path / "t1"), leaf(tmp_path / "t2")
    assert r1.stdout.strip() == format(c1.serial_number, "x")
    assert c1.serial_number != c2.serial_number
    pub = lambda c: c.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)  # noqa: E731
    assert pub(c1) != pub(c2)
    assert taskext.read(c1) == taskext.TaskBinding("task-1", ("repo:read",), tasks.entry_id, "alice")
    assert taskext.read(c2) == taskext.TaskBinding("task-2", ("payments:write", "repo:read"), tasks.entry_id,
                                                   "alice")
    assert not c1.extensions.get_extension_for_oid(taskext.TASK_OID).critical
    assert (tmp_path / "t1" / "key.pem").stat().st_mode & 0o777 == 0o600
    for out, cert in ((tmp_path / "t1", c1), (tmp_path / "t2", c2)):
        v = openssl_verify(out / "bundle.pem", out / "svid.pem")
        assert v.returncode == 0 and ": OK" in v.stdout, v.stdout + v.stderr
        parsed = spiffe_parse(out)
        assert parsed == {"spiffe_id": "spiffe://example.org/agent/a", "serial": format(cert.serial_number, "x"),
                          "verified": True}
    rows = [tasks.issued(format(c.serial_number, "x")) for c in (c1, c2)]
    assert [(r["kind"], r["task_id"], r["entry_id"]) for r in rows] == [
        ("task", "task-1", tasks.entry_id), ("task", "task-2", tasks.entry_id)]


def test_issued_task_is_audited_with_workload_and_latency(tasks, tmp_path):
    r = start_task(tasks, "audited", tmp_path / "t", "repo:read", context={"ticket": "OPS-1"})
    assert r.returncode == 0, r.stderr
    (ev,) = [e for e in tasks.audit("task.issue") if e["details"]["task_id"] == "audited"]
    assert ev["decision"] == "allow" and ev["details"]["serial"] == r.stdout.strip()
    assert ev["details"]["latency_ms"] > 0
    assert ev["details"]["context"] == {"ticket": "OPS-1"}
    assert ev["details"]["rule"] == "allow-entry-scopes"
    actor = ev["actor"]
    assert actor["kind"] == "workload" and actor["id"] == "spiffe://example.org/agent/a"
    assert actor["details"]["pid"] > 0 and actor["details"]["exe"]
    assert actor["details"]["sidecar_id"] == tasks.sidecar_id("host-a")


def test_scope_outside_the_entry_is_denied_with_the_reason(tasks, tmp_path):
    r = start_task(tasks, "greedy", tmp_path / "t", "repo:read", "admin:all")
    one_line_error(r, "PERMISSION_DENIED", "'admin:all' is not among the scopes")
    assert not (tmp_path / "t" / "svid.pem").exists()
    (ev,) = tasks.audit("task.deny")
    assert ev["details"]["scopes"] == ["admin:all", "repo:read"] and ev["details"]["rule"] == "scopes"


def test_ttl_above_the_tier_cap_is_capped(tasks, tmp_path):
    r = start_task(tasks, "long", tmp_path / "t", "repo:read", ttl="2h")
    assert r.returncode == 0, r.stderr
    c = leaf(tmp_path / "t")
    lifetime = c.not_valid_after_utc.timestamp() - time.time()
    assert 0 < lifetime <= 600  # tier low caps tasks at 10m


def test_same_task_id_cannot_be_live_twice(tasks, tmp_path):
    assert start_task(tasks, "dup", tmp_path / "t1", "repo:read").returncode == 0
    r = start_task(tasks, "dup", tmp_path / "t2", "repo:read")
    assert r.returncode == 2 and "already has a live credential" in r.stderr


def test_expired_entry_is_permission_denied_on_both_apis(tasks, tmp_path):
    tasks.entry("/agent/short", "host-a", expires_in="3s", scope=["repo:read"])
    # Only the short-lived entry may answer: disable the long-lived one.
    tasks.cli("entry", "update", tasks.entry_id, "--state", "disabled")
    time.sleep(3.5)
    assert "short" in tasks.cli("entry", "list", "--expired").stdout
    ctx = tasks.fetch("host-a")
    assert ctx["event"] == "error" and "PERMISSION_DENIED" in ctx["error"], ctx
    r = start_task(tasks, "late", tmp_path / "t", "repo:read")
    assert r.returncode == 2 and "PERMISSION_DENIED" in r.stderr and "no identity issued" in r.stderr


def test_end_task_revokes_its_serial_in_the_datastore(tasks, tmp_path):
    r = start_task(tasks, "ending", tmp_path / "t", "repo:read")
    serial = r.stdout.strip()
    assert tasks.issued(serial)["revoked_at"] is None
    e = end_task(tasks, "ending")
    assert e.returncode == 0, e.stderr
    assert e.stdout.split() == [serial]
    row = tasks.issued(serial)
    # One revocation path: the serial is revoked as cessationOfOperation, in the CRL, audited with why.
    assert row["revoked_at"] is not None and row["revocation_reason"] == "cessationOfOperation"
    (ev,) = tasks.audit("revoke")
    assert ev["subject"] == "task:ending" and ev["reason"] == "task ended by the workload"
    assert ev["details"]["serials"] == [serial]
    crl = subprocess.run(["openssl", "crl", "-inform", "DER", "-noout", "-text"],
                         input=tasks.cli_bytes("crl", "show", "--der"), capture_output=True)
    assert serial.upper() in crl.stdout.decode().upper().replace(":", "")
    assert end_task(tasks, "ending").returncode == 2  # no longer live


def test_exit_of_a_workload_holding_its_own_task_connection_ends_its_tasks(tasks, tmp_path):
    client = subprocess.Popen([sys.executable, str(CLIENTS / "task_client.py"), str(tasks.socket("host-a")),
                               "own-task", "repo:read"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        line = json.loads(client.stdout.readline())
        assert "serial" in line, line
        assert tasks.issued(line["serial"])["revoked_at"] is None
    finally:
        client.stdin.close()  # the client exits when its stdin closes
        client.wait(timeout=10)
    row = wait_for(lambda: (r := tasks.issued(line["serial"]))["revoked_at"] is not None and r, timeout=10,
                   what="the serial revoked after the process exited")
    assert row["revocation_reason"] == "cessationOfOperation"
    (ev,) = [e for e in tasks.audit("revoke") if e["subject"] == "task:own-task"]
    assert ev["reason"] == f"process {client.pid} exited" and ev["details"]["serials"] == [line["serial"]]


def test_exit_of_the_shell_that_ran_task_start_ends_its_tasks(tasks, tmp_path):
    argv = task_argv(tasks, "shell-task", tmp_path / "t", "repo:read")
    script = shlex.join(argv) + " > " + shlex.quote(str(tmp_path / "serial")) + " && sleep 600"
    shell = subprocess.Popen(["sh", "-c", script])
    try:
        serial = wait_for(lambda: (tmp_path / "serial").exists() and (tmp_path / "serial").read_text().strip(),
                          timeout=30, what="task credential")
        row = tasks.issued(serial)
        assert row["kind"] == "task" and row["revoked_at"] is None
    finally:
        shell.kill()
        shell.wait()
    row = wait_for(lambda: (r := tasks.issued(serial))["revoked_at"] is not None and r, timeout=10,
                   what="the serial revoked after the process exited")
    assert row["revocation_reason"] == "cessationOfOperation"
    (ev,) = [e for e in tasks.audit("revoke") if e["subject"] == "task:shell-task"]
    assert "exited" in ev["reason"]


# -- the issuer's own checks, against a real datastore and CA (no sidecar can be made to lie here) --


def issuer_tasks(tmp_path):
    pol = load_section(Section(policy(), "policy.", "test"))
    s = issuer_services(tmp_path, ("host-a", "host-b"), tier_names=pol.tier_names)
    store, registry, attestor, revocation = s.store, s.registry, s.attestor, s.revocation
    svc = TaskService(store, s.ca, registry, pol, Approvals(store, pol.approval_timeout),
                      check_entry_allowed=revocation.check_entry, revoke=revocation.end_task,
                      recheck_issued=revocation.recheck_issued)
    entry = registry.create(spiffe_id="spiffe://example.org/agent/a", parent="host-a", selectors=["unix:uid:7"],
                            owner="o", purpose="p", expires_at=int(time.time()) + 3600, actor=Actor("operator", "t"),
                            scopes=["repo:read"])
    side = {n: attestor.get(n) for n in ("host-a", "host-b")}
    return svc, store, entry, side


def high_tier_entry(svc):
    """An entry on host-a whose tasks need an operator's approval."""
    return svc.registry.create(spiffe_id="spiffe://example.org/agent/h", parent="host-a", selectors=["unix:uid:7"],
                               owner="o", purpose="p", expires_at=int(time.time()) + 3600,
                               actor=Actor("operator", "t"), scopes=["repo:read"], tier="high")


def spec(entry_id, selectors=("unix:uid:7",), task_id="t1"):
    return TaskSpec(entry_id, task_id, ("repo:read",), 60, {}, x509svid.make_csr(x509svid.new_key()),
                    frozenset(selectors))


def test_issuer_refuses_tasks_for_another_sidecars_entry_or_unmatched_selectors(tmp_path):
    svc, store, entry, side = issuer_tasks(tmp_path)
    with pytest.raises(PermissionDenied, match="not registered to"):
        list(svc.request(side["host-b"], spec(entry.id)))
    with pytest.raises(PermissionDenied, match="does not match the selectors"):
        list(svc.request(side["host-a"], spec(entry.id, ("unix:uid:8",))))
    assert [r.reason for r in store.audit_records() if r.action == "task.deny"] == [
        f"entry {entry.id!r} is not registered to {side['host-b'].id}",
        f"the calling workload does not match the selectors of entry {entry.id}"]
    [(kind, svid)] = list(svc.request(side["host-a"], spec(entry.id)))
    assert kind == "svid" and store.get_issued(svid.serial).kind == "task"
    # Another sidecar cannot end it either.
    with pytest.raises(NotFound):
        svc.end(side["host-b"], "t1", "", "", Actor("sidecar", side["host-b"].id))
    assert store.get_issued(svid.serial).revoked_at is None
    store.close()


def test_revoke_task_ends_only_that_task_while_the_identity_and_other_tasks_keep_working(tasks, tmp_path):
    identity = tasks.fetch("host-a")["svids"][0]["serial"]
    first = start_task(tasks, "t-1", tmp_path / "t1", "repo:read").stdout.strip()
    second = start_task(tasks, "t-2", tmp_path / "t2", "repo:read").stdout.strip()
    r = tasks.cli("revoke", "--task", "t-1", "--reason", "task hijacked", "--output", "json")
    assert json.loads(r.stdout)["serials"] == [first]
    assert tasks.issued(first)["revoked_at"] is not None
    assert tasks.issued(second)["revoked_at"] is None

    crl = tmp_path / "crl.pem"
    crl.write_text(tasks.cli("crl", "show").stdout)
    assert openssl_says_revoked(tasks.bundle_path, tmp_path / "t1" / "svid.pem", crl)
    assert openssl_verify(tasks.bundle_path, tmp_path / "t2" / "svid.pem", crl).returncode == 0
    assert tasks.fetch("host-a")["svids"][0]["serial"] == identity  # the identity SVID is untouched
    assert end_task(tasks, "t-2").stdout.split() == [second]  # the other task still ends normally


def test_a_task_request_abandoned_before_waiting_withdraws_its_approval(tmp_path):
    svc, store, _, side = issuer_tasks(tmp_path)
    high = high_tier_entry(svc)
    steps = svc.request(side["host-a"], spec(high.id, task_id="needs-approval"))
    kind, approval = next(steps)
    assert kind == "pending" and [a.id for a in svc.approvals.list()] == [approval.id]
    steps.close()  # what the gRPC handler does when its caller leaves right after this step
    assert svc.approvals.list() == []
    assert [r.details["approval_id"] for r in store.audit_records() if r.action == "task.approval_cancel"] == [
        approval.id]
    store.close()


def test_a_stopping_issuer_refuses_new_approval_requests_and_answers_the_waiting_ones(tmp_path):
    svc, store, _, side = issuer_tasks(tmp_path)
    high = high_tier_entry(svc)
    waiting = svc.request(side["host-a"], spec(high.id, task_id="waiting"))
    assert next(waiting)[0] == "pending"
    outcome: list = []

    def wait_for_a_human():
        try:
            next(waiting)
        except Exception as e:  # noqa: BLE001 - the answer under test
            outcome.append(e)

    t = threading.Thread(target=wait_for_a_human)
    t.start()
    wait_for(lambda: any(f.f_code.co_name == "wait" and "approvals" in f.f_code.co_filename
                         for f in _frames(sys._current_frames().get(t.ident))), what="the caller waiting")
    svc.approvals.close()
    t.join(5)
    assert isinstance(outcome[0], Unavailable) and "withdrawn: issuer stopping" in outcome[0].message
    assert svc.approvals.list() == []
    with pytest.raises(Unavailable, match="stopping"):
        next(svc.request(side["host-a"], spec(high.id, task_id="late")))
    store.close()


def _frames(frame):
    while frame is not None:
        yield frame
        frame = frame.f_back


def test_a_decision_made_before_the_caller_starts_waiting_is_not_lost(tmp_path):
    svc, store, _, side = issuer_tasks(tmp_path)
    steps = svc.request(side["host-a"], spec(high_tier_entry(svc).id, task_id="decided-early"))
    kind, approval = next(steps)
    assert kind == "pending"
    # The operator approves as soon as the request shows up, before the caller's next step waits.
    svc.approvals.decide(approval.id, True, Actor("operator", "uid:0"), "ticket OPS-1")
    kind, cred = next(steps)
    assert kind == "svid" and cred.task_id == "decided-early"
    store.close()
