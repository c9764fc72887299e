"""Task requests under a flood, end to end: a real issuer and sidecar, a flooding workload of another uid.

One workload's approval requests must not starve anyone else: a waiting approval holds no issuer
thread, pending requests are capped per workload (and entry, sidecar, overall), a caller that
leaves withdraws at once, and one workload's burst of task requests does not delay another's.
"""

import asyncio
import json
import signal
import subprocess
import sys
import threading
import time

import grpc
import pytest

from agent_sidecar.workload_client import start_task
from harness import CLIENTS, as_uid, wait_for
from issuer_client import aio_sidecar_channel
from taskutil import ALLOW_ALL, policy
from tessera import x509svid
from tessera.v1 import issuer_pb2, issuer_pb2_grpc

FLOOD_UID = 4242
FLOOD = 400
GUARDS = [{"name": f"guard-{i}", "effect": "deny", "reason": "not in that environment",
           "condition": f'has(context.env) && context.env == "env-{i}" && "admin:all" in scopes'} for i in range(12)]


def issuer_threads(d) -> int:
    with open(f"/proc/{d.issuer.proc.pid}/status") as f:
        return int(next(line.split()[1] for line in f if line.startswith("Threads:")))


def pending_approvals(d) -> list[dict]:
    return json.loads(d.cli("approval", "list", "--output", "json").stdout)


@pytest.fixture
def two_workloads(deployment):
    """host-a serves a flooding workload (uid 4242, tier high: every task needs approval) and root's
    ordinary one (tier low)."""
    deployment.start_issuer(policy=policy())
    # The sidecar's own socket limits would cut this flood short; loosened, as on a sidecar configured
    # generously (or compromised), so that what is proven here is the issuer's own defence.
    deployment.start_sidecar("host-a", socket_limits={"streams_per_connection": 100, "streams_per_uid": 1024,
                                                      "pending": 1024, "pending_per_uid": 1024})
    deployment.flood_entry = deployment.entry("/agent/flood", "host-a", f"unix:uid:{FLOOD_UID}",
                                              scope=["repo:read"], tier="high")
    deployment.legit_entry = deployment.entry("/agent/legit", "host-a", "unix:uid:0", scope=["repo:read"],
                                              tier="low")
    wait_for(lambda: deployment.fetch("host-a").get("svids"), timeout=15, what="the legit identity")
    return deployment


def timed_task(d, task_id: str) -> float:
    t0 = time.monotonic()
    cred = start_task(str(d.socket("host-a")), task_id, ["repo:read"], 60, {}, 30)
    assert cred.task_id == task_id
    return time.monotonic() - t0


def test_an_approval_flood_from_one_workload_starves_no_one_and_leaves_when_its_caller_does(two_workloads):
    d = two_workloads
    timed_task(d, "warm-up")  # the first call pays for the channel; the one measured below does not
    threads_before = issuer_threads(d)
    flood = subprocess.Popen(as_uid(FLOOD_UID, [sys.executable, str(CLIENTS / "task_flood.py"),
                                                str(d.socket("host-a")), str(FLOOD), "flood", "20", "repo:read"]),
                             stdout=subprocess.PIPE, text=True)
    try:
        summary = json.loads(flood.stdout.readline())
        # The default cap, max_pending_per_workload 16: the rest are refused at once, naming the cap. On a
        # slow machine some arrive while 64 of the workload's requests are still in progress, and are
        # refused by that cap (max_task_requests_per_workload) instead: either way, named.
        assert summary["pending"] == 16 and summary["waiting"] == 0, json.dumps(summary)
        assert summary["errors"] == {"RESOURCE_EXHAUSTED": FLOOD - 16}, summary
        refusals = summary["messages"]["RESOURCE_EXHAUSTED"]
        assert any("max_pending_per_workload" in m for m in refusals), summary
        assert all("max_pending_per_workload" in m or "max_task_requests_per_workload" in m for m in refusals), summary
        assert len(pending_approvals(d)) == 16

        # Meanwhile another workload's ordinary task is served at once, and a new sidecar joins.
        elapsed = timed_task(d, "legit")
        assert elapsed < 1.0, f"legit task credential took {elapsed:.2f}s during the flood"
        d.start_sidecar("host-b")
        # A waiting approval holds no thread: the flood added (nearly) none to the issuer.
        assert issuer_threads(d) <= threads_before + 16, (threads_before, issuer_threads(d))
    finally:
        flood.send_signal(signal.SIGKILL)
        flood.wait()
    # The caller is gone: its requests are withdrawn promptly, each audited.
    wait_for(lambda: not pending_approvals(d), timeout=5, what="the flood's approvals withdrawn")
    cancelled = wait_for(lambda: len(c := d.audit("task.approval_cancel")) == 16 and c, timeout=5,
                         what="16 cancellations in the audit trail")
    assert {c["reason"] for c in cancelled} == {"caller went away"}
    assert {c["details"]["task_id"].split("-")[0] for c in cancelled} == {"flood"}


def task_request(entry_id: str, task_id: str, uid: int, csr: bytes) -> issuer_pb2.TaskSVIDRequest:
    return issuer_pb2.TaskSVIDRequest(entry_id=entry_id, task_id=task_id, scopes=["repo:read"], ttl_seconds=60,
                                      csr=csr, selectors=[f"unix:uid:{uid}"],
                                      workload=issuer_pb2.WorkloadInfo(pid=1000 + uid, uid=uid, gid=uid, exe="/bin/a"))


def test_a_burst_of_task_requests_from_one_workload_does_not_delay_another_workloads_credential(deployment):
    """As host-a's sidecar would send them: 400 ordinary task requests of uid 4242 at once, then one of root's.
    The policy has a dozen rules, as a real one might: evaluating them is what takes the issuer's time."""
    d = deployment
    d.start_issuer(policy=policy(ALLOW_ALL, *GUARDS))
    d.start_sidecar("host-a")
    busy = d.entry("/agent/busy", "host-a", f"unix:uid:{FLOOD_UID}", scope=["repo:read"], tier="low")
    legit = d.entry("/agent/legit", "host-a", "unix:uid:0", scope=["repo:read"], tier="low")
    csr = x509svid.make_csr(x509svid.new_key())

    async def one(stub, req) -> str:
        try:
            async for update in stub.RequestTaskSVID(req, timeout=60):
                return update.WhichOneof("update")
        except grpc.aio.AioRpcError as e:
            return e.code().name
        return "nothing"

    async def scenario():
        async with aio_sidecar_channel(d, "host-a") as ch:
            stub = issuer_pb2_grpc.IssuerStub(ch)
            assert await one(stub, task_request(legit, "warm-up", 0, csr)) == "svid"
            burst = [asyncio.ensure_future(one(stub, task_request(busy, f"burst-{i}", FLOOD_UID, csr)))
                     for i in range(FLOOD)]
            await asyncio.sleep(0.3)  # the burst has reached the issuer
            t0 = time.monotonic()
            assert await one(stub, task_request(legit, "legit", 0, csr)) == "svid"
            elapsed = time.monotonic() - t0
            outcomes = await asyncio.gather(*burst)
        return elapsed, outcomes

    elapsed, outcomes = asyncio.run(scenario())
    assert elapsed < 1.5, f"root's task credential took {elapsed:.2f}s behind uid {FLOOD_UID}'s burst"
    # The burst itself: at most max_task_requests_per_workload (64) in progress, the rest refused at once.
    assert outcomes.count("svid") >= 64 and set(outcomes) <= {"svid", "RESOURCE_EXHAUSTED"}, set(outcomes)


def test_stopping_the_issuer_answers_a_waiting_approval_at_once_and_records_the_withdrawal(two_workloads):
    d = two_workloads
    d.entry("/agent/gated", "host-a", "unix:uid:0", scope=["repo:read"], tier="high")
    outcome: dict = {}

    def ask():
        try:
            start_task(str(d.socket("host-a")), "gated", ["repo:read"], 60, {}, 30,
                       spiffe_id="spiffe://example.org/agent/gated",
                       on_pending=lambda p: outcome.setdefault("pending", p.approval_id))
        except grpc.RpcError as e:
            outcome["error"] = (e.code(), e.details())

    caller = threading.Thread(target=ask)
    caller.start()
    wait_for(lambda: "pending" in outcome, timeout=15, what="the request pending")
    t0 = time.monotonic()
    assert d.issuer.stop() == 0
    assert time.monotonic() - t0 < 5  # the waiting request does not hold the shutdown
    caller.join(10)
    code, details = outcome["error"]
    assert code == grpc.StatusCode.UNAVAILABLE and "withdrawn: issuer stopping" in details, details
    [withdrawn] = d.audit("task.approval_cancel")
    assert withdrawn["reason"] == "issuer stopping" and withdrawn["details"]["approval_id"] == outcome["pending"]
