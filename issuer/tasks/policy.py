"""Policy as code: tiers and CEL rules from the issuer config, compiled once, evaluated per task request.

Pure: nothing here touches the datastore, the network or the clock (the request
carries the time). Decision order for a task request:

1. Fixed checks, not configurable: the entry is active and unexpired, its tier is
   configured, every requested scope is among the entry's scopes (exact, or an
   entry scope ending in `*` covering that prefix), the TTL is positive.
2. Every rule's CEL condition is evaluated. Precedence: deny beats
   require_approval beats allow; among rules of the same effect the first in the
   file gives the reason. No matching allow rule means deny (nothing is allowed
   unless a rule allows it).
3. An allowed request in a tier with `approval: true` needs approval too.
4. The granted TTL is the requested one capped (not refused) by the tier's
   max_task_ttl and the entry's expiry; the caller sees the real expiry.

A condition that fails to evaluate (e.g. a missing context key) counts as the
cautious outcome: an allow rule does not match, a deny or require_approval rule
does. Write `has(context.env) && context.env == "prod"` to avoid that.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import fnmatch
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

import celpy
from celpy import celtypes

from tessera.configfile import Section, load_yaml
from tessera.errors import ConfigError

EFFECTS = ("allow", "deny", "require_approval")
DEFAULT_APPROVAL_TIMEOUT = 300
MAX_TASK_TTL_LIMIT = 7 * 86400
TIER_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")  # tiers in the policy and on entries


@dataclass(frozen=True)
class Tier:
    name: str
    max_task_ttl: int
    max_identity_ttl: int
    approval: bool


@dataclass(frozen=True)
class Rule:
    name: str
    effect: str
    condition: str
    reason: str
    program: Any = field(compare=False, repr=False)


@dataclass(frozen=True)
class Limits:
    """How much of the issuer task requests may hold at once (see issuer/approvals.py and issuer/tasks.py).

    A workload is a uid on a sidecar, as the kernel attested it (see tasks.workload_key).
    """

    max_pending: int = 1024               # approval requests waiting for a human, all sidecars together
    max_pending_per_sidecar: int = 256
    max_pending_per_entry: int = 64
    max_pending_per_workload: int = 16
    max_task_requests_per_workload: int = 64   # being decided or issued, queued included (not waits)
    max_task_requests_per_sidecar: int = 256
    task_threads_per_workload: int = 2    # of those, how many use the issuer's threads at once
    task_threads_per_sidecar: int = 8


LIMIT_RANGE = (1, 100_000)


def workload_key(sidecar_id: str, workload: Mapping[str, Any]) -> tuple[str, int]:
    """Who counts as one workload for the limits: a uid on a sidecar, as the kernel attested it there.

    Not the pid: any process can fork as many pids as it likes, so a per-pid cap caps nothing. The uid
    is what the kernel separates (processes of one uid can already signal, trace and read one another),
    and a process cannot change it without privilege. A sidecar is trusted only for its own workloads, so
    the key carries its id: one sidecar's uid 1000 is not another's, and a sidecar that lies about uids
    is still bounded by its per-sidecar and per-entry limits.
    """
    return sidecar_id, int(workload.get("uid") or 0)


def describe_workload(key: tuple[str, int]) -> str:
    return f"uid {key[1]} on {key[0]}"


@dataclass(frozen=True)
class Policy:
    tiers: Mapping[str, Tier]
    rules: tuple[Rule, ...]
    approval_timeout: int
    limits: Limits = Limits()

    def tier_names(self) -> tuple[str, ...]:
        return tuple(self.tiers)

    def identity_ttl(self, tier: str, ttl: int) -> int:
        """An identity SVID's TTL, capped by its tier's max_identity_ttl."""
        t = self.tiers.get(tier)
        return min(ttl, t.max_identity_ttl) if t else ttl


DEFAULT_TIERS = {
    "low": Tier("low", 3600, 3600, False),
    "medium": Tier("medium", 1800, 3600, False),
    "high": Tier("high", 900, 1800, True),
    "critical": Tier("critical", 300, 600, True),
}


DEFAULT_POLICY = Policy(DEFAULT_TIERS, (), DEFAULT_APPROVAL_TIMEOUT)


@dataclass(frozen=True)
class TaskRequest:
    """Everything a rule may look at. `entry` and `sidecar` are plain dicts of their fields."""

    entry: Mapping[str, Any]
    sidecar: Mapping[str, Any]
    workload: Mapping[str, Any]
    task_id: str
    scopes: tuple[str, ...]
    ttl: int
    context: Mapping[str, str]
    now: float


@dataclass(frozen=True)
class Decision:
    effect: str  # allow | deny | require_approval
    rule: str    # the deciding rule's name, or a built-in check's name
    reason: str
    ttl: int = 0  # granted TTL (allow and require_approval)


# -- loading ---------------------------------------------------------------------------------


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _tier(sec: Section, name: str) -> Tier:
    if not TIER_NAME.match(name):
        raise sec.fail(name, "tier names are lowercase letters, digits, _ and - (at most 32)")
    s = sec.section(name)
    t = Tier(name, s.duration("max_task_ttl"), s.duration("max_identity_ttl"), s.get("approval", bool, False))
    if not 0 < t.max_task_ttl <= MAX_TASK_TTL_LIMIT:
        raise s.fail("max_task_ttl", "must be between 1s and 7d")
    if t.max_identity_ttl < 10:
        raise s.fail("max_identity_ttl", "must be at least 10s")
    s.reject_unknown()
    return t


def compile_rule(env: celpy.Environment, sec: Section) -> Rule:
    name = sec.str("name")
    effect = sec.str("effect")
    if effect not in EFFECTS:
        raise sec.fail("effect", f"rule {name!r}: must be one of {', '.join(EFFECTS)}, got {effect!r}")
    condition = sec.get("condition", (str, bool))
    condition = ("true" if condition else "false") if isinstance(condition, bool) else condition
    reason = sec.str("reason")
    sec.reject_unknown()
    try:
        program = env.program(env.compile(condition))
    except Exception as e:  # noqa: BLE001 - celpy raises several types; each is a config error
        raise ConfigError(f"{sec._source}: policy rule {name!r}: invalid CEL condition: {_one_line(e)}") from None
    return Rule(name, effect, condition, reason, program)


def load_section(sec: Section) -> Policy:
    """The `policy:` section, or the whole of a policy file."""
    tiers_sec = sec.section("tiers")
    names = list(tiers_sec._data)
    tiers = {n: _tier(tiers_sec, str(n)) for n in names} if names else dict(DEFAULT_TIERS)
    raw_rules = sec.get("rules", list, [])
    env = celpy.Environment()
    rules: list[Rule] = []
    seen: set[str] = set()
    for i, raw in enumerate(raw_rules):
        if not isinstance(raw, dict):
            raise sec.fail(f"rules[{i}]", "must be a mapping with name, effect, condition and reason")
        rule = compile_rule(env, Section(raw, f"{sec._prefix}rules[{i}].", sec._source))
        if rule.name in seen:
            raise sec.fail(f"rules[{i}]", f"duplicate rule name {rule.name!r}")
        seen.add(rule.name)
        rules.append(rule)
    timeout = sec.duration("approval_timeout", DEFAULT_APPROVAL_TIMEOUT)
    if not 1 <= timeout <= 86400:
        raise sec.fail("approval_timeout", "must be between 1s and 24h")
    limits = _limits(sec)
    sec.reject_unknown()
    return Policy(tiers, tuple(rules), timeout, limits)


def _limits(sec: Section) -> Limits:
    values = {}
    for f in dataclasses.fields(Limits):
        values[f.name] = sec.int(f.name, f.default, minimum=LIMIT_RANGE[0], maximum=LIMIT_RANGE[1])
    return Limits(**values)


def load(root: Section) -> Policy:
    """From the issuer config: an inline `policy:` section or `policy_file:` naming a YAML file."""
    if root.has("policy") and root.has("policy_file"):
        raise root.fail("policy_file", "give either policy or policy_file, not both")
    if root.has("policy_file"):
        return load_section(load_yaml(root.path("policy_file")))
    return load_section(root.section("policy"))


# -- evaluation --------------------------------------------------------------------------------


def scope_covered(requested: str, granted: tuple[str, ...]) -> bool:
    return any(requested == g or (g.endswith("*") and fnmatch.fnmatchcase(requested, g)) for g in granted)


def activation(req: TaskRequest) -> dict:
    return {
        "entry": celpy.json_to_cel(dict(req.entry)),
        "sidecar": celpy.json_to_cel(dict(req.sidecar)),
        "workload": celpy.json_to_cel(dict(req.workload)),
        "task_id": celtypes.StringType(req.task_id),
        "scopes": celpy.json_to_cel(list(req.scopes)),
        "ttl": celtypes.IntType(req.ttl),
        "context": celpy.json_to_cel(dict(req.context)),
        "time": celtypes.TimestampType(dt.datetime.fromtimestamp(req.now, dt.timezone.utc)),
    }


def _matches(rule: Rule, act: dict) -> tuple[bool, str]:
    """(matched, error). Errors resolve to the cautious outcome for the rule's effect."""
    try:
        result = rule.program.evaluate(act)
    except Exception as e:  # noqa: BLE001 - any evaluation failure is handled the same way
        result = e
    if isinstance(result, celtypes.BoolType) or isinstance(result, bool):
        return bool(result), ""
    err = _one_line(result.args[0] if isinstance(result, Exception) and result.args else result)
    if not isinstance(result, Exception):
        err = f"condition gave {type(result).__name__}, not a bool"
    return rule.effect != "allow", err


def evaluate(policy: Policy, req: TaskRequest) -> Decision:
    entry = req.entry
    if entry.get("state") != "active":
        return Decision("deny", "entry-state", f"entry {entry['id']} is {entry.get('state')}")
    if entry["expires_at"] <= req.now:
        return Decision("deny", "entry-expired", f"entry {entry['id']} expired")
    tier = policy.tiers.get(entry.get("tier", ""))
    if tier is None:
        return Decision("deny", "tier", f"entry tier {entry.get('tier')!r} is not configured")
    if req.ttl <= 0:
        return Decision("deny", "ttl", "ttl must be positive")
    outside = [s for s in req.scopes if not scope_covered(s, tuple(entry.get("scopes", ())))]
    if outside:
        return Decision("deny", "scopes",
                        f"scope {outside[0]!r} is not among the scopes of {entry['spiffe_id']} "
                        f"({', '.join(entry.get('scopes', ())) or 'none'})")
    ttl = int(min(req.ttl, tier.max_task_ttl, entry["expires_at"] - req.now))
    act = activation(req)
    matched: dict[str, list[tuple[Rule, str]]] = {e: [] for e in EFFECTS}
    for rule in policy.rules:
        hit, err = _matches(rule, act)
        if hit:
            matched[rule.effect].append((rule, err))
    for effect in ("deny", "require_approval"):
        if matched[effect]:
            rule, err = matched[effect][0]
            reason = rule.reason + (f" (condition failed: {err})" if err else "")
            return Decision(effect, rule.name, reason, ttl)
    if not matched["allow"]:
        return Decision("deny", "default-deny", "no policy rule allows this request")
    rule, _ = matched["allow"][0]
    if tier.approval:
        return Decision("require_approval", f"tier:{tier.name}",
                        f"tier {tier.name} requires approval (allowed by rule {rule.name}: {rule.reason})", ttl)
    return Decision("allow", rule.name, rule.reason, ttl)


def approval_covers(policy: Policy, entry: Mapping[str, Any], now: float) -> bool:
    """Whether a human must approve this entry's tasks.

    True when its tier requires approval, or when some require_approval rule matches a
    representative request: all of the entry's scopes, its tier's longest TTL, no context.
    A rule that only matches particular contexts (say env == "prod") is not counted, so the
    report errs towards listing an entry rather than hiding it.
    """
    tier = policy.tiers.get(entry.get("tier", ""))
    if tier is not None and tier.approval:
        return True
    req = TaskRequest(entry=entry, sidecar={"id": entry.get("parent_id", "")}, workload={}, task_id="report",
                      scopes=tuple(entry.get("scopes", ())), ttl=tier.max_task_ttl if tier else 1, context={},
                      now=now)
    act = activation(req)
    # A condition that errors proves nothing about coverage: only a clean match counts.
    return any(hit and not err for hit, err in (_matches(rule, act) for rule in policy.rules
                                                if rule.effect == "require_approval"))
