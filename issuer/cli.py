"""tessera: the operator CLI. Speaks the issuer's admin API on its local Unix socket."""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import re
import sys
import time

import grpc

from issuer.core.models import AUDIT_FIELDS, AUDIT_JSON_FIELDS
from tessera import crl as crl_mod
from tessera import safefs
from tessera.cliutil import CliError, Parser, duration_arg, fail, int_arg, path_arg, run_main
from tessera.configfile import check_path_text
from tessera.durations import format_duration, parse_duration
from tessera.errors import ConfigError, InvalidArgument, TesseraError
from tessera.uds import socket_target
from tessera.v1 import admin_pb2, admin_pb2_grpc, types_pb2
from tessera.version import add_version_flag

PROG = "tessera"
REVOKE_TARGETS = (("serial", "serial"), ("task", "task_id"), ("entry", "entry_id"), ("spiffe_id", "spiffe_id"),
                  ("sidecar", "sidecar"), ("owner", "owner"))
DEFAULT_SOCKET = "/run/tessera/admin.sock"
MAX_TAIL_LINES = 1_000_000
CERT_FILE_MAX = 64 * 1024  # --cert: one certificate (the admin API refuses more)
AUTHORITY_KINDS = ("x509", "jwt", "root")
CA_HELP = """\
Signing authorities: the root (in every trust bundle), the intermediates that sign SVIDs (rotated by the
issuer on its own every ca_ttl) and the JWT signing keys. Every change is audited with your uid and --reason.

Root rotation:
  1. tessera ca prepare --kind root --reason R
     The new root enters the trust bundle at once and signs nothing yet. The issuer pushes the bundle to
     every connected sidecar, which hands it to its workloads (FetchX509Bundles, bundle.pem).
  2. Once the new root has reached the fleet (every sidecar you rely on connected since: tessera sidecar
     list), tessera ca activate ROOT_ID --reason R
     The new root signs the next intermediate at once; both roots stay in the bundle, so SVIDs under
     either are accepted.
  3. When nothing depends on the old root any more (tessera ca list: outstanding 0), tessera ca revoke
     OLD_ROOT_ID --reason R removes it from the bundle.

Under an offline root (ca_cert with ca_offline), tessera ca prepare --kind x509 writes the next
intermediate's CSR; sign it with the root and install it with tessera ca activate ID --cert FILE.
See docs/authorities.md."""
_AUTHORITY_REF = re.compile(r"[0-9a-f]{8,64}", re.ASCII)


def _ts(t: int) -> str:
    return dt.datetime.fromtimestamp(t, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ") if t else "-"


def _left(seconds: int) -> str:
    """A time left, to the two largest units (3d 4h, 2h 5m, 40s)."""
    d, rest = divmod(max(0, int(seconds)), 86400)
    h, rest = divmod(rest, 3600)
    m, sec = divmod(rest, 60)
    parts = [(d, "d"), (h, "h"), (m, "m"), (sec, "s")]
    first = next((i for i, (n, _) in enumerate(parts) if n), 3)
    return " ".join(f"{n}{u}" for n, u in parts[first:first + 2] if n) or "0s"


def _entry_dict(e: types_pb2.Entry) -> dict:
    return {
        "id": e.id, "spiffe_id": e.spiffe_id, "parent_id": e.parent_id, "selectors": list(e.selectors),
        "owner": e.owner, "purpose": e.purpose, "tier": e.tier, "scopes": list(e.scopes),
        "x509_ttl": e.x509_ttl_seconds, "expires_at": e.expires_at, "state": e.state,
        "created_by": e.created_by, "created_at": e.created_at, "updated_at": e.updated_at,
        "revision": e.revision,
    }


def _sidecar_dict(s: types_pb2.Sidecar) -> dict:
    return {"id": s.id, "name": s.name, "state": s.state, "connected": s.connected,
            "attested_at": s.attested_at, "last_seen": s.last_seen, "svid_serial": s.svid_serial,
            "svid_expires_at": s.svid_expires_at}


def _approval_dict(a: admin_pb2.Approval) -> dict:
    return {"id": a.id, "task_id": a.task_id, "entry_id": a.entry_id, "spiffe_id": a.spiffe_id, "owner": a.owner,
            "tier": a.tier, "scopes": list(a.scopes), "ttl": a.ttl_seconds, "context": dict(a.context),
            "sidecar_id": a.sidecar_id, "workload": {"pid": a.pid, "uid": a.uid, "gid": a.gid, "exe": a.exe},
            "reason": a.reason, "created_at": a.created_at, "expires_at": a.expires_at, "state": a.state,
            "decided_by": a.decided_by, "decision_reason": a.decision_reason}


def _table(rows: list[list[str]], headers: list[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)] if rows else [len(h) for h in headers]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths))]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(line.rstrip() for line in lines)


def _print_entry(e: types_pb2.Entry, output: str) -> None:
    d = _entry_dict(e)
    if output == "json":
        print(json.dumps(d, indent=2))
        return
    for k, v in d.items():
        if k in ("expires_at", "created_at", "updated_at"):
            v = _ts(v)
        elif k == "x509_ttl":
            v = format_duration(v)
        elif isinstance(v, list):
            v = ", ".join(v) or "-"
        print(f"{k + ':':<12} {v}")


def _print_revoked(r: admin_pb2.RevokeResponse, output: str, what: str) -> None:
    if output == "json":
        print(json.dumps({"count": r.count, "serials": list(r.serials), "entry_ids": list(r.entry_ids),
                          "seq": r.seq}, indent=2))
        return
    extra = f", {len(r.entry_ids)} entr{'y' if len(r.entry_ids) == 1 else 'ies'} revoked" if r.entry_ids else ""
    print(f"{what}: {r.count} certificate{'' if r.count == 1 else 's'} revoked{extra} (revocation {r.seq})")


def authority_ref(value: str) -> str:
    """An authority id (lowercase hex, as `tessera ca list` shows it) or a unique prefix of 8 or more of it."""
    if not _AUTHORITY_REF.fullmatch(value):
        raise argparse.ArgumentTypeError(f"{value[:80]!r} is not an authority id: give the hex id from tessera ca "
                                         "list, or at least its first 8 characters")
    return value


def _authority_dict(a: admin_pb2.Authority) -> dict:
    return {"id": a.id, "kind": a.kind, "state": a.state, "source": a.source, "parent": a.parent,
            "not_before": a.not_before, "not_after": a.not_after, "expired": a.expired, "outstanding": a.outstanding,
            "created_at": a.created_at, "activated_at": a.activated_at, "tainted_at": a.tainted_at,
            "revoked_at": a.revoked_at, "cert_pem": a.cert_pem}


_KIND_ORDER = {"root": 0, "x509": 1, "jwt": 2}


def _authority_row(a: admin_pb2.Authority) -> list[str]:
    state = f"{a.state}, expired" if a.expired else a.state
    return [a.kind, a.id[:16], state, a.source, _ts(a.not_before), _ts(a.not_after), str(a.outstanding)]


def _print_authority(a: admin_pb2.Authority, output: str) -> None:
    print(json.dumps(_authority_dict(a), indent=2) if output == "json" else f"{a.id} {a.state}")


def _crl_dict(c: admin_pb2.CRL) -> dict:
    return {"authority": c.authority, "number": c.number, "entries": c.entries, "this_update": c.this_update,
            "next_update": c.next_update, "pem": crl_mod.pem(crl_mod.load(c.der)).decode()}


def _read_cert(path: str) -> str:
    """--cert: a PEM file read as tessera.safefs reads files (no link, FIFO or other user's file); the issuer checks
    what it holds."""
    try:
        data = safefs.read_regular(path, "--cert", limit=CERT_FILE_MAX)
    except FileNotFoundError:
        raise CliError(f"--cert: {path} does not exist") from None
    except OSError as e:
        raise CliError(f"--cert: cannot read {path}: {e.strerror}") from None
    try:
        return data.decode("ascii")
    except UnicodeDecodeError:
        raise CliError(f"--cert: {path} is not a PEM certificate") from None


def _check_csr_out(path: str) -> None:
    """--csr-out's directory, checked before the authority is prepared: a CSR is not lost for a bad path."""
    try:
        safefs.resolve_dir(os.path.dirname(os.path.abspath(path)), "--csr-out")
    except FileNotFoundError:
        raise CliError(f"--csr-out: the directory of {path} does not exist") from None
    if os.path.isdir(path):
        raise CliError(f"--csr-out: {path} is a directory")


def build_parser() -> Parser:
    p = Parser(prog=PROG, description="Operate a Tessera issuer over its admin socket.")
    add_version_flag(p)
    p.add_argument("--admin-socket", default=None, type=path_arg,
                   help=f"issuer admin socket (default: $TESSERA_ADMIN_SOCKET or {DEFAULT_SOCKET})")
    sub = p.add_subparsers(dest="group", required=True, parser_class=Parser)

    tok = sub.add_parser("token", help="join tokens").add_subparsers(dest="cmd", required=True, parser_class=Parser)
    tc = tok.add_parser("create", help="create a one-time join token for a sidecar")
    tc.add_argument("--sidecar", required=True, help="sidecar name")
    tc.add_argument("--ttl", default="10m", help="token lifetime (default 10m)")

    ent = sub.add_parser("entry", help="registration entries").add_subparsers(dest="cmd", required=True,
                                                                               parser_class=Parser)
    ec = ent.add_parser("create", help="register an identity")
    ec.add_argument("--spiffe-id", required=True)
    ec.add_argument("--parent", required=True, help="sidecar SPIFFE ID (or name) that may serve it")
    ec.add_argument("--selector", action="append", default=[], help="TYPE:KEY:VALUE, repeatable")
    ec.add_argument("--owner", default="")
    ec.add_argument("--purpose", default="")
    ec.add_argument("--expires-in", default=None, help="lifetime of the entry, e.g. 30d (required)")
    ec.add_argument("--x509-ttl", default=None, help="SVID lifetime (default: the issuer's default_x509_ttl)")
    ec.add_argument("--tier", default="")
    ec.add_argument("--scope", action="append", default=[])
    el = ent.add_parser("list", help="list entries")
    el.add_argument("--expired", action="store_true", help="only entries past their expiry")
    el.add_argument("--output", choices=["table", "json"], default="table")
    es = ent.add_parser("show", help="show one entry")
    es.add_argument("id")
    es.add_argument("--output", choices=["text", "json"], default="text")
    eu = ent.add_parser("update", help="change an entry")
    eu.add_argument("id")
    eu.add_argument("--owner")
    eu.add_argument("--purpose")
    eu.add_argument("--tier")
    eu.add_argument("--scope", action="append", default=None, help="replaces the scopes; repeatable")
    eu.add_argument("--selector", action="append", default=None, help="replaces the selectors; repeatable")
    eu.add_argument("--x509-ttl")
    eu.add_argument("--expires-in", help="new expiry, from now")
    eu.add_argument("--state", choices=["active", "disabled"])
    eu.add_argument("--reason", default="", help="why (required to extend the expiry)")
    eu.add_argument("--output", choices=["text", "json"], default="text")
    ed = ent.add_parser("delete", help="delete an entry")
    ed.add_argument("id")

    sc = sub.add_parser("sidecar", help="sidecars").add_subparsers(dest="cmd", required=True, parser_class=Parser)
    sl = sc.add_parser("list")
    sl.add_argument("--output", choices=["table", "json"], default="table")
    ss = sc.add_parser("show")
    ss.add_argument("id", help="sidecar SPIFFE ID or name")
    ss.add_argument("--output", choices=["text", "json"], default="text")
    sb = sc.add_parser("ban", help="ban a sidecar: streams closed, no renewal or re-attestation, its serials revoked")
    sb.add_argument("id", help="sidecar SPIFFE ID or name")
    sb.add_argument("--reason", required=True, help="why (audited)")
    sb.add_argument("--output", choices=["text", "json"], default="text")

    rv = sub.add_parser("revoke", help="revoke credentials; returns once the revocation is on disk")
    target = rv.add_mutually_exclusive_group(required=True)
    target.add_argument("--serial", help="one certificate, by hex serial")
    target.add_argument("--task", help="every credential of one task")
    target.add_argument("--entry", help="an entry: its certificates, and no more issuance")
    target.add_argument("--spiffe-id", help="an identity: every entry and certificate with this SPIFFE ID")
    target.add_argument("--sidecar", help="a sidecar (name or SPIFFE ID): bans it and revokes all it obtained")
    target.add_argument("--owner", help="everything the owner's entries hold")
    rv.add_argument("--reason", required=True, help="why (audited)")
    rv.add_argument("--reason-code", default="", choices=["", *crl_mod.REASON_CODES],
                    help="RFC 5280 reason code for the CRL (default depends on the target)")
    rv.add_argument("--output", choices=["text", "json"], default="text")

    crl = sub.add_parser("crl", help="the signed CRLs").add_subparsers(dest="cmd", required=True, parser_class=Parser)
    cs = crl.add_parser("show", help="print every published CRL (PEM), each under a line naming its authority, "
                                     "number, entries and dates: a CRL file for openssl verify -crl_check_all")
    cs.add_argument("--der", action="store_true", help="write only the active intermediate's CRL, as DER")
    cs.add_argument("--output", choices=["pem", "json"], default="pem")

    ca = sub.add_parser("ca", help="signing authorities: roots, intermediates, JWT keys", description=CA_HELP,
                        formatter_class=argparse.RawDescriptionHelpFormatter).add_subparsers(
        dest="cmd", required=True, parser_class=Parser)
    cl = ca.add_parser("list", help="every authority: kind, id, state, validity, SVIDs outstanding")
    cl.add_argument("--output", choices=["table", "json"], default="table")
    cp = ca.add_parser("prepare", help="create the next authority of a kind; it does not sign until activated",
                       description="Create the next authority of KIND in state prepared; prints its id. A root "
                                   "enters the trust bundle at once (step 1 of a root rotation; tessera ca --help). "
                                   "Under an offline root an intermediate waits for its certificate: its CSR goes to "
                                   "--csr-out, else to stdout after the id.")
    cp.add_argument("--kind", required=True, choices=AUTHORITY_KINDS)
    cp.add_argument("--reason", required=True, help="why (audited)")
    cp.add_argument("--csr-out", type=path_arg, metavar="FILE", help="write an offline root's CSR here")
    cp.add_argument("--output", choices=["text", "json"], default="text")
    ca_act = ca.add_parser("activate", help="make a prepared authority the one that signs (a root: step 2 of a "
                                            "root rotation)")
    ca_act.add_argument("id", type=authority_ref, help="authority id, or a unique prefix of 8 or more characters")
    ca_act.add_argument("--cert", type=path_arg, metavar="FILE",
                        help="the offline root's certificate for this intermediate (PEM)")
    ca_act.add_argument("--reason", required=True, help="why (audited)")
    ca_act.add_argument("--output", choices=["text", "json"], default="text")
    ct = ca.add_parser("taint", help="stop trusting an authority for new work: everything it signed is replaced "
                                     "on every sidecar at once (a root takes its intermediates with it)")
    ct.add_argument("id", type=authority_ref)
    ct.add_argument("--reason", required=True, help="why (audited)")
    ct.add_argument("--output", choices=["text", "json"], default="text")
    cr = ca.add_parser("revoke", help="withdraw an authority: a root leaves the bundle, an intermediate goes on its "
                                      "root's CRL; refused while unexpired certificates depend on it")
    cr.add_argument("id", type=authority_ref)
    cr.add_argument("--reason", required=True, help="why (audited)")
    cr.add_argument("--force", action="store_true", help="even while unexpired certificates depend on it")
    cr.add_argument("--output", choices=["text", "json"], default="text")

    au = sub.add_parser("audit", help="the audit trail").add_subparsers(dest="cmd", required=True, parser_class=Parser)
    at = au.add_parser("tail", help="show the latest audit records")
    at.add_argument("-n", "--lines", type=int_arg(0, MAX_TAIL_LINES), default=20,
                    help="how many of the latest records (default 20; 0 with --follow: only new ones)")
    at.add_argument("--follow", "-f", action="store_true", help="keep printing records as they commit")
    _audit_filters(at)
    at.add_argument("--output", choices=["table", "json"], default="table")
    ax = au.add_parser("export", help="print audit records as JSON lines")
    ax.add_argument("--since", default=None, help="a time (2026-01-31T00:00:00Z) or an age (24h, 7d); default: all")
    _audit_filters(ax)
    av = au.add_parser("verify", help="recompute the hash chain; exit 0 intact, 1 naming the first bad record")
    src = av.add_mutually_exclusive_group()
    src.add_argument("--db", type=_db_arg, help="read this issuer database directly (read-only) instead of asking the "
                     "issuer: an SQLite file, or a postgresql:// URI (no password in it: PGPASSFILE or PGPASSWORD)")
    src.add_argument("--file", type=path_arg, help="verify an audit JSON-lines file (the issuer's audit_file) instead")
    av.add_argument("--rotated", action="store_true",
                    help="with --file: its first records were rotated away; check it from its first record")

    rp = sub.add_parser("report", help="the trust-debt report")
    rp.add_argument("--unused-days", type=int_arg(0, 3650), default=0, help="entries with no issuance in N days (default 30)")
    rp.add_argument("--expiring-days", type=int_arg(0, 3650), default=0, help="entries expiring within N days (default 14)")
    rp.add_argument("--silent-hours", type=int_arg(0, 87600), default=0, help="sidecars not seen for N hours (default 24)")
    rp.add_argument("--output", choices=["table", "json"], default="table")
    ap = sub.add_parser("approval", help="task requests awaiting a human decision").add_subparsers(
        dest="cmd", required=True, parser_class=Parser)
    al = ap.add_parser("list", help="list pending approvals")
    al.add_argument("--output", choices=["table", "json"], default="table")
    for verb in ("approve", "deny"):
        av = ap.add_parser(verb, help=f"{verb} a pending task request")
        av.add_argument("id")
        av.add_argument("--reason", required=True, help="why (recorded in the audit log)")
        av.add_argument("--output", choices=["text", "json"], default="text")

    bd = sub.add_parser("bundle", help="trust bundle").add_subparsers(dest="cmd", required=True, parser_class=Parser)
    bd.add_parser("show", help="print the PEM trust bundle")
    return p


AUDIT_FILTER_KEYS = ("action", "decision", "actor", "subject")


def _audit_filters(p) -> None:
    p.add_argument("--filter", action="append", default=[], metavar="KEY=VALUE",
                   help="repeatable; action=A (or a prefix ending in '.', e.g. svid.),"
                        " decision=allow|deny|pending|done,"
                        " actor=SUBSTRING, subject=SUBSTRING")


def _parse_filters(items: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in AUDIT_FILTER_KEYS or not value:
            raise CliError(f"--filter {item!r}: use KEY=VALUE with KEY one of {', '.join(AUDIT_FILTER_KEYS)}")
        if key in out:
            raise CliError(f"--filter {key} given twice")
        out[key] = value
    if out.get("decision", "allow") not in ("allow", "deny", "pending", "done"):
        raise CliError("--filter decision= must be allow, deny, pending or done")
    return out


def _since(value: str | None) -> float:
    if not value:
        return 0.0
    try:
        return dt.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        pass
    try:
        return time.time() - parse_duration(value)
    except InvalidArgument:
        raise CliError(f"--since {value!r}: give a time like 2026-01-31T00:00:00Z or an age like 24h") from None


def _audit_query(args, **kw) -> admin_pb2.AuditQuery:
    return admin_pb2.AuditQuery(**_parse_filters(args.filter), **kw)


def _record_dict(r: admin_pb2.AuditRecord) -> dict:
    """The record's fields (issuer/core/models.py); actor and details arrive as JSON text."""
    return {k: json.loads(getattr(r, f"{k}_json") or "{}") if k in AUDIT_JSON_FIELDS else getattr(r, k)
            for k in AUDIT_FIELDS}


AUDIT_HEADERS = ["TIME", "SEQ", "ACTION", "DECISION", "ACTOR", "SUBJECT", "REASON"]


def _record_row(r: admin_pb2.AuditRecord) -> list[str]:
    actor = json.loads(r.actor_json or "{}")
    when = dt.datetime.fromtimestamp(r.ts, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
    return [when, str(r.seq), r.action, r.decision, f"{actor.get('kind', '')}:{actor.get('id', '')}",
            r.subject or "-", r.reason or "-"]


def _db_arg(value: str) -> str:
    """An SQLite file's path or a PostgreSQL URI without a password (`audit verify --db`)."""
    from issuer.datastore import check_dsn, is_postgres

    if not is_postgres(value):
        return path_arg(value)
    try:
        return check_dsn(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"--db {e}") from None


def _print_verification(ok: bool, records: int, last_seq: int, bad_seq: int, problem: str, source: str,
                        first_seq: int = 1) -> int:
    if ok and first_seq > 1:
        print(f"audit trail intact from record {first_seq}: {records} records, seq {first_seq} to {last_seq}; "
              f"records 1 to {first_seq - 1} are not in this file and were not checked ({source})")
        return 0
    if ok:
        print(f"audit trail intact: {records} records, last seq {last_seq} ({source})")
        return 0
    return fail(PROG, f"audit trail broken at record {bad_seq}: {problem} ({source})", 1)


def _verify_local(args) -> int:
    from issuer.audit.records import read_jsonl, verify_chain
    from issuer.datastore import is_postgres, open_reader

    path = args.db or args.file
    if not is_postgres(path) and not os.path.exists(path):
        raise CliError(f"{path} does not exist")
    try:
        # From genesis unless the operator says the file's head was rotated away: records cut off the
        # start of a file must not pass for a rotation unasked.
        check = verify_chain(open_reader(path).audit_since() if args.db else read_jsonl(path),
                             from_genesis=not (args.file and args.rotated))
    except (TesseraError, OSError, ValueError, KeyError, TypeError) as e:
        raise CliError(f"cannot read audit records from {path}: {e}", 1) from None
    if not check.ok and args.file and not args.rotated and check.bad_seq == check.first_seq > 1:
        check = dataclasses.replace(check, problem=check.problem + " (if this file was rotated, add --rotated)")
    return _print_verification(check.ok, check.records, check.last_seq, check.bad_seq, check.problem, path,
                               check.first_seq)


def _print_report(rep: dict) -> None:
    th = rep["thresholds"]
    sections = [
        (f"Entries with no issuance in {th['unused_days']} days", rep["unused_entries"],
         ["ID", "SPIFFE ID", "OWNER", "LAST ISSUED"],
         lambda e: [e["id"], e["spiffe_id"], e["owner"], _ts(e["last_issued_at"] or 0)]),
        (f"Entries expiring within {th['expiring_days']} days", rep["expiring_entries"],
         ["ID", "SPIFFE ID", "OWNER", "EXPIRES"],
         lambda e: [e["id"], e["spiffe_id"], e["owner"], _ts(e["expires_at"])]),
        ("Entries past expiry", rep["expired_entries"],
         ["ID", "SPIFFE ID", "OWNER", "EXPIRED"],
         lambda e: [e["id"], e["spiffe_id"], e["owner"], _ts(e["expires_at"])]),
        ("Shared selector sets (one process, several identities)", rep["shared_selector_sets"],
         ["PARENT", "SELECTORS", "ENTRIES"],
         lambda g: [g["parent_id"], ",".join(g["selectors"]), ",".join(g["entries"])]),
        (f"Sidecars silent for {th['silent_hours']} hours", rep["silent_sidecars"],
         ["ID", "LAST SEEN"], lambda s: [s["id"], _ts(s["last_seen"])]),
        ("Denials by reason", rep["denials_by_reason"], ["COUNT", "ACTION", "REASON"],
         lambda d: [d["count"], d["action"], d["reason"]]),
        ("Authorities expiring (within a third of their life, at most 7 days)", rep["expiring_authorities"],
         ["KIND", "ID", "STATE", "SOURCE", "EXPIRES", "IN"],
         lambda a: [a["kind"], a["id"][:16], a["state"], a["source"], _ts(a["not_after"]),
                    _left(a["expires_in_seconds"])]),
        ("Offline-signed intermediates with no signed successor (sign the CSR, then tessera ca activate --cert)",
         rep["offline_intermediates_without_successor"], ["ID", "EXPIRES", "IN", "CSR WAITING FOR"],
         lambda a: [a["id"][:16], _ts(a["not_after"]), _left(a["expires_in_seconds"]),
                    a["awaiting_certificate"] or "- (tessera ca prepare --kind x509)"]),
    ]
    for title, items, headers, row in sections:
        print(f"== {title}: {len(items)}")
        if items:
            print(_table([[str(c) for c in row(i)] for i in items], headers))
        print()
    hi = rep["uncovered_high_tier_entries"]
    if hi["available"]:
        print(f"== High-tier entries no approval rule covers: {len(hi['entries'])}")
        if hi["entries"]:
            print(_table([[e["id"], e["spiffe_id"], e["tier"], e["owner"]] for e in hi["entries"]],
                         ["ID", "SPIFFE ID", "TIER", "OWNER"]))
    else:
        print(f"== High-tier entries no approval rule covers: unavailable ({hi['reason']})")
    print()
    ttc = rep["time_to_credential"]
    fmt = lambda v: "-" if v is None else f"{v:.1f} ms"  # noqa: E731
    print(f"== Time to credential: {ttc['count']} credentials, median {fmt(ttc['median_ms'])}, "
          f"p95 {fmt(ttc['p95_ms'])}")


def _stub(socket_path: str) -> admin_pb2_grpc.AdminStub:
    if not os.path.exists(socket_path):
        raise CliError(f"admin socket {socket_path} does not exist (is the issuer running? set --admin-socket)", 1)
    channel = grpc.insecure_channel(socket_target(socket_path))
    return admin_pb2_grpc.AdminStub(channel)


def _ca(stub: admin_pb2_grpc.AdminStub, args, cert_pem: str, t: float) -> int:
    c = args.cmd
    if c == "list":
        authorities = stub.ListAuthorities(types_pb2.Empty(), timeout=t).authorities
        if args.output == "json":
            print(json.dumps([_authority_dict(a) for a in authorities], indent=2))
        else:
            rows = sorted(authorities, key=lambda a: (_KIND_ORDER.get(a.kind, 3), a.created_at, a.id))
            print(_table([_authority_row(a) for a in rows],
                         ["KIND", "ID", "STATE", "SOURCE", "NOT BEFORE", "NOT AFTER", "OUTSTANDING"]))
    elif c == "prepare":
        r = stub.PrepareAuthority(admin_pb2.PrepareAuthorityRequest(kind=args.kind, reason=args.reason), timeout=t)
        unwritten = ""
        if args.csr_out and r.csr_pem:
            try:
                safefs.atomic_write(args.csr_out, r.csr_pem.encode(), 0o644, "--csr-out")
            except (OSError, ConfigError) as e:
                unwritten = str(e)  # the authority exists now: its CSR goes to stdout rather than nowhere
        if args.output == "json":
            print(json.dumps({"authority": _authority_dict(r.authority), "csr_pem": r.csr_pem}, indent=2))
        else:
            print(r.authority.id)
            if r.csr_pem and (unwritten or not args.csr_out):
                sys.stdout.write(r.csr_pem)
        if unwritten:
            raise CliError(f"--csr-out: {unwritten}; the CSR of {r.authority.id} is on stdout instead", 1)
        if args.csr_out and not r.csr_pem:
            print(f"{PROG}: no CSR written to {args.csr_out}: the root's key is here, and it signed the intermediate",
                  file=sys.stderr)
    elif c == "activate":
        r = stub.ActivateAuthority(admin_pb2.ActivateAuthorityRequest(id=args.id, cert_pem=cert_pem,
                                                                      reason=args.reason), timeout=t)
        _print_authority(r.authority, args.output)
    elif c == "taint":
        tainted = list(stub.TaintAuthority(admin_pb2.AuthorityRef(id=args.id, reason=args.reason), timeout=t).tainted)
        print(json.dumps({"tainted": tainted}, indent=2) if args.output == "json" else "\n".join(tainted))
    elif c == "revoke":
        r = stub.RevokeAuthority(admin_pb2.RevokeAuthorityRequest(id=args.id, reason=args.reason, force=args.force),
                                 timeout=t)
        _print_authority(r.authority, args.output)
    return 0


def _local_inputs(args) -> str:
    """What a command reads or checks here, before the issuer is asked: bad input is refused without a change.
    Returns --cert's PEM text (or "")."""
    if args.group == "crl" and args.der and args.output == "json":
        raise CliError("--der and --output json do not go together")
    if args.group != "ca" or args.cmd == "list":
        return ""
    if not args.reason.strip():
        raise CliError("--reason must not be empty")
    if args.cmd == "prepare" and args.csr_out:
        _check_csr_out(args.csr_out)
    if args.cmd == "activate" and args.cert:
        return _read_cert(args.cert)
    return ""


def run(args) -> int:
    if args.group == "audit" and args.cmd == "verify" and (args.db or args.file):
        return _verify_local(args)
    cert_pem = _local_inputs(args)
    socket_path = args.admin_socket or os.environ.get("TESSERA_ADMIN_SOCKET") or DEFAULT_SOCKET
    try:
        check_path_text(socket_path)
    except ValueError as e:
        raise CliError(f"admin socket {socket_path[:80]!r} {e}") from None
    stub = _stub(socket_path)
    t = 30
    g, c = args.group, getattr(args, "cmd", None)
    if g == "token" and c == "create":
        r = stub.CreateJoinToken(admin_pb2.CreateJoinTokenRequest(sidecar_name=args.sidecar,
                                                                  ttl_seconds=duration_arg(args.ttl, "--ttl")), timeout=t)
        print(r.token)
    elif g == "entry" and c == "create":
        if args.expires_in is None:
            raise CliError("--expires-in is required: no identity lives forever (e.g. --expires-in 30d)")
        if not args.owner.strip():
            raise CliError("--owner is required")
        if not args.purpose.strip():
            raise CliError("--purpose is required")
        if not args.selector:
            raise CliError("at least one --selector is required")
        req = types_pb2.Entry(
            spiffe_id=args.spiffe_id, parent_id=args.parent, selectors=args.selector, owner=args.owner,
            purpose=args.purpose, tier=args.tier, scopes=args.scope,
            x509_ttl_seconds=duration_arg(args.x509_ttl, "--x509-ttl") if args.x509_ttl else 0,
            expires_at=int(time.time()) + duration_arg(args.expires_in, "--expires-in"))
        print(stub.CreateEntry(req, timeout=t).id)
    elif g == "entry" and c == "list":
        entries = stub.ListEntries(admin_pb2.ListEntriesRequest(expired_only=args.expired), timeout=t).entries
        if args.output == "json":
            print(json.dumps([_entry_dict(e) for e in entries], indent=2))
        else:
            print(_table([[e.id, e.spiffe_id, e.owner, e.tier, e.state, _ts(e.expires_at)] for e in entries],
                         ["ID", "SPIFFE ID", "OWNER", "TIER", "STATE", "EXPIRES"]))
    elif g == "entry" and c == "show":
        _print_entry(stub.GetEntry(admin_pb2.EntryRef(id=args.id), timeout=t), args.output)
    elif g == "entry" and c == "update":
        req = admin_pb2.UpdateEntryRequest(id=args.id, reason=args.reason)
        for name in ("owner", "purpose", "tier", "state"):
            if getattr(args, name) is not None:
                setattr(req, name, getattr(args, name))
        if args.scope is not None:
            req.scopes.values.extend(args.scope)
            req.scopes.SetInParent()
        if args.selector is not None:
            req.selectors.values.extend(args.selector)
        if args.x509_ttl:
            req.x509_ttl_seconds = duration_arg(args.x509_ttl, "--x509-ttl")
        if args.expires_in:
            req.expires_at = int(time.time()) + duration_arg(args.expires_in, "--expires-in")
        _print_entry(stub.UpdateEntry(req, timeout=t), args.output)
    elif g == "entry" and c == "delete":
        stub.DeleteEntry(admin_pb2.EntryRef(id=args.id), timeout=t)
        print(args.id)
    elif g == "sidecar" and c == "list":
        sidecars = stub.ListSidecars(types_pb2.Empty(), timeout=t).sidecars
        if args.output == "json":
            print(json.dumps([_sidecar_dict(s) for s in sidecars], indent=2))
        else:
            print(_table([[s.id, s.state, "yes" if s.connected else "no", _ts(s.last_seen)] for s in sidecars],
                         ["ID", "STATE", "CONNECTED", "LAST SEEN"]))
    elif g == "sidecar" and c == "show":
        s = stub.GetSidecar(admin_pb2.SidecarRef(id=args.id), timeout=t)
        d = _sidecar_dict(s)
        print(json.dumps(d, indent=2) if args.output == "json" else
              "\n".join(f"{k + ':':<16} {v}" for k, v in d.items()))
    elif g == "audit" and c == "tail":
        stream = stub.ReadAudit(_audit_query(args, last=args.lines, from_end=args.lines == 0, follow=args.follow),
                                timeout=None if args.follow else t)
        if args.output == "json" or args.follow:
            # Streamed one line per record, as each arrives.
            for r in stream:
                print(json.dumps(_record_dict(r), sort_keys=True) if args.output == "json"
                      else "  ".join(_record_row(r)), flush=True)
        else:
            print(_table([_record_row(r) for r in stream], AUDIT_HEADERS))
    elif g == "audit" and c == "export":
        for r in stub.ReadAudit(_audit_query(args, since_ts=_since(args.since)), timeout=300):
            print(json.dumps(_record_dict(r), sort_keys=True, separators=(",", ":")))
    elif g == "audit" and c == "verify":
        v = stub.VerifyAudit(types_pb2.Empty(), timeout=300)
        return _print_verification(v.ok, v.records, v.last_seq, v.bad_seq, v.problem, "issuer database")
    elif g == "report":
        rep = json.loads(stub.Report(admin_pb2.ReportRequest(
            unused_days=args.unused_days, expiring_days=args.expiring_days, silent_hours=args.silent_hours),
            timeout=120).json)
        if args.output == "json":
            print(json.dumps(rep, indent=2, sort_keys=True))
        else:
            _print_report(rep)
    elif g == "approval" and c == "list":
        approvals = stub.ListApprovals(types_pb2.Empty(), timeout=t).approvals
        if args.output == "json":
            print(json.dumps([_approval_dict(a) for a in approvals], indent=2))
        else:
            print(_table([[a.id, a.task_id, a.spiffe_id, ",".join(a.scopes), a.tier, _ts(a.expires_at), a.reason]
                          for a in approvals], ["ID", "TASK", "SPIFFE ID", "SCOPES", "TIER", "EXPIRES", "WHY"]))
    elif g == "approval" and c in ("approve", "deny"):
        if not args.reason.strip():
            raise CliError("--reason must not be empty")
        a = stub.DecideApproval(admin_pb2.DecideApprovalRequest(id=args.id, approve=c == "approve",
                                                                reason=args.reason), timeout=t)
        d = _approval_dict(a)
        print(json.dumps(d, indent=2) if args.output == "json" else f"{a.id} {a.state} by {a.decided_by}")
    elif g == "sidecar" and c == "ban":
        if not args.reason.strip():
            raise CliError("--reason must not be empty")
        _print_revoked(stub.BanSidecar(admin_pb2.BanSidecarRequest(sidecar=args.id, reason=args.reason), timeout=t),
                       args.output, f"banned sidecar {args.id}")
    elif g == "revoke":
        if not args.reason.strip():
            raise CliError("--reason must not be empty")
        req = admin_pb2.RevokeRequest(reason=args.reason, reason_code=args.reason_code)
        for arg, field in REVOKE_TARGETS:
            value = getattr(args, arg)
            if value is not None:
                if not value.strip():
                    raise CliError(f"--{arg.replace('_', '-')} must not be empty")
                setattr(req, field, value)
                what = f"{arg.replace('_', ' ')} {value}"
        _print_revoked(stub.Revoke(req, timeout=t), args.output, f"revoked {what}")
    elif g == "crl" and c == "show":
        crl = stub.GetCRL(types_pb2.Empty(), timeout=t)
        if args.der:
            sys.stdout.buffer.write(crl.der)  # the active intermediate's, the set's first
        elif args.output == "json":
            print(json.dumps([_crl_dict(one) for one in crl.all], indent=2))
        else:
            # A line of text before each PEM block: openssl, Go's pem and cryptography skip it.
            for one in crl.all:
                sys.stdout.write(f"# authority {one.authority}: CRL number {one.number}, {one.entries} "
                                 f"entr{'y' if one.entries == 1 else 'ies'}, thisUpdate {_ts(one.this_update)}, "
                                 f"nextUpdate {_ts(one.next_update)}\n")
                sys.stdout.write(crl_mod.pem(crl_mod.load(one.der)).decode())
    elif g == "ca":
        return _ca(stub, args, cert_pem, t)
    elif g == "bundle" and c == "show":
        sys.stdout.write(stub.GetBundle(types_pb2.Empty(), timeout=t).pem)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_main(PROG, run, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
