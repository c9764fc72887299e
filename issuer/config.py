"""The issuer's YAML configuration, validated at start."""

from __future__ import annotations

import os
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path

from issuer.identity.registration import MAX_X509_TTL, MIN_TTL
from issuer.tasks import policy as policy_mod

from tessera import spiffeid
from tessera.configfile import default_bootstrap_address, dns_name, load_yaml, log_level
from tessera.durations import DAY, MAX_DURATION
from tessera.selectors import UID_MAX

# Bounds of the duration keys (seconds): long enough for any real deployment, short enough that
# every date derived from them stays representable and nothing lives by mistake for centuries.
MAX_SIDECAR_SVID_TTL = 30 * DAY
MAX_JOIN_TOKEN_TTL = 7 * DAY  # as the issuer's CreateJoinToken enforces
MIN_CA_TTL, MAX_CA_TTL = 60, 365 * DAY  # an intermediate's (and a JWT key's) lifetime; it rotates on its own
MIN_ROOT_TTL, MAX_ROOT_TTL = DAY, MAX_DURATION
MIN_CRL_VALIDITY, MAX_CRL_VALIDITY = 10, 7 * DAY  # the CRL is re-signed at half of it
MAX_RESYNC_INTERVAL = DAY


@dataclass(frozen=True)
class DatastoreConfig:
    """Where the issuer keeps its state: an SQLite file in data_dir (one issuer) or a PostgreSQL database."""

    engine: str = "sqlite"  # or "postgres"
    dsn: str | None = None  # postgres: a postgresql:// URI, never with a password (see docs/operations.md)
    pool_size: int = 10  # postgres: connections per process at most

    def source(self, data_dir: Path) -> str | Path:
        """What issuer.datastore.open_store is given."""
        return self.dsn if self.engine == "postgres" else data_dir / "tessera.db"


ENGINES = ("sqlite", "postgres")
MAX_POOL_SIZE = 200


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
    ca_cert: Path | None  # an operator's root (upstream, with ca_key; offline, with ca_offline)
    ca_key: Path | None
    ca_ttl: int  # each intermediate's and JWT key's lifetime
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
    ca_offline: bool = False  # the root's key never reaches this host (ca_cert only)
    root_ttl: int = 10 * 365 * DAY  # a root created here
    kek_file: Path | None = None  # key-encryption key for authorities' keys (default data_dir/kek; or TESSERA_KEK)
    datastore: DatastoreConfig = field(default_factory=DatastoreConfig)
    # Several issuer processes on this host serve the same listen and bootstrap ports (SO_REUSEPORT; the kernel
    # spreads new connections over them). PostgreSQL only: the peers share one database and its change feed.
    share_port: bool = False


def _datastore(sec) -> DatastoreConfig:
    engine = sec.str("engine", "sqlite")
    if engine not in ENGINES:
        raise sec.fail("engine", f"must be one of {', '.join(ENGINES)}, got {engine!r}")
    if engine == "sqlite":
        for key in ("dsn", "pool_size"):
            if sec.has(key):
                raise sec.fail(key, "is for engine: postgres (SQLite keeps its file in data_dir)")
        sec.reject_unknown()
        return DatastoreConfig()
    from issuer.datastore import check_dsn  # psycopg is imported only when PostgreSQL is chosen

    cfg = DatastoreConfig(engine, sec.checked("dsn", check_dsn, sec.str("dsn")),
                          sec.int("pool_size", 10, minimum=2, maximum=MAX_POOL_SIZE))
    sec.reject_unknown()
    return cfg


def load(path: str | Path) -> IssuerConfig:
    sec = load_yaml(path)
    td = sec.checked("trust_domain", spiffeid.validate_trust_domain, sec.str("trust_domain"))
    data_dir = sec.path("data_dir")
    listen = sec.address("listen_address")
    bootstrap = sec.address("bootstrap_address", default_bootstrap_address(listen))
    admin_uids = sec.get("admin_uids", list, [])
    if len(admin_uids) > 1000 or not all(isinstance(u, int) and not isinstance(u, bool) and 0 <= u <= UID_MAX
                                         for u in admin_uids):
        raise sec.fail("admin_uids", f"must be a list of at most 1000 numeric uids, each 0 to {UID_MAX}")
    cfg = IssuerConfig(
        trust_domain=td,
        data_dir=data_dir,
        listen_address=listen,
        bootstrap_address=bootstrap,
        admin_socket=sec.path("admin_socket", str(data_dir / "admin.sock")),
        admin_uids=tuple(sorted({0, os.getuid(), *admin_uids})),
        default_x509_ttl=sec.duration("default_x509_ttl", "10m", minimum=MIN_TTL, maximum=MAX_X509_TTL),
        sidecar_svid_ttl=sec.duration("sidecar_svid_ttl", "1h", maximum=MAX_SIDECAR_SVID_TTL),
        join_token_ttl=sec.duration("join_token_ttl", "10m", maximum=MAX_JOIN_TOKEN_TTL),
        ca_cert=sec.path("ca_cert", None),
        ca_key=sec.path("ca_key", None),
        ca_ttl=sec.duration("ca_ttl", "7d", minimum=MIN_CA_TTL, maximum=MAX_CA_TTL),
        ca_offline=sec.get("ca_offline", bool, False),
        root_ttl=sec.duration("root_ttl", "3650d", minimum=MIN_ROOT_TTL, maximum=MAX_ROOT_TTL),
        kek_file=sec.path("kek_file", None),
        server_name=sec.checked("server_name", dns_name, sec.str("server_name", "tessera-issuer")),
        resync_interval=sec.duration("resync_interval", "5m", maximum=MAX_RESYNC_INTERVAL),
        max_workers=sec.int("max_workers", 256, minimum=8, maximum=4096),
        # Processes that verify CSRs and sign certificates; 0 signs in the main process.
        signing_workers=sec.int("signing_workers", min(os.cpu_count() or 1, 64), maximum=64),
        log_level=sec.checked("log_level", log_level, sec.str("log_level", "info")),
        audit_file=sec.path("audit_file", str(data_dir / "audit.jsonl")),
        metrics_address=sec.address("metrics_address", None),
        policy=policy_mod.load(sec),
        crl_validity=sec.duration("crl_validity", "10m", minimum=MIN_CRL_VALIDITY, maximum=MAX_CRL_VALIDITY),
        handshake_timeout=sec.duration("handshake_timeout", "10s", minimum=1, maximum=120),
        datastore=_datastore(sec.section("datastore")),
        share_port=sec.get("share_port", bool, False),
    )
    if cfg.share_port and cfg.datastore.engine != "postgres":
        raise sec.fail("share_port", "needs datastore: {engine: postgres} (with SQLite each process would keep its "
                       "own database in its data_dir)")
    for key in ("audit_file", "ca_cert", "ca_key", "kek_file"):
        if getattr(cfg, key) is not None and getattr(cfg, key).is_dir():
            raise sec.fail(key, f"{getattr(cfg, key)} is a directory; name a file")
    if cfg.data_dir.exists() and not cfg.data_dir.is_dir():
        raise sec.fail("data_dir", f"{cfg.data_dir} is not a directory")
    if cfg.ca_offline:
        if cfg.ca_cert is None or cfg.ca_key is not None:
            raise sec.fail("ca_offline", "an offline root takes ca_cert (its certificate) and no ca_key")
    elif (cfg.ca_cert is None) != (cfg.ca_key is None):
        raise sec.fail("ca_key" if cfg.ca_key is None else "ca_cert", "ca_cert and ca_key must be given together "
                       "(or ca_cert with ca_offline: true for an offline root)")
    sec.reject_unknown()
    return cfg
