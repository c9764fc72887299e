"""The issuer's services wired in-process by the composition root (issuer.app.build) over a real config, SQLite
store and CA, for tests of their own rules (the races and checks no real sidecar can be made to hit on cue)."""

from __future__ import annotations

from pathlib import Path

import yaml

from issuer import config
from issuer.app import Services, build
from issuer.core.models import Actor
from tessera import x509svid

TD = "example.org"
OPERATOR = Actor("operator", "uid:0")


def issuer_services(root: Path, sidecars: tuple[str, ...] = ("h",), policy: dict | None = None) -> Services:
    """The services exactly as tessera-issuer builds them (no listeners); `sidecars` are really attested (join
    token + CSR), as every issuing path requires."""
    settings = {"trust_domain": TD, "data_dir": str(root), "listen_address": "127.0.0.1:0",
                "default_x509_ttl": "10m", "sidecar_svid_ttl": "1h", "join_token_ttl": "10m",
                "crl_validity": "10m", "signing_workers": 0}
    if policy is not None:
        settings["policy"] = policy
    root.mkdir(mode=0o700, parents=True, exist_ok=True)  # the config file lives in the data_dir
    path = root / "issuer.yaml"
    path.write_text(yaml.safe_dump(settings))
    services = build(config.load(path))
    for name in sidecars:
        token, _, _ = services.attestor.create_token(name, 600, OPERATOR)
        services.attestor.attest(token, x509svid.make_csr(x509svid.new_key()), "test")
    return services
