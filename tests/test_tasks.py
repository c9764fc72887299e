"""Per-task credentials end to end: real issuer and sidecar processes, the shell task commands,
standard verifiers (openssl, the unmodified `spiffe` package), the issuer's SQLite datastore."""

import asyncio
import json
import shlex
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from harness import CLIENTS, one_line_error, openssl_says_revoked, openssl_verify, wait_for
from inproc import issuer_services
from issuer.core.models import Actor
from issuer.tasks.policy import load_section
from issuer.tasks.service import Turns
from taskutil import end_task, policy, spiffe_parse, start_task, task_argv
from tessera import taskext, x509svid
from tessera.configfile import Section
from tessera.errors import ConfigError
from tessera.errors import DeadlineExceeded, NotFound, PermissionDenied, ResourceExhausted, Unavailable
from tessera.taskspec import TaskSpec


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
    # A third task: the sidecar makes the next key ahead of time, and each one serves one task only.
    assert start_task(tasks, "task-3", tmp_path / "t3", "repo:read").returncode == 0
    assert len({pub(c1), pub(c2), pub(leaf(tmp_path / "t3"))}) == 3
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


def issuer_tasks(tmp_path, timeout: str = "60s", **limits):
    s = issuer_services(tmp_path, ("host-a", "host-b"), policy={**policy(timeout=timeout), **limits})
    svc, store, registry, attestor = s.tasks, s.store, s.registry, s.attestor
    entry = registry.create(spiffe_id="spiffe://example.org/agent/a", parent="host-a", selectors=["unix:uid:7"],
                            owner="o", purpose="p", expires_at=int(time.time()) + 3600, actor=Actor("operator", "t"),
                            scopes=["repo:read"])
    side = {n: attestor.get(n) for n in ("host-a", "host-b")}
    return svc, store, entry, side


def high_tier_entry(svc, path="/agent/h", selectors=("unix:uid:7",)):
    """An entry on host-a whose tasks need an operator's approval."""
    return svc.registry.create(spiffe_id=f"spiffe://example.org{path}", parent="host-a", selectors=list(selectors),
                               owner="o", purpose="p", expires_at=int(time.time()) + 3600,
                               actor=Actor("operator", "t"), scopes=["repo:read"], tier="high")


def spec(entry_id, selectors=("unix:uid:7",), task_id="t1", uid=7):
    return TaskSpec(entry_id, task_id, ("repo:read",), 60, {}, x509svid.make_csr(x509svid.new_key()),
                    frozenset(selectors), {"pid": 100 + uid, "uid": uid, "gid": uid, "exe": "/bin/agent"})


async def steps(request) -> list:
    return [s async for s in request]


def test_a_task_request_reaches_the_issuer_as_the_sidecar_built_it():
    sent = TaskSpec("e1", "t1", ("repo:read", "db:write"), 60, {"ticket": "OPS-1"}, b"csr-bytes",
                    frozenset({"unix:uid:7", "unix:gid:7"}), {"pid": 107, "uid": 7, "gid": 7, "exe": "/bin/agent"})
    assert TaskSpec.from_proto(type(sent.to_proto()).FromString(sent.to_proto().SerializeToString())) == sent
    assert sent.binding("alice") == taskext.TaskBinding("t1", ("repo:read", "db:write"), "e1", "alice")


def test_issuer_refuses_tasks_for_another_sidecars_entry_or_unmatched_selectors(tmp_path):
    svc, store, entry, side = issuer_tasks(tmp_path)
    with pytest.raises(PermissionDenied, match="not registered to"):
        asyncio.run(steps(svc.request(side["host-b"], spec(entry.id))))
    with pytest.raises(PermissionDenied, match="does not match the selectors"):
        asyncio.run(steps(svc.request(side["host-a"], spec(entry.id, ("unix:uid:8",)))))
    assert [r.reason for r in store.audit_records() if r.action == "task.deny"] == [
        f"entry {entry.id!r} is not registered to {side['host-b'].id}",
        f"the calling workload does not match the selectors of entry {entry.id}"]
    [(kind, svid)] = asyncio.run(steps(svc.request(side["host-a"], spec(entry.id))))
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


def cancellations(store) -> list[str]:
    return [r.details["approval_id"] for r in store.audit_records() if r.action == "task.approval_cancel"]


def test_a_task_request_abandoned_before_waiting_withdraws_its_approval(tmp_path):
    svc, store, _, side = issuer_tasks(tmp_path)
    high = high_tier_entry(svc)

    async def leave_after_pending():
        request = svc.request(side["host-a"], spec(high.id, task_id="needs-approval"))
        kind, approval = await anext(request)
        assert kind == "pending" and [a.id for a in svc.approvals.list()] == [approval.id]
        await request.aclose()  # what the gRPC handler does when its caller leaves right after this step
        assert svc.approvals.list() == []  # at once, on the loop
        return approval

    approval = asyncio.run(leave_after_pending())
    wait_for(lambda: cancellations(store) == [approval.id], what="the withdrawal audited")
    store.close()


def test_a_caller_that_leaves_while_waiting_withdraws_at_once_even_with_every_thread_busy(tmp_path):
    svc, store, _, side = issuer_tasks(tmp_path)
    high = high_tier_entry(svc)
    busy = threading.Event()

    async def leave_while_waiting():
        loop = asyncio.get_running_loop()
        loop.set_default_executor(ThreadPoolExecutor(max_workers=1))
        request = svc.request(side["host-a"], spec(high.id, task_id="waiting"))
        kind, approval = await anext(request)
        waiting = asyncio.ensure_future(anext(request))
        await asyncio.sleep(0.1)
        loop.run_in_executor(None, busy.wait, 10)  # the only thread is taken
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert svc.approvals.list() == []  # no thread needed to withdraw
        busy.set()
        return approval

    approval = asyncio.run(leave_while_waiting())
    wait_for(lambda: cancellations(store) == [approval.id], what="the withdrawal audited")
    store.close()


def test_waiting_approvals_hold_no_thread_and_a_decision_from_another_thread_reaches_its_waiter(tmp_path):
    svc, store, entry, side = issuer_tasks(tmp_path)
    high = high_tier_entry(svc)

    async def scenario():
        asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(max_workers=2))
        waits = [svc.request(side["host-a"], spec(high.id, task_id=f"w{i}")) for i in range(10)]
        approvals = [(await anext(w))[1] for w in waits]
        outcomes = [asyncio.ensure_future(anext(w)) for w in waits]
        await asyncio.sleep(0.1)
        # Ten waits, two threads: an ordinary task still goes through.
        [(kind, _)] = await asyncio.wait_for(steps(svc.request(side["host-a"], spec(entry.id, task_id="free"))), 10)
        assert kind == "svid"
        # The admin API decides on its own thread; the waiter on this loop gets it.
        decide = threading.Thread(target=svc.approvals.decide,
                                  args=(approvals[3].id, True, Actor("operator", "uid:0"), "ok"))
        decide.start()
        kind, cred = await asyncio.wait_for(outcomes[3], 10)
        assert kind == "svid" and cred.task_id == "w3"
        decide.join()
        for o in outcomes:
            o.cancel()
        await asyncio.wait(outcomes)
        assert svc.approvals.list() == []

    asyncio.run(scenario())
    store.close()


def test_a_stopping_issuer_refuses_new_approval_requests_and_answers_the_waiting_ones(tmp_path):
    svc, store, _, side = issuer_tasks(tmp_path)
    high = high_tier_entry(svc)

    async def scenario():
        waiting = svc.request(side["host-a"], spec(high.id, task_id="waiting"))
        assert (await anext(waiting))[0] == "pending"
        outcome = asyncio.ensure_future(anext(waiting))
        await asyncio.sleep(0.1)  # the caller waits
        await asyncio.to_thread(svc.approvals.close)
        with pytest.raises(Unavailable, match="withdrawn: issuer stopping"):
            await asyncio.wait_for(outcome, 5)
        assert svc.approvals.list() == []
        with pytest.raises(Unavailable, match="stopping"):
            await anext(svc.request(side["host-a"], spec(high.id, task_id="late")))

    asyncio.run(scenario())
    assert len(cancellations(store)) == 1  # recorded before close() returned
    store.close()


def test_a_decision_made_before_the_caller_starts_waiting_is_not_lost(tmp_path):
    svc, store, _, side = issuer_tasks(tmp_path)

    async def scenario():
        request = svc.request(side["host-a"], spec(high_tier_entry(svc).id, task_id="decided-early"))
        kind, approval = await anext(request)
        assert kind == "pending"
        # The operator approves as soon as the request shows up, before the caller's next step waits.
        await asyncio.to_thread(svc.approvals.decide, approval.id, True, Actor("operator", "uid:0"), "ticket OPS-1")
        kind, cred = await anext(request)
        assert kind == "svid" and cred.task_id == "decided-early"

    asyncio.run(scenario())
    store.close()


def test_an_unanswered_approval_expires_and_its_caller_gets_deadline_exceeded(tmp_path):
    svc, store, _, side = issuer_tasks(tmp_path, timeout="1s")

    async def scenario():
        request = svc.request(side["host-a"], spec(high_tier_entry(svc).id, task_id="slow-human"))
        assert (await anext(request))[0] == "pending"
        with pytest.raises(DeadlineExceeded, match="nobody decided within 1s"):
            await asyncio.wait_for(anext(request), 10)

    asyncio.run(scenario())
    assert svc.approvals.list() == []
    assert [r.action for r in store.audit_records() if r.action.startswith("task.approval")] == [
        "task.approval_request", "task.approval_expire"]
    store.close()


def test_pending_approvals_are_capped_per_workload_per_entry_and_overall(tmp_path):
    svc, store, _, side = issuer_tasks(tmp_path, max_pending_per_workload=2, max_pending_per_entry=3,
                                       max_pending=4)
    h1 = high_tier_entry(svc, "/agent/h1", ("unix:gid:0",))
    h2 = high_tier_entry(svc, "/agent/h2", ("unix:gid:0",))

    async def ask(entry, uid, task_id):
        request = svc.request(side["host-a"], spec(entry.id, (f"unix:uid:{uid}", "unix:gid:0"), task_id, uid))
        await anext(request)
        return request

    async def scenario():
        held = [await ask(h1, 7, "a"), await ask(h1, 7, "b")]
        with pytest.raises(ResourceExhausted, match="uid 7 on .*host-a already has 2 .*max_pending_per_workload"):
            await ask(h1, 7, "c")
        held.append(await ask(h1, 8, "d"))  # another uid: its own count
        with pytest.raises(ResourceExhausted, match=f"entry {h1.id} already has 3 .*max_pending_per_entry"):
            await ask(h1, 9, "e")
        held.append(await ask(h2, 9, "f"))  # another entry
        with pytest.raises(ResourceExhausted, match="the issuer already has 4 .*max_pending\\b"):
            await ask(h2, 10, "g")
        await held[0].aclose()  # a withdrawal makes room at once
        held.append(await ask(h2, 10, "g"))
        assert len(svc.approvals.list()) == 4
        for r in held:
            await r.aclose()

    asyncio.run(scenario())
    # Refusals over a cap record nothing: a flood of them costs no commits.
    assert len([r for r in store.audit_records() if r.action == "task.approval_request"]) == 5
    store.close()


def test_task_requests_of_one_workload_take_turns_and_are_bounded(tmp_path):
    svc, store, entry, side = issuer_tasks(tmp_path, task_threads_per_workload=1, max_task_requests_per_workload=3)
    started = threading.Event()
    release = threading.Event()
    admit = svc._admit

    def slow_admit(sidecar, spec, ticket):
        started.set()
        release.wait(10)
        admit(sidecar, spec, ticket)

    svc._admit = slow_admit

    async def scenario():
        first = asyncio.ensure_future(steps(svc.request(side["host-a"], spec(entry.id, task_id="t1"))))
        await asyncio.to_thread(started.wait, 10)
        started.clear()
        second = asyncio.ensure_future(steps(svc.request(side["host-a"], spec(entry.id, task_id="t2"))))
        third = asyncio.ensure_future(steps(svc.request(side["host-a"], spec(entry.id, task_id="t3"))))
        await asyncio.sleep(0.2)
        assert not started.is_set()  # one thread per workload: the others wait for their turn, on the loop
        with pytest.raises(ResourceExhausted, match="uid 7 on .* already has 3 .*max_task_requests_per_workload"):
            await steps(svc.request(side["host-a"], spec(entry.id, task_id="t4")))
        # Another workload is not held up by this one's turns.
        other = svc.registry.create(spiffe_id="spiffe://example.org/agent/o", parent="host-a",
                                    selectors=["unix:uid:8"], owner="o", purpose="p",
                                    expires_at=int(time.time()) + 3600, actor=Actor("operator", "t"),
                                    scopes=["repo:read"])
        svc._admit = admit
        [(kind, _)] = await asyncio.wait_for(
            steps(svc.request(side["host-a"], spec(other.id, ("unix:uid:8",), "o1", uid=8))), 10)
        assert kind == "svid"
        release.set()
        for job in (first, second, third):
            [(kind, _)] = await asyncio.wait_for(job, 10)
            assert kind == "svid"

    asyncio.run(scenario())
    store.close()


@pytest.mark.parametrize("value", [0, -1, 100_001, "many", True])
def test_a_limit_out_of_range_is_a_config_error_naming_it(value):
    with pytest.raises(ConfigError, match="policy.max_pending_per_entry"):
        load_section(Section({**policy(), "max_pending_per_entry": value}, "policy.", "issuer.yaml"))


def test_a_request_a_human_approved_waits_for_its_turn_but_is_never_turned_away():
    async def scenario():
        turns = Turns("max_task_requests_per_workload", limit=1, threads=1)

        async def hold(**kw):
            async with turns.turn("uid 7", "uid 7", **kw):
                pass

        async with turns.turn("uid 7", "uid 7"):
            with pytest.raises(ResourceExhausted, match="uid 7 already has 1 .*max_task_requests_per_workload"):
                await hold()
            approved = asyncio.ensure_future(hold(refuse=False))
            await asyncio.sleep(0.1)
            assert not approved.done()  # waits for the turn
        await asyncio.wait_for(approved, 5)

    asyncio.run(scenario())
