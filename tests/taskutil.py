"""Helpers for the task and policy end-to-end tests: policies, the shell task commands, the datastore."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from harness import BIN, CLIENTS

TIERS = {
    "low": {"max_task_ttl": "10m", "max_identity_ttl": "1h"},
    "high": {"max_task_ttl": "5m", "max_identity_ttl": "30m", "approval": True},
}
ALLOW_ALL = {"name": "allow-entry-scopes", "effect": "allow", "condition": "true",
             "reason": "scopes within the entry are allowed"}


def policy(*rules: dict, timeout: str = "60s") -> dict:
    return {"approval_timeout": timeout, "tiers": TIERS, "rules": list(rules) or [ALLOW_ALL]}


def task_argv(d, task_id: str, out: Path, *scopes: str, ttl: str = "5m", context: dict | None = None,
              wait: str = "30s", sidecar: str = "host-a", spiffe_id: str = "") -> list[str]:
    argv = [str(BIN / "tessera-sidecar"), "task", "start", "--socket", str(d.socket(sidecar)), "--task-id", task_id,
            "--ttl", ttl, "--out", str(out), "--wait", wait]
    if spiffe_id:
        argv += ["--spiffe-id", spiffe_id]
    for s in scopes:
        argv += ["--scope", s]
    for k, v in (context or {}).items():
        argv += ["--context", f"{k}={v}"]
    return argv


def start_task(d, task_id: str, out: Path, *scopes: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(task_argv(d, task_id, out, *scopes, **kw), capture_output=True, text=True, timeout=60)


def end_task(d, task_id: str, sidecar: str = "host-a") -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "tessera-sidecar"), "task", "end", "--socket", str(d.socket(sidecar)),
                           "--task-id", task_id], capture_output=True, text=True, timeout=60)


def spiffe_parse(out: Path, td: str = "example.org") -> dict:
    r = subprocess.run([sys.executable, str(CLIENTS / "spiffe_parse.py"), str(out / "svid.pem"), str(out / "key.pem"),
                        str(out / "bundle.pem"), td], capture_output=True, text=True, timeout=30)
    return json.loads(r.stdout.strip().splitlines()[-1])
