"""The issuer's own TLS serving certificate, signed by the active intermediate and recorded like every certificate
it issues."""

from __future__ import annotations

import threading
import time

import grpc

from issuer.ca.authorities import Authorities
from issuer.core.models import ISSUER, AuditEvent, IssuedSerial
from issuer.datastore.interface import Datastore
from tessera import pem, spiffeid, x509svid

SERVING_CERT_TTL = 24 * 3600


class ServingCert:
    """The issuer's own TLS certificate (with its chain), re-issued at half-life, when its signer is tainted or
    revoked, and when the roots change; new handshakes pick it up."""

    def __init__(self, authorities: Authorities, store: Datastore, server_name: str):
        self.authorities = authorities
        self.store = store
        self.server_name = server_name
        self._lock = threading.Lock()
        self._renew_at = 0.0
        self._signer = ""
        self._bundle = b""
        self._pair: tuple[bytes, bytes] = self._issue()

    def _issue(self) -> tuple[bytes, bytes]:
        key = x509svid.new_key()
        sid = spiffeid.parse(f"spiffe://{self.authorities.trust_domain}/tessera/issuer")
        signed = self.authorities.signer().sign(key.public_key(), sid, SERVING_CERT_TTL, dns_names=[self.server_name])
        now = int(time.time())
        not_after = int(signed.not_after.timestamp())
        record = IssuedSerial(signed.serial_hex, str(sid), "issuer", None, None, now, not_after,
                              authority=signed.authority)
        self.store.record_issued(
            [record],
            [AuditEvent("issuer.serving_cert", ISSUER, "allow", reason="issuer TLS serving certificate",
                        subject=str(sid), details={**record.audit_details(), "dns_names": [self.server_name]})])
        # Half of what it got: an intermediate near its end caps the certificate below SERVING_CERT_TTL.
        self._renew_at = time.time() + max(1, not_after - now) / 2
        self._signer = signed.authority
        self._bundle = self.authorities.bundle_pem
        return pem.key_pem(key), pem.certs_pem(signed.chain)

    def config(self) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration([self._pair], root_certificates=self._bundle)

    def _due(self) -> bool:
        if time.time() >= self._renew_at or self.authorities.bundle_pem != self._bundle:
            return True
        try:
            return self.authorities.get(self._signer).state in ("tainted", "revoked")
        except Exception:  # noqa: BLE001 - an authority that vanished: re-issue under the active one
            return True

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        with self._lock:
            if not self._due():
                return None
            self._pair = self._issue()
            return self.config()
