"""Load a task SVID with the unmodified `spiffe` package, as a standard SPIFFE consumer would.

  spiffe_parse.py SVID_PEM KEY_PEM BUNDLE_PEM TRUST_DOMAIN

Prints one JSON line: the SPIFFE ID and serial the package read, and whether the
chain the package loaded verifies link by link (leaf, then intermediates) up to an
authority of the trust domain's bundle.
Runs in its own process: the `spiffe` package's protobufs clash with Tessera's.
"""

import json
import sys

from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding


def _signed_by(cert, issuer) -> bool:
    try:
        issuer.public_key().verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(cert.signature_hash_algorithm))
        return True
    except Exception:  # noqa: BLE001 - not this issuer
        return False


def main() -> int:
    from spiffe import TrustDomain, X509Bundle, X509Svid

    svid_path, key_path, bundle_path, td = sys.argv[1:5]
    try:
        svid = X509Svid.load(svid_path, key_path, Encoding.PEM)
        bundle = X509Bundle.load(TrustDomain(td), bundle_path, Encoding.PEM)
        leaf = svid.leaf
        chain = list(svid.cert_chain)
        verified = all(_signed_by(cert, issuer) for cert, issuer in zip(chain, chain[1:])) and any(
            _signed_by(chain[-1], ca) for ca in bundle.x509_authorities)
        print(json.dumps({"spiffe_id": str(svid.spiffe_id), "serial": format(leaf.serial_number, "x"),
                          "verified": verified}))
        return 0
    except Exception as e:  # noqa: BLE001 - reported to the test
        print(json.dumps({"error": f"{type(e).__name__}: {e}"}))
        return 1


if __name__ == "__main__":
    sys.exit(main())
