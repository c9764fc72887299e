"""Pending approvals shared by equal peers (issue 16): a task request made through one issuer is listed, approved or
denied through any other, and the caller waiting on the first gets the answer. Real daemons on a real PostgreSQL,
an unmodified `tessera-sidecar task start` as the workload; and, on SQLite, an issuer that died leaving a request
pending."""

import subprocess
import threading

import pytest

import harness
from harness import one_line_error, wait_for
from issuer.core.models import Actor
from issuer.datastore.sqlite import SQLiteDatastore
from issuer.tasks import approvals as approvals_mod
from issuer.tasks.approvals import Approvals
from taskutil import policy, spiffe_parse, task_argv
from test_policy import pending_ids, wait_pending

OPS = Actor("operator", "uid:0")


@pytest.fixture(scope="module")
def gated_fleet(tmp_path_factory, pg_cluster):
    """Three issuers on one database, a 'high' tier that needs approval; host-a's sidecar on issuer 1 with an entry
    in that tier. Shared by this module's tests (each asks with task ids of its own): starting it is most of
    their time."""
    issuers = harness.peer_deployments(tmp_path_factory.mktemp("fleet"), 3, pg_cluster.new_database("approvals"))
    try:
        for d in issuers:
            d.start_issuer(policy=policy(timeout="60s"))
        one = issuers[0]
        one.start_sidecar("host-a")
        one.entry("/agent/risky", "host-a", scope=["payments:write"], tier="high")
        yield issuers
    finally:
        for d in issuers:
            d.close()


def ask(d, tmp_path, task_id: str) -> subprocess.Popen:
    """The workload behind host-a asks for a task credential and waits (up to 60 s) for a human."""
    return subprocess.Popen(task_argv(d, task_id, tmp_path / task_id, "payments:write", wait="60s"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_an_approval_requested_via_issuer_1_is_listed_at_issuer_2_approved_at_issuer_3_and_delivered(
        gated_fleet, tmp_path):
    one, two, three = gated_fleet
    caller = ask(one, tmp_path, "pay-1")
    try:
        pending = wait_pending(two, "pay-1")
        assert pending["spiffe_id"] == "spiffe://example.org/agent/risky" and pending["scopes"] == ["payments:write"]
        assert [a["id"] for a in pending_ids(three)] == [pending["id"]]
        approved = three.cli("approval", "approve", pending["id"], "--reason", "ticket OPS-16")
        assert approved.stdout.split()[:2] == [pending["id"], "approved"]
        out, err = caller.communicate(timeout=30)
    finally:
        caller.kill()
    assert caller.returncode == 0, err
    cert = spiffe_parse(tmp_path / "pay-1")
    assert cert["spiffe_id"] == "spiffe://example.org/agent/risky" and cert["serial"] == out.strip()
    assert all(pending_ids(d) == [] for d in gated_fleet)
    # Decided once: a second decision anywhere is refused, naming the first.
    one_line_error(one.cli("approval", "deny", pending["id"], "--reason", "too late", check=False),
                   "no pending approval", "approved by uid:", "FAILED_PRECONDITION")


def test_a_deny_at_another_issuer_reaches_the_caller_as_permission_denied_with_its_reason(gated_fleet, tmp_path):
    one, two, _ = gated_fleet
    caller = ask(one, tmp_path, "pay-2")
    try:
        pending = wait_pending(two, "pay-2")
        two.cli("approval", "deny", pending["id"], "--reason", "not during the freeze")
        _, err = caller.communicate(timeout=30)
    finally:
        caller.kill()
    assert caller.returncode == 2 and "PERMISSION_DENIED" in err and "not during the freeze" in err, err
    one_line_error(two.cli("approval", "approve", "no-such-id", "--reason", "r", check=False),
                   "no pending approval 'no-such-id'", "NOT_FOUND")


def test_two_issuers_deciding_one_request_at_once_give_one_outcome_and_one_clear_refusal(gated_fleet, tmp_path):
    one, two, three = gated_fleet
    for n in range(3):
        caller = ask(one, tmp_path, f"race-{n}")
        try:
            pending = wait_pending(one, f"race-{n}")
            start, results = threading.Barrier(2), {}

            def decide(d, verb):
                start.wait()
                results[verb] = d.cli("approval", verb, pending["id"], "--reason", f"race {n}", check=False)

            threads = [threading.Thread(target=decide, args=a) for a in ((two, "approve"), (three, "deny"))]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
            [winner] = [verb for verb, r in results.items() if r.returncode == 0]
            [loser] = [r for r in results.values() if r.returncode != 0]
            one_line_error(loser, "no pending approval", "FAILED_PRECONDITION",
                           "approved" if winner == "approve" else "denied")
            _, err = caller.communicate(timeout=30)
        finally:
            caller.kill()
        # The caller on issuer 1 gets the winner's decision, whichever issuer made it.
        assert caller.returncode == (0 if winner == "approve" else 2), (winner, err)
    # One audit chain across the three writers, every decision in it once.
    assert one.cli("audit", "verify").returncode == 0


def test_a_request_left_pending_by_an_issuer_that_died_is_hidden_once_expired_and_expired_by_another(
        tmp_path, monkeypatch):
    """Two issuers' approval queues on one store; the first one's caller and process are gone (nothing waits, no
    close()). The other stops listing the request at its expiry, and its sweep expires it, audited, once."""
    monkeypatch.setattr(approvals_mod, "STALE_AFTER", 0)
    store = SQLiteDatastore(tmp_path / "t.db")
    dead, alive = Approvals(store, timeout=1), Approvals(store, timeout=1)
    try:
        req = dead.submit(approvals_mod.ApprovalRequest(
            "", "t1", "e1", "spiffe://example.org/a", "o", "high", ("repo:read",), 60, {}, "host-a", {"uid": 7},
            "tier high requires approval", "tier:high", 0, 0), OPS)
        assert [a.id for a in alive.list()] == [req.id]
        assert alive.sweep() == 0  # not expired yet: nothing to do
        wait_for(lambda: alive.list() == [], timeout=5, what="the request unlisted at its expiry")
        assert alive.sweep() == 1 and alive.sweep() == 0
        assert store.get_approval(req.id).state == "expired"
        [expiry] = [r for r in store.audit_records() if r.action == "task.approval_expire"]
        assert expiry.details["approval_id"] == req.id and "its caller was gone" in expiry.reason
        with pytest.raises(Exception, match="no pending approval .*expired by issuer"):
            alive.decide(req.id, True, OPS, "too late")
    finally:
        alive.close()
        dead.close()
        store.close()
