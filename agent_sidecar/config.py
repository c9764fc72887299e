"""The sidecar's YAML configuration, validated at start.

The join token is a secret: it never comes from the command line. It is written in this file
(`join_token`, accepted only while the file is private to its owner, see Section.secret), or
read from a file (`join_token_file`, or `--join-token-file FILE`) with the same checks, only when
the sidecar must attest (so the file may go once it has joined), or from stdin
(`--join-token-file -`) at start.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from agent_sidecar.socket_server import SocketLimits, load_limits
from tessera.configfile import (default_bootstrap_address, dns_name, load_yaml, log_level, read_secret_file,
                                read_secret_stdin)
from tessera.durations import DAY

STDIN = "-"
MAX_CRL_CHECK_INTERVAL = DAY


@dataclass(frozen=True)
class SidecarConfig:
    # Every issuer this sidecar may use (equal peers on one database): the sidecar fails over between them.
    issuer_address: tuple[str, ...]
    issuer_bootstrap_address: tuple[str, ...]  # where to attest with a join token; default each issuer's port + 1
    trust_bundle: Path
    join_token: str | None  # given in the config file or on stdin
    data_dir: Path
    socket_path: Path
    socket_mode: int
    server_name: str
    exe_hash_max_bytes: int
    log_level: str
    metrics_address: str | None = None  # HOST:PORT for Prometheus /metrics; off when unset
    output_dir: Path | None = None  # bundle.pem and crl.pem for nginx, openssl and friends
    crl_check_interval: int = 60    # periodic full CRL fetch (anti-entropy; changes arrive pushed)
    join_token_file: Path | None = None  # read only when the sidecar must attest (no valid saved SVID)
    socket_limits: SocketLimits = SocketLimits()  # what one local user may hold of the Workload API socket

    def read_join_token(self) -> str | None:
        """The join token, if one was given; ConfigError when its file is not private to this user."""
        if self.join_token is not None or self.join_token_file is None:
            return self.join_token
        return read_secret_file(self.join_token_file, "join_token_file")


def load(path: str | Path, join_token_file: str | None = None) -> SidecarConfig:
    """`join_token_file` is the command line's --join-token-file: a path, or "-" for stdin; it wins over the file's."""
    sec = load_yaml(path)
    issuers = sec.addresses("issuer_address")
    mode_raw = sec.get("socket_mode", (str, int), "0666")
    if isinstance(mode_raw, str) and not re.fullmatch(r"0?[0-7]{3}", mode_raw, re.ASCII):
        raise sec.fail("socket_mode", f"must be an octal mode like 0660, got {mode_raw[:40]!r}")
    mode = int(mode_raw, 8) if isinstance(mode_raw, str) else mode_raw
    if not 0 <= mode <= 0o777:
        raise sec.fail("socket_mode", "must be between 0000 and 0777")
    # Checked even when the command line names another token: a token in a file others can read is exposed.
    token = sec.secret("join_token")
    token_file = sec.path("join_token_file", None)
    if token is not None and token_file is not None:
        raise sec.fail("join_token_file", "give join_token or join_token_file, not both")
    if join_token_file == STDIN:
        token, token_file = read_secret_stdin("--join-token-file"), None
    elif join_token_file is not None:
        token, token_file = None, Path(join_token_file)
    cfg = SidecarConfig(
        issuer_address=issuers,
        issuer_bootstrap_address=sec.addresses("issuer_bootstrap_address",
                                               tuple(default_bootstrap_address(a) for a in issuers)),
        trust_bundle=sec.path("trust_bundle"),
        join_token=token,
        data_dir=sec.path("data_dir"),
        socket_path=sec.path("socket_path"),
        socket_mode=mode,
        server_name=sec.checked("server_name", dns_name, sec.str("server_name", "tessera-issuer")),
        exe_hash_max_bytes=sec.int("exe_hash_max_bytes", 256 * 1024 * 1024, maximum=2**40),
        log_level=sec.checked("log_level", log_level, sec.str("log_level", "info")),
        metrics_address=sec.address("metrics_address", None),
        output_dir=sec.path("output_dir", None),
        crl_check_interval=sec.duration("crl_check_interval", "60s", maximum=MAX_CRL_CHECK_INTERVAL),
        join_token_file=token_file,
        socket_limits=load_limits(sec),
    )
    if not cfg.socket_path.is_absolute():
        raise sec.fail("socket_path", "must be an absolute path")
    sec.reject_unknown()
    return cfg
