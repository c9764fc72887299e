"""tessera: the operator CLI. Speaks the issuer's admin API on its local Unix socket."""

from __future__ import annotations

import datetime as dt
import json
import os
import sys
import time

import grpc

from tessera.cliutil import CliError, Parser, run_main
from tessera.durations import format_duration, parse_duration
from tessera.errors import InvalidArgument
from tessera.v1 import admin_pb2, admin_pb2_grpc, types_pb2

PROG = "tessera"
REASON_CODE_NAMES = ("unspecified", "keyCompromise", "affiliationChanged", "superseded", "cessationOfOperation",
                     "privilegeWithdrawn")
REVOKE_TARGETS = (("serial", "serial"), ("task", "task_id"), ("entry", "entry_id"), ("spiffe_id", "spiffe_id"),
                  ("sidecar", "sidecar"), ("owner", "owner"))
DEFAULT_SOCKET = "/run/tessera/admin.sock"


def _duration(value: str) -> int:
    try:
        return parse_duration(value)
    except InvalidArgument as e:
        raise CliError(e.message) from None


def _ts(t: int) -> str:
    return dt.datetime.fromtimestamp(t, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ") if t else "-"


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


def _table(rows: list[list[str]], headers: list[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)] if rows else [len(h) for h in headers]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths))]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)


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


def build_parser() -> Parser:
    p = Parser(prog=PROG, description="Operate a Tessera issuer over its admin socket.")
    p.add_argument("--admin-socket", default=None,
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
    rv.add_argument("--reason-code", default="", choices=["", *REASON_CODE_NAMES],
                    help="RFC 5280 reason code for the CRL (default depends on the target)")
    rv.add_argument("--output", choices=["text", "json"], default="text")

    crl = sub.add_parser("crl", help="the signed CRL").add_subparsers(dest="cmd", required=True, parser_class=Parser)
    cs = crl.add_parser("show", help="print the current CRL (PEM)")
    cs.add_argument("--der", action="store_true", help="write DER instead of PEM")

    bd = sub.add_parser("bundle", help="trust bundle").add_subparsers(dest="cmd", required=True, parser_class=Parser)
    bd.add_parser("show", help="print the PEM trust bundle")
    return p


def _stub(socket_path: str) -> admin_pb2_grpc.AdminStub:
    if not os.path.exists(socket_path):
        raise CliError(f"admin socket {socket_path} does not exist (is the issuer running? set --admin-socket)", 1)
    channel = grpc.insecure_channel(f"unix://{os.path.abspath(socket_path)}")
    return admin_pb2_grpc.AdminStub(channel)


def run(args) -> int:
    socket_path = args.admin_socket or os.environ.get("TESSERA_ADMIN_SOCKET") or DEFAULT_SOCKET
    stub = _stub(socket_path)
    t = 30
    g, c = args.group, getattr(args, "cmd", None)
    if g == "token" and c == "create":
        r = stub.CreateJoinToken(admin_pb2.CreateJoinTokenRequest(sidecar_name=args.sidecar,
                                                                  ttl_seconds=_duration(args.ttl)), timeout=t)
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
            x509_ttl_seconds=_duration(args.x509_ttl) if args.x509_ttl else 0,
            expires_at=int(time.time()) + _duration(args.expires_in))
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
            req.x509_ttl_seconds = _duration(args.x509_ttl)
        if args.expires_in:
            req.expires_at = int(time.time()) + _duration(args.expires_in)
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
            sys.stdout.buffer.write(crl.der)
        else:
            from tessera import crl as crl_mod

            sys.stdout.write(crl_mod.pem(crl_mod.load(crl.der)).decode())
    elif g == "bundle" and c == "show":
        sys.stdout.write(stub.GetBundle(types_pb2.Empty(), timeout=t).pem)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_main(PROG, run, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
