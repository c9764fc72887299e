"""The sidecar's YAML configuration, validated at start."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from agent_sidecar.socket_server import SocketLimits, load_limits
from tessera.configfile import default_bootstrap_address, load_yaml


@dataclass(frozen=True)
class SidecarConfig:
    issuer_address: str
    issuer_bootstrap_address: str
    trust_bundle: Path
    join_token: str | None
    data_dir: Path
    socket_path: Path
    socket_mode: int
    server_name: str
    exe_hash_max_bytes: int
    log_level: str
    metrics_address: str | None = None  # HOST:PORT for Prometheus /metrics; off when unset
    output_dir: Path | None = None  # bundle.pem and crl.pem for nginx, openssl and friends
    crl_check_interval: int = 60    # periodic full CRL fetch (anti-entropy; changes arrive pushed)
    socket_limits: SocketLimits = SocketLimits()  # what one local user may hold of the Workload API socket



def load(path: str | Path, join_token: str | None = None) -> SidecarConfig:
    sec = load_yaml(path)
    issuer = sec.address("issuer_address")
    mode_raw = sec.get("socket_mode", (str, int), "0666")
    try:
        mode = int(mode_raw, 8) if isinstance(mode_raw, str) else int(mode_raw)
    except ValueError:
        raise sec.fail("socket_mode", f"must be an octal mode like 0660, got {mode_raw!r}") from None
    if not 0 <= mode <= 0o777:
        raise sec.fail("socket_mode", "must be between 0000 and 0777")
    max_hash = sec.get("exe_hash_max_bytes", int, 256 * 1024 * 1024)
    if max_hash < 0:
        raise sec.fail("exe_hash_max_bytes", "must not be negative")
    cfg = SidecarConfig(
        issuer_address=issuer,
        issuer_bootstrap_address=sec.address("issuer_bootstrap_address", default_bootstrap_address(issuer)),
        trust_bundle=sec.path("trust_bundle"),
        join_token=join_token or sec.str("join_token", None),
        data_dir=sec.path("data_dir"),
        socket_path=sec.path("socket_path"),
        socket_mode=mode,
        server_name=sec.str("server_name", "tessera-issuer"),
        exe_hash_max_bytes=max_hash,
        log_level=sec.str("log_level", "info"),
        metrics_address=sec.address("metrics_address", None),
        output_dir=sec.path("output_dir", None),
        crl_check_interval=sec.duration("crl_check_interval", "60s"),
        socket_limits=load_limits(sec),
    )
    if not cfg.socket_path.is_absolute():
        raise sec.fail("socket_path", "must be an absolute path")
    sec.reject_unknown()
    return cfg
