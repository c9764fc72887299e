"""The issuer's own TLS serving certificate, signed by its CA and recorded like every certificate it issues."""

from __future__ import annotations

import threading
import time

import grpc

from issuer.ca.authority import CertificateAuthority
from issuer.core.models import ISSUER, AuditEvent, IssuedSerial
from issuer.datastore.interface import Datastore
from tessera import pem, spiffeid, x509svid

SERVING_CERT_TTL = 24 * 3600


class ServingCert:
    """The issuer's own TLS certificate, re-issued at half-life and picked up by new handshakes."""

    def __init__(self, ca: CertificateAuthority, store: Datastore, server_name: str):
        self.ca = ca
        self.store = store
        self.server_name = server_name
        self._lock = threading.Lock()
        self._renew_at = 0.0
        self._pair: tuple[bytes, bytes] = self._issue()

    def _issue(self) -> tuple[bytes, bytes]:
        key = x509svid.new_key()
        sid = spiffeid.parse(f"spiffe://{self.ca.trust_domain}/tessera/issuer")
        signed = self.ca.sign(key.public_key(), sid, SERVING_CERT_TTL, dns_names=[self.server_name])
        now = int(time.time())
        not_after = int(signed.not_after.timestamp())
        record = IssuedSerial(signed.serial_hex, str(sid), "issuer", None, None, now, not_after)
        self.store.record_issued(
            [record],
            [AuditEvent("issuer.serving_cert", ISSUER, "allow", reason="issuer TLS serving certificate",
                        subject=str(sid), details={**record.audit_details(), "dns_names": [self.server_name]})])
        self._renew_at = time.time() + SERVING_CERT_TTL / 2
        return pem.key_pem(key), pem.certs_pem([signed.cert])

    def config(self) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration([self._pair], root_certificates=self.ca.bundle_pem)

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        with self._lock:
            if time.time() < self._renew_at:
                return None
            self._pair = self._issue()
            return self.config()
