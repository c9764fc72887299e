"""Policy as code and human approval: tiers and CEL rules in the issuer config, decided per task
request, pending requests released or refused by `tessera approval`. Real daemons throughout."""

import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from harness import as_uid, metric, one_line_error, scrape, wait_for
from issuer.tasks import policy as pol
from taskutil import ALLOW_ALL, TIERS, policy, start_task, task_argv
from tessera.configfile import Section
from tessera.errors import ConfigError

DENY_PROD_PAYMENTS = {"name": "no-prod-payments", "effect": "deny",
                      "condition": '"payments:write" in scopes && has(context.env) && context.env == "prod"',
                      "reason": "payments:write in prod is not allowed for agents"}
APPROVE_PROD_PAYMENTS = {**DENY_PROD_PAYMENTS, "name": "prod-payments-need-a-human", "effect": "require_approval",
                         "reason": "payments:write in prod needs a human"}


def pending_ids(d) -> list[dict]:
    return json.loads(d.cli("approval", "list", "--output", "json").stdout)


def start_background(d, tmp_path, task_id, *scopes, **kw) -> subprocess.Popen:
    return subprocess.Popen(task_argv(d, task_id, tmp_path / task_id, *scopes, **kw), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_pending(d, task_id: str) -> dict:
    return wait_for(lambda: next((a for a in pending_ids(d) if a["task_id"] == task_id), None), timeout=15,
                    what=f"approval request for {task_id}")


@pytest.fixture
def gated(deployment):
    """An issuer whose 'high' tier needs approval; an entry in it."""
    deployment.start_issuer(policy=policy(timeout="60s"))
    deployment.start_sidecar("host-a")
    deployment.entry_id = deployment.entry("/agent/risky", "host-a", scope=["payments:write"], tier="high")
    return deployment


def test_the_approver_sees_the_waiting_workload_as_the_kernel_named_it(gated):
    gated.entry("/agent/other-user", "host-a", "unix:uid:5001", scope=["payments:write"], tier="high")
    out = Path(tempfile.mkdtemp())
    out.chmod(0o777)  # the workload runs as another user (pytest's tmp_path is closed to it)
    proc = subprocess.Popen(as_uid(5001, task_argv(gated, "as-5001", out / "t", "payments:write",
                                                   spiffe_id=f"spiffe://{gated.td}/agent/other-user"), gid=5002),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        a = wait_pending(gated, "as-5001")
        assert a["spiffe_id"] == f"spiffe://{gated.td}/agent/other-user"
        assert (a["workload"]["uid"], a["workload"]["gid"]) == (5001, 5002) and a["workload"]["pid"] == proc.pid
        assert "python" in a["workload"]["exe"]  # the task client's interpreter, read from /proc
    finally:
        proc.kill()
        proc.communicate()
        shutil.rmtree(out, ignore_errors=True)


def test_high_tier_task_waits_for_approval_then_is_delivered(gated, tmp_path):
    proc = start_background(gated, tmp_path, "pay-1", "payments:write", wait="60s")
    a = wait_pending(gated, "pay-1")
    assert a["spiffe_id"] == "spiffe://example.org/agent/risky" and a["scopes"] == ["payments:write"]
    assert "tier high requires approval" in a["reason"] and a["workload"]["pid"] > 0
    assert proc.poll() is None  # still waiting, holding its stream
    gated.cli("approval", "approve", a["id"], "--reason", "change ticket CHG-7")
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert f"pending approval {a['id']}" in err
    assert (tmp_path / "pay-1" / "svid.pem").exists()
    (ev,) = gated.audit("task.approve")
    assert ev["reason"] == "change ticket CHG-7" and ev["actor"]["kind"] == "operator"
    (issue,) = gated.audit("task.issue")
    assert issue["details"]["approval_id"] == a["id"] and issue["details"]["serial"] == out.strip()
    assert pending_ids(gated) == []


def test_denied_approval_gives_the_caller_the_reason(gated, tmp_path):
    proc = start_background(gated, tmp_path, "pay-2", "payments:write", wait="60s")
    a = wait_pending(gated, "pay-2")
    gated.cli("approval", "deny", a["id"], "--reason", "not during the freeze")
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 2
    assert "PERMISSION_DENIED" in err and "not during the freeze" in err and "uid:" in err
    assert [e["reason"] for e in gated.audit("task.approval_deny")] == ["not during the freeze"]
    r = gated.cli("approval", "approve", a["id"], "--reason", "too late", check=False)
    assert r.returncode == 2 and "no pending approval" in r.stderr


def test_approval_needs_a_reason(gated, tmp_path):
    r = gated.cli("approval", "approve", "whatever", check=False)
    assert r.returncode == 2 and "--reason" in r.stderr


def test_unanswered_approval_times_out_cleanly(deployment, tmp_path):
    deployment.start_issuer(policy=policy(timeout="2s"))
    deployment.start_sidecar("host-a")
    deployment.entry("/agent/risky", "host-a", scope=["payments:write"], tier="high")
    r = start_task(deployment, "pay-3", tmp_path / "t", "payments:write", wait="30s")
    assert r.returncode == 1, r.stderr
    assert "DEADLINE_EXCEEDED" in r.stderr or "timed out" in r.stderr
    assert "nobody decided within 2s" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 2  # the pending notice, then the one-line error
    assert len(deployment.audit("task.approval_expire")) == 1
    assert pending_ids(deployment) == []


def test_caller_giving_up_withdraws_its_pending_request(gated, tmp_path):
    proc = start_background(gated, tmp_path, "pay-4", "payments:write", wait="60s")
    a = wait_pending(gated, "pay-4")
    proc.kill()
    proc.wait()
    wait_for(lambda: pending_ids(gated) == [], timeout=10, what="the pending request withdrawn")
    (ev,) = gated.audit("task.approval_cancel")
    assert ev["details"]["approval_id"] == a["id"]
    r = gated.cli("approval", "approve", a["id"], "--reason", "too late", check=False)
    assert r.returncode == 2 and "no pending approval" in r.stderr


def test_changing_a_cel_rule_changes_the_decision(deployment, tmp_path):
    deployment.start_issuer(policy=policy())
    deployment.start_sidecar("host-a")
    deployment.entry("/agent/payer", "host-a", scope=["payments:write"], tier="low")
    prod = {"env": "prod"}
    r = start_task(deployment, "before", tmp_path / "a", "payments:write", context=prod)
    assert r.returncode == 0, r.stderr

    cfg = yaml.safe_load(deployment.issuer_cfg_path.read_text())
    cfg["policy"]["rules"].append(DENY_PROD_PAYMENTS)
    deployment.issuer_cfg_path.write_text(yaml.safe_dump(cfg))
    deployment.restart_issuer()
    r = wait_for(lambda: (x := start_task(deployment, "after", tmp_path / "b", "payments:write", context=prod))
                 .returncode != 1 and x, timeout=20, what="the sidecar to reconnect")
    assert r.returncode == 2 and "PERMISSION_DENIED" in r.stderr
    assert "denied by rule no-prod-payments: payments:write in prod is not allowed for agents" in r.stderr
    r = start_task(deployment, "staging", tmp_path / "c", "payments:write", context={"env": "staging"})
    assert r.returncode == 0, r.stderr
    (ev,) = deployment.audit("task.deny")
    assert ev["details"]["context"] == prod and ev["details"]["rule"] == "no-prod-payments"

    cfg["policy"]["rules"][-1] = APPROVE_PROD_PAYMENTS  # "... unless approved"
    deployment.issuer_cfg_path.write_text(yaml.safe_dump(cfg))
    deployment.restart_issuer()
    wait_for(lambda: start_task(deployment, "probe", tmp_path / "p", "payments:write").returncode == 0,
             timeout=20, what="the sidecar to reconnect")
    proc = start_background(deployment, tmp_path, "approved", "payments:write", context=prod, wait="60s")
    a = wait_pending(deployment, "approved")
    assert a["reason"] == "payments:write in prod needs a human" and a["context"] == prod
    deployment.cli("approval", "approve", a["id"], "--reason", "reviewed")
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err


def test_rule_with_a_syntax_error_stops_the_issuer_naming_the_rule(deployment):
    bad = {"name": "broken-rule", "effect": "deny", "condition": 'scopes.exists(s, s ==', "reason": "x"}
    r = deployment.run_issuer_once(deployment.issuer_config(policy=policy(ALLOW_ALL, bad)))
    one_line_error(r, "policy rule 'broken-rule': invalid CEL condition")


def test_policy_file_is_loaded_and_unknown_tiers_are_rejected(deployment, tmp_path):
    (tmp_path / "policy.yaml").write_text(yaml.safe_dump(policy()))
    deployment.start_issuer(policy_file=str(tmp_path / "policy.yaml"))
    r = deployment.cli("entry", "create", "--spiffe-id", "spiffe://example.org/agent/x", "--parent", "host-a",
                       "--selector", "unix:uid:1", "--owner", "o", "--purpose", "p", "--expires-in", "1d",
                       "--tier", "critical", check=False)
    assert r.returncode == 2 and "unknown tier 'critical': configured tiers are high, low" in r.stderr


def test_identity_svid_ttl_is_capped_by_the_tier(deployment):
    deployment.start_issuer(policy=policy())
    deployment.start_sidecar("host-a")
    deployment.entry("/agent/a", "host-a", tier="high", x509_ttl="2h")
    svid = deployment.fetch("host-a")["svids"][0]
    assert svid["not_after"] - svid["not_before"] <= 30 * 60 + 30  # max_identity_ttl 30m, plus backdating


# -- the pure rule engine ----------------------------------------------------------------------


def load(rules, tiers=TIERS) -> pol.Policy:
    return pol.load_section(Section({"tiers": tiers, "rules": rules}, "policy.", "test"))


def request(**kw) -> pol.TaskRequest:
    entry = {"id": "e1", "spiffe_id": "spiffe://example.org/a", "owner": "alice", "tier": "low",
             "scopes": ["repo:read", "payments:*"], "state": "active", "expires_at": time.time() + 3600}
    entry.update(kw.pop("entry", {}))
    base = dict(entry=entry, sidecar={"id": "s", "name": "s"}, workload={}, task_id="t", scopes=("repo:read",),
                ttl=60, context={}, now=time.time())
    base.update(kw)
    return pol.TaskRequest(**base)


def test_nothing_is_allowed_unless_a_rule_allows_it():
    d = pol.evaluate(load([]), request())
    assert (d.effect, d.rule) == ("deny", "default-deny")


def test_deny_beats_require_approval_beats_allow():
    rules = [ALLOW_ALL, {**APPROVE_PROD_PAYMENTS, "condition": "true"}]
    assert pol.evaluate(load(rules), request()).effect == "require_approval"
    d = pol.evaluate(load(rules + [{**DENY_PROD_PAYMENTS, "condition": "true"}]), request())
    assert (d.effect, d.rule) == ("deny", "no-prod-payments")


def test_rules_see_entry_scopes_ttl_context_and_time():
    rule = {"name": "r", "effect": "allow", "reason": "ok",
            "condition": 'entry.owner == "alice" && "repo:read" in scopes && ttl <= 600 && '
                         'context.ticket.startsWith("OPS-") && time.getFullYear() >= 2024'}
    assert pol.evaluate(load([rule]), request(context={"ticket": "OPS-9"})).effect == "allow"
    assert pol.evaluate(load([rule]), request(context={"ticket": "X"})).effect == "deny"


def test_a_failing_condition_is_cautious():
    deny = {"name": "d", "effect": "deny", "condition": 'context.env == "prod"', "reason": "no"}
    d = pol.evaluate(load([ALLOW_ALL, deny]), request())  # context.env missing: the deny rule holds
    assert d.effect == "deny" and "condition failed" in d.reason
    allow = {"name": "a", "effect": "allow", "condition": 'context.env == "dev"', "reason": "dev"}
    assert pol.evaluate(load([allow]), request()).effect == "deny"


def test_ttl_is_capped_by_tier_and_entry_expiry():
    now = time.time()
    assert pol.evaluate(load([ALLOW_ALL]), request(ttl=7200)).ttl == 600
    assert pol.evaluate(load([ALLOW_ALL]), request(ttl=500, now=now, entry={"expires_at": now + 100})).ttl == 100


def test_wildcard_entry_scope_covers_its_prefix():
    assert pol.evaluate(load([ALLOW_ALL]), request(scopes=("payments:write",))).effect == "allow"
    assert pol.evaluate(load([ALLOW_ALL]), request(scopes=("paymentsX",))).rule == "scopes"


def test_invalid_effect_and_duplicate_names_are_config_errors():
    with pytest.raises(ConfigError, match="effect"):
        load([{**ALLOW_ALL, "effect": "maybe"}])
    with pytest.raises(ConfigError, match="duplicate rule name"):
        load([ALLOW_ALL, ALLOW_ALL])


def test_approval_coverage_counts_approval_tiers_and_context_free_rules_only():
    def load(rules, high_approval):
        return pol.load_section(Section({
            "tiers": {"high": {"max_task_ttl": "15m", "max_identity_ttl": "30m", "approval": high_approval}},
            "rules": rules}))

    entry = {"id": "e", "spiffe_id": "spiffe://example.org/a", "tier": "high", "scopes": ["payments:write"],
             "state": "active", "expires_at": time.time() + 3600, "parent_id": "p", "owner": "o", "purpose": "p",
             "selectors": []}
    assert pol.approval_covers(load([], True), entry, time.time())
    assert not pol.approval_covers(load([], False), entry, time.time())
    by_scope = [{"name": "pay", "effect": "require_approval", "condition": '"payments:write" in scopes',
                 "reason": "r"}]
    assert pol.approval_covers(load(by_scope, False), entry, time.time())
    only_prod = [{"name": "prod", "effect": "require_approval",
                  "condition": 'has(context.env) && context.env == "prod"', "reason": "r"}]
    assert not pol.approval_covers(load(only_prod, False), entry, time.time())


def test_metrics_show_pending_approvals_and_task_time_to_credential(deployment, tmp_path):
    from harness import free_ports

    port = free_ports(1)[0]
    deployment.start_issuer(policy=policy(timeout="60s"), metrics_address=f"127.0.0.1:{port}")
    deployment.start_sidecar("host-a")
    deployment.entry("/agent/risky", "host-a", scope=["payments:write"], tier="high")
    proc = start_background(deployment, tmp_path, "pay-m", "payments:write", wait="60s")
    a = wait_pending(deployment, "pay-m")
    assert metric(scrape(port), "tessera_issuer_pending_approvals") == 1
    deployment.cli("approval", "approve", a["id"], "--reason", "ok")
    assert proc.wait(30) == 0
    samples = scrape(port)
    assert metric(samples, "tessera_issuer_pending_approvals") == 0
    assert metric(samples, "tessera_issuer_issuances_total", kind="task") == 1
    assert metric(samples, "tessera_issuer_time_to_credential_seconds_count", kind="task") == 1
