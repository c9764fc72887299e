"""The issuer's YAML configuration, validated at start."""

from __future__ import annotations

import os
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path

from issuer import policy as policy_mod

from tessera import spiffeid
from tessera.configfile import default_bootstrap_address, load_yaml


@dataclass(frozen=True)
class IssuerConfig:
    trust_domain: str
    data_dir: Path
    listen_address: str
    bootstrap_address: str
    admin_socket: Path
    admin_uids: tuple[int, ...]
    default_x509_ttl: int
    sidecar_svid_ttl: int
    join_token_ttl: int
    ca_cert: Path | None
    ca_key: Path | None
    ca_ttl: int
    server_name: str
    resync_interval: int
    max_workers: int
    signing_workers: int
    log_level: str
    audit_file: Path  # JSON-lines copy of the audit trail (default data_dir/audit.jsonl)
    metrics_address: str | None = None  # HOST:PORT for Prometheus /metrics; off when unset
    # Tiers and task rules (issuer/policy.py); the default has the standard tiers and no rules.
    policy: policy_mod.Policy = field(default_factory=lambda: policy_mod.DEFAULT_POLICY)
    crl_validity: int = 600
    handshake_timeout: int = 10  # seconds a new connection has to finish TLS and HTTP/2 set-up


def load(path: str | Path) -> IssuerConfig:
    sec = load_yaml(path)
    td = sec.checked("trust_domain", spiffeid.validate_trust_domain, sec.str("trust_domain"))
    data_dir = sec.path("data_dir")
    listen = sec.address("listen_address")
    bootstrap = sec.address("bootstrap_address", default_bootstrap_address(listen))
    admin_uids = sec.get("admin_uids", list, [])
    if not all(isinstance(u, int) and not isinstance(u, bool) and u >= 0 for u in admin_uids):
        raise sec.fail("admin_uids", "must be a list of numeric uids")
    cfg = IssuerConfig(
        trust_domain=td,
        data_dir=data_dir,
        listen_address=listen,
        bootstrap_address=bootstrap,
        admin_socket=sec.path("admin_socket", str(data_dir / "admin.sock")),
        admin_uids=tuple(sorted({0, os.getuid(), *admin_uids})),
        default_x509_ttl=sec.duration("default_x509_ttl", "10m"),
        sidecar_svid_ttl=sec.duration("sidecar_svid_ttl", "1h"),
        join_token_ttl=sec.duration("join_token_ttl", "10m"),
        ca_cert=sec.path("ca_cert", None),
        ca_key=sec.path("ca_key", None),
        ca_ttl=sec.duration("ca_ttl", "365d"),
        server_name=sec.str("server_name", "tessera-issuer"),
        resync_interval=sec.duration("resync_interval", "5m"),
        max_workers=sec.get("max_workers", int, 256),
        # Processes that verify CSRs and sign certificates; 0 signs in the main process.
        signing_workers=sec.get("signing_workers", int, os.cpu_count() or 1),
        log_level=sec.str("log_level", "info"),
        audit_file=sec.path("audit_file", str(data_dir / "audit.jsonl")),
        metrics_address=sec.address("metrics_address", None),
        policy=policy_mod.load(sec),
        crl_validity=sec.duration("crl_validity", "10m"),
        handshake_timeout=sec.duration("handshake_timeout", "10s"),
    )
    if (cfg.ca_cert is None) != (cfg.ca_key is None):
        raise sec.fail("ca_key" if cfg.ca_key is None else "ca_cert", "ca_cert and ca_key must be given together")
    if cfg.crl_validity < 10:
        raise sec.fail("crl_validity", "must be at least 10s (the CRL is re-signed at half of it)")
    if not 1 <= cfg.handshake_timeout <= 120:
        raise sec.fail("handshake_timeout", "must be between 1s and 2m")
    if cfg.max_workers < 8:
        raise sec.fail("max_workers", "must be at least 8")
    if not 0 <= cfg.signing_workers <= 64:
        raise sec.fail("signing_workers", "must be between 0 (sign in the main process) and 64")
    sec.reject_unknown()
    return cfg
